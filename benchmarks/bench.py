"""Throughput benchmark, one invocation, same images/model/CPUs for every system:

- this job (`batch-detect run`, embedded Ray);
- the Ray Data recipe a competent user writes (read_binary_files -> map_batches(actor class) -> write_parquet,
  actors at 0.5 CPU each so the read tasks keep a CPU share: a pool holding every CPU starves them);
- the naive loop: one process, one interpreter using every core, read + decode + invoke in sequence;
- the limit: cores / (t_decode+preprocess + t_invoke), each measured alone on one thread.

Throughput is the marginal rate: (large - small) images / (wall(large) - wall(small)), so start-up (reported on
its own) does not blur it. Peak RSS is summed over the benchmarked process tree (driver, raylet, workers).

    python benchmarks/bench.py [--models ssd,yolo] [--scale 0.25] [--memory-run 2000,20000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from batch_detect.model.detector import Detector  # noqa: E402
from batch_detect.model.interpreter import load_backend, read_model  # noqa: E402
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


def cpu_busy_s() -> float:
    """Busy CPU seconds of the whole machine so far (all cores), from /proc/stat."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    steal = fields[7]  # time the hypervisor gave to other guests: not ours (it made "busy" read 122%)
    return (sum(fields[:8]) - idle - steal) / os.sysconf("SC_CLK_TCK")


def shm_used() -> int:
    """Bytes in use in /dev/shm, where Ray's object store keeps its objects."""
    st = os.statvfs("/dev/shm")
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def timed(cmd: list[str], env: dict | None = None) -> dict:
    """Wall time, machine CPU seconds, peak process-tree RSS and peak /dev/shm growth of a command."""
    peak = [0, 0]
    shm0 = shm_used()
    cpu0 = cpu_busy_s()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss(proc.pid))
            peak[1] = max(peak[1], shm_used() - shm0)
            time.sleep(0.25)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out = proc.communicate()[0].decode(errors="replace")
    wall = time.perf_counter() - t0
    cpu = cpu_busy_s() - cpu0
    done.set()
    watcher.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{out[-3000:]}")
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": peak[0] / 2**20, "peak_shm_mb": peak[1] / 2**20,
            "log": out[-2000:]}


def limit(model: str, paths: list[str], cores: int) -> dict:
    """Decode+preprocess and invoke, each timed alone on one thread over the same images (every size
    equally). Throughput is set by the mean cost, so the limit uses means (medians reported too)."""
    backend = load_backend()
    det = Detector(backend, read_model(model), num_threads=1, score_threshold=0.5, resize="stretch",
                   normalization="auto", max_pixels=10**9)
    datas = [open(p, "rb").read() for p in paths[:100]]
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
    dec, inv = statistics.mean(t_dec), statistics.mean(t_inv)
    return {"decode_ms": dec * 1000, "invoke_ms": inv * 1000, "images_per_s": cores / (dec + inv),
            # issue #14's compute limit: every core invoking the model, nothing else (decode is free)
            "invoke_only_images_per_s": cores / inv,
            "decode_median_ms": statistics.median(t_dec) * 1000, "invoke_median_ms": statistics.median(t_inv) * 1000,
            "images_per_s_from_medians": cores / (statistics.median(t_dec) + statistics.median(t_inv))}


def _invoke_loop(model: str, seconds: float, start_at: float) -> int:
    det = Detector(load_backend(), read_model(model), num_threads=1, score_threshold=0.5, resize="stretch",
                   normalization="auto", max_pixels=10**9)
    spec = det.info.input
    tensor = np.zeros((1, spec.height, spec.width, spec.channels), dtype=spec.tensor.dtype)
    det.infer(tensor)
    time.sleep(max(0.0, start_at - time.time()))  # every process starts invoking at once
    n, end = 0, time.time() + seconds
    while time.time() < end:
        det.infer(tensor)
        n += 1
    return n


def concurrent_invoke_rate(model: str, cores: int, seconds: float = 8.0) -> float:
    """Issue #14's compute limit as it was measured on 16 cores: one process per core, each invoking the
    model on one thread at the same time, no decode; invokes per second in all. (Alone, one invoke is
    quicker: the cores share caches and memory bandwidth.)"""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(cores) as pool:
        start_at = time.time() + 5.0 + 0.2 * cores  # after every process has loaded its model
        counts = pool.starmap(_invoke_loop, [(model, seconds, start_at)] * cores)
    return sum(counts) / seconds


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown cpu"


def marginal(small: dict, large: dict, n_small: int, n_large: int) -> float:
    return (n_large - n_small) / max(large["wall_s"] - small["wall_s"], 1e-9)


MODELS = {  # name -> (file, small, large): the YOLO model costs ~8x the SSD per image, so fewer images
    "ssd": ("ssd_mobilenet_v2_300_uint8.tflite", 600, 2400),
    "yolo": ("yolov8n_style_320_float32.tflite", 150, 450),
}


