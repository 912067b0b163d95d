"""Everything Ray: connecting, sizing the actor pool from the cluster's CPUs, one preloaded
interpreter per actor, and the dispatch loop that keeps at most K shards in flight per actor.

The driver sends shard descriptors (lists of URIs), never image bytes; actors read from storage and
write their own Parquet, so neither the driver nor the object store holds images.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError, WorkerCrashedError

from .detector import Detector
from .errors import ClusterError, ConfigError
from .errors import ModelError
from .interpreter import load_backend, read_model, sha256
from .listing import Shard
from .reading import Reader
from .sink import OutputStore
from .worker import ShardRows, run_shard

log = logging.getLogger(__name__)

MAX_SHARD_ATTEMPTS = 3
GROWTH_CHECK_S = 2.0  # how often the pool looks for nodes that joined
PREFETCH = 4  # images read and decoded ahead of the interpreter, per actor
ACTOR_START_TIMEOUT_S = 180


@dataclass(frozen=True)
class WorkerSettings:
    model_url: str
    model_sha256: str
    memory_per_actor: int
    backend: str
    num_threads: int
    score_threshold: float
    resize: str
    normalization: str
    max_pixels: int
    jpeg_draft: bool
    labels: list | None
    output_url: str
    storage_options: dict
    extensions: tuple[str, ...] = ()  # which tar members are images
    image_column: str | None = None  # Parquet input: the column of image bytes
    batch_size: int = 1  # images per invoke, where the model's batch dimension is dynamic
    prefetch: int = PREFETCH
    output_format: str = "auto"


def connect(address: str | None) -> bool:
    """Join `address` (or $RAY_ADDRESS) when given, else start an embedded local Ray. Returns True when
    this call started Ray (so the caller shuts it down)."""
    if ray.is_initialized():
        return False
    kwargs = {"configure_logging": False, "log_to_driver": True}
    target = address or os.environ.get("RAY_ADDRESS")
    if not target:
        ray.init(include_dashboard=False, **kwargs)
        return True
    try:
        ray.init(address=target, **kwargs)
    except (ConnectionError, RuntimeError) as exc:
        hint = ""
        if os.environ.get("RAY_AUTH_MODE") != "token":
            hint = (" If the cluster uses token authentication (the default for `ray start` since Ray 2.59), "
                    "set RAY_AUTH_MODE=token and provide its token (~/.ray/auth_token, RAY_AUTH_TOKEN or "
                    "RAY_AUTH_TOKEN_PATH).")
        raise ClusterError(f"cannot join the Ray cluster at {target!r}: {exc}.{hint}") from None
    return True


MIB = 1 << 20


def estimate_actor_memory(model_bytes: int, input_bytes: int, prefetch: int) -> int:
    """A detector actor's resident memory, in bytes, for Ray to reserve: a Python worker with numpy,
    pyarrow and Pillow (~300 MiB), the interpreter (model plus arena, a few times the model), and the
    images in flight (prefetch + 1 decoded images of up to ~12 MP RGB, plus their input tensors)."""
    return 300 * MIB + 4 * model_bytes + (prefetch + 1) * (36 * MIB + 2 * input_bytes)


def node_capacity(cpus_per_actor: int, memory_per_actor: int, share: float) -> dict[str, int]:
    """Actors each live node can hold: bounded by its CPUs and by a share of its memory."""
    out = {}
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        by_cpu = int(res.get("CPU", 0) // cpus_per_actor)
        by_mem = int(res.get("memory", 0) * share // memory_per_actor)
        out[node["NodeID"]] = min(by_cpu, by_mem)
    return out


def size_pool(num_actors: int | None, cpus_per_actor: int, memory_per_actor: int, share: float,
              num_shards: int) -> tuple[int, dict]:
    """(actors to start, per-node capacity). Auto: what the nodes hold; never more than shards."""
    capacity = node_capacity(cpus_per_actor, memory_per_actor, share)
    total = sum(capacity.values())
    if num_actors is None:
        if total == 0:
            raise ConfigError(
                f"no node can hold a detector actor ({cpus_per_actor} CPU, {memory_per_actor / MIB:.0f} MiB "
                f"within {share:.0%} of its memory): add nodes, or lower --cpus-per-actor / --memory-per-actor-mb"
            )
        num_actors = total
    elif num_actors > total:
        raise ConfigError(
            f"{num_actors} actors of {cpus_per_actor} CPU and {memory_per_actor / MIB:.0f} MiB do not fit: the "
            f"cluster's nodes hold {total} ({', '.join(f'{n[:8]}: {c}' for n, c in capacity.items())}). "
            "Lower --num-actors, --cpus-per-actor or --memory-per-actor-mb, or add nodes"
        )
    return max(1, min(num_actors, num_shards)), capacity


class DetectorActor:
    """Holds one interpreter for its lifetime; processes whole shards and commits them itself."""

    def __init__(self, settings: WorkerSettings):
        backend = load_backend(settings.backend)
        # Each actor streams the model from its URL (a restart reads it again), and runs only the
        # exact bytes the driver checked.
        model_content = read_model(settings.model_url, settings.storage_options)
        if sha256(model_content) != settings.model_sha256:
            raise ModelError(f"model {settings.model_url!r} changed since the job started (sha256 differs)")
        self.detector = Detector(
            backend,
            model_content,
            num_threads=settings.num_threads,
            score_threshold=settings.score_threshold,
            resize=settings.resize,
            normalization=settings.normalization,
            max_pixels=settings.max_pixels,
            model_url=settings.model_url,
            jpeg_draft=settings.jpeg_draft,
            output_format=settings.output_format,
        )
        self.detector.set_batch(settings.batch_size)
        self.settings = settings
        self.reader = Reader(settings.storage_options)
        self.store = OutputStore(settings.output_url, settings.storage_options)
        self.pool = ThreadPoolExecutor(max_workers=max(2, settings.num_threads), thread_name_prefix="prefetch")

    def info(self) -> dict:
        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def _run(self, shard: Shard):
        s = self.settings
        return run_shard(shard, self.detector, self.reader, s.labels, self.pool, s.prefetch, s.extensions,
                         s.image_column)

    def process_part(self, part: Shard) -> dict:
        """Some of a shard's images, rows returned instead of written (used to isolate poison images)."""
        rows, _ = self._run(part)
        return {"images": rows.images, "detections": rows.detections, "failures": rows.failures}

    def process(self, shard: Shard) -> dict:
        t0 = time.perf_counter()
        rows, timings = self._run(shard)
        summary = _summary(rows, timings, time.perf_counter() - t0)
        self.store.write_shard(shard.shard_id, {"images": rows.images, "detections": rows.detections,
                                                "failures": rows.failures}, summary)
        return summary


