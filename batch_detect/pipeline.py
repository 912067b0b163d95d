"""The job, start to finish: check everything that can be checked before any actor starts (config,
model, labels, input, output, cluster), plan shards, run the ones not yet committed, manifest last.

Re-running the same command into the same output resumes it: committed shards are skipped, the rest
are redone under the same deterministic names. A run whose model, plan or settings differ is refused
unless --overwrite."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from dataclasses import dataclass

import pyarrow as pa
import ray

from . import __version__
from .config import RunConfig
from .detector import inspect_interpreter
from .distributed import (MIB, PREFETCH, WorkerSettings, connect, estimate_actor_memory, node_capacity,
                          run_shards, size_pool)
from .errors import InputError, ModelError, OutputError
from .interpreter import load_backend, make_interpreter, read_model, sha256
from .labels import embedded_labels, load_labels
from .listing import plan_fingerprint, plan_input
from .sink import COMMIT_DIR, MANIFEST, PLAN, OutputStore

# Settings that change what a shard's rows contain: a resumed run must agree on every one.
_IDENTITY_SETTINGS = ("score_threshold", "resize", "normalization", "max_pixels", "shard_size", "jpeg_draft",
                      "image_column", "input_mean", "input_std", "output_format")
# Identity keys added later: a manifest without one was made with its default (so it still resumes).
_IDENTITY_DEFAULTS = {"input_mean": None, "input_std": None, "output_format": "auto", "image_column": None}


@dataclass
class RunSummary:
    output: str
    manifest: dict

    @property
    def counts(self) -> dict:
        return self.manifest["counts"]


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def prepare(config: RunConfig) -> dict:
    """Every check that needs no cluster. Raises a BatchDetectError naming the problem; writes nothing."""
    config.validate()
    so = config.storage_options
    t0 = time.perf_counter()
    backend = load_backend()
    model_content = read_model(config.model, so)
    try:
        info = inspect_interpreter(make_interpreter(backend, model_content, 1, config.model),
                                   config.pixel_normalization, config.output_format)
    except ModelError as exc:
        if config.model in str(exc):
            raise
        raise ModelError(f"model {config.model!r}: {exc}") from None
    labels, labels_source = (load_labels(config.labels, so), config.labels) if config.labels else (None, None)
    if labels is None and (found := embedded_labels(model_content)) is not None:
        labels, labels_source = found[0], f"embedded in the model ({found[1]})"
    t_model = time.perf_counter() - t0
    plan = plan_input(config.input, form=config.input_format, extensions=config.extensions,
                      shard_size=config.shard_size, image_column=config.image_column, id_column=config.id_column,
                      storage_options=so)
    if not plan.shards:
        hint = f" ({len(plan.skipped)} files skipped for their extension)" if plan.skipped else ""
        raise InputError(f"no images found at {config.input!r}{hint}; accepted: {', '.join(config.extensions)}")
    try:
        store = OutputStore(config.output, so)
    except (ValueError, ImportError, OSError) as exc:
        raise OutputError(f"cannot open output {config.output!r}: {exc}") from None
    shards = plan.shards
    identity = {"model_sha256": sha256(model_content), "plan_fingerprint": plan_fingerprint(shards),
                "labels": labels, **{k: getattr(config, k) for k in _IDENTITY_SETTINGS}}
    previous = _previous_run(store, config, identity)
    return {
        "backend": backend, "model_content": model_content, "info": info, "labels": labels,
        "labels_source": labels_source,
        "plan": plan, "store": store, "shards": shards, "identity": identity, "previous": previous,
        "timings": {"check_model_s": t_model, "list_s": time.perf_counter() - t0 - t_model},
    }


def _previous_run(store: OutputStore, config: RunConfig, identity: dict) -> dict | None:
    """The manifest of the run to resume, None for a fresh output; refuses a run that differs."""
    has_manifest = store.exists(MANIFEST)
    if config.overwrite:
        return None
    if not has_manifest:
        if store.exists(COMMIT_DIR):
            raise OutputError(f"output {config.output!r} holds committed shards but no {MANIFEST}: choose a "
                              "new --output, or pass --overwrite to replace it")
        if config.resume:
            raise OutputError(f"--resume: output {config.output!r} holds no previous run")
        return None
    previous = store.read_json(MANIFEST)
    before = previous.get("identity", {})
    changed = sorted(k for k in identity if before.get(k, _IDENTITY_DEFAULTS.get(k)) != identity[k])
    if changed:
        what = ", ".join("the input listing (plan)" if k == "plan_fingerprint" else
                         "the model" if k == "model_sha256" else k for k in changed)
        raise OutputError(
            f"output {config.output!r} holds a run made with a different {what}: resuming would mix "
            "results. Choose a new --output, or pass --overwrite to replace it"
        )
    return previous


def _warnings(manifest: dict, labels: list | None) -> list[str]:
    out = []
    ids = manifest["counts"]["unlabelled_class_ids"]
    if ids:
        n = sum(ids.values())
        which = ", ".join(f"{k}: {v}" for k, v in sorted(ids.items(), key=lambda kv: int(kv[0])))
        out.append(f"{n} detections have class ids the {len(labels)} labels do not name (class id: detections "
                   f"{which}); their label is null. Check that the labels ({manifest['labels_source']}) "
                   "belong to this model")
    return out


def run(config: RunConfig, on_start=None, on_shard=None) -> RunSummary:
    t_start = time.perf_counter()
    ready = prepare(config)
    store: OutputStore = ready["store"]
    shards = ready["shards"]
    plan = ready["plan"]
    planned = plan.num_items  # images; for tar input, tars
    previous = ready["previous"]
    model_sha = ready["identity"]["model_sha256"]
    manifest = {
        "run_id": previous["run_id"] if previous else uuid.uuid4().hex,
        "resumes": previous.get("resumes", 0) + 1 if previous else 0,
        "tool": {"name": "batch_detect", "version": __version__},
        "status": "running",
        "started_at": _now(),
        "identity": ready["identity"],
        "model": {"uri": config.model, "sha256": model_sha, "backend": ready["backend"].name,
                  "backend_version": ready["backend"].version, **ready["info"].describe(),
                  "batch": config.batch_size if ready["info"].input.tensor.shape_signature[0] == -1 else 1,
                  "batch_dimension": "dynamic" if ready["info"].input.tensor.shape_signature[0] == -1 else "fixed"},
        "labels": ready["labels"],
        "labels_source": ready["labels_source"],
        "config": config.redacted(),
        "plan": {"form": plan.form, "shard_size": config.shard_size, "num_shards": len(shards),
                 "num_images": None if plan.form == "tar" else planned,
                 "num_tars": planned if plan.form == "tar" else None,
                 "fingerprint": ready["identity"]["plan_fingerprint"], "file": PLAN},
        "input": {"form": plan.form, "listed": planned, "skipped_non_image": len(plan.skipped),
                  "manifest_duplicates": plan.duplicates,
                  "skipped_examples": plan.skipped[:20]},
    }

    t_ray = time.perf_counter()
    # Join the cluster and size the pool before writing anything: a cluster we cannot use leaves no output.
    started_ray = connect(config.address)
    try:
        done_before = store.committed_shards() if previous else {}
        todo = [s for s in shards if s.shard_id not in done_before]
        info = ready["info"].input
        input_bytes = info.height * info.width * info.channels * (4 if info.tensor.dtype == "float32" else 1)
        memory_per_actor = (config.memory_per_actor_mb * MIB if config.memory_per_actor_mb
                            else estimate_actor_memory(len(ready["model_content"]), input_bytes, PREFETCH))
        num_actors, capacity = size_pool(config.num_actors, config.cpus_per_actor, memory_per_actor,
                                         config.node_memory_share, max(len(todo), 1))
        cluster_cpus = float(ray.cluster_resources().get("CPU", 0))
        ray_start_s = time.perf_counter() - t_ray
        if config.overwrite:
            store.clear()
        try:
            if not previous:
                store.write_table(PLAN, pa.table({"shard_id": [s.shard_id for s in shards for _ in s.uris],
                                                  "uri": [u for s in shards for u in s.uris]}))
            store.write_json(MANIFEST, manifest)
        except OSError as exc:
            raise OutputError(f"cannot write to output {config.output!r}: {type(exc).__name__}: {exc}") from None
    except BaseException:
        if started_ray:
            ray.shutdown()
        raise

    totals = {"images": 0, "failures": 0, "detections": 0, "shards": 0}
    failure_types: dict[str, int] = {}
    unlabelled: dict[str, int] = {}  # class id -> detections whose id is outside the labels
    first_commit: list[float] = []

    def count(summary: dict) -> None:
        for k in ("images", "failures", "detections"):
            totals[k] += summary[k]
        totals["shards"] += 1
        for k, v in summary["failure_types"].items():
            failure_types[k] = failure_types.get(k, 0) + v
        for k, v in summary.get("unlabelled_class_ids", {}).items():
            unlabelled[k] = unlabelled.get(k, 0) + v

    for summary in done_before.values():
        count(summary)
    done_earlier = totals["images"] + totals["failures"]

    def shard_done(summary: dict) -> None:
        if not first_commit:
            first_commit.append(time.perf_counter() - t_start)
        count(summary)
        if on_shard is not None:
            on_shard(summary)

    try:
        if on_start is not None:
            on_start(None if plan.form == "tar" else planned, len(shards), num_actors, len(done_before),
                     totals["images"] + totals["failures"])
        settings = WorkerSettings(
            model_url=config.model, model_sha256=model_sha, memory_per_actor=memory_per_actor,
            backend=ready["backend"].name,
            num_threads=config.cpus_per_actor, score_threshold=config.score_threshold, resize=config.resize,
            normalization=config.pixel_normalization, max_pixels=config.max_pixels, jpeg_draft=config.jpeg_draft,
            output_format=config.output_format,
            labels=ready["labels"], extensions=config.extensions, image_column=config.image_column,
            batch_size=config.batch_size,
            output_url=config.output, storage_options=config.storage_options,
        )
        def grow() -> int:
            return sum(node_capacity(config.cpus_per_actor, memory_per_actor, config.node_memory_share).values())

        if config.num_actors is not None:
            grow = None  # the user fixed the pool size
        t_run = time.perf_counter()
        pool = run_shards(todo, settings, num_actors=num_actors, cpus_per_actor=config.cpus_per_actor,
                          max_in_flight=config.max_shards_in_flight, on_shard=shard_done,
                          grow=grow) if todo else {
            "actors": 0, "cpus_per_actor": config.cpus_per_actor, "nodes": []}
        run_s = time.perf_counter() - t_run
    except BaseException as exc:
        manifest.update(status="failed", finished_at=_now(), error=f"{type(exc).__name__}: {exc}"[:2000],
                        counts={**totals, "listed": planned})
        store.write_json(MANIFEST, manifest)
        raise
    finally:
        if started_ray:
            ray.shutdown()

    committed = store.committed_shards()
    done = totals["images"] + totals["failures"]
    # A tar's image count is known only once streamed: there, every shard committed is the whole check.
    complete = all(s.shard_id in committed for s in shards) and (plan.form == "tar" or done == planned)
    processed_now = done - done_earlier
    manifest.update(
        status="complete" if complete else "incomplete",
        finished_at=_now(),
        cluster={"cpus": cluster_cpus, "capacity_at_start": capacity, **pool},
        counts={"listed": planned, **totals, "committed_shards": len(committed),
                "skipped_committed_shards": len(done_before), "failure_types": failure_types,
                "failure_rate": totals["failures"] / max(done, 1),
                "unlabelled_class_ids": unlabelled if ready["labels"] is not None else {}},
        timings={**ready["timings"], "ray_start_s": ray_start_s, "run_s": run_s,
                 "first_shard_committed_s": first_commit[0] if first_commit else None,
                 "total_s": time.perf_counter() - t_start,
                 "images_per_s": processed_now / run_s if run_s > 0 and processed_now else None},
    )
    manifest["warnings"] = _warnings(manifest, ready["labels"])
    store.write_json(MANIFEST, manifest)
    return RunSummary(output=config.output, manifest=manifest)
