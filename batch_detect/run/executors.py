"""Who processes a run's shards, behind one interface (`run`, `stop`, `compact`, `close`, `facts`): worker
processes of this machine for a small embedded run (`LocalExecutor`), else Ray's actors (`RayExecutor`;
Ray's API is used in `distributed.py` alone, imported only once a run needs it). The dispatch
loop and the committer talk to whichever is in use; a run whose worker processes fail goes on with Ray."""

from __future__ import annotations

import itertools
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from ..config import RunConfig
from ..errors import count
from ..inputs.containers import tar_members_at_most
from ..inputs.plan import PlanStream, Shard
from ..inputs.walk import size_in_version
from ..output.sink import OutputStore
from .feed import Planning
from .local import NODE_ID, LocalDispatcher, worker_count
from .prepare import Prepared
from .readahead import MIB
from .sizing import auto_ray_min_images, auto_threads, estimate_actor_memory
from .worker import PREFETCH, WorkerSettings


@dataclass(frozen=True)
class SmallRun:
    """A run small enough for worker processes of this machine: how many, and the images and shards counted
    to find it so (the whole listing, but for tars elsewhere: the most their sizes can hold)."""

    workers: int
    images: int
    shards: int


@dataclass
class RayFacts:
    """Ray joined or started, and the pool sized for it, before anything is written."""

    started_ray: bool  # an embedded Ray this run started (and shuts down)
    ray_start_s: float
    num_actors: int
    capacity: int
    cluster_cpus: float
    memory_per_actor: int
    cpus_per_actor: int = 1


MAX_CLUSTER_LISTING = 32  # listing tasks in flight on a cluster by default, at most


def list_on_cluster(config: RunConfig, plan: PlanStream, facts: RayFacts) -> int:
    """On a cluster this run joined, the rest of the listing's pages go to Ray tasks spread over its nodes:
    --listing-processes of them at once, by default one per CPU of the cluster up to MAX_CLUSTER_LISTING,
    when that is more than this machine's processes. An embedded Ray has this machine's CPUs only: its
    local processes list as well. Returns the tasks in flight at most (0: not moved)."""
    pool = plan.stats.pool
    if pool is None or facts.started_ray:
        return 0
    slots = config.listing_processes or min(int(facts.cluster_cpus), MAX_CLUSTER_LISTING)
    if slots <= pool.processes and config.listing_processes is None:
        return 0
    from .distributed import ListingRunner

    pool.use([ListingRunner() for _ in range(slots)])
    return slots


def ray_min_images(config: RunConfig) -> int:
    return auto_ray_min_images() if config.ray_min_images is None else config.ray_min_images


def ray_address(config: RunConfig) -> str | None:
    return config.address or os.environ.get("RAY_ADDRESS")


def ray_where(config: RunConfig) -> str:
    address = ray_address(config)
    return (f"the Ray cluster at {address}" if address else
            "Ray on this machine (no --address: an embedded cluster for this run)")


def described(config: RunConfig, form: str, small: SmallRun | None) -> str:
    """Where a run's shards go, in the words the run and its dry run both print."""
    if small is None:
        return ray_where(config)
    what = f"at most {small.images} images" if form == "tar" else f"{small.images} images"
    return (f"{count(small.workers, 'worker process', 'worker processes')} of this machine, without starting Ray "
            f"({what}, under --ray-min-images {ray_min_images(config)})")


