"""Parquet output: each shard's three tables under deterministic names, written to a temporary name
and moved into place, then a commit marker. Only shards with a marker count as done.
"""

from __future__ import annotations

import io
import json
import posixpath

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from .schema import TABLES

COMMIT_DIR = "_shards"
MANIFEST = "_manifest.json"
PLAN = "_plan.parquet"


class OutputStore:
    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url.rstrip("/")
        self.fs, self.root = url_to_fs(self.url, **(storage_options or {}))
        self.root = self.root.rstrip("/")

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def _put_atomic(self, rel: str, data: bytes) -> None:
        final = self.path(rel)
        parent = posixpath.dirname(final)
        self.fs.makedirs(parent, exist_ok=True)
        tmp = posixpath.join(parent, "." + posixpath.basename(final) + ".tmp")
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, final)

    def write_json(self, rel: str, obj: dict) -> None:
        self._put_atomic(rel, json.dumps(obj, indent=2, sort_keys=True).encode())

    def read_json(self, rel: str) -> dict:
        return json.loads(self.fs.cat_file(self.path(rel)))

    def write_table(self, rel: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self._put_atomic(rel, buf.getvalue())

    def write_shard(self, shard_id: str, columns: dict[str, dict], summary: dict) -> None:
        for name, schema in TABLES.items():
            table = pa.Table.from_pydict(columns[name], schema=schema)
            self.write_table(f"{name}/{shard_id}.parquet", table)
        # The marker goes last: a shard without one is not done, whatever else exists.
        self.write_json(f"{COMMIT_DIR}/{shard_id}.json", summary)

    def committed_shards(self) -> dict[str, dict]:
        pattern = self.path(COMMIT_DIR, "shard-*.json")
        return {
            posixpath.basename(p)[: -len(".json")]: json.loads(self.fs.cat_file(p))
            for p in sorted(self.fs.glob(pattern))
        }

    def clear(self) -> None:
        """Remove what a previous run wrote here (only the names this tool writes)."""
        for name in (*TABLES, COMMIT_DIR):
            if self.fs.exists(self.path(name)):
                self.fs.rm(self.path(name), recursive=True)
        for name in (MANIFEST, PLAN):
            if self.fs.exists(self.path(name)):
                self.fs.rm(self.path(name))
