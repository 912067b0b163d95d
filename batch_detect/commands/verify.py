"""`batch-detect verify`: prove an output is whole. Every planned image is in exactly one of `images` or
`failures`, every shard is committed and compacted into a part, every file readers' globs see is a part
the commit log records, schemas are the declared ones, detections belong to processed images; with
--input, the plan still matches what the input lists.

Streamed: the plan is read chunk by chunk and the parts one at a time, in shard order, so memory is
bounded by one part (about 100,000 images), not by the output. pyarrow only, no query engine."""

from __future__ import annotations

import itertools
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import pyarrow.parquet as pq

from ..output.commitlog import read_state
from ..errors import OutputError
from ..inputs.history import changed_since_planned, planned_objects, version_changed
from ..inputs.plan import plan_input, shard_index
from ..output.schema import TABLES
from ..output.sink import LAYOUT, MANIFEST, OutputStore, part_name


@dataclass
class Report:
    ok: bool = True
    facts: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        self.ok = False
        self.problems.append(message)


class _Examples:
    """A count and the first few examples of one kind of problem."""

    def __init__(self) -> None:
        self.n, self.items = 0, []

    def add(self, item, times: int = 1) -> None:
        self.n += times
        if len(self.items) < 5:
            self.items.append(str(item))

    def __bool__(self) -> bool:
        return self.n > 0

    def __str__(self) -> str:
        more = f" (+{self.n - len(self.items)} more)" if self.n > len(self.items) else ""
        return ", ".join(self.items) + more


def _plan_groups(store: OutputStore, chunks: list[dict], report: Report) -> Iterator[tuple[int, list[str]]]:
    """(shard index, planned uris) in shard order, from the stored plan chunks."""
    current, uris = None, []
    try:
        for batch in store.iter_plan(chunks):
            for sid, uri in zip(batch.column("shard_id").to_pylist(), batch.column("uri").to_pylist()):
                k = shard_index(sid)
                if k != current:
                    if current is not None:
                        yield current, uris
                    current, uris = k, []
                uris.append(uri)
    except FileNotFoundError as exc:
        report.fail(f"a plan chunk file is missing: {exc}")
    if current is not None:
        yield current, uris


def _read_part(store: OutputStore, table: str, part: int, columns: list[str], report: Report) -> dict | None:
    path = store.path(table, part_name(part))
    try:
        with store.fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            if not pf.schema_arrow.equals(TABLES[table], check_metadata=False):
                report.fail(f"{table}/{part_name(part)} has schema {pf.schema_arrow}, expected {TABLES[table]}")
                return None
            return pf.read(columns=columns).to_pydict()
    except FileNotFoundError:
        return None


def verify(output: str, input_url: str | None = None, storage_options: dict | None = None) -> Report:
    store = OutputStore(output, storage_options)
    report = Report()
    if not store.exists(MANIFEST):
        raise OutputError(f"{output!r} holds no {MANIFEST}: not a batch-detect output")
    manifest = store.read_json(MANIFEST)
    report.facts["status"] = manifest.get("status")
    if manifest.get("layout", 1) != LAYOUT:
        report.fail(f"this output was written by an earlier batch_detect (output layout {manifest.get('layout', 1)}, "
                    f"this one reads {LAYOUT}): verify it with that version")
        return report
    state = read_state(store)
    form = manifest.get("plan", {}).get("form", "files")
    if state.listed is None:
        report.fail("the input was never listed to the end: the plan is incomplete (re-run the same command, "
                    "or with --resume, to finish)")
    num_shards = state.planned_end
    report.facts.update(planned_images=state.planned_items if state.listed else None, planned_shards=num_shards,
                        committed_shards=state.num_committed, parts=len(state.parts), runs=len(state.runs))
    missing = num_shards - state.committed[:num_shards].count(1)
    if missing:
        examples = ", ".join(f"shard-{k:06d}" for k in state.uncommitted(num_shards))
        report.fail(f"{missing} of {num_shards} shards are not committed: {examples} (re-run the same command, or "
                    "with --resume, to finish)")

    _check_files(store, state, report)
    counts = _check_rows(store, state, form, report)
    report.facts.update(counts)
    if input_url is not None:
        _check_input(store, state, manifest, input_url, storage_options, report)
    if report.ok and manifest.get("status") != "complete":
        report.fail(f"every shard is committed but the manifest says status {manifest.get('status')!r}")
    return report


