"""Small runs on this machine without Ray: starting Ray costs more than a few hundred images take.

With no cluster to join (no `--address`, no `RAY_ADDRESS`) and a plan of fewer than `--ray-min-images`
images, the shards go to worker processes of this machine (`python -m batch_detect.run.local`, one per
`cpus_per_actor` CPUs, each a `ShardProcessor` like an actor, fed shard descriptors over a pipe), and the
driver logs and compacts exactly as with Ray. A worker that dies or a shard that raises ends this mode:
the shards not committed are handed back and the run goes on with Ray, whose dispatcher retries them and
isolates an image that kills workers. So a small run is fast and loses nothing the Ray path would keep.

Workers are plain subprocesses rather than `multiprocessing` ones: those re-import the caller's main
module, which would run an unguarded script calling `pipeline.run` again in every worker.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Callable, Iterator

from ..errors import StoreUnavailable
from ..inputs.plan import Shard
from .sizing import machine_memory, workers_fitting
from ..output.sink import OutputStore
from .worker import WorkerSettings

log = logging.getLogger(__name__)

NODE_ID = "local"  # the node of a shard processed without Ray, in the commit log and the manifest


def worker_count(cpus_per_actor: int, shards: int, memory_per_worker: int, share: float) -> int:
    """Worker processes for this machine: one per `cpus_per_actor` CPUs, as many as `share` of its available
    memory holds (where it can be read), one per shard at most; always one."""
    cpus, memory = os.cpu_count() or 1, machine_memory()
    fit = (cpus // max(1, cpus_per_actor) if memory is None else
           workers_fitting(cpus, memory, cpus_per_actor, memory_per_worker, share))
    return max(1, min(fit, shards))


class _Worker:
    """One worker process; a thread turns what it writes back into (worker, kind, payload) events."""

    def __init__(self, index: int, settings: WorkerSettings, events: queue.Queue):
        env = {**os.environ}  # ours (BATCH_DETECT_*) included, as the Ray path forwards them to actors
        self.index = index
        self.proc = subprocess.Popen([sys.executable, "-m", "batch_detect.run.local", str(os.getpid())],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.inflight: deque[Shard] = deque()
        pickle.dump(settings, self.proc.stdin)
        self.proc.stdin.flush()
        threading.Thread(target=self._read, args=(events,), name=f"local-worker-{index}", daemon=True).start()

    def _read(self, events: queue.Queue) -> None:
        try:
            while True:
                kind, payload = pickle.load(self.proc.stdout)
                events.put((self, kind, payload))
        except (EOFError, OSError, pickle.UnpicklingError):
            events.put((self, "died", f"the worker process ended (exit code {self.proc.wait()})"))

    def send(self, shard: Shard) -> None:
        self.inflight.append(shard)
        try:
            pickle.dump(shard, self.proc.stdin)
            self.proc.stdin.flush()
        except OSError:  # it died: its reader reports that, and this shard is handed back with the rest
            pass

    def close(self, now: bool) -> None:
        """End of work: the worker exits once it has read everything (`now`: at once)."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        if now:
            self.proc.kill()

    def wait(self, now: bool) -> None:
        try:
            self.proc.wait(timeout=None if not now else 5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class LocalDispatcher:
    """Shards from `source` to `workers` processes, at most `max_in_flight` each; `on_shard` gets each
    staged shard's summary. `run` returns the shards it hands back to Ray (empty when it finished)."""

    def __init__(self, settings: WorkerSettings, workers: int, source: Iterator[Shard | None], store: OutputStore, *,
                 max_in_flight: int, on_shard: Callable[[dict], None], tick: Callable[[], None],
                 drained: Callable[[], None]):
        self.settings, self.workers, self.source, self.store = settings, workers, source, store
        self.max_in_flight = max_in_flight
        self.on_shard, self.tick, self.drained = on_shard, tick, drained
        self.exhausted = self.stopping = False
        self.handed_back: list[Shard] = []
        self.why_ray: str | None = None  # why the run went on with Ray
        self.pool: list[_Worker] = []
        # Parts are written on a thread of their own: on the driver's thread, a part on a distant store (a
        # chain of round trips per table) held up dispatch for seconds while the workers ran out of shards.
        self._compactor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compact")
        self._compactions: deque[tuple[Future, Callable[[dict], None]]] = deque()
        # A run that stops on an exception (Ctrl-C, SIGTERM, a lost lease) leaves its parts to the next run
        # (compaction is idempotent): the one being written stops at its next batch, the rest never start.
        self._abandoned = threading.Event()
        self._compaction_store = store.fenced_copy(partial(_compaction_fence, store, self._abandoned))

    @property
    def inflight(self) -> list[Shard]:
        return [s for w in self.pool for s in w.inflight]

    def stop(self) -> None:
        """Stop now (fail fast): nothing new starts, results in flight are not committed."""
        self.stopping = self.exhausted = True

    def compact(self, part: int, shard_ids: list[str], done: Callable[[dict], None]) -> None:
        # Small runs write small parts: in the driver's process, in order, no worker needed.
        self._compactions.append((self._compactor.submit(self._compaction_store.compact, part, shard_ids), done))

    def _reap(self, wait: bool) -> None:
        """Parts written are logged, on the dispatch thread, in order; a failed one raises here."""
        while self._compactions and (wait or self._compactions[0][0].done()):
            future, done = self._compactions.popleft()
            done(future.result())

    def run(self) -> list[Shard]:
        events: queue.Queue = queue.Queue()
        finished = returned = False
        try:
            self.pool = [_Worker(i, self.settings, events) for i in range(self.workers)]
            self._loop(events)
            finished = not self.handed_back and not self.stopping
            self._reap(wait=True)
            returned = True
            return self.handed_back
        finally:
            # Interrupted, failing fast or handing over: what is in flight is not waited for (it would not
            # be committed); a worker stopped mid-shard leaves at most a temp file in staging.
            # All told first, then waited for: one at a time, each exit (~0.25 s) came after the previous one
            # (16 workers: seconds at the end of every run).
            for worker in self.pool:
                worker.close(now=not finished)
            for worker in self.pool:
                worker.wait(now=not finished)
            if not returned:
                self._abandoned.set()
            self._compactor.shutdown(wait=True, cancel_futures=not returned)  # nothing writes after the run

    def _loop(self, events: queue.Queue) -> None:
        while True:
            self._assign()
            self.tick()
            self._reap(wait=False)
            if self.exhausted and (self.stopping or not self.inflight):
                self.drained()
                return
            try:
                worker, kind, payload = events.get(timeout=0.5)
            except queue.Empty:
                continue
            if kind == "ready":
                continue
            if kind == "unavailable":  # the store, not the worker: Ray would find it no better
                raise StoreUnavailable(payload)
            if kind == "done":
                worker.inflight.popleft()
                if not self.stopping:
                    self.on_shard(payload)
                continue
            # "died" or "error": Ray takes over from here, with its retries and the isolation of an image
            # that kills workers.
            self.why_ray = str(payload)[:300]
            self.handed_back = sorted(self.inflight, key=lambda s: s.index)
            for w in self.pool:
                w.inflight.clear()
            log.warning("a worker process failed (%s); going on with Ray", self.why_ray)
            return

    def _assign(self) -> None:
        while not self.exhausted:
            worker = min(self.pool, key=lambda w: len(w.inflight))
            if len(worker.inflight) >= self.max_in_flight:
                return
            shard = next(self.source, StopIteration)
            if shard is StopIteration:
                self.exhausted = True
            elif shard is None:  # the listing has nothing ready yet
                return
            else:
                worker.send(shard)


class _Abandoned(Exception):
    """A part left to the next run: this one is stopping."""


def _compaction_fence(store: OutputStore, abandoned: threading.Event) -> None:
    if abandoned.is_set():
        raise _Abandoned("the run is stopping: this part is left to the next run")
    if store.fence is not None:  # the lease's, installed on the driver's store
        store.fence()


# --- the worker process ---------------------------------------------------------------------------


def _die_with(driver_pid: int) -> None:
    """A worker must not outlive its driver (a kill -9 gives the driver no chance to stop it): on Linux
    the kernel sends SIGKILL when the driver goes; elsewhere, and as a backstop, a thread watches."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while os.getppid() == driver_pid:
            time.sleep(1.0)
        os._exit(1)

    if os.getppid() != driver_pid:
        os._exit(1)
    threading.Thread(target=watch, name="driver-watch", daemon=True).start()


def _worker_main(driver_pid: int) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle: it stops us
    _die_with(driver_pid)
    commands, results = sys.stdin.buffer, os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # prints (native ones too) must not enter the pipe

    def reply(kind: str, payload) -> None:
        pickle.dump((kind, payload), results)
        results.flush()

    from .worker import ShardProcessor

    try:
        processor = ShardProcessor(pickle.load(commands), NODE_ID)
    except StoreUnavailable as exc:
        reply("unavailable", str(exc))
        return 1
    except Exception as exc:  # e.g. the model changed: Ray's path reports it the way it reports it for actors
        reply("error", f"{type(exc).__name__}: {exc}")
        return 1
    reply("ready", os.getpid())
    while True:
        try:
            shard = pickle.load(commands)
        except EOFError:
            # Every shard's files are closed and its reply sent: nothing is left that the interpreter's
            # teardown (modules, the model, idle pools: ~0.2 s, which the driver waits for) would finish.
            sys.stderr.flush()
            results.close()
            os._exit(0)
        try:
            reply("done", processor.process(shard))
        except StoreUnavailable as exc:
            reply("unavailable", str(exc))
            return 1
        except Exception as exc:
            reply("error", f"shard {shard.shard_id}: {type(exc).__name__}: {exc}")
            return 1


if __name__ == "__main__":
    sys.exit(_worker_main(int(sys.argv[1])))
