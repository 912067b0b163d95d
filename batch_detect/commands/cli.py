"""`batch-detect`: the command line. Exit codes: 0 done, 1 the run failed, 2 bad model/config/input/output
(reported before any actor starts, nothing claimed as done)."""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from dataclasses import MISSING, fields

from .. import __version__
from ..config import (_SECRET_KEY, INPUT_FORMATS, NORMALIZATIONS, PATH_KEYS, REQUIRED, RunConfig, config_from_values,
                     load_config_file)
from ..model.decoding import OUTPUT_FORMATS
from ..model.per_anchor import NMS_CHOICES
from ..errors import BatchDetectError, FailureRateExceeded, HeadUnreachable, StoreUnavailable, Terminated, count
from ..model.geometry import RESIZE_CHOICES
from ..outage import configure as configure_outage
from .progress import Progress
from .rayjob import job_paths
from ..run.sizing import MAX_AUTO_THREADS, RAY_MIN_IMAGES_CAP, RAY_MIN_IMAGES_PER_CPU
from ..inputs.pages import MAX_AUTO as MAX_AUTO_LISTING
from ..inputs.storage import check_storage_options, check_store_access


def _storage_option(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--storage-option takes key=value, got {text!r}")
    key, value = text.split("=", 1)
    key = key.strip()
    # Credentials stay strings whatever they look like (an all-digit key id is still a string).
    return key, value if _SECRET_KEY.search(key) else storage_value(value)


def storage_value(text: str):
    """A flag's value typed as fsspec expects it: true/false, numbers, JSON objects/lists (e.g.
    `client_kwargs={"region_name": "eu-west-1"}`); anything else stays a string (`anon=false` must not
    be the truthy string "false")."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text.strip().startswith(("{", "[")):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise argparse.ArgumentTypeError(f"--storage-option value {text!r} looks like JSON but does not parse")
    return text


# What a RunConfig left alone holds: the defaults `run --help` shows.
_RUN_DEFAULTS = {f.name: f.default if f.default_factory is MISSING else f.default_factory() for f in fields(RunConfig)}


def _shown(value) -> str:
    """A RunConfig default as the help prints it."""
    if isinstance(value, tuple):
        return ",".join(v.lstrip(".") for v in value)
    return f"{value:,}" if isinstance(value, int) and value >= 10_000 else str(value)


def _option(group, flag: str, help: str, *, default: str | None = None, **kwargs) -> argparse.Action:
    """A `run` option whose help ends with its default: RunConfig's own (the one place defaults live; the
    parser's are "not given", so that a --config file can supply them), or `default` where RunConfig's
    None means it is sized or found at run time. A switch shows whether it is on when not given; a required
    option (RunConfig's "") shows no default."""
    if kwargs.get("type") is int:
        kwargs.setdefault("metavar", "N")
    action = group.add_argument(flag, help=help, **kwargs)
    value = _RUN_DEFAULTS.get(action.dest)
    if value == "":
        return action
    if isinstance(action, argparse._StoreConstAction):  # store_true / store_false
        default = "on" if value == action.const else "off"
    elif default is None:
        default = "none" if value in (None, {}) else _shown(value)
    action.help += f" (default: {default})"
    return action


_REQUIRED = "required (here or in --config)"


def _input_options(g) -> None:
    _option(g, "--input", f"{_REQUIRED}: {REQUIRED['input']}; a manifest is a .txt, "
            "or a .csv or .parquet with a uri column, or an S3 Inventory report's manifest.json")
    _option(g, "--input-format", "files (images), tar (WebDataset-style, one shard per tar) or parquet "
            "(rows with an image-bytes column); auto: parquet with --image-column, tar for .tar inputs",
            choices=INPUT_FORMATS)
    _option(g, "--extensions", "comma-separated file extensions to process; '*' for every file")
    _option(g, "--inventory-prefix", "S3 Inventory input (--input its manifest.json): only the keys under "
            "this prefix", metavar="PREFIX")
    _option(g, "--image-column", "Parquet input: the column holding encoded image bytes")
    _option(g, "--id-column", "Parquet input: the column that names each image in the output",
            default="<file>#<row>")
    _option(g, "--max-pixels", "images with more pixels are failures (image_too_large), never decoded",
            type=int)


def _model_options(g) -> None:
    _option(g, "--model", f"{_REQUIRED}: {REQUIRED['model']}")
    _option(g, "--labels", "labels file: one label per line, or `id label` lines", metavar="FILE",
            default="the labels file in the model's metadata, if any")
    _option(g, "--output-format", "decode the outputs as this family instead of detecting it from "
            "their shapes", choices=OUTPUT_FORMATS)
    _option(g, "--anchors", "raw per-anchor detectors (SSD without its post-processing op, MediaPipe): "
            "their anchors, N rows cy, cx, h, w normalised (.npy or .csv), where no known layout fits",
            metavar="FILE", default="recognised from the input size and N")
    _option(g, "--nms", "non-maximum suppression: weighted (MediaPipe's: kept boxes and keypoints are score-"
            "weighted means of those they suppress; mediapipe family only) or plain greedy; auto: the "
            "family's own (weighted for mediapipe, plain for the rest)", choices=NMS_CHOICES)
    _option(g, "--score-threshold", "detections below it are not written", type=float,
            metavar="S")
    _option(g, "--resize", "how images are fitted to the model input; auto: letterbox for YOLO, "
            "stretch for SSD", choices=RESIZE_CHOICES)
    _option(g, "--normalization", "float inputs: the pixel range the model expects; integer inputs "
            "follow the model's quantization unless forced", choices=NORMALIZATIONS)
    _option(g, "--input-mean", "float inputs: (pixel - mean) / std per RGB channel, in pixel units "
            "(0..255); with --input-std, instead of --normalization", metavar="M[,M,M]")
    _option(g, "--input-std", "see --input-mean", metavar="S[,S,S]")


def _output_options(g) -> None:
    _option(g, "--output", f"{_REQUIRED}: {REQUIRED['output']}")
    _option(g, "--part-rows", "images per output part file: files per table = images / this", type=int)
    _option(g, "--overwrite", "replace a previous run in --output", action="store_true")
    _option(g, "--resume", "finish a previous run in --output (re-running the same command does this "
            "too); refused if the model, input or settings changed", action="store_true")
    _option(g, "--incremental", "process only what is new or changed in the input since the runs "
            "already in --output, as a new run (rows carry its run_id); nothing new: says so and exits 0",
            action="store_true")
    _option(g, "--retry-failures", "process again, as a new run, only the images whose latest record is a "
            "failure: all of them, those of a stage (read) or of a stage and type (read/read_error)",
            nargs="?", const="all", metavar="STAGE[/TYPE]", default="off")
    _option(g, "--allow-nonempty-output", "write into an --output inside the input, or one holding "
            "files that are not a previous run's", action="store_true")


def _cluster_options(g) -> None:
    _option(g, "--address", "the Ray cluster to join", default="$RAY_ADDRESS, else an embedded Ray")
    _option(g, "--ray-min-images", "without a cluster, runs of fewer images than this use worker "
            "processes of this machine instead of starting Ray; 0: always Ray", type=int,
            default=f"{RAY_MIN_IMAGES_PER_CPU:,} per CPU of this machine, at most {RAY_MIN_IMAGES_CAP:,}")
    _option(g, "--num-actors", "detector actors in all", type=int,
            default="one per --cpus-per-actor CPUs of each node, as its memory allows")
    _option(g, "--cpus-per-actor", "CPUs (and interpreter threads) per actor", type=int,
            default=f"1, or the CPUs a smaller pool leaves unused shared out, at most {MAX_AUTO_THREADS}")
    _option(g, "--memory-per-actor-mb", "memory Ray reserves per actor", type=int,
            default="estimated from the model and the images in flight")
    _option(g, "--node-memory-share", "share of each node's Ray memory detector actors may reserve",
            type=float, metavar="F")


def _tuning_options(g) -> None:
    _option(g, "--shard-size", "images per shard: the unit of work, commit and retry", type=int)
    _option(g, "--batch-size", "images per invoke when the model's batch dimension is dynamic (a "
            "fixed batch runs 1, noted in the manifest)", type=int)
    _option(g, "--max-shards-in-flight", "per actor: the backpressure bound", type=int)
    _option(g, "--read-ahead", "images each worker keeps read ahead of its model; 0: sized from the "
            "store's measured latency and the model's time per image", type=int)
    _option(g, "--decode-threads", "threads decoding images ahead of each worker's model; 0: decode "
            "on the model's thread, one image after another", type=int,
            default="sized per worker, from its interpreter threads")
    _option(g, "--listing-processes", "processes listing a folder, prefix or glob (S3 or local) once it "
            "is large: S3 listing is bound by parsing, ~5,000 keys/s per process; 1: the driver's process alone",
            type=int, default=f"one per CPU of this machine, at most {MAX_AUTO_LISTING}")
    _option(g, "--no-jpeg-draft", "decode JPEGs at full size, not at the smallest libjpeg scale that "
            "keeps what the resize needs", action="store_false", dest="jpeg_draft")


def _operating_options(g) -> None:
    _option(g, "--config", "TOML file with any of these options as keys (flags override it)",
            metavar="FILE")
    _option(g, "--storage-option", "fsspec storage option (e.g. endpoint_url=...), repeatable",
            action="append", type=_storage_option, dest="storage_options", metavar="KEY=VALUE")
    _option(g, "--max-failure-rate", "exit 1 (after committing everything) when more than this "
            "fraction of images failed", type=float, metavar="R", default="no limit")
    _option(g, "--store-timeout", "seconds an object store may stay unavailable (throttling, unreachable) "
            "while the run pauses and retries; past it, exit 1 and the same command resumes", type=float,
            metavar="S")
    _option(g, "--dry-run", "list, plan, load the model and time it on a sample; print the plan, "
            "write nothing", action="store_true")
    _option(g, "--json", "print the final manifest as JSON", action="store_true")


# `run --help` in this order: what a first run needs before what a large one tunes.
_RUN_GROUPS = (
    ("input", "what to read (--input is required, as a flag or in --config)", _input_options),
    ("model", "the detector, and how pixels go in and detections come out (--model is required)", _model_options),
    ("output", "where the Parquet goes, and what becomes of a previous run there (--output is required)",
     _output_options),
    ("cluster", "where the run happens and how many workers it gets", _cluster_options),
    ("tuning", "speed and memory", _tuning_options),
    ("operating", "the job file, credentials, limits and what is printed", _operating_options),
)


def _run_parser(sub) -> argparse.ArgumentParser:
    run = sub.add_parser("run", help="run a TFLite detector over images into Parquet",
                         usage="%(prog)s --model MODEL --input INPUT --output OUTPUT [options]",
                         argument_default=argparse.SUPPRESS)
    _version(run)  # jobs/detect.py hands every argument to `run`
    for title, text, add_options in _RUN_GROUPS:
        add_options(run.add_argument_group(title, text))
    return run


def _version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"batch-detect {__version__}")


def _storage_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage-option", action="append", type=_storage_option, default=[], metavar="KEY=VALUE")


def _json_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--json", action="store_true", help=f"print the {what} as JSON")


def _inspect_parser(sub) -> None:
    ins = sub.add_parser("inspect", help="explain a model: tensors, ops, detected family, warnings")
    ins.add_argument("model", help="path or URL of a .tflite file")
    ins.add_argument("--normalization", choices=NORMALIZATIONS, default="auto")
    ins.add_argument("--output-format", choices=OUTPUT_FORMATS, default="auto")
    ins.add_argument("--anchors", metavar="FILE", help="a raw per-anchor detector's anchors (N x 4 cy, cx, h, w)")
    ins.add_argument("--nms", choices=NMS_CHOICES, default="auto", help="as for run")
    _storage_flag(ins)
    _json_flag(ins, "report")


def _compare_parser(sub) -> None:
    cmp_ = sub.add_parser("compare", help="how far a model's detections drift from a reference model's")
    cmp_.add_argument("--model", required=True, help="the model under test (e.g. the quantized one)")
    cmp_.add_argument("--reference", required=True, help="the model to compare against (e.g. the float one)")
    cmp_.add_argument("--input", required=True, help="images to compare on (folder, prefix, glob, manifest)")
    cmp_.add_argument("--labels", default=None)
    cmp_.add_argument("--sample", type=int, default=200, help="images to use, spread over the input (0: all)")
    cmp_.add_argument("--score-threshold", type=float, default=0.25)
    cmp_.add_argument("--resize", choices=RESIZE_CHOICES, default="auto",
                      help="default auto: by family, letterbox for YOLO, stretch for SSD (as run)")
    cmp_.add_argument("--output-format", choices=OUTPUT_FORMATS, default="auto")
    cmp_.add_argument("--out", default=None, help="folder for compare.parquet (per image) and compare.json")
    _storage_flag(cmp_)


def _quantize_parser(sub) -> None:
    q = sub.add_parser("quantize", help="int8 post-training quantization of a SavedModel/Keras detector, "
                                        "calibrated on your images, then compared with the float model")
    q.add_argument("--saved-model", required=True, help="SavedModel folder or .keras file (float detector)")
    q.add_argument("--input", required=True, help="images to calibrate and compare on (folder, prefix, glob, manifest)")
    q.add_argument("--output", required=True, help="the quantized .tflite to write (a float32 reference "
                                                   "OUT.float32.tflite and the report OUT.compare/ go next to it)")
    q.add_argument("--samples", type=int, default=100, help="calibration images, spread over the input (default 100)")
    q.add_argument("--io", choices=("int8", "uint8", "float32"), default="int8",
                   help="dtype of the model's input (and YOLO output) tensors; inside it is int8 (default int8)")
    q.add_argument("--normalization", choices=NORMALIZATIONS, default="auto",
                   help="pixel range the float model expects (default: the family's, YOLO 0,1, SSD -1,1)")
    q.add_argument("--input-mean", default=None, metavar="M[,M,M]", help="instead of --normalization: pixel units")
    q.add_argument("--input-std", default=None, metavar="S[,S,S]")
    q.add_argument("--output-format", choices=OUTPUT_FORMATS, default="auto")
    q.add_argument("--resize", choices=RESIZE_CHOICES, default="auto",
                   help="calibration images are fitted as a run will (default auto: letterbox for YOLO, "
                   "stretch for SSD)")
    q.add_argument("--compare-sample", type=int, default=200, help="images for the drift check (0: all)")
    q.add_argument("--score-threshold", type=float, default=0.25, help="for the drift check")
    q.add_argument("--labels", default=None, help="labels file, for names in the drift report")
    _storage_flag(q)


def _report_parser(sub) -> None:
    rep = sub.add_parser("report", help="summarise a run: numbers in the terminal, an HTML folder with pictures")
    rep.add_argument("output", help="the --output of a run")
    rep.add_argument("--html", default=None, help="folder for the HTML report (default: ./report-<run id>)")
    rep.add_argument("--samples", type=int, default=12, help="images in the gallery")
    _storage_flag(rep)


def _verify_parser(sub) -> None:
    ver = sub.add_parser("verify", help="check that an output is whole: every image exactly once, all committed")
    ver.add_argument("output", help="the --output of a run")
    ver.add_argument("--input", default=None, help="also check the plan against what this input lists now")
    _storage_flag(ver)
    _json_flag(ver, "report")


def _status_parser(sub) -> None:
    st = sub.add_parser("status", help="where a run stands (running or finished), read from its output alone")
    st.add_argument("output", help="the --output of a run (local or an fsspec URL)")
    _storage_flag(st)
    _json_flag(st, "status")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batch-detect", description=__doc__.splitlines()[0])
    _version(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    for add_parser in (_run_parser, _inspect_parser, _compare_parser, _quantize_parser, _report_parser,
                       _verify_parser, _status_parser):
        add_parser(sub)
    return parser


_CLI_ONLY = ("config", "json", "dry_run", "command")


def _quantize(args: argparse.Namespace) -> int:
    from .quantize import quantize

    so = dict(args.storage_option)
    # The same checks as a run's config for the shared settings (mean/std, output format).
    norm = RunConfig(model="-", input="-", output="-", normalization=args.normalization,
                     input_mean=args.input_mean, input_std=args.input_std,
                     output_format=args.output_format).validate()
    quantize(args.saved_model, args.input, args.output, samples=args.samples, io=args.io,
             normalization=norm.pixel_normalization, resize=args.resize, output_format=args.output_format,
             compare_sample=args.compare_sample, score_threshold=args.score_threshold,
             labels=_labels(args, so), storage_options=so)
    return 0


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """RunConfig defaults, then the --config file, then the flags given on the command line."""
    flags = {k: v for k, v in vars(args).items() if k not in _CLI_ONLY}
    if "storage_options" in flags:
        flags["storage_options"] = dict(flags["storage_options"])
    config_file = getattr(args, "config", None)
    # Inside a Ray job first: a relative --config is looked for in Ray's copy of the working dir.
    _note(job_paths({"--config": config_file, **_paths(flags)}))
    values = load_config_file(config_file) if config_file else {}
    _note(job_paths(_paths({k: v for k, v in values.items() if k not in flags})))
    if "storage_options" in values and "storage_options" in flags:
        flags["storage_options"] = {**values["storage_options"], **flags["storage_options"]}
    return config_from_values({**values, **flags})


def _paths(values: dict) -> dict[str, str | None]:
    """The local-path settings among `values`, by flag."""
    return {f"--{name}": values.get(name) for name in PATH_KEYS if name in values}


def _note(line: str | None) -> None:
    if line:
        print(f"batch-detect: {line}", file=sys.stderr, flush=True)


def _print_summary(manifest: dict, out) -> None:
    c, t = manifest["counts"], manifest["timings"]
    print(f"status: {manifest['status']}  run_id: {manifest['run_id']}", file=out)
    this = (manifest.get("runs") or [{}])[-1]
    if this.get("incremental"):
        print(f"run {this['run_id']}: {this['listed']} objects listed, {this['new']} new, {this['changed']} changed, "
              f"{this['unchanged']} already processed; {this['images']} processed, {this['failures']} failed, "
              f"{this['detections']} detections", file=out)
        print(f"output ({len(manifest['runs'])} runs): {c['images']} processed, {c['failures']} failed, "
              f"{c['detections']} detections, {count(c['committed_shards'], 'shard')} committed", file=out)
    else:
        print(f"images: {c['listed']} listed, {c['images']} processed, {c['failures']} failed, "
              f"{c['detections']} detections, {count(c['committed_shards'], 'shard')} committed", file=out)
    if c["failure_types"]:
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(c["failure_types"].items()))
        print(f"failures by stage/type: {kinds}", file=out)
    for warning in manifest.get("warnings", []):
        print(f"warning: {warning}", file=out)
    for node in manifest["cluster"].get("lost_nodes", []):
        print(f"node lost: {node['node_id'][:8]} ({node['address']}) at {node['lost_at']}, {node['why']}; "
              f"{node['shards_requeued']} shards re-queued", file=out)
    rate = t["images_per_s"]
    print(f"time: {t['total_s']:.1f}s total, {t['run_s']:.1f}s processing"
          + (f" ({rate:.1f} images/s)" if rate else "")
          + " on " + (count(manifest["cluster"]["actors"], "worker process", "worker processes") + ", without Ray"
                      if manifest["cluster"].get("executor") == "local processes"
                      else count(manifest["cluster"]["actors"], "actor")),
          file=out)


def _verify(args: argparse.Namespace) -> int:
    from .verify import verify

    report = verify(args.output, args.input, dict(args.storage_option))
    if args.json:
        print(json.dumps({"ok": report.ok, "facts": report.facts, "problems": report.problems}, indent=2))
    else:
        f = report.facts
        print(f"{args.output}: {'OK' if report.ok else 'NOT OK'}")
        planned = f.get("planned_images")
        planned = "an unknown number of" if planned is None else planned  # the listing never ended
        print(f"planned {planned} images in {f.get('planned_shards')} shards; "
              f"{f.get('committed_shards')} shards committed; {f.get('images')} images, "
              f"{f.get('failures')} failures, {f.get('detections')} detections")
        for problem in report.problems:
            print(f"  problem: {problem}")
    return 0 if report.ok else 1


_open_progress: list = []  # the run's progress bar, whose line an error must first end


def _error(problem, prefix: str = "batch-detect: error: ") -> None:
    """Every error the CLI prints: on a line of its own (a progress bar's line is ended first) and ending
    with a newline, so that whatever is printed next (Ray's shutdown, the shell prompt) does not join it."""
    for bar in _open_progress:
        bar.end_line()
    sys.stderr.write(prefix + str(problem).rstrip() + "\n")
    sys.stderr.flush()


def _negative_values(argv: list[str]) -> list[str]:
    """`--normalization -1,1` as people type it: argparse takes a value starting with '-' for a flag."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--normalization" and i + 1 < len(argv) and argv[i + 1] in NORMALIZATIONS:
            out.append(f"--normalization={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """argparse, plus the closest known flag for each unrecognised one (argparse names none, while an
    unknown key in a TOML file gets one: a flag deserves the same)."""
    parser = build_parser()
    args, extras = parser.parse_known_args(_negative_values(sys.argv[1:] if argv is None else argv))
    if not extras:
        return args
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    command = subcommands[args.command]
    flags = sorted({o for a in command._actions for o in a.option_strings if o.startswith("--")})
    problems = []
    for extra in extras:
        name = extra.split("=", 1)[0]
        if not name.startswith("-"):
            continue  # the value of an unknown flag, or a stray word: named with the flag, or below
        close = difflib.get_close_matches(name, flags, n=1, cutoff=0.6)
        problems.append(f"unknown flag {name}" + (f"; did you mean {close[0]}?" if close else ""))
    if not problems:
        problems.append(f"unexpected argument(s): {' '.join(extras)}")
    # Just the line, without argparse's usage block: the suggestion must not scroll out of sight.
    command.exit(2, f"{command.prog}: error: {'; '.join(problems)} (`{command.prog} --help` lists them)\n")


# The URL arguments of the subcommands other than `run` (whose config checks its own).
_URL_ARGS = {"model": "--model", "reference": "--reference", "input": "--input", "output": "--output",
             "labels": "--labels", "saved_model": "--saved-model"}


def _check_stores(args: argparse.Namespace) -> None:
    """The same store checks as a run's: unknown --storage-option keys, credentials and endpoint."""
    urls = {flag: getattr(args, name) for name, flag in _URL_ARGS.items() if getattr(args, name, None)}
    options = dict(getattr(args, "storage_option", []))
    check_storage_options(options, urls)
    check_store_access(list(urls.values()), options)


# status, verify, report, inspect, compare: how long they wait out an unavailable store before saying so
QUERY_STORE_TIMEOUT_S = 30.0

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command != "run":
            _check_stores(args)  # a run's config checks its stores with the rest of its settings
            # a command someone waits on at a prompt: not ten minutes
            configure_outage(QUERY_STORE_TIMEOUT_S, limit=f"what `{args.command}` waits")
        return _COMMANDS[args.command](args)
    except StoreUnavailable as exc:
        _error(exc, prefix="batch-detect: ")
        return 1
    except BatchDetectError as exc:  # bad model/config/input/output, whichever command met it
        _error(exc)
        return 2


def _labels(args: argparse.Namespace, storage_options: dict):
    from ..model.labels import load_labels

    return load_labels(args.labels, storage_options) if args.labels else None


def _inspect(args: argparse.Namespace) -> int:
    from .inspect import inspect_model, render

    report = inspect_model(args.model, args.normalization, dict(args.storage_option), args.output_format,
                           args.anchors, args.nms)
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0 if report["family"] else 1


def _compare(args: argparse.Namespace) -> int:
    from .compare import compare, render, write

    so = dict(args.storage_option)
    result = compare(args.model, args.reference, args.input, sample=args.sample,
                     score_threshold=args.score_threshold, resize=args.resize, output_format=args.output_format,
                     labels=_labels(args, so), storage_options=so)
    print(render(result))
    if args.out:
        write(result, args.out)
        print(f"written: {args.out}/compare.parquet, {args.out}/compare.json")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import default_html_folder, render_text, summarize, write_html

    try:
        summary = summarize(args.output, dict(args.storage_option), samples=args.samples)
    except (BatchDetectError, FileNotFoundError) as exc:
        _error(f"cannot read {args.output!r} as a run's output: {exc}")
        return 2
    print(render_text(summary))
    folder = args.html or default_html_folder(args.output, summary["manifest"])
    print(f"html: {write_html(summary, folder, args.samples, dict(args.storage_option))}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from .status import render, status

    result = status(args.output, dict(args.storage_option))
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


def _run_command(args: argparse.Namespace) -> int:
    """`run`; a BatchDetectError not answered here is main's exit 2."""
    try:
        config = config_from_args(args)
        if getattr(args, "dry_run", False):
            from .dryrun import dry_run

            print(dry_run(config))
            return 0
        summary = _run_with_progress(config)
    except (FailureRateExceeded, StoreUnavailable) as exc:
        notes = "".join(f" ({note})" for note in getattr(exc, "__notes__", ()))
        _error(f"{exc}{notes}", prefix="batch-detect: ")
        return 1
    except HeadUnreachable as exc:
        _error(exc)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)  # Ray's exit handler would wait minutes for the unreachable head
    except KeyboardInterrupt as exc:
        stays = "".join(f"{note}. " for note in getattr(exc, "__notes__", ()))  # the run's count, when it has one
        _error(f"interrupted: {stays or 'what was committed stays in the output. '}Re-run the same command (or add "
               "--resume) to go on", prefix="batch-detect: ")
        return 143 if isinstance(exc, Terminated) else 130
    for bar in _open_progress:
        bar.end_line()  # the summary starts on a line of its own
    manifest = summary.manifest
    if summary.nothing_new is not None:
        _print_nothing_new(summary, getattr(args, "json", False))
        return _failure_verdict(manifest, config)
    if getattr(args, "json", False):
        print(json.dumps(manifest, indent=2, sort_keys=True))
    else:
        _print_summary(manifest, sys.stdout)
        print(f"output: {summary.output}", file=sys.stdout)
    if manifest["status"] != "complete":
        return 1
    return _failure_verdict(manifest, config)


def _run_with_progress(config: RunConfig):
    """The run, with its phases and then a progress bar on stderr (stdout is for the summary)."""
    from ..run.pipeline import run

    progress: dict = {}

    def on_start(actors: int, done_shards: int, done_images: int, without_ray: bool = False,
                 threads: int = 1) -> None:
        resumed = f" ({done_shards} shards already committed, resuming)" if done_shards else ""
        workers = f"{actors} worker processes" if without_ray else f"{actors} actors"
        if threads > 1:
            workers += f" of {threads} interpreter threads each"
        print(f"running on {workers}{resumed}; the input is listed as the run goes", file=sys.stderr)
        progress["bar"] = Progress(None, None, done_images=done_images, done_shards=done_shards,
                                   listing=progress.get("listing"))
        _open_progress[:] = [progress["bar"]]

    return run(config, on_start=on_start, on_shard=lambda s: progress["bar"].update(s),
               on_listed=lambda images, shards: progress["bar"].listed(images, shards),
               on_phase=lambda text: print(f"{text} ...", file=sys.stderr, flush=True),
               on_listing=lambda stats: progress.__setitem__("listing", stats))


def _print_nothing_new(summary, as_json: bool) -> None:
    """A re-run that found nothing to process: why, and that nothing was written."""
    n = summary.nothing_new
    if as_json:
        print(json.dumps({"status": "nothing_new", **n}, indent=2, sort_keys=True))
    elif n.get("complete"):
        print(f"already complete: {n['unchanged'] + n['changed']} planned images in {summary.output}, and the "
              f"input still lists exactly them; nothing to do ({n['total_s']:.1f}s)")
        if n["changed"]:
            from ..inputs.history import changed_since_planned

            print(f"batch-detect: warning: {changed_since_planned(n['changed'])}", file=sys.stderr)
    elif "retried" in n:
        print(f"nothing to retry: none of the {n['unchanged']} images listed has such a failure as its latest "
              f"record in {summary.output}; nothing was written ({n['total_s']:.1f}s)")
    else:
        print(f"nothing new: {n['unchanged']} objects listed, all processed by the {n['runs']} runs in "
              f"{summary.output}; nothing was written ({n['total_s']:.1f}s)")


_COMMANDS = {"run": _run_command, "inspect": _inspect, "compare": _compare, "quantize": _quantize,
             "report": _report, "status": _status, "verify": _verify}


def _failure_verdict(manifest: dict, config: RunConfig) -> int:
    """1 when the output's failures exceed --max-failure-rate: the same answer for the run and every re-run
    that finds nothing left to do."""
    rate, limit = manifest["counts"]["failure_rate"], config.max_failure_rate
    if limit is not None and rate > limit:
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(manifest["counts"]["failure_types"].items()))
        _error(f"{rate:.1%} of images failed, over --max-failure-rate {limit:g} ({kinds}); the output is "
               "complete and committed", prefix="batch-detect: ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
