"""Incremental runs over a growing input: a new run processes only new and changed objects, every row
carries its run_id, the README's "current rows" query gives a changed object's latest rows, a killed
incremental driver resumes exactly once, and one output has one writer at a time (the lease)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time

import duckdb
import pytest

from batch_detect.commands.cli import main
from batch_detect.config import RunConfig
from batch_detect.errors import InputError, OutputError
from batch_detect.run.pipeline import run
from batch_detect.output.sink import LOCK
from batch_detect.synthetic import write_dataset
from batch_detect.commands.verify import verify
from helpers import committed_count, kill_driver_when

SIZES = ((96, 72), (72, 96))

# The README's "current rows" query: each object's rows from the latest run that processed it.
CURRENT_DETECTIONS = """
WITH latest AS (
  SELECT uri, max(run_id) AS run_id FROM (
    SELECT uri, run_id FROM read_parquet('{out}/images/*.parquet')
    UNION ALL SELECT uri, run_id FROM read_parquet('{out}/failures/*.parquet'))
  GROUP BY uri)
SELECT d.* FROM read_parquet('{out}/detections/*.parquet') d JOIN latest USING (uri, run_id)
"""


def add_images(folder: str, count: int, seed: int, prefix: str) -> list[str]:
    """`count` new synthetic images named `prefix`_…, written beside the existing ones."""
    tmp = folder + f".{prefix}.tmp"
    write_dataset(tmp, count, seed=seed, sizes=SIZES)
    names = []
    for name in sorted(os.listdir(tmp)):
        if name.endswith(".jpg"):
            shutil.move(os.path.join(tmp, name), os.path.join(folder, f"{prefix}_{name}"))
            names.append(f"{prefix}_{name}")
    shutil.rmtree(tmp)
    return names


def rows_per_run(out: str) -> dict[int, int]:
    return dict(duckdb.execute(f"""SELECT run_id, count(*) FROM (
        SELECT uri, run_id FROM read_parquet('{out}/images/*.parquet')
        UNION ALL SELECT uri, run_id FROM read_parquet('{out}/failures/*.parquet')) GROUP BY run_id""").fetchall())


def distinct_rows(out: str) -> tuple[int, int]:
    return duckdb.execute(f"""SELECT count(*), count(DISTINCT uri) FROM (
        SELECT uri FROM read_parquet('{out}/images/*.parquet')
        UNION ALL SELECT uri FROM read_parquet('{out}/failures/*.parquet'))""").fetchone()


def config(models_dir: str, images: str, out: str, **kw) -> RunConfig:
    kw.setdefault("shard_size", 16)
    return RunConfig(model=os.path.join(models_dir, "shapes_ssd_uint8.tflite"), input=images, output=out, **kw)


def test_300_then_100_new_then_nothing_new_then_one_changed(local_ray, models_dir, tmp_path, capsys):
    images = str(tmp_path / "images")
    write_dataset(images, 300, seed=41, sizes=SIZES)
    out = str(tmp_path / "out")
    first = run(config(models_dir, images, out)).manifest  # a plain first run: --incremental builds on it
    assert first["status"] == "complete" and first["run_id"] == 1

    new = add_images(images, 100, seed=42, prefix="new")
    second = run(config(models_dir, images, out, incremental=True)).manifest
    assert second["status"] == "complete" and second["run_id"] == 2
    this = second["runs"][-1]
    assert (this["listed"], this["new"], this["changed"], this["unchanged"]) == (400, 100, 0, 300)
    assert this["images"] + this["failures"] == 100 and this["shards"][0] == first["plan"]["num_shards"]
    assert [r["run_id"] for r in second["runs"]] == [1, 2]
    assert rows_per_run(out) == {1: 300, 2: 100}
    assert distinct_rows(out) == (400, 400)
    run2 = {u for (u,) in duckdb.execute(f"SELECT uri FROM read_parquet('{out}/images/*.parquet') "
                                         "WHERE run_id = 2").fetchall()}
    assert run2 == {os.path.join(images, n) for n in new}
    report = verify(out, images)
    assert report.ok, report.problems
    assert report.facts["rows_per_run"] == {1: 300, 2: 100} and report.facts["runs"] == 2

    # Nothing new: answered from the listing, nothing written, Ray not needed.
    before = {p: os.stat(p).st_mtime_ns for p in _files(out)}
    code = main(["run", "--model", os.path.join(models_dir, "shapes_ssd_uint8.tflite"), "--input", images,
                 "--output", out, "--shard-size", "16", "--incremental"])
    said = capsys.readouterr()
    assert code == 0 and "nothing new: 400 objects listed" in said.out, said
    assert {p: os.stat(p).st_mtime_ns for p in _files(out)} == before

    # A changed object (same URI, new bytes: another image's scene) is processed again, alone.
    changed, donor = os.path.join(images, "img_00007.jpg"), os.path.join(images, "img_00123.jpg")
    shutil.copyfile(donor, changed)
    third = run(config(models_dir, images, out, incremental=True)).manifest
    this = third["runs"][-1]
    assert (third["run_id"], this["new"], this["changed"], this["unchanged"]) == (3, 0, 1, 399)
    assert rows_per_run(out) == {1: 300, 2: 100, 3: 1}
    current = duckdb.execute(CURRENT_DETECTIONS.format(out=out) + " WHERE uri = ? ORDER BY class_id, xmin",
                             [changed]).fetchall()
    cols = [d[0] for d in duckdb.execute(CURRENT_DETECTIONS.format(out=out) + " LIMIT 0").description]
    expected = duckdb.execute(f"SELECT * FROM read_parquet('{out}/detections/*.parquet') WHERE uri = ? "
                              "ORDER BY class_id, xmin", [donor]).fetchall()
    box = [cols.index(c) for c in ("class_id", "score", "xmin", "ymin", "xmax", "ymax")]
    assert expected and [tuple(r[i] for i in box) for r in current] == [tuple(r[i] for i in box) for r in expected]
    assert {r[cols.index("run_id")] for r in current} == {3}
    old = duckdb.execute(f"SELECT count(*) FROM read_parquet('{out}/images/*.parquet') WHERE uri = ? AND run_id = 1",
                         [changed]).fetchone()[0]
    assert old == 1  # the history is kept: run 1's rows of the object are still there
    report = verify(out, images)
    assert report.ok, report.problems

    # A plain re-run of a multi-run output is refused, pointing at --incremental.
    with pytest.raises(OutputError, match="--incremental"):
        run(config(models_dir, images, out))


def _files(out: str) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs)


def test_plain_rerun_of_a_grown_input_points_at_incremental(local_ray, models_dir, tmp_path):
    images = str(tmp_path / "images")
    write_dataset(images, 20, seed=43, sizes=SIZES)
    out = str(tmp_path / "out")
    run(config(models_dir, images, out))
    add_images(images, 3, seed=44, prefix="more")
    with pytest.raises(OutputError, match="different input listing.*--incremental"):
        run(config(models_dir, images, out))
    assert json.load(open(os.path.join(out, "_manifest.json")))["status"] == "complete"  # left as it was
    with pytest.raises(OutputError, match="different model"):  # a new model version: its own --output
        run(RunConfig(model=os.path.join(models_dir, "shapes_ssd_float32.tflite"), input=images, output=out,
                      shard_size=16, incremental=True))
    assert run(config(models_dir, images, out, incremental=True)).manifest["runs"][-1]["new"] == 3
    with pytest.raises(InputError, match="--incremental reads image files and tar files"):
        run(RunConfig(model=os.path.join(models_dir, "shapes_ssd_uint8.tflite"), input=images, output=str(tmp_path / "pq"),
                      image_column="image", incremental=True))


def test_incremental_manifest_input_compares_versions(local_ray, models_dir, tmp_path):
    images = str(tmp_path / "images")
    write_dataset(images, 24, seed=45, sizes=SIZES)
    names = sorted(n for n in os.listdir(images) if n.endswith(".jpg"))
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(os.path.join(images, n) for n in names[:20]) + "\n")
    out = str(tmp_path / "out")
    first = run(config(models_dir, str(listing), out, incremental=True)).manifest
    assert first["runs"][-1]["new"] == 20
    listing.write_text("\n".join(os.path.join(images, n) for n in names) + "\n")  # 4 more listed
    shutil.copyfile(os.path.join(images, names[21]), os.path.join(images, names[2]))  # one rewritten
    second = run(config(models_dir, str(listing), out, incremental=True)).manifest
    this = second["runs"][-1]
    assert (this["new"], this["changed"], this["unchanged"]) == (4, 1, 19)
    assert rows_per_run(out) == {1: 20, 2: 5}
    assert verify(out, str(listing)).ok


def grown(models_dir: str, tmp_path, first: int, more: int, seed: int, shard_size: int) -> tuple[str, str]:
    """An output of a plain run over `first` images, and `more` images added to its input since."""
    images, out = str(tmp_path / "images"), str(tmp_path / "out")
    write_dataset(images, first, seed=seed, sizes=SIZES)
    run(config(models_dir, images, out, shard_size=shard_size))
    add_images(images, more, seed=seed + 1, prefix="new")
    return images, out


def test_killed_incremental_driver_resumes_exactly_once(local_ray, models_dir, tmp_path):
    # 150 new shards: the log is flushed once a second, and a quick run must still be mid-way when it shows 3
    images, out = grown(models_dir, tmp_path, 60, 600, seed=46, shard_size=4)
    cmd = [sys.executable, "-m", "batch_detect", "run", "--model", os.path.join(models_dir, "shapes_ssd_uint8.tflite"),
           "--input", images, "--output", out, "--shard-size", "4", "--num-actors", "1", "--incremental"]
    before = committed_count(out)
    kill_driver_when(cmd, lambda: committed_count(out) >= before + 3, timeout=240)
    killed_at = committed_count(out) - before
    assert 3 <= killed_at < 150, killed_at
    # Re-run at once: the lease of the killed driver (a dead process on this machine) is taken over.
    again = run(config(models_dir, images, out, incremental=True, shard_size=4)).manifest
    assert again["status"] == "complete" and again["run_id"] == 2 and again["resumes"] == 1
    assert rows_per_run(out) == {1: 60, 2: 600}
    assert distinct_rows(out) == (660, 660)
    report = verify(out, images)
    assert report.ok, report.problems


def test_one_writer_at_a_time(local_ray, models_dir, tmp_path):
    images, out = grown(models_dir, tmp_path, 120, 120, seed=48, shard_size=8)
    result: dict = {}

    def first() -> None:
        try:
            result["m"] = run(config(models_dir, images, out, incremental=True, num_actors=1, shard_size=8)).manifest
        except BaseException as exc:  # noqa: BLE001 — reported by the assertion below
            result["error"] = exc

    worker = threading.Thread(target=first)
    worker.start()
    deadline = time.time() + 60
    while not os.path.exists(os.path.join(out, LOCK)) and time.time() < deadline:
        time.sleep(0.02)
    assert os.path.exists(os.path.join(out, LOCK)), f"the first run never took the lease: {result}"
    with pytest.raises(OutputError, match="being written by another batch-detect run"):
        run(config(models_dir, images, out, incremental=True, shard_size=8))
    worker.join(300)
    assert "error" not in result, result.get("error")
    assert result["m"]["status"] == "complete" and not os.path.exists(os.path.join(out, LOCK))
    assert rows_per_run(out) == {1: 120, 2: 120}
    assert verify(out, images).ok


def test_incremental_on_s3(local_ray, models_dir, s3_server, tmp_path):
    import s3fs

    so = {"key": "testing-key-id", "secret": "testing-secret", "client_kwargs": {"endpoint_url": s3_server}}
    fs = s3fs.S3FileSystem(**so, skip_instance_cache=True)
    bucket = f"incr-{os.getpid()}"
    fs.mkdir(bucket)
    images = str(tmp_path / "images")
    write_dataset(images, 30, seed=50, sizes=SIZES)
    fs.put(images + "/", f"{bucket}/in/", recursive=True)
    out = f"s3://{bucket}/out"
    cfg = dict(storage_options=so, incremental=True)
    first = run(config(models_dir, f"s3://{bucket}/in/", out, **cfg)).manifest
    assert first["runs"][-1]["new"] == 30
    add_images(images, 6, seed=51, prefix="new")
    for name in os.listdir(images):
        if name.startswith("new_"):
            fs.put(os.path.join(images, name), f"{bucket}/in/{name}")
    fs.pipe(f"{bucket}/in/img_00003.jpg", open(os.path.join(images, "img_00004.jpg"), "rb").read())  # rewritten
    second = run(config(models_dir, f"s3://{bucket}/in/", out, **cfg)).manifest
    this = second["runs"][-1]
    assert (this["new"], this["changed"], this["unchanged"]) == (6, 1, 29)
    assert second["counts"]["images"] + second["counts"]["failures"] == 37
    report = verify(out, f"s3://{bucket}/in/", so)
    assert report.ok and report.facts["rows_per_run"] == {1: 30, 2: 7}, report.problems
    assert not fs.exists(f"{bucket}/out/{LOCK}")
    # The same objects through a manifest on S3: each is stated (HEAD) and its version must equal the one
    # the prefix listing gave, so nothing is new.
    keys = sorted(k for k in fs.find(f"{bucket}/in/") if k.endswith(".jpg"))
    fs.pipe(f"{bucket}/list.txt", "\n".join(f"s3://{k}" for k in keys).encode())
    again = run(config(models_dir, f"s3://{bucket}/list.txt", out, **cfg))
    assert again.nothing_new is not None, again.manifest["runs"][-1]
    assert (again.nothing_new["new"], again.nothing_new["changed"], again.nothing_new["unchanged"]) == (0, 0, 36)
