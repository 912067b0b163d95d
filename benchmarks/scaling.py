"""Scaling with the number of workers on one node (issue #14: "scaling from 2 to 16 actors ≥ 0.8 of
linear"): the job with --num-actors N and one interpreter thread each (--cpus-per-actor 1, so N is the
number of interpreters at work), N = 2, 4, … up to the cores, then the default sizing, on the same
JPEGs, one after another in this one invocation. Rates are the run's own (manifest `run_s`) and the
steady span of its commit log; `vs linear` is rate(N) / (rate(smallest N) × N / smallest N). Machine CPU
seconds per image (all processes, /proc/stat) say where the cores went.

    python benchmarks/scaling.py [--images 2400] [--counts 2,4,8,16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from bench import cpu_model, save  # noqa: E402
from rates import job_inputs, job_run, steady_rate  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2400)
    parser.add_argument("--counts", help="worker counts, comma-separated (default: 2, 4, 8, … up to the cores)")
    parser.add_argument("--flags", default="", help="more flags for the N-worker arms, e.g. '--decode-threads 0'")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    counts = ([int(c) for c in args.counts.split(",")] if args.counts
              else sorted({min(cores, 2 ** k) for k in range(1, cores.bit_length() + 1)}))
    _, work, listing, env = job_inputs(args.images, "scaling-")
    arms = [(f"{n} × 1 thread", ["--num-actors", str(n), "--cpus-per-actor", "1", *args.flags.split()])
            for n in counts]
    arms.append(("default sizing", []))
    runs = []
    for name, extra in arms:
        out = os.path.join(work, "out")
        t, m = job_run(listing, out, env, extra)
        images = m["counts"]["images"]
        run = {"arm": name, "wall_s": t["wall_s"], "executor": m["cluster"].get("executor", "ray"),
               "workers": m["cluster"]["actors"], "threads": m["cluster"].get("cpus_per_actor"),
               "processing": images / m["timings"]["run_s"], "steady": steady_rate(out),
               "cpu_ms_per_image": 1000 * t["cpu_s"] / images,
               "measured": {k: m["sizing"]["measured"].get(k) for k in
                            ("decode_ms_per_image", "infer_ms_per_image", "stall_ms_per_image")}}
        runs.append(run)
        print(json.dumps(run), flush=True)
    base = runs[0]
    for run in runs[:-1]:
        n = int(run["arm"].split()[0])
        scale = n / counts[0]
        run["processing_vs_linear"] = run["processing"] / (base["processing"] * scale)
        run["steady_vs_linear"] = run["steady"] / (base["steady"] * scale)
    results = {"cores": cores, "cpu": cpu_model(), "images": args.images, "flags": args.flags, "runs": runs}
    suffix = "".join(c if c.isalnum() else "_" for c in args.flags.replace("--", "")).strip("_")
    save(args.out, f"scaling_{cores}core" + (f"_{suffix}" if suffix else ""), results, render(results))
    return 0


def render(results: dict) -> str:
    flags = f"; N-worker arms with `{results['flags']}`" if results.get("flags") else ""
    lines = [f"{results['cores']} cores ({results['cpu']}); SSD model; {results['images']} JPEGs; one run per arm, "
             f"back to back in one invocation{flags}", "",
             "| arm | executor | workers × threads | processing images/s | steady images/s | processing vs linear "
             "| steady vs linear | machine CPU ms/image | decode / infer / stall ms per image (worker threads) | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        lin = (f"{r['processing_vs_linear']:.2f} | {r['steady_vs_linear']:.2f}" if "processing_vs_linear" in r
               else "– | –")
        lines.append(f"| {r['arm']} | {r['executor']} | {r['workers']} × {r['threads']} | {r['processing']:.1f} | "
                     f"{r['steady']:.1f} | {lin} | {r['cpu_ms_per_image']:.1f} | "
                     + " / ".join(str(r["measured"][k]) for k in ("decode_ms_per_image", "infer_ms_per_image",
                                                                 "stall_ms_per_image"))
                     + f" | {r['wall_s']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
