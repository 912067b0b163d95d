"""Where a full node's workers decode: on threads ahead of the interpreter (the decode threads that keep
an interpreter fed where cores are spare) or on the interpreter's own thread (--decode-threads 0), with
one worker per core either way. Arms interleaved over `--rounds`, on the same JPEGs, in one invocation;
the table gives each arm's median. SSD model, the bench.py JPEGs, the default executor at this size.

    python benchmarks/decode_placement.py [--images 9600] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from bench import cpu_model, save  # noqa: E402
from rates import job_inputs, job_run, steady_rate  # noqa: E402

ARMS = {
    "default (decode threads per worker: 2)": ["--decode-threads", "2"],
    "one decode thread per worker": ["--decode-threads", "1"],
    "decode on the interpreter's thread (--decode-threads 0)": ["--decode-threads", "0"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=9600)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    _, work, listing, env = job_inputs(args.images, "placement-")
    runs = []
    for rnd in range(args.rounds):
        for name, extra in ARMS.items():
            out = os.path.join(work, "out")
            t, m = job_run(listing, out, env, extra)
            images = m["counts"]["images"]
            run = {"round": rnd, "arm": name, "wall_s": t["wall_s"], "workers": m["cluster"]["actors"],
                   "processing": images / m["timings"]["run_s"], "steady": steady_rate(out),
                   "cpu_ms_per_image": 1000 * t["cpu_s"] / images}
            runs.append(run)
            print(json.dumps(run), flush=True)
    results = {"cores": cores, "cpu": cpu_model(), "images": args.images, "runs": runs, "median": {}}
    for name in ARMS:
        mine = [r for r in runs if r["arm"] == name]
        results["median"][name] = {k: statistics.median(r[k] for r in mine)
                                   for k in ("processing", "steady", "cpu_ms_per_image", "wall_s")}
    save(args.out, f"decode_placement_{cores}core", results, render(results))
    return 0


def render(results: dict) -> str:
    base = results["median"][next(iter(ARMS))]
    lines = [f"{results['cores']} cores ({results['cpu']}); SSD model; {results['images']} JPEGs; one worker per core; "
             f"arms interleaved, {len(results['runs']) // len(ARMS)} rounds, medians", "",
             "| arm | processing images/s | steady images/s | steady vs default | machine CPU ms/image | wall s |",
             "|---|---|---|---|---|---|"]
    for name, m in results["median"].items():
        lines.append(f"| {name} | {m['processing']:.1f} | {m['steady']:.1f} | {m['steady'] / base['steady']:.2f} | "
                     f"{m['cpu_ms_per_image']:.1f} | {m['wall_s']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
