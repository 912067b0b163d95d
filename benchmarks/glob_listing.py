"""A glob over a large folder: the streamed listing (`listing._glob`: walk the fixed folder, prune by the
pattern) against fsspec's `glob` expanded in memory (what the listing did before), each in a fresh process:
time to the first URI, to the last, and peak RSS.

The folder is listing_memory.py's (camera-NNN/2026-11-DD/frame-N.jpg, empty files).

    python benchmarks/glob_listing.py [--keys 200000] [--folder /tmp/bd-listing-keys]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

PATTERNS = ["*/*/*.jpg", "camera-00[0-4]/*/*.jpg", "**/frame-00000001?.jpg"]


def child(how: str, url: str) -> None:
    t0 = time.perf_counter()
    first = None
    count = 0
    if how == "streamed":
        from batch_detect.inputs.listing import iter_input

        for _ in iter_input(url, (".jpg",)):
            first = first if first is not None else time.perf_counter() - t0
            count += 1
    else:
        from fsspec.core import url_to_fs

        fs, path = url_to_fs(url)
        found = fs.glob(path, detail=True)
        for _ in sorted(p for p, info in found.items() if info.get("type") == "file"):
            first = first if first is not None else time.perf_counter() - t0
            count += 1
    from bench import peak_rss_mb

    print(json.dumps({"uris": count, "first_uri_s": first, "all_uris_s": time.perf_counter() - t0,
                      "peak_rss_mb": peak_rss_mb()}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=200_000)
    parser.add_argument("--folder", default="/tmp/bd-listing-keys")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return 0
    from bench import child_json, cpu_model, save
    from listing_memory import make_keys

    os.makedirs(args.folder, exist_ok=True)
    make_keys(args.folder, args.keys)
    results = {"keys": args.keys, "cpu": cpu_model(), "cases": {}}
    lines = [f"{os.cpu_count()} cores ({results['cpu']}); a local folder of {args.keys:,} files; a fresh process per "
             "case", "", "| glob | listing | URIs | first URI s | all URIs s | peak RSS MiB |", "|---|---|---|---|---|---|"]
    for pattern in PATTERNS:
        for how in ("fsspec glob (before)", "streamed"):
            r = child_json(__file__, "streamed" if how == "streamed" else "fsspec", f"{args.folder}/{pattern}")
            results["cases"][f"{pattern} | {how}"] = r
            lines.append(f"| `{pattern}` | {how} | {r['uris']:,} | {r['first_uri_s']:.2f} | {r['all_uris_s']:.2f} | "
                         f"{r['peak_rss_mb']:.0f} |")
    save(args.out, "glob_listing", results, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
