"""`batch-detect`: the command line. Exit codes: 0 done, 1 the run failed, 2 bad model/config/input/output
(reported before any actor starts, nothing claimed as done)."""

from __future__ import annotations

import argparse
import json
import sys

from .config import IMAGE_EXTENSIONS, NORMALIZATIONS, RunConfig
from .errors import BatchDetectError
from .geometry import RESIZE_MODES
from .progress import Progress


def _storage_option(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--storage-option takes key=value, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batch-detect", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a TFLite detector over images into Parquet")
    run.add_argument("--model", required=True, help="path or URL of the .tflite detector")
    run.add_argument("--input", required=True, help="folder, prefix or glob of images (local or fsspec URL)")
    run.add_argument("--output", required=True, help="folder or prefix for the Parquet output")
    run.add_argument("--labels", help="labels file: one label per line, or `id label` lines")
    run.add_argument("--score-threshold", type=float, default=0.25)
    run.add_argument("--shard-size", type=int, default=64, help="images per shard (unit of work and commit)")
    run.add_argument("--resize", choices=RESIZE_MODES, default="stretch")
    run.add_argument("--normalization", choices=NORMALIZATIONS, default="auto",
                     help="float inputs: pixel range the model expects; integer inputs follow the model's "
                          "quantization unless forced (auto)")
    run.add_argument("--max-pixels", type=int, default=None, help="refuse images with more pixels than this")
    run.add_argument("--extensions", default=",".join(e.lstrip(".") for e in IMAGE_EXTENSIONS),
                     help="comma-separated file extensions to process; '*' for every file")
    run.add_argument("--address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else an "
                                                      "embedded local Ray)")
    run.add_argument("--num-actors", type=int, default=None, help="default: one per --cpus-per-actor CPUs")
    run.add_argument("--cpus-per-actor", type=int, default=1, help="CPUs (and interpreter threads) per actor")
    run.add_argument("--max-shards-in-flight", type=int, default=2, help="per actor: the backpressure bound")
    run.add_argument("--storage-option", action="append", type=_storage_option, default=[],
                     metavar="KEY=VALUE", help="fsspec storage option (e.g. endpoint_url=...), repeatable")
    run.add_argument("--overwrite", action="store_true", help="replace a previous run in --output")
    run.add_argument("--resume", action="store_true",
                     help="finish a previous run in --output (re-running the same command does this too); "
                          "refused if the model, input or settings changed")
    run.add_argument("--max-failure-rate", type=float, default=None, metavar="R",
                     help="exit 1 (after committing everything) when more than this fraction of images failed")
    run.add_argument("--json", action="store_true", help="print the final manifest as JSON")

    ver = sub.add_parser("verify", help="check that an output is whole: every image exactly once, all committed")
    ver.add_argument("output", help="the --output of a run")
    ver.add_argument("--input", default=None, help="also check the plan against what this input lists now")
    ver.add_argument("--storage-option", action="append", type=_storage_option, default=[], metavar="KEY=VALUE")
    ver.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    extensions = () if args.extensions.strip() == "*" else tuple(
        e.strip() for e in args.extensions.split(",") if e.strip()
    )
    kwargs = dict(
        model=args.model, input=args.input, output=args.output, labels=args.labels,
        score_threshold=args.score_threshold, shard_size=args.shard_size, resize=args.resize,
        normalization=args.normalization, extensions=extensions, address=args.address,
        num_actors=args.num_actors, cpus_per_actor=args.cpus_per_actor,
        max_shards_in_flight=args.max_shards_in_flight, overwrite=args.overwrite, resume=args.resume,
        max_failure_rate=args.max_failure_rate,
        storage_options=dict(args.storage_option),
    )
    if args.max_pixels is not None:
        kwargs["max_pixels"] = args.max_pixels
    return RunConfig(**kwargs)


def _print_summary(manifest: dict, out) -> None:
    c, t = manifest["counts"], manifest["timings"]
    print(f"status: {manifest['status']}  run_id: {manifest['run_id']}", file=out)
    print(f"images: {c['listed']} listed, {c['images']} processed, {c['failures']} failed, "
          f"{c['detections']} detections, {c['committed_shards']} shards committed", file=out)
    if c["failure_types"]:
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(c["failure_types"].items()))
        print(f"failures by stage/type: {kinds}", file=out)
    rate = t["images_per_s"]
    print(f"time: {t['total_s']:.1f}s total, {t['run_s']:.1f}s processing"
          + (f" ({rate:.1f} images/s)" if rate else "")
          + f" on {manifest['cluster']['actors']} actors", file=out)


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "verify":
        try:
            return _verify(args)
        except BatchDetectError as exc:
            print(f"batch-detect: error: {exc}", file=sys.stderr)
            return 2
    if args.command == "run":
        from .pipeline import run

        progress: dict = {}

        def on_start(images: int, shards: int, actors: int, done_shards: int, done_images: int) -> None:
            resumed = f" ({done_shards} already committed, resuming)" if done_shards else ""
            print(f"running {images} images in {shards} shards{resumed} on {actors} actors", file=sys.stderr)
            progress["bar"] = Progress(images, shards, done_images=done_images, done_shards=done_shards)

        try:
            summary = run(config_from_args(args), on_start=on_start,
                          on_shard=lambda s: progress["bar"].update(s))
        except BatchDetectError as exc:
            print(f"batch-detect: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("batch-detect: interrupted; the output is incomplete (see its _manifest.json)", file=sys.stderr)
            return 130
        manifest = summary.manifest
        if args.json:
            print(json.dumps(manifest, indent=2, sort_keys=True))
        else:
            _print_summary(manifest, sys.stdout)
            print(f"output: {summary.output}", file=sys.stdout)
        if manifest["status"] != "complete":
            return 1
        rate, limit = manifest["counts"]["failure_rate"], args.max_failure_rate
        if limit is not None and rate > limit:
            kinds = ", ".join(f"{k}: {v}" for k, v in sorted(manifest["counts"]["failure_types"].items()))
            print(f"batch-detect: {rate:.1%} of images failed, over --max-failure-rate {limit:g} "
                  f"({kinds}); the output is complete and committed", file=sys.stderr)
            return 1
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
