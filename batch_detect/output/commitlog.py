"""The commit log: the one record of what an output holds, appended by the driver only.

Actors write a shard's rows to staging and return; the driver appends a `shard` event, and only then
does the shard count as done. The log is a sequence of small JSON-lines segments in `_log/`, each
written whole (temp name, then moved), so a reader sees whole events or none. Every so often the state
so far is written as a checkpoint and older segments are deleted: reading an output's state costs a
checkpoint plus a few segments, not one file per shard.

Events, in the order the driver appends them:
  run        run `run` of the output starts planning at chunk first_chunk, shard first_shard
  relist     the current run, resumed by an incremental invocation, lists again from chunk first_chunk
  chunk      plan chunk `chunk` (shards first_shard … +shards) is stored in `_plan/`, fingerprint `sha`
  listed     the run's listing ended: its chunks, shards, items, fingerprint, what it skipped
  shard      shard `shard` is committed (its rows are in staging or in a part); its counts
  part       intent: part `part` will hold shards [first, end)   (written before the part is)
  part_done  the part's three files are in place; its shards' staging files may be deleted
"""

from __future__ import annotations

import bisect
import json
import posixpath
import time
from collections import deque
from dataclasses import dataclass, field

LOG_DIR = "_log"
CHECKPOINT_EVERY = 64  # segments between checkpoints


def _add(into: dict, more: dict) -> None:
    for k, v in more.items():
        into[k] = into.get(k, 0) + v


