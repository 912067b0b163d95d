"""`batch-detect`: the command line. Exit codes: 0 done, 1 the run failed, 2 bad model/config/input/output
(reported before any actor starts, nothing claimed as done)."""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys

from .config import _SECRET_KEY, IMAGE_EXTENSIONS, INPUT_FORMATS, NORMALIZATIONS, RunConfig, config_from_values, load_config_file
from .decoding import OUTPUT_FORMATS
from .errors import BatchDetectError, FailureRateExceeded, HeadUnreachable, Terminated
from .geometry import RESIZE_MODES
from .progress import Progress
from .storage import check_storage_options, check_store_access


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batch-detect", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    # Run options default to "not given" so that a --config file can supply them and flags override it.
    run = sub.add_parser("run", help="run a TFLite detector over images into Parquet",
                         argument_default=argparse.SUPPRESS)
    run.add_argument("--config", help="TOML file with any of these options as keys (flags override it)")
    run.add_argument("--model", help="path or URL of the .tflite detector (required)")
    run.add_argument("--input", help="folder, prefix or glob of images, local or fsspec URL (required)")
    run.add_argument("--output", help="folder or prefix for the Parquet output (required)")
    run.add_argument("--labels", help="labels file: one label per line, or `id label` lines")
    run.add_argument("--score-threshold", type=float, help="default 0.25")
    run.add_argument("--shard-size", type=int, help="images per shard, the unit of work and commit (default 64)")
    run.add_argument("--resize", choices=RESIZE_MODES, help="default stretch")
    run.add_argument("--normalization", choices=NORMALIZATIONS,
                     help="float inputs: pixel range the model expects; integer inputs follow the model's "
                          "quantization unless forced (default auto)")
    run.add_argument("--input-mean", metavar="M[,M,M]",
                     help="float inputs: (pixel - mean) / std per RGB channel, in pixel units (0..255); "
                          "with --input-std, instead of --normalization")
    run.add_argument("--input-std", metavar="S[,S,S]", help="see --input-mean")
    run.add_argument("--output-format", choices=OUTPUT_FORMATS,
                     help="decode the outputs as this family instead of detecting it (default auto)")
    run.add_argument("--max-pixels", type=int, help="refuse images with more pixels than this")
    run.add_argument("--no-jpeg-draft", action="store_false", dest="jpeg_draft",
                     help="decode JPEGs at full size (default: at the smallest libjpeg scale not below the model input)")
    run.add_argument("--extensions", help="comma-separated file extensions to process; '*' for every file "
                                          f"(default {','.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)})")
    run.add_argument("--batch-size", type=int,
                     help="images per invoke when the model's batch dimension is dynamic (default 1; a fixed "
                          "batch runs 1, noted in the manifest)")
    run.add_argument("--input-format", choices=INPUT_FORMATS,
                     help="files (images), tar (WebDataset-style shards, one shard per tar) or parquet (rows "
                          "with an image-bytes column); default auto")
    run.add_argument("--image-column", help="Parquet input: the column holding encoded image bytes")
    run.add_argument("--id-column", help="Parquet input: the column that names each image in the output "
                                         "(default: <file>#<row>)")
    run.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else an embedded local Ray)")
    run.add_argument("--num-actors", type=int, help="default: one per --cpus-per-actor CPUs")
    run.add_argument("--ray-min-images", type=int,
                     help="without --address, runs of fewer images than this (default: 2,500 per CPU of this "
                          "machine, at most 50,000) use worker processes on this machine instead of starting Ray "
                          "(0: always Ray)")
    run.add_argument("--cpus-per-actor", type=int,
                     help="CPUs (and interpreter threads) per actor (default: 1, or the CPUs a smaller pool leaves "
                          "unused shared out, at most 8)")
    run.add_argument("--decode-threads", type=int, metavar="N",
                     help="threads decoding images ahead of each worker's model (default: sized per node; 0: "
                          "decode on the model's thread, one image after another)")
    run.add_argument("--max-shards-in-flight", type=int, help="per actor: the backpressure bound (default 2)")
    run.add_argument("--read-ahead", type=int, metavar="N",
                     help="images each worker keeps read ahead of its model (default 0: sized from the store's "
                          "measured latency and the model's time per image; never fewer than 4)")
    run.add_argument("--part-rows", type=int,
                     help="images per output part file (default 100000): files per table = images / this")
    run.add_argument("--memory-per-actor-mb", type=int,
                     help="memory Ray reserves per actor (default: estimated from the model and prefetch)")
    run.add_argument("--node-memory-share", type=float,
                     help="share of each node's Ray memory detector actors may reserve (default 0.8)")
    run.add_argument("--storage-option", action="append", type=_storage_option, dest="storage_options",
                     metavar="KEY=VALUE", help="fsspec storage option (e.g. endpoint_url=...), repeatable")
    run.add_argument("--overwrite", action="store_true", help="replace a previous run in --output")
    run.add_argument("--incremental", action="store_true",
                     help="process only what is new or changed in the input since the runs already in --output, "
                          "as a new run (rows carry its run_id); nothing new: says so and exits 0")
    run.add_argument("--allow-nonempty-output", action="store_true",
                     help="write into an --output inside the input, or one holding files that are not a previous "
                          "run's (refused by default)")
    run.add_argument("--resume", action="store_true",
                     help="finish a previous run in --output (re-running the same command does this too); "
                          "refused if the model, input or settings changed")
    run.add_argument("--max-failure-rate", type=float, metavar="R",
                     help="exit 1 (after committing everything) when more than this fraction of images failed")
    run.add_argument("--dry-run", action="store_true",
                     help="list, plan, load the model and time it on a sample; print the plan, write nothing")
    run.add_argument("--json", action="store_true", help="print the final manifest as JSON")

    ins = sub.add_parser("inspect", help="explain a model: tensors, ops, detected family, warnings")
    ins.add_argument("model", help="path or URL of a .tflite file")
    ins.add_argument("--normalization", choices=NORMALIZATIONS, default="auto")
    ins.add_argument("--output-format", choices=OUTPUT_FORMATS, default="auto")
    ins.add_argument("--storage-option", action="append", type=_storage_option, default=[], metavar="KEY=VALUE")
    ins.add_argument("--json", action="store_true", help="print the report as JSON")

    cmp_ = sub.add_parser("compare", help="how far a model's detections drift from a reference model's")
    cmp_.add_argument("--model", required=True, help="the model under test (e.g. the quantized one)")
    cmp_.add_argument("--reference", required=True, help="the model to compare against (e.g. the float one)")
    cmp_.add_argument("--input", required=True, help="images to compare on (folder, prefix, glob, manifest)")
    cmp_.add_argument("--labels", default=None)
    cmp_.add_argument("--sample", type=int, default=200, help="images to use, spread over the input (0: all)")
    cmp_.add_argument("--score-threshold", type=float, default=0.25)
    cmp_.add_argument("--resize", choices=RESIZE_MODES, default="stretch")
    cmp_.add_argument("--output-format", choices=OUTPUT_FORMATS, default="auto")
    cmp_.add_argument("--out", default=None, help="folder for compare.parquet (per image) and compare.json")
    cmp_.add_argument("--storage-option", action="append", type=_storage_option, default=[], metavar="KEY=VALUE")

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
    q.add_argument("--resize", choices=RESIZE_MODES, default="stretch")
    q.add_argument("--compare-sample", type=int, default=200, help="images for the drift check (0: all)")
    q.add_argument("--score-threshold", type=float, default=0.25, help="for the drift check")
    q.add_argument("--labels", default=None, help="labels file, for names in the drift report")
    q.add_argument("--storage-option", action="append", type=_storage_option, default=[], metavar="KEY=VALUE")

    rep = sub.add_parser("report", help="summarise a run: numbers in the terminal, an HTML folder with pictures")
    rep.add_argument("output", help="the --output of a run")
    rep.add_argument("--html", default=None, help="folder for the HTML report (default: ./report-<run id>)")
    rep.add_argument("--samples", type=int, default=12, help="images in the gallery")
    rep.add_argument("--storage-option", action="append", type=_storage_option, default=[], metavar="KEY=VALUE")

    ver = sub.add_parser("verify", help="check that an output is whole: every image exactly once, all committed")
    ver.add_argument("output", help="the --output of a run")
    ver.add_argument("--input", default=None, help="also check the plan against what this input lists now")
    ver.add_argument("--storage-option", action="append", type=_storage_option, default=[], metavar="KEY=VALUE")
    ver.add_argument("--json", action="store_true", help="print the report as JSON")
    st = sub.add_parser("status", help="where a run stands (running or finished), read from its output alone")
    st.add_argument("output", help="the --output of a run (local or an fsspec URL)")
    st.add_argument("--storage-option", action="append", type=_storage_option, default=[], metavar="KEY=VALUE")
    st.add_argument("--json", action="store_true", help="print the status as JSON")
    return parser


