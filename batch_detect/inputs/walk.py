"""Walk a folder or object-store prefix in one deterministic order, streaming: local with os.scandir,
object stores with a parallel fan-out over sub-prefixes, and on S3 a flat prefix bigger than a page cut
into ranges listed side by side (`keyspace.py`).

The order is the sorted order of the full path strings (code point order, which is UTF-8 byte order):
the order S3 lists keys in, and what `sorted()` and `LC_ALL=C sort` give. Walked depth-first, it is
each directory's entries sorted by name, a sub-directory sorting as its name followed by '/' (so
'a-b.jpg' < 'a/x.jpg' < 'a0.jpg', as the strings are).

Memory is bounded by the directories in flight (a page of entries each), never by the number of files,
so a 100M-key bucket can be walked while the work it feeds starts.
"""

from __future__ import annotations

import datetime
import itertools
import os
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Callable, Iterator

from fsspec.asyn import sync

from .keyspace import KeySpace
from .pages import PAGES_PER_PROCESS, Shipped

__all__ = ["walk", "version_of"]

_PAGE = 1000  # S3's largest page: the unit of buffering per directory
_RANGE_PAGES = 16  # pages a cut range of a flat prefix is meant to hold: its last page is read past its end
# (0: a flat prefix is listed one page after another, as before ranges)
_DIR_PAGES = 64  # pages of one directory fetched and not yet consumed, or in flight, over its ranges
_DIR_REQUESTS = 8  # pages of one directory in flight at once, at least (more for a pool of processes)

Entry = tuple[str, bool, "str | None"]  # (name within its directory, is a directory, the file's version)


def version_of(info: dict) -> str | None:
    """What the store says about a file's content, as one string: its size and ETag (object stores) or
    modification time (file systems). Equal versions mean unchanged content for incremental runs."""
    size = info.get("size", info.get("Size"))
    for key in ("ETag", "etag", "md5", "mtime_ns", "mtime", "LastModified", "last_modified", "created"):
        tag = info.get(key)
        if tag is not None:
            tag = tag.strip('"') if isinstance(tag, str) else tag
            return f"{size}:{tag.isoformat() if hasattr(tag, 'isoformat') else tag}"
    return None if size is None else f"{size}:"


def size_in_version(version: str | None) -> int | None:
    """The byte size a `version_of` string records, or None (no version, or a store that gave no size)."""
    head = (version or "").split(":", 1)[0]
    return int(head) if head.isdigit() else None


def _key(entry: Entry) -> str:
    """A directory sorts as its name plus '/': then a directory's entries come in full-path string order."""
    return entry[0] + "/" if entry[1] else entry[0]


