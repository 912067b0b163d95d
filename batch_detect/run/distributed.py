"""Everything Ray: connecting, sizing the actor pool from the cluster's CPUs, one preloaded
interpreter per actor, the dispatch loop that keeps at most K shards in flight per actor, and the
compaction tasks that merge committed shards into part files.

The driver sends shard descriptors (lists of URIs), never image bytes; actors read from storage and
write their own Parquet, so neither the driver nor the object store holds images. The driver pulls
shards from the plan stream only as actors have room for them: its memory does not grow with the input.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError, WorkerCrashedError

from ..errors import ClusterError, ConfigError, HeadUnreachable, StoreUnavailable
from ..outage import OUTAGE, configure as configure_outage
from .liveness import DEADLINE_FACTOR, DEADLINE_FLOOR_S, GCS_SILENCE_S, CallClock, NodeWatch
from .metrics import record_shard
from ..inputs.plan import Shard
from ..output.sink import OutputStore
from .readahead import MIB
from .sizing import auto_threads, workers_fitting
from .worker import ShardProcessor, ShardRows, WorkerSettings, summarize_shard  # noqa: F401

log = logging.getLogger(__name__)

MAX_SHARD_ATTEMPTS = 3
GROWTH_CHECK_S = 2.0  # how often the pool looks for nodes that joined
ACTOR_START_TIMEOUT_S = 180


def disconnect() -> None:
    ray.shutdown()


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 0))


def connect(address: str | None) -> bool:
    """Join `address` (or $RAY_ADDRESS) when given, else start an embedded local Ray. Returns True when
    this call started Ray (so the caller shuts it down)."""
    if ray.is_initialized():
        return False
    kwargs = {"configure_logging": False, "log_to_driver": True}
    target = address or os.environ.get("RAY_ADDRESS")
    if not target:
        # "local": a Ray of our own, even where `ray start` (or another job) already runs one on this
        # machine; without it ray.init joins the most recent one it finds, CPUs and all.
        ray.init(address="local", include_dashboard=False, **kwargs)
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


def node_capacity(cpus_per_actor: int, memory_per_actor: int, share: float,
                  nodes: list[dict] | None = None) -> dict[str, int]:
    """Actors each live node can hold (of `nodes`, as ray.nodes() lists them; by default asked now): bounded
    by its CPUs and by a share of its memory."""
    out = {}
    for node in ray.nodes() if nodes is None else nodes:
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        out[node["NodeID"]] = workers_fitting(res.get("CPU", 0), res.get("memory", 0), cpus_per_actor,
                                              memory_per_actor, share)
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


def threads_per_actor(num_actors: int, memory_per_actor: int, share: float, nodes: list[dict] | None = None) -> int:
    """CPUs (interpreter threads) per actor when --cpus-per-actor is not given (`auto_threads`): the most
    that still let all `num_actors` fit where the cluster's nodes have room."""
    nodes = [n for n in (ray.nodes() if nodes is None else nodes) if n.get("Alive")]
    cpus = sum(n.get("Resources", {}).get("CPU", 0) for n in nodes)
    return auto_threads(cpus, num_actors,
                        fits=lambda t: sum(node_capacity(t, memory_per_actor, share, nodes).values()) >= num_actors)


class DetectorActor(ShardProcessor):
    """A ShardProcessor as a Ray actor: one interpreter for its lifetime; whole shards in, their rows
    staged by the actor itself, a summary (with its node) back."""

    def __init__(self, settings: WorkerSettings):
        super().__init__(settings, node_id=ray.get_runtime_context().get_node_id())

    def info(self) -> dict:
        return {"node_id": self.node_id, "pid": os.getpid()}

    def process(self, shard: Shard) -> dict:
        summary, timings = self.process_timed(shard)
        record_shard(self.settings.output_url, str(os.getpid()), summary, timings)
        return summary


