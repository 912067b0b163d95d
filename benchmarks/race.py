"""Issue #34's fair race: this job against the Ray Data recipe at steady state, each rate read from the
system's own completion timestamps rather than from the difference of two walls (which charges start-up
differences to the rate).

Both systems run the same SSD model, the same JPEGs, the same Detector (`raydata_recipe.py`). Completion
times: the job's commit log (each shard's commit, `t`, for its images), the recipe's own per-image `t`
column. The steady rate is the same estimator for both: the images completed between the moments 10% and
90% of all images were done, over that span (start-up and the tail are outside it). The arms alternate
order each repetition, in one process, and every ratio is taken within its repetition.

    python benchmarks/race.py [--counts 2400,9600] [--repeat 1]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from bench import cpu_model, make_images, manifest, save, timed  # noqa: E402
from rates import MODEL  # noqa: E402


def steady(completions: list[tuple[float, int]], lo: float = 0.1, hi: float = 0.9) -> float:
    """Images/s between the moments `lo` and `hi` of all images were complete; `completions` are
    (time, images completed then)."""
    completions = sorted(completions)
    total = sum(n for _, n in completions)
    done, t_lo, n_lo = 0, None, 0
    for t, n in completions:
        done += n
        if t_lo is None and done >= lo * total:
            t_lo, n_lo = t, done
        if done >= hi * total:
            return (done - n_lo) / max(t - t_lo, 1e-6)
    raise ValueError("no completions")


def job_completions(out: str) -> list[tuple[float, int]]:
    events = []
    for path in glob.glob(os.path.join(out, "_log", "*.jsonl")):
        with open(path) as fh:
            events += [e for e in map(json.loads, fh) if e.get("ev") == "shard"]
    return [(e["t"], e["images"] + e["failures"]) for e in events]


def recipe_completions(out: str) -> list[tuple[float, int]]:
    import pyarrow.parquet as pq

    return [(t, 1) for t in pq.read_table(out, columns=["t"])["t"].to_pylist()]


def run_job(listing: str, out: str, env: dict, extra: tuple = ()) -> dict:
    t = timed([sys.executable, "-m", "batch_detect", "run", "--model", MODEL, "--input", listing, "--output", out,
               "--shard-size", "64", "--score-threshold", "0.5", "--overwrite", *extra], env)
    m = json.load(open(os.path.join(out, "_manifest.json")))
    return {"wall_s": t["wall_s"], "steady": steady(job_completions(out)), "executor": m["cluster"]["executor"],
            "images": m["counts"]["images"], "processing": m["counts"]["images"] / m["timings"]["run_s"]}


def run_recipe(listing: str, out: str, env: dict) -> dict:
    t = timed([sys.executable, os.path.join(ROOT, "benchmarks", "raydata_recipe.py"), MODEL, listing, out], env)
    return {"wall_s": t["wall_s"], "steady": steady(recipe_completions(out))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="2400,9600")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--job-args", default="", help="more `batch-detect run` arguments for the job's arm, e.g. "
                    "'--ray-min-images 1000000' (worker processes at every size)")
    ap.add_argument("--tag", default="", help="a suffix for the results file")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = ap.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    cores = os.cpu_count() or 1
    paths = make_images(os.path.join(ROOT, "benchmarks", "data", "images"), max(counts))
    work = tempfile.mkdtemp(prefix="race-")
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"}
    rows = []
    for rep in range(args.repeat):
        for n in counts:
            listing = manifest(paths[:n], os.path.join(work, f"list_{n}.txt"))
            arms = [("job", lambda *a: run_job(*a, extra=tuple(args.job_args.split()))), ("recipe", run_recipe)]
            if rep % 2:
                arms.reverse()
            row = {"rep": rep + 1, "images": n}
            for name, fn in arms:
                # a folder per run: the recipe's write_parquet adds files to what a folder holds
                row[name] = fn(listing, os.path.join(work, f"{name}_{n}_{rep}"), env)
                print(json.dumps({"rep": rep + 1, "images": n, name: row[name]}), flush=True)
            row["steady_ratio"] = row["job"]["steady"] / row["recipe"]["steady"]
            row["wall_ratio"] = row["job"]["wall_s"] / row["recipe"]["wall_s"]
            rows.append(row)
    results = {"cores": cores, "cpu": cpu_model(), "rows": rows, "job_args": args.job_args,
               "median_steady_ratio": {n: statistics.median(r["steady_ratio"] for r in rows if r["images"] == n)
                                       for n in counts}}
    save(args.out, f"race_{cores}core{args.tag}", results, render(results))
    return 0


def render(results: dict) -> str:
    lines = [f"{results['cores']} cores ({results['cpu']}); SSD model, the benchmark JPEGs; this job (default "
             "settings, shards of 64) against the Ray Data recipe (`raydata_recipe.py`: the same Detector, 2 actors "
             "of 0.5 CPU). Steady rate: images completed between the moments 10% and 90% of them were done, over "
             "that span, from each system's own timestamps (the job's commit log, the recipe's per-image column); "
             "the arms alternate order each repetition"
             + (f"; the job run with `{results['job_args']}`" if results.get("job_args") else ""), "",
             "| rep | images | job executor | job steady img/s | recipe steady img/s | **job / recipe steady** | "
             "job wall s | recipe wall s | **job / recipe wall** | job processing img/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        j, c = r["job"], r["recipe"]
        lines.append(f"| {r['rep']} | {r['images']} | {j['executor']} | {j['steady']:.1f} | {c['steady']:.1f} | "
                     f"{r['steady_ratio']:.2f} | {j['wall_s']:.1f} | {c['wall_s']:.1f} | {r['wall_ratio']:.2f} | "
                     f"{j['processing']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
