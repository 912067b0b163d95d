"""The job, start to finish: check everything that can be checked before any actor starts (config,
model, labels, input, output, cluster), then list, plan, dispatch and commit as one stream, manifest last.

The listing runs on a thread of its own: it cuts the input into shards, stores the plan chunk by chunk,
and hands chunks to the dispatch loop through a short queue, so the first shards run while the rest is
still being listed and the driver never holds the whole input.

Re-running the same command into the same output resumes it: committed shards are skipped, the rest
are redone under the same deterministic names. A run whose model or settings differ is refused unless
--overwrite; one whose listing differs is stopped at the first plan chunk that differs."""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Iterator

import ray

from . import __version__
from .config import RunConfig
from .destination import check_output_location
from .detector import inspect_interpreter
from .commitlog import LOG_DIR, CommitLog
from .committer import Committer
from .distributed import (MIB, PREFETCH, ActorPool, Dispatcher, WorkerSettings, compact_task, connect,
                          estimate_actor_memory, node_capacity, size_pool)
from .errors import ModelError, OutputError
from .interpreter import load_backend, make_interpreter, read_model, sha256
from .labels import embedded_labels, label_warnings, load_labels
from .plan import Chunk, PlanStream, Shard, chunked, plan_input
from .sink import LEGACY_COMMIT_DIR, MANIFEST, PLAN_DIR, OutputStore
from .storage import check_store_access

log = logging.getLogger(__name__)
LAYOUT = 2  # outputs with a commit log and part files; 1 was one marker and file set per shard

