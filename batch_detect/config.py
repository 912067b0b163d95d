"""Run configuration: one typed dataclass, validated before anything starts."""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable

from .config_types import check_type
from .model.anchors import load_anchors
from .model.per_anchor import NMS_CHOICES
from .model.decoding import OUTPUT_FORMATS
from .errors import ConfigError
from .model.geometry import RESIZE_CHOICES
from .model.preprocess import mean_std_spec
from .inputs.storage import check_storage_options
from .output.records import check_retry_kind

NORMALIZATIONS = ("auto", "-1,1", "0,1", "0,255")
INPUT_FORMATS = ("auto", "files", "tar", "parquet")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".heic", ".heif", ".avif")
# Pillow's own decompression-bomb threshold: larger images are refused, not decoded.
DEFAULT_MAX_PIXELS = 89_478_485
REQUIRED = {"model": "the path or URL of a .tflite detector",
             "input": "a folder, prefix, glob or manifest of images (local or an fsspec URL)",
             "output": "the folder or prefix to write Parquet to (local or an fsspec URL)"}
PATH_KEYS = ("model", "labels", "input", "output")  # the settings that may be local paths
_SECRET_KEY = re.compile(r"(secret|token|password|passwd|credential|session|key)", re.I)


@dataclass
class RunConfig:
    model: str = ""
    input: str = ""
    output: str = ""
    labels: str | None = None
    score_threshold: float = 0.25
    shard_size: int = 64
    resize: str = "auto"  # auto: by the model's family (letterbox for YOLO, stretch for SSD), resolved in prepare
    normalization: str = "auto"
    input_mean: list[float] | None = None  # float inputs: (pixel - mean) / std, in pixel units (0..255)
    input_std: list[float] | None = None
    output_format: str = "auto"  # force the decoder family: auto, ssd, yolov8, yolov5
    anchors: str | None = None  # raw per-anchor detectors: N x 4 cy, cx, h, w (.npy/.csv) instead of a known layout
    nms: str = "auto"  # auto: the family's own (weighted for mediapipe, plain otherwise); plain; weighted (mediapipe)
    max_pixels: int = DEFAULT_MAX_PIXELS
    jpeg_draft: bool = True  # decode large JPEGs at reduced scale (never below the model input)
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS  # () means every file (or every tar member)
    input_format: str = "auto"  # files | tar | parquet; auto: parquet with image_column, tar for .tar inputs
    image_column: str | None = None  # Parquet input: the column holding encoded image bytes
    id_column: str | None = None  # Parquet input: the column whose value names each image in the output
    inventory_prefix: str | None = None  # S3 Inventory input: plan only the keys under this prefix
    # Processes listing a folder, prefix or glob (S3, local) once it is large (inputs/pages.py). None: one
    # per CPU of the driver's machine, at most 8; 1: the listing stays in the driver's process
    listing_processes: int | None = None
    batch_size: int = 1  # images per invoke when the model's batch dimension is dynamic; else 1
    address: str | None = None
    # Embedded runs (no address) planning fewer images than this go to worker processes without Ray,
    # whose start costs more than it buys on one machine; 0: always Ray. None: 2,500 per CPU of this
    # machine, at most 50,000 (sizing.auto_ray_min_images).
    ray_min_images: int | None = None
    num_actors: int | None = None  # None: one per `cpus_per_actor` CPUs in the cluster
    # CPUs (and interpreter threads) per actor. None: 1, and more where the pool leaves CPUs unused
    # (memory holds fewer actors than a node has CPUs, or fewer shards than CPUs): see threads_per_actor
    cpus_per_actor: int | None = None
    # Decode threads per worker. None: sized per node (worker.decode_threads); 0: decode on the
    # interpreter's thread, one image after another
    decode_threads: int | None = None
    max_shards_in_flight: int = 2  # per actor: the backpressure bound
    read_ahead: int = 0  # images read ahead per worker; 0: sized from the measured read latency (readahead.py)
    part_rows: int = 100_000  # images (and failures) per output part file: files per table ≈ images / this
    memory_per_actor_mb: int | None = None  # None: estimated from the model and the prefetch depth
    node_memory_share: float = 0.8  # of each node's Ray memory that detector actors may reserve
    overwrite: bool = False
    incremental: bool = False  # add what is new in the input to the output as a new run (see pipeline)
    # Process again, as the next run, the images whose latest record is a failure of this kind: "all", a
    # stage ("read") or a stage and type ("read/read_error"); None: off
    retry_failures: str | None = None
    allow_nonempty_output: bool = False  # write into the input, or beside files that are not a previous run
    resume: bool = False  # re-running the same job into the same output resumes it anyway; this insists
    max_failure_rate: float | None = None  # exit non-zero (after committing) when failures exceed it
    # Seconds a store may stay unavailable (throttling, unreachable) while the run waits it out (outage.py)
    store_timeout: float = 600.0
    storage_options: dict = field(default_factory=dict)

    def validate(self) -> "RunConfig":
        for check in _CHECKS:  # in this order: with several wrong settings, the first one is reported
            check(self)
        # Actors run in other processes (and cwds, and nodes): local paths must not stay relative.
        self.model, self.input, self.output = (absolute_local(u) for u in (self.model, self.input, self.output))
        self.labels = absolute_local(self.labels) if self.labels else None
        self.extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in self.extensions)
        check_storage_options(self.storage_options, {"--model": self.model, "--input": self.input,
                                                     "--output": self.output, "--labels": self.labels or ""})
        return self

    @property
    def pixel_normalization(self) -> str:
        """What the detector is told: the named range, or the mean/std spec for float inputs."""
        if self.input_mean is not None and self.input_std is not None:
            return mean_std_spec(self.input_mean, self.input_std)
        return self.normalization

    def redacted(self) -> dict:
        """The config as written to the manifest: storage option values that look secret are hidden."""
        out = asdict(self)
        out["extensions"] = list(self.extensions)
        out["storage_options"] = redact(self.storage_options)
        return out