def _check_files(store: OutputStore, state, report: Report) -> None:
    """Each table holds exactly the parts the log records as done: anything else would be read by the
    readers' globs too."""
    done = {part_name(p["part"]) for p in state.parts if p["done"]}
    not_done = [p["part"] for p in state.parts if not p["done"]]
    if not_done:
        report.fail(f"{len(not_done)} parts were started but not recorded as written: {not_done[:5]} (re-run "
                    "the same command to finish them)")
    for table in TABLES:
        present = {posixpath.basename(p) for p in store.part_files(table)}
        missing, stray = sorted(done - present), sorted(present - done)
        if missing:
            report.fail(f"{len(missing)} committed parts have no {table}/ file: {', '.join(missing[:5])}")
        if stray:
            report.fail(f"{len(stray)} files in {table}/ are not parts recorded in the commit log; readers' globs "
                        f"would count their rows more than once or wrongly: {', '.join(stray[:5])}")
    compacted = sum(p["end"] - p["first"] for p in state.parts)
    if state.num_committed > compacted:
        report.fail(f"{state.num_committed - compacted} committed shards are not yet in a part (still in "
                    "_staging/, invisible to readers): re-run the same command to finish")


def _check_rows(store: OutputStore, state, form: str, report: Report) -> dict:
    missing, extra, twice, orphans, wrong, wrong_run = (_Examples() for _ in range(6))
    totals = {"images": 0, "failures": 0, "detections": 0}
    per_run: Counter = Counter()
    failure_types: Counter = Counter()
    plan = _plan_groups(store, state.chunks, report)
    pending = next(plan, None)
    for p in state.parts:
        if not p["done"]:
            continue
        images = _read_part(store, "images", p["part"], ["uri", "shard_id", "run_id", "num_detections"], report)
        failures = _read_part(store, "failures", p["part"], ["uri", "shard_id", "run_id", "stage", "error_type"],
                              report)
        dets = _read_part(store, "detections", p["part"], ["uri", "shard_id", "run_id"], report)
        if images is None or failures is None or dets is None:
            continue
        totals["images"] += len(images["uri"])
        totals["failures"] += len(failures["uri"])
        totals["detections"] += len(dets["uri"])
        failure_types.update(f"{s}/{e}" for s, e in zip(failures["stage"], failures["error_type"]))
        rows: dict[int, list[str]] = {}
        for uri, sid in zip(images["uri"] + failures["uri"], images["shard_id"] + failures["shard_id"]):
            rows.setdefault(shard_index(sid), []).append(uri)
        # Each row carries the run that planned its shard: the history readers' "current rows" rely on it.
        for table in (images, failures, dets):
            for uri, sid, run in zip(table["uri"], table["shard_id"], table["run_id"]):
                if run != state.run_of(shard_index(sid)):
                    wrong_run.add(f"{uri} (run_id {run}, its shard belongs to run {state.run_of(shard_index(sid))})")
        per_run.update(images["run_id"] + failures["run_id"])
        for k in sorted(rows):
            if not p["first"] <= k < p["end"]:
                extra.add(f"{rows[k][0]} (shard {k} in part {p['part']})", len(rows[k]))
        while pending is not None and pending[0] < p["end"]:
            k, planned = pending
            if k >= p["first"]:
                _compare_shard(form, planned, rows.get(k, []), missing, extra, twice)
            pending = next(plan, None)
        per_image = Counter(dets["uri"])
        ok = set(images["uri"])
        for u in per_image:
            if u not in ok:
                orphans.add(u)
        for u, n in zip(images["uri"], images["num_detections"]):
            if per_image.get(u, 0) != n:
                wrong.add(u)
    if twice:
        report.fail(f"{twice.n} images appear more than once in images/failures: {twice}")
    if missing:
        report.fail(f"{missing.n} planned images are in neither images nor failures: {missing}")
    if extra:
        report.fail(f"{extra.n} images in the output were never planned: {extra}")
    if orphans:
        report.fail(f"detections for {orphans.n} images that are not in images: {orphans}")
    if wrong:
        report.fail(f"num_detections disagrees with the detections table for {wrong.n} images: {wrong}")
    if wrong_run:
        report.fail(f"{wrong_run.n} rows carry another run_id than the run that planned them: {wrong_run}")
    return {**totals, "failure_types": dict(failure_types), "rows_per_run": dict(sorted(per_run.items()))}


