"""Driver memory for listing and planning, per million keys.

The driver is the only process that holds the whole listing (actors get one shard's URIs at a time).
This lists a real folder of N empty files (default 200k; names like a bucket's keys) through the same
`plan_input` a run uses, builds the plan table the run writes, and reports Python-heap and RSS growth,
scaled to a million keys. Results: benchmarks/results/listing_memory.json.

    python benchmarks/listing_memory.py [--keys 200000] [--folder /tmp/bd-keys]
"""

from __future__ import annotations

import argparse
import json
import os
import time
import tracemalloc

import pyarrow as pa

from batch_detect.config import IMAGE_EXTENSIONS
from batch_detect.listing import plan_fingerprint, plan_input


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_keys(folder: str, n: int) -> None:
    marker = os.path.join(folder, f".made-{n}")
    if os.path.exists(marker):
        return
    for i in range(n):
        sub = os.path.join(folder, f"camera-{i % 100:03d}", f"2026-11-{i % 28 + 1:02d}")
        if i < 2800:
            os.makedirs(sub, exist_ok=True)
        open(os.path.join(sub, f"frame-{i:09d}.jpg"), "wb").close()
    open(marker, "w").close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=200_000)
    ap.add_argument("--folder", default="/tmp/bd-listing-keys")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "listing_memory.json"))
    args = ap.parse_args()
    os.makedirs(args.folder, exist_ok=True)
    t0 = time.perf_counter()
    make_keys(args.folder, args.keys)
    made_s = time.perf_counter() - t0

    rss0 = rss_mb()
    tracemalloc.start()
    t0 = time.perf_counter()
    plan = plan_input(args.folder, form="auto", extensions=IMAGE_EXTENSIONS, shard_size=64)
    list_s = time.perf_counter() - t0
    heap_plan = tracemalloc.get_traced_memory()[0] / 2**20
    fingerprint = plan_fingerprint(plan.shards)
    table = pa.table({"shard_id": [s.shard_id for s in plan.shards for _ in s.uris],
                      "uri": [u for s in plan.shards for u in s.uris]})
    heap_peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    rss1 = rss_mb()
    n = plan.num_items
    assert n == args.keys, (n, args.keys)
    per_million = 1e6 / n
    uri_len = sum(len(u) for s in plan.shards[:100] for u in s.uris) / sum(len(s.uris) for s in plan.shards[:100])
    result = {
        "keys": n, "mean_uri_chars": round(uri_len, 1), "shards": len(plan.shards), "fingerprint": fingerprint[:12],
        "list_and_plan_s": round(list_s, 2), "make_files_s": round(made_s, 1),
        "heap_after_plan_mb": round(heap_plan, 1), "heap_peak_with_plan_table_mb": round(heap_peak, 1),
        "plan_table_arrow_mb": round(table.nbytes / 2**20, 1), "rss_growth_mb": round(rss1 - rss0, 1),
        "per_million_keys": {"heap_after_plan_mb": round(heap_plan * per_million),
                             "heap_peak_mb": round(heap_peak * per_million),
                             "rss_growth_mb": round((rss1 - rss0) * per_million),
                             "list_and_plan_s": round(list_s * per_million, 1)},
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
