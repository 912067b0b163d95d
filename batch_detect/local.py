"""Small runs on this machine without Ray: starting Ray costs more than a few hundred images take.

With no cluster to join (no `--address`, no `RAY_ADDRESS`) and a plan of fewer than `--ray-min-images`
images, the shards go to worker processes of this machine (spawned, one per `cpus_per_actor` CPUs, each a
`ShardProcessor` like an actor), and the driver logs and compacts exactly as with Ray. A worker that dies
or a shard that raises ends this mode: the shards not committed are handed back and the run goes on with
Ray, whose dispatcher retries them and isolates an image that kills workers. So a small run is fast and
loses nothing the Ray path would keep.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Callable, Iterator

from .plan import Shard
from .sink import OutputStore
from .worker import ShardProcessor, WorkerSettings

log = logging.getLogger(__name__)

NODE_ID = "local"  # the node of a shard processed without Ray, in the commit log and the manifest

_processor: ShardProcessor | None = None


def _start_worker(settings: WorkerSettings, env: dict) -> None:
    global _processor
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle: it stops us
    os.environ.update(env)  # ours only (BATCH_DETECT_*): as the Ray path forwards them to actors
    _processor = ShardProcessor(settings, NODE_ID)


def _process(shard: Shard) -> dict:
    if _processor is None:  # pragma: no cover - the initializer failed, and the pool is broken anyway
        raise RuntimeError("worker not started")
    return _processor.process(shard)


def worker_count(cpus_per_actor: int, shards: int) -> int:
    return max(1, min((os.cpu_count() or 1) // max(1, cpus_per_actor), shards))


class LocalDispatcher:
    """Shards from `source` to `workers` processes, at most `max_in_flight` each; `on_shard` gets each
    staged shard's summary. `run` returns the shards it hands back to Ray (empty when it finished)."""

    def __init__(self, settings: WorkerSettings, workers: int, source: Iterator[Shard | None], *,
                 max_in_flight: int, on_shard: Callable[[dict], None], tick: Callable[[], None],
                 drained: Callable[[], None]):
        self.settings, self.workers, self.source = settings, workers, source
        self.max_in_flight = max_in_flight
        self.on_shard, self.tick, self.drained = on_shard, tick, drained
        self.inflight: dict[Future, Shard] = {}
        self.exhausted = self.stopping = False
        self.handed_back: list[Shard] = []
        self.why_ray: str | None = None  # why the run went on with Ray

    def stop(self) -> None:
        """Stop now (fail fast): nothing new starts, results in flight are not committed."""
        self.stopping = self.exhausted = True

    def compact(self, part: int, shard_ids: list[str], done: Callable[[dict], None]) -> None:
        # Small runs write small parts: in the driver, in order, no worker needed.
        done(OutputStore(self.settings.output_url, self.settings.storage_options).compact(part, shard_ids))

    def run(self) -> list[Shard]:
        env = {k: v for k, v in os.environ.items() if k.startswith("BATCH_DETECT_")}
        pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_start_worker, initargs=(self.settings, env))
        finished = False
        try:
            handed_back = self._loop(pool)
            finished = not handed_back and not self.stopping
            return handed_back
        finally:
            if not finished:
                # Interrupted, failing fast or handing over: what is in flight is not waited for (it would
                # not be committed); a worker stopped mid-shard leaves at most a temp file in staging.
                for process in list((pool._processes or {}).values()):
                    process.terminate()
            pool.shutdown(wait=finished, cancel_futures=True)

    def _loop(self, pool: ProcessPoolExecutor) -> list[Shard]:
        drained = False
        while True:
            while not self.exhausted and len(self.inflight) < self.workers * self.max_in_flight:
                shard = next(self.source, StopIteration)
                if shard is StopIteration:
                    self.exhausted = True
                elif shard is None:  # the listing has nothing ready yet
                    break
                else:
                    self.inflight[pool.submit(_process, shard)] = shard
            self.tick()
            if self.exhausted and (self.stopping or not self.inflight):
                if not drained:
                    drained = True
                    self.drained()
                return []
            done, _ = wait(list(self.inflight), timeout=0.5, return_when=FIRST_COMPLETED) if self.inflight \
                else (set(), None)
            if not self.inflight:
                time.sleep(0.01)
            for future in sorted(done, key=lambda f: self.inflight[f].index):
                shard = self.inflight.pop(future)
                try:
                    summary = future.result()
                except Exception as exc:
                    # A worker died (BrokenProcessPool) or a shard raised: Ray takes over from here, with
                    # its retries and the isolation of an image that kills workers.
                    self.why_ray = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
                    self.handed_back = sorted([shard, *self.inflight.values()], key=lambda s: s.index)
                    self.inflight.clear()
                    log.warning("a worker process failed on shard %s (%s); going on with Ray", shard.shard_id,
                                self.why_ray)
                    return self.handed_back
                if not self.stopping:
                    self.on_shard(summary)
