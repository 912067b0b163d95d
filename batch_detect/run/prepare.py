"""Everything a run checks before it writes (config, stores, output location, model, labels, the input's
first shard, the previous run it would continue), gathered in one typed `Prepared`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from ..config import RunConfig
from ..errors import ModelError, OutputError
from ..inputs.plan import PlanStream, plan_input
from ..inputs.storage import check_store_access
from ..model.detector import ModelInfo, inspect_interpreter
from ..model.interpreter import Backend, load_backend, make_interpreter, read_model, sha256
from ..model.labels import ModelLabels, label_warnings, load_labels, model_classes, model_labels
from ..output.commitlog import LOG_DIR, CommitLog
from ..output.destination import check_output_location
from ..output.sink import LAYOUT, LEGACY_COMMIT_DIR, MANIFEST, OutputStore
from .feed import Planning, planning_for

log = logging.getLogger(__name__)

# Settings that change what a shard's rows contain: a resumed run must agree on every one.
IDENTITY_SETTINGS = ("shard_size", "score_threshold", "resize", "normalization", "max_pixels", "jpeg_draft",
                     "image_column", "input_mean", "input_std", "output_format", "anchors", "nms")
# Identity keys added later: a manifest without one was made with its default (so it still resumes).
_IDENTITY_DEFAULTS = {"input_mean": None, "input_std": None, "output_format": "auto", "image_column": None,
                      "anchors": None, "nms": "auto"}


@dataclass
class Prepared:
    """What `prepare` found: the model loaded and understood, its labels, the output and the run it holds,
    and the input's plan, opened (its first shard listed) and ready to stream."""

    backend: Backend
    model_content: bytes
    info: ModelInfo
    labels: list | None
    labels_source: str | None
    label_warnings: list[str]
    plan: PlanStream
    store: OutputStore
    identity: dict
    previous: dict | None  # the manifest of the run this one continues, None for a new output
    commit_log: CommitLog | None
    planning: Planning
    timings: dict


def check_before_writing(config: RunConfig) -> OutputStore:
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


def prepare(config: RunConfig, store: OutputStore | None = None) -> Prepared:
    """Every check that needs no cluster. Raises a BatchDetectError naming the problem; leaves nothing
    written. The input is opened and its first shard listed (an empty or missing input is refused here);
    the rest is listed while the run goes. `store`: the output's, once `check_before_writing` passed."""
    if store is None:
        store = check_before_writing(config)
    so = config.storage_options
    t0 = time.perf_counter()
    backend = load_backend()
    model_content = read_model(config.model, so)
    info = _inspect(config, backend, model_content)
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
                **{k: getattr(config, k) for k in IDENTITY_SETTINGS}}
    if config.anchors:  # the file's content changes rows, not where it lies
        with open(config.anchors, "rb") as f:
            identity["anchors"] = "sha256:" + sha256(f.read())
    previous = _previous_run(store, config, identity)
    commit_log = CommitLog.open(store) if previous else None
    planning = planning_for(config, store, previous, commit_log.state if commit_log else None)
    plan = plan_input(config.input, form=config.input_format, extensions=config.extensions,
                      shard_size=config.shard_size, image_column=config.image_column, id_column=config.id_column,
                      storage_options=so, select=planning.select, first_shard=planning.first_shard,
                      run=planning.run, inventory_prefix=config.inventory_prefix,
                      listing_processes=config.listing_processes)
    if previous and plan.form != previous.get("plan", {}).get("form", plan.form):
        raise OutputError(f"output {config.output!r} holds {previous['plan']['form']} input and the input is now "
                          f"{plan.form}: choose a new --output, or pass --overwrite to replace it")
    for note in label_notes:
        log.warning("warning: %s", note)
    return Prepared(backend=backend, model_content=model_content, info=info, labels=labels,
                    labels_source=labels_source, label_warnings=label_notes, plan=plan, store=store,
                    identity=identity, previous=previous, commit_log=commit_log, planning=planning,
                    timings={"check_model_s": t_model, "first_listing_s": time.perf_counter() - t0 - t_model})


def _inspect(config: RunConfig, backend: Backend, model_content: bytes) -> ModelInfo:
    try:
        return inspect_interpreter(make_interpreter(backend, model_content, 1, config.model),
                                   config.pixel_normalization, config.output_format, config.anchors, model_content,
                                   config.nms)
    except ModelError as exc:
        if config.model in str(exc):
            raise
        raise ModelError(f"model {config.model!r}: {exc}") from None


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
                          f"{previous.get('layout', 1)}, this one writes {LAYOUT}: its tables' columns differ) and cannot be "
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
