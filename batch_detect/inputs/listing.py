"""Listing the input: a folder/prefix, a glob or a manifest file, as a stream of URIs in sorted order.

Streamed so that a 100M-key bucket or inventory never sits in the driver's memory: a folder or prefix
(or a glob's fixed folder, pruned by its pattern) is walked in sorted order (`walk.py`), a manifest is
read line by line (or batch by batch). Small manifests (up to SORT_LIMIT URIs) are sorted and
de-duplicated here. Larger ones that start in order (an object-store inventory, a sorted export) are
streamed as they come and refused at a line out of order; those that start out of order are sorted on
local disk first (`extsort.py`), never whole in memory.
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
import os
import posixpath
import re
import time
from dataclasses import dataclass, field
from typing import Iterator

import fsspec
from fsspec.core import url_to_fs

from ..errors import InputError
from ..outage import RetryingFS
from .extsort import SpillError, sorted_unique
from .inventory import inventory_listing, read_report
from .pages import ListingPool

log = logging.getLogger(__name__)

_GLOB_CHARS = ("*", "?", "[")
MANIFEST_SUFFIXES = (".txt", ".csv", ".parquet")
SORT_LIMIT = 100_000  # manifests up to this many URIs are sorted in memory; beyond, see _dedup_sorted
_EXAMPLES = 20


@dataclass
class ListingStats:
    """What the listing saw besides the URIs it yielded; bounded whatever the input's size."""

    skipped: int = 0  # files whose extension is not an input's
    skipped_examples: list[str] = field(default_factory=list)
    duplicates: int = 0  # URIs a manifest listed more than once (each is planned once)
    sorted_on_disk: bool = False  # a large manifest out of order, sorted by extsort before planning
    old_versions: int = 0  # S3 Inventory rows of delete markers and superseded versions, not planned
    keys: int = 0  # objects the listing gave (those skipped for their extension not counted here)
    listing_s: float = 0.0  # time its consumer waited on the listing (not the time it held the listing back)
    processes: int = 1  # processes that listed pages (worker processes, once a listing was large enough)
    pool: ListingPool | None = field(default=None, repr=False, compare=False)  # while it lists: where pages go

    @property
    def keys_seen(self) -> int:
        """Every object listed: given, or skipped for its extension."""
        return self.keys + self.skipped

    @property
    def keys_per_s(self) -> float | None:
        return self.keys_seen / self.listing_s if self.listing_s > 0 else None

    def throughput(self) -> dict:
        """What the manifest's input section says of the listing's speed."""
        rate = self.keys_per_s
        return {"keys_listed": self.keys_seen, "listing_s": round(self.listing_s, 6),
                "keys_per_s": None if rate is None else round(rate, 1), "listing_processes": self.processes}

    def duplicate(self, uri: str | None = None) -> None:
        self.duplicates += 1

    def skip(self, uri: str) -> None:
        self.skipped += 1
        if len(self.skipped_examples) < _EXAMPLES:
            self.skipped_examples.append(uri)


@dataclass(frozen=True)
class Listing:
    """A whole listing in memory: for samples and small inputs (compare, quantize, tests)."""

    uris: list[str]
    skipped: list[str]
    duplicates: int = 0


def list_input(url: str, extensions: tuple[str, ...], storage_options: dict | None = None,
               manifests: bool = True) -> Listing:
    stats = ListingStats()
    uris = list(iter_input(url, extensions, storage_options, manifests=manifests, stats=stats))
    return Listing(uris=uris, skipped=stats.skipped_examples, duplicates=stats.duplicates)


def _full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return path if _is_local(fs) else fs.unstrip_protocol(path)


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def iter_input(url: str, extensions: tuple[str, ...], storage_options: dict | None = None, *,
               manifests: bool = True, stats: ListingStats | None = None) -> Iterator[str]:
    """Every input URI under `url` in sorted order (a manifest file's URIs, with `manifests`). Hidden and
    `_`-prefixed files are ignored; files of other extensions are counted in `stats`. Raises InputError
    for an input that does not exist or cannot be listed."""
    return (uri for uri, _ in iter_listed(url, extensions, storage_options, manifests=manifests, stats=stats))


def iter_listed(url: str, extensions: tuple[str, ...], storage_options: dict | None = None, *,
                manifests: bool = True, stats: ListingStats | None = None,
                inventory_prefix: str | None = None, processes: int | None = 1) -> Iterator[tuple[str, str | None]]:
    """`iter_input` with each URI's version (`walk.version_of`) where the listing itself says it: for
    folders, prefixes, globs and S3 Inventory reports (`inventory.py`, keys under `inventory_prefix`);
    None for a manifest's URIs (stating each would cost a request). A folder, prefix or glob on S3 or a
    local disk is listed by up to `processes` processes (`pages.py`; None: one per CPU, at most 8), in the
    same order. `stats` counts the keys and the time the caller waited on them."""
    stats = stats if stats is not None else ListingStats()
    listed = _iter_listed(url, extensions, storage_options, manifests, stats, inventory_prefix, processes)
    try:
        while True:
            t0 = time.perf_counter()
            try:
                item = next(listed)
            except StopIteration:
                return
            finally:
                stats.listing_s += time.perf_counter() - t0
            stats.keys += 1
            yield item
    finally:
        listed.close()