def crashed_rows(shard_id: str, uris, cause: str) -> ShardRows:
    """Failure records for images that kill the worker process, so none of them is lost."""
    rows = ShardRows(shard_id)
    for uri in uris:
        for k, v in zip(("uri", "shard_id", "stage", "error_type", "message"),
                        (uri, shard_id, "infer", "worker_crashed",
                         f"the worker process died while processing this image: {cause}"[:2000])):
            rows.failures[k].append(v)
    return rows


def _compact(output_url: str | None, storage_options: dict, part: int, shard_ids: list[str],
             store_timeout: float | None = None) -> dict:
    if output_url is None:  # the warm-up call: see warm_up_compaction
        return {}
    if store_timeout is not None:
        configure_outage(store_timeout)
    return OutputStore(output_url, storage_options).compact(part, shard_ids)


# Compaction is I/O: it takes no CPU slot from the detector actors, and a retry is harmless (idempotent).
_compact_task = ray.remote(num_cpus=0, max_retries=3)(_compact)


def _get_part(ref) -> dict:
    try:
        return ray.get(ref)
    except RayTaskError as exc:
        if isinstance(exc.cause, StoreUnavailable):  # one sentence, not Ray's traceback
            raise StoreUnavailable(str(exc.cause)) from None
        raise


def compact_task(*args):
    """A compaction task on the driver's node where it can run there (soft): on a worker node that is lost
    mid-run, nothing gives it up until Ray declares the node dead (~60 s), and the run waits for it."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return _compact_task.options(scheduling_strategy=here).remote(*args)


def _listing_page(fn: Callable, *args):
    return fn(*args)


# A listing page waits on the store and parses: no CPU slot of the actors' (they would starve the listing that
# feeds them), spread over the nodes; the walk keeps at most one task per runner in flight.
_listing_task = ray.remote(num_cpus=0, max_retries=2, scheduling_strategy="SPREAD")(_listing_page)


class ListingRunner:
    """One listing page at a time as a Ray task on the cluster (a runner of `inputs.pages`' ListingPool)."""

    name = "a Ray listing task"

    def start(self) -> None:
        pass

    def call(self, fn: Callable, args: tuple) -> tuple[bool, object]:
        try:
            return True, ray.get(_listing_task.remote(fn, *args))
        except RayTaskError as exc:  # what the page raised (FileNotFoundError, PermissionError...), as itself
            return False, exc.as_instanceof_cause()
        except ray.exceptions.RayError as exc:
            raise OSError(f"{type(exc).__name__}: {exc}") from None

    def stop(self) -> None:
        pass

    def wait(self, timeout: float | None = None) -> None:
        pass


def warm_up_compaction() -> None:
    """Ray stores a remote function in the GCS on its first call, and that call waits for the GCS: made
    mid-run while the head is unreachable, it would hang the dispatch loop. So the first call is made
    at the start, with nothing to do."""
    compact_task(None, {}, 0, [])


class ActorPool:
    """The detector actors: started, grown when nodes join, and brought back after a crash without
    blocking dispatch (a restarting actor is asked for `info` again until it answers or its deadline
    passes)."""

    def __init__(self, settings: WorkerSettings, num_actors: int, cpus_per_actor: int,
                 grow: Callable[[list[dict]], int] | None):
        env = {k: v for k, v in os.environ.items() if k.startswith("BATCH_DETECT_")}
        # Variables of ours (e.g. the test-only crash hook) reach actors on every node.
        self.actor_cls = ray.remote(DetectorActor).options(
            num_cpus=cpus_per_actor, memory=settings.memory_per_actor, max_restarts=-1, max_task_retries=0,
            scheduling_strategy="SPREAD", **({"runtime_env": {"env_vars": env}} if env else {}))
        self.settings = settings
        self.num_actors = num_actors
        self.at_start = 0
        self.started_at = 0.0
        self.start_error: str | None = None
        self.grow_to = grow
        self.actors: list = []
        self.alive: set[int] = set()
        self.load: list[int] = []
        self.waiting: dict = {}  # info ref -> (actor index, deadline): starting or restarting
        self.recheck: list[tuple[float, int, float]] = []  # (when, actor index, deadline)
        self.placements: dict[int, dict] = {}
        self.hosts: set[str] = set()  # every node an actor ran on: one lost mid-run is still one of them
        self.nodes = NodeWatch()  # nodes given up on, for the manifest
        self.head_lost = False  # the GCS stopped answering: Ray calls that need it would hang
        self.last_growth_check = time.monotonic()

    def start(self) -> None:
        """Launch the pool without waiting for it: actors load their model while the listing produces the
        first shards, and each takes work as soon as it answers."""
        if self.actors:
            return
        deadline = time.monotonic() + ACTOR_START_TIMEOUT_S
        for i in range(self.num_actors):
            self.actors.append(self.actor_cls.remote(self.settings))
            self.load.append(0)
            self._ask(i, deadline)
        self.at_start = self.num_actors
        self.started_at = time.monotonic()

    def check_started(self) -> None:
        """Before any actor has answered: stop with the reason if none can start."""
        if self.placements or not self.actors:
            return
        if self.start_error is not None:
            raise ConfigError(f"detector actors failed to start: {self.start_error}")
        if time.monotonic() - self.started_at > ACTOR_START_TIMEOUT_S:
            raise ConfigError(
                f"the {self.num_actors} detector actors did not start within {ACTOR_START_TIMEOUT_S}s: the "
                "cluster lacks the CPUs they ask for, or its nodes cannot import batch_detect")

    def grow(self, pending: int) -> None:
        """Nodes that joined mid-run (autoscaling) get actors; work goes to them once they answer."""
        if self.grow_to is None or not pending or time.monotonic() - self.last_growth_check < GROWTH_CHECK_S:
            return
        nodes = self.nodes.latest  # asked off this loop: asking here could hang it on an unreachable head
        if nodes is None:
            return
        self.last_growth_check = time.monotonic()
        # Actors still starting will take pending work too: grow only for what they cannot absorb.
        wanted = min(self.grow_to(nodes) - len(self.actors), pending - len(self.waiting))
        for _ in range(max(0, wanted)):
            self.actors.append(self.actor_cls.remote(self.settings))
            self.load.append(0)
            self._ask(len(self.actors) - 1, time.monotonic() + ACTOR_START_TIMEOUT_S)
        if wanted > 0:
            log.info("the cluster grew: %d more detector actors", wanted)

    def _ask(self, i: int, deadline: float) -> None:
        self.waiting[self.actors[i].info.remote()] = (i, deadline)

    def lost(self, i: int) -> None:
        """Actor i's call died with it: out of the pool until its restart answers."""
        if i in self.alive:
            self.alive.discard(i)
            self._ask(i, time.monotonic() + ACTOR_START_TIMEOUT_S)

    def answered(self, ref) -> None:
        i, deadline = self.waiting.pop(ref)
        try:
            self.placements[i] = ray.get(ref)
            self.hosts.add(self.placements[i]["node_id"])
            self.alive.add(i)
        except ActorUnavailableError:  # still restarting: ask again shortly, until the deadline
            if time.monotonic() < deadline:
                self.recheck.append((time.monotonic() + 0.5, i, deadline))
        except RayActorError as exc:  # gone for good (its node is lost, or it cannot start)
            if not self.placements and self.start_error is None:
                self.start_error = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__

    def refs(self) -> list:
        now = time.monotonic()
        due = [r for r in self.recheck if r[0] <= now]
        self.recheck = [r for r in self.recheck if r[0] > now]
        for _, i, deadline in due:
            self._ask(i, deadline)
        return list(self.waiting)

    def recovering(self) -> bool:
        return bool(self.waiting or self.recheck)

    def on_node(self, node_id: str) -> list[int]:
        """The actors last seen on node `node_id`."""
        return [i for i, p in self.placements.items() if p["node_id"] == node_id]

    def kill(self) -> None:
        self.nodes.stop()
        if self.head_lost:
            return  # killing goes through the unreachable GCS; the actors end with this driver anyway
        for a in self.actors:
            ray.kill(a)

    def facts(self, cpus_per_actor: int) -> dict:
        per_node: dict[str, int] = {}
        for p in self.placements.values():
            per_node[p["node_id"]] = per_node.get(p["node_id"], 0) + 1
        return {"actors": len(self.actors), "actors_at_start": self.at_start, "cpus_per_actor": cpus_per_actor,
                "memory_per_actor": self.settings.memory_per_actor, "nodes": sorted(self.hosts),
                "actors_per_node": per_node, "lost_nodes": list(self.nodes.lost.values())}


_END = object()


@dataclass
class _Work:
    shard: Shard
    part: Shard | None  # None: the whole shard, staged by the actor; else a slice of it, rows come back
    attempt: int = 1
    patience: int = 1  # times the call deadline it is given: doubled each time it runs past it


@dataclass
class _Isolation:
    """A shard being bisected after killing workers: its parts' rows, gathered by the driver."""

    rows: ShardRows
    parts_left: int = 0
    crashes: int = 0


class Dispatcher:
    """Shards from `source` to the pool's actors, at most `max_in_flight` each, until every shard is
    staged; `on_shard` gets each staged shard's summary (the caller logs it). A shard whose actor dies is
    retried once whole (the death may have nothing to do with it: OOM, a lost node). If it kills a worker
    again, it is bisected until each image that kills workers stands alone; those become
    `worker_crashed` failure records and the rest of the shard completes. Calls on a node Ray declares dead,
    or running past the deadline (`liveness.py`), are given up and their work re-queued to the other actors
    at once (a late result of such a call is never read, so never committed). `watch` adds other refs (e.g.
    compaction tasks) to the same wait, with a callback."""

    def __init__(self, pool: ActorPool, source: Iterator[Shard], store: OutputStore, *, max_in_flight: int,
                 on_shard: Callable[[dict], None], tick: Callable[[], None] = lambda: None,
                 drained: Callable[[], None] = lambda: None):
        self.pool, self.source, self.store = pool, source, store
        self.max_in_flight = max_in_flight
        self.on_shard, self.tick, self.drained = on_shard, tick, drained
        self.was_drained = False
        self.pending: deque[_Work] = deque()
        self.inflight: dict = {}  # ObjectRef -> (actor index, work, weight, sent at)
        self.outage_seen = False  # the driver found its store unavailable since the last lateness check
        self.clock = CallClock()
        self.isolating: dict[str, _Isolation] = {}
        self.watched: dict = {}  # ObjectRef -> callback(result)
        self.exhausted = self.starved = self.stopping = False
        self.no_actor_since: float | None = None

    def watch(self, ref, callback: Callable) -> None:
        self.watched[ref] = callback

    def stop(self) -> None:
        """Stop now: queued shards are dropped and results still in flight are not committed (a re-run
        does them); what is committed is compacted (the `drained` hook) and the loop returns."""
        self.stopping = self.exhausted = True
        self.pending.clear()
        self.isolating.clear()

    def run(self) -> None:
        self.pool.nodes.start()
        warm_up_compaction()
        while True:
            self._top_up()
            self.pool.grow(len(self.pending))
            self._assign()
            self.tick()
            if self.exhausted and (self.stopping or not (self.pending or self.inflight or self.isolating)):
                if not self.was_drained:  # every shard is staged: the caller may start last work (compaction)
                    self.was_drained = True
                    self.drained()
                if not self.watched:
                    return
            self._check_stuck()
            waitable = list(self.inflight) + self.pool.refs() + list(self.watched)
            if not waitable:
                time.sleep(0.01 if self.starved else 0.1)
                continue
            done, _ = ray.wait(waitable, num_returns=1, timeout=0.05 if self.starved else 0.5)
            for ref in done:
                if ref in self.watched:
                    self.watched.pop(ref)(_get_part(ref))
                elif ref in self.inflight:
                    self._result(ref)
                else:
                    self.pool.answered(ref)
            self._give_up_lost()

    def _top_up(self) -> None:
        """Pull shards from the plan only as far as the actors can take them: the backpressure that keeps
        the driver's memory flat. The source yields None when the listing has nothing ready yet."""
        room = max(1, len(self.pool.actors) or self.pool.num_actors) * self.max_in_flight
        self.starved = False
        while not self.exhausted and len(self.pending) < room:
            shard = next(self.source, _END)
            if shard is _END:
                self.exhausted = True
            elif shard is None:
                self.starved = True
                break
            else:
                self.pending.append(_Work(shard, None))
        if self.pending and not self.pool.actors:
            self.pool.start()  # a resumed run starts actors only once there is work left

    def _assign(self) -> None:
        """Whole shards fill each actor up to K. A slice being isolated runs alone on an idle actor: when
        it dies, nothing queued behind it on that actor is blamed."""
        for i in sorted(self.pool.alive, key=lambda j: self.pool.load[j]):
            while self.pending and self.pool.load[i] < self.max_in_flight:
                work = self.pending[0]
                alone = work.part is not None
                if alone and self.pool.load[i] > 0:
                    break
                self.pending.popleft()
                actor = self.pool.actors[i]
                call = actor.process.remote(work.shard) if not alone else actor.process_part.remote(work.part)
                weight = self.max_in_flight if alone else 1
                self.inflight[call] = (i, work, weight, time.monotonic())
                self.pool.load[i] += weight

    def _check_stuck(self) -> None:
        self.pool.check_started()
        if self.pool.alive or self.inflight or not self.pending:
            self.no_actor_since = None
            return
        if self.no_actor_since is None:
            self.no_actor_since = time.monotonic()
        if not self.pool.recovering() or time.monotonic() - self.no_actor_since > ACTOR_START_TIMEOUT_S:
            raise RuntimeError("every detector actor has died; see the Ray logs for the cause")

    def _result(self, ref) -> None:
        i, work, weight, sent = self.inflight.pop(ref)
        self.pool.load[i] -= weight
        if self.stopping:
            return
        try:
            result = ray.get(ref)
        except (RayActorError, WorkerCrashedError) as exc:
            self.pool.lost(i)
            node = self.pool.placements.get(i, {}).get("node_id")
            self._nodes_lost()
            if node in self.pool.nodes.dead:
                self.pending.appendleft(work)  # its node went, not the shard's doing: no attempt counted
                return
            self._crashed(work, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            return
        except RayTaskError as exc:
            if isinstance(exc.cause, StoreUnavailable):  # waited out for --store-timeout already: stop
                raise StoreUnavailable(str(exc.cause)) from None
            # An exception, not a crash: storage or a bug. Retry, then stop the job saying why.
            if work.attempt >= MAX_SHARD_ATTEMPTS:
                raise RuntimeError(f"shard {work.shard.shard_id} failed {work.attempt} times: {exc}") from None
            self.pending.appendleft(_Work(work.shard, work.part, work.attempt + 1))
            return
        self.clock.record(time.monotonic() - sent)
        if work.part is None:
            self.on_shard(result)
        else:
            self._part_done(work, ShardRows.from_columns(work.shard.shard_id, result))

    def _give_up_lost(self) -> None:
        """Re-queue the calls that will not come back: on nodes Ray now reports dead, or past the deadline.
        Stop the run when the head itself is unreachable: Ray would end this process minutes later, with
        nothing said and the manifest left 'running'."""
        silent = self.pool.nodes.silent_s()
        if silent > GCS_SILENCE_S:
            self.pool.head_lost = True
            raise HeadUnreachable(
                f"lost contact with the Ray cluster's head (GCS at {ray.get_runtime_context().gcs_address}): no "
                f"answer for {silent:.0f}s, a network partition or a dead head node. What was committed stays in "
                "the output; re-run the same command once the head is reachable to finish the run")
        if not self.inflight:
            return
        self._nodes_lost()
        if OUTAGE.state().unavailable_s is not None:
            self.outage_seen = True  # a store outage stalls every actor alike: none of them is lost for it
            return
        if self.outage_seen:  # the store answers again: every call in flight gets its full time from now
            self.outage_seen = False
            now = time.monotonic()
            self.inflight = {ref: (i, work, weight, now) for ref, (i, work, weight, _) in self.inflight.items()}
        limit = self.clock.deadline_s()
        now = time.monotonic()
        late = {i for i, work, _, sent in self.inflight.values() if now - sent > limit * work.patience}
        for i in sorted(late):
            node_id = self.pool.placements.get(i, {}).get("node_id", "?")
            entry = self.pool.nodes.record(node_id, f"an actor there did not answer within {limit:.0f}s")
            n = self._requeue(i, late=True)
            entry["shards_requeued"] += n
            log.warning("node %s (%s) lost: actor %d has not answered for %.0fs (%dx its usual time, at least "
                        "%.0fs); %d shards re-queued to the other actors", node_id[:8], entry["address"], i, limit,
                        DEADLINE_FACTOR, DEADLINE_FLOOR_S, n)

    def _nodes_lost(self) -> None:
        """Whether the GCS's latest answer reports a node with our actors dead; re-queue their calls."""
        used = {p["node_id"] for p in self.pool.placements.values()}
        for entry in self.pool.nodes.poll(used):
            n = sum(self._requeue(i) for i in self.pool.on_node(entry["node_id"]))
            entry["shards_requeued"] += n
            log.warning("node %s (%s) lost: Ray reports it dead; %d shards in flight there re-queued to the other "
                        "actors", entry["node_id"][:8], entry["address"], n)

    def _requeue(self, i: int, late: bool = False) -> int:
        """Give up actor i's calls (their results, if any come, are never read) and queue their work first;
        the actor leaves the pool until it answers again (restarted elsewhere, or reachable again). Work
        given up for lateness gets twice the time next: a shard that is merely slow still finishes."""
        mine = [ref for ref, entry in self.inflight.items() if entry[0] == i]
        for ref in mine:
            _, work, weight, _ = self.inflight.pop(ref)
            self.pool.load[i] -= weight
            self.pending.appendleft(_Work(work.shard, work.part, work.attempt, work.patience * (2 if late else 1)))
        self.pool.lost(i)
        return len(mine)

    def _crashed(self, work: _Work, cause: str) -> None:
        if work.part is None and work.attempt == 1:
            log.warning("actor died on shard %s (%s); retrying it", work.shard.shard_id, cause)
            self.pending.appendleft(_Work(work.shard, None, 2))
            return
        if work.part is None:  # died twice on the whole shard: from now on it is handled in parts
            self.isolating[work.shard.shard_id] = _Isolation(ShardRows(work.shard.shard_id), parts_left=1)
            work = _Work(work.shard, work.shard)
        uris = work.part.uris
        if len(uris) == 1 and work.attempt == 1:
            # It may only have been queued behind the real culprit on the same actor: once more.
            self.pending.append(_Work(work.shard, work.part, 2))
        elif len(uris) == 1:
            self.isolating[work.shard.shard_id].crashes += 1
            log.warning("image %s kills the worker; recording it as a failure", uris[0])
            self._part_done(work, crashed_rows(work.shard.shard_id, uris, cause))
        else:
            log.warning("shard %s kills workers; isolating the cause among %d images", work.shard.shard_id, len(uris))
            iso = self.isolating[work.shard.shard_id]
            for half in work.part.halves():
                if half.uris:
                    iso.parts_left += 1
                    self.pending.appendleft(_Work(work.shard, half))
            self._part_done(work, None)  # this part is replaced by its two halves

    def _part_done(self, work: _Work, rows: ShardRows | None) -> None:
        iso = self.isolating[work.shard.shard_id]
        if rows is not None:
            iso.rows.extend(rows)
        iso.parts_left -= 1
        if iso.parts_left == 0:
            del self.isolating[work.shard.shard_id]
            self.store.write_shard(work.shard.shard_id, iso.rows.columns, work.shard.run)
            self.on_shard(summarize_shard(iso.rows, {"read_decode_s": 0.0, "infer_s": 0.0,
                                                     "isolated_crashes": iso.crashes}, 0.0,
                                          ray.get_runtime_context().get_node_id()))
