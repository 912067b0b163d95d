"""Object-store latency: this job's processing rate reading from S3 (moto's server on 127.0.0.1) behind a
proxy that adds a fixed latency to every request, as a store across a network does.

Each worker must keep enough reads in flight to hide the latency (Little's law: reads in flight = latency x
images/s). The same images, model and workers are run with reads in flight sized from the measured latency
(the default, `--read-ahead 0`) and with fixed counts, at each latency, in one invocation:

    python benchmarks/s3_latency.py [--images 240] [--latency-ms 0,50,200] [--read-ahead auto,2] [--repeat 3]
                                    [--tar 60]

`--tar N` packs the images into tars of N (one shard each): a tar streams sequentially, a block of 8 MiB
per request, read on a thread of its own ahead of the interpreter (`--read-ahead` does not apply).
`--output-s3` writes the output to the same store, behind the same latency (staged shards, commit log,
parts), instead of a local folder.

Runs without Ray (fewer images than --ray-min-images) unless `--ray`, so Ray's start does not blur the
rate; the rate is the job's own (images / processing time, from its manifest).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from bench import cpu_model, local_s3, make_images, save  # noqa: E402
from flaky_proxy import FlakyProxy  # noqa: E402

MODEL = os.path.join(ROOT, "benchmarks", "models", "ssd_mobilenet_v2_300_uint8.tflite")


def run_job(input_url: str, output: str, options: dict, read_ahead: str, ray: bool, before: str | None,
            fs=None) -> dict:
    cmd = [sys.executable, "-m", "batch_detect", "run", "--model", MODEL, "--input", input_url,
           "--output", output, "--shard-size", "32", "--score-threshold", "0.5", "--overwrite"]
    if read_ahead not in ("auto", "before"):
        cmd += ["--read-ahead", read_ahead]
    if ray:
        cmd += ["--ray-min-images", "0"]
    for k, v in options.items():
        cmd += ["--storage-option", f"{k}={v}"]
    t0 = time.perf_counter()
    tree = before if read_ahead == "before" else ROOT  # "before": an earlier checkout's code, same everything else
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tree,
                          env={**os.environ, "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": tree})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"job failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    if output.startswith("s3://"):
        fs.invalidate_cache()
        m = json.loads(fs.cat_file(output[len("s3://"):] + "/_manifest.json"))
    else:
        m = json.load(open(os.path.join(output, "_manifest.json")))
    assert m["counts"]["failures"] == 0, m["counts"]
    return {"wall_s": wall, "images": m["counts"]["images"], "run_s": m["timings"]["run_s"],
            "images_per_s": m["counts"]["images"] / m["timings"]["run_s"], "sizing": m.get("sizing")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--latency-ms", default="0,50,200")
    parser.add_argument("--read-ahead", default="auto,2", help="arms: auto and/or fixed reads in flight")
    parser.add_argument("--ray", action="store_true", help="run on embedded Ray instead of worker processes")
    parser.add_argument("--before", help="a checkout of an earlier commit: adds the arm 'before' (its code)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of every arm at each latency, interleaved")
    parser.add_argument("--tar", type=int, default=0, help="pack the images into tars of this many (0: files)")
    parser.add_argument("--output-s3", action="store_true", help="write the output to the store behind the proxy")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args()
    with local_s3("bench") as (options, fs):
        return _measure(args, options, fs)


def _measure(args, options: dict, fs) -> int:
    paths = make_images(os.path.join(ROOT, "benchmarks", "data", "images"), args.images)
    work = tempfile.mkdtemp(prefix="s3lat-")
    if args.tar:
        for t, lo in enumerate(range(0, len(paths), args.tar)):
            local = os.path.join(work, f"shard-{t:04d}.tar")
            with tarfile.open(local, "w") as tar:
                for p in paths[lo:lo + args.tar]:
                    tar.add(p, arcname=f"sample/{os.path.basename(p)}")
            fs.put_file(local, f"bench/in/{os.path.basename(local)}")
    else:
        for p in paths:
            fs.put_file(p, f"bench/in/{os.path.basename(p)}")
    cores = os.cpu_count() or 1
    results = {"cores": cores, "cpu": cpu_model(), "images": args.images, "executor": "ray" if args.ray else
               "worker processes", "output": "s3" if args.output_s3 else "local", "before": args.before and subprocess.run(
                   ["git", "-C", args.before, "rev-parse", "--short", "HEAD"], capture_output=True,
                   text=True).stdout.strip(), "tar": args.tar, "runs": []}
    for latency_ms in [float(x) for x in args.latency_ms.split(",")]:
        with FlakyProxy(options["endpoint_url"], latency_s=latency_ms / 1000) as proxy:
            for rep, arm in itertools.product(range(args.repeat),
                                              (["before"] if args.before else []) + args.read_ahead.split(",")):
                out = (f"s3://bench/out_{latency_ms:g}_{arm}" if args.output_s3
                       else os.path.join(work, f"out_{latency_ms:g}_{arm}"))
                r = run_job("s3://bench/in/", out, {**options, "endpoint_url": proxy.url}, arm, args.ray, args.before, fs)
                r.update(latency_ms=latency_ms, read_ahead=arm, rep=rep)
                results["runs"].append(r)
                print(f"latency {latency_ms:g} ms, read-ahead {arm}: {r['images_per_s']:.1f} images/s "
                      f"({r['run_s']:.1f} s processing, {r['wall_s']:.1f} s wall)", flush=True)
    save(args.out, f"s3_latency_{cores}core" + ("_tar" if args.tar else "") + ("_s3out" if args.output_s3 else ""),
         results, render(results))
    return 0


def render(results: dict) -> str:
    arms = list(dict.fromkeys(r["read_ahead"] for r in results["runs"]))
    packed = f" in tars of {results['tar']}" if results.get("tar") else ""
    written = "; output written to the same store" if results.get("output") == "s3" else ""
    lines = [f"{results['cores']} cores ({results['cpu']}); {results['images']} JPEGs{packed} from S3 (moto on 127.0.0.1) "
             f"behind a proxy adding a fixed latency per request{written}; {results['executor']}; SSD model; images/s = "
             "the job's images / its processing time; median of the repetitions (all runs in brackets)", "",
             "| latency ms | " + " | ".join(f"{a} ({results['before']}) img/s" if a == "before" else
                                            "this checkout img/s" if results.get("tar") or results.get("output") == "s3" else
                                            f"read-ahead {a} img/s" for a in arms) + " | images ahead chosen (auto) |",
             "|---" * (len(arms) + 2) + "|"]
    for lat in dict.fromkeys(r["latency_ms"] for r in results["runs"]):
        runs = {a: [r for r in results["runs"] if r["latency_ms"] == lat and r["read_ahead"] == a] for a in arms}
        chosen = sorted({(r.get("sizing") or {}).get("images_ahead") for r in runs.get("auto", [])} - {None})

        def cell(rs: list) -> str:
            rates = [r["images_per_s"] for r in rs]
            return f"{statistics.median(rates):.1f} ({', '.join(f'{x:.1f}' for x in rates)})" if rates else ""
        lines.append(f"| {lat:g} | " + " | ".join(cell(runs[a]) for a in arms)
                     + f" | {', '.join(map(str, chosen))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
