"""The job, start to finish: check everything that can be checked before any actor starts (config,
model, labels, input, output), plan shards, run them on Ray, and write the manifest last."""

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
from .distributed import WorkerSettings, connect, run_shards, size_pool
from .errors import InputError, ModelError, OutputError
from .interpreter import load_backend, make_interpreter, read_model, sha256
from .labels import load_labels
from .listing import list_input, plan_fingerprint, plan_shards
from .sink import COMMIT_DIR, MANIFEST, PLAN, OutputStore


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
        info = inspect_interpreter(make_interpreter(backend, model_content, 1, config.model), config.normalization)
    except ModelError as exc:
        if config.model in str(exc):
            raise
        raise ModelError(f"model {config.model!r}: {exc}") from None
    labels = load_labels(config.labels, so) if config.labels else None
    t_model = time.perf_counter() - t0
    listing = list_input(config.input, config.extensions, so)
    if not listing.uris:
        hint = f" ({len(listing.skipped)} files skipped for their extension)" if listing.skipped else ""
        raise InputError(f"no images found at {config.input!r}{hint}; accepted: {', '.join(config.extensions)}")
    try:
        store = OutputStore(config.output, so)
    except (ValueError, ImportError, OSError) as exc:
        raise OutputError(f"cannot open output {config.output!r}: {exc}") from None
    if (store.exists(MANIFEST) or store.exists(COMMIT_DIR)) and not config.overwrite:
        raise OutputError(
            f"output {config.output!r} already holds a run (its {MANIFEST} or {COMMIT_DIR}/ exists): "
            "choose a new --output, or pass --overwrite to replace it"
        )
    shards = plan_shards(listing.uris, config.shard_size)
    return {
        "backend": backend, "model_content": model_content, "info": info, "labels": labels,
        "listing": listing, "store": store, "shards": shards,
        "timings": {"check_model_s": t_model, "list_s": time.perf_counter() - t0 - t_model},
    }


def run(config: RunConfig, on_start=None, on_shard=None) -> RunSummary:
    t_start = time.perf_counter()
    ready = prepare(config)
    store: OutputStore = ready["store"]
    shards = ready["shards"]
    listing = ready["listing"]
    manifest = {
        "run_id": uuid.uuid4().hex,
        "tool": {"name": "batch_detect", "version": __version__},
        "status": "running",
        "started_at": _now(),
        "model": {"uri": config.model, "sha256": sha256(ready["model_content"]),
                  "backend": ready["backend"].name, "backend_version": ready["backend"].version,
                  **ready["info"].describe()},
        "labels": ready["labels"],
        "config": config.redacted(),
        "plan": {"shard_size": config.shard_size, "num_shards": len(shards), "num_images": len(listing.uris),
                 "fingerprint": plan_fingerprint(shards), "file": PLAN},
        "input": {"listed": len(listing.uris), "skipped_non_image": len(listing.skipped),
                  "skipped_examples": listing.skipped[:20]},
    }
    plan_table = pa.table({
        "shard_id": [s.shard_id for s in shards for _ in s.uris],
        "uri": [u for s in shards for u in s.uris],
    })
    totals = {"images": 0, "failures": 0, "detections": 0, "shards": 0}
    failure_types: dict[str, int] = {}
    first_commit: list[float] = []
    t_ray = time.perf_counter()
    # Join the cluster and size the pool before writing anything: a cluster we cannot use leaves no output.
    started_ray = connect(config.address)
    try:
        num_actors, cluster_cpus = size_pool(config.num_actors, config.cpus_per_actor, len(shards))
    except BaseException:
        if started_ray:
            ray.shutdown()
        raise
    ray_start_s = time.perf_counter() - t_ray
    if config.overwrite:
        store.clear()
    try:
        store.write_table(PLAN, plan_table)
        store.write_json(MANIFEST, manifest)
    except OSError as exc:
        if started_ray:
            ray.shutdown()
        raise OutputError(f"cannot write to output {config.output!r}: {type(exc).__name__}: {exc}") from None

    try:
        if on_start is not None:
            on_start(len(listing.uris), len(shards), num_actors)

        def shard_done(summary: dict) -> None:
            if not first_commit:
                first_commit.append(time.perf_counter() - t_start)
            for k in ("images", "failures", "detections"):
                totals[k] += summary[k]
            totals["shards"] += 1
            for k, v in summary["failure_types"].items():
                failure_types[k] = failure_types.get(k, 0) + v
            if on_shard is not None:
                on_shard(summary)

        settings = WorkerSettings(
            model_url=config.model, model_sha256=sha256(ready["model_content"]),
            backend=ready["backend"].name, num_threads=config.cpus_per_actor,
            score_threshold=config.score_threshold, resize=config.resize, normalization=config.normalization,
            max_pixels=config.max_pixels, labels=ready["labels"], output_url=config.output,
            storage_options=config.storage_options,
        )
        t_run = time.perf_counter()
        pool = run_shards(shards, settings, num_actors=num_actors,
                          cpus_per_actor=config.cpus_per_actor, max_in_flight=config.max_shards_in_flight,
                          on_shard=shard_done)
        run_s = time.perf_counter() - t_run
    except BaseException as exc:
        manifest.update(status="failed", finished_at=_now(), error=f"{type(exc).__name__}: {exc}"[:2000],
                        counts={**totals, "listed": len(listing.uris)})
        store.write_json(MANIFEST, manifest)
        raise
    finally:
        if started_ray:
            ray.shutdown()

    committed = store.committed_shards()
    done = totals["images"] + totals["failures"]
    complete = len(committed) == len(shards) and done == len(listing.uris)
    manifest.update(
        status="complete" if complete else "incomplete",
        finished_at=_now(),
        cluster={"cpus": cluster_cpus, **pool},
        counts={"listed": len(listing.uris), **totals, "committed_shards": len(committed),
                "failure_types": failure_types},
        timings={**ready["timings"], "ray_start_s": ray_start_s, "run_s": run_s,
                 "first_shard_committed_s": first_commit[0] if first_commit else None,
                 "total_s": time.perf_counter() - t_start,
                 "images_per_s": done / run_s if run_s > 0 else None},
    )
    store.write_json(MANIFEST, manifest)
    return RunSummary(output=config.output, manifest=manifest)
