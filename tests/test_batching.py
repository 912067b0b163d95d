"""Batched invokes on a model whose batch dimension is dynamic: the same detections as one image per
invoke, directly and through the whole job; a fixed-batch model stays at 1."""

from __future__ import annotations

import os

import duckdb
import numpy as np
import pytest

from batch_detect.config import RunConfig
from batch_detect.model.detector import Detector
from batch_detect.model.interpreter import load_backend, read_model
from batch_detect.run.pipeline import run
from batch_detect.synthetic import write_dataset
from helpers import recall_precision

MODEL = "shapes_yolov8_dynbatch_float32.tflite"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batching") / "images"
    truth = write_dataset(str(folder), 30, seed=99)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    return str(folder), truth


def _detector(models_dir, model=MODEL) -> Detector:
    return Detector(load_backend(), read_model(os.path.join(models_dir, model)), num_threads=1,
                    score_threshold=0.3, resize="stretch", normalization="auto", max_pixels=10**8)


def test_batches_give_the_same_detections(models_dir, images):
    folder, truth = images
    names = sorted(truth)[:11]  # 11 = two full batches of 4 and a short one (padded)
    one, four = _detector(models_dir), _detector(models_dir)
    assert four.set_batch(4) == 4 and one.batch == 1
    prepared = [(n, *one.prepare(open(os.path.join(folder, n), "rb").read())) for n in names]
    singles = [one.finish(*p) for p in prepared]
    batched = [r for lo in range(0, len(prepared), 4) for r in four.finish_batch(prepared[lo:lo + 4])]
    assert [r.uri for r in batched] == names
    found = 0
    for a, b in zip(singles, batched):
        assert np.array_equal(a.detections.class_ids, b.detections.class_ids), a.uri
        np.testing.assert_allclose(a.detections.boxes, b.detections.boxes, atol=1e-5)
        np.testing.assert_allclose(a.detections.scores, b.detections.scores, atol=1e-5)
        found += len(a.detections.scores)
    assert found >= len(names)  # the comparison compared real detections


def test_fixed_batch_model_stays_at_one(models_dir):
    from batch_detect.commands.inspect import inspect_model

    det = _detector(models_dir, "shapes_ssd_uint8.tflite")
    assert det.set_batch(8) == 1
    assert inspect_model(os.path.join(models_dir, "shapes_ssd_uint8.tflite"))["batch"] == "fixed"
    assert inspect_model(os.path.join(models_dir, MODEL))["batch"] == "dynamic"


def test_batch_size_through_the_job(local_ray, models_dir, images, tmp_path):
    folder, truth = images
    outs = {}
    for n in (1, 4):
        out = str(tmp_path / f"out-{n}")
        manifest = run(RunConfig(model=os.path.join(models_dir, MODEL), input=folder, output=out, shard_size=7,
                                 score_threshold=0.3, batch_size=n)).manifest
        assert manifest["status"] == "complete"
        assert manifest["model"]["batch"] == n and manifest["model"]["batch_dimension"] == "dynamic"
        # the decode window as the workers ran it: a full batch ready while the previous one runs
        assert manifest["sizing"]["decode_depth"] == max(4, 2 * n), manifest["sizing"]
        assert manifest["counts"]["failure_types"] == {"decode/unidentified_image": 1}
        outs[n] = duckdb.execute(f"SELECT uri, class_id, round(score, 4), round(xmin, 4), round(ymin, 4) "
                                 f"FROM read_parquet('{out}/detections/*.parquet') ORDER BY ALL").fetchall()
    assert outs[1] == outs[4] and len(outs[1]) >= len(truth)
    predicted: dict = {}
    for row in duckdb.execute(f"SELECT uri, class_id, xmin, ymin, xmax, ymax FROM read_parquet('{tmp_path}/out-4/"
                              "detections/*.parquet')").fetchall():
        predicted.setdefault(os.path.basename(row[0]), []).append(tuple(row[1:]))
    recall, _ = recall_precision({k: [(b.class_id, b.xmin, b.ymin, b.xmax, b.ymax) for b in v]
                                  for k, v in truth.items()}, predicted)
    assert recall >= 0.9, recall


def test_a_failing_batch_is_rerun_image_by_image(models_dir, images):
    """One bad tensor in a batch: the others still get their detections, the bad one is a failure."""
    folder, truth = images
    det = _detector(models_dir)
    det.set_batch(4)
    names = sorted(truth)[:4]
    prepared = [(n, *det.prepare(open(os.path.join(folder, n), "rb").read())) for n in names]
    bad = list(prepared[1])
    bad[3] = np.zeros((1, 7, 7, 3), np.float32)  # a tensor of the wrong shape: the batched invoke fails
    prepared[1] = tuple(bad)
    results = det.finish_batch(prepared)
    assert [r.uri for r in results] == names
    assert getattr(results[1], "stage", None) == "infer"
    assert all(hasattr(r, "detections") for i, r in enumerate(results) if i != 1)
