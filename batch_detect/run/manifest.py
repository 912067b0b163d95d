"""The manifest's facts: what `_manifest.json` says of an output and each run in it (identity, plan,
counts, where the run ran, how its workers were sized and what each image cost them). Pure functions of
the commit log's state and what the run measured; the driver writes the result."""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from dataclasses import dataclass, field

from .. import __version__
from ..config import RunConfig
from ..errors import StoreUnavailable, count
from ..outage import OUTAGE
from ..inputs.history import changed_since_planned
from ..output.sink import LAYOUT, PLAN_DIR
from .feed import Planning, first_shard_of
from .prepare import Prepared
from .readahead import BYTES_BUDGET as READ_BYTES_BUDGET, MAX_READS, MIB
from .worker import PREFETCH, decode_threads

_SUMMED = ("images", "failures", "read_decode_s", "infer_s", "read_s", "decode_s", "stall_s", "read_bytes",
           "store_retries")
_MOST = ("images_ahead", "decode_depth", "peak_rss_mb")  # the most any worker had


@dataclass
class Measured:
    """What this invocation measured as shards committed: per-image costs summed over the shards (or the
    most any worker had), and when the first shard and the first part were done."""

    costs: dict = field(default_factory=dict)
    first_shard_s: float | None = None
    first_part_s: float | None = None

    def add(self, summary: dict) -> None:
        for k in _SUMMED:
            self.costs[k] = self.costs.get(k, 0) + summary.get(k, 0)
        for k in _MOST:
            if k in summary:
                self.costs[k] = max(self.costs.get(k, 0), summary[k])


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def start(config: RunConfig, ready: Prepared) -> dict:
    """The manifest a run writes as it starts (status running), carrying over the runs before it."""
    planning, previous = ready.planning, ready.previous
    dynamic = ready.info.input.tensor.shape_signature[0] == -1
    runs_before = [r for r in (previous or {}).get("runs", []) if r["run_id"] != planning.run]
    this_run = next((r for r in (previous or {}).get("runs", []) if r["run_id"] == planning.run), None)
    return {
        "layout": LAYOUT,
        "run_id": planning.run,
        "output_id": previous["output_id"] if previous else uuid.uuid4().hex,  # new on --overwrite
        "resumes": previous.get("resumes", 0) + 1 if previous and planning.mode in ("resume", "continue") else 0,
        "tool": {"name": "batch_detect", "version": __version__},
        "status": "running",
        "started_at": this_run["started_at"] if this_run else now(),
        "identity": ready.identity,
        "model": {"uri": config.model, "sha256": ready.identity["model_sha256"], "backend": ready.backend.name,
                  "backend_version": ready.backend.version, **ready.info.describe(),
                  "batch": config.batch_size if dynamic else 1, "batch_dimension": "dynamic" if dynamic else "fixed"},
        "labels": ready.labels,
        "labels_source": ready.labels_source,
        "config": config.redacted(),
        "plan": {"form": ready.plan.form, "shard_size": config.shard_size, "dir": PLAN_DIR + "/"},
        "runs": runs_before,
    }


def stopped(manifest: dict, state, config: RunConfig, planning: Planning, done_before: int, labels,
            exc: BaseException) -> None:
    """The manifest of a run that ended early: interrupted (Ctrl-C, SIGTERM) or failed, with what it committed."""
    # A store outage past --store-timeout interrupts the run as Ctrl-C does: nothing is wrong with the
    # job, and the same command goes on from what is committed.
    interrupted = isinstance(exc, (KeyboardInterrupt, StoreUnavailable))
    status = "interrupted" if interrupted else "failed"
    manifest.update(status=status, finished_at=now(),
                    error=None if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"[:2000],
                    counts=counts(state, done_before, labels))
    manifest["runs"] = manifest["runs"] + [run_entry(manifest, state, planning.run, status, config)]


