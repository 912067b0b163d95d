"""Part files: the README's plain globs return every row at most once at every moment — while the job
runs, after its driver is killed, while it resumes — and the finished output is a few whole parts that
`verify` proves exact. Small parts (--part-rows) make many of them in a small run."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import duckdb

from batch_detect.commands.status import status
from batch_detect.synthetic import write_dataset
from batch_detect.commands.verify import verify
from helpers import write_bad_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def visible(out: str) -> tuple[int, int]:
    """(rows, distinct uris) that a reader's globs over images ⊎ failures return right now."""
    try:
        return duckdb.execute(f"""SELECT count(*), count(DISTINCT uri) FROM (
            SELECT uri FROM read_parquet('{out}/images/*.parquet')
            UNION ALL SELECT uri FROM read_parquet('{out}/failures/*.parquet'))""").fetchone()
    except duckdb.IOException:  # no part yet
        return 0, 0


def watch_globs(proc: subprocess.Popen, out: str, stop_when=None, statuses: list | None = None) -> tuple[int, int]:
    """Poll the globs until the process ends (or `stop_when(parts)` says to kill it); every poll must see
    no row twice. Returns (polls, most rows seen); `statuses` collects `batch-detect status` on the way."""
    polls, most = 0, 0
    while proc.poll() is None:
        rows, distinct = visible(out)
        assert rows == distinct, f"a reader saw {rows - distinct} rows twice"
        polls, most = polls + 1, max(most, rows)
        if statuses is not None and os.path.exists(os.path.join(out, "_manifest.json")):
            statuses.append(status(out))
        if stop_when is not None and stop_when(len(glob.glob(os.path.join(out, "images", "part-*.parquet")))):
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            break
        time.sleep(0.05)
    return polls, most


def test_globs_never_see_a_row_twice_through_a_killed_driver_and_resume(models_dir, tmp_path):
    images = tmp_path / "images"
    write_dataset(str(images), 400, seed=21, sizes=((96, 72), (72, 96)))
    n = 400 + len(write_bad_inputs(str(images)))
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "batch_detect", "run", "--model", os.path.join(models_dir, "shapes_ssd_uint8.tflite"),
           "--input", str(images), "--output", out, "--shard-size", "8", "--part-rows", "40", "--num-actors", "1",
           "--ray-min-images", "0"]  # parts compacted by Ray tasks
    env = {**os.environ, "RAY_ADDRESS": ""}
    log = open(tmp_path / "first.log", "w+")
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    polls, seen = watch_globs(first, out, stop_when=lambda parts: parts >= 3)
    log.seek(0)
    assert first.returncode == -signal.SIGKILL, f"the run ended before the driver was killed: {log.read()[-3000:]}"
    assert 0 < seen < n and polls > 3, (polls, seen)
    rows, distinct = visible(out)
    assert rows == distinct and rows > 0
    assert not verify(out).ok  # half done, and verify says so

    log = open(tmp_path / "again.log", "w+")
    again = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    seen_status: list[dict] = []
    watch_globs(again, out, statuses=seen_status)
    log.seek(0)
    assert again.returncode == 0, log.read()[-3000:]
    assert visible(out) == (n, n)
    report = verify(out, str(images))
    assert report.ok, report.problems
    # ~n / 40 parts (the first after 5 s may be short, and the killed run's last one too), never one per shard
    for table in ("images", "detections", "failures"):
        files = glob.glob(os.path.join(out, table, "*.parquet"))
        assert 3 <= len(files) <= n // 40 + 3, (table, len(files))
    assert not glob.glob(os.path.join(out, "_staging", "*", "*.parquet"))
    # `status`, read from the output alone, followed the resumed run: running and moving, then complete
    running = [st["done"] for st in seen_status if st["state"] == "running"]
    assert len(set(running)) >= 2 and running == sorted(running), running
    final = status(out)
    assert final["state"] == "complete" and final["done"] == final["planned"] == n
    assert final["failures_by_type"] and final["parts"] >= 3 and final["rate_images_per_s"] > 0
