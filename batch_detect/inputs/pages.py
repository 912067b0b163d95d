"""Listing pages parsed in several processes: the listing's throughput grows with the CPUs given to it.

A prefix listing is bound by parsing: s3fs turns about 5,000 keys a second of LIST responses into Python
objects on one event-loop thread, whatever the number of requests in flight, so one process lists a
100M-key bucket in ~6 hours. `walk` asks for one page (one LIST request, or one local directory) at a
time per directory; `ListingPool` runs those requests in worker processes, which fetch, parse and sort a
page and send back its entries. The walk itself (which page next, the merge in sorted order) stays in the
driver, so the output is the same whatever the number of processes.

Small listings never pay for processes: the first pages are listed on threads of this process, and the
processes start only after `THRESHOLD` pages; until they are ready, pages still go to the threads.

Workers are plain subprocesses (`python -m batch_detect.inputs.pages`), fed over pipes, rather than
`multiprocessing` ones, which re-import the caller's main module (see `run/local.py`).
"""

from __future__ import annotations

import os
import pickle
import queue
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from ..outage import OUTAGE

__all__ = ["ListingPool", "auto_processes", "Shipped"]

THRESHOLD = 8  # pages listed in this process before the worker processes start
PAGES_PER_PROCESS = 4  # pages a worker process has in flight at once (each mostly waits on the store)
STARTING_PAGES = 2  # pages on this process's threads at once while the worker processes start
MAX_AUTO = 8  # listing processes by default, at most: enough to outrun most runs' dispatch


def auto_processes() -> int:
    """The default number of listing processes: one per CPU of this machine, at most MAX_AUTO."""
    return max(1, min(os.cpu_count() or 1, MAX_AUTO))


class Shipped:
    """A filesystem that crosses to a worker process once: pickled to bytes here once, unpickled there
    once per worker (fsspec instances made with skip_instance_cache would otherwise be built, with a new
    HTTP session, for every page)."""

    def __init__(self, fs):
        self.fs = fs
        self._blob: bytes | None = None

    def __reduce__(self):
        if self._blob is None:
            self._blob = pickle.dumps(self.fs)
        return _unship, (self._blob,)


_SHIPPED: dict[bytes, Shipped] = {}


def _unship(blob: bytes) -> Shipped:
    found = _SHIPPED.get(blob)
    if found is None:
        found = _SHIPPED[blob] = Shipped(pickle.loads(blob))
    return found