def walk(fs, root: str, *, workers: int = 16, lookahead: int = 64, versions: bool = False,
         enter: Callable[[str], bool] | None = None, pool=None) -> Iterator:
    """Every file under `root` (fsspec paths as `fs` names them, no protocol), in sorted path order; with
    `versions`, (path, version) pairs (see `version_of`: from the listing itself, no request per file).
    Streaming: memory is bounded by the directories in flight, not by the number of files. `enter(rel)`,
    given a sub-directory's path relative to `root` ('a', 'a/b'), says whether to walk into it (a glob
    prunes the directories it cannot match); by default every one.

    Local folders are walked with os.scandir (directory symlinks are not followed; symlinks to files are
    files). Object stores are listed one level at a time with the '/' delimiter: up to `lookahead`
    sub-directories ahead of the consumer are listed concurrently on `workers` threads, one page of each
    at a time; results come out strictly in order. On S3, a level whose first page is full is cut into
    ranges (StartAfter) of about `_RANGE_PAGES` pages, up to `_DIR_PAGES` pages of it fetched at once, so a
    flat prefix of millions of keys is not one request after another. Nothing is left in fsspec's
    listings cache.

    `pool` (a `pages.ListingPool`, S3 and local folders): each page (one LIST request, or one local
    directory) is fetched, parsed and sorted there, in worker processes once the listing is large; the
    order and content are the same as without it.

    A missing root raises FileNotFoundError (an empty bucket or folder yields nothing); listing errors
    (FileNotFoundError, PermissionError, OSError) propagate where they occur in the order.
    """
    if workers < 1 or lookahead < 0:
        raise ValueError("walk needs workers >= 1 and lookahead >= 0")
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    root = fs._strip_protocol(root)
    enter = enter or (lambda rel: True)
    base = root if root.endswith("/") else root + "/"
    if {"file", "local"} & set(protocols):
        if pool is None:
            found = _walk_local(root, versions, enter)
        else:
            found = _walk_store(base, lambda base, is_root: _LocalLevel(base, versions), pool, lookahead, enter)
    elif callable(getattr(fs, "_call_s3", None)):  # s3fs: paged, uncached requests
        shipped = Shipped(fs)
        found = _walk_store(base, lambda base, is_root: _S3Level(shipped, base, is_root),
                            pool or ThreadPoolExecutor(workers, thread_name_prefix="walk"), lookahead, enter)
    else:  # other stores stay in this process (an in-memory store exists only here)
        found = _walk_store(base, lambda base, is_root: _LsLevel(fs, base),
                            ThreadPoolExecutor(workers, thread_name_prefix="walk"), lookahead, enter)
    return found if versions else (path for path, _ in found)


def _walk_local(root: str, versions: bool, enter: Callable[[str], bool]) -> Iterator[tuple[str, str | None]]:
    def entries(path: str) -> Iterator[os.DirEntry]:
        with os.scandir(path) as it:
            return iter(sorted(it, key=lambda e: _key((e.name, e.is_dir(follow_symlinks=False), None))))

    skip = len(root.rstrip("/")) + 1
    stack = [entries(root)]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
        elif entry.is_dir(follow_symlinks=False):
            if enter(entry.path[skip:]):
                stack.append(entries(entry.path))
        elif entry.is_file():
            if versions:
                st = entry.stat()
                yield entry.path, f"{st.st_size}:{st.st_mtime_ns}"
            else:
                yield entry.path, None


class _Range:
    """Part of one directory's listing: its entries after `lo` up to `hi` (None: from its start, to its
    end), fetched a page at a time by `level` (which keeps its own continuation). `pages` are fetched and
    not yet given to the consumer; an error waits here until the range's turn comes, so that errors still
    surface where they occur in the order."""

    def __init__(self, level, lo: str | None = None, hi: str | None = None, space: KeySpace | None = None):
        self.level, self.lo, self.hi, self.space = level, lo, hi, space
        self.pages: deque[list[Entry]] = deque()
        self.pending: Future | None = None
        self.started = self.done = False
        self.last = False  # the store said nothing follows this range's entries: later ranges are empty
        self.beyond: str | None = None  # the first name after `hi`, where a page showed it
        self.error: BaseException | None = None

    def take(self) -> list[Entry]:
        """The page in flight, kept to the range's bounds (a page past `hi` ends the range)."""
        try:
            entries, self.done = self.level.take(self.pending.result())
        except BaseException as exc:  # noqa: BLE001 - raised in its turn, see refill
            self.error, self.done, entries = exc, True, []
        self.pending = None
        self.last = self.done and self.error is None
        if self.lo is not None and entries and _key(entries[0]) <= self.lo:
            # a directory the previous range ends inside is listed again as this range's first entry
            entries = [e for e in entries if _key(e) > self.lo]
        if self.hi is not None and entries and _key(entries[-1]) > self.hi:
            within = [e for e in entries if _key(e) <= self.hi]
            self.beyond = _key(entries[len(within)])
            entries, self.done, self.last = within, True, False
        self.pages.append(entries)
        return entries