_CLI_ONLY = ("config", "json", "dry_run", "command")


def _quantize(args: argparse.Namespace) -> int:
    from .labels import load_labels
    from .quantize import quantize

    so = dict(args.storage_option)
    # The same checks as a run's config for the shared settings (mean/std, output format).
    norm = RunConfig(model="-", input="-", output="-", normalization=args.normalization,
                     input_mean=args.input_mean, input_std=args.input_std,
                     output_format=args.output_format).validate()
    quantize(args.saved_model, args.input, args.output, samples=args.samples, io=args.io,
             normalization=norm.pixel_normalization, resize=args.resize, output_format=args.output_format,
             compare_sample=args.compare_sample, score_threshold=args.score_threshold,
             labels=load_labels(args.labels, so) if args.labels else None, storage_options=so)
    return 0


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """RunConfig defaults, then the --config file, then the flags given on the command line."""
    flags = {k: v for k, v in vars(args).items() if k not in _CLI_ONLY}
    if "storage_options" in flags:
        flags["storage_options"] = dict(flags["storage_options"])
    values = load_config_file(args.config) if getattr(args, "config", None) else {}
    if "storage_options" in values and "storage_options" in flags:
        flags["storage_options"] = {**values["storage_options"], **flags["storage_options"]}
    return config_from_values({**values, **flags})


