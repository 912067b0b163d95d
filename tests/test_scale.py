"""The driver's cost does not grow with the input: a manifest of a million URIs (an inventory whose objects
are gone, so each image is a read failure at once and only the driver's work shows) runs through the
whole job with the driver's peak RSS under a bound the up-front design exceeded (590 MiB at 1.1M URIs,
measured on this kind of machine; benchmarks/driver_scale.py has both side by side), its first part
visible to readers within a minute, few part files per table, and `verify` streaming the output within
the same bound."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 1_000_000
RSS_BOUND_MB = 450


def peak_rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def watch(cmd: list[str], first_file: str | None, timeout: float) -> tuple[subprocess.CompletedProcess, float, float | None]:
    env = {**os.environ, "RAY_ADDRESS": ""}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak, first = 0.0, None
    while proc.poll() is None:
        peak = max(peak, peak_rss_mb(proc.pid))
        if first is None and first_file and os.path.exists(first_file):
            first = time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"{cmd[3]} did not finish within {timeout}s")
        time.sleep(0.05)
    out = proc.stdout.read().decode(errors="replace")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, ""), peak, first


def test_a_million_uris_with_flat_driver_memory_and_few_files(models_dir, tmp_path):
    manifest = tmp_path / "inventory.txt"
    with open(manifest, "w") as fh:
        for lo in range(0, N, 100_000):
            fh.write("".join(f"/nonexistent/bucket/photos/img_{i:09d}.jpg\n" for i in range(lo, lo + 100_000)))
    out = str(tmp_path / "out")
    run, peak, first = watch([sys.executable, "-m", "batch_detect", "run", "--model",
                              os.path.join(models_dir, "shapes_ssd_uint8.tflite"), "--input", str(manifest),
                              "--output", out], os.path.join(out, "failures", "part-000000.parquet"), 900)
    print(f"driver peak RSS {peak:.0f} MiB, first part after {first:.1f}s")
    assert run.returncode == 0, run.stdout[-3000:]
    result = json.load(open(os.path.join(out, "_manifest.json")))
    assert result["status"] == "complete" and result["counts"]["failures"] == N, result["counts"]
    assert result["counts"]["failure_types"] == {"read/not_found": N}
    assert peak < RSS_BOUND_MB, f"driver peak RSS {peak:.0f} MiB"
    assert first is not None and first < 60, first
    for table in ("images", "detections", "failures"):
        files = glob.glob(os.path.join(out, table, "*.parquet"))
        assert 1 <= len(files) <= max(8, N // 50_000), (table, len(files))
    assert not glob.glob(os.path.join(out, "_staging", "*", "*.parquet")), "staging files left behind"

    check, verify_peak, _ = watch([sys.executable, "-m", "batch_detect", "verify", out], None, 600)
    print(f"verify peak RSS {verify_peak:.0f} MiB")
    assert check.returncode == 0 and "OK" in check.stdout, check.stdout[-3000:]
    assert verify_peak < RSS_BOUND_MB, f"verify peak RSS {verify_peak:.0f} MiB"
