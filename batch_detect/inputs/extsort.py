"""Sorting more strings than memory holds: sorted runs spilled to local disk, then merged as a stream.

A manifest of 100M URIs in no particular order (a database dump, `find` output) is planned in sorted order
like any other input without ever being held whole: runs of RUN_SIZE strings are sorted in memory and
written to a temporary folder, then merged (at most FAN_IN files open at once; more runs are merged in
rounds). Memory: about two runs while the runs are cut (one sorted, the next being read), one block per
run while merging. What fits in one run never touches the disk.
"""

from __future__ import annotations

import atexit
import functools
import heapq
import itertools
import marshal
import os
import shutil
import tempfile
from collections import Counter
from typing import Callable, Iterable, Iterator

RUN_SIZE = 500_000  # strings sorted in memory at a time (~75 MB of URIs)
FAN_IN = 128  # runs merged at once (open files)
_BLOCK = 8192  # strings per marshal block in a run file


def sorted_unique(strings: Iterable[str], on_duplicate: Callable[[str], None] = lambda s: None,
                  folder: str | None = None) -> Iterator[str]:
    """`strings` in sorted order (code points), each once; `on_duplicate(s)` is called for each repeat
    dropped. Up to RUN_SIZE strings are sorted in memory; more go to runs in a temporary folder (under
    `folder`, else $TMPDIR) removed when the iterator ends or is closed. Disk trouble (no space, no such
    folder) is a SpillError. Everything is read and sorted before the first string comes out."""
    it = iter(strings)
    first = _sorted_run(list(itertools.islice(it, RUN_SIZE)), on_duplicate)
    chunk = list(itertools.islice(it, RUN_SIZE))
    if not chunk:  # fits in memory: no disk at all
        yield from first
        return
    try:
        work = tempfile.mkdtemp(prefix="batch-detect-sort-", dir=folder)
    except OSError as exc:
        raise SpillError(f"cannot make a temporary folder: {exc}") from None
    # The merge may run on a daemon thread (the listing's), which exit kills without running `finally`.
    cleanup = functools.partial(shutil.rmtree, work, ignore_errors=True)
    atexit.register(cleanup)
    try:
        runs = [_write_run(work, 0, first)]
        del first
        while chunk:
            runs.append(_write_run(work, len(runs), _sorted_run(chunk, on_duplicate)))
            chunk = list(itertools.islice(it, RUN_SIZE))
        serial = itertools.count(len(runs))
        while len(runs) > FAN_IN:  # merge in rounds so that no more than FAN_IN files are open at once
            merged = []
            for i in range(0, len(runs), FAN_IN):
                merged.append(_write_run(work, next(serial), _merge(runs[i:i + FAN_IN], on_duplicate)))
                for path in runs[i:i + FAN_IN]:
                    os.remove(path)  # the disk holds the input about once, not once per round
            runs = merged
        yield from _merge(runs, on_duplicate)
    finally:
        cleanup()
        atexit.unregister(cleanup)


def _sorted_run(chunk: list[str], on_duplicate: Callable[[str], None]) -> list[str]:
    unique = sorted(set(chunk))
    if len(unique) < len(chunk):  # rare: find which repeat, only then
        for s, n in Counter(chunk).items():
            for _ in range(n - 1):
                on_duplicate(s)
    return unique


class SpillError(Exception):
    """The local disk could not hold the runs."""


def _write_run(work: str, number: int, strings: Iterable[str]) -> str:
    path = os.path.join(work, f"run-{number:06d}")
    it = iter(strings)
    try:
        with open(path, "wb") as fh:
            while block := list(itertools.islice(it, _BLOCK)):
                marshal.dump(block, fh)  # any string, line breaks included
    except OSError as exc:
        raise SpillError(f"cannot write {path}: {exc}") from None
    return path


def _read_run(path: str) -> Iterator[str]:
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise SpillError(f"cannot read {path}: {exc}") from None
    with fh:
        while True:
            try:
                block = marshal.load(fh)
            except EOFError:
                return
            except OSError as exc:
                raise SpillError(f"cannot read {path}: {exc}") from None
            yield from block


def _merge(paths: list[str], on_duplicate: Callable[[], None]) -> Iterator[str]:
    previous = None
    for s in heapq.merge(*(_read_run(p) for p in paths)):
        if s == previous:
            on_duplicate(s)
            continue
        previous = s
        yield s
