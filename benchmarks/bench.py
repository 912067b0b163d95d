"""Throughput benchmark, one invocation, same images/model/CPUs for every system:

- this job (`batch-detect run`, embedded Ray);
- the Ray Data recipe a competent user writes (read_binary_files -> map_batches(actor class) -> write_parquet,
  actors at 0.5 CPU each so the read tasks keep a CPU share: a pool holding every CPU starves them);
- the naive loop: one process, one interpreter using every core, read + decode + invoke in sequence;
- the limit: cores / (t_decode+preprocess + t_invoke), each measured alone on one thread.

Throughput is the marginal rate: (large - small) images / (wall(large) - wall(small)), so start-up (reported on
its own) does not blur it. Peak RSS is summed over the benchmarked process tree (driver, raylet, workers).

    python benchmarks/bench.py [--small 600 --large 2400] [--model benchmarks/models/ssd_mobilenet_v2_300_uint8.tflite]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from batch_detect.detector import Detector  # noqa: E402
from batch_detect.interpreter import load_backend, read_model  # noqa: E402
from batch_detect.synthetic import draw_scene, scene_rng  # noqa: E402

SIZES = [(640, 480), (1280, 720), (1920, 1080), (1024, 768), (800, 600)]
POOL = 200  # distinct images drawn; more names are hardlinks to them (same decode cost, distinct files)


def make_images(folder: str, count: int) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(count):
        path = os.path.join(folder, f"img_{i:06d}.jpg")
        if not os.path.exists(path):
            if i < POOL:
                w, h = SIZES[i % len(SIZES)]
                draw_scene(scene_rng(2026, i), w, h)[0].save(path, quality=90)
            else:
                os.link(os.path.join(folder, f"img_{i % POOL:06d}.jpg"), path)
        paths.append(path)
    return paths


def manifest(paths: list[str], path: str) -> str:
    with open(path, "w") as fh:
        fh.write("\n".join(paths) + "\n")
    return path


def tree_rss(root: int) -> int:
    """Resident bytes of `root` and all its descendants, from /proc."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as fh:
                parents[int(pid)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        rss[int(pid)] = int(line.split()[1]) * 1024
        except (OSError, IndexError, ValueError):
            continue
    total, frontier = 0, {root}
    seen = set()
    while frontier:
        pid = frontier.pop()
        seen.add(pid)
        total += rss.get(pid, 0)
        frontier |= {c for c, p in parents.items() if p == pid and c not in seen}
    return total


def timed(cmd: list[str], env: dict | None = None) -> dict:
    """Wall time and peak process-tree RSS of a command."""
    peak = [0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.25)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out = proc.communicate()[0].decode(errors="replace")
    wall = time.perf_counter() - t0
    done.set()
    watcher.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{out[-3000:]}")
    return {"wall_s": wall, "peak_rss_mb": peak[0] / 2**20, "log": out[-2000:]}


def limit(model: str, paths: list[str], cores: int) -> dict:
    backend = load_backend()
    det = Detector(backend, read_model(model), num_threads=1, score_threshold=0.5, resize="stretch",
                   normalization="auto", max_pixels=10**9)
    datas = [open(p, "rb").read() for p in paths[:60]]
    t_dec = []
    tensors = []
    for data in datas:
        t0 = time.perf_counter()
        prepared = det.prepare(data)
        t_dec.append(time.perf_counter() - t0)
        tensors.append(prepared[2])
    det.infer(tensors[0])
    t_inv = []
    for tensor in tensors:
        t0 = time.perf_counter()
        det.infer(tensor)
        t_inv.append(time.perf_counter() - t0)
    dec, inv = statistics.median(t_dec), statistics.median(t_inv)
    return {"decode_ms": dec * 1000, "invoke_ms": inv * 1000, "images_per_s": cores / (dec + inv)}


def marginal(small: dict, large: dict, n_small: int, n_large: int) -> float:
    return (n_large - n_small) / max(large["wall_s"] - small["wall_s"], 1e-9)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=600)
    parser.add_argument("--large", type=int, default=2400)
    parser.add_argument("--model", default=os.path.join(ROOT, "benchmarks", "models", "ssd_mobilenet_v2_300_uint8.tflite"))
    parser.add_argument("--data", default=os.path.join(ROOT, "benchmarks", "data"))
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--systems", default="limit,job,naive,raydata")
    args = parser.parse_args()
    systems = args.systems.split(",")
    cores = os.cpu_count() or 1
    paths = make_images(os.path.join(args.data, "images"), args.large)
    work = tempfile.mkdtemp(prefix="bench-")
    lists = {n: manifest(paths[:n], os.path.join(work, f"list_{n}.txt")) for n in (args.small, args.large)}
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"}
    results: dict = {"cores": cores, "model": os.path.relpath(args.model, ROOT), "small": args.small,
                     "large": args.large, "systems": {}}
    if "limit" in systems:
        results["systems"]["limit"] = limit(args.model, paths, cores)
    py = sys.executable
    runners = {
        "job": lambda n: [py, "-m", "batch_detect", "run", "--model", args.model, "--input", lists[n],
                          "--output", os.path.join(work, f"job_{n}"), "--shard-size", "32", "--overwrite"],
        "naive": lambda n: [py, os.path.join(ROOT, "benchmarks", "naive_loop.py"), args.model, lists[n]],
        "raydata": lambda n: [py, os.path.join(ROOT, "benchmarks", "raydata_recipe.py"), args.model, lists[n],
                              os.path.join(work, f"raydata_{n}")],
    }
    for name in [s for s in systems if s in runners]:
        small = timed(runners[name](args.small), env)
        large = timed(runners[name](args.large), env)
        rate = marginal(small, large, args.small, args.large)
        results["systems"][name] = {
            "images_per_s": rate,
            "startup_s": max(small["wall_s"] - args.small / rate, 0.0),
            "wall_small_s": small["wall_s"], "wall_large_s": large["wall_s"],
            "peak_rss_mb_small": small["peak_rss_mb"], "peak_rss_mb_large": large["peak_rss_mb"],
        }
        if name == "job":
            m = json.load(open(os.path.join(work, f"job_{args.large}", "_manifest.json")))
            results["systems"][name]["first_shard_committed_s"] = m["timings"]["first_shard_committed_s"]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench.json"), "w") as fh:
        json.dump(results, fh, indent=2)
    table = render(results)
    with open(os.path.join(args.out, "bench.md"), "w") as fh:
        fh.write(table + "\n")
    print(table)
    return 0