# Settings that change what a shard's rows contain: a resumed run must agree on every one.
_IDENTITY_SETTINGS = ("shard_size", "score_threshold", "resize", "normalization", "max_pixels", "jpeg_draft",
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
    """Every check that needs no cluster. Raises a BatchDetectError naming the problem; writes nothing.
    The input is opened and its first shard listed (an empty or missing input is refused here); the
    rest is listed while the run goes."""
    config.validate()
    so = config.storage_options
    check_store_access([config.model, config.labels, config.input, config.output], so)
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
    try:
        store = OutputStore(config.output, so)
    except (ValueError, ImportError, OSError) as exc:
        raise OutputError(f"cannot open output {config.output!r}: {exc}") from None
    check_output_location(config.output, config.input, store, config.allow_nonempty_output)
    identity = {"model_sha256": sha256(model_content), "labels": labels,
                **{k: getattr(config, k) for k in _IDENTITY_SETTINGS}}
    previous = _previous_run(store, config, identity)
    return {
        "backend": backend, "model_content": model_content, "info": info, "labels": labels,
        "labels_source": labels_source, "plan": plan, "store": store, "identity": identity, "previous": previous,
        "timings": {"check_model_s": t_model, "first_listing_s": time.perf_counter() - t0 - t_model},
    }


def _previous_run(store: OutputStore, config: RunConfig, identity: dict) -> dict | None:
    """The manifest of the run to resume, None for a fresh output; refuses a run that differs."""
    has_manifest = store.exists(MANIFEST)
    if config.overwrite:
        return None
    if not has_manifest:
        if store.exists(LOG_DIR) or store.exists(LEGACY_COMMIT_DIR):
            raise OutputError(f"output {config.output!r} holds committed shards but no {MANIFEST}: choose a "
                              "new --output, or pass --overwrite to replace it")
        if config.resume:
            raise OutputError(f"--resume: output {config.output!r} holds no previous run")
        return None
    previous = store.read_json(MANIFEST)
    if previous.get("layout", 1) != LAYOUT:
        raise OutputError(f"output {config.output!r} was written by an earlier batch_detect (one set of files per "
                          "shard) and cannot be resumed by this one: finish it with that version, choose a new "
                          "--output, or pass --overwrite to start it again")
    before = previous.get("identity", {})
    changed = sorted(k for k in identity if before.get(k, _IDENTITY_DEFAULTS.get(k)) != identity[k])
    if changed:
        what = ", ".join("model" if k == "model_sha256" else k for k in changed)
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


_END = object()


class PlanFeed:
    """The listing thread: plan chunks are checked against the stored plan (a resumed run) or written to
    it (a new one), then queued for dispatch. The queue is short: listing runs ahead of dispatch by a
    couple of chunks, never by the whole input."""

    def __init__(self, plan: PlanStream, store: OutputStore, stored_chunks: list[dict], stored_listed: dict | None,
                 depth: int = 2):
        self.plan, self.store = plan, store
        self.stored, self.stored_listed = list(stored_chunks), stored_listed
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.facts: dict = {}
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
            h = hashlib.sha256()
            shards = items = chunks = 0
            for chunk in chunked(self.plan.shards):
                if self.stop.is_set():
                    return
                self._check_or_write(chunk)
                h.update(chunk.sha.encode())
                shards, items, chunks = shards + len(chunk.shards), items + chunk.items, chunks + 1
                self._put(chunk)
            facts = {"chunks": chunks, "shards": shards, "items": items, "fingerprint": h.hexdigest(),
                     "form": self.plan.form, "skipped": self.plan.stats.skipped,
                     "skipped_examples": self.plan.stats.skipped_examples, "duplicates": self.plan.stats.duplicates}
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
        elif self.stored_listed is not None:
            raise self._changed(f"it lists more than the stored plan's {self.stored_listed['shards']} shards")
        else:
            self.store.write_chunk(chunk.index, chunk.shards)

    def _changed(self, detail: str) -> OutputError:
        return OutputError(
            f"output {self.store.url!r} holds a run made with a different input listing ({detail}): resuming "
            "would mix results. Choose a new --output, or pass --overwrite to replace it")

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


def run(config: RunConfig, on_start=None, on_shard=None, on_listed=None) -> RunSummary:
    """`on_start(actors, done_shards, done_images)` once the pool is sized; `on_shard(summary)` per staged
    shard; `on_listed(images_or_None, shards)` when the listing ends."""
    t_start = time.perf_counter()
    ready = prepare(config)
    store: OutputStore = ready["store"]
    plan: PlanStream = ready["plan"]
    previous = ready["previous"]
    model_sha = ready["identity"]["model_sha256"]
    info = ready["info"].input
    dynamic = info.tensor.shape_signature[0] == -1
    manifest = {
        "layout": LAYOUT,
        "run_id": previous["run_id"] if previous else uuid.uuid4().hex,
        "resumes": previous.get("resumes", 0) + 1 if previous else 0,
        "tool": {"name": "batch_detect", "version": __version__},
        "status": "running",
        "started_at": _now(),
        "identity": ready["identity"],
        "model": {"uri": config.model, "sha256": model_sha, "backend": ready["backend"].name,
                  "backend_version": ready["backend"].version, **ready["info"].describe(),
                  "batch": config.batch_size if dynamic else 1, "batch_dimension": "dynamic" if dynamic else "fixed"},
        "labels": ready["labels"],
        "labels_source": ready["labels_source"],
        "config": config.redacted(),
        "plan": {"form": plan.form, "shard_size": config.shard_size, "dir": PLAN_DIR + "/"},
    }

    t_ray = time.perf_counter()
    # Join the cluster and size the pool before writing anything: a cluster we cannot use leaves no output.
    started_ray = connect(config.address)
    try:
        input_bytes = info.height * info.width * info.channels * (4 if info.tensor.dtype == "float32" else 1)
        memory_per_actor = (config.memory_per_actor_mb * MIB if config.memory_per_actor_mb
                            else estimate_actor_memory(len(ready["model_content"]), input_bytes, PREFETCH))
        num_actors, capacity = size_pool(config.num_actors, config.cpus_per_actor, memory_per_actor,
                                         config.node_memory_share, 1 << 62)
        # Never more actors than shards: list as many shards as the pool would hold (a few descriptors).
        head = list(itertools.islice(plan.shards, num_actors))
        plan.shards = itertools.chain(head, plan.shards)
        num_actors = max(1, len(head))
        cluster_cpus = float(ray.cluster_resources().get("CPU", 0))
        ray_start_s = time.perf_counter() - t_ray
        if config.overwrite:
            store.clear()
        try:
            commit_log = CommitLog.open(store) if previous else CommitLog(store)
            store.write_json(MANIFEST, manifest)
        except OSError as exc:
            raise OutputError(f"cannot write to output {config.output!r}: {type(exc).__name__}: {exc}") from None
    except BaseException:
        if started_ray:
            ray.shutdown()
        raise

    state = commit_log.state
    previous_parts = list(state.parts)
    done_before = state.num_committed
    images_before = state.totals["images"] + state.totals["failures"]
    first: dict = {}
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

    feed = PlanFeed(plan, store, state.chunks, state.listed)
    pool = ActorPool(settings, num_actors, config.cpus_per_actor, None if config.num_actors is not None else grow)
    dispatcher: Dispatcher

    def compact(part: int, shard_ids: list[str], done) -> None:
        def finished(rows: dict) -> None:
            first.setdefault("part", time.perf_counter() - t_start)
            done(rows)
        dispatcher.watch(compact_task.remote(config.output, config.storage_options, part, shard_ids), finished)

    committer = Committer(commit_log, compact, part_rows=config.part_rows)

    def source() -> Iterator[Shard | None]:
        for chunk in feed.chunks():
            if chunk is None:
                yield None
                continue
            if chunk.index >= len(state.chunks):
                committer.chunk(chunk)
            for shard in chunk.shards:
                if not state.is_committed(shard.index):
                    yield shard
        if state.listed is None:
            committer.listed(**feed.facts)
        if on_listed is not None:
            on_listed(None if plan.form == "tar" else state.listed["items"], state.listed["shards"])

    def shard_done(summary: dict) -> None:
        first.setdefault("shard", time.perf_counter() - t_start)
        committer.shard(summary)
        if on_shard is not None:
            on_shard(summary)

    dispatcher = Dispatcher(pool, source(), store, max_in_flight=config.max_shards_in_flight, on_shard=shard_done,
                            tick=committer.tick, drained=lambda: committer.cut(final=True))
    try:
        if on_start is not None:
            on_start(num_actors, done_before, images_before)
        t_run = time.perf_counter()
        feed.start()
        if not (state.listed and state.num_committed == state.listed["shards"]):
            pool.start()  # models load while the first chunk is listed (a finished output needs no actor)
        committer.resume()
        dispatcher.run()
        committer.flush()
        run_s = time.perf_counter() - t_run
    except BaseException as exc:
        feed.close()
        try:
            committer.flush()  # what was staged and logged stays committed: a re-run skips it
        finally:
            if previous is not None and committer.staged_now == 0 and not state.parts[len(previous_parts):]:
                store.write_json(MANIFEST, previous)  # refused before it changed anything: left as it was
            else:
                stopped = isinstance(exc, KeyboardInterrupt)
                manifest.update(status="interrupted" if stopped else "failed", finished_at=_now(),
                                error=None if stopped else f"{type(exc).__name__}: {exc}"[:2000],
                                counts=_counts(state, done_before, ready["labels"]))
                store.write_json(MANIFEST, manifest)
        raise
    finally:
        pool.kill()
        if started_ray:
            ray.shutdown()

    listed = state.listed
    parts_done = all(p["done"] for p in state.parts) and state.compacted_end == listed["shards"]
    complete = state.num_committed == listed["shards"] and parts_done
    processed_now = state.totals["images"] + state.totals["failures"] - images_before
    identity = {**ready["identity"], "plan_fingerprint": listed["fingerprint"]}
    manifest.update(
        status="complete" if complete else "incomplete",
        finished_at=_now(),
        identity=identity,
        plan={**manifest["plan"], "num_shards": listed["shards"], "chunks": listed["chunks"],
              "num_images": None if plan.form == "tar" else listed["items"],
              "num_tars": listed["items"] if plan.form == "tar" else None, "fingerprint": listed["fingerprint"]},
        input={"form": plan.form, "listed": listed["items"], "skipped_non_image": listed["skipped"],
               "manifest_duplicates": listed["duplicates"], "skipped_examples": listed["skipped_examples"]},
        output={"parts": len(state.parts), "part_rows": [p.get("rows") for p in state.parts][-3:]},
        cluster={"cpus": cluster_cpus, "capacity_at_start": capacity, **pool.facts(config.cpus_per_actor)},
        counts=_counts(state, done_before, ready["labels"]),
        timings={**ready["timings"], "ray_start_s": ray_start_s, "run_s": run_s,
                 "first_shard_committed_s": first.get("shard"), "first_part_written_s": first.get("part"),
                 "total_s": time.perf_counter() - t_start,
                 "images_per_s": processed_now / run_s if run_s > 0 and processed_now else None},
    )
    manifest["warnings"] = (label_warnings(ready["labels"], ready["labels_source"], ready["info"].layout)
                            + _warnings(manifest, ready["labels"]))
    store.write_json(MANIFEST, manifest)
    return RunSummary(output=config.output, manifest=manifest)


def _counts(state, done_before: int, labels) -> dict:
    done = state.totals["images"] + state.totals["failures"]
    return {"listed": state.listed["items"] if state.listed else None, **state.totals,
            "shards": state.num_committed, "committed_shards": state.num_committed,
            "skipped_committed_shards": done_before, "failure_types": dict(state.failure_types),
            "failure_rate": state.totals["failures"] / max(done, 1),
            "unlabelled_class_ids": dict(state.unlabelled) if labels is not None else {}}
