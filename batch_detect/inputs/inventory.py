"""An S3 Inventory report as the input: its `manifest.json`, the data files it names, their rows as URIs.

Owners of buckets of 100M+ objects list them with S3 Inventory (daily or weekly), not with LIST requests.
A report is recognised by its manifest's content (`sourceBucket`, `fileFormat`, `fileSchema`, `files`),
whatever its name. Its data files (CSV.gz, Parquet or ORC) are fetched a few at once to local disk, each
checked against its `MD5checksum` before a row of it is read, so a damaged or missing file stops the run
before any work. Rows are in no order across files: they go through the same on-disk sort as a large
manifest (`extsort.py`), so the plan stays URI-sorted and each object is planned once.

Each object's version is its size and ETag, in the form a prefix listing gives (`walk.version_of`): an
output made by listing the bucket and one made from an inventory are the same to `--incremental`.
"""

from __future__ import annotations

import atexit
import csv
import functools
import gzip
import hashlib
import itertools
import json
import os
import posixpath
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator
from urllib.parse import unquote_plus

from ..errors import InputError
from . import extsort
from .extsort import SpillError, sorted_unique
from .walk import version_of

MARKS = ("sourceBucket", "fileFormat", "fileSchema", "files")
FORMATS = ("CSV", "PARQUET", "ORC")
READERS = 4  # data files fetched at once: object-store reads are latency-bound, parsing is not
_MANIFEST_LIMIT = 64 << 20  # a manifest lists file names, not objects: anything larger is not one
_FIELDS = {"key": "key", "size": "size", "etag": "etag", "islatest": "latest", "isdeletemarker": "deleted"}
_SEP = "\0"  # sorts below every other character, so "uri\0version" strings sort by uri first
_BATCH = 65536


@dataclass(frozen=True)
class DataFile:
    uri: str  # as shown in messages
    path: str  # as the filesystem names it
    md5: str | None


@dataclass(frozen=True)
class Report:
    """What a manifest.json says: whose objects, in which format, where the data files are."""

    url: str
    source: str  # the bucket the listed keys are in
    scheme: str
    fmt: str
    columns: list[str]  # CSV only: the data files have no header, the manifest's fileSchema is it
    files: list[DataFile]


def read_report(fs, path: str, url: str) -> Report | None:
    """The report `path` is the manifest of, or None when it is another file (or none)."""
    try:
        if fs.size(path) > _MANIFEST_LIMIT:
            return None
        doc = json.loads(fs.cat_file(path))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or not all(k in doc for k in MARKS):
        return None
    fmt = str(doc["fileFormat"]).upper()
    if fmt not in FORMATS:
        raise InputError(f"S3 Inventory {url!r} has fileFormat {doc['fileFormat']!r}: this reads "
                         f"{', '.join(FORMATS)}")
    if not isinstance(doc["files"], list) or not all(isinstance(f, dict) and f.get("key") for f in doc["files"]):
        raise InputError(f"S3 Inventory {url!r} has a 'files' entry without a key: is the manifest.json whole?")
    scheme = url.split("://", 1)[0] if "://" in url else "file"
    if scheme == "file":
        raise InputError(f"S3 Inventory manifest {url!r} is local: its data files are named by key in the "
                         "destination bucket, so give the manifest's own s3:// URL")
    # The data files are keys of the destination bucket (an ARN in the manifest), where the manifest is too.
    dest = str(doc.get("destinationBucket") or fs._strip_protocol(path).split("/", 1)[0]).split(":")[-1]
    files = [DataFile(f"{scheme}://{dest}/{f['key']}", f"{dest}/{f['key']}", f.get("MD5checksum"))
             for f in doc["files"]]
    columns = [c.strip() for c in str(doc["fileSchema"]).split(",")] if fmt == "CSV" else []
    return Report(url, str(doc["sourceBucket"]), scheme, fmt, columns, files)


def inventory_listing(fs, report: Report, extensions: tuple[str, ...], prefix: str | None,
                      stats) -> Iterator[tuple[str, str | None]]:
    """(uri, version) of the report's current objects under `prefix` whose extension is an input's, in
    sorted order, each once. Every data file is fetched and checked before the first one comes out."""
    prefix = _key_prefix(prefix, report)
    base = f"{report.scheme}://{report.source}/"
    kept = itertools.count()

    def entries() -> Iterator[str]:
        for key, size, etag, latest, deleted in _rows(fs, report):
            if deleted is True or latest is False:
                stats.old_versions += 1  # a deleted object or a superseded version: not what the bucket holds
                continue
            if prefix and not key.startswith(prefix):
                continue
            name = posixpath.basename(key)
            if not name or name.startswith((".", "_")):  # folder markers and hidden names, as a listing skips
                continue
            if extensions and posixpath.splitext(name)[1].lower() not in extensions:
                stats.skip(base + key)
                continue
            size = int(size) if size not in (None, "") else None
            next(kept)
            yield base + key + _SEP + (version_of({"size": size, "ETag": etag or None}) or "")

    previous = None
    try:
        for item in sorted_unique(entries(), stats.duplicate):
            uri, version = item.split(_SEP, 1)
            if previous is None:  # everything is read by now: more than a run's worth went through the disk
                stats.sorted_on_disk = next(kept) > extsort.RUN_SIZE
            if uri == previous:  # one key listed with two versions: the first (sorted) is kept
                stats.duplicate(uri)
                continue
            previous = uri
            yield uri, version or None
    except SpillError as exc:
        raise InputError(f"S3 Inventory {report.url!r} could not be sorted on this machine's disk ({exc}): "
                         "set TMPDIR to a folder with room for about the report's size") from None