def finish(manifest: dict, state, config: RunConfig, ready: Prepared, *, run_before: dict, done_before: int,
           cluster: dict, measured: Measured, ray_start_s: float | None, run_s: float, total_s: float,
           changed: int) -> None:
    """The manifest of a run that went through its plan: complete when every shard is committed and in a part."""
    run_no, form = ready.planning.run, ready.plan.form
    listed, end = state.listed, state.planned_end
    complete = state.num_committed == end and all(p["done"] for p in state.parts) and state.compacted_end == end
    run_after = state.run_totals.get(run_no, {})
    processed_now = sum(run_after.get(k, 0) - run_before.get(k, 0) for k in ("images", "failures"))
    fingerprint = plan_fingerprint(state)
    items = state.planned_items
    manifest.update(
        status="complete" if complete else "incomplete",
        finished_at=now(),
        identity={**ready.identity, "plan_fingerprint": fingerprint},
        plan={**manifest["plan"], "num_shards": end, "chunks": len(state.chunks),
              "num_images": None if form == "tar" else items,
              "num_tars": items if form == "tar" else None, "fingerprint": fingerprint},
        input={"form": form, "listed": listed["listed"], "skipped_non_image": listed["skipped"],
               "manifest_duplicates": listed["duplicates"], "skipped_examples": listed["skipped_examples"],
               "manifest_sorted_on_disk": listed.get("sorted_on_disk", False),
               "inventory_old_versions": listed.get("old_versions", 0),
               # keys/s over the time dispatch waited on the listing, not the time dispatch held it back
               **{k: listed.get(k) for k in ("keys_listed", "listing_s", "keys_per_s", "listing_processes")}},
        output={"parts": len(state.parts), "part_rows": [p.get("rows") for p in state.parts][-3:]},
        cluster=cluster,
        counts=counts(state, done_before, ready.labels),
        timings={**ready.timings, "ray_start_s": ray_start_s, "run_s": run_s,
                 "first_shard_committed_s": measured.first_shard_s, "first_part_written_s": measured.first_part_s,
                 "total_s": total_s, "images_per_s": processed_now / run_s if run_s > 0 and processed_now else None},
    )
    manifest["runs"] = manifest["runs"] + [run_entry(manifest, state, run_no, manifest["status"], config)]
    manifest["sizing"] = sizing(config, manifest["cluster"], measured.costs, run_s)
    manifest["store"] = store_facts(config, measured)
    manifest["warnings"] = (ready.label_warnings + warnings(manifest, ready.labels)
                            + ([changed_since_planned(changed)] if changed else []))


def warnings(manifest: dict, labels: list | None) -> list[str]:
    out = []
    ids = manifest["counts"]["unlabelled_class_ids"]
    if ids:
        n = sum(ids.values())
        which = ", ".join(f"{k}: {v}" for k, v in sorted(ids.items(), key=lambda kv: int(kv[0])))
        out.append(f"{n} detections have class ids the {len(labels)} labels do not name (class id: detections "
                   f"{which}); their label is null. Check that the labels ({manifest['labels_source']}) "
                   "belong to this model")
    return out


def what_stays(state) -> str:
    """What an interrupted run leaves, exactly: committed shards are kept, but readers see only those in parts."""
    committed, images = state.num_committed, state.totals["images"] + state.totals["failures"]
    readable = sum(p["end"] - p["first"] for p in state.parts if p["done"])
    text = f"{count(committed, 'shard')} ({count(images, 'image')}) committed"
    if readable >= committed:
        return text + ", all of them in part files that queries read now"
    return (text + f"; {readable} of them in part files that queries read now, the other {committed - readable} "
            "become readable when the same command is re-run (it compacts them before going on)")


def all_compacted(state) -> bool:
    """Every run listed, every planned shard committed and in a part that is written."""
    return state.finished and all(p["done"] for p in state.parts) and state.compacted_end == state.planned_end


def plan_fingerprint(state) -> str | None:
    """The whole plan's fingerprint: one run's listing fingerprint, or for several runs a hash of theirs."""
    listed = [r.get("listed") for r in state.runs] or [state.listed]
    if any(f is None for f in listed):
        return None
    if len(listed) == 1:
        return listed[0]["fingerprint"]
    return hashlib.sha256("".join(c["sha"] for c in state.chunks).encode()).hexdigest()


