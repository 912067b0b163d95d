"""The Detector's own ceiling on this machine, next to the job, in one invocation: one process per core,
each taking the next few JPEGs from a shared counter (as the job's workers take shards: images differ in
cost, fixed slices would leave some processes idle early) and running `Detector.process` (decode, invoke,
output decoding) on one thread, all at once: no Ray, no Parquet, no threads ahead. Then the job on the
same images. Where the job's steady rate is near this ceiling, what is left is the per-image work itself
under full load.

    python benchmarks/ceiling.py [--images 4800]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, ROOT)

from bench import cpu_model, save  # noqa: E402
from rates import MODEL, job_inputs, job_run, steady_rate  # noqa: E402


TAKE = 4  # images per draw from the shared counter


def _loop(paths: list[str], start_at: float, counter, q) -> None:
    from batch_detect.model.detector import Detector
    from batch_detect.model.interpreter import load_backend, read_model

    det = Detector(load_backend(), read_model(MODEL), num_threads=1, score_threshold=0.5, resize="stretch",
                   normalization="auto", max_pixels=10**9)
    time.sleep(max(0.0, start_at - time.time()))  # every process loaded before any starts
    t0 = time.perf_counter()
    while True:
        with counter.get_lock():
            first = counter.value
            counter.value += TAKE
        if first >= len(paths):
            break
        for path in paths[first:first + TAKE]:
            with open(path, "rb") as fh:
                det.process(path, fh.read())
    q.put(time.perf_counter() - t0)


def detector_ceiling(paths: list[str], procs: int) -> dict:
    ctx = multiprocessing.get_context("spawn")
    q, counter = ctx.Queue(), ctx.Value("l", 0)
    start_at = time.time() + 8
    workers = [ctx.Process(target=_loop, args=(paths, start_at, counter, q)) for _ in range(procs)]
    for w in workers:
        w.start()
    spans = [q.get() for _ in workers]
    for w in workers:
        w.join()
    return {"images_per_s": len(paths) / max(spans), "slowest_s": max(spans), "fastest_s": min(spans)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4800)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    paths, work, listing, env = job_inputs(args.images, "ceiling-")
    ceiling = detector_ceiling(paths, cores)
    print(json.dumps(ceiling), flush=True)
    out = os.path.join(work, "out")
    t, m = job_run(listing, out, env)
    job = {"processing": m["counts"]["images"] / m["timings"]["run_s"], "steady": steady_rate(out),
           "wall_s": t["wall_s"], "workers": m["cluster"]["actors"]}
    results = {"cores": cores, "cpu": cpu_model(), "images": args.images, "ceiling": ceiling, "job": job,
               "job_steady_vs_ceiling": job["steady"] / ceiling["images_per_s"],
               "job_processing_vs_ceiling": job["processing"] / ceiling["images_per_s"]}
    save(args.out, f"ceiling_{cores}core", results, render(results))
    return 0


def render(r: dict) -> str:
    return "\n".join([
        f"{r['cores']} cores ({r['cpu']}); SSD model; {r['images']} JPEGs; the ceiling then the job, one run each", "",
        "| | images/s | vs ceiling |", "|---|---|---|",
        f"| Detector ceiling: {r['cores']} processes × `Detector.process` on one thread, no Ray, no Parquet | "
        f"{r['ceiling']['images_per_s']:.1f} | 1.00 |",
        f"| job ({r['job']['workers']} workers), steady | {r['job']['steady']:.1f} | {r['job_steady_vs_ceiling']:.2f} |",
        f"| job, processing (start-up and tail included) | {r['job']['processing']:.1f} | "
        f"{r['job_processing_vs_ceiling']:.2f} |"])


if __name__ == "__main__":
    sys.exit(main())
