"""Driver memory for listing and planning a local folder, streamed as a run does it.

Lists a real folder of N empty files (default 200k; names like a bucket's keys) through the same
`plan_input` → plan chunks → plan-chunk tables a run uses, consuming the stream without holding it, and
reports peak Python heap and time. With the streaming plan the peak is one plan chunk (at most 4,096
shards), whatever N. Results: benchmarks/results/listing_memory.json.

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
from batch_detect.inputs.plan import chunked, plan_input


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
    n = shards = chunks = 0
    uri_chars = 0
    for chunk in chunked(plan.shards):
        # what the run's listing thread builds for each chunk before it writes it
        table = pa.table({"shard_id": [s.shard_id for s in chunk.shards for _ in s.uris],
                          "uri": [u for s in chunk.shards for u in s.uris]})
        n += table.num_rows
        shards += len(chunk.shards)
        chunks += 1
        uri_chars += sum(len(u) for u in chunk.shards[0].uris)
        del table
    list_s = time.perf_counter() - t0
    heap_peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    rss1 = rss_mb()
    assert n == args.keys, (n, args.keys)
    result = {
        "keys": n, "mean_uri_chars": round(uri_chars / (64 * chunks), 1), "shards": shards, "chunks": chunks,
        "list_and_plan_s": round(list_s, 2), "make_files_s": round(made_s, 1),
        "heap_peak_mb": round(heap_peak, 1), "rss_growth_mb": round(rss1 - rss0, 1),
        "list_and_plan_s_per_million": round(list_s * 1e6 / n, 1),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
