"""Nothing lost, nothing twice: killed actors, a killed driver, resume, and `verify` catching damage.
Processes are killed with SIGKILL by pid, as the OS or an OOM killer would."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from batch_detect.commands.cli import main
from batch_detect.config import RunConfig
from batch_detect.errors import OutputError
from batch_detect.run.pipeline import run
from batch_detect.synthetic import write_dataset
from batch_detect.commands.verify import verify
from helpers import committed_count, kill_driver_when, write_bad_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ((160, 120), (120, 160), (200, 150))


@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("many") / "images"
    write_dataset(str(folder), 700, seed=8, sizes=SMALL)
    bad = write_bad_inputs(str(folder))
    return str(folder), 700 + len(bad), len(bad)


def markers(out: str) -> int:
    """Shards the commit log records as committed (what a resumed run skips)."""
    return committed_count(out)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def detector_actor_pids() -> list[int]:
    pids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    if fh.read().startswith(b"ray::DetectorActor"):
                        pids.append(int(pid))
            except OSError:
                pass
    return pids


def test_killed_actor_shards_are_redone(local_ray, models_dir, many_images, tmp_path):
    images, n, _ = many_images
    out = str(tmp_path / "out")
    cfg = RunConfig(model=os.path.join(models_dir, "shapes_ssd_uint8.tflite"), input=images, output=out,
                    shard_size=8)
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(m=run(cfg).manifest))
    worker.start()
    wait_for(lambda: markers(out) >= 2, 120, "the first committed shards")
    victims = detector_actor_pids()
    assert victims, "no DetectorActor process found"
    os.kill(victims[0], signal.SIGKILL)
    killed_at = markers(out)
    worker.join(300)
    manifest = result["m"]
    assert killed_at < manifest["plan"]["num_shards"], "the run ended before the kill: nothing was tested"
    assert manifest["status"] == "complete"
    assert manifest["counts"]["images"] + manifest["counts"]["failures"] == n
    assert not any("worker_crashed" in k for k in manifest["counts"]["failure_types"])
    report = verify(out, images)
    assert report.ok, report.problems


def test_killed_driver_then_resume_finishes_without_duplicates(models_dir, many_images, tmp_path):
    images, n, n_bad = many_images
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "batch_detect", "run", "--model",
           os.path.join(models_dir, "shapes_ssd_uint8.tflite"), "--input", images, "--output", out,
           "--shard-size", "8", "--num-actors", "1", "--ray-min-images", "0"]  # the Ray path (the local one: test_without_ray)
    env = {**os.environ, "RAY_ADDRESS": ""}
    kill_driver_when(cmd, lambda: markers(out) >= 3)
    committed_before = markers(out)
    assert not verify(out).ok  # half done: verify must say so

    # the same command again resumes; too many failures → exit 1, but everything is committed
    again = subprocess.run(cmd + ["--resume", "--max-failure-rate", "0.001"], env=env, capture_output=True,
                           text=True, timeout=300, cwd=ROOT)
    assert again.returncode == 1, again.stdout + again.stderr
    assert "already committed, resuming" in again.stderr
    assert "over --max-failure-rate" in again.stderr and "decode/empty_file: 1" in again.stderr
    report = verify(out, images)
    assert report.ok, report.problems
    assert report.facts["images"] + report.facts["failures"] == n and report.facts["failures"] == n_bad
    import json

    manifest = json.load(open(os.path.join(out, "_manifest.json")))
    assert manifest["resumes"] == 1 and manifest["counts"]["skipped_committed_shards"] >= committed_before
    # verify's CLI agrees, and a changed setting against this output is refused
    ok = subprocess.run([sys.executable, "-m", "batch_detect", "verify", out, "--input", images],
                        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert ok.returncode == 0 and "OK" in ok.stdout
    changed = subprocess.run(cmd + ["--score-threshold", "0.5"], env=env, capture_output=True, text=True,
                             timeout=120, cwd=ROOT)
    assert changed.returncode == 2 and "score_threshold" in changed.stderr and "--overwrite" in changed.stderr


@pytest.fixture(scope="module")
def good_output(local_ray, models_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    images = root / "images"
    write_dataset(str(images), 24, seed=4, sizes=SMALL)
    write_bad_inputs(str(images))
    out = root / "out"
    run(RunConfig(model=os.path.join(models_dir, "shapes_ssd_uint8.tflite"), input=str(images),
                  output=str(out), shard_size=8))
    return str(images), str(out)


def forget_a_shard(out: str) -> None:
    """The commit log without one shard's line, as if the driver had died before logging it."""
    for path in sorted(glob.glob(os.path.join(out, "_log", "*.jsonl"))):
        lines = open(path).read().splitlines(keepends=True)
        shard = [ln for ln in lines if '"ev": "shard"' in ln]
        if shard:
            open(path, "w").write("".join(ln for ln in lines if ln != shard[0]))
            return
    raise AssertionError("no shard event in the log")


