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
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError, WorkerCrashedError

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
ACTOR_START_TIMEOUT_S = 180


@dataclass(frozen=True)
class WorkerSettings:
    model_url: str
    model_sha256: str
    backend: str
    num_threads: int
    score_threshold: float
    resize: str
    normalization: str
    max_pixels: int
    labels: list | None
    output_url: str
    storage_options: dict
    prefetch: int = 4


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


def size_pool(num_actors: int | None, cpus_per_actor: int, num_shards: int) -> tuple[int, float]:
    """(actors, cluster CPUs): one actor per `cpus_per_actor` CPUs unless told, never more than shards."""
    cluster_cpus = float(ray.cluster_resources().get("CPU", 0))
    if num_actors is None:
        num_actors = max(1, int(cluster_cpus // cpus_per_actor))
    if num_actors * cpus_per_actor > cluster_cpus:
        raise ConfigError(
            f"{num_actors} actors x {cpus_per_actor} CPUs need {num_actors * cpus_per_actor} CPUs but the "
            f"cluster has {cluster_cpus:g}: lower --num-actors or --cpus-per-actor, or add nodes"
        )
    return max(1, min(num_actors, num_shards)), cluster_cpus


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
        )
        self.settings = settings
        self.reader = Reader(settings.storage_options)
        self.store = OutputStore(settings.output_url, settings.storage_options)
        self.pool = ThreadPoolExecutor(max_workers=max(2, settings.num_threads), thread_name_prefix="prefetch")

    def info(self) -> dict:
        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def process(self, shard: Shard) -> dict:
        t0 = time.perf_counter()
        rows, timings = run_shard(shard, self.detector, self.reader, self.settings.labels, self.pool,
                                  self.settings.prefetch)
        summary = _summary(rows, timings, time.perf_counter() - t0)
        self.store.write_shard(shard.shard_id, {"images": rows.images, "detections": rows.detections,
                                                "failures": rows.failures}, summary)
        return summary


def _summary(rows: ShardRows, timings: dict, wall_s: float) -> dict:
    breakdown: dict[str, int] = {}
    for stage, etype in zip(rows.failures["stage"], rows.failures["error_type"]):
        key = f"{stage}/{etype}"
        breakdown[key] = breakdown.get(key, 0) + 1
    return {"shard_id": rows.shard_id, **rows.counts, "failure_types": breakdown, "wall_s": wall_s,
            "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), **timings}


def crashed_shard_rows(shard: Shard, cause: str, attempts: int) -> ShardRows:
    """Failure records for a shard no worker could finish, so none of its images is lost."""
    rows = ShardRows(shard.shard_id)
    message = f"worker died {attempts} times processing this shard: {cause}"[:2000]
    for uri in shard.uris:
        for k, v in zip(("uri", "shard_id", "stage", "error_type", "message"),
                        (uri, shard.shard_id, "infer", "worker_crashed", message)):
            rows.failures[k].append(v)
    return rows


def run_shards(
    shards: list[Shard],
    settings: WorkerSettings,
    *,
    num_actors: int,
    cpus_per_actor: int,
    max_in_flight: int,
    on_shard: Callable[[dict], None] | None = None,
) -> dict:
    """Process every shard exactly once into committed output; returns pool facts for the manifest."""
    actor_cls = ray.remote(DetectorActor).options(
        num_cpus=cpus_per_actor, max_restarts=2, max_task_retries=0, scheduling_strategy="SPREAD"
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
    pending: deque[tuple[Shard, int]] = deque((s, 1) for s in shards)
    inflight: dict = {}  # ObjectRef -> (actor index, shard, attempt)
    load = [0] * num_actors
    errors = [0] * num_actors
    alive = set(range(num_actors))
    while pending or inflight:
        for i in sorted(alive, key=lambda j: load[j]):
            while pending and load[i] < max_in_flight:
                shard, attempt = pending.popleft()
                inflight[actors[i].process.remote(shard)] = (i, shard, attempt)
                load[i] += 1
        if not inflight:
            raise RuntimeError("every detector actor has died; see the Ray logs for the cause")
        done, _ = ray.wait(list(inflight), num_returns=1)
        for ref in done:
            i, shard, attempt = inflight.pop(ref)
            load[i] -= 1
            try:
                summary = ray.get(ref)
            except (RayActorError, WorkerCrashedError, RayTaskError) as exc:
                errors[i] += 1
                if isinstance(exc, RayActorError) and errors[i] > 3:
                    alive.discard(i)
                cause = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                if attempt < MAX_SHARD_ATTEMPTS:
                    log.warning("shard %s attempt %d failed (%s); retrying", shard.shard_id, attempt, cause)
                    pending.appendleft((shard, attempt + 1))
                    continue
                rows = crashed_shard_rows(shard, cause, attempt)
                summary = _summary(rows, {"read_decode_s": 0.0, "infer_s": 0.0}, 0.0)
                store.write_shard(shard.shard_id, {"images": rows.images, "detections": rows.detections,
                                                   "failures": rows.failures}, summary)
            if on_shard is not None:
                on_shard(summary)
    for a in actors:
        ray.kill(a)
    return {"actors": num_actors, "cpus_per_actor": cpus_per_actor,
            "nodes": sorted({p["node_id"] for p in placements})}
