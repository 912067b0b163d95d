"""A large manifest in order against the same manifest shuffled: time to the first URI, time to the last,
and the listing process's peak RSS, each case in a fresh process (`iter_input`, as a run's listing).

The sorted one streams (constant memory, the first URI at once); the shuffled one is sorted on local disk
(`extsort.py`): everything is read and sorted before the first URI, memory stays one run's worth.

    python benchmarks/manifest_sort.py [--uris 10000000] [--folder /tmp/bd-manifests]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def make_manifests(folder: str, n: int) -> dict[str, str]:
    os.makedirs(folder, exist_ok=True)
    paths = {"sorted": os.path.join(folder, f"sorted_{n}.txt"), "shuffled": os.path.join(folder, f"shuffled_{n}.txt")}
    if not all(os.path.exists(p) for p in paths.values()):
        uris = [f"s3://photos-bucket/uploads/{i % 997:03d}/{i:010d}-camera.jpg" for i in range(n)]
        uris.sort()
        with open(paths["sorted"], "w") as fh:
            fh.write("\n".join(uris) + "\n")
        random.Random(1).shuffle(uris)
        with open(paths["shuffled"], "w") as fh:
            fh.write("\n".join(uris) + "\n")
    return paths


def child(path: str) -> None:
    from batch_detect.inputs.listing import ListingStats, iter_input

    stats = ListingStats()
    t0 = time.perf_counter()
    first_s = None
    count = 0
    previous = ""
    for uri in iter_input(path, (), stats=stats):
        if first_s is None:
            first_s = time.perf_counter() - t0
        assert uri > previous
        previous = uri
        count += 1
    from bench import peak_rss_mb

    print(json.dumps({"uris": count, "first_uri_s": first_s, "all_uris_s": time.perf_counter() - t0,
                      "peak_rss_mb": peak_rss_mb(), "sorted_on_disk": stats.sorted_on_disk}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uris", type=int, default=10_000_000)
    parser.add_argument("--folder", default="/tmp/bd-manifests")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return 0
    from bench import child_json, cpu_model, save

    paths = make_manifests(args.folder, args.uris)
    results = {"uris": args.uris, "cpu": cpu_model(), "cores": os.cpu_count(), "cases": {}}
    for name, path in paths.items():
        results["cases"][name] = child_json(__file__, path)
        results["cases"][name]["manifest_mb"] = round(os.path.getsize(path) / 2**20)
    lines = [f"{results['cores']} cores ({results['cpu']}); {args.uris:,} URIs in a text manifest; a fresh process "
             "per case", "", "| manifest | first URI s | all URIs s | peak RSS MiB | sorted on disk |", "|---|---|---|---|---|"]
    for name, c in results["cases"].items():
        lines.append(f"| {name} ({c['manifest_mb']} MiB) | {c['first_uri_s']:.1f} | {c['all_uris_s']:.1f} | "
                     f"{c['peak_rss_mb']:.0f} | {c['sorted_on_disk']} |")
    save(args.out, "manifest_sort", results, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