def without_ray(config: RunConfig, ready: Prepared, planning: Planning, plan: PlanStream) -> SmallRun | None:
    """A `SmallRun` when this run is small enough to do without Ray, else None: no cluster named, fewer images
    than --ray-min-images (counted by listing at most that many; for tars, whose images are known only as
    they stream, their members counted on this machine's disk, else the most their listed sizes can hold).
    Workers: one per --cpus-per-actor CPUs of this machine, as many as its memory share holds (the rule
    Ray's pool follows per node), one per shard at most."""
    threshold = ray_min_images(config)
    if not threshold or ray_address(config):
        return None
    ray_module = sys.modules.get("ray")
    if ray_module is not None and ray_module.is_initialized():  # a driver already inside Ray: use it
        return None
    if plan.form == "tar" and planning.pending:
        return None  # stored tar chunks hold no sizes: no bound on their images
    images = sum(c["items"] for c in planning.pending)
    head: list[Shard] = []
    for shard in plan.shards:
        head.append(shard)
        if plan.form == "tar":
            most = tar_members_at_most(shard.source, size_in_version(shard.versions[0] if shard.versions else None),
                                       threshold - images)
            images += threshold if most is None else most
        else:
            images += len(shard.uris)
        if images >= threshold:
            break
    plan.shards = itertools.chain(head, plan.shards)
    if images >= threshold:
        return None
    shards = len(head) + sum(c["shards"] for c in planning.pending)
    workers = config.num_actors or worker_count(config.cpus_per_actor or 1, max(1, shards),
                                                memory_per_worker(config, ready), config.node_memory_share)
    return SmallRun(workers, images, shards)


def memory_per_worker(config: RunConfig, ready: Prepared) -> int:
    """What each worker (actor or process) reserves: --memory-per-actor-mb, or the estimate for this model."""
    if config.memory_per_actor_mb:
        return config.memory_per_actor_mb * MIB
    info = ready.info.input
    input_bytes = info.height * info.width * info.channels * (4 if info.tensor.dtype == "float32" else 1)
    return estimate_actor_memory(len(ready.model_content), input_bytes, PREFETCH)


def local_threads(config: RunConfig, workers: int) -> int:
    """Interpreter threads per worker process: --cpus-per-actor, or this machine's CPUs shared out (as
    threads_per_actor does on Ray) when there are fewer workers than CPUs."""
    return config.cpus_per_actor or auto_threads(os.cpu_count() or 1, workers)


def start_ray(config: RunConfig, ready: Prepared, planning: Planning | None, plan: PlanStream | None, on_phase,
              most: int | None = None) -> RayFacts:
    """Join the cluster (or start an embedded one) and size the pool, before anything is written: a
    cluster we cannot use leaves no output. `plan` given: never more actors than the shards it holds;
    `most`: never more than that many (the shards a failed local run hands over)."""
    from .distributed import cluster_cpus, connect, disconnect, size_pool, threads_per_actor

    t_ray = time.perf_counter()
    on_phase(f"{'joining' if ray_address(config) else 'starting'} {ray_where(config)}")
    started_ray = connect(config.address)
    try:
        memory_per_actor = memory_per_worker(config, ready)
        num_actors, capacity = size_pool(config.num_actors, config.cpus_per_actor or 1, memory_per_actor,
                                         config.node_memory_share, 1 << 62)
        if plan is not None:
            # Never more actors than shards: list as many shards as the pool would hold (a few descriptors).
            pending_shards = sum(c["shards"] for c in planning.pending)
            head = list(itertools.islice(plan.shards, max(0, num_actors - pending_shards)))
            plan.shards = itertools.chain(head, plan.shards)
            num_actors = max(1, min(num_actors, len(head) + pending_shards))
        if most is not None:
            num_actors = max(1, min(num_actors, most))
        cpus = cluster_cpus()
        cpus_per_actor = config.cpus_per_actor or threads_per_actor(num_actors, memory_per_actor,
                                                                    config.node_memory_share)
    except BaseException:
        if started_ray:
            disconnect()
        raise
    return RayFacts(started_ray=started_ray, ray_start_s=time.perf_counter() - t_ray, num_actors=num_actors,
                    capacity=capacity, cluster_cpus=cpus, memory_per_actor=memory_per_actor,
                    cpus_per_actor=cpus_per_actor)


def shut_down_ray(facts: RayFacts) -> None:
    """An embedded Ray this run started is shut down; a cluster it joined is left as it was."""
    if facts.started_ray:
        from .distributed import disconnect

        disconnect()


