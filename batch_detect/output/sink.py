"""Parquet output. Actors write each shard's three tables to `_staging/` under deterministic names, each
whole or not at all (a retry overwrites, never duplicates). Committed shards are then compacted, in
shard order, into few large part files under `images/`, `detections/`, `failures/`: the only files
readers' globs see, each written whole and never rewritten. Which shards a part holds is in the commit
log (`commitlog.py`); the plan is stored in `_plan/`, chunk by chunk.
"""

from __future__ import annotations

import copy
import io
import json
import posixpath
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from .commitlog import LOG_DIR
from ..inputs.reading import one_request
from ..outage import OUTAGE, RetryingFS
from .schema import PLAN_SCHEMA, TABLES

LAYOUT = 4  # detections carry keypoints; 3 had none, 2 no runs (run_id in every row), 1 a file set per shard
MANIFEST = "_manifest.json"
LOCK = "_lock.json"
GUARD = "_lock.guard"  # beside the lock on a file system, never removed: what its compare-and-swap locks
PLAN_DIR = "_plan"
STAGING = "_staging"
LEGACY_COMMIT_DIR = "_shards"  # the per-shard markers of outputs written before the commit log
ROW_GROUP_ROWS = 131_072  # rows per row group in a part: large enough for scans, small enough to buffer
PLAN_ROW_GROUP = 8192
# Object stores: a path starts with its bucket (container), and prefixes need no folders made. Their makedirs
# creates a missing bucket: this tool never calls it there, so that a typo'd bucket is an error, not a new bucket.
BUCKET_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})
# Stores where one PUT is atomic (an object appears whole or not at all): a file is put under its own name,
# as one request. Elsewhere a temp name then a move; on these a move is a copy and a delete, and fsspec adds
# a directory check and listings: 7 requests in a row per file, ~1 s per staged shard at 50 ms a request.
ATOMIC_PUT_PROTOCOLS = BUCKET_PROTOCOLS | {"memory"}
# Staged shards read at once while compacting (fsspec's cat fetches a list concurrently on object stores).
COMPACT_READ_BATCH = 32


def part_name(part: int) -> str:
    return f"part-{part:06d}.parquet"


def chunk_name(chunk: int) -> str:
    return f"chunk-{chunk:06d}.parquet"


