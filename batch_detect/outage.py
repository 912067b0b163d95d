"""Riding out a store that throttles or drops for a while: every request this process makes to a store
retries transient errors with capped, jittered backoff, within one budget of continuous unavailability
(`--store-timeout`). Past it, `StoreUnavailable` stops the run (exit 1; the same command resumes).

At scale a store that answers `503 SlowDown` is a normal day, and the storage libraries' own retries (s3fs,
botocore: seconds) are far shorter than a prefix that stays hot or a server that restarts. A transient error
must therefore never become a permanent failure record, nor a failed run, within the budget. Permanent
errors (not found, permission denied, bad credentials, a missing bucket) are not retried: they mean the same
thing on the next try.

One `Outage` per process: the threads of a worker see one store, so they back off together (each waits for
the same resume time) instead of each storming it, and the first success ends the outage for all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import random
import socket
import threading
import time
from dataclasses import dataclass

from .errors import StoreUnavailable

log = logging.getLogger(__name__)

DEFAULT_BUDGET_S = 600.0
FIRST_WAIT_S = 0.5
MAX_WAIT_S = 8.0  # between tries at the most: a store back from an outage is found within this
REPORT_EVERY_S = 30.0  # an ongoing outage is said again this often ("unavailable for 45 s, retrying")
# S3 error codes and HTTP statuses that a later request may not get (throttling, overload, a restart).
TRANSIENT_CODES = frozenset({
    "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "RequestTimeTooSkewed", "Throttling",
    "ThrottlingException", "TooManyRequests", "RequestLimitExceeded", "OperationAborted", "500", "502", "503",
    "504", "429"})
# What s3fs turns those into (it maps 503/SlowDown to EBUSY, 500 to EREMOTEIO), and a dropped connection's.
TRANSIENT_ERRNOS = frozenset({errno.EBUSY, getattr(errno, "EREMOTEIO", 121), errno.ETIMEDOUT, errno.ECONNRESET,
                              errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE, errno.EHOSTUNREACH,
                              errno.ENETUNREACH, errno.ENETDOWN, errno.EAGAIN})
# Names of exception classes from libraries this module does not import (botocore, aiohttp, urllib3):
# a connection that could not be made, was reset, or timed out.
TRANSIENT_CLASS_NAMES = frozenset({
    "EndpointConnectionError", "ConnectionClosedError", "ConnectTimeoutError", "ReadTimeoutError", "ClientConnectorError", "ServerDisconnectedError", "ClientOSError",
    "ServerTimeoutError", "ClientPayloadError", "ResponseParserError", "IncompleteRead", "HTTPClientError",
    "ProtocolError", "FSTimeoutError", "ReadTimeout", "ConnectTimeout"})


# s3fs's FileExpired carries errno EBUSY, but means the object changed under an open file: no retry helps.
PERMANENT_CLASS_NAMES = frozenset({"FileExpired", "ObjectChanged"})


def _code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        err = response.get("Error") or {}
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        return str(err.get("Code") or status or "") or None
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether a later try of the same request may succeed. Follows the exception's chain: s3fs raises an
    OSError `from` botocore's ClientError, aiohttp's errors wrap the socket's."""
    seen = 0
    while exc is not None and seen < 8:
        seen += 1
        if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                            FileExistsError)) or type(exc).__name__ in PERMANENT_CLASS_NAMES:
            return False
        code = _code(exc)
        if code is not None:
            return code in TRANSIENT_CODES
        if isinstance(exc, (ConnectionError, socket.timeout, TimeoutError, asyncio.TimeoutError)):
            return True
        if type(exc).__name__ in TRANSIENT_CLASS_NAMES:
            return True
        if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@dataclass
class OutageState:
    """What progress and the manifest show: how long the store has been unavailable, retries so far."""

    unavailable_s: float | None  # None: answering
    retries: int
    outages: int
    last_error: str | None
    longest_s: float  # the longest outage that ended


