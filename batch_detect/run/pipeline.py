"""The job, start to finish: check everything that can be checked before any actor starts (config,
model, labels, input, output, cluster), then list, plan, dispatch and commit as one stream, manifest last.

The listing runs on a thread of its own (`feed.py`): it cuts the input into shards, stores the plan
chunk by chunk, and hands chunks to the dispatch loop through a short queue, so the first shards run
while the rest is still being listed and the driver never holds the whole input.

Re-running the same command into the same output resumes it: committed shards are skipped, the rest
are redone under the same deterministic names. A run whose model or settings differ is refused unless
--overwrite; one whose listing differs is stopped at the first plan chunk that differs.

With --incremental, an output holds a sequence of runs: each plans only the objects no earlier run
planned (or whose version changed), numbers its shards after theirs, and stamps its rows with its
`run_id`; the earlier runs' plans are the history it is compared with (`history.py`)."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import itertools
import logging
import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Iterator

from .. import __version__
from ..config import RunConfig
from ..output.destination import check_output_location
from ..model.detector import inspect_interpreter
from ..output.commitlog import LOG_DIR, CommitLog
from .committer import Committer
from ..inputs.containers import tar_members_at_most
from ..errors import FailureRateExceeded, LeaseLost, ModelError, OutputError, Terminated, count
from ..model.interpreter import load_backend, make_interpreter, read_model, sha256
from .feed import Planning, PlanFeed, check_listing, first_shard_of, planning_for
from ..inputs.history import changed_since_planned
from ..model.labels import ModelLabels, label_warnings, load_labels, model_classes, model_labels
from ..output.lease import Lease
from .local import NODE_ID, LocalDispatcher, worker_count
from .metrics import record_dispatch
from ..inputs.plan import PlanStream, Shard, plan_input
from ..output.sink import LAYOUT, LEGACY_COMMIT_DIR, MANIFEST, PLAN_DIR, OutputStore
from ..inputs.storage import check_store_access
from .readahead import BYTES_BUDGET as READ_BYTES_BUDGET, MAX_READS, MIB
from .sizing import auto_ray_min_images, auto_threads, estimate_actor_memory
from ..inputs.walk import size_in_version
from .worker import PREFETCH, WorkerSettings, decode_threads

log = logging.getLogger(__name__)

# Settings that change what a shard's rows contain: a resumed run must agree on every one.
_IDENTITY_SETTINGS = ("shard_size", "score_threshold", "resize", "normalization", "max_pixels", "jpeg_draft",
                      "image_column", "input_mean", "input_std", "output_format")
# Identity keys added later: a manifest without one was made with its default (so it still resumes).
_IDENTITY_DEFAULTS = {"input_mean": None, "input_std": None, "output_format": "auto", "image_column": None}


@dataclass
class RunSummary:
    output: str
    manifest: dict
    nothing_new: dict | None = None  # a run that found nothing to do (nothing new, or already complete): what it saw

    @property
    def counts(self) -> dict:
        return self.manifest["counts"]


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _check_config_and_stores(config: RunConfig) -> OutputStore:
    """The config, each object store reached once, and the output location (a file created there and
    deleted): what a run checks before its first lasting request to the output. Returns the output's store."""
    config.validate()
    check_store_access([config.model, config.labels, config.input, config.output], config.storage_options)
    try:
        store = OutputStore(config.output, config.storage_options)
    except (ValueError, ImportError, OSError) as exc:
        raise OutputError(f"cannot open output {config.output!r}: {exc}") from None
    check_output_location(config.output, config.input, store, config.allow_nonempty_output)
    return store