class OutputStore:
    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url.rstrip("/")
        fs, self.root = url_to_fs(self.url, **(storage_options or {}))
        self.root = self.root.rstrip("/")
        # fsspec shares filesystem instances per process: another writer's files must not hide behind a
        # listing cached earlier (the commit log and parts are written by other processes).
        fs.invalidate_cache()
        # Every request waits out a throttled or unreachable store (outage.py); a write tried again after
        # a wait passes the fence again: the lease may have gone to another run while the store was away.
        self.fs = RetryingFS(fs, self.url, before_retry=self._check_fence)
        self.unfenced_fs = RetryingFS(fs, self.url)  # the lease's own requests, which prove it
        self.fence = None  # the driver's: raises before any write once its lease is another run's
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        self.atomic_put = bool(ATOMIC_PUT_PROTOCOLS.intersection(protocols))
        self.bucket = self.root.split("/", 1)[0] if BUCKET_PROTOCOLS.intersection(protocols) else None
        self._one_request = one_request(fs)  # the wrapper's signature hides max_concurrency

    def fenced_copy(self, fence) -> "OutputStore":
        """This store with a fence of its own, which its retried writes pass too."""
        other = copy.copy(self)
        other.fence = fence
        other.fs = RetryingFS(self.fs.unwrapped, self.url, before_retry=other._check_fence)
        return other

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def makedirs(self, path: str) -> None:
        """The folder `path` and those above it, where files need folders (not on object stores)."""
        if self.bucket is None:
            self.fs.makedirs(path, exist_ok=True)

    def _tmp(self, rel: str) -> str:
        final = self.path(rel)
        return posixpath.join(posixpath.dirname(final), "." + posixpath.basename(final) + ".tmp")

    def put_atomic(self, rel: str, data: bytes, fenced: bool = True) -> None:
        self.put_all({rel: data}, fenced)

    def put_all(self, files: dict[str, bytes], fenced: bool = True) -> None:
        """Each file whole or not at all: on object stores one PUT each, all at once; elsewhere a temp name
        then a move, one after another. `fenced=False` only for the lease's heartbeat, which is how the
        fence is lifted."""
        fs = self.fs if fenced else self.unfenced_fs
        if fenced:
            self._check_fence()
        if self.atomic_put:
            fs.pipe({self.path(rel): data for rel, data in files.items()})
            return
        for rel, data in files.items():
            final = self.path(rel)
            fs.makedirs(posixpath.dirname(final), exist_ok=True)
            tmp = self._tmp(rel)
            fs.pipe_file(tmp, data)
            self._rename(tmp, final, fs)

    def _rename(self, tmp: str, final: str, fs=None) -> None:
        fs = fs or self.fs
        try:
            fs.mv(tmp, final)
        except FileNotFoundError:
            # s3fs trusts a cached listing for "not found": one that another thread of this process (fsspec
            # shares instances: a `status` beside the run) took while `tmp` was being written lacks it.
            fs.invalidate_cache(posixpath.dirname(tmp))
            fs.mv(tmp, final)

    def write_json(self, rel: str, obj: dict) -> None:
        self.put_atomic(rel, json.dumps(obj, indent=2, sort_keys=True).encode())

    def read_json(self, rel: str) -> dict:
        return json.loads(self.fs.cat_file(self.path(rel)))

    def write_table(self, rel: str, table: pa.Table, row_group_size: int | None = None) -> None:
        self.put_atomic(rel, _parquet_bytes(table, row_group_size))

    # --- plan -----------------------------------------------------------------------------------

    def write_chunk(self, chunk: int, shards) -> None:
        # Small row groups: an incremental run streams every earlier run's plan side by side, a row group each.
        self.write_table(posixpath.join(PLAN_DIR, chunk_name(chunk)), pa.table(
            {"shard_id": [s.shard_id for s in shards for _ in s.uris], "uri": [u for s in shards for u in s.uris],
             "version": [v for s in shards for v in (s.versions or (None,) * len(s.uris))]},
            schema=PLAN_SCHEMA), row_group_size=PLAN_ROW_GROUP)

    def iter_plan(self, chunks: list[dict], batch_size: int = 65536, columns: list[str] | None = None):
        """Record batches (shard_id, uri, version) of the stored plan, in order, one chunk file at a time."""
        for ev in chunks:  # a chunk is small: fetched whole, as one request that an outage can retry
            blob = self.fs.cat_file(self.path(PLAN_DIR, chunk_name(ev["chunk"])), **self._one_request)
            yield from pq.ParquetFile(pa.BufferReader(blob)).iter_batches(batch_size=batch_size, columns=columns)

    # --- shards and parts -----------------------------------------------------------------------

    def write_shard(self, shard_id: str, columns: dict[str, dict], run_id: int) -> None:
        """A shard's rows to staging, stamped with the run that processed them; it counts once the driver
        logs it."""
        files = {}
        for name, schema in TABLES.items():
            cols = dict(columns[name])
            cols["run_id"] = np.full(len(cols["uri"]), run_id, dtype=np.int32)
            files[_staged(name, shard_id)] = _parquet_bytes(pa.Table.from_pydict(cols, schema=schema))
        self.put_all(files)

    def compact(self, part: int, shard_ids: list[str]) -> dict[str, int]:
        """The staged rows of `shard_ids`, in that order, into part `part` of each table; then their staging
        files are deleted. Idempotent: a part already in place is not written again (a retry after a crash
        between writing it and logging it must not duplicate rows), and staging is deleted only after all
        three parts exist. The three tables are written side by side (on an object store each is a chain of
        round trips), each to a temp name, and named only once all three are written: a failure leaves no
        table's part visible without the others'. A part is streamed to the store, which no single request
        retries: the whole is tried again when the store drops meanwhile (outage.py)."""
        return OUTAGE.call(self._compact, part, shard_ids, what=f"part {part}", store=self.url,
                           before_retry=self._check_fence)

    def _compact(self, part: int, shard_ids: list[str]) -> dict[str, int]:
        with ThreadPoolExecutor(len(TABLES), thread_name_prefix="compact") as pool:
            futures = {name: pool.submit(self._write_part, name, schema, part, shard_ids)
                       for name, schema in TABLES.items()}
            written = {name: future.result() for name, future in futures.items()}
        for name, (_, tmp) in written.items():
            if tmp is not None:
                self._check_fence()
                self._rename(tmp, self.path(name, part_name(part)))
        self._check_fence()
        staged = [self.path(_staged(name, sid)) for name in TABLES for sid in shard_ids]
        try:
            self.fs.rm(staged)
        except FileNotFoundError:  # a retry after a partial clean-up (object stores ignore missing keys)
            self.fs.rm([p for p in staged if self.fs.exists(p)])
        return {name: rows for name, (rows, _) in written.items()}

    def _write_part(self, name: str, schema: pa.Schema, part: int, shard_ids: list[str]) -> tuple[int, str | None]:
        """(rows, the temp file holding them), or (rows, None) where the part is in place already."""
        self._check_fence()
        final = self.path(name, part_name(part))
        if self.fs.exists(final):
            with self.fs.open(final, "rb") as fh:
                return pq.ParquetFile(fh).metadata.num_rows, None
        tmp = self._tmp(posixpath.join(name, part_name(part)))  # streamed: a part may not fit in memory
        self.makedirs(posixpath.dirname(tmp))
        rows = 0
        with self.fs.open(tmp, "wb") as fh, pq.ParquetWriter(fh, schema, compression="zstd") as writer:
            buffered: list[pa.Table] = []
            held = 0
            for t in self._staged_tables(name, schema, shard_ids):
                buffered.append(t)
                held += t.num_rows
                if held >= ROW_GROUP_ROWS:
                    writer.write_table(pa.concat_tables(buffered), row_group_size=ROW_GROUP_ROWS)
                    rows += held
                    buffered, held = [], 0
            if buffered or rows == 0:
                writer.write_table(pa.concat_tables(buffered) if buffered else schema.empty_table(),
                                   row_group_size=ROW_GROUP_ROWS)
                rows += held
        return rows, tmp

    def _staged_tables(self, name: str, schema: pa.Schema, shard_ids: list[str]):
        """The staged tables of `shard_ids` in order, fetched a batch at a time (concurrently on object
        stores, where one after another each costs a round trip). A missing one raises: a committed shard is
        never skipped."""
        for lo in range(0, len(shard_ids), COMPACT_READ_BATCH):
            self._check_fence()  # a long part stops within a batch once the run may no longer write
            paths = [self.path(_staged(name, sid)) for sid in shard_ids[lo:lo + COMPACT_READ_BATCH]]
            for blob in self.fs.cat_ranges(paths, None, None, on_error="raise", **self._one_request):
                yield pq.read_table(pa.BufferReader(blob), schema=schema)

    def _check_fence(self) -> None:
        if self.fence is not None:
            self.fence()

    def part_files(self, table: str) -> list[str]:
        return sorted(self.fs.glob(self.path(table, "*.parquet")))

    def clear(self) -> None:
        """Remove what a previous run wrote here (only the names this tool writes)."""
        for name in (*TABLES, STAGING, PLAN_DIR, LOG_DIR, LEGACY_COMMIT_DIR):
            if self.fs.exists(self.path(name)):
                self.fs.rm(self.path(name), recursive=True)
        for name in (MANIFEST, "_plan.parquet"):
            if self.fs.exists(self.path(name)):
                self.fs.rm(self.path(name))


def _staged(table: str, shard_id: str) -> str:
    return posixpath.join(STAGING, table, f"{shard_id}.parquet")


def _parquet_bytes(table: pa.Table, row_group_size: int | None = None) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=row_group_size)
    return buf.getvalue()