class Outage:
    """This process's view of its stores: when they stopped answering (None while they answer), and the
    time before which nobody tries again."""

    def __init__(self, budget_s: float = DEFAULT_BUDGET_S):
        self.budget_s = budget_s
        self.limit = "--store-timeout"  # how messages name the budget
        self._lock = threading.Lock()
        self._since: float | None = None
        self._resume_at = 0.0
        self._tries = 0  # failed tries in this outage: the backoff's exponent
        self.retries = 0  # over the process's life, for metrics
        self.outages = 0
        self.longest_s = 0.0
        self._said = 0.0  # when an ongoing outage was last reported
        self.last_error: str | None = None
        self.store: str | None = None  # the store that failed last, for messages

    def reset(self, budget_s: float = DEFAULT_BUDGET_S) -> None:
        with self._lock:
            self.budget_s, self._since, self._tries, self._resume_at = budget_s, None, 0, 0.0
            self.limit = "--store-timeout"
            self.retries = self.outages = 0
            self.longest_s = 0.0

    def state(self) -> OutageState:
        since = self._since
        return OutageState(None if since is None else time.monotonic() - since, self.retries, self.outages,
                           self.last_error, self.longest_s)

    def call(self, fn, *args, what: str = "a request", store: str | None = None, before_retry=None, **kwargs):
        """fn(*args, **kwargs), tried again on transient errors until the store has been unavailable for the
        budget; `before_retry()` runs before each further try (the driver's lease fence: a write that waited
        out an outage must still be the lease holder's)."""
        while True:
            self._wait_turn()
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self._failed(exc, what, store)
                if before_retry is not None:
                    before_retry()
                continue
            self._answered()
            return result

    @contextlib.contextmanager
    def grace(self, budget_s: float):
        """A budget of its own for a stopped run's last writes (what it committed, its manifest): the store
        may be back by now, and if not, the run must still end soon."""
        saved = self.budget_s
        with self._lock:
            self.budget_s, self._since, self._tries, self._resume_at = budget_s, None, 0, 0.0
        try:
            yield
        finally:
            self.budget_s = saved

    def _wait_turn(self) -> None:
        delay = self._resume_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def _failed(self, exc: BaseException, what: str, store: str | None) -> None:
        now = time.monotonic()
        with self._lock:
            detail = f"{type(exc).__name__}: {exc}"[:200]
            self.last_error, self.store = detail, store or self.store
            if self._since is None:
                self._since, self._tries, self._said = now, 0, now
                self.outages += 1
                log.warning("%s did not answer (%s: %s); pausing and retrying for up to %.0f s (%s)",
                            store or "the store", what, detail, self.budget_s, self.limit)
            down = now - self._since
            if now - self._said >= REPORT_EVERY_S:
                self._said = now
                log.warning("%s unavailable for %.0f s, retrying (last error: %s; stops after %.0f s)",
                            store or "the store", down, detail, self.budget_s)
            if down > self.budget_s:
                raise StoreUnavailable(
                    f"{store or 'the object store'} was unavailable for {down:.0f} s (last error: {detail}), longer "
                    f"than {self.limit} ({self.budget_s:.0f} s): stopped. What was committed stays; re-run the same "
                    "command once the store answers to go on") from None
            self.retries += 1
            if now >= self._resume_at:  # the first to fail this round sets everyone's next try
                wait = min(MAX_WAIT_S, FIRST_WAIT_S * 2 ** self._tries) * random.uniform(0.5, 1.0)
                self._tries += 1
                self._resume_at = now + min(wait, max(0.0, self.budget_s - down) + 0.05)

    def _answered(self) -> None:
        if self._since is None:
            return
        with self._lock:
            if self._since is not None:
                down = time.monotonic() - self._since
                self.longest_s = max(self.longest_s, down)
                log.warning("%s answers again after %.0f s unavailable; going on", self.store or "the store", down)
                self._since, self._tries, self._resume_at = None, 0, 0.0


# The process's tracker: worker processes and actors set its budget from their settings.
OUTAGE = Outage()


def configure(budget_s: float, limit: str = "--store-timeout") -> None:
    OUTAGE.budget_s, OUTAGE.limit = float(budget_s), limit


# fsspec methods that make requests, all safe to repeat: reads, whole-object puts (a put is atomic and the
# names this tool writes are deterministic), deletes (a missing key is not an error on object stores).
RETRIED = frozenset({
    "cat_file", "cat", "cat_ranges", "pipe_file", "pipe", "put_file", "rm", "rm_file", "exists", "info", "ls",
    "glob", "find", "modified", "size", "isfile", "isdir", "mv", "copy", "makedirs", "mkdir"})