class _Process:
    """One worker process: up to `in_flight` tasks at a time over its pipes (a LIST page waits on the store
    far longer than it takes to parse: one page at a time left a process idle most of the time). `call` is
    safe from several threads; replies come back by task id, read by one thread."""

    in_flight = PAGES_PER_PROCESS

    def __init__(self, preload: tuple[str, ...]):
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
        self.proc = subprocess.Popen([sys.executable, "-m", "batch_detect.inputs.pages", str(self.in_flight),
                                      *preload], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.name = f"listing process {self.proc.pid}"
        self.lock = threading.Lock()
        self.waiting: dict[int, list] = {}  # task id -> [event, reply]
        self.next_id = 0
        self.gone: BaseException | None = None

    def start(self) -> None:
        try:
            ready = pickle.load(self.proc.stdout)
        except (EOFError, pickle.UnpicklingError):
            ready = None
        if ready != "ready":
            raise OSError(f"{self.name} failed to start")
        threading.Thread(target=self._read, name="listing-replies", daemon=True).start()

    def _read(self) -> None:
        try:
            while True:
                task, reply = pickle.load(self.proc.stdout)
                with self.lock:
                    slot = self.waiting.pop(task)
                slot[1] = reply
                slot[0].set()
        except Exception as exc:  # noqa: BLE001 - the channel is unusable however it broke: wake every caller
            with self.lock:
                self.gone = exc
                slots, self.waiting = list(self.waiting.values()), {}
            for slot in slots:
                slot[0].set()  # no reply: the caller raises

    def call(self, fn: Callable, args: tuple) -> tuple[bool, object]:
        slot = [threading.Event(), None]
        with self.lock:
            if self.gone is not None:
                raise OSError(f"{type(self.gone).__name__}: {self.gone}")
            self.next_id += 1
            self.waiting[self.next_id] = slot
            pickle.dump((self.next_id, fn, args), self.proc.stdin)
            self.proc.stdin.flush()
        slot[0].wait()
        if slot[1] is None:
            raise EOFError(f"{self.name} ended with the page unanswered")
        return slot[1]

    def stop(self) -> None:
        try:
            with self.lock:
                self.proc.stdin.close()  # it finishes its pages, reads the end and exits
        except OSError:
            pass

    def wait(self, timeout: float | None = 5) -> None:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class _Slots:
    """Runners (worker processes, or what the run layer gives: Ray tasks), each fed from one shared queue
    by threads of its own, one task at a time each: `in_flight` threads (a runner's attribute, default 1).
    A runner has `start()`, `call(fn, args) -> (ok, value)` (raising OSError, EOFError or ValueError once it
    is gone; safe from its threads at once where `in_flight` > 1), `stop()`, `wait()` and a `name`."""

    def __init__(self, runners: list):
        self.runners = runners
        self.tasks: queue.Queue = queue.Queue()
        self.closing = False
        self.ready = 0
        self.alive = len(runners)  # feeding threads not ended (a runner that fails or dies ends its thread)
        self.settled = threading.Semaphore(0)  # released once per runner, ready or failed
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._feed, args=(r,), name="listing-runner", daemon=True)
                        for r in runners]
        for t in self.threads:
            t.start()

    @property
    def all_ready(self) -> bool:
        return self.ready == len(self.runners)

    def wait_started(self) -> None:
        for _ in self.runners:
            self.settled.acquire()

    def submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        self.tasks.put((future, fn, args))
        return future

    def _feed(self, runner, started: bool = False) -> None:
        """A feeding thread: the runner's first starts it, the others (`started`) only take its tasks."""
        try:
            self._take_tasks(runner) if started else self._run(runner)
        finally:
            with self.lock:
                self.alive -= 1
            if self.alive == 0 and not self.closing:  # nobody left to take what is queued
                self._fail_all(OSError(f"{runner.name} ended, and no other is left"))

    def _run(self, runner) -> None:
        try:
            runner.start()
        except OSError:
            self.settled.release()
            return
        more = max(0, getattr(runner, "in_flight", 1) - 1)
        with self.lock:
            self.ready += 1
            self.alive += more
        for _ in range(more):
            threading.Thread(target=self._feed, args=(runner, True), name="listing-runner", daemon=True).start()
        self.settled.release()
        self._take_tasks(runner)

    def _take_tasks(self, runner) -> None:
        while (item := self.tasks.get()) is not None:
            if getattr(runner, "gone", None) is not None:  # ended under another of its threads: leave the
                self.tasks.put(item)  # page to a live runner (or to _fail_all once none is left)
                return
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                ok, value = runner.call(fn, args)
            except (EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:  # ValueError: a closed pipe
                future.set_exception(OSError(f"{runner.name} ended: {type(exc).__name__}: {exc}"))
                return
            (future.set_result if ok else future.set_exception)(value)

    def _fail_all(self, exc: BaseException) -> None:
        # Nobody will take them (every runner ended, or the pool is closing): fail them, never leave them waiting.
        for future, _, _ in self.take_queued():
            if future.set_running_or_notify_cancel():
                future.set_exception(exc)

    def take_queued(self) -> list:
        """The tasks no runner has taken yet, out of the queue."""
        taken = []
        while True:
            try:
                item = self.tasks.get_nowait()
            except queue.Empty:
                return taken
            if item is not None:
                taken.append(item)

    def close(self, drain: bool = False) -> None:
        """Stop the runners; `drain`: wait for the pages they are on however long, never kill them."""
        self.closing = True
        self._fail_all(OSError("the listing was closed"))  # queued pages nobody will take now
        for r in self.runners:
            for _ in range(getattr(r, "in_flight", 1)):
                self.tasks.put(None)
        for r in self.runners:
            r.stop()
        for r in self.runners:
            r.wait(None) if drain else r.wait()


class ListingPool:
    """Where a walk's pages are listed: threads of this process for the first THRESHOLD pages, then
    `processes` worker processes once they are ready (None: one per CPU, at most MAX_AUTO; 1: threads
    only, as a single process lists; `threshold` 0: every page in the processes, waiting for them). `submit(fn, *args)` returns a Future; `fn` must be a module-level
    function whose arguments pickle (a filesystem as `Shipped`). Use as a context manager, or close()."""

    def __init__(self, processes: int | None = None, *, threads: int = 16, threshold: int | None = None,
                 preload: tuple[str, ...] = ()):
        self.processes = auto_processes() if processes is None else processes
        self.threshold = THRESHOLD if threshold is None else threshold
        self.preload = preload
        self.local = ThreadPoolExecutor(threads, thread_name_prefix="walk")
        self.remote: _Slots | None = None
        self.submitted = 0
        self.local_pending = 0  # pages on this process's threads not done yet
        self.lock = threading.Lock()
        self.in_processes = 0  # pages listed by the worker processes (tests and the manifest read it)

    def submit(self, fn: Callable, *args) -> Future:
        fn, args = _waiting_out_outages, (fn, *args)  # a throttled store mid-listing is waited out (outage.py)
        self.submitted += 1
        if self.remote is None and self.processes > 1 and self.submitted > self.threshold:
            self.remote = _Slots([_Process(self.preload) for _ in range(self.processes)])
            if self.threshold == 0:
                self.remote.wait_started()
        # While the processes start, a couple of pages go on in this process; the rest wait for the processes
        # (listed here, up to a lookahead's worth of pages would hold the driver's CPU for seconds).
        remote = self.remote
        if remote is not None and remote.alive and (remote.all_ready or self.local_pending >= STARTING_PAGES):
            self.in_processes += 1
            return remote.submit(fn, *args)
        with self.lock:
            self.local_pending += 1
        future = self.local.submit(fn, *args)
        future.add_done_callback(self._local_done)
        return future

    def _local_done(self, future: Future) -> None:
        with self.lock:
            self.local_pending -= 1

    def use(self, runners: list) -> None:
        """Pages from now on go to `runners` (see `_Slots`: the run layer's Ray tasks on the cluster, once Ray
        is up); pages queued for the worker processes move with them, and those processes end."""
        slots = _Slots(runners)
        slots.wait_started()
        old, self.remote = self.remote, slots
        self.processes = len(runners)
        if old is not None:
            for item in old.take_queued():
                slots.tasks.put(item)
            # its pages in flight finish where they are (one may be waiting out an outage): not killed
            threading.Thread(target=old.close, kwargs={"drain": True}, name="listing-drain", daemon=True).start()

    def close(self) -> None:
        # Pages still queued are not wanted (a consumer that stops early): cancel them, don't wait.
        self.local.shutdown(wait=False, cancel_futures=True)
        if self.remote is not None:
            self.remote.close()
            self.remote = None

    def __enter__(self) -> "ListingPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _waiting_out_outages(fn: Callable, *args):
    """One page, its request retried on transient store errors within the process's budget (outage.py)."""
    return OUTAGE.call(fn, *args, what="a listing page")


def _serve() -> None:
    """A worker process: (task id, fn, args) in on stdin, (task id, (ok, result or exception)) out on stdout
    as each finishes, up to argv[1] at once, until EOF."""
    import importlib

    channel_in, channel_out = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever a library prints goes to stderr, never into the channel
    sys.stdout = sys.stderr
    in_flight = int(sys.argv[1])
    for name in sys.argv[2:]:
        importlib.import_module(name)
    writing = threading.Lock()
    pickle.dump("ready", channel_out)
    channel_out.flush()

    def run(task: int, fn: Callable, args: tuple) -> None:
        try:
            reply = (True, fn(*args))
        except Exception as exc:  # handed to the driver, which raises it where the walk needs the page
            reply = (False, exc)
        except BaseException as exc:  # noqa: BLE001 - a page thread must answer, or its caller waits forever
            reply = (False, OSError(f"{type(exc).__name__}: {exc}"))
        try:
            data = pickle.dumps((task, reply))
        except Exception:
            data = pickle.dumps((task, (False, OSError(f"{type(reply[1]).__name__}: {reply[1]}"))))
        with writing:
            channel_out.write(data)
            channel_out.flush()

    with ThreadPoolExecutor(in_flight, thread_name_prefix="page") as pages:
        while True:
            try:
                task, fn, args = pickle.load(channel_in)
            except EOFError:
                return  # the pool's exit waits for the pages still running
            pages.submit(run, task, fn, args)


if __name__ == "__main__":
    _serve()