@dataclass
class LogState:
    """What the events so far say. Memory: one byte per shard plus the not-yet-compacted window."""

    runs: list[dict] = field(default_factory=list)  # run events in order, each with its "listed" facts or None
    chunks: list[dict] = field(default_factory=list)  # chunk events in order (numbered across runs)
    listed: dict | None = None  # the last run's listing facts, once its listing ended
    committed: bytearray = field(default_factory=bytearray)  # 1 at a committed shard's index
    num_committed: int = 0
    totals: dict = field(default_factory=lambda: {"images": 0, "failures": 0, "detections": 0})
    run_totals: dict = field(default_factory=dict)  # run -> its shards' totals (and "shards")
    failure_types: dict = field(default_factory=dict)
    unlabelled: dict = field(default_factory=dict)
    parts: list[dict] = field(default_factory=list)  # {"part", "first", "end", "done", "rows"?}
    pending_rows: dict[int, int] = field(default_factory=dict)  # committed shards not in a part: rows
    recent: deque = field(default_factory=lambda: deque(maxlen=4096))  # (time, rows, node, pid) of the last shards
    _starts: list = field(default_factory=list, repr=False)  # first shard of each run, for run_of

    def is_committed(self, index: int) -> bool:
        return index < len(self.committed) and self.committed[index] == 1

    @property
    def planned_end(self) -> int:
        """Shards before this index are planned (stored in plan chunks), across all runs."""
        return self.chunks[-1]["first_shard"] + self.chunks[-1]["shards"] if self.chunks else 0

    @property
    def end_shard(self) -> int | None:
        """The number of shards in the output's plan once every run's listing has ended, else None."""
        return self.planned_end if self.listed is not None else None

    @property
    def planned_items(self) -> int:
        return sum(c["items"] for c in self.chunks)

    @property
    def finished(self) -> bool:
        """Every run listed to the end and every planned shard committed (parts may still be written)."""
        return self.listed is not None and self.num_committed == self.planned_end

    def run_of(self, shard: int) -> int:
        """The run that planned shard `shard`."""
        if len(self._starts) != len(self.runs):
            self._starts = [r["first_shard"] for r in self.runs]
        i = bisect.bisect_right(self._starts, shard)
        return self.runs[i - 1]["run"] if i else 1

    @property
    def compacted_end(self) -> int:
        """Shards before this index are in parts (done or intended)."""
        return self.parts[-1]["end"] if self.parts else 0

    def apply(self, ev: dict) -> None:
        kind = ev["ev"]
        if kind == "run":
            if not self.runs or ev["run"] > self.runs[-1]["run"]:
                self.runs.append({**ev, "listed": None})
                self.listed = None
        elif kind == "chunk":
            if ev["chunk"] == len(self.chunks):
                self.chunks.append(ev)
        elif kind == "relist":  # a resumed incremental run lists again: its plan grows by a new sorted pass
            run = self.runs[-1]
            run.setdefault("passes", [run["first_chunk"]]).append(ev["first_chunk"])
            run["listed"] = self.listed = None
        elif kind == "listed":
            self.listed = ev
            if self.runs:
                self.runs[-1]["listed"] = ev
        elif kind == "shard":
            i = ev["shard"]
            if self.is_committed(i):
                return
            if i >= len(self.committed):
                self.committed.extend(b"\0" * (max(i + 1, 2 * len(self.committed)) - len(self.committed)))
            self.committed[i] = 1
            self.num_committed += 1
            counts = {k: ev[k] for k in ("images", "failures", "detections")}
            _add(self.totals, counts)
            _add(self.run_totals.setdefault(self.run_of(i), {}), {**counts, "shards": 1})
            _add(self.failure_types, ev.get("failure_types", {}))
            _add(self.unlabelled, ev.get("unlabelled_class_ids", {}))
            if i >= self.compacted_end:
                self.pending_rows[i] = ev["images"] + ev["failures"]
            if "t" in ev:
                self.recent.append((ev["t"], ev["images"] + ev["failures"], ev.get("node_id"), ev.get("pid")))
        elif kind == "part":
            self.parts.append({"part": ev["part"], "first": ev["first"], "end": ev["end"], "done": False})
            for i in range(ev["first"], ev["end"]):
                self.pending_rows.pop(i, None)
        elif kind == "part_done":
            for p in reversed(self.parts):
                if p["part"] == ev["part"]:
                    p["done"], p["rows"] = True, ev.get("rows")
                    break

    def committed_runs(self) -> list[list[int]]:
        """Committed shard indexes as [first, end) runs: compact for a checkpoint."""
        runs, c, i = [], self.committed, 0
        while (start := c.find(1, i)) >= 0:
            end = c.find(0, start)
            end = len(c) if end < 0 else end
            runs.append([start, end])
            i = end
        return runs

    def uncommitted(self, num_shards: int, limit: int = 5) -> list[int]:
        """The first `limit` shard indexes below `num_shards` not committed."""
        out, i = [], 0
        while len(out) < limit and i < num_shards:
            j = self.committed.find(0, i)
            if j < 0:
                j = max(i, len(self.committed))
            if j >= num_shards:
                break
            out.append(j)
            i = j + 1
        return out

    def to_checkpoint(self) -> dict:
        return {"runs": self.runs, "chunks": self.chunks, "listed": self.listed, "committed": self.committed_runs(),
                "num_committed": self.num_committed, "totals": self.totals,
                "run_totals": {str(k): v for k, v in self.run_totals.items()}, "failure_types": self.failure_types,
                "unlabelled": self.unlabelled, "parts": self.parts,
                "pending_rows": {str(k): v for k, v in self.pending_rows.items()}, "recent": list(self.recent)}

    @classmethod
    def from_checkpoint(cls, d: dict) -> "LogState":
        state = cls(runs=d.get("runs", []), chunks=d["chunks"], listed=d["listed"], num_committed=d["num_committed"], totals=d["totals"],
                    failure_types=d["failure_types"], unlabelled=d["unlabelled"], parts=d["parts"],
                    pending_rows={int(k): v for k, v in d["pending_rows"].items()})
        state.recent.extend(tuple(r) for r in d.get("recent", []))
        state.run_totals = {int(k): v for k, v in d.get("run_totals", {}).items()}
        end = d["committed"][-1][1] if d["committed"] else 0
        state.committed = bytearray(end)
        for a, b in d["committed"]:
            state.committed[a:b] = b"\1" * (b - a)
        return state


