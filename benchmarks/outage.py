"""A store outage mid-run: images, model and output in one bucket (moto's S3 server on 127.0.0.1) behind a
fault proxy that answers 3% of image GETs 503 SlowDown throughout and, from the first staged shard on, every
request 503 SlowDown for `--storm-s` seconds. The storage library keeps its default retries.

For each executor (worker processes, Ray), a calm run and a stormy run of the same images, in one
invocation: exit codes, walls, failure records, whether every image is there once, whether the stormy run's
detections equal the calm run's row for row, and `verify`:

    python benchmarks/outage.py [--images 400] [--storm-s 90] [--executors processes,ray]

Issue #31's bound: the stormy wall at most the calm wall + the storm + 60 s.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from bench import cpu_model, local_s3, make_images, save  # noqa: E402
from flaky_proxy import FlakyProxy  # noqa: E402

MODEL = os.path.join(ROOT, "benchmarks", "models", "ssd_mobilenet_v2_300_uint8.tflite")
BUCKET = "outage-bench"


def run_job(out: str, options: dict, ray: bool) -> tuple[int, float, str]:
    cmd = [sys.executable, "-m", "batch_detect", "run", "--model", f"s3://{BUCKET}/model.tflite",
           "--input", f"s3://{BUCKET}/in/", "--output", f"s3://{BUCKET}/{out}", "--shard-size", "32",
           "--score-threshold", "0.5"]
    if ray:
        cmd += ["--ray-min-images", "0"]
    for k, v in options.items():
        cmd += ["--storage-option", f"{k}={v}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"})
    return proc.returncode, time.perf_counter() - t0, proc.stderr


def storm_after_first_shard(proxy: FlakyProxy, seconds: float) -> threading.Thread:
    def go():
        while not any(m == "PUT" and "/_staging/" in p for m, p in list(proxy.requests)):
            time.sleep(0.02)
        proxy.storm = True
        time.sleep(seconds)
        proxy.storm = False

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread


def facts(fs, out: str, options: dict) -> dict:
    import duckdb

    from batch_detect.commands.verify import verify

    local = tempfile.mkdtemp(prefix="outage-")
    fs.get(f"{BUCKET}/{out}/", local + "/", recursive=True)
    rows, distinct = duckdb.execute(
        f"SELECT count(*), count(DISTINCT uri) FROM read_parquet('{local}/images/*.parquet')").fetchone()
    failures = duckdb.execute(f"SELECT count(*) FROM read_parquet('{local}/failures/*.parquet')").fetchone()[0]
    detections = duckdb.execute(
        f"SELECT uri, class_id, round(score, 4), round(xmin, 4), round(ymin, 4), round(xmax, 4), round(ymax, 4) "
        f"FROM read_parquet('{local}/detections/*.parquet') ORDER BY ALL").fetchall()
    return {"images": rows, "distinct": distinct, "failures": failures, "detections": detections,
            "verify_ok": verify(local).ok}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--storm-s", type=float, default=90.0)
    ap.add_argument("--executors", default="processes,ray")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = ap.parse_args()
    results = {"cores": os.cpu_count(), "cpu": cpu_model(), "images": args.images, "storm_s": args.storm_s,
               "runs": []}
    with local_s3(BUCKET) as (options, fs):
        folder = tempfile.mkdtemp(prefix="outage-images-")
        make_images(folder, args.images)
        fs.put(folder + "/", f"{BUCKET}/in/", recursive=True)
        fs.put(MODEL, f"{BUCKET}/model.tflite")
        with FlakyProxy(options["endpoint_url"], fail_fraction=0.03, seed=7) as proxy:
            flaky = {**options, "endpoint_url": proxy.url}
            for executor in args.executors.split(","):
                calm_out, stormy_out = f"calm-{executor}", f"stormy-{executor}"
                calm = run_job(calm_out, flaky, executor == "ray")
                weather = storm_after_first_shard(proxy, args.storm_s)
                stormy = run_job(stormy_out, flaky, executor == "ray")
                weather.join()
                a, b = facts(fs, calm_out, options), facts(fs, stormy_out, options)
                entry = {"executor": executor, "calm_rc": calm[0], "calm_wall_s": round(calm[1], 1),
                         "stormy_rc": stormy[0], "stormy_wall_s": round(stormy[1], 1),
                         "bound_s": round(calm[1] + args.storm_s + 60, 1),
                         "stormy_images": b["images"], "stormy_distinct": b["distinct"],
                         "stormy_failures": b["failures"], "calm_failures": a["failures"],
                         "same_detections": a["detections"] == b["detections"], "detections": len(b["detections"]),
                         "verify_ok": b["verify_ok"], "storm_answers": proxy.storm_answers,
                         "stormy_stderr_tail": stormy[2][-1500:]}
                results["runs"].append(entry)
                print({k: v for k, v in entry.items() if k != "stormy_stderr_tail"}, flush=True)
    lines = [f"{results['cores']} cores ({results['cpu']}); {args.images} JPEGs, model and output in one bucket on "
             f"moto behind a proxy: 3% of image GETs 503 throughout, every request 503 for {args.storm_s:.0f} s from "
             "the first staged shard; default library retries", "",
             "| executor | calm: exit, wall | stormy: exit, wall | bound (calm + storm + 60 s) | images (distinct) | "
             "failures | detections equal calm's | verify |", "|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        lines.append(f"| {r['executor']} | {r['calm_rc']}, {r['calm_wall_s']} s | {r['stormy_rc']}, {r['stormy_wall_s']} s"
                     f" | {r['bound_s']} s | {r['stormy_images']} ({r['stormy_distinct']}) | {r['stormy_failures']} | "
                     f"{r['same_detections']} ({r['detections']}) | {'OK' if r['verify_ok'] else 'NOT OK'} |")
    save(args.out, f"outage_{os.cpu_count()}core", results, "\n".join(lines))


if __name__ == "__main__":
    main()