def drop_rows(path: str) -> None:
    """The part rewritten without its rows (a file that lost data)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    pq.write_table(table.slice(0, 0), path)


def damaged(good: str, tmp_path, damage) -> str:
    out = str(tmp_path / "damaged")
    shutil.copytree(good, out)
    damage(out)
    return out


def test_verify_catches_each_kind_of_damage(good_output, tmp_path):
    images, good = good_output
    assert verify(good, images).ok
    cases = {
        "not committed": forget_a_shard,
        "in neither images nor failures": lambda o: drop_rows(os.path.join(o, "failures", "part-000000.parquet")),
        "have no images/ file": lambda o: os.remove(os.path.join(o, "images", "part-000000.parquet")),
        "more than once": lambda o: shutil.copy(os.path.join(o, "images", "part-000000.parquet"),
                                                os.path.join(o, "images", "part-000001.parquet")),
        "not in the plan": lambda o: open(os.path.join(images, "new_image.jpg"), "wb").write(b"x"),
    }
    for i, (problem, damage) in enumerate(cases.items()):
        out = damaged(good, tmp_path / str(i), damage)
        report = verify(out, images)
        assert not report.ok and any(problem in p for p in report.problems), (problem, report.problems)
        if problem == "not in the plan":
            os.remove(os.path.join(images, "new_image.jpg"))


def test_rerun_of_a_complete_output_does_nothing_and_stays_whole(good_output, models_dir, capsys):
    images, out = good_output
    before = os.path.getmtime(os.path.join(out, "_manifest.json"))
    summary = run(RunConfig(model=os.path.join(models_dir, "shapes_ssd_uint8.tflite"), input=images,
                            output=out, shard_size=8))
    manifest = summary.manifest
    assert summary.nothing_new is not None and summary.nothing_new["complete"]  # answered without Ray
    assert os.path.getmtime(os.path.join(out, "_manifest.json")) == before  # nothing rewritten
    assert manifest["counts"]["skipped_committed_shards"] == manifest["plan"]["num_shards"]
    assert manifest["status"] == "complete" and verify(out, images).ok
    assert main(["run", "--model", os.path.join(models_dir, "shapes_ssd_uint8.tflite"), "--input", images,
                 "--output", out, "--shard-size", "8"]) == 0
    assert "already complete" in capsys.readouterr().out
    with pytest.raises(OutputError, match="a different model: resuming would mix"):
        run(RunConfig(model=os.path.join(models_dir, "shapes_ssd_float32.tflite"), input=images,
                      output=out, shard_size=8))
    with pytest.raises(OutputError, match="different shard_size"):
        run(RunConfig(model=os.path.join(models_dir, "shapes_ssd_uint8.tflite"), input=images,
                      output=out, shard_size=5))
    # a listing that changed is refused too: a new image lands in the first plan chunk
    extra = os.path.join(images, "aaa_new.jpg")
    shutil.copy(os.path.join(images, sorted(f for f in os.listdir(images) if f.startswith("img_"))[0]), extra)
    try:
        with pytest.raises(OutputError, match="different input listing"):
            run(RunConfig(model=os.path.join(models_dir, "shapes_ssd_uint8.tflite"), input=images,
                          output=out, shard_size=8))
    finally:
        os.remove(extra)
    assert verify(out, images).ok


def test_poison_image_is_isolated_and_the_rest_of_its_shard_completes(local_ray, models_dir, tmp_path,
                                                                      monkeypatch):
    images = tmp_path / "images"
    truth = write_dataset(str(images), 24, seed=6, sizes=SMALL)
    # Test-only hook: the worker process SIGSEGVs on this image, as a crash in native code would.
    monkeypatch.setenv("BATCH_DETECT_TEST_CRASH_ON", "img_00013")
    out = str(tmp_path / "out")
    manifest = run(RunConfig(model=os.path.join(models_dir, "shapes_ssd_uint8.tflite"), input=str(images),
                             output=out, shard_size=8)).manifest
    assert manifest["status"] == "complete"
    assert manifest["counts"]["failure_types"] == {"infer/worker_crashed": 1}
    assert manifest["counts"]["images"] == len(truth) - 1
    import duckdb

    rows = duckdb.execute(f"SELECT uri, stage, error_type FROM read_parquet('{out}/failures/*.parquet')").fetchall()
    assert [(os.path.basename(u), s, e) for u, s, e in rows] == [("img_00013.jpg", "infer", "worker_crashed")]
    assert verify(out, str(images)).ok