def _iter_listed(url: str, extensions: tuple[str, ...], storage_options: dict | None, manifests: bool,
                 stats: ListingStats, inventory_prefix: str | None,
                 processes: int | None) -> Iterator[tuple[str, str | None]]:
    try:
        fs, path = url_to_fs(url, **(storage_options or {}))
    except (ImportError, ValueError) as exc:
        raise InputError(f"cannot open input {url!r}: {exc}") from None
    glob = any(ch in path for ch in _GLOB_CHARS)
    # The planning's own requests (is it a file, a manifest read as a stream, an inventory's data files) wait
    # out a throttled or unreachable store as the run's do; a prefix's pages do so in walk's pool.
    waiting = RetryingFS(fs, "the file system" if _is_local(fs) else "/".join(url.split("/")[:3]))
    report = read_report(waiting, path, url) if manifests and not glob and path.lower().endswith(".json") else None
    if report is not None:
        yield from inventory_listing(waiting, report, extensions, inventory_prefix, stats)
        return
    if inventory_prefix:
        raise InputError(f"--inventory-prefix filters the keys of an S3 Inventory report; input {url!r} is not "
                         "one (give its manifest.json, or leave --inventory-prefix out)")
    # What the path is, asked once: fsspec's isfile/isdir answer False for any error, so a throttled store
    # would turn a manifest into a plain file (then skipped by its extension) or into "does not exist".
    try:
        kind = None if glob else waiting.info(path).get("type")
    except OSError:  # not found, denied: transient errors were waited out (past the budget: StoreUnavailable)
        kind = None
    if manifests and not glob and posixpath.splitext(path)[1].lower() in MANIFEST_SUFFIXES:
        if kind == "file":
            for uri in _dedup_sorted(_manifest_lines(url, waiting, path), url, stats):
                yield uri, None
            return
    from .walk import walk

    pool = stats.pool = _pool(fs, processes)
    try:
        if glob:
            paths: Iterator[tuple[str, str | None]] = _glob(fs, path, url, pool)
        elif kind == "directory":
            paths = walk(fs, path, versions=True, pool=pool)
        elif kind == "file":
            paths = iter([(path, stat_version(fs, path))])
        else:
            raise InputError(f"input {url!r} does not exist: give a folder, prefix, glob or file")
        for p, version in paths:
            name = posixpath.basename(p)
            if name.startswith(".") or name.startswith("_"):
                continue
            if extensions and posixpath.splitext(name)[1].lower() not in extensions:
                stats.skip(_full_uri(fs, p))
                continue
            yield _full_uri(fs, p), version
    except InputError:
        raise
    except (PermissionError, OSError) as exc:
        raise InputError(f"cannot list input {url!r}: {type(exc).__name__}: {exc}") from None
    finally:
        if pool is not None:
            stats.processes = pool.processes if pool.in_processes else 1
            stats.pool = None
            pool.close()
        if not _is_local(fs):
            fs.invalidate_cache()  # the listing cache would keep every entry alive on the driver


def _pool(fs, processes: int | None) -> ListingPool | None:
    """Where a walk's pages are listed: None (threads of this process) for one process or a store whose
    pages cannot be listed elsewhere (only S3 and local folders are)."""
    s3 = callable(getattr(fs, "_call_s3", None))
    if (processes is not None and processes <= 1) or not (s3 or _is_local(fs)):
        return None
    return ListingPool(processes, preload=("s3fs",) if s3 else ())


def _glob(fs, path: str, url: str, pool: ListingPool | None = None) -> Iterator[tuple[str, str | None]]:
    """The files a glob matches (fsspec's pattern syntax and matching), streamed in sorted order: the
    folder before the first wildcard is walked (`walk.py`), entering only directories the pattern can
    reach, so a glob over a 100M-key bucket never holds its matches in memory. Files are what a folder
    walk finds: symlinks to files count, S3 directory markers ('x/') do not, and an S3 key that is also a
    prefix ('p/a' beside 'p/a/b.jpg') is a file as well (fs.glob differed on these three)."""
    from fsspec.utils import glob_translate

    from .walk import version_of, walk

    first = min(i for i in (path.find(c) for c in _GLOB_CHARS) if i >= 0)
    root = path[:path.rfind("/", 0, first) + 1]
    if not root:
        raise InputError(f"glob {url!r} has a wildcard in its first component: give the bucket or folder "
                         "it starts from (e.g. s3://bucket/photos/*.jpg)")
    try:
        pattern = re.compile(glob_translate(path))
        segments = path[len(root):].split("/")
        parts = [re.compile(glob_translate(seg)) if any(c in seg for c in _GLOB_CHARS) else seg
                 for seg in segments]
    except ValueError as exc:  # e.g. '**' inside a component
        raise InputError(f"invalid glob {url!r}: {exc}") from None
    deep = next((i for i, seg in enumerate(segments) if "**" in seg), None)

    def enter(rel: str) -> bool:
        names = rel.split("/")
        if deep is None and len(names) >= len(segments):
            return False  # deeper than any match
        for i, name in enumerate(names):
            if deep is not None and i >= deep:
                return True
            part = parts[i]
            if not (part.match(name) if isinstance(part, re.Pattern) else part == name):
                return False
        return True

    local = _is_local(fs)
    # Locally the version is taken below, for matches only (fs.glob's format): the walk need not stat too.
    found = walk(fs, root, versions=not local, enter=enter, pool=pool)
    if local:
        found = ((p, None) for p in found)
    try:
        head = next(found, None)
    except FileNotFoundError:
        return  # nothing there: nothing matches, as fs.glob says
    for p, version in itertools.chain([head] if head else [], found):
        if pattern.match(p):
            if local:  # the version fs.glob gave (size:mtime), which earlier runs' plans hold
                try:
                    version = version_of(fs.info(p))
                except FileNotFoundError:
                    version = None  # gone since the walk: its read fails, as a failure record
            yield p, version