def bench_model(name: str, model: str, n_small: int, n_large: int, systems: list[str], paths: list[str],
                work: str, env: dict, cores: int, shard_size: int) -> dict:
    lists = {n: manifest(paths[:n], os.path.join(work, f"{name}_list_{n}.txt")) for n in (n_small, n_large)}
    results: dict = {"model": os.path.relpath(model, ROOT), "small": n_small, "large": n_large, "systems": {}}
    before = limit(model, paths, cores) if "limit" in systems else None
    py = sys.executable
    runners = {
        "job": lambda n: [py, "-m", "batch_detect", "run", "--model", model, "--input", lists[n],
                          "--output", os.path.join(work, f"{name}_job_{n}"), "--shard-size", str(shard_size),
                          "--score-threshold", "0.5", "--resize", "stretch",  # the recipe's and the limit's resize
                          "--overwrite"],
        "naive": lambda n: [py, os.path.join(ROOT, "benchmarks", "naive_loop.py"), model, lists[n]],
        "raydata": lambda n: [py, os.path.join(ROOT, "benchmarks", "raydata_recipe.py"), model, lists[n],
                              os.path.join(work, f"{name}_raydata_{n}")],
    }
    for system in [s for s in systems if s in runners]:
        small = timed(runners[system](n_small), env)
        large = timed(runners[system](n_large), env)
        rate = marginal(small, large, n_small, n_large)
        results["systems"][system] = {
            "images_per_s": rate,
            "startup_s": max(small["wall_s"] - n_small / rate, 0.0),
            # machine CPU per extra image: what the system spends beyond decode + invoke
            "cpu_ms_per_image": 1000 * (large["cpu_s"] - small["cpu_s"]) / (n_large - n_small),
            "cpu_busy": (large["cpu_s"] - small["cpu_s"]) / (cores * max(large["wall_s"] - small["wall_s"], 1e-9)),
            "wall_small_s": small["wall_s"], "wall_large_s": large["wall_s"],
            "peak_rss_mb_small": small["peak_rss_mb"], "peak_rss_mb_large": large["peak_rss_mb"],
            "peak_shm_mb_large": large["peak_shm_mb"],
        }
        if system == "job":
            m = json.load(open(os.path.join(work, f"{name}_job_{n_large}", "_manifest.json")))
            results["systems"][system]["first_shard_committed_s"] = m["timings"]["first_shard_committed_s"]
    if before is not None:
        # Measured before and after the systems ran, averaged: a shared machine's speed drifts within minutes
        # (one-thread invoke here has read 26 ms and 42 ms in one afternoon), and each end brackets it.
        after = limit(model, paths, cores)
        both = {k: (before[k] + after[k]) / 2 for k in before}
        both["images_per_s"] = cores / ((both["decode_ms"] + both["invoke_ms"]) / 1000)
        both["invoke_only_images_per_s"] = cores / (both["invoke_ms"] / 1000)
        results["systems"]["limit"] = {**both, "before": before, "after": after}
    return results


def memory_run(model: str, counts: list[int], paths_for, work: str, env: dict, shard_size: int) -> dict:
    """This job's peak memory at two dataset sizes: it must not grow with the dataset."""
    py = sys.executable
    out = {}
    for n in counts:
        listing = manifest(paths_for(n), os.path.join(work, f"mem_list_{n}.txt"))
        r = timed([py, "-m", "batch_detect", "run", "--model", model, "--input", listing, "--output",
                   os.path.join(work, f"mem_job_{n}"), "--shard-size", str(shard_size), "--score-threshold", "0.5",
                   "--overwrite"], env)
        out[str(n)] = {"wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"], "peak_shm_mb": r["peak_shm_mb"]}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="ssd,yolo", help=f"any of {', '.join(MODELS)}")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the image counts (quick runs: 0.25)")
    parser.add_argument("--memory-run", default="2000,20000", help="job peak memory at these sizes ('' to skip)")
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--data", default=os.path.join(ROOT, "benchmarks", "data"))
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--systems", default="limit,job,naive,raydata")
    args = parser.parse_args()
    systems = args.systems.split(",")
    cores = os.cpu_count() or 1
    mem_counts = [int(x) for x in args.memory_run.split(",") if x]
    largest = max([int(MODELS[m][2] * args.scale) for m in args.models.split(",")] + mem_counts)
    paths = make_images(os.path.join(args.data, "images"), largest)
    work = tempfile.mkdtemp(prefix="bench-")
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"}
    results: dict = {"cores": cores, "cpu": cpu_model(), "shard_size": args.shard_size, "models": {}}
    for name in args.models.split(","):
        file, small, large = MODELS[name]
        model = os.path.join(ROOT, "benchmarks", "models", file)
        if not os.path.exists(model):
            print(f"skipping {name}: {model} is missing (python tools/make_benchmark_models.py --out "
                  "benchmarks/models/ makes it)", file=sys.stderr)
            continue
        results["models"][name] = bench_model(name, model, int(small * args.scale), int(large * args.scale),
                                              systems, paths, work, env, cores, args.shard_size)
    if mem_counts:
        ssd = os.path.join(ROOT, "benchmarks", "models", MODELS["ssd"][0])
        results["memory"] = memory_run(ssd, mem_counts, lambda n: paths[:n], work, env, args.shard_size)
    # One file pair per core count, so the 2-core and 16-core tables sit side by side.
    save(args.out, f"bench_{cores}core", results, render(results))
    return 0