def render(r: dict) -> str:
    s = r["systems"]
    lim = s.get("limit", {}).get("images_per_s")
    lines = [f"{r['cores']} cores, model {r['model']}, marginal rate between {r['small']} and {r['large']} images", "",
             "| system | images/s | vs limit | start-up s | peak RSS MB (large) |", "|---|---|---|---|---|"]
    if lim:
        lines.append(f"| limit: cores / (decode {s['limit']['decode_ms']:.1f} ms + invoke {s['limit']['invoke_ms']:.1f} ms)"
                     f" | {lim:.1f} | 1.00 | | |")
    for name in ("job", "raydata", "naive"):
        if name in s:
            v = s[name]
            ratio = f"{v['images_per_s'] / lim:.2f}" if lim else ""
            lines.append(f"| {name} | {v['images_per_s']:.1f} | {ratio} | {v['startup_s']:.1f} | {v['peak_rss_mb_large']:.0f} |")
    if "job" in s:
        job = s["job"]
        for other in ("raydata", "naive"):
            if other in s:
                lines.append(f"\njob / {other}: {job['images_per_s'] / s[other]['images_per_s']:.2f}x")
        lines.append(f"\nfirst shard committed after {job.get('first_shard_committed_s', float('nan')):.1f} s (embedded Ray)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