def stat_version(fs, path: str) -> str | None:
    """One file's version as `walk` reports it (local: size and mtime in ns; object stores: size and
    ETag); None when it cannot be stated (it is then read, and fails, like any missing input)."""
    from .walk import version_of

    try:
        if _is_local(fs):
            st = os.stat(path)
            return f"{st.st_size}:{st.st_mtime_ns}"
        return version_of(fs.info(path))
    except (OSError, ValueError):
        return None


def _manifest_lines(url: str, fs, path: str) -> Iterator[str]:
    """The URIs of a manifest file as written: text with one URI per line, or CSV/Parquet with a `uri`
    column. Relative local paths are taken relative to the manifest's folder."""
    suffix = posixpath.splitext(path)[1].lower()
    base = posixpath.dirname(_full_uri(fs, path))

    def absolute(u: str) -> str:
        return u if "://" in u or u.startswith("/") else posixpath.join(base, u)

    try:
        with fs.open(path, "rb") as raw:
            if suffix == ".parquet":
                import pyarrow.parquet as pq

                pf = pq.ParquetFile(raw)
                if "uri" not in pf.schema_arrow.names:
                    raise InputError(f"manifest {url!r} has no 'uri' column (columns: "
                                     f"{', '.join(pf.schema_arrow.names)})")
                for batch in pf.iter_batches(batch_size=65536, columns=["uri"]):
                    for u in batch.column(0).to_pylist():
                        if u:
                            yield absolute(u)
                return
            text = io.TextIOWrapper(raw, encoding="utf-8")
            if suffix == ".csv":
                reader = csv.DictReader(text)
                if "uri" not in (reader.fieldnames or []):
                    raise InputError(f"manifest {url!r} has no 'uri' column in its header ({reader.fieldnames})")
                for row in reader:
                    u = (row.get("uri") or "").strip()
                    if u:
                        yield absolute(u)
                return
            for line in text:
                u = line.strip()
                if u and not u.startswith("#"):
                    yield absolute(u)
    except FileNotFoundError:
        raise InputError(f"manifest {url!r} not found") from None
    except UnicodeDecodeError:
        raise InputError(f"manifest {url!r} is not UTF-8 text") from None


def _dedup_sorted(lines: Iterator[str], url: str, stats: ListingStats) -> Iterator[str]:
    """Sorted, each URI once. The first SORT_LIMIT lines are read ahead: a manifest that ends there is
    sorted in memory. A longer one whose head is in order is streamed as it comes (an inventory, a sorted
    export), repeats dropped; one whose head is out of order is sorted on local disk first (extsort.py)."""
    head: list[str] = []
    for u in lines:
        head.append(u)
        if len(head) > SORT_LIMIT:
            break
    else:
        unique = sorted(set(head))
        stats.duplicates += len(head) - len(unique)
        yield from unique
        return
    if any(b < a for a, b in zip(head, itertools.islice(head, 1, None))):
        log.warning("manifest %s is not in sorted order: sorting its URIs on local disk before the run starts "
                    "(a sorted manifest, e.g. `LC_ALL=C sort -u`, streams at once)", url)
        stats.sorted_on_disk = True
        try:
            yield from sorted_unique(itertools.chain(head, lines), stats.duplicate)
        except SpillError as exc:
            raise InputError(f"manifest {url!r} is not sorted and could not be sorted on this machine's disk "
                             f"({exc}): set TMPDIR to a folder with room for about the manifest's size, or sort "
                             "it first (`LC_ALL=C sort -u list.txt`)") from None
        return
    previous: str | None = None
    number = 0
    for u in itertools.chain(head, lines):
        number += 1
        if previous is not None:
            if u == previous:
                stats.duplicates += 1
                continue
            if u < previous:
                raise InputError(
                    f"manifest {url!r} is not sorted (URI {number} {u!r} comes after {previous!r}): a manifest "
                    f"of more than {SORT_LIMIT:,} URIs whose first {SORT_LIMIT:,} are in order is streamed in "
                    "its own order, which must then be sorted throughout; sort it first (e.g. "
                    "`LC_ALL=C sort -u list.txt`)")
        previous = u
        yield u