def child_json(script: str, *args: str) -> dict:
    """Run `python script --child args...` in a fresh process (a peak RSS of its own) and return the JSON
    object it prints last."""
    proc = subprocess.run([sys.executable, os.path.abspath(script), "--child", *args], capture_output=True,
                          text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    """This process's resident peak (VmHWM), MiB."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmHWM:"))


@contextlib.contextmanager
def local_s3(bucket: str):
    """moto's S3 server on 127.0.0.1 with `bucket` made: yields (storage options naming its endpoint, an
    s3fs filesystem on it); stopped on exit."""
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {"key": "bench-key", "secret": "bench-secret", "endpoint_url": f"http://{host}:{port}"}
        fs = s3fs.S3FileSystem(**options)
        fs.mkdir(bucket)
        yield options, fs
    finally:
        server.stop()


def save(folder: str, stem: str, results: dict, table: str) -> None:
    """Results as `stem`.json and the table as `stem`.md, in `folder`; the table printed."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, stem + ".json"), "w") as fh:
        json.dump(results, fh, indent=2)
    with open(os.path.join(folder, stem + ".md"), "w") as fh:
        fh.write(table + "\n")
    print(table)


def render(results: dict) -> str:
    lines = [f"{results['cores']} cores ({results.get('cpu', 'cpu not recorded')}); marginal rate between the small and the large image set; shard size "
             f"{results['shard_size']}"]
    for name, r in results["models"].items():
        s = r["systems"]
        lim = s.get("limit", {}).get("images_per_s")
        lines += ["", f"### {name}: `{r['model']}`, {r['small']} → {r['large']} images", "",
                  "| system | images/s | vs limit | CPU ms per image | CPU busy | start-up s | peak RSS MB | "
                  "object store (shm) peak MB |", "|---|---|---|---|---|---|---|---|"]
        if lim:
            li = s["limit"]
            if "before" in li:
                lines.append(f"| (limit measured before / after the systems: decode {li['before']['decode_ms']:.1f} / "
                             f"{li['after']['decode_ms']:.1f} ms, invoke {li['before']['invoke_ms']:.1f} / "
                             f"{li['after']['invoke_ms']:.1f} ms; the mean is used) | | | | | | | |")
            if "invoke_only_images_per_s" in li:
                lines.append(f"| compute limit: cores / invoke {li['invoke_ms']:.1f} ms (no decode) "
                             f"| {li['invoke_only_images_per_s']:.1f} | {li['invoke_only_images_per_s'] / lim:.2f} "
                             f"| {li['invoke_ms']:.1f} | | | | |")
            lines.append(f"| limit: cores / (decode {li['decode_ms']:.1f} ms + invoke {li['invoke_ms']:.1f} ms, means) "
                         f"| {lim:.1f} | 1.00 | {li['decode_ms'] + li['invoke_ms']:.1f} | | | | |")
        for system in ("job", "raydata", "naive"):
            if system in s:
                v = s[system]
                ratio = f"{v['images_per_s'] / lim:.2f}" if lim else ""
                lines.append(f"| {system} | {v['images_per_s']:.1f} | {ratio} | {v['cpu_ms_per_image']:.1f} | "
                             f"{v['cpu_busy']:.0%} | {v['startup_s']:.1f} | {v['peak_rss_mb_large']:.0f} | "
                             f"{v['peak_shm_mb_large']:.0f} |")
        if "job" in s:
            job = s["job"]
            lines.append("")
            if lim and "invoke_only_images_per_s" in s["limit"]:
                lines.append(f"job / compute limit (cores / invoke): "
                             f"{job['images_per_s'] / s['limit']['invoke_only_images_per_s']:.2f}x  ")
            for other in ("raydata", "naive"):
                if other in s:
                    lines.append(f"job / {other}: {job['images_per_s'] / s[other]['images_per_s']:.2f}x rate, "
                                 f"{job['wall_large_s'] / s[other]['wall_large_s']:.2f}x wall on {r['large']} images  ")
            lines.append(f"first shard committed after {job.get('first_shard_committed_s', float('nan')):.1f} s "
                         "(embedded Ray)")
    if results.get("memory"):
        m = results["memory"]
        sizes = sorted(m, key=int)
        lines += ["", "### this job's peak memory against dataset size (SSD model)", "",
                  "| images | wall s | peak RSS MB (all processes) | object store (shm) peak MB |", "|---|---|---|---|"]
        lines += [f"| {n} | {m[n]['wall_s']:.0f} | {m[n]['peak_rss_mb']:.0f} | {m[n]['peak_shm_mb']:.0f} |" for n in sizes]
        lines.append(f"\npeak RSS {sizes[-1]} / {sizes[0]}: {m[sizes[-1]]['peak_rss_mb'] / m[sizes[0]]['peak_rss_mb']:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
