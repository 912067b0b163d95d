"""An S3 Inventory report of N rows as the input, on moto's S3 server on 127.0.0.1: the driver's peak RSS
and the time to its first committed output (the first part file), measured from outside the driver as
`driver_scale.py` measures a manifest.

The report is written the way S3 writes one: CSV.gz data files without a header (`Bucket, Key, Size,
ETag`), rows in no order across or within files (a fixed permutation of the keys), a manifest.json with
each file's MD5, all put straight into the in-process moto backend behind the server (millions of rows
over HTTP would cost more than the run). The listed objects do not exist, so every image is a read failure
(a 404 from the server) and only the driver's work shows: fetching and checking the data files, sorting
the rows on local disk (`extsort.py`), planning and dispatch. The run is stopped with SIGINT `--hold`
seconds after its first output.

    python benchmarks/inventory_scale.py --rows 10000000 [--files 10] [--hold 5]

Results: benchmarks/results/inventory_scale_<rows>.json and .md.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
SOURCE, DEST = "inv-source", "inv-dest"
CREDENTIALS = {"key": "testing-key-id", "secret": "testing-secret"}


def permuted(n: int):
    """0..n-1 in a scrambled order without holding them: i -> i * step mod n, step coprime to n."""
    step = int(n * 0.618) | 1
    while math.gcd(step, n) != 1:
        step += 2
    return ((i * step) % n for i in range(n))


def data_file(rows: int, files: int, part: int) -> bytes:
    etag = "d41d8cd98f00b204e9800998ecf8427e"
    lines = (f'"{SOURCE}","photos/{i % 251:03d}/img_{i:09d}.jpg","{1000 + i % 9000}","{etag}"\n'
             for i in permuted(rows) if i % files == part)
    out, block = [], []
    for line in lines:
        block.append(line)
        if len(block) == 100_000:
            out.append("".join(block))
            block = []
    out.append("".join(block))
    return gzip.compress("".join(out).encode(), compresslevel=1)


def build_report(backend, rows: int, files: int) -> str:
    """The data files and manifest.json in the destination bucket; the manifest's s3:// URL."""
    entries = []
    for part in range(files):
        data = data_file(rows, files, part)
        key = f"inventory/{SOURCE}/daily/data/part-{part:03d}.csv.gz"
        backend.put_object(DEST, key, data, disable_notification=True)
        entries.append({"key": key, "size": len(data), "MD5checksum": hashlib.md5(data).hexdigest()})
    manifest = {"sourceBucket": SOURCE, "destinationBucket": f"arn:aws:s3:::{DEST}", "version": "2016-11-30",
                "fileFormat": "CSV", "fileSchema": "Bucket, Key, Size, ETag", "files": entries}
    key = f"inventory/{SOURCE}/daily/2026-12-01T00-00Z/manifest.json"
    backend.put_object(DEST, key, json.dumps(manifest).encode(), disable_notification=True)
    return f"s3://{DEST}/{key}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--files", type=int, default=10)
    ap.add_argument("--hold", type=float, default=5.0, help="seconds after the first output before SIGINT")
    ap.add_argument("--limit", type=float, default=900.0, help="stop the run after this long in any case")
    ap.add_argument("--work", default="/tmp/bd-inventory-scale")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = ap.parse_args()
    import s3fs
    from moto.s3.models import s3_backends

    from driver_scale import measure
    from s3_listing import loopback_s3

    with loopback_s3() as endpoint:
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True, **CREDENTIALS)
        fs.mkdir(SOURCE)
        fs.mkdir(DEST)
        partition, account = s3_backends.bucket_accounts[DEST]
        t0 = time.perf_counter()
        url = build_report(s3_backends[account][partition], args.rows, args.files)
        build_s = time.perf_counter() - t0
        print(f"{args.rows:,} rows in {args.files} data files in {build_s:.0f} s", flush=True)
        options = [f"endpoint_url={endpoint}", f"key={CREDENTIALS['key']}", f"secret={CREDENTIALS['secret']}"]
        extra = tuple(x for o in options for x in ("--storage-option", o))
        os.makedirs(args.work, exist_ok=True)
        load = os.getloadavg()[0]
        result = measure(ROOT, url, os.path.join(args.work, f"out-{args.rows}"), False, args.hold, False,
                         args.limit, extra)
        result.update(rows=args.rows, files=args.files, build_s=round(build_s, 1), load_before=load,
                      load_after=os.getloadavg()[0], cpus=os.cpu_count(), python=platform.python_version())
        print(json.dumps(result), flush=True)
    name = os.path.join(args.out, f"inventory_scale_{args.rows // 1_000_000}M" if args.rows >= 1_000_000
                        else f"inventory_scale_{args.rows}")
    with open(name + ".json", "w") as fh:
        json.dump(result, fh, indent=1)
    with open(name + ".md", "w") as fh:
        fh.write(f"""# S3 Inventory of {args.rows:,} rows: the driver

`benchmarks/inventory_scale.py --rows {args.rows} --files {args.files}`: a CSV.gz inventory on moto's S3 server
on 127.0.0.1 whose objects do not exist (every image a read failure: only the driver's work shows), the run
stopped {args.hold:g} s after its first output. {os.cpu_count()} CPUs, shared with other engineers' work
(1-minute load average {load:.1f} before, {result['load_after']:.1f} after).

| rows | driver peak RSS (MiB) | first output (s) | wall until stopped (s) | exit | report built in (s) |
|---|---|---|---|---|---|
| {args.rows:,} | {result['peak_rss_mb']} | {result['first_output_s']} | {result['wall_s']} | {result['exit']} | {build_s:.0f} |

"First output" is the first part file (what readers' globs see) existing, timed from the driver's start:
it includes fetching and MD5-checking every data file and sorting every row on local disk (an inventory is in
no order), which comes before the first shard; peak RSS is the driver's VmHWM from /proc, sampled every 0.1 s.
""")


if __name__ == "__main__":
    main()
