"""The whole job on a local Ray with the committed fixture models, checked through DuckDB."""

from __future__ import annotations

import json
import os

import duckdb
import pytest

from batch_detect.config import RunConfig
from batch_detect.errors import OutputError
from batch_detect.run.pipeline import run
from batch_detect.output.schema import TABLES
from batch_detect.synthetic import write_dataset
from helpers import recall_precision, write_bad_inputs


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("e2e") / "images"
    truth = write_dataset(str(folder), 200, seed=1234)
    bad = write_bad_inputs(str(folder))
    (folder / "README.txt").write_text("not an image: skipped by extension, counted in the manifest\n")
    return str(folder), truth, bad


def run_job(models_dir, images, out, model="shapes_ssd_uint8.tflite", **kw) -> dict:
    cfg = RunConfig(model=os.path.join(models_dir, model), labels=os.path.join(models_dir, "shapes_labels.txt"),
                    input=images, output=str(out), shard_size=16, score_threshold=0.3, **kw)
    return run(cfg).manifest


def check_invariant(out: str) -> dict:
    """Every planned image is in exactly one of images/failures; schemas are the declared ones."""
    con = duckdb.connect()
    for name, schema in TABLES.items():
        cols = con.execute(f"DESCRIBE SELECT * FROM read_parquet('{out}/{name}/**/*.parquet')").fetchall()
        assert [c[0] for c in cols] == schema.names
    planned = con.execute(f"SELECT count(*), count(DISTINCT uri) FROM read_parquet('{out}/_plan/*.parquet')").fetchone()
    assert planned[0] == planned[1]
    row = con.execute(f"""
        WITH done AS (
            SELECT uri FROM read_parquet('{out}/images/**/*.parquet')
            UNION ALL SELECT uri FROM read_parquet('{out}/failures/**/*.parquet'))
        SELECT
            (SELECT count(*) FROM done),
            (SELECT count(DISTINCT uri) FROM done),
            (SELECT count(*) FROM read_parquet('{out}/_plan/*.parquet') p WHERE p.uri NOT IN (SELECT uri FROM done)),
            (SELECT count(*) FROM done WHERE uri NOT IN (SELECT uri FROM read_parquet('{out}/_plan/*.parquet')))
    """).fetchone()
    assert row == (planned[0], planned[0], 0, 0), f"done rows, distinct, missing, extra = {row}"
    # every detection belongs to a processed image, and num_detections agrees
    mismatched = con.execute(f"""
        SELECT count(*) FROM read_parquet('{out}/images/**/*.parquet') i
        LEFT JOIN (SELECT uri, count(*) n FROM read_parquet('{out}/detections/**/*.parquet') GROUP BY uri) d
        USING (uri) WHERE coalesce(d.n, 0) <> i.num_detections""").fetchone()[0]
    assert mismatched == 0
    return {"planned": planned[0]}


def predictions(out: str) -> dict:
    rows = duckdb.execute(f"""SELECT uri, class_id, xmin, ymin, xmax, ymax
                          FROM read_parquet('{out}/detections/**/*.parquet')""").fetchall()
    pred: dict = {}
    for uri, *rest in rows:
        pred.setdefault(os.path.basename(uri), []).append(tuple(rest))
    return pred


def truth_tuples(truth) -> dict:
    return {k: [(b.class_id, b.xmin, b.ymin, b.xmax, b.ymax) for b in v] for k, v in truth.items()}


@pytest.mark.parametrize("resize", ["stretch", "letterbox"])
def test_uint8_model_end_to_end(local_ray, models_dir, dataset, tmp_path, resize):
    images, truth, bad = dataset
    out = str(tmp_path / "out")
    manifest = run_job(models_dir, images, out, resize=resize)
    assert manifest["status"] == "complete"
    n = check_invariant(out)["planned"]
    assert n == len(truth) + len(bad) == manifest["counts"]["listed"]
    assert manifest["input"]["skipped_non_image"] == 2  # README.txt and ground_truth.json
    assert manifest["counts"]["committed_shards"] == manifest["plan"]["num_shards"]

    failures = dict(duckdb.execute(f"""SELECT regexp_extract(uri, '[^/]+$'), error_type
                                   FROM read_parquet('{out}/failures/**/*.parquet')""").fetchall())
    assert failures == bad
    stages = {r[0] for r in duckdb.execute(f"SELECT stage FROM read_parquet('{out}/failures/*.parquet')").fetchall()}
    assert stages == {"decode"}

    recall, precision = recall_precision(truth_tuples(truth), predictions(out))
    print(f"uint8 {resize}: recall={recall:.3f} precision={precision:.3f}")
    assert recall >= 0.9
    assert precision >= 0.7

    # the manifest is the one on disk, and says what ran
    on_disk = json.load(open(os.path.join(out, "_manifest.json")))
    assert on_disk["run_id"] == manifest["run_id"] and on_disk["model"]["input"]["dtype"] == "uint8"
    assert len(on_disk["model"]["sha256"]) == 64


def test_float32_model_and_rerun_protection(local_ray, models_dir, dataset, tmp_path, monkeypatch):
    images, truth, _ = dataset
    # A relative --output means relative to the driver's cwd, not to wherever the actors run.
    monkeypatch.chdir(tmp_path)
    manifest = run_job(models_dir, images, "out", model="shapes_ssd_float32.tflite", resize="letterbox")
    out = str(tmp_path / "out")
    assert manifest["config"]["output"] == out
    assert manifest["model"]["input"]["normalization"] == "-1,1"
    check_invariant(out)
    recall, _ = recall_precision(truth_tuples(truth), predictions(out))
    assert recall >= 0.9
    with pytest.raises(OutputError, match="--overwrite"):
        run_job(models_dir, images, out)
    again = run_job(models_dir, images, out, overwrite=True, num_actors=1)
    assert again["output_id"] != manifest["output_id"] and again["run_id"] == 1 and again["cluster"]["actors"] == 1
    check_invariant(out)
