"""One writer per output: a lease file, `_lock.json`, created exclusively by the run that writes.

Two drivers appending to one commit log would each believe its own state and number shards, chunks and
parts over the other's. So a run creates the lease with an exclusive create (O_EXCL locally, a
conditional put `If-None-Match: *` on S3) before it writes anything, renews it while it runs, and
deletes it at the end. A second run into the same output is refused while the lease is live.

A lease is stale, and may be taken over, when its holder is on this machine and its process is gone
(a killed driver: re-running at once works), or when it has not been renewed for STALE_S seconds (a
driver on another machine that died). Staleness across machines compares the holder's clock with
ours: clocks more than a few seconds apart delay or hasten a takeover by that much.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid

from .errors import OutputError
from .sink import LOCK

log = logging.getLogger(__name__)
STALE_S = 60.0
RENEW_S = 10.0


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), so a reused pid is not mistaken for it."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _holder_gone(holder: dict, now: float) -> str | None:
    """Why the lease `holder` wrote is stale, or None while it may still be live."""
    if holder.get("host") == socket.gethostname() and os.path.isdir("/proc"):
        start = _process_start(int(holder.get("pid", -1)))
        if start is None or (holder.get("pid_start") and start != holder["pid_start"]):
            return f"its process {holder.get('pid')} on this machine has ended"
    age = now - float(holder.get("renewed_at", 0))
    if age > STALE_S:
        return f"it was last renewed {age:.0f}s ago (stale after {STALE_S:.0f}s)"
    return None


def _create(store, path: str, data: bytes) -> None:
    """Create `path` holding `data`, or raise FileExistsError: never a moment with the file empty. Locally,
    a temp file linked into place (link refuses an existing name); on object stores, a conditional put."""
    if getattr(store.fs, "local_file", False):
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
        try:
            os.link(tmp, path)
        finally:
            os.remove(tmp)
        return
    store.fs.pipe_file(path, data, mode="create")


def _modified(store, path: str) -> float:
    try:
        return store.fs.modified(path).timestamp()
    except (OSError, NotImplementedError, AttributeError):
        return time.time()  # unknown: count it as fresh rather than take a live lease


class Lease:
    def __init__(self, store, token: str, holder: dict):
        self.store, self.token, self.holder = store, token, holder
        self.renewed = time.monotonic()

    @classmethod
    def acquire(cls, store) -> "Lease":
        token = uuid.uuid4().hex
        holder = {"token": token, "host": socket.gethostname(), "pid": os.getpid(),
                  "pid_start": _process_start(os.getpid()), "acquired_at": time.time(), "renewed_at": time.time()}
        path = store.path(LOCK)
        store.fs.makedirs(store.root, exist_ok=True)
        for attempt in range(2):
            try:
                _create(store, path, json.dumps(holder).encode())
                return cls(store, token, holder)
            except FileExistsError:
                pass
            try:
                other = json.loads(store.fs.cat_file(path))
            except FileNotFoundError:
                continue  # released meanwhile: try again
            except ValueError:  # not ours to read: judge it by the file's age
                other = {"renewed_at": _modified(store, path)}
            why = _holder_gone(other, time.time())
            if why is None or attempt:
                since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(other.get("acquired_at", 0))))
                raise OutputError(
                    f"output {store.url!r} is being written by another batch-detect run (host "
                    f"{other.get('host')!r}, pid {other.get('pid')}, since {since}): two runs into one output "
                    f"would corrupt it. Wait for that run to end; if it is gone, its lease ({LOCK}) expires "
                    f"{STALE_S:.0f}s after its last renewal, or delete {LOCK} once you are sure")
            log.warning("taking over the lease of output %s: %s", store.url, why)
            store.fs.rm(path)
        raise OutputError(f"output {store.url!r}: could not take its lease ({LOCK}); try again")

    def renew(self, force: bool = False) -> None:
        """Called from the dispatch loop; writes at most every RENEW_S. Raises if another run took over."""
        if not force and time.monotonic() - self.renewed < RENEW_S:
            return
        self.renewed = time.monotonic()
        try:
            current = json.loads(self.store.fs.cat_file(self.store.path(LOCK)))
        except (FileNotFoundError, ValueError):
            current = {}
        if current.get("token") != self.token:
            raise OutputError(f"output {self.store.url!r}: this run's lease ({LOCK}) was taken over by another run "
                              f"(host {current.get('host')!r}, pid {current.get('pid')}); stopping so that the two "
                              "do not both write. What was committed stays; re-run once the other has ended")
        self.holder["renewed_at"] = time.time()
        self.store.put_atomic(LOCK, json.dumps(self.holder).encode())

    def release(self) -> None:
        try:
            current = json.loads(self.store.fs.cat_file(self.store.path(LOCK)))
            if current.get("token") == self.token:
                self.store.fs.rm(self.store.path(LOCK))
        except (FileNotFoundError, ValueError, OSError):
            pass