@dataclass(frozen=True)
class _Bound:
    """One setting's single-value rule: `--flag must be <must_be>, got <value>` when `fails` says so."""

    name: str
    must_be: str
    fails: Callable[[Any], bool]
    show: Callable[[Any], str] = str

    def __call__(self, config: RunConfig) -> None:
        value = getattr(config, self.name)
        if self.fails(value):
            raise ConfigError(f"--{self.name.replace('_', '-')} must be {self.must_be}, got {self.show(value)}")


def _one_of(name: str, choices: tuple[str, ...]) -> _Bound:
    return _Bound(name, f"one of {', '.join(choices)}", lambda v: v not in choices, repr)


def _at_least(name: str, minimum: int, must_be: str = "") -> _Bound:
    # None: the setting is left to be sized (or is off)
    return _Bound(name, must_be or f"at least {minimum}", lambda v: v is not None and v < minimum)


def _fraction(name: str, zero_allowed: bool = True) -> _Bound:
    if zero_allowed:
        return _Bound(name, "within [0, 1]", lambda v: v is not None and not 0.0 <= v <= 1.0)
    return _Bound(name, "within (0, 1]", lambda v: v is not None and not 0.0 < v <= 1.0)


def _check_required(config: RunConfig) -> None:
    # Every missing one at once: a first run should not learn them one error at a time.
    missing = [f"--{name} ({what})" for name, what in REQUIRED.items() if not getattr(config, name)]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)}: each as a flag or a key of the --config file "
                          "(`batch-detect run --help` lists every option)")


def _check_anchors(config: RunConfig) -> None:
    """--anchors: a local file every worker reads, so an unreadable one stops the run before it starts."""
    if config.anchors:
        config.anchors = os.path.abspath(config.anchors)
        load_anchors(config.anchors)


def _check_pixel_scaling(config: RunConfig) -> None:
    """--input-mean/--input-std: parsed to numbers, given together, and instead of --normalization."""
    config.input_mean, config.input_std = (_floats(v, f"--input-{n}") for v, n in
                                           ((config.input_mean, "mean"), (config.input_std, "std")))
    if (config.input_mean is None) != (config.input_std is None):
        raise ConfigError("--input-mean and --input-std go together: give both (pixel units, e.g. "
                          "--input-mean 123.675,116.28,103.53 --input-std 58.395,57.12,57.375)")
    if config.input_mean is None:
        return
    if config.normalization != "auto":
        raise ConfigError(f"--normalization {config.normalization} and --input-mean/--input-std both say how "
                          "to scale pixels: give one of them")
    for name, values in (("--input-mean", config.input_mean), ("--input-std", config.input_std)):
        if len(values) not in (1, 3):
            raise ConfigError(f"{name} takes 1 value or 3 (one per RGB channel), got {len(values)}")
    if any(s <= 0 for s in config.input_std):
        raise ConfigError(f"--input-std values must be positive, got {config.input_std}")


def _check_input_columns(config: RunConfig) -> None:
    """Parquet input's columns against --input-format."""
    if config.input_format == "parquet" and not config.image_column:
        raise ConfigError("--input-format parquet needs --image-column: the column holding the image bytes")
    if config.image_column and config.input_format not in ("auto", "parquet"):
        raise ConfigError(f"--image-column reads Parquet input; it contradicts --input-format {config.input_format}")
    if config.id_column and not config.image_column:
        raise ConfigError("--id-column names rows of Parquet input: give --image-column too")


