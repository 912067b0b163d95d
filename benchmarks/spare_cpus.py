"""A pool that cannot fill the machine: memory holds one actor (a reservation of half the machine's
available memory), so with one CPU per actor the other CPUs sit idle. `--cpus-per-actor` unset gives
them to the actor's interpreter threads; this runs, interleaved and repeated, the memory-bound pool with
--cpus-per-actor 1 (the old default), the same pool with it unset, and the full pool (no memory bound)
as the reference. SSD model, the bench.py JPEGs, embedded Ray.

    python benchmarks/spare_cpus.py [--images 1200] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from bench import cpu_model, save  # noqa: E402
from rates import job_inputs, job_run, steady_rate  # noqa: E402

ARMS = {  # name -> extra flags (the memory bound is added to the first two)
    "memory-bound, --cpus-per-actor 1": ["--cpus-per-actor", "1"],
    "memory-bound, --cpus-per-actor auto": [],
    "full pool (reference)": None,
}


def available_mb() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    _, work, listing, env = job_inputs(args.images, "spare-")
    bound = ["--memory-per-actor-mb", str(available_mb() // 2)]
    results: dict = {"cores": cores, "cpu": cpu_model(), "images": args.images, "runs": []}
    for rep in range(args.repeat):
        for arm, extra in ARMS.items():
            out = os.path.join(work, "out")
            flags = [] if extra is None else bound + extra
            t, m = job_run(listing, out, env, flags)
            run = {"rep": rep, "arm": arm, "wall_s": t["wall_s"], "actors": m["cluster"]["actors"],
                   "threads": m["cluster"]["cpus_per_actor"], "steady": steady_rate(out),
                   "processing": m["counts"]["images"] / m["timings"]["run_s"]}
            results["runs"].append(run)
            print(run, flush=True)
    save(args.out, f"spare_cpus_{cores}core", results, render(results))
    return 0


def render(results: dict) -> str:
    runs = results["runs"]
    lines = [f"{results['cores']} cores ({results['cpu']}); SSD model; {results['images']} JPEGs; embedded Ray; "
             f"{max(r['rep'] for r in runs) + 1} repetitions, arms interleaved; medians", "",
             "| pool | actors × interpreter threads | steady images/s | processing images/s | vs --cpus-per-actor 1 "
             "(steady, median of paired ratios) |", "|---|---|---|---|---|"]
    base = "memory-bound, --cpus-per-actor 1"
    for arm in ARMS:
        mine = [r for r in runs if r["arm"] == arm]
        ratios = [r["steady"] / b["steady"] for r in mine for b in runs if b["arm"] == base and b["rep"] == r["rep"]]
        lines.append(f"| {arm} | {mine[0]['actors']} × {mine[0]['threads']} | "
                     f"{statistics.median(r['steady'] for r in mine):.1f} | "
                     f"{statistics.median(r['processing'] for r in mine):.1f} | {statistics.median(ratios):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
