"""Issue #14's ratios, measured so that a drifting machine cannot fake or hide them: each repetition runs
the limit, this job and the Ray Data recipe back to back (limit measured before and after, averaged), and
every ratio is taken within its own repetition; the table gives each repetition and the median.

The compute limit is given two ways: cores / one-thread invoke timed alone, and every core invoking at
once (one process each, as issue #14 measured it on 16 cores: there one invoke took 17.3 ms, alone 12.7).

This job's rate is given three ways (SSD model, 600 and 2,400 JPEGs as in bench.py):
- marginal: (2400 - 600) / (wall(2400) - wall(600)), as bench.py (start-up cancels out, drift does not);
- processing: images / the run's own processing time (manifest `run_s`: actors starting, the tail, all);
- steady: images / the span from the first shard's start to the last shard's end in the commit log.
The recipe has only the marginal rate. Wall times are the 2,400-image runs', start-up included.

    python benchmarks/rates.py [--repeat 3] [--scale 1.0]
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

from bench import concurrent_invoke_rate, cpu_model, limit, make_images, manifest, marginal, save, timed  # noqa: E402

MODEL = os.path.join(ROOT, "benchmarks", "models", "ssd_mobilenet_v2_300_uint8.tflite")


def steady_rate(output: str) -> float:
    """Images / (last shard end - first shard start), from the commit log's shard events."""
    events = []
    for path in glob.glob(os.path.join(output, "_log", "*.jsonl")):
        with open(path) as fh:
            events += [e for e in map(json.loads, fh) if e.get("ev") == "shard"]
    start = min(e["t"] - e["wall_s"] for e in events)
    return sum(e["images"] + e["failures"] for e in events) / (max(e["t"] for e in events) - start)


def job_inputs(count: int, prefix: str) -> tuple[list[str], str, str, dict]:
    """The bench.py JPEGs (`count`), a scratch folder, their listing in it, and an environment that runs
    the job embedded (no cluster named) without usage stats."""
    paths = make_images(os.path.join(ROOT, "benchmarks", "data", "images"), count)
    work = tempfile.mkdtemp(prefix=prefix)
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"}
    return paths, work, manifest(paths, os.path.join(work, "list.txt")), env


def job_run(listing: str, out: str, env: dict, extra: list[str] = ()) -> tuple[dict, dict]:
    """This job on `listing` with the benchmarks' settings (SSD model, shards of 64, threshold 0.5), timed;
    its timings (bench.timed) and its manifest."""
    t = timed([sys.executable, "-m", "batch_detect", "run", "--model", MODEL, "--input", listing, "--output", out,
               "--shard-size", "64", "--score-threshold", "0.5", "--overwrite", *extra], env)
    return t, json.load(open(os.path.join(out, "_manifest.json")))


def one_repetition(lists: dict, small: int, large: int, work: str, env: dict, cores: int, paths: list) -> dict:
    py = sys.executable
    before = limit(MODEL, paths, cores)
    job, job_ray, recipe = {}, {}, {}
    for arm, extra in ((job, []), (job_ray, ["--ray-min-images", "0"])):
        for n in (small, large):
            out = os.path.join(work, f"job_{n}")
            arm[n] = timed([py, "-m", "batch_detect", "run", "--model", MODEL, "--input", lists[n], "--output", out,
                            "--shard-size", "64", "--score-threshold", "0.5", "--overwrite", *extra], env)
            m = json.load(open(os.path.join(out, "_manifest.json")))
            arm[n].update(processing=m["counts"]["images"] / m["timings"]["run_s"], steady=steady_rate(out),
                          executor=m["cluster"]["executor"])
    for n in (small, large):
        recipe[n] = timed([py, os.path.join(ROOT, "benchmarks", "raydata_recipe.py"), MODEL, lists[n],
                           os.path.join(work, f"raydata_{n}")], env)
    after = limit(MODEL, paths, cores)
    together = concurrent_invoke_rate(MODEL, cores)
    invoke_ms = (before["invoke_ms"] + after["invoke_ms"]) / 2
    decode_ms = (before["decode_ms"] + after["decode_ms"]) / 2
    compute = cores / (invoke_ms / 1000)
    rep = {
        "invoke_ms": invoke_ms, "decode_ms": decode_ms, "compute_limit": compute,
        "decode_invoke_limit": cores / ((invoke_ms + decode_ms) / 1000),
        "limit_before": before, "limit_after": after, "compute_limit_together": together,
        "job_executor": job[large]["executor"],
        "job_marginal": marginal(job[small], job[large], small, large),
        "job_processing": job[large]["processing"], "job_steady": job[large]["steady"],
        "job_ray_marginal": marginal(job_ray[small], job_ray[large], small, large),
        "job_ray_processing": job_ray[large]["processing"], "job_ray_steady": job_ray[large]["steady"],
        "job_ray_wall": job_ray[large]["wall_s"],
        "recipe_marginal": marginal(recipe[small], recipe[large], small, large),
        "job_wall": job[large]["wall_s"], "recipe_wall": recipe[large]["wall_s"],
    }
    for k in ("job_marginal", "job_processing", "job_steady", "recipe_marginal", "job_ray_marginal",
              "job_ray_processing", "job_ray_steady"):
        rep[k + "_vs_compute"] = rep[k] / compute
        rep[k + "_vs_together"] = rep[k] / together
    rep["wall_job_vs_recipe"] = rep["job_wall"] / rep["recipe_wall"]
    rep["wall_job_ray_vs_recipe"] = rep["job_ray_wall"] / rep["recipe_wall"]
    return rep


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the image counts (quick runs: 0.25)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    small, large = int(600 * args.scale), int(2400 * args.scale)
    paths = make_images(os.path.join(ROOT, "benchmarks", "data", "images"), large)
    work = tempfile.mkdtemp(prefix="rates-")
    lists = {n: manifest(paths[:n], os.path.join(work, f"list_{n}.txt")) for n in (small, large)}
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"}
    results = {"cores": cores, "cpu": cpu_model(), "small": small, "large": large, "reps": []}
    for i in range(args.repeat):
        rep = one_repetition(lists, small, large, work, env, cores, paths)
        results["reps"].append(rep)
        print(f"repetition {i + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in rep.items() if isinstance(v, float)),
              flush=True)
    keys = [k for k, v in results["reps"][0].items() if isinstance(v, float)]
    results["median"] = {k: statistics.median(r[k] for r in results["reps"]) for k in keys}
    save(args.out, f"rates_{cores}core", results, render(results))
    return 0