def _check_run_mode(config: RunConfig) -> None:
    """What to do with an output that holds a run already: one answer at most."""
    if config.overwrite and config.resume:
        raise ConfigError("--overwrite and --resume contradict each other: pick one")
    if config.overwrite and config.incremental:
        raise ConfigError("--overwrite and --incremental contradict each other: --incremental keeps what the "
                          "output holds and adds what is new; --overwrite replaces it")
    if config.retry_failures is not None:
        if config.overwrite or config.incremental:
            other = "--overwrite" if config.overwrite else "--incremental"
            raise ConfigError(f"--retry-failures and {other} are different runs: run one, then the other")
        if config.retry_failures != "all" and (why := check_retry_kind(config.retry_failures)):
            raise ConfigError(f"--retry-failures {config.retry_failures!r}: {why} (give STAGE or STAGE/TYPE "
                              "as the failures table has them, e.g. read or read/read_error, or nothing for all)")


# How each image is detected: shard and batch sizes, pixels in, detections out.
_DETECTION_CHECKS = (
    _fraction("score_threshold"), _at_least("shard_size", 1), _one_of("resize", RESIZE_CHOICES),
    _one_of("normalization", NORMALIZATIONS), _at_least("batch_size", 1), _check_pixel_scaling,
    _one_of("output_format", OUTPUT_FORMATS), _at_least("max_pixels", 1, "positive"), _check_anchors,
    _one_of("nms", NMS_CHOICES),
)
# The workers: how many, and what each holds (threads, images ahead, memory).
_WORKER_CHECKS = (
    _at_least("num_actors", 1), _at_least("read_ahead", 0, "0 (sized from the measured read latency) or more"),
    _at_least("ray_min_images", 0, "0 (always Ray) or more"), _at_least("cpus_per_actor", 1),
    _at_least("decode_threads", 0, "0 (decode on the interpreter's thread) or more"),
    _at_least("memory_per_actor_mb", 1, "positive"), _fraction("node_memory_share", zero_allowed=False),
)
_INPUT_CHECKS = (_one_of("input_format", INPUT_FORMATS), _check_input_columns, _at_least("listing_processes", 1))
# The run and its output: what an existing output becomes, when the run fails, parts and dispatch.
_RUN_CHECKS = (
    _check_run_mode, _fraction("max_failure_rate"), _at_least("part_rows", 1), _at_least("max_shards_in_flight", 1),
    _at_least("store_timeout", 1, "1 second or more"),
)
_CHECKS: tuple[Callable[[RunConfig], None], ...] = (
    _check_required, *_DETECTION_CHECKS, *_WORKER_CHECKS, *_INPUT_CHECKS, *_RUN_CHECKS,
)


def _floats(value, name: str) -> list[float] | None:
    """1 or more numbers from a list, a number, or a comma-separated string."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    try:
        return [float(v) for v in items]
    except (TypeError, ValueError):
        raise ConfigError(f"{name} takes numbers (comma-separated), got {value!r}") from None


def absolute_local(url: str) -> str:
    """Local paths (no protocol, or file://) become absolute; other URLs are left as they are."""
    if url.startswith("file://"):
        url = url[len("file://"):]
    elif "://" in url:
        return url
    return os.path.abspath(os.path.expanduser(url))


def redact(options: dict) -> dict:
    return {k: ("***" if _SECRET_KEY.search(str(k)) else v) for k, v in options.items()}


def _field_names() -> list[str]:
    return [f.name for f in fields(RunConfig)]


def config_from_values(values: dict, source: str = "settings") -> RunConfig:
    """A RunConfig from keys named like the fields or the flags (`score-threshold` or `score_threshold`)."""
    kwargs = {}
    for key, value in _checked_keys(values, source).items():
        name = key
        if name == "extensions" and isinstance(value, str):
            value = () if value.strip() == "*" else tuple(e.strip() for e in value.split(",") if e.strip())
        elif name == "extensions":
            value = tuple(value)
        kwargs[name] = value
    try:
        return RunConfig(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _checked_keys(values: dict, source: str) -> dict:
    names = _field_names()
    out = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name == "storage_option":
            name = "storage_options"
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown key {key!r} in {source}{hint}")
        default = next(f for f in fields(RunConfig) if f.name == name).default
        check_type(name, value, default, source)
        out[name] = value
    return out


def load_config_file(path: str) -> dict:
    """A TOML job file: every `batch-detect run` option as a key; `[storage_options]` as a table."""
    try:
        with open(path, "rb") as fh:
            values = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path!r} is not valid TOML: {exc}") from None
    values = _checked_keys(values, path)  # unknown keys are reported against the file
    # As in most tools' job files, a relative path names a place beside the file, wherever it is run from.
    folder = os.path.dirname(os.path.abspath(path))
    for key in PATH_KEYS:
        value = values.get(key)
        if isinstance(value, str) and value and "://" not in value and not os.path.isabs(os.path.expanduser(value)):
            values[key] = os.path.normpath(os.path.join(folder, value))
    return values
