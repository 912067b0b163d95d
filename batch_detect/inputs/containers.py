"""Images inside containers: tar shards (WebDataset style) and Parquet files with an image-bytes
column. Planned from the container (a tar is one shard; Parquet rows are cut into shards by row
range) and streamed inside the actor as (item uri, bytes): never extracted to disk, never all in memory.

Item URIs say where an image came from: `<tar uri>#<member name>`; for Parquet the id column's value,
or `<file uri>#<row>` without one.
"""

from __future__ import annotations

import posixpath
import tarfile
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from fsspec.utils import get_protocol

from ..errors import InputError, ReadError, StoreUnavailable
from .extsort import SpillError, sorted_unique

# An item is its uri and a callable giving its bytes (or raising the ReadError that becomes its record).
Item = tuple[str, Callable[[], bytes]]
_STREAM_BLOCK = 8 * 2**20  # readahead when streaming a tar from object storage
# Parquet files planned at once: each costs a few requests (footer, id column), which one after another
# add up to a latency per file before the first shard (a thousand files on S3: minutes).
PLAN_FILES_AT_ONCE = 16


def _value(data: bytes) -> Callable[[], bytes]:
    return lambda: data


def raising(error: ReadError) -> Callable[[], bytes]:
    def fail() -> bytes:
        raise error
    return fail


# --- tar --------------------------------------------------------------------------------------------


def unsafe_member_name(name: str) -> bool:
    """Names that would land outside the folder if extracted: absolute, `..`, or a drive letter."""
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":")


def tar_members_at_most(tar_uri: str, tar_bytes: int | None, limit: int) -> int | None:
    """The most images a tar can hold, before it is streamed (None: unknown). On this machine's disk its
    headers are counted, every member (sidecars too), up to `limit`. Elsewhere a read per member would cost
    too much: its listed size bounds them, each member taking a 512-byte header and its data at least one
    more block (uncompressed tars, the WebDataset convention). An empty or unreadable tar still leaves one
    record."""
    if get_protocol(tar_uri) in ("file", "local"):
        try:
            # headers only: the data between them is seeked over
            with tarfile.open(tar_uri.removeprefix("file://"), "r:") as archive:
                count = 0
                while count < limit and archive.next() is not None:
                    count += 1
                return max(1, count)
        except (tarfile.TarError, OSError):
            pass  # compressed, cut short or unreadable: the size decides
    return None if tar_bytes is None else max(1, tar_bytes // 512)


def iter_tar(tar_uri: str, fs, extensions: tuple[str, ...], stats: dict) -> Iterator[Item]:
    """Stream a tar's image members. Non-image members (a WebDataset's .json/.cls/.txt) are counted in
    `stats["skipped_members"]`. A member name that escapes the archive, a link, a repeated name, and a
    tar that is cut short or corrupt become failure records; a tar with no image member is one too, so
    every planned tar leaves at least one row."""
    seen: Counter = Counter()
    yielded = 0
    stats.setdefault("skipped_members", 0)
    try:
        fh = fs.open(fs._strip_protocol(tar_uri), "rb", block_size=_STREAM_BLOCK)
    except FileNotFoundError:
        yield tar_uri, raising(ReadError("tar shard not found (deleted after listing?)", error_type="not_found"))
        return
    except PermissionError:
        yield tar_uri, raising(ReadError("permission denied", error_type="permission_denied"))
        return
    except StoreUnavailable:  # an outage past --store-timeout stops the run; it is no image's failure
        raise
    except Exception as exc:
        yield tar_uri, raising(ReadError(f"{type(exc).__name__}: {exc}"))
        return
    try:
        with fh, tarfile.open(fileobj=fh, mode="r|*") as archive:
            for member in archive:
                if member.isdir():
                    continue
                name = member.name
                if extensions and posixpath.splitext(name)[1].lower() not in extensions:
                    stats["skipped_members"] += 1
                    continue
                seen[name] += 1
                uri = f"{tar_uri}#{name}"
                yielded += 1
                if seen[name] > 1:
                    yield f"{uri}#{seen[name]}", raising(ReadError(
                        f"member {name!r} appears {seen[name]} times in the tar; only the first is processed",
                        error_type="duplicate_member"))
                elif unsafe_member_name(name):
                    yield uri, raising(ReadError(
                        f"member name {name!r} escapes the archive (absolute or '..'); refused",
                        error_type="unsafe_member_name"))
                elif not member.isfile():
                    yield uri, raising(ReadError("member is a link or device, not a file", error_type="not_a_file"))
                else:
                    data = archive.extractfile(member).read()
                    yield uri, _value(data)
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        yielded += 1
        after = f" after {yielded - 1} members" if yielded > 1 else ""
        yield tar_uri, raising(ReadError(f"tar shard is corrupt or cut short{after}: {type(exc).__name__}: {exc}",
                                        error_type="corrupt_archive"))
        return
    if yielded == 0:
        yield tar_uri, raising(ReadError(
            f"tar shard holds no image members ({stats['skipped_members']} other members); accepted "
            f"extensions: {', '.join(extensions)}", error_type="empty_archive"))


# --- Parquet ----------------------------------------------------------------------------------------


def _binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)


