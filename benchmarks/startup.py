"""Small-job wall time, end to end as a user runs it (a new `batch-detect` process, Ray not running):
120 images (the `make demo` set and model) without Ray (the default under --ray-min-images), the same with
an embedded Ray forced (--ray-min-images 0), and a re-run of the finished output. Each is run `--repeat`
times in this one invocation; medians are reported.

    python benchmarks/startup.py [--images 120] [--repeat 3] [--tar 40]

`--tar N`: the same images packed into tars of N (which went to Ray whatever their size before small tar
jobs were bounded by their sizes: the embedded-Ray arm is what they cost then).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
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
    parser.add_argument("--tar", type=int, default=0, help="pack the images into tars of this many (0: files)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="startup-")
    images = os.path.join(work, "images")
    write_dataset(images, args.images, seed=7)
    if args.tar:
        names = sorted(n for n in os.listdir(images) if n.endswith(".jpg"))
        tars = os.path.join(work, "tars")
        os.makedirs(tars)
        for t, lo in enumerate(range(0, len(names), args.tar)):
            with tarfile.open(os.path.join(tars, f"shard-{t:04d}.tar"), "w") as tar:
                for name in names[lo:lo + args.tar]:
                    tar.add(os.path.join(images, name), arcname=f"sample/{name}")
        images = tars
    exe = os.path.join(os.path.dirname(sys.executable), "batch-detect")
    # where the package is on PYTHONPATH only (the lent machine's bundle), as `python -m`, which costs the same
    cli = [exe] if os.path.exists(exe) else [sys.executable, "-m", "batch_detect"]
    base = [*cli, "run", "--model", os.path.join(ROOT, "models", "shapes_ssd_uint8.tflite"),
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
    packed = f" in tars of {args.tar}" if args.tar else ""
    stem = f"startup_{cores}core" + ("_tar" if args.tar else "")
    lines = [f"{cores} cores; {args.images} images{packed} (the `make demo` set and model), a new process each time, Ray "
             f"not running before; median of {args.repeat}", "", "| run | wall s (median) | all runs | vs embedded Ray |",
             "|---|---|---|---|"]
    for k, v in runs.items():
        lines.append(f"| {k} | {medians[k]:.2f} | {', '.join(f'{x:.2f}' for x in v)} | {medians[k] / ray_s:.2f}x |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{stem}.json"), "w") as fh:
        json.dump({"cores": cores, "images": args.images, "tar": args.tar, "runs": runs, "medians": medians}, fh,
                  indent=2)
    with open(os.path.join(args.out, f"{stem}.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
