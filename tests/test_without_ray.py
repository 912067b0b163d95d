"""Small embedded runs go to worker processes without starting Ray (`local.py`); the output is the one the
Ray path writes (files and tars, whose images are bounded by their sizes), a worker that dies hands the run to
Ray, and a stopped run resumes exactly once."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile

import duckdb
import pytest

from batch_detect.synthetic import write_dataset
from batch_detect.commands.verify import verify
from helpers import committed_count, kill_driver_when, recall_precision

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [(320, 240), (400, 300)]


def cli(models_dir, images, out, *extra, env_extra=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "batch_detect", "run", "--model", os.path.join(models_dir, "shapes_ssd_uint8.tflite"),
           "--labels", os.path.join(models_dir, "shapes_labels.txt"), "--input", images, "--output", out,
           "--shard-size", "16", "--score-threshold", "0.3", *extra]
    env = {**os.environ, "RAY_ADDRESS": "", **(env_extra or {})}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)


def rows(out: str) -> list[tuple]:
    return duckdb.execute(f"""SELECT regexp_replace(uri, '.*/', ''), class_id, label, round(score, 4),
                                     round(xmin, 4), round(ymin, 4), round(xmax, 4), round(ymax, 4)
                              FROM read_parquet('{out}/detections/*.parquet') ORDER BY ALL""").fetchall()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("noray") / "images"
    truth = write_dataset(str(folder), 120, seed=31, sizes=SMALL)
    return str(folder), truth


def test_small_run_without_ray_writes_what_the_ray_path_writes(models_dir, images, tmp_path):
    folder, truth = images
    local_out, ray_out = str(tmp_path / "local"), str(tmp_path / "ray")
    local = cli(models_dir, folder, local_out)
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]
    said = local.stdout + local.stderr
    assert "without starting Ray" in said and "starting Ray on this machine" not in said, said[-3000:]
    manifest = json.load(open(os.path.join(local_out, "_manifest.json")))
    assert manifest["cluster"]["executor"] == "local processes", manifest["cluster"]
    assert manifest["timings"]["ray_start_s"] is None
    assert manifest["counts"]["images"] == 120 and manifest["status"] == "complete"
    assert verify(local_out, folder).ok

    forced = cli(models_dir, folder, ray_out, "--ray-min-images", "0")
    assert forced.returncode == 0, forced.stdout[-3000:] + forced.stderr[-3000:]
    assert json.load(open(os.path.join(ray_out, "_manifest.json")))["cluster"]["executor"] == "ray"
    # The same rows, whichever way they were computed; and they find the drawn shapes.
    local_rows = rows(local_out)
    assert local_rows and local_rows == rows(ray_out)
    predicted: dict = {}
    for name, cid, _, _, x0, y0, x1, y1 in local_rows:
        predicted.setdefault(name, []).append((cid, x0, y0, x1, y1))
    expected = {k: [(b.class_id, b.xmin, b.ymin, b.xmax, b.ymax) for b in v] for k, v in truth.items()}
    recall, precision = recall_precision(expected, predicted)
    assert recall >= 0.8 and precision >= 0.8, (recall, precision)


def test_decoding_on_the_interpreters_thread_writes_the_same_rows(models_dir, images, tmp_path):
    """--decode-threads 0 (each worker one busy thread: decode, then invoke) changes where the work runs,
    not what is written: the same detections, and a bad image is still a failure record of its stage."""
    folder, _ = images
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    names = sorted(n for n in os.listdir(folder) if n.endswith(".jpg"))[:40]
    for name in names:
        os.link(os.path.join(folder, name), mixed / name)
    (mixed / "truncated.jpg").write_bytes(open(os.path.join(folder, names[0]), "rb").read()[:300])
    (mixed / "not_an_image.jpg").write_bytes(b"plain text, not a JPEG")
    outs = {}
    for threads in (None, "0"):
        out = str(tmp_path / f"out-{threads}")
        done = cli(models_dir, str(mixed), out, *(["--decode-threads", threads] if threads else []))
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        outs[threads] = out
    manifest = json.load(open(os.path.join(outs["0"], "_manifest.json")))
    assert manifest["sizing"]["decode_threads"] == 0 and manifest["counts"]["images"] == 40
    assert manifest["counts"]["failures"] == 2
    assert rows(outs[None]) and rows(outs["0"]) == rows(outs[None])
    failures = {o: duckdb.execute(f"SELECT regexp_replace(uri, '.*/', ''), stage, error_type FROM "
                                  f"read_parquet('{outs[o]}/failures/*.parquet') ORDER BY ALL").fetchall()
                for o in outs}
    assert failures["0"] == failures[None] and {f[1] for f in failures["0"]} == {"decode"}, failures


def test_small_tars_go_without_ray_their_members_counted_first(models_dir, images, tmp_path):
    """A tar's images are known only as it streams: on this machine's disk its headers are counted first
    (sidecars too: an upper bound on images), and a run under --ray-min-images needs no Ray."""
    folder, truth = images
    tars = tmp_path / "tars"
    tars.mkdir()
    names = sorted(truth)
    for t, lo in enumerate(range(0, len(names), 40)):
        with tarfile.open(tars / f"shard-{t:03d}.tar", "w") as tar:
            for name in names[lo:lo + 40]:
                tar.add(os.path.join(folder, name), arcname=f"sample/{name}")
                tar.add(os.path.join(folder, name), arcname=f"sample/{name[:-4]}.cls")  # a sidecar, not an image
    members = 2 * len(truth)
    local_out, ray_out = str(tmp_path / "local"), str(tmp_path / "ray")
    local = cli(models_dir, str(tars), local_out, "--ray-min-images", str(members + 1))
    said = local.stdout + local.stderr
    assert local.returncode == 0, said[-3000:]
    assert f"at most {members} images" in said and "without starting Ray" in said, said[-3000:]
    manifest = json.load(open(os.path.join(local_out, "_manifest.json")))
    assert manifest["cluster"]["executor"] == "local processes" and manifest["plan"]["form"] == "tar"
    assert manifest["counts"]["images"] == len(truth) and verify(local_out).ok

    at_bound = cli(models_dir, str(tars), ray_out, "--ray-min-images", str(members))  # might hold that many: Ray
    said = at_bound.stdout + at_bound.stderr
    assert at_bound.returncode == 0 and "starting Ray on this machine" in said, said[-3000:]
    assert json.load(open(os.path.join(ray_out, "_manifest.json")))["cluster"]["executor"] == "ray"
    local_rows = rows(local_out)
    assert local_rows and local_rows == rows(ray_out)


def test_a_tar_elsewhere_is_bounded_by_its_listed_size(tmp_path):
    """Off this machine a read per member would cost too much: each member takes at least a 512-byte
    header, so the listed size bounds them. A tar that is not one (compressed, cut short) falls back to it."""
    import fsspec

    from batch_detect.inputs.containers import tar_members_at_most

    path = tmp_path / "t.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(30):
            info = tarfile.TarInfo(f"m{i}.jpg")
            info.size = 100
            tar.addfile(info, io.BytesIO(b"x" * 100))
    size = os.path.getsize(path)
    assert tar_members_at_most(str(path), size, 10**6) == 30  # counted here
    assert tar_members_at_most(str(path), size, 12) == 12  # stops at the limit
    fsspec.filesystem("memory").pipe("/bucket/t.tar", path.read_bytes())
    bound = tar_members_at_most("memory://bucket/t.tar", size, 10**6)
    assert bound == size // 512 and 30 <= bound  # not read: bounded (30 members of 100 bytes: 60 blocks + padding)
    assert tar_members_at_most("memory://bucket/t.tar", None, 10**6) is None  # no size listed: unknown
    (tmp_path / "gz.tar").write_bytes(b"\x1f\x8b" + b"\0" * 2046)
    assert tar_members_at_most(str(tmp_path / "gz.tar"), 2048, 10**6) == 4


def test_a_worker_that_dies_hands_the_run_to_ray(models_dir, tmp_path):
    folder = str(tmp_path / "images")
    truth = write_dataset(folder, 40, seed=32, sizes=SMALL)
    out = str(tmp_path / "out")
    # Test-only hook: the worker process SIGSEGVs on this image, as a crash in native code would.
    done = cli(models_dir, folder, out, env_extra={"BATCH_DETECT_TEST_CRASH_ON": "img_00021"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "going on with Ray" in done.stderr, done.stderr[-3000:]
    manifest = json.load(open(os.path.join(out, "_manifest.json")))
    assert manifest["cluster"]["executor"] == "ray"
    assert manifest["cluster"]["without_ray"]["handed_to_ray"] >= 1, manifest["cluster"]
    assert manifest["counts"]["failure_types"] == {"infer/worker_crashed": 1}
    assert manifest["counts"]["images"] == len(truth) - 1
    failed = duckdb.execute(f"SELECT uri, error_type FROM read_parquet('{out}/failures/*.parquet')").fetchall()
    assert [(os.path.basename(u), e) for u, e in failed] == [("img_00021.jpg", "worker_crashed")]
    assert verify(out, folder).ok


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_run_leaves_no_worker_and_resumes_exactly_once(models_dir, tmp_path, sig):
    folder = str(tmp_path / "images")
    write_dataset(folder, 600, seed=33, sizes=SMALL)
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "batch_detect", "run", "--model", os.path.join(models_dir, "shapes_ssd_uint8.tflite"),
           "--input", folder, "--output", out, "--shard-size", "4", "--ray-min-images", "1000"]
    # kill_driver_when waits for the driver's output to close: a worker left holding it would time it out.
    # Each batch made 0.1 s slower (a test-only hook): the whole run takes over 4 s on two workers, not 1 s,
    # so it is surely under way when it is stopped. The resume runs at full speed.
    rc, output = kill_driver_when(cmd, lambda: committed_count(out) >= 2, sig=sig,
                                  env_extra={"BATCH_DETECT_TEST_SLOW_BATCH_S": "0.1"})
    if sig == signal.SIGTERM:
        assert rc == 143, output[-3000:]
        manifest = json.load(open(os.path.join(out, "_manifest.json")))
        assert manifest["status"] == "interrupted", manifest["status"]
    else:
        assert rc == -signal.SIGKILL
    assert committed_count(out) < 600 // 4, "the run finished before it was stopped: nothing was tested"
    # No worker process outlives the driver, not even one killed with no chance to stop them.
    leftover = subprocess.run(["pgrep", "-f", "batch_detect[.]local"], capture_output=True, text=True).stdout.split()
    assert not leftover, leftover
    again = subprocess.run(cmd, env={**os.environ, "RAY_ADDRESS": ""}, capture_output=True, text=True, cwd=ROOT,
                           timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "without starting Ray" in again.stderr  # what was left is small: the resume needs no Ray either
    assert verify(out, folder).ok
    n = duckdb.execute(f"SELECT count(*), count(DISTINCT uri) FROM read_parquet('{out}/images/*.parquet')").fetchone()
    assert n == (600, 600)


def test_unsorted_manifest_over_the_in_memory_limit_runs_each_image_once(models_dir, images, tmp_path, monkeypatch):
    """A manifest too long to sort in memory and out of order (limit lowered here) is sorted on disk by the
    listing and runs like any input: each image once, repeats counted, verify OK against the manifest.
    (In process, so the lowered limit applies: on worker processes alone, or on the suite's local Ray when
    an earlier test started it.)"""
    import tempfile

    from batch_detect.inputs import extsort, listing
    from batch_detect.config import RunConfig
    from batch_detect.run.pipeline import run

    folder, truth = images
    monkeypatch.setattr(listing, "SORT_LIMIT", 40)
    monkeypatch.setattr(extsort, "RUN_SIZE", 30)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    names = sorted(truth)
    listed = [os.path.join(folder, n) for n in names + names[::5]]  # 24 repeats
    __import__("random").Random(3).shuffle(listed)
    manifest = str(tmp_path / "unsorted.txt")
    with open(manifest, "w") as fh:
        fh.write("\n".join(listed) + "\n")
    out = str(tmp_path / "out")
    cfg = RunConfig(model=os.path.join(models_dir, "shapes_ssd_uint8.tflite"), input=manifest, output=out,
                    shard_size=16, score_threshold=0.3)
    summary = run(cfg).manifest
    assert summary["status"] == "complete" and summary["counts"]["images"] == len(names)
    assert summary["input"]["manifest_duplicates"] == 24 and summary["input"]["manifest_sorted_on_disk"]
    assert verify(out, manifest).ok
    got = duckdb.execute(f"SELECT uri FROM read_parquet('{out}/images/*.parquet') ORDER BY uri").fetchall()
    assert [os.path.basename(u) for (u,) in got] == names
    assert [p for p in os.listdir(tmp_path) if p.startswith("batch-detect-sort-")] == []
