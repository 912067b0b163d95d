"""A real pretrained detector on real photos (../shared/realworld: YOLOv8n COCO, float-I/O and
full-integer exports): `run` gives the detections its README lists for a correct decode."""

from __future__ import annotations

import os

import duckdb
import pytest

from batch_detect.config import RunConfig
from batch_detect.run.pipeline import run


# From ../shared/realworld/README.md (stretch to 640x640, score >= 0.4, class-aware NMS IoU 0.45):
# the best detection per photo, (label, score, [xmin, ymin, xmax, ymax]).
EXPECTED = {
    "yolov8n_int8.tflite": {
        "astronaut.png": ("person", 0.85, [0.02, 0.03, 0.72, 1.00]),
        "camera.png": ("person", 0.81, [0.00, 0.12, 0.56, 1.00]),
        "chelsea.png": ("dog", 0.71, [0.00, 0.01, 0.99, 1.00]),
        "coffee.png": ("cup", 0.81, [0.28, 0.03, 0.70, 0.80]),
    },
    "yolov8n_full_integer_quant.tflite": {
        "astronaut.png": ("person", 0.50, [0.00, 0.05, 0.72, 1.00]),
        "camera.png": ("person", 0.90, [0.00, 0.13, 0.57, 0.99]),
        "chelsea.png": ("clock", 0.83, [0.30, 0.29, 0.45, 0.49]),
        "coffee.png": ("cup", 0.75, [0.28, 0.04, 0.70, 0.79]),
    },
}


@pytest.mark.parametrize("model", sorted(EXPECTED))
def test_real_yolov8n_gives_the_reference_detections(local_ray, realworld, tmp_path, model):
    out = str(tmp_path / "out")
    manifest = run(RunConfig(model=os.path.join(realworld, model), labels=os.path.join(realworld, "coco_labels.txt"),
                             input=os.path.join(realworld, "images"), output=out, score_threshold=0.4,
                             resize="stretch")).manifest
    assert manifest["status"] == "complete" and manifest["counts"]["images"] == 4
    assert manifest["model"]["family"] == "yolov8"
    rows = duckdb.execute(f"""SELECT regexp_extract(uri, '[^/]+$'), label, score, xmin, ymin, xmax, ymax
                              FROM read_parquet('{out}/detections/*.parquet') ORDER BY score DESC""").fetchall()
    for photo, (label, score, box) in EXPECTED[model].items():
        best = next(r for r in rows if r[0] == photo)
        assert best[1] == label, (photo, best)
        assert best[2] == pytest.approx(score, abs=0.03), (photo, best)
        assert list(best[3:]) == pytest.approx(box, abs=0.03), (photo, best)
