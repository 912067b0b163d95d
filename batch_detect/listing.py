"""Listing the input: a folder/prefix, a glob or a manifest file, as a stream of URIs in sorted order.

Streamed so that a 100M-key bucket or inventory never sits in the driver's memory: a folder or prefix
is walked in sorted order (`walk.py`), a manifest is read line by line (or batch by batch). Small
manifests (up to SORT_LIMIT URIs) are sorted and de-duplicated here; larger ones must already be sorted,
as an object-store inventory is, and are refused at the first line out of order.
"""

from __future__ import annotations

import csv
import io
import itertools
import os
import posixpath
from dataclasses import dataclass, field
from typing import Iterator

import fsspec
from fsspec.core import url_to_fs

from .errors import InputError

_GLOB_CHARS = ("*", "?", "[")
MANIFEST_SUFFIXES = (".txt", ".csv", ".parquet")
SORT_LIMIT = 100_000  # manifests up to this many URIs are sorted for you; larger ones must come sorted
_EXAMPLES = 20


@dataclass
class ListingStats:
    """What the listing saw besides the URIs it yielded; bounded whatever the input's size."""

    skipped: int = 0  # files whose extension is not an input's
    skipped_examples: list[str] = field(default_factory=list)
    duplicates: int = 0  # URIs a manifest listed more than once (each is planned once)

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
                manifests: bool = True, stats: ListingStats | None = None) -> Iterator[tuple[str, str | None]]:
    """`iter_input` with each URI's version (`walk.version_of`) where the listing itself says it: for
    folders, prefixes and globs; None for a manifest's URIs (stating each would cost a request)."""
    stats = stats if stats is not None else ListingStats()
    try:
        fs, path = url_to_fs(url, **(storage_options or {}))
    except (ImportError, ValueError) as exc:
        raise InputError(f"cannot open input {url!r}: {exc}") from None
    glob = any(ch in path for ch in _GLOB_CHARS)
    if manifests and not glob and posixpath.splitext(path)[1].lower() in MANIFEST_SUFFIXES:
        try:
            is_file = fs.isfile(path)
        except OSError:
            is_file = False
        if is_file:
            for uri in _dedup_sorted(_manifest_lines(url, fs, path), url, stats):
                yield uri, None
            return
    from .walk import version_of, walk

    try:
        if glob:
            found = fs.glob(path, detail=True)  # a glob is expanded in memory: give a prefix for huge inputs
            paths: Iterator[tuple[str, str | None]] = iter(sorted(
                (p, version_of(info)) for p, info in found.items() if info.get("type") == "file"))
        elif fs.isdir(path):
            paths = walk(fs, path, versions=True)
        elif fs.isfile(path):
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
        if not _is_local(fs):
            fs.invalidate_cache()  # the listing cache would keep every entry alive on the driver


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
    sorted in memory; a longer one must be sorted already (it is then streamed, repeats dropped)."""
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
                    f"manifest {url!r} is not sorted (URI {number} {u!r} comes after {previous!r}): manifests of "
                    f"more than {SORT_LIMIT:,} URIs are streamed and must be sorted, as an object-store "
                    "inventory is; sort it first (e.g. `LC_ALL=C sort -u list.txt`)")
        previous = u
        yield u