@dataclass
class Hooks:
    """What an executor calls back on the dispatch thread: a staged shard, a tick of the loop, the end."""

    on_shard: Callable[[dict], None]
    tick: Callable[[], None]
    drained: Callable[[], None]


class LocalExecutor:
    """Worker processes of this machine (`local.py`); parts are written in the driver's process."""

    name = "local processes"

    def __init__(self, config: RunConfig, settings: WorkerSettings, small: SmallRun, shards: Iterator[Shard | None],
                 store: OutputStore, hooks: Hooks):
        self.config, self.small = config, small
        self.dispatcher = LocalDispatcher(settings, small.workers, shards, store,
                                          max_in_flight=config.max_shards_in_flight, on_shard=hooks.on_shard,
                                          tick=hooks.tick, drained=hooks.drained)

    @property
    def inflight(self) -> list:
        return self.dispatcher.inflight

    def run(self) -> list[Shard]:
        """Every shard through the workers; the shards left when one of them failed (for Ray to finish)."""
        return self.dispatcher.run()

    def stop(self) -> None:
        self.dispatcher.stop()

    def compact(self, part: int, shard_ids: list[str], done: Callable[[dict], None]) -> None:
        self.dispatcher.compact(part, shard_ids, done)

    def close(self) -> None:
        pass

    def facts(self) -> dict:
        return {"executor": self.name, "cpus": float(os.cpu_count() or 1), "capacity_at_start": None,
                "actors": self.small.workers, "actors_at_start": self.small.workers,
                "cpus_per_actor": local_threads(self.config, self.small.workers),
                "memory_per_actor": None, "nodes": [NODE_ID], "actors_per_node": {NODE_ID: self.small.workers},
                "lost_nodes": []}

    def handed_over(self) -> dict:
        """For the manifest of a run that began here: how many workers, and what went on with Ray and why."""
        return {"workers": self.small.workers, "handed_to_ray": len(self.dispatcher.handed_back),
                "why": self.dispatcher.why_ray}


class RayExecutor:
    """Ray's actor pool and its dispatcher (`distributed.py`); parts are written by Ray tasks."""

    name = "ray"

    def __init__(self, config: RunConfig, facts: RayFacts, settings: WorkerSettings, shards: Iterator[Shard | None],
                 store: OutputStore, hooks: Hooks, *, start_pool: bool):
        from .distributed import ActorPool, Dispatcher, node_capacity

        def grow(nodes: list[dict]) -> int:
            return sum(node_capacity(settings.num_threads, settings.memory_per_actor, config.node_memory_share,
                                     nodes).values())

        self.config, self.ray_facts = config, facts
        self.pool = ActorPool(settings, facts.num_actors, settings.num_threads,
                              None if config.num_actors is not None else grow)
        self.dispatcher = Dispatcher(self.pool, shards, store, max_in_flight=config.max_shards_in_flight,
                                     on_shard=hooks.on_shard, tick=hooks.tick, drained=hooks.drained)
        if start_pool:
            self.pool.start()  # models load while the first chunk is listed (a finished output needs no actor)

    @property
    def inflight(self) -> dict:
        return self.dispatcher.inflight

    def run(self) -> list[Shard]:
        self.dispatcher.run()
        return []

    def stop(self) -> None:
        self.dispatcher.stop()

    def compact(self, part: int, shard_ids: list[str], done: Callable[[dict], None]) -> None:
        from .distributed import compact_task

        self.dispatcher.watch(compact_task(self.config.output, self.config.storage_options, part, shard_ids,
                                              self.config.store_timeout), done)

    def close(self) -> None:
        self.pool.kill()
        if not self.pool.head_lost:  # disconnecting waits for the head: minutes when it is gone
            shut_down_ray(self.ray_facts)

    def facts(self) -> dict:
        f = self.ray_facts
        return {"executor": self.name, "cpus": f.cluster_cpus, "capacity_at_start": f.capacity,
                **self.pool.facts(self.pool.settings.num_threads)}
