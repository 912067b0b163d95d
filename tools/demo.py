"""`make demo`: draw sample images, run the job with the fixture model (120 images: worker processes, no Ray start),
print the summary and a DuckDB query of the output."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from batch_detect.synthetic import write_dataset  # noqa: E402

OUT = os.path.join(ROOT, "demo-output")
IMAGES = os.path.join(OUT, "images-in")
RESULT = os.path.join(OUT, "result")


def main() -> int:
    shutil.rmtree(OUT, ignore_errors=True)
    write_dataset(IMAGES, 120, seed=7)
    print(f"drew 120 sample images with known shapes into {IMAGES}")
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "batch-detect"), "run",
        "--model", os.path.join(ROOT, "models", "shapes_ssd_uint8.tflite"),
        "--labels", os.path.join(ROOT, "models", "shapes_labels.txt"),
        "--input", IMAGES, "--output", RESULT, "--shard-size", "16",
    ]
    print("$ " + " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd), flush=True)
    rc = subprocess.call(cmd)
    if rc != 0:
        return rc
    import duckdb

    query = f"""
        SELECT label, count(*) AS detections, round(avg(score), 3) AS mean_score
        FROM read_parquet('{RESULT}/detections/*.parquet')
        GROUP BY label ORDER BY detections DESC"""
    print("\nDuckDB:" + query)
    print(duckdb.sql(query))
    return 0


if __name__ == "__main__":
    sys.exit(main())
