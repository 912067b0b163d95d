"""One writer per output: a lease file, `_lock.json`, created exclusively by the run that writes.

Two drivers appending to one commit log would each believe its own state and number shards, chunks and
parts over the other's. So a run creates the lease with an exclusive create (O_EXCL locally, a
conditional put `If-None-Match: *` on S3) before it writes anything, renews it while it runs, and
deletes it at the end. A second run into the same output is refused while the lease is live.

A lease is stale, and may be taken over, when its holder is on this machine and its process is gone
(a killed driver: re-running at once works), or when it has not been renewed for STALE_S seconds (a
driver on another machine that died). Staleness across machines compares the holder's clock with
ours: clocks more than a few seconds apart delay or hasten a takeover by that much.

Renewals never rewrite `_lock.json`: each holder writes its own heartbeat beside it (`_lock.<token>.json`),
after checking the lock still names it. A renewal racing a takeover then cannot overwrite the new
holder's lock; it only leaves a heartbeat nobody reads.

Renewal runs on a thread of its own from the moment the lease is taken, so that nothing the driver waits
for (Ray's start, a slow listing, a slow store) lets the lease go stale, and a failed renewal is retried
rather than ending the run. Once a renewal finds the lease taken, every write of the driver's store
raises (`fence`), and the run checks the lease each time round its dispatch loop (`check`): taken over,
it stops and writes nothing more (work already handed to workers finishes staging its shard).

A store that stops answering (outage.py) must not end the run, nor let it write on a lease that may have
gone to another run meanwhile. Unrenewed for STALL_S, the lease is in doubt: every write of the driver's
waits in `fence` until a renewal reaches the store again and proves the lease is still this run's. On
object stores that proof is conditional, not a read then a write: the lock is rewritten with `If-Match` of
the version this run wrote, which fails if anyone replaced it since; on a file system the lock is compared
with what this run wrote and replaced while holding an flock on a guard file beside it. A takeover is just as
conditional: it replaces exactly the stale version it judged (If-Match; compared under the guard), so a
holder that proved its lease in between keeps it. Only a lease really taken over stops the run (`LeaseLost`); a
store down longer than --store-timeout stops it as `StoreUnavailable`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid

from .destination import unwritable
from ..errors import LeaseLost, OutputError, StoreUnavailable
from ..outage import OUTAGE
from .sink import GUARD, LOCK

log = logging.getLogger(__name__)
STALE_S = 60.0
RENEW_S = 10.0
# Unrenewed this long, the run stops: the STALE_S - STALL_S left are its time to stop before a takeover.
STALL_S = 40.0


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


def _on_disk(store) -> bool:
    """A file system (its lock compared under the guard) rather than an object store (ETags, If-Match)."""
    return getattr(store.fs, "local_file", False)


def _create(store, path: str, data: bytes) -> str | None:
    """Create `path` holding `data`, or raise FileExistsError: never a moment with the file empty. Locally,
    a temp file linked into place (link refuses an existing name); on object stores, a conditional put,
    whose ETag is returned (None where the store gives none)."""
    if _on_disk(store):
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
        try:
            os.link(tmp, path)
        finally:
            os.remove(tmp)
        return None
    out = store.unfenced_fs.pipe_file(path, data, mode="create")
    return out.get("ETag") if isinstance(out, dict) else None


def _replace(store, path: str, judged: bytes, version: str | None, data: bytes) -> tuple[bool, str | None]:
    """Put `data` at `path` only if the lock there is still the one judged (its bytes `judged`, its ETag
    `version`), never a read then a write: another run's takeover or the holder's own proof between the
    two would be overwritten. (replaced, the new ETag)."""
    if _on_disk(store):
        return _swap_local(path, judged, data), None
    if version is None:  # a store that gives no versions: as before, a removal then an exclusive create
        store.fs.rm(path)
        try:
            return True, _create(store, path, data)
        except FileExistsError:
            return False, None
    try:
        out = store.unfenced_fs.pipe_file(path, data, IfMatch=version)
    except OSError as exc:
        if _precondition_failed(exc):
            return False, None
        raise
    return True, out.get("ETag") if isinstance(out, dict) else None


def _precondition_failed(exc: OSError) -> bool:
    return "PreconditionFailed" in repr(exc.__cause__) or "412" in str(exc)


def _swap_local(path: str, expected: bytes, data: bytes | None) -> bool:
    """On a file system, the lock replaced by `data` (None: removed) only if it holds `expected`: compared
    and replaced while holding an exclusive flock on the guard file beside it (Linux maps flock on NFS to
    record locks, honoured across machines; a thread lock covers this process's own threads, which record
    locks would not tell apart), by a rename over it, so the lock never goes missing: a run starting
    meanwhile still finds it (and its exclusive create is refused)."""
    with _GUARDING:
        return _swap_guarded(path, expected, data)


_GUARDING = threading.Lock()


def _swap_guarded(path: str, expected: bytes, data: bytes | None) -> bool:
    guard = os.open(os.path.join(os.path.dirname(path), GUARD), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(guard, fcntl.LOCK_EX)
        try:
            with open(path, "rb") as fh:
                if fh.read() != expected:
                    return False
        except FileNotFoundError:
            return False
        if data is None:
            os.remove(path)
            return True
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
        return True
    finally:
        os.close(guard)  # and with it the flock


def _heartbeat(token: str) -> str:
    return f"{LOCK.removesuffix('.json')}.{token}.json"


def _last_renewal(store, holder: dict) -> float:
    """When `holder` last renewed: its heartbeat's time, or the lock's own before the first renewal."""
    renewed = float(holder.get("renewed_at", 0))
    if holder.get("token"):
        try:
            beat = json.loads(store.fs.cat_file(store.path(_heartbeat(holder["token"]))))
            renewed = max(renewed, float(beat.get("renewed_at", 0)))
        except (FileNotFoundError, ValueError):
            pass
    return renewed


def _modified(store, path: str) -> float:
    try:
        return store.fs.modified(path).timestamp()
    except (OSError, NotImplementedError, AttributeError):
        return time.time()  # unknown: count it as fresh rather than take a live lease


class Lease:
    def __init__(self, store, token: str, holder: dict, etag: str | None = None, written: bytes | None = None):
        self.store, self.token, self.holder, self.etag = store, token, holder, etag
        self.written = written  # the lock as this run last wrote it (a file system's proof compares it)
        self.renewed = time.monotonic()  # the last renewal that reached the store
        self.lost: LeaseLost | None = None
        self.in_doubt = False  # unrenewed past STALL_S: writes wait until a renewal proves the lease ours
        self._proved = threading.Condition()
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def acquire(cls, store, renewing: bool = True) -> "Lease":
        """Take the output's lease, or raise OutputError naming its live holder. With `renewing`, a thread
        keeps it fresh until `release`."""
        lease = cls._take(store)
        if renewing:
            lease._thread = threading.Thread(target=lease._renew_loop, name="lease-renewal", daemon=True)
            lease._thread.start()
        return lease

    @classmethod
    def _take(cls, store) -> "Lease":
        token = uuid.uuid4().hex
        holder = {"token": token, "host": socket.gethostname(), "pid": os.getpid(),
                  "pid_start": _process_start(os.getpid()), "acquired_at": time.time(), "renewed_at": time.time()}
        path = store.path(LOCK)
        try:
            store.makedirs(store.root)
        except OSError as exc:  # checked before the run (destination.py); here if it changed since
            raise unwritable(store.url, store, exc) from None
        data = json.dumps(holder).encode()
        local = _on_disk(store)
        for attempt in range(2):
            try:
                return cls(store, token, holder, _create(store, path, data), data)
            except FileExistsError:
                pass
            except OSError as exc:
                raise unwritable(store.url, store, exc) from None
            try:
                # the version judged below: a takeover replaces exactly it, or nothing (see _replace)
                version = None if local else store.unfenced_fs.info(path).get("ETag")
                raw = store.fs.cat_file(path)
            except FileNotFoundError:
                continue  # released meanwhile: try again
            try:
                other = json.loads(raw)
                if other.get("token") == token:  # a retried create whose first try had landed
                    return cls(store, token, holder, store.unfenced_fs.info(path).get("ETag"), data)
                other["renewed_at"] = _last_renewal(store, other)
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
            replaced, etag = _replace(store, path, raw, version, data)
            if replaced:
                if other.get("token"):
                    _remove(store, _heartbeat(other["token"]))
                return cls(store, token, holder, etag, data)
            # it changed since it was judged (its holder proved it meanwhile, or another run took it): again
        raise OutputError(f"output {store.url!r}: could not take its lease ({LOCK}); try again")

    def renew(self) -> None:
        """One renewal: the lock still names this run, then its heartbeat. Raises LeaseLost (and fences the
        store) if another run holds the lease now."""
        started, renewed_at = time.monotonic(), time.time()  # what others will judge staleness by
        try:
            current = json.loads(self.store.fs.cat_file(self.store.path(LOCK)))
        except (FileNotFoundError, ValueError):
            current = {}
        if current.get("token") != self.token:
            self.lost = LeaseLost(
                f"output {self.store.url!r}: this run's lease ({LOCK}) was taken over by another run (host "
                f"{current.get('host')!r}, pid {current.get('pid')}); stopping so that the two do not both "
                "write. What was committed stays; re-run once the other has ended")
            raise self.lost
        if self._stop.is_set():
            return  # released meanwhile: a heartbeat now would outlive the lease
        if self.in_doubt or started - self.renewed > STALL_S:
            # unrenewed long enough that another run may judge it stale: prove it, whether or not the
            # driver has looked at the lease meanwhile (check/fence set in_doubt)
            self._prove(current, renewed_at)
        self.store.put_atomic(_heartbeat(self.token), json.dumps({"token": self.token,
                                                                   "renewed_at": renewed_at}).encode(), fenced=False)
        with self._proved:
            self.renewed, self.in_doubt = started, False
            self._proved.notify_all()

    def _prove(self, current: dict, renewed_at: float) -> None:
        """After a stall, the lock is rewritten only if it is still the version this run wrote: a takeover
        between the read above and this write makes it fail, where a plain write would overwrite it."""
        data = json.dumps({**current, "renewed_at": renewed_at}).encode()
        path = self.store.path(LOCK)
        try:
            if _on_disk(self.store):
                if self.written is None:
                    return  # a lease made before this proof existed: the read above is the check
                proved = _swap_local(path, self.written, data)
            elif self.etag is None:
                return  # a store that gives no versions: the read above is the check
            else:
                out = self.store.unfenced_fs.pipe_file(path, data, IfMatch=self.etag)
                proved = True
        except OSError as exc:
            if not _precondition_failed(exc):
                raise
            proved = False
        if not proved:
            self.lost = LeaseLost(
                f"output {self.store.url!r}: this run's lease ({LOCK}) changed while the store was unavailable "
                "(another run took it over); stopping so that the two do not both write. What was committed "
                "stays; re-run once the other has ended")
            with self._proved:
                self._proved.notify_all()
            raise self.lost from None
        self.written = data
        if not _on_disk(self.store):
            self.etag = out.get("ETag") if isinstance(out, dict) else None

    def fence(self) -> None:
        """For every write of the driver's store: none once the lease is known to be another run's, and none
        while it is in doubt (unrenewed past STALL_S) until a renewal proves it this run's again."""
        self._note_stall()
        with self._proved:
            while self.in_doubt and self.lost is None:
                waited = time.monotonic() - self.renewed
                if waited > max(OUTAGE.budget_s, STALL_S):
                    raise StoreUnavailable(
                        f"output {self.store.url!r}: its lease ({LOCK}) could not be renewed for {waited:.0f} s "
                        f"(last error: {self.last_error}), longer than --store-timeout {OUTAGE.budget_s:.0f} s: "
                        "stopped. What was committed stays; re-run the same command once the store answers")
                self._proved.wait(timeout=1.0)
        if self.lost is not None:
            raise self.lost

    def _note_stall(self) -> None:
        if self._thread is not None and not self.in_doubt and time.monotonic() - self.renewed > STALL_S:
            self.in_doubt = True
            log.warning("the lease of output %s has not been renewed for %.0f s: nothing is written there until "
                        "the store answers and the lease is proved still this run's", self.store.url, STALL_S)

    def _renew_loop(self) -> None:
        wait = RENEW_S
        while not self._stop.wait(wait):
            try:
                self.renew()
                self.last_error, wait = None, RENEW_S
            except LeaseLost:
                return
            except Exception as exc:  # a store that failed once: try again sooner, the run goes on meanwhile
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                log.warning("renewing the lease of output %s failed (%s); retrying", self.store.url, self.last_error)
                wait = min(RENEW_S, 2.0)

    def check(self) -> None:
        """Raise LeaseLost when another run took the lease. Unrenewed past STALL_S, the lease is in doubt:
        the writes wait (`fence`) rather than the run stopping, since a store that throttles for a minute
        is a normal day."""
        if self.lost is not None:
            raise self.lost
        self._note_stall()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            # A renewal in flight on a store that hangs must not hold the exit (`ray job stop` kills after
            # 3 s); a late one can only leave this run's heartbeat behind, never the lock.
            self._thread.join(timeout=2)
        if self.lost is not None:
            return  # another run's now
        try:
            if _on_disk(self.store) and self.written is not None:
                _swap_local(self.store.path(LOCK), self.written, None)  # only the lock as this run wrote it
            else:
                current = json.loads(self.store.unfenced_fs.cat_file(self.store.path(LOCK)))
                if current.get("token") == self.token:
                    self.store.unfenced_fs.rm(self.store.path(LOCK))
            _remove(self.store, _heartbeat(self.token))
        except (FileNotFoundError, ValueError, OSError, StoreUnavailable):
            pass  # a store that is down: the lease expires STALE_S after its last renewal


def _remove(store, rel: str) -> None:
    try:
        store.unfenced_fs.rm(store.path(rel))
    except (FileNotFoundError, OSError):
        pass