def parquet_ranges(file_uris: list[str], image_column: str, id_column: str | None, shard_size: int,
                   storage_options: dict | None = None) -> Iterator[tuple[str, int, tuple[str, ...]]]:
    """(file, first row, item ids) for each `shard_size` rows of each file, in file order, planned one file
    at a time from its footer (and its id column). With an id column, every id is checked for repeats
    before the first range is returned (result rows could not be told apart): the ids are streamed
    through a sort that spills to local disk past memory (extsort.py), never all held at once."""
    files = sorted(file_uris)
    if id_column is not None:
        _refuse_repeated_ids(files, image_column, id_column, storage_options)
    return (r for ranges in _each_file(files, image_column, id_column, shard_size, storage_options) for r in ranges)


def _each_file(files: list[str], image_column: str, id_column: str | None, shard_size: int,
               storage_options: dict | None) -> Iterator[list[tuple[str, int, tuple[str, ...]]]]:
    """Each file's ranges, in file order, read PLAN_FILES_AT_ONCE files at a time (so that many files'
    ids in memory at most)."""
    with ThreadPoolExecutor(PLAN_FILES_AT_ONCE, thread_name_prefix="parquet-plan") as pool:
        pending: deque = deque()
        queued = iter(files)
        try:
            while True:
                while len(pending) < PLAN_FILES_AT_ONCE:
                    uri = next(queued, None)
                    if uri is None:
                        break
                    pending.append(pool.submit(_ranges, uri, image_column, id_column, shard_size, storage_options))
                if not pending:
                    return
                yield pending.popleft().result()
        finally:
            for future in pending:  # stopped early (an error, a closed plan): nothing more is read
                future.cancel()


def _refuse_repeated_ids(files: list[str], image_column: str, id_column: str, storage_options: dict | None) -> None:
    repeats: list[str] = []
    count = 0

    def repeated(i: str) -> None:
        nonlocal count
        count += 1
        if len(repeats) < 5 and i not in repeats:
            repeats.append(i)

    ids = (i for ranges in _each_file(files, image_column, id_column, 1 << 16, storage_options)
           for _, _, chunk in ranges for i in chunk)
    try:
        for _ in sorted_unique(ids, repeated):
            pass
    except SpillError as exc:
        raise InputError(f"cannot check --id-column {id_column!r} for repeats on this machine's disk ({exc}): set "
                         "TMPDIR to a folder with room for about the ids' size") from None
    if count:
        example = ", ".join(repr(i) for i in repeats)
        raise InputError(f"--id-column {id_column!r} has repeated ids ({count} rows repeat an earlier id, e.g. "
                         f"{example}): ids must be unique so each result row names one image; choose another id "
                         "column or none")


def _ranges(uri: str, image_column: str, id_column: str | None, shard_size: int,
            storage_options: dict | None) -> list[tuple[str, int, tuple[str, ...]]]:
    fs, path = url_to_fs(uri, **(storage_options or {}))
    try:
        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            schema = pf.schema_arrow
            if image_column not in schema.names:
                raise InputError(f"{uri!r} has no column {image_column!r} (--image-column); its columns: "
                                 f"{', '.join(schema.names)}")
            if not _binary(schema.field(image_column).type):
                raise InputError(f"column {image_column!r} of {uri!r} is {schema.field(image_column).type}, "
                                 "not binary: --image-column must hold the encoded image bytes")
            if id_column is not None:
                if id_column not in schema.names:
                    raise InputError(f"{uri!r} has no column {id_column!r} (--id-column); its columns: "
                                     f"{', '.join(schema.names)}")
                col = pf.read(columns=[id_column]).column(id_column)
                ids = [None if v is None else str(v) for v in col.to_pylist()]
                if None in ids:
                    raise InputError(f"column {id_column!r} of {uri!r} has null ids (row {ids.index(None)}); "
                                     "every row needs an id")
            else:
                ids = [f"{uri}#{row}" for row in range(pf.metadata.num_rows)]
    except FileNotFoundError:
        raise InputError(f"Parquet input {uri!r} not found") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"cannot read Parquet input {uri!r}: {exc}") from None
    return [(uri, lo, tuple(ids[lo:lo + shard_size])) for lo in range(0, len(ids), shard_size)]


def iter_parquet(shard, fs, image_column: str, batch_rows: int = 32) -> Iterator[Item]:
    """The rows of a `plan.Shard` of Parquet form, read in small batches from the row groups that hold them."""
    stop = shard.start + len(shard.uris)
    ids = iter(shard.uris)
    try:
        with fs.open(fs._strip_protocol(shard.source), "rb") as fh:
            pf = pq.ParquetFile(fh)
            offset = 0
            for rg in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(rg).num_rows
                lo, hi = max(shard.start, offset), min(stop, offset + n)
                if lo < hi:
                    row = offset
                    for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[rg], columns=[image_column]):
                        values = batch.column(0).to_pylist()
                        for i, data in enumerate(values):
                            if lo <= row + i < hi:
                                item = next(ids)
                                yield item, (_value(data) if data else raising(ReadError(
                                    f"row {row + i} of {shard.source} has no image bytes in {image_column!r}",
                                    error_type="empty_cell")))
                        row += len(values)
                        if row >= hi:
                            break
                offset += n
                if offset >= stop:
                    break
    except StoreUnavailable:
        raise
    except Exception as exc:
        error = ReadError(f"cannot read rows of {shard.source}: {type(exc).__name__}: {exc}")
        for item in ids:  # the rows not yet yielded: each becomes a record
            yield item, raising(error)
        return
    for item in ids:  # the file has fewer rows than planned: it changed since listing
        yield item, raising(ReadError(f"{shard.source} has fewer rows than when the job was planned",
                                     error_type="not_found"))
