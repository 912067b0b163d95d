"""How long a run's end takes: from the last shard committed to the process gone (the last part written,
the manifest, exit), and the wall, for this checkout against an earlier one (`--before`, a `git worktree
add` of it), interleaved over `--rounds`, on the same JPEGs (the bench.py set, SSD model: 100 boxes per
image with its random weights, so every image is 100 detection rows).

    python benchmarks/run_end.py --before /tmp/before [--images 4800] [--rounds 2]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from bench import cpu_model, make_images, manifest, save  # noqa: E402
from rates import MODEL  # noqa: E402


def one(tree: str, listing: str, out: str) -> dict:
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": tree}
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "batch_detect", "run", "--model", MODEL, "--input", listing, "--output",
                    out, "--shard-size", "64", "--score-threshold", "0.5", "--overwrite"],
                   env=env, cwd=tree, check=True, capture_output=True)
    gone = time.time()
    events = []
    for path in glob.glob(os.path.join(out, "_log", "*.jsonl")):
        with open(path) as fh:
            events += [json.loads(line) for line in fh]
    last = max(e["t"] for e in events if e.get("ev") == "shard")
    parts = json.load(open(os.path.join(out, "_manifest.json")))
    return {"wall_s": gone - t0, "end_s": gone - last,
            "parts": len(glob.glob(os.path.join(out, "detections", "*.parquet"))),
            "images": parts["counts"]["images"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="an earlier checkout of this repository (git worktree add)")
    parser.add_argument("--images", type=int, default=4800)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args()
    paths = make_images(os.path.join(ROOT, "benchmarks", "data", "images"), args.images)
    work = tempfile.mkdtemp(prefix="run-end-")
    listing = manifest(paths, os.path.join(work, "list.txt"))
    arms = {"before": os.path.abspath(args.before), "this checkout": ROOT}
    runs = []
    for rnd in range(args.rounds):
        for name, tree in arms.items():
            run = {"round": rnd, "arm": name, **one(tree, listing, os.path.join(work, "out"))}
            runs.append(run)
            print(json.dumps(run), flush=True)
    med = {name: {k: statistics.median(r[k] for r in runs if r["arm"] == name) for k in ("wall_s", "end_s", "parts")}
           for name in arms}
    results = {"cores": os.cpu_count(), "cpu": cpu_model(), "images": args.images, "runs": runs, "median": med}
    lines = [f"{results['cores']} cores ({results['cpu']}); SSD model (100 detections per image); {args.images} JPEGs; "
             f"without Ray; arms interleaved, {args.rounds} rounds, medians", "",
             "| arm | last shard → process gone, s | wall s | part files per table |", "|---|---|---|---|"]
    for name, m in med.items():
        lines.append(f"| {name} | {m['end_s']:.2f} | {m['wall_s']:.1f} | {m['parts']:.0f} |")
    save(args.out, f"run_end_{results['cores']}core", results, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