def prepare(config: RunConfig, store: OutputStore | None = None) -> dict:
    """Every check that needs no cluster. Raises a BatchDetectError naming the problem; leaves nothing
    written. The input is opened and its first shard listed (an empty or missing input is refused here);
    the rest is listed while the run goes. `store`: the output's, once the config, stores and output
    location were checked (`_check_config_and_stores`)."""
    if store is None:
        store = _check_config_and_stores(config)
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
    if config.resize == "auto":  # resolved once, before the identity and the workers see it: the manifest records it
        config.resize = info.default_resize
    if config.labels:
        found, labels, labels_source = ModelLabels(), load_labels(config.labels, so), config.labels
    else:
        found = model_labels(model_content)
        labels, labels_source = found.labels, found.source
    # Said before the run, not only in its summary: a misfit found after a day's run costs the day.
    label_notes = label_warnings(labels, labels_source, model_classes(model_content, info.layout), found.passed_over)
    t_model = time.perf_counter() - t0
    identity = {"model_sha256": sha256(model_content), "labels": labels,
                **{k: getattr(config, k) for k in _IDENTITY_SETTINGS}}
    previous = _previous_run(store, config, identity)
    commit_log = CommitLog.open(store) if previous else None
    planning = planning_for(config, store, previous, commit_log.state if commit_log else None)
    plan = plan_input(config.input, form=config.input_format, extensions=config.extensions,
                      shard_size=config.shard_size, image_column=config.image_column, id_column=config.id_column,
                      storage_options=so, select=planning.select, first_shard=planning.first_shard,
                      run=planning.run)
    if previous and plan.form != previous.get("plan", {}).get("form", plan.form):
        raise OutputError(f"output {config.output!r} holds {previous['plan']['form']} input and the input is now "
                          f"{plan.form}: choose a new --output, or pass --overwrite to replace it")
    for note in label_notes:
        log.warning("warning: %s", note)
    return {
        "backend": backend, "model_content": model_content, "info": info, "labels": labels,
        "labels_source": labels_source, "label_warnings": label_notes, "plan": plan, "store": store,
        "identity": identity, "previous": previous, "commit_log": commit_log, "planning": planning,
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
        raise OutputError(f"output {config.output!r} was written by an earlier batch_detect (output layout "
                          f"{previous.get('layout', 1)}, this one writes {LAYOUT}: rows without run_id) and cannot be "
                          "resumed by this one: finish it with that version, choose a new --output, or pass "
                          "--overwrite to start it again")
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


def run(config: RunConfig, on_start=None, on_shard=None, on_listed=None, on_phase=None) -> RunSummary:
    """`on_start(actors, done_shards, done_images, without_ray, threads)` once the pool is sized; `on_shard(summary)`
    per staged shard; `on_listed(images_or_None, shards)` when the listing ends (counts of this run's plan);
    `on_phase(text)` as each step before the first shard begins (so a user sees what the wait is)."""
    t_start = time.perf_counter()
    store = _check_config_and_stores(config)  # before the lease: it is the run's first request to the output
    # An existing output is leased before its log is read: two drivers must never plan on one state.
    lease = Lease.acquire(store) if not config.overwrite and store.exists(MANIFEST) else None
    try:
        return _run(config, store, t_start, lease, on_start, on_shard, on_listed, on_phase or (lambda text: None))
    finally:
        if lease is not None:
            lease.release()


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (what Kubernetes and `ray job stop` send) stops the run as Ctrl-C does: committed shards
    stay committed and the manifest says interrupted, within a second. `ray job stop` sends SIGKILL 3 s
    later (RAY_JOB_STOP_WAIT_TIME_S), so nothing slow may happen on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _run(config: RunConfig, store: OutputStore, t_start: float, lease, on_start, on_shard, on_listed,
         on_phase) -> RunSummary:
    on_phase(f"checking the model, the input and the output ({config.output})")
    ready = prepare(config, store)
    plan: PlanStream = ready["plan"]
    planning: Planning = ready["planning"]
    previous = ready["previous"]
    model_sha = ready["identity"]["model_sha256"]
    info = ready["info"].input
    dynamic = info.tensor.shape_signature[0] == -1
    if planning.mode == "new-run":
        # Nothing new and nothing unfinished: answer from the listing alone, without starting Ray.
        first = next(plan.shards, None)
        state = ready["commit_log"].state
        if first is None and _all_compacted(state):
            return RunSummary(output=config.output, manifest=previous,
                              nothing_new={**planning.selection.facts(), "runs": len(state.runs),
                                           "total_s": time.perf_counter() - t_start})
        plan.shards = itertools.chain([first] if first is not None else [], plan.shards)
    elif planning.mode == "resume" and previous.get("status") == "complete" and _all_compacted(ready["commit_log"].state):
        # A finished output re-run: the listing is checked against its plan, without starting Ray.
        state = ready["commit_log"].state
        changed = check_listing(plan, store, planning, state)
        again = {**previous, "counts": {**previous["counts"], "skipped_committed_shards": state.num_committed}}
        return RunSummary(output=config.output, manifest=again,
                          nothing_new={"complete": True, "unchanged": state.planned_items - changed,
                                       "changed": changed, "runs": len(state.runs),
                                       "total_s": time.perf_counter() - t_start})
    runs_before = [r for r in (previous or {}).get("runs", []) if r["run_id"] != planning.run]
    this_run = next((r for r in (previous or {}).get("runs", []) if r["run_id"] == planning.run), None)
    manifest = {
        "layout": LAYOUT,
        "run_id": planning.run,
        "output_id": previous["output_id"] if previous else uuid.uuid4().hex,  # new on --overwrite
        "resumes": previous.get("resumes", 0) + 1 if previous and planning.mode in ("resume", "continue") else 0,
        "tool": {"name": "batch_detect", "version": __version__},
        "status": "running",
        "started_at": this_run["started_at"] if this_run else _now(),
        "identity": ready["identity"],
        "model": {"uri": config.model, "sha256": model_sha, "backend": ready["backend"].name,
                  "backend_version": ready["backend"].version, **ready["info"].describe(),
                  "batch": config.batch_size if dynamic else 1, "batch_dimension": "dynamic" if dynamic else "fixed"},
        "labels": ready["labels"],
        "labels_source": ready["labels_source"],
        "config": config.redacted(),
        "plan": {"form": plan.form, "shard_size": config.shard_size, "dir": PLAN_DIR + "/"},
        "runs": runs_before,
    }

    local_workers, local_images, local_shards = without_ray(config, ready, planning, plan)
    if local_workers and on_start is not None and on_listed is not None and planning.mode in ("fresh", "resume") \
            and plan.form != "tar":
        # Listed to the end already (that is how it was found small): progress shows the totals from the start
        started = on_start

        def on_start(*args, **kwargs):
            started(*args, **kwargs)
            on_listed(local_images, local_shards)
    if local_workers:
        on_phase(f"using {executor(config, plan.form, local_workers, local_images)}")
        lease, owns_lease, commit_log = _open_output(config, ready, manifest, lease)
        ray_facts = None
    else:
        # Ray is imported only now: a run with nothing to do (above) answers in the time Python starts.
        ray_facts = start_ray(config, ready, planning, plan, on_phase)
        try:
            lease, owns_lease, commit_log = _open_output(config, ready, manifest, lease)
        except BaseException:
            if ray_facts["started_ray"]:
                import ray
                ray.shutdown()
            raise
    try:
        with _sigterm_as_interrupt():
            return _dispatch(config, ready, manifest, commit_log, lease, t_start, ray_facts, local_workers,
                             on_start, on_shard, on_listed, on_phase)
    finally:
        if owns_lease:
            lease.release()


def ray_min_images(config: RunConfig) -> int:
    return auto_ray_min_images() if config.ray_min_images is None else config.ray_min_images


def ray_address(config: RunConfig) -> str | None:
    return config.address or os.environ.get("RAY_ADDRESS")


def ray_where(config: RunConfig) -> str:
    address = ray_address(config)
    return (f"the Ray cluster at {address}" if address else
            "Ray on this machine (no --address: an embedded cluster for this run)")


def executor(config: RunConfig, form: str, workers: int, images: int) -> str:
    """Where a run's shards go, in the words the run and its dry run both print: `without_ray`'s worker
    processes (`workers`, for `images` under --ray-min-images), else Ray."""
    if not workers:
        return ray_where(config)
    what = f"at most {images} images" if form == "tar" else f"{images} images"
    return (f"{count(workers, 'worker process', 'worker processes')} of this machine, without starting Ray ({what}, "
            f"under --ray-min-images {ray_min_images(config)})")


def without_ray(config: RunConfig, ready: dict, planning: Planning, plan: PlanStream) -> tuple[int, int, int]:
    """(worker processes, images, shards) when this run is small enough to do without Ray, else (0, 0, 0): no cluster
    named, fewer images than --ray-min-images (counted by listing at most that many; for tars, whose images
    are known only as they stream, their members counted on this machine's disk, else the most their
    listed sizes can hold). Workers: one per --cpus-per-actor CPUs of this machine, as many as its memory
    share holds (the rule Ray's pool follows per node), one per shard at most."""
    threshold = ray_min_images(config)
    if not threshold or ray_address(config):
        return 0, 0, 0
    ray_module = sys.modules.get("ray")
    if ray_module is not None and ray_module.is_initialized():  # a driver already inside Ray: use it
        return 0, 0, 0
    if plan.form == "tar" and planning.pending:
        return 0, 0, 0  # stored tar chunks hold no sizes: no bound on their images
    images = sum(c["items"] for c in planning.pending)
    head: list[Shard] = []
    for shard in plan.shards:
        head.append(shard)
        if plan.form == "tar":
            most = tar_members_at_most(shard.source, size_in_version(shard.versions[0] if shard.versions else None),
                                       threshold - images)
            images += threshold if most is None else most
        else:
            images += len(shard.uris)
        if images >= threshold:
            break
    plan.shards = itertools.chain(head, plan.shards)
    if images >= threshold:
        return 0, 0, 0
    shards = len(head) + sum(c["shards"] for c in planning.pending)
    workers = config.num_actors or worker_count(config.cpus_per_actor or 1, max(1, shards),
                                                memory_per_worker(config, ready), config.node_memory_share)
    return workers, images, shards


def memory_per_worker(config: RunConfig, ready: dict) -> int:
    """What each worker (actor or process) reserves: --memory-per-actor-mb, or the estimate for this model."""
    if config.memory_per_actor_mb:
        return config.memory_per_actor_mb * MIB
    info = ready["info"].input
    input_bytes = info.height * info.width * info.channels * (4 if info.tensor.dtype == "float32" else 1)
    return estimate_actor_memory(len(ready["model_content"]), input_bytes, PREFETCH)


def _local_threads(config: RunConfig, workers: int) -> int:
    """Interpreter threads per worker process: --cpus-per-actor, or this machine's CPUs shared out (as
    threads_per_actor does on Ray) when there are fewer workers than CPUs."""
    return config.cpus_per_actor or auto_threads(os.cpu_count() or 1, workers)


def start_ray(config: RunConfig, ready: dict, planning: Planning | None, plan: PlanStream | None,
              on_phase) -> dict:
    """Join the cluster (or start an embedded one) and size the pool, before anything is written: a
    cluster we cannot use leaves no output. `plan` given: never more actors than the shards it holds."""
    import ray

    from .distributed import connect, size_pool

    t_ray = time.perf_counter()
    on_phase(f"{'joining' if ray_address(config) else 'starting'} {ray_where(config)}")
    started_ray = connect(config.address)
    try:
        memory_per_actor = memory_per_worker(config, ready)
        num_actors, capacity = size_pool(config.num_actors, config.cpus_per_actor or 1, memory_per_actor,
                                         config.node_memory_share, 1 << 62)
        if plan is not None:
            # Never more actors than shards: list as many shards as the pool would hold (a few descriptors).
            pending_shards = sum(c["shards"] for c in planning.pending)
            head = list(itertools.islice(plan.shards, max(0, num_actors - pending_shards)))
            plan.shards = itertools.chain(head, plan.shards)
            num_actors = max(1, min(num_actors, len(head) + pending_shards))
        cluster_cpus = float(ray.cluster_resources().get("CPU", 0))
    except BaseException:
        if started_ray:
            ray.shutdown()
        raise
    facts = {"started_ray": started_ray, "ray_start_s": time.perf_counter() - t_ray, "num_actors": num_actors,
             "capacity": capacity, "cluster_cpus": cluster_cpus, "memory_per_actor": memory_per_actor}
    return _resolve_threads(config, facts)


def _resolve_threads(config: RunConfig, ray_facts: dict) -> dict:
    """The pool's CPUs (interpreter threads) per actor, once its size is known."""
    from .distributed import threads_per_actor

    ray_facts["cpus_per_actor"] = config.cpus_per_actor or threads_per_actor(
        ray_facts["num_actors"], ray_facts["memory_per_actor"], config.node_memory_share)
    return ray_facts


def _open_output(config: RunConfig, ready: dict, manifest: dict, lease):
    """The lease (a new output, or --overwrite: taken once the run is known to be able to run), the
    cleared output for --overwrite, the commit log and the running manifest."""
    store: OutputStore = ready["store"]
    if lease is None:
        lease = Lease.acquire(store)
        owns_lease = True
    else:
        owns_lease = False
    store.fence = lease.fence  # from here on every write of the driver's, log and manifest included
    try:
        if config.overwrite:
            store.clear()
        try:
            commit_log = ready["commit_log"] or CommitLog(store)
            store.write_json(MANIFEST, manifest)
        except OSError as exc:
            raise OutputError(f"cannot write to output {config.output!r}: {type(exc).__name__}: {exc}") from None
    except BaseException:
        if owns_lease:
            lease.release()
        raise
    return lease, owns_lease, commit_log


def _dispatch(config: RunConfig, ready: dict, manifest: dict, commit_log: CommitLog, lease: Lease, t_start: float,
              ray_facts: dict | None, local_workers: int, on_start, on_shard, on_listed, on_phase) -> RunSummary:
    store: OutputStore = ready["store"]
    plan: PlanStream = ready["plan"]
    planning: Planning = ready["planning"]
    previous = ready["previous"]
    state = commit_log.state
    previous_parts = list(state.parts)
    run_no = planning.run
    done_before = state.num_committed
    run_before = dict(state.run_totals.get(run_no, {}))
    first: dict = {}
    settings = WorkerSettings(
        model_url=config.model, model_sha256=ready["identity"]["model_sha256"],
        memory_per_actor=ray_facts["memory_per_actor"] if ray_facts else 0,
        backend=ready["backend"].name,
        num_threads=ray_facts["cpus_per_actor"] if ray_facts else _local_threads(config, local_workers),
        score_threshold=config.score_threshold, resize=config.resize,
        normalization=config.pixel_normalization, max_pixels=config.max_pixels, jpeg_draft=config.jpeg_draft,
        output_format=config.output_format,
        labels=ready["labels"], extensions=config.extensions, image_column=config.image_column,
        batch_size=config.batch_size, read_ahead=config.read_ahead, decode_threads=config.decode_threads,
        output_url=config.output, storage_options=config.storage_options,
    )
    resume = planning.mode == "resume"
    feed = PlanFeed(plan, store, planning, state.chunks if resume else [], state.listed if resume else None)
    # Who processes shards: worker processes without Ray ("local"), then Ray ("ray": its pool and
    # dispatcher) if the run is big or the local workers failed.
    active: dict = {}

    def compact(part: int, shard_ids: list[str], done) -> None:
        def finished(rows: dict) -> None:
            first.setdefault("part", time.perf_counter() - t_start)
            done(rows)
        if "ray" in active:
            from .distributed import compact_task
            active["ray"][1].watch(compact_task(config.output, config.storage_options, part, shard_ids),
                                   finished)
        else:
            active["local"].compact(part, shard_ids, finished)

    committer = Committer(commit_log, compact, part_rows=config.part_rows)
    if planning.mode in ("fresh", "new-run"):
        committer.start_run(run_no, planning.first_chunk, planning.first_shard, config.incremental)
    elif planning.mode == "continue":
        committer.relist(run_no, planning.first_chunk)

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
            run_shards = state.planned_end - first_shard_of(state, run_no)
            run_items = sum(c["items"] for c in state.chunks if c["first_shard"] >= first_shard_of(state, run_no))
            on_listed(None if plan.form == "tar" else run_items, run_shards)

    failing: dict = {"images": 0, "failures": 0, "types": {}}
    costs: dict = {}  # this invocation's measured per-image costs, for the manifest's `sizing`
    stopped: list[str] = []

    def dispatcher():
        return active["ray"][1] if "ray" in active else active["local"]

    def shard_done(summary: dict) -> None:
        first.setdefault("shard", time.perf_counter() - t_start)
        for k in ("images", "failures", "read_decode_s", "infer_s", "read_s", "decode_s", "stall_s", "read_bytes"):
            costs[k] = costs.get(k, 0) + summary.get(k, 0)
        for k in ("images_ahead", "decode_depth", "peak_rss_mb"):  # the most any worker had
            if k in summary:
                costs[k] = max(costs.get(k, 0), summary[k])
        committer.shard(summary)
        if on_shard is not None:
            on_shard(summary)
        if config.max_failure_rate is not None and not stopped:
            why = _failing_fast(failing, summary, config.max_failure_rate)
            if why:
                stopped.append(why)
                dispatcher().stop()  # what is in flight commits and is compacted; nothing new starts

    reported = {"at": 0.0, "shards": state.num_committed}

    def tick() -> None:
        lease.check()  # before the committer writes: a run that lost its lease logs nothing more
        committer.tick()
        if "ray" in active and time.monotonic() - reported["at"] >= 1.0:
            record_dispatch(config.output, state.num_committed - reported["shards"], len(dispatcher().inflight))
            reported.update(at=time.monotonic(), shards=state.num_committed)

    shards = source()
    local = None
    try:
        if on_start is not None:
            on_start(local_workers or ray_facts["num_actors"], run_before.get("shards", 0),
                     run_before.get("images", 0) + run_before.get("failures", 0), without_ray=bool(local_workers),
                     threads=settings.num_threads)
        t_run = time.perf_counter()
        feed.start()
        if local_workers:
            local = active["local"] = LocalDispatcher(
                settings, local_workers, shards, store, max_in_flight=config.max_shards_in_flight, on_shard=shard_done,
                tick=tick, drained=lambda: committer.cut(final=True))
            committer.resume()
            handed_back = local.run()
            if handed_back:
                on_phase(f"a worker process failed ({local.why_ray}): going on with Ray, which retries the "
                         f"{count(len(handed_back), 'shard')} left and isolates an image that kills workers")
                ray_facts = start_ray(config, ready, None, None, on_phase)
                ray_facts["num_actors"] = max(1, min(ray_facts["num_actors"], len(handed_back)))
                _resolve_threads(config, ray_facts)
                settings = dataclasses.replace(settings, memory_per_actor=ray_facts["memory_per_actor"],
                                               num_threads=ray_facts["cpus_per_actor"])
                shards = itertools.chain(handed_back, shards)
        if ray_facts is not None:
            _run_on_ray(config, ray_facts, settings, shards, store, active, committer, shard_done, tick,
                        resume_parts=not local_workers,
                        start_pool=not (resume and state.listed and state.num_committed == state.planned_end))
        committer.flush()
        if stopped:
            raise FailureRateExceeded(stopped[0])
        run_s = time.perf_counter() - t_run
    except BaseException as exc:
        feed.close()
        if isinstance(exc, LeaseLost) or lease.lost is not None:
            raise  # the output is another run's now: nothing more is written there, not even the manifest
        try:
            committer.flush()  # what was staged and logged stays committed: a re-run skips it
        finally:
            if previous is not None and committer.staged_now == 0 and not state.parts[len(previous_parts):] \
                    and planning.mode == "resume":
                store.write_json(MANIFEST, previous)  # refused before it changed anything: left as it was
            else:
                stopped = isinstance(exc, KeyboardInterrupt)
                status = "interrupted" if stopped else "failed"
                manifest.update(status=status, finished_at=_now(),
                                error=None if stopped else f"{type(exc).__name__}: {exc}"[:2000],
                                counts=_counts(state, done_before, ready["labels"]))
                manifest["runs"] = manifest["runs"] + [_run_entry(manifest, state, run_no, status, config)]
                store.write_json(MANIFEST, manifest)
                if stopped:
                    exc.add_note(_what_stays(state))
        raise
    finally:
        if "ray" in active:
            pool = active["ray"][0]
            pool.kill()
            # disconnecting waits for the head: minutes when it is gone
            if ray_facts["started_ray"] and not pool.head_lost:
                import ray
                ray.shutdown()

    listed = state.listed
    end = state.planned_end
    parts_done = all(p["done"] for p in state.parts) and state.compacted_end == end
    complete = state.num_committed == end and parts_done
    run_after = state.run_totals.get(run_no, {})
    processed_now = sum(run_after.get(k, 0) - run_before.get(k, 0) for k in ("images", "failures"))
    fingerprint = _plan_fingerprint(state)
    identity = {**ready["identity"], "plan_fingerprint": fingerprint}
    items = state.planned_items
    manifest.update(
        status="complete" if complete else "incomplete",
        finished_at=_now(),
        identity=identity,
        plan={**manifest["plan"], "num_shards": end, "chunks": len(state.chunks),
              "num_images": None if plan.form == "tar" else items,
              "num_tars": items if plan.form == "tar" else None, "fingerprint": fingerprint},
        input={"form": plan.form, "listed": listed["listed"], "skipped_non_image": listed["skipped"],
               "manifest_duplicates": listed["duplicates"], "skipped_examples": listed["skipped_examples"],
               "manifest_sorted_on_disk": listed.get("sorted_on_disk", False)},
        output={"parts": len(state.parts), "part_rows": [p.get("rows") for p in state.parts][-3:]},
        cluster=_cluster_facts(config, ray_facts, active, local_workers),
        counts=_counts(state, done_before, ready["labels"]),
        timings={**ready["timings"], "ray_start_s": ray_facts["ray_start_s"] if ray_facts else None, "run_s": run_s,
                 "first_shard_committed_s": first.get("shard"), "first_part_written_s": first.get("part"),
                 "total_s": time.perf_counter() - t_start,
                 "images_per_s": processed_now / run_s if run_s > 0 and processed_now else None},
    )
    manifest["runs"] = manifest["runs"] + [_run_entry(manifest, state, run_no, manifest["status"], config)]
    manifest["sizing"] = _sizing(config, manifest["cluster"], costs, run_s)
    manifest["warnings"] = (ready["label_warnings"]
                            + _warnings(manifest, ready["labels"])
                            + ([changed_since_planned(feed.changed)] if feed.changed else []))
    lease.check()  # the manifest says the output is whole: only while it is still this run's
    store.write_json(MANIFEST, manifest)
    return RunSummary(output=config.output, manifest=manifest)


def _run_on_ray(config: RunConfig, ray_facts: dict, settings: WorkerSettings, shards: Iterator[Shard | None],
                store: OutputStore, active: dict, committer: Committer, shard_done, tick, *, resume_parts: bool,
                start_pool: bool) -> None:
    from .distributed import ActorPool, Dispatcher, node_capacity

    def grow(nodes: list[dict]) -> int:
        return sum(node_capacity(settings.num_threads, settings.memory_per_actor, config.node_memory_share,
                                 nodes).values())

    pool = ActorPool(settings, ray_facts["num_actors"], settings.num_threads,
                     None if config.num_actors is not None else grow)
    dispatcher = Dispatcher(pool, shards, store, max_in_flight=config.max_shards_in_flight, on_shard=shard_done,
                            tick=tick, drained=lambda: committer.cut(final=True))
    active["ray"] = (pool, dispatcher)
    if start_pool:
        pool.start()  # models load while the first chunk is listed (a finished output needs no actor)
    if resume_parts:
        committer.resume()
    dispatcher.run()


def _cluster_facts(config: RunConfig, ray_facts: dict | None, active: dict, local_workers: int) -> dict:
    """Where the run ran, for the manifest: Ray's pool, or this machine's worker processes (and why it
    went on with Ray when they failed)."""
    facts: dict = {}
    if local_workers:
        local = active["local"]
        facts["without_ray"] = {"workers": local_workers, "handed_to_ray": len(local.handed_back),
                                "why": local.why_ray}
    if "ray" in active:
        pool = active["ray"][0]
        return {"executor": "ray", "cpus": ray_facts["cluster_cpus"], "capacity_at_start": ray_facts["capacity"],
                **pool.facts(pool.settings.num_threads), **facts}
    return {"executor": "local processes", "cpus": float(os.cpu_count() or 1), "capacity_at_start": None,
            "actors": local_workers, "actors_at_start": local_workers,
            "cpus_per_actor": _local_threads(config, local_workers),
            "memory_per_actor": None, "nodes": [NODE_ID], "actors_per_node": {NODE_ID: local_workers},
            "lost_nodes": [], **facts}


def _what_stays(state) -> str:
    """What an interrupted run leaves, exactly: committed shards are kept, but readers see only those in parts."""
    committed, images = state.num_committed, state.totals["images"] + state.totals["failures"]
    readable = sum(p["end"] - p["first"] for p in state.parts if p["done"])
    text = f"{count(committed, 'shard')} ({count(images, 'image')}) committed"
    if readable >= committed:
        return text + ", all of them in part files that queries read now"
    return (text + f"; {readable} of them in part files that queries read now, the other {committed - readable} "
            "become readable when the same command is re-run (it compacts them before going on)")


def _all_compacted(state) -> bool:
    """Every run listed, every planned shard committed and in a part that is written."""
    return state.finished and all(p["done"] for p in state.parts) and state.compacted_end == state.planned_end


FAIL_FAST_MIN = 500  # images an invocation processes before --max-failure-rate may stop it early


def _failing_fast(seen: dict, summary: dict, limit: float) -> str | None:
    """Why to stop now: over `limit` of this invocation's images failed, after at least FAIL_FAST_MIN
    (a resumed run is judged on what it does itself, so fixing the cause lets it go on)."""
    seen["images"] += summary["images"]
    seen["failures"] += summary["failures"]
    for kind, n in summary.get("failure_types", {}).items():
        seen["types"][kind] = seen["types"].get(kind, 0) + n
    done = seen["images"] + seen["failures"]
    if done < FAIL_FAST_MIN or seen["failures"] <= limit * done:
        return None
    kinds = ", ".join(f"{k}: {v}" for k, v in sorted(seen["types"].items(), key=lambda kv: (-kv[1], kv[0])))
    return (f"{seen['failures']} of the first {done} images failed ({seen['failures'] / done:.0%}), over "
            f"--max-failure-rate {limit:g} ({kinds}): stopped early instead of running the whole input. What was "
            "processed is committed; fix the cause (the model, the input, credentials) and re-run the same "
            "command to go on, or pass --overwrite to start again")


def _plan_fingerprint(state) -> str | None:
    """The whole plan's fingerprint: one run's listing fingerprint, or for several runs a hash of theirs."""
    listed = [r.get("listed") for r in state.runs] or [state.listed]
    if any(f is None for f in listed):
        return None
    if len(listed) == 1:
        return listed[0]["fingerprint"]
    return hashlib.sha256("".join(c["sha"] for c in state.chunks).encode()).hexdigest()


def _run_entry(manifest: dict, state, run: int, status: str, config: RunConfig) -> dict:
    """The manifest's record of one run: when, what its listing found, what it planned and processed."""
    facts = next((r.get("listed") or {} for r in state.runs if r["run"] == run), {}) or {}
    first = first_shard_of(state, run)
    nxt = next((r["first_shard"] for r in state.runs if r["run"] > run), state.planned_end)
    totals = state.run_totals.get(run, {})
    return {"run_id": run, "started_at": manifest["started_at"], "finished_at": _now(), "status": status,
            "incremental": config.incremental, "resumes": manifest["resumes"],
            "listed": facts.get("listed"),
            "new": facts.get("new"), "changed": facts.get("changed"), "unchanged": facts.get("unchanged"),
            "shards": [first, nxt], "planned": sum(c["items"] for c in state.chunks if first <= c["first_shard"] < nxt),
            "images": totals.get("images", 0), "failures": totals.get("failures", 0),
            "detections": totals.get("detections", 0)}


def _sizing(config: RunConfig, cluster: dict, costs: dict, run_s: float) -> dict:
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


def _counts(state, done_before: int, labels) -> dict:
    done = state.totals["images"] + state.totals["failures"]
    return {"listed": state.planned_items if state.listed else None, **state.totals,
            "shards": state.num_committed, "committed_shards": state.num_committed,
            "skipped_committed_shards": done_before, "failure_types": dict(state.failure_types),
            "failure_rate": state.totals["failures"] / max(done, 1),
            "unlabelled_class_ids": dict(state.unlabelled) if labels is not None else {}}