def _print_summary(manifest: dict, out) -> None:
    c, t = manifest["counts"], manifest["timings"]
    print(f"status: {manifest['status']}  run_id: {manifest['run_id']}", file=out)
    this = (manifest.get("runs") or [{}])[-1]
    if this.get("incremental"):
        print(f"run {this['run_id']}: {this['listed']} objects listed, {this['new']} new, {this['changed']} changed, "
              f"{this['unchanged']} already processed; {this['images']} processed, {this['failures']} failed, "
              f"{this['detections']} detections", file=out)
        print(f"output ({len(manifest['runs'])} runs): {c['images']} processed, {c['failures']} failed, "
              f"{c['detections']} detections, {c['committed_shards']} shards committed", file=out)
    else:
        print(f"images: {c['listed']} listed, {c['images']} processed, {c['failures']} failed, "
              f"{c['detections']} detections, {c['committed_shards']} shards committed", file=out)
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
          + f" on {manifest['cluster']['actors']} "
          + ("worker processes, without Ray" if manifest["cluster"].get("executor") == "local processes" else "actors"),
          file=out)


def _verify(args: argparse.Namespace) -> int:
    from .verify import verify

    report = verify(args.output, args.input, dict(args.storage_option))
    if args.json:
        print(json.dumps({"ok": report.ok, "facts": report.facts, "problems": report.problems}, indent=2))
    else:
        f = report.facts
        print(f"{args.output}: {'OK' if report.ok else 'NOT OK'}")
        print(f"planned {f.get('planned_images')} images in {f.get('planned_shards')} shards; "
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """argparse, plus the closest known flag for each unrecognised one (argparse names none, while an
    unknown key in a TOML file gets one: a flag deserves the same)."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command != "run":
        try:
            _check_stores(args)
        except BatchDetectError as exc:
            _error(exc)
            return 2
    if args.command == "inspect":
        from .inspect import inspect_model, render

        try:
            report = inspect_model(args.model, args.normalization, dict(args.storage_option), args.output_format)
        except BatchDetectError as exc:
            _error(exc)
            return 2
        print(json.dumps(report, indent=2) if args.json else render(report))
        return 0 if report["family"] else 1
    if args.command == "compare":
        from .compare import compare, render, write
        from .labels import load_labels

        so = dict(args.storage_option)
        try:
            result = compare(args.model, args.reference, args.input, sample=args.sample,
                             score_threshold=args.score_threshold, resize=args.resize,
                             output_format=args.output_format,
                             labels=load_labels(args.labels, so) if args.labels else None, storage_options=so)
        except BatchDetectError as exc:
            _error(exc)
            return 2
        print(render(result))
        if args.out:
            write(result, args.out)
            print(f"written: {args.out}/compare.parquet, {args.out}/compare.json")
        return 0
    if args.command == "quantize":
        try:
            return _quantize(args)
        except BatchDetectError as exc:
            _error(exc)
            return 2
    if args.command == "report":
        from .report import render_text, summarize, write_html

        try:
            summary = summarize(args.output, dict(args.storage_option), samples=args.samples)
        except (BatchDetectError, FileNotFoundError) as exc:
            _error(f"cannot read {args.output!r} as a run's output: {exc}")
            return 2
        print(render_text(summary))
        folder = args.html or f"report-run{summary['manifest']['run_id']}"
        print(f"html: {write_html(summary, folder, args.samples, dict(args.storage_option))}")
        return 0
    if args.command == "status":
        from .status import render, status

        try:
            result = status(args.output, dict(args.storage_option))
        except BatchDetectError as exc:
            _error(exc)
            return 2
        print(json.dumps(result, indent=2) if args.json else render(result))
        return 0
    if args.command == "verify":
        try:
            return _verify(args)
        except BatchDetectError as exc:
            _error(exc)
            return 2
    if args.command == "run":
        from .pipeline import run

        progress: dict = {}

        def on_start(actors: int, done_shards: int, done_images: int, without_ray: bool = False,
                     threads: int = 1) -> None:
            resumed = f" ({done_shards} shards already committed, resuming)" if done_shards else ""
            workers = f"{actors} worker processes" if without_ray else f"{actors} actors"
            if threads > 1:
                workers += f" of {threads} interpreter threads each"
            print(f"running on {workers}{resumed}; the input is listed as the run goes", file=sys.stderr)
            progress["bar"] = Progress(None, None, done_images=done_images, done_shards=done_shards)
            _open_progress[:] = [progress["bar"]]

        try:
            config = config_from_args(args)
            if getattr(args, "dry_run", False):
                from .dryrun import dry_run

                print(dry_run(config))
                return 0
            summary = run(config, on_start=on_start, on_shard=lambda s: progress["bar"].update(s),
                          on_listed=lambda images, shards: progress["bar"].listed(images, shards),
                          on_phase=lambda text: print(f"{text} ...", file=sys.stderr, flush=True))
        except FailureRateExceeded as exc:
            _error(exc, prefix="batch-detect: ")
            return 1
        except HeadUnreachable as exc:
            _error(exc)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)  # Ray's exit handler would wait minutes for the unreachable head
        except BatchDetectError as exc:
            _error(exc)
            return 2
        except KeyboardInterrupt as exc:
            _error("interrupted: what was committed stays in the output; re-run the same command (or add --resume) "
                   "to go on", prefix="batch-detect: ")
            return 143 if isinstance(exc, Terminated) else 130
        for bar in _open_progress:
            bar.end_line()  # the summary starts on a line of its own
        manifest = summary.manifest
        if summary.nothing_new is not None:
            n = summary.nothing_new
            if getattr(args, "json", False):
                print(json.dumps({"status": "nothing_new", **n}, indent=2, sort_keys=True))
            elif n.get("complete"):
                print(f"already complete: {n['unchanged'] + n['changed']} planned images in {summary.output}, and the "
                      f"input still lists exactly them; nothing to do ({n['total_s']:.1f}s)")
                if n["changed"]:
                    from .history import changed_since_planned

                    print(f"batch-detect: warning: {changed_since_planned(n['changed'])}", file=sys.stderr)
            else:
                print(f"nothing new: {n['unchanged']} objects listed, all processed by the {n['runs']} runs in "
                      f"{summary.output}; nothing was written ({n['total_s']:.1f}s)")
            return _failure_verdict(manifest, config)
        if getattr(args, "json", False):
            print(json.dumps(manifest, indent=2, sort_keys=True))
        else:
            _print_summary(manifest, sys.stdout)
            print(f"output: {summary.output}", file=sys.stdout)
        if manifest["status"] != "complete":
            return 1
        return _failure_verdict(manifest, config)
    return 2


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
