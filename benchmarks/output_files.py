"""Files per table for a real run: N real JPEGs (synthetic scenes, default 30,000) through the job with
the default part size, then the files in each table counted, every image checked exactly once with
DuckDB, and `verify` run. The issue's bound is max(8, N / 50,000) files per table.

    python benchmarks/output_files.py [--images 30000]
Results: benchmarks/results/output_files.json.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

import duckdb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from batch_detect.synthetic import write_dataset  # noqa: E402
from batch_detect.commands.verify import verify  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=30_000)
    ap.add_argument("--work", default="/tmp/bd-output-files")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "output_files.json"))
    args = ap.parse_args()
    images = os.path.join(args.work, f"images-{args.images}")
    if not os.path.exists(os.path.join(images, ".done")):
        write_dataset(images, args.images, seed=30, sizes=((320, 240), (240, 320), (160, 120)))
        open(os.path.join(images, ".done"), "w").close()
    out = os.path.join(args.work, "out")
    subprocess.run(["rm", "-rf", out], check=True)
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "batch_detect", "run", "--model",
                          os.path.join(ROOT, "models", "shapes_ssd_uint8.tflite"), "--input", images, "--output", out],
                         cwd=ROOT, env={**os.environ, "RAY_ADDRESS": ""}, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    files = {t: len(glob.glob(os.path.join(out, t, "*.parquet"))) for t in ("images", "detections", "failures")}
    rows, distinct = duckdb.execute(f"""SELECT count(*), count(DISTINCT uri) FROM (
        SELECT uri FROM read_parquet('{out}/images/*.parquet')
        UNION ALL SELECT uri FROM read_parquet('{out}/failures/*.parquet'))""").fetchone()
    planned = duckdb.execute(f"SELECT count(*) FROM read_parquet('{out}/_plan/*.parquet')").fetchone()[0]
    report = verify(out, images)
    result = {"images": args.images, "exit": run.returncode, "wall_s": round(wall, 1), "files_per_table": files,
              "bound": max(8, args.images // 50_000), "planned": planned, "rows": rows, "distinct_uris": distinct,
              "verify_ok": report.ok, "verify_problems": report.problems[:5],
              "manifest_timings": json.load(open(os.path.join(out, "_manifest.json")))["timings"]}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