def run_entry(manifest: dict, state, run: int, status: str, config: RunConfig) -> dict:
    """The manifest's record of one run: when, what its listing found, what it planned and processed."""
    facts = next((r.get("listed") or {} for r in state.runs if r["run"] == run), {}) or {}
    first = first_shard_of(state, run)
    nxt = next((r["first_shard"] for r in state.runs if r["run"] > run), state.planned_end)
    totals = state.run_totals.get(run, {})
    return {"run_id": run, "started_at": manifest["started_at"], "finished_at": now(), "status": status,
            "incremental": config.incremental, "resumes": manifest["resumes"],
            "listed": facts.get("listed"),
            "new": facts.get("new"), "changed": facts.get("changed"), "unchanged": facts.get("unchanged"),
            **({"retry_failures": config.retry_failures, "retried": facts.get("retried")}
               if config.retry_failures else {}),
            "shards": [first, nxt], "planned": sum(c["items"] for c in state.chunks if first <= c["first_shard"] < nxt),
            "images": totals.get("images", 0), "failures": totals.get("failures", 0),
            "detections": totals.get("detections", 0)}


def store_facts(config: RunConfig, measured: Measured) -> dict:
    """How the run met its stores' outages (outage.py): requests its workers and its driver tried again."""
    seen = OUTAGE.state()
    return {"timeout_s": config.store_timeout, "worker_retries": measured.costs.get("store_retries", 0),
            "driver_retries": seen.retries, "driver_outages": seen.outages,
            "longest_outage_s": round(seen.longest_s, 1)}


def sizing(config: RunConfig, cluster: dict, costs: dict, run_s: float) -> dict:
    """How the workers were sized, and what each image cost them in this invocation (means over the
    shards processed). Reads are timed on the read threads (waiting on the store included), decodes
    (decode, resize, tensor) on the decode threads, infer (invoke, outputs, rows) on the interpreter's;
    stall is the interpreter's wait for a decoded image: near 0 when reading and decoding keep up.
    Reads in flight follow the measured latency (readahead.py); actors and threads follow a fixed rule."""
    images = costs.get("images", 0) + costs.get("failures", 0)
    per = (lambda key: round(1000 * costs.get(key, 0) / images, 2)) if images else (lambda key: None)
    actors = cluster.get("actors") or 0
    threads = cluster.get("cpus_per_actor") or 1
    depth = costs.get("decode_depth") or PREFETCH  # as the workers ran it: two batches where batches are dynamic
    return {
        "rule": ("one worker process per --cpus-per-actor CPUs of this machine, within --node-memory-share of "
                 "its memory, at most one per shard"
                 if cluster.get("executor") == "local processes" else
                 "one actor per --cpus-per-actor CPUs of each node, within --node-memory-share of its memory")
                + ("" if config.cpus_per_actor else
                   "; --cpus-per-actor auto: 1, or the CPUs the workers leave unused shared out as interpreter "
                   "threads (at most 8)"),
        "actors": actors, "interpreter_threads": threads,
        # The decode window bounds the decodes in flight (and their memory): threads beyond it stay idle.
        "decode_threads": decode_threads(threads, depth, config.decode_threads),  # 0: on the interpreter's thread
        "decode_depth": depth,
        "read_ahead": (f"fixed: {config.read_ahead} images (--read-ahead)" if config.read_ahead else
                       "sized per worker: ceil(read latency / infer time per image) + 1 images, at least the "
                       f"decode depth, at most {MAX_READS} and {READ_BYTES_BUDGET // MIB} MiB of files"),
        "images_ahead": costs.get("images_ahead"),  # the most any worker had ahead at the end of a shard
        "measured": {"images": images, "read_decode_ms_per_image": per("read_decode_s"),
                     "read_ms_per_image": per("read_s"), "decode_ms_per_image": per("decode_s"),
                     "infer_ms_per_image": per("infer_s"), "stall_ms_per_image": per("stall_s"),
                     "kb_per_image": round(costs.get("read_bytes", 0) / 1024 / images, 1) if images else None,
                     # against what each actor reserved (cluster.memory_per_actor): the headroom left
                     "worker_peak_rss_mb": costs.get("peak_rss_mb"),
                     "images_per_s_per_actor": (round(images / run_s / actors, 2)
                                                if images and actors and run_s else None)},
    }


def counts(state, done_before: int, labels) -> dict:
    done = state.totals["images"] + state.totals["failures"]
    return {"listed": state.planned_items if state.listed else None, **state.totals,
            "shards": state.num_committed, "committed_shards": state.num_committed,
            "skipped_committed_shards": done_before, "failure_types": dict(state.failure_types),
            "failure_rate": state.totals["failures"] / max(done, 1),
            "unlabelled_class_ids": dict(state.unlabelled) if labels is not None else {}}