class _Dir:
    """One directory being listed: entries ready for the consumer, and the ranges it is listed in (one,
    until a level that can be split shows a full page: then the rest is cut into ranges listed side by
    side, `keyspace.py`). `base` is the directory's path with a trailing '/': its entries' paths are
    base + name (a key may hold an empty component, 'a//b', so the path is never re-parsed). A level says
    which request fetches its next page (`request`: a module-level function and its arguments, so a worker
    process can run it) and takes the page back (`take`); one that can start after a name has `after`."""

    def __init__(self, base: str, level, pool):
        self.base = base
        self.pool = pool
        self.ready: deque[Entry] = deque()
        self.ranges: deque[_Range] = deque([_Range(level)])
        self.splits = _RANGE_PAGES > 0 and callable(getattr(level, "after", None))
        # enough pages in flight for every listing process to overlap its waits on the store (pages.py)
        self.requests = max(_DIR_REQUESTS, getattr(pool, "processes", 1) * PAGES_PER_PROCESS)
        self.next_name = ""  # a name some range's page showed after its end: nothing lies between them
        self._pump()

    @property
    def listing(self) -> bool:
        """Whether entries may still come (pages fetched or to fetch)."""
        return bool(self.ranges)

    def refill(self) -> None:
        """Give the consumer the next page in order, waiting for it; meanwhile keep the other ranges
        fetching (within the directory's budget)."""
        while not self.ready and self.ranges:
            self._collect()
            self._pump()
            head = self.ranges[0]
            if head.pages:
                self.ready.extend(head.pages.popleft())
            elif head.error is not None:
                error, head.error = head.error, None
                raise error
            elif head.done:
                self.ranges.popleft()
            else:
                wait([r.pending for r in self.ranges if r.pending is not None], return_when=FIRST_COMPLETED)

    def _collect(self) -> None:
        """Take every page that has arrived, and what it says of the ranges (cut, or nothing after)."""
        for r in list(self.ranges):
            if r.pending is not None and r.pending.done():
                entries = r.take()
                if r.beyond is not None:
                    self.next_name = max(self.next_name, r.beyond)
                if r.last:
                    self._end_after(r)
                elif self.splits and r.hi is None and not r.done and len(entries) >= _PAGE // 2:
                    self._split(r, entries)

    def _end_after(self, r: _Range) -> None:
        """Nothing follows `r`: the ranges after it are empty; those not started never will be."""
        for later in itertools.islice(self.ranges, self.ranges.index(r) + 1, None):
            if not later.started:
                later.done = True
            later.space = None

    def _split(self, r: _Range, entries: list[Entry]) -> None:
        """The open-ended range `r` showed a full page: cut it after the page, as that page suggests."""
        space = KeySpace.of([_key(e) for e in entries])
        if space is not None:
            self._cut(r, space, _key(entries[-1]))

    def _cut(self, r: _Range, space: KeySpace, after: str) -> None:
        """End the open range `r` at a cut about _RANGE_PAGES pages after `after`; the rest goes to a new
        open range (cut in turn when it starts). Where `space` cannot say, `r` stays open."""
        cut = space.cut_after(after, _RANGE_PAGES * _PAGE)
        if cut is not None:
            r.hi = cut
            self.ranges.append(_Range(r.level.after(cut), lo=cut, space=space))

    def _pump(self) -> None:
        """Ask for more pages, earliest ranges first: one in flight per range, at most `requests` for the
        directory and `_DIR_PAGES` fetched and not yet consumed; one range alone (any directory not
        cut) keeps one page ahead of the consumer, as before ranges."""
        budget = _DIR_PAGES - sum(len(r.pages) + (r.pending is not None) for r in self.ranges)
        requests = self.requests - sum(r.pending is not None for r in self.ranges)
        if len(self.ranges) == 1:
            budget = min(budget, 2 - len(self.ready))
        i = 0
        while i < len(self.ranges) and budget > 0 and requests > 0:
            r = self.ranges[i]
            i += 1
            if r.done or r.pending is not None:
                continue
            if not r.started and r.hi is None and r.space is not None:
                # the open range, cut before it starts; from the next name known, past an empty stretch
                self._cut(r, r.space, max(r.lo, self.next_name))
            r.started = True
            r.pending = self.pool.submit(*r.level.request())
            budget -= 1
            requests -= 1

    def cancel(self) -> None:
        for r in self.ranges:
            if r.pending is not None:
                r.pending.cancel()