def _compare_shard(form: str, planned: list[str], got: list[str], missing, extra, twice) -> None:
    if form == "tar":
        # The plan lists the tar; its members are found while streaming. Each row must come from it, and
        # the tar must have left at least one row (an empty tar is a failure record).
        tar = planned[0]
        for u in got:
            if not (u == tar or u.startswith(tar + "#")):
                extra.add(u)
        if not got:
            missing.add(tar)
        return
    want, have = Counter(planned), Counter(got)
    for u, n in have.items():
        if u not in want:
            extra.add(u, n)
        elif n > want[u]:
            twice.add(u)
    for u in want:
        if u not in have:
            missing.add(u)


def _check_input(store: OutputStore, state, manifest: dict, input_url: str, storage_options, report: Report) -> None:
    """The input listed again, compared with the stored plan as two sorted streams (a merge: no set of
    either is held)."""
    cfg = manifest.get("config", {})
    form = manifest.get("plan", {}).get("form") or "files"
    again = plan_input(input_url, form=form, extensions=tuple(cfg.get("extensions", ())),
                       shard_size=cfg.get("shard_size", 64), image_column=cfg.get("image_column"),
                       id_column=cfg.get("id_column"), storage_options=storage_options,
                       inventory_prefix=cfg.get("inventory_prefix"))
    new, gone, changed = _Examples(), _Examples(), _Examples()
    listed = 0
    if form == "parquet":  # ids follow row order, not sorted order: compared position by position
        now = (u for shard in again.shards for u in shard.uris)
        stored = (u for _, uris in _plan_groups(store, state.chunks, report) for u in uris)
        for a, b in itertools.zip_longest(stored, now):
            listed += b is not None
            if a != b and b is not None:
                new.add(b)
            if a != b and a is not None:
                gone.add(a)
        _report_input(report, listed, new, gone, changed)
        return
    now = (pair for shard in again.shards for pair in zip(shard.uris, shard.versions or itertools.repeat(None)))
    # every run's plan merged in URI order, each object once at its latest version (a changed one was planned again)
    stored = ((uri, list(rows)[-1][3]) for uri, rows in itertools.groupby(planned_objects(store, state),
                                                                        key=lambda row: row[0]))
    a, b = next(stored, None), next(now, None)
    while a is not None or b is not None:
        if b is not None and (a is None or b[0] < a[0]):
            new.add(b[0])
            listed += 1
            b = next(now, None)
        elif a is not None and (b is None or a[0] < b[0]):
            gone.add(a[0])
            a = next(stored, None)
        else:
            listed += 1
            if version_changed(a[1], b[1]):
                changed.add(b[0])
            a, b = next(stored, None), next(now, None)
    _report_input(report, listed, new, gone, changed)


def _report_input(report: Report, listed: int, new, gone, changed) -> None:
    report.facts["input_listed"] = listed
    report.facts["input_changed"] = changed.n
    if new:
        report.fail(f"{new.n} images in the input are not in the plan: {new}")
    if gone:
        report.fail(f"{gone.n} planned images are no longer in the input: {gone}")
    if changed:
        report.fail(f"{changed_since_planned(changed.n)}: {changed}")