def _key_prefix(prefix: str | None, report: Report) -> str:
    """--inventory-prefix as a key prefix; a full URI in the report's bucket is accepted too."""
    if not prefix:
        return ""
    if "://" not in prefix:
        return prefix.lstrip("/")
    bucket = f"{report.scheme}://{report.source}/"
    if not (prefix + "/").startswith(bucket):
        raise InputError(f"--inventory-prefix {prefix!r} is not in the inventory's bucket {report.source!r}: "
                         f"give a key prefix (e.g. photos/2026/) or a URI under {bucket}")
    return prefix[len(bucket):]


def _rows(fs, report: Report) -> Iterator[tuple]:
    """(key, size, etag, is_latest, is_delete_marker) of every row of every data file; the last two None
    where the report has no such column (a current-versions-only inventory)."""
    work = tempfile.mkdtemp(prefix="batch-detect-inventory-")
    # Listing may run on a daemon thread, which exit kills without running `finally`.
    cleanup = functools.partial(shutil.rmtree, work, ignore_errors=True)
    atexit.register(cleanup)
    pool = ThreadPoolExecutor(READERS, thread_name_prefix="inventory")
    try:
        files = iter(enumerate(report.files))
        pending = [pool.submit(_fetch, fs, f, os.path.join(work, str(i)), report.url)
                   for i, f in itertools.islice(files, READERS * 2)]
        while pending:
            local, data = pending.pop(0).result()
            nxt = next(files, None)
            if nxt is not None:  # at most READERS * 2 files on local disk at a time
                pending.append(pool.submit(_fetch, fs, nxt[1], os.path.join(work, str(nxt[0])), report.url))
            try:
                yield from _parse(local, data, report)
            finally:
                os.remove(local)
    finally:
        # A failed file stops the others not yet started; those running finish before their folder goes.
        pool.shutdown(wait=True, cancel_futures=True)
        cleanup()
        atexit.unregister(cleanup)


def _fetch(fs, data: DataFile, local: str, url: str) -> tuple[str, DataFile]:
    """The data file copied to `local`, its MD5 checked on the way."""
    digest = hashlib.md5()
    try:
        with fs.open(data.path, "rb") as src, open(local, "wb") as dst:
            while block := src.read(8 << 20):
                digest.update(block)
                dst.write(block)
    except FileNotFoundError:
        raise InputError(f"S3 Inventory {url!r} lists data file {data.uri!r}, which does not exist: the report "
                         "is incomplete or its files expired; give a complete report's manifest.json") from None
    except OSError as exc:
        raise InputError(f"cannot read S3 Inventory data file {data.uri!r}: {type(exc).__name__}: {exc}") from None
    if data.md5 and digest.hexdigest() != data.md5.lower():
        raise InputError(f"S3 Inventory data file {data.uri!r} has MD5 {digest.hexdigest()}, its manifest {url!r} "
                         f"says {data.md5}: the file is damaged or was replaced; give the manifest.json that "
                         "was written with it")
    return local, data


def _parse(local: str, data: DataFile, report: Report) -> Iterator[tuple]:
    try:
        if report.fmt == "CSV":
            yield from _csv_rows(local, report.columns, data)
        else:
            yield from _columnar_rows(local, report.fmt, data)
    except InputError:
        raise
    except Exception as exc:  # a corrupt file surfaces as whatever its reader raises
        raise InputError(f"cannot parse S3 Inventory data file {data.uri!r} as {report.fmt}: "
                         f"{type(exc).__name__}: {exc}") from None


def _positions(names: list[str], data: DataFile) -> dict[str, int]:
    """Where key, size, etag, latest and deleted are, by name: `Key` in CSV, `key` in Parquet and ORC."""
    found = {}
    for i, name in enumerate(names):
        role = _FIELDS.get(name.replace("_", "").lower())
        if role:
            found[role] = i
    if "key" not in found:
        raise InputError(f"S3 Inventory data file {data.uri!r} has no Key column (columns: {', '.join(names)})")
    return found


def _flag(value) -> bool | None:
    if value is None or value == "":
        return None
    return value if isinstance(value, bool) else str(value).lower() == "true"


def _csv_rows(local: str, columns: list[str], data: DataFile) -> Iterator[tuple]:
    where = _positions(columns, data)
    with open(local, "rb") as probe:
        zipped = probe.read(2) == b"\x1f\x8b"
    opener = gzip.open if zipped else open
    with opener(local, "rt", encoding="utf-8", newline="") as text:
        for row in csv.reader(text):
            if not row:
                continue
            get = (lambda role: row[where[role]] if role in where and where[role] < len(row) else None)
            # CSV inventories URL-encode keys ('+' for a space), as AWS documents; Parquet and ORC do not.
            yield (unquote_plus(row[where["key"]]), get("size"), get("etag"), _flag(get("latest")),
                   _flag(get("deleted")))


def _columnar_rows(local: str, fmt: str, data: DataFile) -> Iterator[tuple]:
    if fmt == "PARQUET":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(local)
        names = pf.schema_arrow.names
        batches = (lambda cols: pf.iter_batches(batch_size=_BATCH, columns=cols))
    else:
        from pyarrow import orc

        of = orc.ORCFile(local)
        names = of.schema.names
        batches = (lambda cols: (of.read_stripe(i, columns=cols) for i in range(of.nstripes)))
    where = _positions(names, data)
    roles = list(where)
    for batch in batches([names[where[r]] for r in roles]):
        cols = dict(zip(roles, (batch.column(i).to_pylist() for i in range(len(roles)))))
        absent = [None] * batch.num_rows  # a list, not one iterator: zip would drain a shared one
        yield from zip(cols["key"], cols.get("size", absent), cols.get("etag", absent),
                       map(_flag, cols.get("latest", absent)), map(_flag, cols.get("deleted", absent)))
