"""`batch-detect verify`: prove an output is whole. Every planned image is in exactly one of `images`
or `failures`, every shard is committed, schemas are the declared ones, detections belong to processed
images; with --input, the plan still matches what the input lists. pyarrow only, no query engine."""

from __future__ import annotations

import posixpath
from collections import Counter
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from .errors import OutputError
from .listing import plan_input
from .schema import TABLES
from .sink import MANIFEST, PLAN, OutputStore


@dataclass
class Report:
    ok: bool = True
    facts: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        self.ok = False
        self.problems.append(message)


def _examples(items, n: int = 5) -> str:
    items = sorted(items)
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _read_column(store: OutputStore, table: str, columns: list[str], report: Report) -> dict[str, list]:
    out: dict[str, list] = {c: [] for c in columns}
    schema = TABLES[table]
    for path in sorted(store.fs.glob(store.path(table, "*.parquet"))):
        with store.fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            if not pf.schema_arrow.equals(schema, check_metadata=False):
                report.fail(f"{table}/{posixpath.basename(path)} has schema {pf.schema_arrow}, expected {schema}")
                continue
            t = pf.read(columns=columns)
        for c in columns:
            out[c].extend(t.column(c).to_pylist())
    return out


def verify(output: str, input_url: str | None = None, storage_options: dict | None = None) -> Report:
    store = OutputStore(output, storage_options)
    report = Report()
    if not store.exists(MANIFEST):
        raise OutputError(f"{output!r} holds no {MANIFEST}: not a batch-detect output")
    manifest = store.read_json(MANIFEST)
    report.facts["status"] = manifest.get("status")
    if not store.exists(PLAN):
        report.fail(f"{PLAN} is missing: the plan cannot be checked")
        return report
    with store.fs.open(store.path(PLAN), "rb") as fh:
        plan = pq.read_table(fh).to_pydict()
    planned = Counter(plan["uri"])
    shards = set(plan["shard_id"])
    report.facts.update(planned_images=len(plan["uri"]), planned_shards=len(shards))
    dup_plan = [u for u, n in planned.items() if n > 1]
    if dup_plan:
        report.fail(f"the plan lists {len(dup_plan)} images twice: {_examples(dup_plan)}")

    committed = set(store.committed_shards())
    report.facts["committed_shards"] = len(committed & shards)
    if shards - committed:
        report.fail(f"{len(shards - committed)} of {len(shards)} shards are not committed: "
                    f"{_examples(shards - committed)} (re-run the same command, or with --resume, to finish)")
    present = {t: {posixpath.basename(p)[: -len(".parquet")] for p in store.fs.glob(store.path(t, "*.parquet"))}
               for t in TABLES}
    for table, found in present.items():
        lost = (committed & shards) - found
        if lost:
            report.fail(f"{len(lost)} committed shards have no {table}/ file: {_examples(lost)}")
    stray = {posixpath.basename(p)[: -len(".parquet")] for t in TABLES
             for p in store.fs.glob(store.path(t, "*.parquet"))} - shards
    if stray:
        report.fail(f"files for shards not in the plan: {_examples(stray)}")

    images = _read_column(store, "images", ["uri", "shard_id", "num_detections"], report)
    failures = _read_column(store, "failures", ["uri", "shard_id", "stage", "error_type"], report)
    detections = _read_column(store, "detections", ["uri"], report)
    done = Counter(images["uri"]) + Counter(failures["uri"])
    report.facts.update(images=len(images["uri"]), failures=len(failures["uri"]),
                        detections=len(detections["uri"]))
    twice = [u for u, n in done.items() if n > 1]
    if manifest.get("plan", {}).get("form") == "tar":
        # The plan lists tars; their members are found while streaming. Each row must come from its
        # shard's tar, and each tar must have left at least one row (an empty tar is a failure record).
        tar_of = dict(zip(plan["shard_id"], plan["uri"]))
        rows = list(zip(images["uri"] + failures["uri"], images["shard_id"] + failures["shard_id"]))
        extra = [u for u, sid in rows if sid not in tar_of or not (u == tar_of[sid] or u.startswith(tar_of[sid] + "#"))]
        seen = {sid for _, sid in rows}
        missing = [tar_of[sid] for sid in committed & shards if sid not in seen]
    else:
        missing = [u for u in planned if u not in done]
        extra = [u for u in done if u not in planned]
    if twice:
        report.fail(f"{len(twice)} images appear more than once in images/failures: {_examples(twice)}")
    if missing:
        report.fail(f"{len(missing)} planned images are in neither images nor failures: {_examples(missing)}")
    if extra:
        report.fail(f"{len(extra)} images in the output were never planned: {_examples(extra)}")
    per_image = Counter(detections["uri"])
    ok_images = set(images["uri"])
    orphans = [u for u in per_image if u not in ok_images]
    if orphans:
        report.fail(f"detections for {len(orphans)} images that are not in images: {_examples(orphans)}")
    wrong = [u for u, n in zip(images["uri"], images["num_detections"]) if per_image.get(u, 0) != n]
    if wrong:
        report.fail(f"num_detections disagrees with the detections table for {len(wrong)} images: "
                    f"{_examples(wrong)}")
    report.facts["failure_types"] = dict(Counter(f"{s}/{e}" for s, e in zip(failures["stage"],
                                                                              failures["error_type"])))
    if input_url is not None:
        cfg = manifest.get("config", {})
        again = plan_input(input_url, form=manifest.get("plan", {}).get("form") or "files",
                           extensions=tuple(cfg.get("extensions", ())), shard_size=cfg.get("shard_size", 64),
                           image_column=cfg.get("image_column"), id_column=cfg.get("id_column"),
                           storage_options=storage_options)
        now = {u for shard in again.shards for u in shard.uris}
        new, gone = now - set(planned), set(planned) - now
        report.facts["input_listed"] = len(now)
        if new:
            report.fail(f"{len(new)} images in the input are not in the plan: {_examples(new)}")
        if gone:
            report.fail(f"{len(gone)} planned images are no longer in the input: {_examples(gone)}")
    if report.ok and manifest.get("status") != "complete":
        report.fail(f"every shard is committed but the manifest says status {manifest.get('status')!r}")
    return report
