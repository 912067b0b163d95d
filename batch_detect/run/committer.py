"""The driver's bookkeeping between dispatch and the output: it logs plan chunks and staged shards in the
commit log, and cuts committed shards into parts for compaction.

A part is a contiguous run of committed shards, cut in shard order once it holds `part_rows` rows (or
at the end of the run; the first part of an output also after `first_part_s`, so that readers see rows
within seconds). Parts never overlap and are never rewritten, so the readers' globs return each row at
most once at every moment, and a finished run of N images leaves about N / part_rows files per table.
"""

from __future__ import annotations

import time
from typing import Callable

from ..output.commitlog import CommitLog
from ..inputs.plan import Chunk, shard_id

PART_ROWS = 100_000
FIRST_PART_S = 2.0
FLUSH_S = 1.0


class Committer:
    def __init__(self, log: CommitLog, compact: Callable[[int, list[str], Callable[[dict], None]], None], *,
                 part_rows: int = PART_ROWS, first_part_s: float = FIRST_PART_S, flush_s: float = FLUSH_S):
        """`compact(part, shard_ids, done)` starts writing a part and calls `done(rows)` once it is in place."""
        self.log = log
        self.state = log.state
        self.compact = compact
        self.part_rows, self.first_part_s, self.flush_s = part_rows, first_part_s, flush_s
        self.first_staged_at: float | None = None
        self.last_flush = time.monotonic()
        self.compacting: set[int] = set()
        self.staged_now = 0  # shards staged by this run
        self._scan = (-1, 0, 0)  # (part start, next shard to look at, rows from start to it)

    def resume(self) -> None:
        """Parts an earlier run logged but did not see finished are written (again: it is idempotent)."""
        for p in self.state.parts:
            if not p["done"]:
                self._start(p["part"], p["first"], p["end"])

    def start_run(self, run: int, first_chunk: int, first_shard: int, incremental: bool,
                  retry: str | None = None) -> None:
        self.log.append({"ev": "run", "run": run, "first_chunk": first_chunk, "first_shard": first_shard,
                         "incremental": incremental, **({"retry": retry} if retry else {}),
                         "t": round(time.time(), 2)})

    def relist(self, run: int, first_chunk: int) -> None:
        self.log.append({"ev": "relist", "run": run, "first_chunk": first_chunk, "t": round(time.time(), 2)})

    def chunk(self, chunk: Chunk) -> None:
        self.log.append({"ev": "chunk", "chunk": chunk.index, "first_shard": chunk.first_shard,
                         "shards": len(chunk.shards), "items": chunk.items, "sha": chunk.sha})

    def listed(self, **facts) -> None:
        self.log.append({"ev": "listed", **facts})
        self.log.flush()

    def shard(self, summary: dict) -> None:
        ev = {"ev": "shard", "shard": int(summary["shard_id"].rsplit("-", 1)[1]), "t": round(time.time(), 2),
              **summary}
        del ev["shard_id"]
        self.log.append(ev)
        self.staged_now += 1
        if self.first_staged_at is None:
            self.first_staged_at = time.monotonic()
        self.cut(final=False)

    def tick(self) -> None:
        if time.monotonic() - self.last_flush >= self.flush_s:
            self.flush()
            self.cut(final=False)

    def flush(self) -> None:
        self.log.flush()
        self.last_flush = time.monotonic()

    def cut(self, final: bool) -> None:
        """Parts from the committed shards that follow the last part. `final`: every shard is committed,
        so the remainder is a part too."""
        st = self.state
        start = st.compacted_end
        if self._scan[0] != start:  # a part was cut since: scan the committed run after it afresh
            self._scan = (start, start, 0)
        _, i, rows = self._scan
        while st.is_committed(i):
            rows += st.pending_rows.get(i, 0)
            i += 1
            if rows >= self.part_rows:
                self._new_part(start, i)
                start, rows = i, 0
        self._scan = (start, i, rows)
        early = (not st.parts and self.first_staged_at is not None
                 and time.monotonic() - self.first_staged_at >= self.first_part_s)
        if i > start and (final or early):
            self._new_part(start, i)

    def _new_part(self, first: int, end: int) -> None:
        part = len(self.state.parts)
        self.log.append({"ev": "part", "part": part, "first": first, "end": end})
        self.flush()  # the intent is durable before the part file can appear
        self._start(part, first, end)

    def _start(self, part: int, first: int, end: int) -> None:
        self.compacting.add(part)

        def done(rows: dict) -> None:
            self.compacting.discard(part)
            self.log.append({"ev": "part_done", "part": part, "rows": rows})

        self.compact(part, [shard_id(i) for i in range(first, end)], done)

    @property
    def busy(self) -> bool:
        return bool(self.compacting)
