"""What an output already holds, for incremental runs: the objects its earlier runs planned, as one
stream in URI order, and the merge that picks a new listing's new and changed objects from it.

Each listing pass of a run stored its plan in URI order (a run of plan chunks), so the history is a
k-way merge of those passes, read a batch at a time: the driver's memory is a row group per pass,
never the history, and the cost is one sequential read of the stored plan per run.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from fsspec.core import url_to_fs

from .listing import stat_version
from .plan import Listed

_BATCH = 2048  # rows per pass held at a time while merging


@dataclass
class Selection:
    """What an incremental listing found: counted as it streams."""

    new: int = 0  # never planned before
    changed: int = 0  # planned by an earlier run, with another version
    unchanged: int = 0  # planned by an earlier run with this version (or with none recorded)
    planned_this_run: int = 0  # already in this run's plan (a resumed run)
    retried: int | None = None  # a --retry-failures run: listed images whose latest record was such a failure

    def facts(self) -> dict:
        out = {"new": self.new, "changed": self.changed, "unchanged": self.unchanged,
               "planned_this_run": self.planned_this_run}
        return out if self.retried is None else {**out, "retried": self.retried}


def passes(state) -> list[tuple[int, list[dict]]]:
    """(run, its chunk events) for each listing pass stored in the plan, oldest first."""
    starts = [(r["run"], first) for r in state.runs for first in r.get("passes", [r["first_chunk"]])]
    out = []
    for (run, first), nxt in zip(starts, starts[1:] + [(None, len(state.chunks))]):
        out.append((run, state.chunks[first:nxt[1]]))
    return out


def _rows(store, chunks: list[dict], run: int, n: int) -> Iterator[tuple[str, int, int, str | None]]:
    for batch in store.iter_plan(chunks, batch_size=_BATCH, columns=["uri", "version"]):
        yield from zip(batch.column(0).to_pylist(), itertools.repeat(run), itertools.repeat(n),
                       batch.column(1).to_pylist())


def planned_objects(store, state) -> Iterator[tuple[str, int, int, str | None]]:
    """(uri, run, pass, version) of every object the output has planned, sorted by URI, then by run: an
    object planned again (its content changed) shows last in its latest run."""
    return heapq.merge(*(_rows(store, chunks, run, i) for i, (run, chunks) in enumerate(passes(state)) if chunks))


class _Pass:
    """One listing pass's stored plan, consumed in URI order a batch at a time."""

    def __init__(self, store, chunks: list[dict]):
        self.batches = store.iter_plan(chunks, batch_size=_BATCH, columns=["uri", "version"])
        self.uris: list[str] = []
        self.versions: list = []
        self.i = 0

    def upto(self, hi: str) -> Iterator[tuple[str, str | None]]:
        """The rows not yet consumed whose URI is at most `hi`."""
        while True:
            if self.i >= len(self.uris):
                batch = next(self.batches, None)
                if batch is None:
                    return
                self.uris, self.versions, self.i = batch.column(0).to_pylist(), batch.column(1).to_pylist(), 0
            j = bisect.bisect_right(self.uris, hi, self.i)
            yield from zip(self.uris[self.i:j], self.versions[self.i:j])
            self.i = j
            if j < len(self.uris):
                return


def version_changed(planned: str | None, listed: str | None) -> bool:
    """Another version of a planned object; unknown on either side (a manifest outside incremental runs) is
    not a change."""
    return planned is not None and listed is not None and planned != listed


def changed_since_planned(n: int) -> str:
    """What a plain re-run and `verify --input` say of objects whose bytes changed under the same URI."""
    return (f"{n} planned {'object' if n == 1 else 'objects'} changed since {'it was' if n == 1 else 'they were'} "
            "planned (same URI, another size, ETag or mtime): the output's rows describe the old bytes. Run with "
            "--incremental to process the changed objects again as a new run")


def select_new(store, state, current_run: int, counts: Selection, window: int = 4096):
    """A `plan_input` select: from a URI-sorted listing, the objects no run has planned, and those whose
    version differs from the one their latest run planned. An object whose versions are unknown (a
    manifest read outside an incremental run) counts as unchanged.

    The listing is taken a window at a time; each stored pass gives up its rows up to the window's last
    URI, and a dict of those (later runs overwriting earlier ones) answers the window: memory is one
    window and a batch per pass, whatever the history."""

    def select(listed: Iterator[Listed]) -> Iterator[Listed]:
        stored = [(run, _Pass(store, chunks)) for run, chunks in passes(state) if chunks]
        while batch := list(itertools.islice(listed, window)):
            hi = batch[-1][0]
            latest: dict[str, tuple[int, str | None]] = {}
            for run, rows in stored:  # oldest first: the latest run's entry wins
                for uri, version in rows.upto(hi):
                    latest[uri] = (run, version)
            for uri, version in batch:
                seen = latest.get(uri)
                if seen is None:
                    counts.new += 1
                    yield uri, version
                elif seen[0] == current_run:
                    counts.planned_this_run += 1
                elif version_changed(seen[1], version):
                    counts.changed += 1
                    yield uri, version
                else:
                    counts.unchanged += 1

    return select


def select_failed(failing: Callable[[], Iterable[tuple[str, str]]], counts: Selection):
    """A `plan_input` select for --retry-failures: the listed images among `failing()`'s (uri, kind) pairs,
    which come in URI order like the listing, so the two are merged rather than one held in memory (the
    rest count as unchanged). An image deleted since is not listed, so not retried."""
    counts.retried = 0

    def select(listed: Iterator[Listed]) -> Iterator[Listed]:
        pending = iter(failing())
        next_failed = next(pending, None)
        for uri, version in listed:
            while next_failed is not None and next_failed[0] < uri:
                next_failed = next(pending, None)
            if next_failed is not None and next_failed[0] == uri:
                counts.retried += 1
                yield uri, version
            else:
                counts.unchanged += 1

    return select


def with_versions(listed: Iterator[Listed], storage_options: dict | None, workers: int = 16,
                  window: int = 512) -> Iterator[Listed]:
    """Fill in the versions a manifest listing lacks, stating the objects `workers` at a time, in order."""
    fss: dict[str, tuple] = {}

    def stat(item: Listed) -> Listed:
        uri = item[0]
        scheme = uri.split("://", 1)[0] if "://" in uri else "file"
        if scheme not in fss:
            fss[scheme] = url_to_fs(uri, **(storage_options or {}))[0]
        fs = fss[scheme]
        return uri, stat_version(fs, fs._strip_protocol(uri))

    with ThreadPoolExecutor(workers, thread_name_prefix="stat") as pool:
        while batch := list(itertools.islice(listed, window)):
            missing = [i for i, (_, version) in enumerate(batch) if version is None]
            for i, item in zip(missing, pool.map(stat, [batch[i] for i in missing])):
                batch[i] = item
            yield from batch
