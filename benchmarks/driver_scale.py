"""The driver's cost against the dataset's size: peak RSS and time to first output for manifests of 1M,
10M and 100M URIs, this version against the one before the streaming plan (a git worktree of BASELINE),
run one after the other on this machine.

The URIs name objects that do not exist (as in an inventory whose objects were deleted), so every image
is a read failure within microseconds and only the driver's work shows. Measured from outside the
driver: its VmHWM (peak RSS) from /proc, sampled until it exits; "first output" is the moment the first
part file (what readers' globs see) exists, for the old layout the first per-shard file under images/
or failures/. A run is stopped with SIGINT once its first output exists and `--hold` seconds have
passed (the 100M run never needs to finish), or it runs to the end with `--full`.

    python benchmarks/driver_scale.py --sizes 1000000,10000000,100000000 [--baseline-rev 0b702e2]
Results: benchmarks/results/driver_scale.json and .md.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = "0b702e2"  # the last commit with the up-front plan and one set of files per shard
MODEL = os.path.join(ROOT, "models", "shapes_ssd_uint8.tflite")


def make_manifest(path: str, n: int) -> None:
    if os.path.exists(path) and os.path.getsize(path) > 0:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        step = 1_000_000
        for lo in range(0, n, step):
            # sorted, as an inventory is: zero-padded keys under one bucket-like prefix
            fh.write("".join(f"/nonexistent/bucket/photos/img_{i:09d}.jpg\n" for i in range(lo, min(n, lo + step))))
    os.replace(tmp, path)


def hwm_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def first_output(out: str, legacy: bool) -> bool:
    if legacy:
        return bool(glob.glob(os.path.join(out, "failures", "shard-*.parquet")))
    return os.path.exists(os.path.join(out, "failures", "part-000000.parquet"))


def measure(code_root: str, manifest: str, out: str, legacy: bool, hold: float, full: bool, limit: float,
            extra: tuple[str, ...] = ()) -> dict:
    subprocess.run(["rm", "-rf", out])
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": code_root, "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, "-m", "batch_detect", "run", "--model", MODEL, "--input", manifest, "--output", out,
           "--shard-size", "64", *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=code_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    peak, first, stopped = 0.0, None, False
    while proc.poll() is None:
        peak = max(peak, hwm_mb(proc.pid) or 0.0)
        now = time.perf_counter() - t0
        if first is None and first_output(out, legacy):
            first = now
        if not stopped and ((first is not None and not full and now - first >= hold) or now > limit):
            proc.send_signal(signal.SIGINT)
            stopped = True
        time.sleep(0.1)
    tail = proc.stdout.read().decode(errors="replace")[-1500:]
    result = {"peak_rss_mb": round(peak, 1), "first_output_s": None if first is None else round(first, 2),
              "wall_s": round(time.perf_counter() - t0, 1), "stopped_early": stopped, "exit": proc.returncode}
    if full and not stopped:
        for table in ("images", "detections", "failures"):
            result[f"files_{table}"] = len(glob.glob(os.path.join(out, table, "*.parquet")))
    if proc.returncode not in (0, 1, 130, -2):
        result["log_tail"] = tail
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000000,10000000,100000000")
    ap.add_argument("--baseline-rev", default=BASELINE)
    ap.add_argument("--baseline-max", type=int, default=10_000_000, help="largest size the old driver is run on")
    ap.add_argument("--full", default="1000000", help="sizes run to the end (files per table are counted)")
    ap.add_argument("--hold", type=float, default=5.0)
    ap.add_argument("--work", default="/tmp/bd-driver-scale")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "driver_scale.json"))
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    baseline = os.path.join(args.work, "baseline")
    if not os.path.isdir(baseline):
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "-f", baseline, args.baseline_rev], check=True)
    full = {int(x) for x in args.full.split(",") if x}
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        manifest = os.path.join(args.work, f"manifest-{n}.txt")
        make_manifest(manifest, n)
        for name, root, legacy in (("this", ROOT, False), ("baseline", baseline, True)):
            if legacy and n > args.baseline_max:
                rows.append({"uris": n, "version": name, "skipped": f"the old driver needs ~{n // 1_000_000 * 225} MiB "
                             "and minutes before its first output: not run"})
                continue
            r = measure(root, manifest, os.path.join(args.work, f"out-{name}-{n}"), legacy, args.hold,
                        n in full, limit=900)
            rows.append({"uris": n, "version": name, **r})
            print(json.dumps(rows[-1]), flush=True)
    result = {"machine": f"{os.cpu_count()} cores", "baseline_rev": args.baseline_rev, "rows": rows}
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    lines = ["| URIs | version | driver peak RSS (MiB) | first output (s) | wall (s) | files per table |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['uris']:,} | {r['version']} | – | – | – | {r['skipped']} |")
            continue
        files = "/".join(str(r.get(f"files_{t}", "–")) for t in ("images", "detections", "failures"))
        lines.append(f"| {r['uris']:,} | {r['version']} | {r['peak_rss_mb']} | {r['first_output_s']} | {r['wall_s']} | "
                     f"{files} |")
    with open(args.out[:-5] + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
