"""Small-job wall time, end to end as a user runs it (a new `batch-detect` process, Ray not running):
120 images (the `make demo` set and model) without Ray (the default under --ray-min-images), the same with
an embedded Ray forced (--ray-min-images 0), and a re-run of the finished output. Each is run `--repeat`
times in this one invocation; medians are reported.

    python benchmarks/startup.py [--images 120] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from batch_detect.synthetic import write_dataset  # noqa: E402


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="startup-")
    images = os.path.join(work, "images")
    write_dataset(images, args.images, seed=7)
    exe = os.path.join(os.path.dirname(sys.executable), "batch-detect")
    base = [exe, "run", "--model", os.path.join(ROOT, "models", "shapes_ssd_uint8.tflite"),
            "--labels", os.path.join(ROOT, "models", "shapes_labels.txt"), "--input", images, "--shard-size", "16"]
    runs: dict[str, list[float]] = {"without Ray (default)": [], "embedded Ray (--ray-min-images 0)": [],
                                    "re-run of the finished output": []}
    for i in range(args.repeat):
        out = os.path.join(work, f"out-{i}")
        runs["without Ray (default)"].append(wall(base + ["--output", out]))
        runs["re-run of the finished output"].append(wall(base + ["--output", out]))
        runs["embedded Ray (--ray-min-images 0)"].append(
            wall(base + ["--output", os.path.join(work, f"ray-{i}"), "--ray-min-images", "0"]))
    shutil.rmtree(work, ignore_errors=True)
    cores = os.cpu_count()
    medians = {k: statistics.median(v) for k, v in runs.items()}
    ray_s = medians["embedded Ray (--ray-min-images 0)"]
    lines = [f"{cores} cores; {args.images} images (the `make demo` set and model), a new process each time, Ray "
             f"not running before; median of {args.repeat}", "", "| run | wall s (median) | all runs | vs embedded Ray |",
             "|---|---|---|---|"]
    for k, v in runs.items():
        lines.append(f"| {k} | {medians[k]:.2f} | {', '.join(f'{x:.2f}' for x in v)} | {medians[k] / ray_s:.2f}x |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"startup_{cores}core.json"), "w") as fh:
        json.dump({"cores": cores, "images": args.images, "runs": runs, "medians": medians}, fh, indent=2)
    with open(os.path.join(args.out, f"startup_{cores}core.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