WRITES = frozenset({"pipe_file", "pipe", "put_file", "rm", "rm_file", "mv", "copy", "makedirs", "mkdir"})


class RetryingFS:
    """An fsspec filesystem whose requests go through an `Outage`. Everything else is the filesystem's own."""

    def __init__(self, fs, store: str, outage: Outage | None = None, before_retry=None):
        self._fs, self._store, self._outage, self._before_retry = fs, store, outage, before_retry

    @property
    def unwrapped(self):
        return self._fs

    def __getattr__(self, name: str):
        attr = getattr(self._fs, name)
        if name not in RETRIED:
            return attr
        outage = self._outage or OUTAGE

        def retried(*args, **kwargs):
            return outage.call(attr, *args, what=name, store=self._store,
                               before_retry=self._before_retry if name in WRITES else None, **kwargs)

        return retried

    def open(self, path: str, mode: str = "rb", **kwargs):
        """A file to read whose opening and every read wait out outages (`ResumingFile`). Files written are
        the filesystem's own: a streamed write cannot be resumed request by request, and its caller tries
        the whole again (the output's parts)."""
        if "r" not in mode:
            return self._fs.open(path, mode, **kwargs)
        return ResumingFile(lambda: self._fs.open(path, mode, **kwargs), path, self._store,
                            self._outage or OUTAGE)


class ObjectChanged(OSError):
    """An object replaced while it was streamed: its later bytes are another object's. Permanent."""


class ResumingFile:
    """A file opened for reading from a store (a tar streamed, a Parquet file's row groups) whose reads wait
    out outages: a read that fails transiently drops the connection's file, and once the store answers the
    file is opened again at the same offset. An object replaced meanwhile (another ETag) is an error, never
    a splice of two objects."""

    # Reads that would bypass the offset this file keeps (and so, after a reopen, repeat bytes)
    _NOT_PASSED = frozenset({"readline", "readlines", "read1", "readinto1", "peek", "readuntil"})

    def __init__(self, opener, path: str, store: str, outage: Outage):
        self._opener, self._path, self._store, self._outage = opener, path, store, outage
        self._pos, self._fh, self._tag = 0, None, None
        self._closed = False
        # opening errs now, as fs.open does (not found, permission denied); transient errors are waited out
        self._outage.call(self._current, what="open", store=self._store)

    def _current(self):
        """The open file, opened again (at the offset reached) after a failed read. Not retried here: the
        caller's one `Outage.call` classifies every error, so a store that opens but never reads stays an
        outage (its clock runs, its backoff grows) instead of each open counting as the store answering."""
        if self._closed:
            raise ValueError(f"I/O operation on closed file {self._path}")
        if self._fh is None:
            fh = self._opener()
            tag = (getattr(fh, "details", None) or {}).get("ETag")
            if self._tag is not None and tag is not None and tag != self._tag:
                fh.close()
                raise ObjectChanged(f"{self._path} changed while it was read (its ETag is now {tag}); its "
                                    "items are failure records, read again by a run with --retry-failures")
            self._tag = self._tag or tag
            if self._pos:
                fh.seek(self._pos)
            self._fh = fh
        return self._fh

    def _attempt(self, op: str, *args):
        fh = self._current()
        try:
            result = getattr(fh, op)(*args)
        except Exception:
            self._fh = None  # its connection and read-ahead are suspect: the next try opens afresh
            with contextlib.suppress(Exception):
                fh.close()
            raise
        self._pos = fh.tell()
        return result

    def read(self, size: int = -1) -> bytes:
        return self._outage.call(self._attempt, "read", size, what="read", store=self._store)

    def readinto(self, buffer) -> int:
        return self._outage.call(self._attempt, "readinto", buffer, what="read", store=self._store)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._outage.call(self._attempt, "seek", offset, whence, what="read", store=self._store)

    def tell(self) -> int:
        return self._pos

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True
        if self._fh is not None:
            fh, self._fh = self._fh, None
            fh.close()

    def __enter__(self) -> "ResumingFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getattr__(self, name: str):  # name, size, details, ...: the underlying file's
        if name.startswith("_") or name in self._NOT_PASSED:
            raise AttributeError(name)
        return getattr(self._current(), name)