ROWS = [
    ("one-thread invoke ms (mean of before/after)", "invoke_ms", "{:.1f}"),
    ("decode+preprocess ms", "decode_ms", "{:.1f}"),
    ("compute limit: cores / invoke, images/s", "compute_limit", "{:.1f}"),
    ("compute limit, all cores invoking at once (as #14 measured 16 cores), images/s", "compute_limit_together",
     "{:.1f}"),
    ("decode+invoke limit, images/s", "decode_invoke_limit", "{:.1f}"),
    ("job, marginal images/s", "job_marginal", "{:.1f}"),
    ("job, processing images/s", "job_processing", "{:.1f}"),
    ("job, steady images/s", "job_steady", "{:.1f}"),
    ("Ray Data recipe, marginal images/s", "recipe_marginal", "{:.1f}"),
    ("**job marginal / compute limit**", "job_marginal_vs_compute", "{:.2f}"),
    ("**job processing / compute limit**", "job_processing_vs_compute", "{:.2f}"),
    ("**job steady / compute limit**", "job_steady_vs_compute", "{:.2f}"),
    ("recipe marginal / compute limit", "recipe_marginal_vs_compute", "{:.2f}"),
    ("**job marginal / all-cores compute limit**", "job_marginal_vs_together", "{:.2f}"),
    ("**job steady / all-cores compute limit**", "job_steady_vs_together", "{:.2f}"),
    ("recipe marginal / all-cores compute limit", "recipe_marginal_vs_together", "{:.2f}"),
    ("job on embedded Ray (--ray-min-images 0), marginal images/s", "job_ray_marginal", "{:.1f}"),
    ("job on embedded Ray, processing images/s", "job_ray_processing", "{:.1f}"),
    ("job on embedded Ray, steady images/s", "job_ray_steady", "{:.1f}"),
    ("job on embedded Ray processing / compute limit", "job_ray_processing_vs_compute", "{:.2f}"),
    ("job wall s, large set", "job_wall", "{:.1f}"),
    ("job on embedded Ray wall s, large set", "job_ray_wall", "{:.1f}"),
    ("recipe wall s, large set", "recipe_wall", "{:.1f}"),
    ("**job wall / recipe wall**", "wall_job_vs_recipe", "{:.2f}"),
    ("job on embedded Ray wall / recipe wall", "wall_job_ray_vs_recipe", "{:.2f}"),
]


def render(results: dict) -> str:
    reps = results["reps"]
    lines = [f"{results['cores']} cores ({results['cpu']}); SSD model; {results['small']} → {results['large']} JPEGs; "
             f"{len(reps)} repetitions, each running the limit, this job (default: "
             f"{reps[0].get('job_executor', 'ray')} at this size), this job on an embedded Ray and the Ray Data "
             "recipe back to back; ratios are taken within a repetition", "",
             "| | " + " | ".join(f"rep {i + 1}" for i in range(len(reps))) + " | median |",
             "|---" * (len(reps) + 2) + "|"]
    for label, key, fmt in ROWS:
        lines.append(f"| {label} | " + " | ".join(fmt.format(r[key]) for r in reps)
                     + f" | {fmt.format(results['median'][key])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
