"""Which run an invocation is, and its listing thread.

`Planning` says how this invocation's plan relates to what the output holds (a new output, a plain
resume, the next incremental run, or an unfinished one continued); `PlanFeed` lists the input on a
thread of its own, checks each plan chunk against the stored plan (a resume) or stores it (new work),
and hands chunks to the dispatch loop through a short queue: listing runs ahead of dispatch by a couple
of chunks, never by the whole input.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from dataclasses import dataclass, field
from typing import Iterator

from ..output.commitlog import LogState
from ..config import RunConfig
from ..errors import OutputError
from ..inputs.history import Selection, select_failed, select_new, version_changed, with_versions
from ..inputs.plan import Chunk, PlanStream, chunked, stored_shards
from ..output.records import iter_latest_failures
from ..output.sink import OutputStore


@dataclass
class Planning:
    """Which run this invocation is and how its plan relates to what the output holds.

    mode: `fresh` (a new output: run 1), `resume` (a plain re-run: the listing must equal the stored
    plan), `new-run` (incremental, after a finished run: the next run, of what is new), `continue`
    (incremental, the last run unfinished: its stored shards are finished and the listing is compared
    with every plan stored so far, its own included)."""

    mode: str
    run: int
    first_shard: int = 0
    first_chunk: int = 0
    select: object = None  # the plan_input select of an incremental listing
    selection: Selection | None = None
    pending: list = field(default_factory=list)  # chunk events of this run with shards left to do


def planning_for(config: RunConfig, store: OutputStore, previous: dict | None, state) -> Planning:
    so = config.storage_options
    if previous is None:
        if not config.incremental:
            return Planning("fresh", 1)
        # An incremental run 1 records versions even for a manifest's URIs: run 2 compares them.
        selection = Selection()
        select_from = select_new(store, LogState(), 1, selection)
        return Planning("fresh", 1, select=lambda listed: select_from(with_versions(listed, so)), selection=selection)
    runs = state.runs
    last = runs[-1]["run"] if runs else 1
    if config.retry_failures is not None:
        return _retry_planning(config, store, previous, state, last)
    if not config.incremental:
        if len(runs) > 1 or any(len(r.get("passes", ())) > 1 for r in runs):
            raise OutputError(
                f"output {config.output!r} holds {len(runs)} incremental runs: pass --incremental to process what "
                "is new in the input (a plain re-run compares the whole listing with the first run's plan)")
        return Planning("resume", last)
    closed = state.finished and previous.get("status") == "complete" and previous.get("run_id") == last
    run = last + 1 if closed else last
    selection = Selection()
    select_from = select_new(store, state, run, selection)
    pending = [] if closed else [c for c in state.chunks if c["first_shard"] >= first_shard_of(state, run)
                                 and state.committed[c["first_shard"]:c["first_shard"] + c["shards"]].count(1)
                                 < c["shards"]]
    return Planning("new-run" if closed else "continue", run, first_shard=state.planned_end,
                    first_chunk=len(state.chunks), select=lambda listed: select_from(with_versions(listed, so)),
                    selection=selection, pending=pending)


def _retry_planning(config: RunConfig, store: OutputStore, previous: dict | None, state, last: int) -> Planning:
    """--retry-failures: the next run, of the listed images whose latest record is a failure of that kind."""
    if previous is None:
        raise OutputError(f"--retry-failures: output {config.output!r} holds no run whose failures could be retried")
    closed = state.finished and previous.get("status") == "complete" and previous.get("run_id") == last
    if not closed and state.runs[-1].get("retry") is None:
        raise OutputError(f"--retry-failures: the last run in {config.output!r} is unfinished: finish it first "
                          "(re-run the command that started it), then retry its failures")
    run = last + 1 if closed else last
    want = None if config.retry_failures == "all" else config.retry_failures
    pending, mine = [], []
    if not closed:  # an interrupted retry run, resumed: its own plan first, then what it had not yet listed
        mine = [c for c in state.chunks if c["first_shard"] >= first_shard_of(state, run)]
        pending = [c for c in mine if state.committed[c["first_shard"]:c["first_shard"] + c["shards"]].count(1)
                   < c["shards"]]

    def failing():  # read when the listing starts, on its thread: sorted, never held whole
        planned = (u for batch in store.iter_plan(mine, columns=["uri"]) for u in batch.column(0).to_pylist())
        return iter_latest_failures(store, want, planned if mine else ())

    selection = Selection()
    so = config.storage_options
    return Planning("new-run" if closed else "continue", run, first_shard=state.planned_end,
                    first_chunk=len(state.chunks), select=lambda listed: with_versions(
                        select_failed(failing, selection)(listed), so), selection=selection, pending=pending)


def first_shard_of(state, run: int) -> int:
    return next((r["first_shard"] for r in state.runs if r["run"] == run), 0)


_END = object()


class PlanFeed:
    """The listing thread: plan chunks are checked against the stored plan (a resumed run) or written to
    it (a new one), then queued for dispatch. The queue is short: listing runs ahead of dispatch by a
    couple of chunks, never by the whole input. A resumed incremental run first re-reads its own stored
    chunks that still have shards to do (`pending`), then lists what is new."""

    def __init__(self, plan: PlanStream, store: OutputStore, planning: Planning, stored_chunks: list[dict],
                 stored_listed: dict | None, depth: int = 2):
        self.plan, self.store, self.planning = plan, store, planning
        self.stored, self.stored_listed = list(stored_chunks), stored_listed
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.facts: dict = {}
        self.changed = 0  # listed objects whose version differs from the stored plan's (a plain resume)
        self.thread = threading.Thread(target=self._run, name="plan-feed", daemon=True)

    def start(self) -> "PlanFeed":
        self.thread.start()
        return self

    def _put(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        try:
            for ev in self.planning.pending:
                shards = list(stored_shards(self.store.iter_plan([ev]), self.plan.form, self.planning.run))
                self._put(Chunk(ev["chunk"], shards, ev["sha"]))
            h = hashlib.sha256()
            shards = items = chunks = 0
            for chunk in chunked(self.plan.shards, self.planning.first_chunk):
                if self.stop.is_set():
                    return
                self._check_or_write(chunk)
                h.update(chunk.sha.encode())
                shards, items, chunks = shards + len(chunk.shards), items + chunk.items, chunks + 1
                self._put(chunk)
            facts = {"run": self.planning.run, "chunks": chunks, "shards": shards, "items": items,
                     "fingerprint": h.hexdigest(), "form": self.plan.form, "skipped": self.plan.stats.skipped,
                     "skipped_examples": self.plan.stats.skipped_examples, "duplicates": self.plan.stats.duplicates,
                     "sorted_on_disk": self.plan.stats.sorted_on_disk, "old_versions": self.plan.stats.old_versions,
                     **self.plan.stats.throughput()}
            facts["listed"] = items
            if self.planning.selection is not None:
                facts.update(self.planning.selection.facts())
                facts["listed"] = sum(self.planning.selection.facts().values())
            if self.stored_listed is not None and self.stored_listed["fingerprint"] != facts["fingerprint"]:
                raise self._changed(f"the listing now has {shards} shards, the stored plan "
                                    f"{self.stored_listed['shards']}")
            self._put((_END, facts))
        except BaseException as exc:  # handed to the dispatch thread, which raises it
            self._put((_END, exc))

    def _check_or_write(self, chunk: Chunk) -> None:
        if chunk.index < len(self.stored):
            ev = self.stored[chunk.index]
            if ev["sha"] != chunk.sha:
                raise self._changed(f"shards {ev['first_shard']}-{ev['first_shard'] + ev['shards'] - 1} differ")
            self.changed += self._changed_versions(ev, chunk)
        elif self.stored_listed is not None:
            raise self._changed(f"it lists more than the stored plan's {self.stored_listed['shards']} shards")
        else:
            self.store.write_chunk(chunk.index, chunk.shards)

    def _changed_versions(self, ev: dict, chunk: Chunk) -> int:
        """Objects of an equal chunk (same URIs: its fingerprint leaves versions out) listed at another version
        than planned: new bytes under an old name, which a plain resume does not process again."""
        listed = [v for shard in chunk.shards for v in (shard.versions or ())]
        if not any(v is not None for v in listed):
            return 0  # a manifest's URIs carry no versions outside incremental runs
        planned = [v for batch in self.store.iter_plan([ev], columns=["version"]) for v in batch.column(0).to_pylist()]
        return sum(map(version_changed, planned, listed))

    def _changed(self, detail: str) -> OutputError:
        return OutputError(
            f"output {self.store.url!r} holds a run made with a different input listing ({detail}): resuming "
            "would mix results. Pass --incremental to add what is new in the input to it as a new run, choose a "
            "new --output, or pass --overwrite to replace it")

    def chunks(self) -> Iterator:
        """Chunks as the listing thread stores them, or None when none is ready yet (the dispatch loop
        must not block on a slow listing); the listing's facts in `self.facts` at the end."""
        while True:
            try:
                item = self.queue.get(timeout=0.05)
            except queue.Empty:
                yield None
                continue
            if isinstance(item, tuple) and item[0] is _END:
                if isinstance(item[1], BaseException):
                    raise item[1]
                self.facts = item[1]
                return
            yield item

    def close(self) -> None:
        self.stop.set()


def check_listing(plan: PlanStream, store: OutputStore, planning: Planning, state) -> int:
    """The listing against the stored plan, chunk by chunk, as a resumed run's listing thread checks it
    (raises the same refusal), here in the caller's thread: nothing is queued, nothing written. Returns how
    many objects changed since they were planned."""
    feed = PlanFeed(plan, store, planning, state.chunks, state.listed)
    h = hashlib.sha256()
    shards = 0
    for chunk in chunked(plan.shards, 0):
        feed._check_or_write(chunk)
        h.update(chunk.sha.encode())
        shards += len(chunk.shards)
    if h.hexdigest() != state.listed["fingerprint"]:
        raise feed._changed(f"the listing now has {shards} shards, the stored plan {state.listed['shards']}")
    return feed.changed


