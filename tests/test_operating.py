"""Operating a long job: --max-failure-rate stops a hopeless run early (committed work stays, a re-run
goes on), and SIGTERM (Kubernetes, `ray job stop`) leaves a consistent, resumable output within seconds."""

from __future__ import annotations

import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import duckdb

from batch_detect.output.commitlog import read_state
from batch_detect.run.dispatch import FAIL_FAST_MIN
from batch_detect.output.sink import OutputStore
from batch_detect.synthetic import write_dataset
from batch_detect.commands.verify import verify
from helpers import committed_count, kill_driver_when

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "RAY_ADDRESS": ""}


def rows(out: str) -> tuple[int, int]:
    if not glob.glob(os.path.join(out, "images", "*.parquet")):  # nothing compacted yet
        return 0, 0
    return duckdb.execute(f"""SELECT count(*), count(DISTINCT uri) FROM (
        SELECT uri FROM read_parquet('{out}/images/*.parquet')
        UNION ALL SELECT uri FROM read_parquet('{out}/failures/*.parquet'))""").fetchone()


def cli(models_dir: str, images: str, out: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "batch_detect", "run", "--model", os.path.join(models_dir, "shapes_ssd_uint8.tflite"),
            "--input", images, "--output", out, *extra]


def test_failure_rate_stops_a_hopeless_run_early(models_dir, tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    rng = random.Random(0)
    for i in range(2000):  # named like photos, not decodable: a wrong prefix, a wrong format
        (junk / f"photo_{i:05d}.jpg").write_bytes(rng.randbytes(200))
    out = str(tmp_path / "out")
    t0 = time.time()
    proc = subprocess.run(cli(models_dir, str(junk), out, "--max-failure-rate", "0.1"), env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "stopped early" in proc.stderr and "decode/" in proc.stderr, proc.stderr[-2000:]
    manifest = json.load(open(os.path.join(out, "_manifest.json")))
    assert manifest["status"] == "failed" and "--max-failure-rate 0.1" in manifest["error"]
    state = read_state(OutputStore(out))
    done = state.totals["images"] + state.totals["failures"]
    assert FAIL_FAST_MIN <= done < 0.3 * 2000, done
    assert manifest["counts"]["failures"] == done
    # What was committed is compacted up to the first shard it dropped (parts are contiguous; the rest is
    # compacted by the re-run) and readable exactly once; verify names only the work left to do.
    visible, distinct = rows(out)
    first_gap = next(i for i in range(2000 // 64 + 1) if not state.is_committed(i))
    # Which shards were still in flight when it stopped depends on timing; that every committed shard before
    # the first dropped one is compacted (64 junk images each), and nothing else is visible, does not.
    assert state.compacted_end == first_gap and visible == distinct == 64 * first_gap <= done, \
        (visible, first_gap, done)
    report = verify(out)
    assert not report.ok and all("re-run" in p for p in report.problems), report.problems
    print(f"stopped after {done} of 2000 images in {time.time() - t0:.1f}s")

    # The same command without the limit goes on from there and finishes exactly once.
    again = subprocess.run(cli(models_dir, str(junk), out), env=ENV, cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert rows(out) == (2000, 2000)
    assert verify(out, str(junk)).ok


def test_sigterm_leaves_a_consistent_output_that_resumes(models_dir, tmp_path):
    images = str(tmp_path / "images")
    write_dataset(images, 400, seed=61, sizes=((96, 72), (72, 96)))
    out = str(tmp_path / "out")
    cmd = cli(models_dir, images, out, "--shard-size", "8", "--num-actors", "1", "--ray-min-images", "0")
    t_signal = {}

    def ready() -> bool:
        if committed_count(out) >= 3:
            t_signal.setdefault("t", time.time())
            return True
        return False

    code, output = kill_driver_when(cmd, ready, sig=signal.SIGTERM)
    took = time.time() - t_signal["t"]
    assert code == 143, output[-3000:]
    assert "interrupted" in output
    # what the wait before the first shard is, as it happens
    assert output.index("checking the model, the input") < output.index("starting Ray on this machine")
    assert took < 10, f"the driver took {took:.1f}s to stop after SIGTERM"
    manifest = json.load(open(os.path.join(out, "_manifest.json")))
    state = read_state(OutputStore(out))
    assert manifest["status"] == "interrupted"
    assert manifest["counts"]["committed_shards"] == state.num_committed > 0
    assert manifest["counts"]["images"] + manifest["counts"]["failures"] == \
        state.totals["images"] + state.totals["failures"]
    again = subprocess.run(cmd + ["--resume"], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert rows(out) == (400, 400)
    report = verify(out, images)
    assert report.ok, report.problems


def test_progress_in_logs_is_a_line_a_minute_not_a_line_a_shard():
    import io

    from batch_detect.commands.progress import Progress

    log = io.StringIO()  # not a terminal: plain lines
    bar = Progress(None, None, stream=log)
    shard = {"images": 8, "failures": 0, "detections": 3}
    for _ in range(50):
        bar.update(shard)
    bar.listed(500, 51)
    bar.update(shard)  # the last shard
    lines = log.getvalue().splitlines()
    assert len(lines) == 2, lines  # the first shard and the end; nothing in between within the minute
    assert lines[0].startswith("progress: 8/? images") and lines[1].startswith("progress: 408/500 images")


def test_actor_logs_name_the_shard_and_image_of_the_first_failure_of_each_kind(caplog):
    from batch_detect.model.detector import ImageFailure
    from batch_detect.run.worker import ShardRows

    rows = ShardRows("shard-000007")
    with caplog.at_level("WARNING", logger="batch_detect.run.worker"):
        for i in range(3):
            rows.add(ImageFailure(f"s3://b/junk_{i}.jpg", "decode", "corrupt_image_test", "cannot identify"), None)
        rows.add(ImageFailure("s3://b/huge.jpg", "validate", "image_too_large_test", "too big"), None)
    lines = [r.getMessage() for r in caplog.records]
    assert len(rows.failures["uri"]) == 4 and len(lines) == 2, lines
    assert lines[0].startswith("shard-000007: s3://b/junk_0.jpg failed (decode/corrupt_image_test)")
    assert "s3://b/huge.jpg" in lines[1]