def _walk_store(root_base: str, level: Callable[[str, bool], object], pool, lookahead: int,
                enter: Callable[[str], bool]) -> Iterator[tuple[str, str | None]]:
    ahead: dict[str, _Dir] = {}  # directories being listed before the consumer reaches them
    stack: list[_Dir] = []

    def prefetch() -> None:
        # The sub-directories the consumer will enter next are the ones waiting in the deepest directories:
        # open those first. Their own sub-directories wait until they are entered (bounded, and enough to
        # keep the pool busy on wide trees).
        room = lookahead - len(ahead)
        for d in reversed(stack):
            if room <= 0:
                return
            for name, is_dir, _ in d.ready:
                base = d.base + name + "/"
                if is_dir and base not in ahead and enter(base[len(root_base):-1]):
                    ahead[base] = _Dir(base, level(base, False), pool)
                    room -= 1
                    if room <= 0:
                        return

    try:
        stack.append(_Dir(root_base, level(root_base, True), pool))
        while stack:
            d = stack[-1]
            if not d.ready:
                if not d.listing:
                    stack.pop()
                else:
                    d.refill()
                    prefetch()
                continue
            name, is_dir, version = d.ready.popleft()
            if is_dir:
                base = d.base + name + "/"
                if enter(base[len(root_base):-1]):
                    stack.append(ahead.pop(base, None) or _Dir(base, level(base, False), pool))
                    prefetch()
            else:
                yield d.base + name, version
    finally:
        # A consumer that stops early must not leave listings queued: cancel them, don't wait for them.
        for d in itertools.chain(stack, ahead.values()):
            d.cancel()
        if isinstance(pool, ThreadPoolExecutor):  # ours; a ListingPool belongs to its caller
            pool.shutdown(wait=False, cancel_futures=True)


def _s3_page(shipped: Shipped, bucket: str, prefix: str, token: str | None,
             must_exist: bool, page_size: int, start_after: str | None = None) -> tuple[list[Entry], str | None]:
    """One page of one level of an S3 prefix (Delimiter='/'), its entries in the walk's order, and the
    token of the next page (None: the last). Run where the pool puts it: parsing is the listing's cost."""
    fs = shipped.fs
    _parse_timestamps_fast(fs)
    # The uncached request s3fs's own listing makes (with its retries and error translation): ls()
    # would keep every level in fs.dircache.
    kwargs = {"ContinuationToken": token} if token else {"StartAfter": prefix + start_after} if start_after else {}
    page = sync(fs.loop, fs._call_s3, "list_objects_v2", Bucket=bucket, Prefix=prefix, Delimiter="/",
                MaxKeys=page_size, **kwargs)
    following = page.get("NextContinuationToken")
    prefixes, contents = page.get("CommonPrefixes", []), page.get("Contents", [])
    if must_exist and not prefixes and not contents:
        raise FileNotFoundError(f"{bucket}/{prefix}")
    n = len(prefix)
    entries = [(p["Prefix"][n:-1], True, None) for p in prefixes]
    entries += [(c["Key"][n:], False, version_of(c))  # '' is the directory's marker
                for c in contents if c["Key"][n:]]
    return sorted(entries, key=_key), following if page.get("IsTruncated") else None


def _iso_timestamp(value):
    """botocore's timestamp parser, fast for the ISO 8601 form LIST responses carry: dateutil's parse took
    38 of the 51 µs a listed key costs to parse (each key has a LastModified), datetime's takes 0.1 µs. The
    same instant and `isoformat()`; other forms (HTTP dates in headers) go to botocore's own parser."""
    if isinstance(value, str):
        try:
            return datetime.datetime.fromisoformat(value)
        except ValueError:
            pass
    from botocore.utils import parse_timestamp

    return parse_timestamp(value)