def _summary(rows: ShardRows, timings: dict, wall_s: float) -> dict:
    breakdown: dict[str, int] = {}
    for stage, etype in zip(rows.failures["stage"], rows.failures["error_type"]):
        key = f"{stage}/{etype}"
        breakdown[key] = breakdown.get(key, 0) + 1
    unlabelled: dict[str, int] = {}
    for cid, label in zip(rows.detections["class_id"], rows.detections["label"]):
        if label is None:
            unlabelled[str(cid)] = unlabelled.get(str(cid), 0) + 1
    return {"shard_id": rows.shard_id, **rows.counts, "failure_types": breakdown, "wall_s": wall_s,
            "unlabelled_class_ids": unlabelled,
            "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), **timings}


def crashed_rows(shard_id: str, uris, cause: str) -> ShardRows:
    """Failure records for images that kill the worker process, so none of them is lost."""
    rows = ShardRows(shard_id)
    for uri in uris:
        for k, v in zip(("uri", "shard_id", "stage", "error_type", "message"),
                        (uri, shard_id, "infer", "worker_crashed",
                         f"the worker process died while processing this image: {cause}"[:2000])):
            rows.failures[k].append(v)
    return rows


@dataclass
class _Work:
    shard: Shard
    part: Shard | None  # None: the whole shard, committed by the actor; else a slice of it, rows come back
    attempt: int = 1


@dataclass
class _Isolation:
    """A shard being bisected after killing workers: its parts' rows, gathered by the driver."""

    rows: ShardRows
    parts_left: int = 0
    crashes: int = 0


def run_shards(
    shards: list[Shard],
    settings: WorkerSettings,
    *,
    num_actors: int,
    cpus_per_actor: int,
    max_in_flight: int,
    on_shard: Callable[[dict], None] | None = None,
    grow: Callable[[], int] | None = None,
) -> dict:
    """Process every shard exactly once into committed output; returns pool facts for the manifest.

    A shard whose actor dies is retried once whole (the death may have nothing to do with it: OOM, a
    lost node). If it kills a worker again, it is bisected until each image that kills workers stands
    alone; those become `worker_crashed` failure records and the rest of the shard completes."""
    # Variables of ours (e.g. the test-only crash hook) reach actors on every node.
    env = {k: v for k, v in os.environ.items() if k.startswith("BATCH_DETECT_")}
    actor_cls = ray.remote(DetectorActor).options(
        num_cpus=cpus_per_actor, memory=settings.memory_per_actor, max_restarts=-1, max_task_retries=0,
        scheduling_strategy="SPREAD",
        **({"runtime_env": {"env_vars": env}} if env else {}),
    )
    actors = [actor_cls.remote(settings) for _ in range(num_actors)]
    try:
        placements = ray.get([a.info.remote() for a in actors], timeout=ACTOR_START_TIMEOUT_S)
    except GetTimeoutError:
        raise ConfigError(
            f"the {num_actors} detector actors did not start within {ACTOR_START_TIMEOUT_S}s: the cluster "
            "lacks the CPUs they ask for, or its nodes cannot import batch_detect"
        ) from None
    except RayActorError as exc:
        raise ConfigError(f"detector actors failed to start: {exc}") from None

    store = OutputStore(settings.output_url, settings.storage_options)
    pending: deque[_Work] = deque(_Work(s, None) for s in shards)
    inflight: dict = {}  # ObjectRef -> (actor index, work)
    load = [0] * num_actors
    alive = set(range(num_actors))
    isolating: dict[str, _Isolation] = {}

    def commit(shard_id: str, rows: ShardRows, timings: dict) -> dict:
        summary = _summary(rows, timings, 0.0)
        store.write_shard(shard_id, {"images": rows.images, "detections": rows.detections,
                                     "failures": rows.failures}, summary)
        return summary

    def part_done(work: _Work, rows: ShardRows | None) -> None:
        iso = isolating[work.shard.shard_id]
        if rows is not None:
            iso.rows.extend(rows)
        iso.parts_left -= 1
        if iso.parts_left == 0:
            del isolating[work.shard.shard_id]
            summary = commit(work.shard.shard_id, iso.rows, {"read_decode_s": 0.0, "infer_s": 0.0,
                                                             "isolated_crashes": iso.crashes})
            if on_shard is not None:
                on_shard(summary)

    def split(work: _Work) -> None:
        iso = isolating[work.shard.shard_id]
        for half in work.part.halves():
            if half.uris:
                iso.parts_left += 1
                pending.appendleft(_Work(work.shard, half))

    starting: dict = {}  # info ObjectRef of an actor added mid-run -> its index
    no_actor_since: float | None = None
    last_growth_check = time.monotonic()
    placements = list(placements)

    def add_actors() -> None:
        """Nodes that joined mid-run (autoscaling) get actors; work goes to them once they answer."""
        wanted = min(grow() - len(actors), len(pending)) if grow is not None else 0
        for _ in range(max(0, wanted)):
            actors.append(actor_cls.remote(settings))
            load.append(0)
            starting[actors[-1].info.remote()] = len(actors) - 1
        if wanted > 0:
            log.info("the cluster grew: %d more detector actors", wanted)

    while pending or inflight:
        if grow is not None and pending and time.monotonic() - last_growth_check > GROWTH_CHECK_S:
            last_growth_check = time.monotonic()
            add_actors()
        for i in sorted(alive, key=lambda j: load[j]):
            while pending and load[i] < max_in_flight:
                work = pending.popleft()
                call = (actors[i].process.remote(work.shard) if work.part is None
                        else actors[i].process_part.remote(work.part))
                inflight[call] = (i, work)
                load[i] += 1
        if alive or inflight:
            no_actor_since = None
        elif no_actor_since is None:
            no_actor_since = time.monotonic()
        if not inflight and (not starting or time.monotonic() - no_actor_since > ACTOR_START_TIMEOUT_S):
            raise RuntimeError("every detector actor has died; see the Ray logs for the cause")
        done, _ = ray.wait(list(inflight) + list(starting), num_returns=1, timeout=GROWTH_CHECK_S)
        for ref in done:
            if ref in starting:
                j = starting.pop(ref)
                try:
                    placements.append(ray.get(ref))
                    alive.add(j)
                except RayActorError:
                    pass
                continue
            i, work = inflight.pop(ref)
            load[i] -= 1
            try:
                result = ray.get(ref)
            except (RayActorError, WorkerCrashedError) as exc:
                cause = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                _check_alive(actors, i, alive)
                if work.part is None and work.attempt == 1:
                    log.warning("actor died on shard %s (%s); retrying it", work.shard.shard_id, cause)
                    pending.appendleft(_Work(work.shard, None, 2))
                    continue
                if work.part is None:  # died twice on the whole shard: from now on it is handled in parts
                    isolating[work.shard.shard_id] = _Isolation(ShardRows(work.shard.shard_id), parts_left=1)
                    work = _Work(work.shard, work.shard)
                uris = work.part.uris
                if len(uris) == 1 and work.attempt == 1:
                    # It may only have been queued behind the real culprit on the same actor: once more.
                    pending.append(_Work(work.shard, work.part, 2))
                elif len(uris) == 1:
                    isolating[work.shard.shard_id].crashes += 1
                    log.warning("image %s kills the worker; recording it as a failure", uris[0])
                    part_done(work, crashed_rows(work.shard.shard_id, uris, cause))
                else:
                    log.warning("shard %s kills workers; isolating the cause among %d images",
                                work.shard.shard_id, len(uris))
                    split(work)
                    part_done(work, None)  # this part is replaced by its two halves
                continue
            except RayTaskError as exc:
                # An exception, not a crash: storage or a bug. Retry, then stop the job saying why.
                if work.attempt >= MAX_SHARD_ATTEMPTS:
                    raise RuntimeError(f"shard {work.shard.shard_id} failed {work.attempt} times: {exc}") from None
                pending.appendleft(_Work(work.shard, work.part, work.attempt + 1))
                continue
            if work.part is None:
                if on_shard is not None:
                    on_shard(result)
            else:
                part_done(work, ShardRows.from_columns(work.shard.shard_id, result))
    for a in actors:
        ray.kill(a)
    per_node: dict[str, int] = {}
    for p in placements:
        per_node[p["node_id"]] = per_node.get(p["node_id"], 0) + 1
    return {"actors": len(actors), "actors_at_start": num_actors, "cpus_per_actor": cpus_per_actor,
            "memory_per_actor": settings.memory_per_actor, "nodes": sorted(per_node), "actors_per_node": per_node}


def _check_alive(actors: list, i: int, alive: set) -> None:
    """After a crash, wait for the actor's restart; one that cannot come back leaves the pool."""
    deadline = time.monotonic() + ACTOR_START_TIMEOUT_S
    while True:
        try:
            ray.get(actors[i].info.remote(), timeout=max(1.0, deadline - time.monotonic()))
            return
        except ActorUnavailableError:  # still restarting: ask again until the deadline
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        except (RayActorError, GetTimeoutError):
            break
    alive.discard(i)
