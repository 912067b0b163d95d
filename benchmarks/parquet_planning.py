"""Planning Parquet image input on an object store: how long before the first shard can start, and until
the whole plan is made, for files behind a proxy that adds a fixed latency to every request (S3 via moto
on 127.0.0.1). With `--id-column` every file's id column is read and checked for repeats before the first
shard (`containers.parquet_ranges`); each file costs a few requests (size, footer, column), so a serial
read of many files adds up to many latencies.

Runs this checkout and, with `--before DIR` (a worktree of an earlier commit), that one, each in a fresh
process, interleaved:

    python benchmarks/parquet_planning.py [--files 40] [--rows 50] [--latency-ms 100] [--before DIR] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, os.path.join(ROOT, "tests"))


def child(tree: str, url: str, options: str, id_column: str) -> None:
    sys.path.insert(0, tree)
    import s3fs

    from batch_detect.inputs.containers import parquet_ranges

    so = json.loads(options)
    files = sorted("s3://" + p for p in s3fs.S3FileSystem(**so).glob(url.removeprefix("s3://") + "/*.parquet"))
    t0 = time.perf_counter()
    ranges = parquet_ranges(files, "image", id_column or None, 64, so)
    first = next(ranges)
    t_first = time.perf_counter() - t0
    count = 1 + sum(1 for _ in ranges)
    print(json.dumps({"first_range_s": t_first, "all_ranges_s": time.perf_counter() - t0, "ranges": count,
                      "first": first[0]}))


def run_child(tree: str, url: str, options: dict, id_column: str) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", tree, url, json.dumps(options),
                           id_column], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": tree})
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:6])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=40)
    parser.add_argument("--rows", type=int, default=50)
    parser.add_argument("--latency-ms", type=float, default=100)
    parser.add_argument("--before", help="a worktree of an earlier commit: the arm 'before'")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args()
    from bench import local_s3

    with local_s3("plan") as (options, fs):
        return _measure(args, options, fs)


def _measure(args, options: dict, fs) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bench import cpu_model, save
    from flaky_proxy import FlakyProxy

    for f in range(args.files):
        ids = [f"f{f:04d}-r{r:05d}" for r in range(args.rows)]
        table = pa.table({"id": ids, "image": [b"\xff\xd8 not decoded here"] * args.rows})
        with fs.open(f"plan/in/part-{f:04d}.parquet", "wb") as fh:
            pq.write_table(table, fh)
    arms = (["before"] if args.before else []) + ["this"]
    results = {"cores": os.cpu_count(), "cpu": cpu_model(), "files": args.files, "rows": args.rows,
               "latency_ms": args.latency_ms, "before": args.before and subprocess.run(
                   ["git", "-C", args.before, "rev-parse", "--short", "HEAD"], capture_output=True,
                   text=True).stdout.strip(), "runs": []}
    with FlakyProxy(options["endpoint_url"], latency_s=args.latency_ms / 1000) as proxy:
        slow = {"key": options["key"], "secret": options["secret"], "client_kwargs": {"endpoint_url": proxy.url}}
        for rep in range(args.repeat):
            for id_column in ("id", ""):
                for arm in arms:
                    r = run_child(args.before if arm == "before" else ROOT, "s3://plan/in", slow, id_column)
                    r.update(arm=arm, id_column=id_column or None, rep=rep)
                    results["runs"].append(r)
                    print(f"{arm}, id column {id_column or 'none'}: first range {r['first_range_s']:.2f} s, "
                          f"all {r['all_ranges_s']:.2f} s ({r['ranges']} ranges)", flush=True)
    save(args.out, "parquet_planning", results, render(results))
    return 0


def render(results: dict) -> str:
    arms = list(dict.fromkeys(r["arm"] for r in results["runs"]))
    lines = [f"{results['cores']} cores ({results['cpu']}); {results['files']} Parquet files of {results['rows']} "
             f"rows on S3 (moto on 127.0.0.1) behind a proxy adding {results['latency_ms']:g} ms per request; "
             "a fresh process per run; median of the runs (all in brackets)", "",
             "| id column | arm | first shard planned s | whole plan s |", "|---|---|---|---|"]
    for id_column in dict.fromkeys(r["id_column"] for r in results["runs"]):
        for arm in arms:
            rs = [r for r in results["runs"] if r["arm"] == arm and r["id_column"] == id_column]

            def cell(key: str) -> str:
                xs = [r[key] for r in rs]
                return f"{statistics.median(xs):.2f} ({', '.join(f'{x:.2f}' for x in xs)})"
            label = f"{arm} ({results['before']})" if arm == "before" else "this checkout"
            lines.append(f"| {id_column or 'none'} | {label} | {cell('first_range_s')} | {cell('all_ranges_s')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