def _parse_timestamps_fast(fs) -> None:
    """Make the responses of `fs`'s session parse timestamps with `_iso_timestamp` (once per session; the
    clients it made already share its parser factory, which builds a parser per response)."""
    if getattr(fs, "_bd_fast_timestamps", False):
        return
    session = getattr(fs, "session", None)
    if session is None and hasattr(fs, "set_session"):
        sync(fs.loop, fs.set_session)
        session = getattr(fs, "session", None)
    get = getattr(session, "get_component", None)
    if get is not None:
        factory = get("response_parser_factory")
        if hasattr(factory, "set_parser_defaults"):
            factory.set_parser_defaults(timestamp_parser=_iso_timestamp)
    fs._bd_fast_timestamps = True


class _S3Level:
    """One level of an S3 prefix (Delimiter='/'), a page at a time. S3 returns keys and common prefixes
    ('x/', sorted by that string) in one sorted sequence across pages: each page, merged, is already in
    the walk's order."""

    def __init__(self, shipped: Shipped, base: str, must_exist: bool, start_after: str | None = None):
        self.shipped = shipped
        self.base = base
        self.bucket, self.prefix = base.split("/", 1)  # 'bucket/', 'bucket/key/'
        self.must_exist = must_exist and bool(self.prefix)
        self.token: str | None = None
        self.start_after = start_after

    def request(self) -> tuple:
        return _s3_page, self.shipped, self.bucket, self.prefix, self.token, self.must_exist, _PAGE, self.start_after

    def after(self, name: str) -> "_S3Level":
        """The same level listed from after `name` (relative to it; a directory's name ends in '/')."""
        return _S3Level(self.shipped, self.base, False, name)

    def take(self, page: tuple[list[Entry], str | None]) -> tuple[list[Entry], bool]:
        entries, self.token = page
        self.must_exist = False
        return entries, self.token is None


def _local_dir(base: str, versions: bool) -> list[Entry]:
    """One local directory's entries in the walk's order, as `_walk_local` sees them: sub-directories not
    through symlinks, files through them, versions from a stat where asked."""
    entries: list[Entry] = []
    with os.scandir(base) as it:
        for e in it:
            if e.is_dir(follow_symlinks=False):
                entries.append((e.name, True, None))
            elif e.is_file():
                if versions:
                    st = e.stat()
                    entries.append((e.name, False, f"{st.st_size}:{st.st_mtime_ns}"))
                else:
                    entries.append((e.name, False, None))
    return sorted(entries, key=_key)


class _LocalLevel:
    """One local directory, whole (os.scandir has no pages), for a walk whose pages go to a pool."""

    def __init__(self, base: str, versions: bool):
        self.base, self.versions = base, versions

    def request(self) -> tuple:
        return _local_dir, self.base, self.versions

    def take(self, entries: list[Entry]) -> tuple[list[Entry], bool]:
        return entries, True


def _ls_dir(fs, base: str, path: str) -> list[Entry]:
    try:
        infos = fs.ls(path, detail=True)
    finally:
        fs.invalidate_cache(path)
    entries = []
    for info in infos:
        if not info["name"].startswith(base):
            continue
        name = info["name"][len(base):]
        is_dir = info.get("type") == "directory"
        if is_dir:
            name = name.rstrip("/")
        if name and "/" not in name:  # skips the directory itself and zero-byte 'x/' markers
            entries.append((name, is_dir, None if is_dir else version_of(info)))
    return sorted(entries, key=_key)


class _LsLevel:
    """One level of any other fsspec store: its `ls`, whole (no paging API in general), sorted, uncached."""

    def __init__(self, fs, base: str):
        self.fs = fs
        self.base = base
        self.path = base.rstrip("/") or base

    def request(self) -> tuple:
        return _ls_dir, self.fs, self.base, self.path

    def take(self, entries: list[Entry]) -> tuple[list[Entry], bool]:
        return entries, True