def _segment_name(seq: int) -> str:
    return f"{seq:012d}.jsonl"


def _checkpoint_name(seq: int) -> str:
    return f"{seq:012d}.checkpoint.json"


def _listing(store) -> tuple[int | None, list[int]]:
    """(latest checkpoint's sequence number, segment numbers after it), sorted."""
    try:
        names = [posixpath.basename(p) for p in store.fs.ls(store.path(LOG_DIR), detail=False, refresh=True)]
    except FileNotFoundError:
        return None, []
    checkpoints = [int(n.split(".")[0]) for n in names if n.endswith(".checkpoint.json")]
    latest = max(checkpoints) if checkpoints else None
    segments = sorted(int(n.split(".")[0]) for n in names
                      if n.endswith(".jsonl") and not n.startswith(".") and (latest is None or int(n.split(".")[0]) > latest))
    return latest, segments


def read_events(store, state: LogState | None = None):
    """(state, last sequence number) after replaying the log. A reader racing a checkpoint's clean-up
    may find a segment gone: it starts again."""
    for attempt in range(5):
        try:
            latest, segments = _listing(store)
            st = LogState.from_checkpoint(json.loads(store.fs.cat_file(store.path(LOG_DIR, _checkpoint_name(latest))))) \
                if latest is not None else LogState()
            last = latest if latest is not None else -1
            for seq in segments:
                for line in store.fs.cat_file(store.path(LOG_DIR, _segment_name(seq))).decode().splitlines():
                    if line:
                        st.apply(json.loads(line))
                last = seq
            return st, last
        except FileNotFoundError:
            time.sleep(0.2 * (attempt + 1))
    raise RuntimeError(f"the commit log in {store.url}/{LOG_DIR} kept changing while it was read")


def read_state(store) -> LogState:
    return read_events(store)[0]


def shard_events(store) -> list[dict]:
    """The `shard` events still in segments (those before the latest checkpoint are summarised only)."""
    latest, segments = _listing(store)
    out = []
    for seq in segments:
        for line in store.fs.cat_file(store.path(LOG_DIR, _segment_name(seq))).decode().splitlines():
            if line and (ev := json.loads(line))["ev"] == "shard":
                out.append(ev)
    return out


class CommitLog:
    """The driver's appender: events are buffered and written as one segment per flush."""

    def __init__(self, store, state: LogState | None = None, last_seq: int = -1):
        self.store = store
        self.state = state or LogState()
        self.seq = last_seq
        self.buffer: list[dict] = []
        self.since_checkpoint = 0

    @classmethod
    def open(cls, store) -> "CommitLog":
        state, last = read_events(store)
        return cls(store, state, last)

    def append(self, ev: dict) -> None:
        self.state.apply(ev)
        self.buffer.append(ev)

    def flush(self) -> None:
        if not self.buffer:
            return
        self.seq += 1
        data = "".join(json.dumps(ev, sort_keys=True) + "\n" for ev in self.buffer).encode()
        self.store.put_atomic(posixpath.join(LOG_DIR, _segment_name(self.seq)), data)
        self.buffer = []
        self.since_checkpoint += 1
        if self.since_checkpoint >= CHECKPOINT_EVERY:
            self.checkpoint()

    def checkpoint(self) -> None:
        """The state as of the last segment, then the segments it replaces are deleted."""
        self.store.put_atomic(posixpath.join(LOG_DIR, _checkpoint_name(self.seq)),
                              json.dumps(self.state.to_checkpoint()).encode())
        self.since_checkpoint = 0
        names = [p for p in self.store.fs.ls(self.store.path(LOG_DIR), detail=False, refresh=True)
                 if not posixpath.basename(p).startswith(".")]
        old = [p for p in names if int(posixpath.basename(p).split(".")[0]) < self.seq
               or posixpath.basename(p) == _segment_name(self.seq)]
        if old:
            self.store.fs.rm(old)
