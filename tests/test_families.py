"""One trained fixture per detector family the decoder supports (tools/make_family_models.py): the whole
job on a local Ray finds the shapes of the seeded validation set, and `inspect` names each family.

The job writes boxes at score ≥ 0.3, as in test_end_to_end.py. Recall ≥ 0.9 at IoU ≥ 0.5 is the fixtures'
bar (tools/check_fixture_models.py). Precision ≥ 0.9: the scenes hold 1 to 3 well separated shapes, so a
detector that decodes correctly has few false boxes; a wrong box convention (pixels read as normalised, a
transposed layout, objectness ignored, classes and scores swapped) loses either most boxes or this bar.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from batch_detect.config import RunConfig
from batch_detect.model.detector import inspect_interpreter
from batch_detect.model.interpreter import load_backend, make_interpreter, read_model
from batch_detect.run.pipeline import run
from batch_detect.synthetic import write_dataset
from helpers import recall_precision
from test_end_to_end import check_invariant, predictions, truth_tuples

# model: (family, input dtype, resize mode of its run). Both resize modes are covered across the four runs.
FAMILIES = {
    "shapes_yolov8_float32.tflite": ("yolov8", "float32", "stretch"),
    "shapes_yolov8_int8.tflite": ("yolov8", "int8", "letterbox"),
    "shapes_yolov5_float32.tflite": ("yolov5", "float32", "letterbox"),
    "shapes_ssd_tf1order_uint8.tflite": ("ssd_postprocess", "uint8", "stretch"),
    # EfficientDet-Lite style: uint8 input quantized as 0..1 (scale 1/255), TF2 (reversed) output naming
    # as Model Maker's: "StatefulPartitionedCall:N"
    "shapes_effdet_lite_style_uint8.tflite": ("ssd_postprocess", "uint8", "stretch"),
}
EFFDET = "shapes_effdet_lite_style_uint8.tflite"


@pytest.fixture(scope="module")
def validation(tmp_path_factory):
    folder = tmp_path_factory.mktemp("families") / "images"
    truth = write_dataset(str(folder), 150, seed=1234)
    return str(folder), truth_tuples(truth)


@pytest.mark.parametrize("model", list(FAMILIES))
def test_family_end_to_end(local_ray, models_dir, validation, tmp_path, model):
    images, truth = validation
    family, _, resize = FAMILIES[model]
    out = str(tmp_path / "out")
    cfg = RunConfig(model=os.path.join(models_dir, model), labels=os.path.join(models_dir, "shapes_labels.txt"),
                    input=images, output=out, shard_size=25, score_threshold=0.3, resize=resize)
    manifest = run(cfg).manifest
    assert manifest["status"] == "complete"
    assert check_invariant(out)["planned"] == len(truth)
    recall, precision = recall_precision(truth, predictions(out))
    print(f"{model} ({resize}): recall={recall:.3f} precision={precision:.3f}")
    assert recall >= 0.9
    assert precision >= 0.9


def inspect(path: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "batch_detect", "inspect", path, "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("model", list(FAMILIES))
def test_inspect_names_the_family(models_dir, model):
    family, dtype, _ = FAMILIES[model]
    report = inspect(os.path.join(models_dir, model))
    assert report["family"] == family
    assert report["inputs"][0]["dtype"] == dtype and report["inputs"][0]["shape"] == [1, 128, 128, 3]
    assert (report["inputs"][0]["quantization"] is not None) == (dtype != "float32")
    assert not [w for w in report["warnings"] if "resource variables" in w]
    dec = report["decoding"]
    if model == EFFDET:  # -1..1 would clip half the pixels: auto falls through to the input's own 0..1
        q = report["inputs"][0]["quantization"]
        assert dec["input"]["normalization"] == "0,1" and dec["input"]["zero_point"] == 0
        assert abs(dec["input"]["scale"] - 1 / 255) < 1e-6, q
        assert "TFLite_Detection_PostProcess" in report["custom_ops"]
        assert all(o["name"].startswith("StatefulPartitionedCall:") for o in dec["outputs"]), dec["outputs"]
        roles = {o["role"]: o["name"].rsplit(":", 1)[1] for o in dec["outputs"]}
        assert roles == {"boxes": "3", "classes": "2", "scores": "1", "count": "0"}
        return
    assert dec["input"]["normalization"] == ("-1,1" if family == "ssd_postprocess" else "0,1")
    shapes = [o["shape"] for o in dec["outputs"]]
    if family == "yolov8":
        assert shapes == [[1, 4 + 3, 336]]
        assert dec["outputs"][0]["dtype"] == dtype  # the int8 model's output is int8 too
    elif family == "yolov5":
        assert shapes == [[1, 336, 5 + 3]]
    else:  # TF1 order: the post-processing op's outputs named :0 boxes, :1 classes, :2 scores, :3 count
        assert "TFLite_Detection_PostProcess" in report["custom_ops"]
        roles = {o["role"]: o["name"].rsplit(":", 1)[1] for o in dec["outputs"]}
        assert roles == {"boxes": "0", "classes": "1", "scores": "2", "count": "3"}


def test_yolo_fixtures_cover_both_box_units(models_dir, validation):
    """v8 writes normalised xywh (its int8 output shares one scale with the scores), v5 input pixels:
    the decoder's two box conventions, each on a real model."""
    images, truth = validation
    name = sorted(truth)[0]
    from PIL import Image

    pixels = np.asarray(Image.open(os.path.join(images, name)).convert("RGB").resize((128, 128)))
    backend = load_backend()
    largest = {}
    for model in ("shapes_yolov8_float32.tflite", "shapes_yolov8_int8.tflite", "shapes_yolov5_float32.tflite"):
        interp = make_interpreter(backend, read_model(os.path.join(models_dir, model)), 1)
        info = inspect_interpreter(interp, "auto")
        interp.set_tensor(info.input.tensor.index, info.mapping.apply(pixels)[None])
        interp.invoke()
        out = info.layout.output
        pred = out.dequantize(interp.get_tensor(out.index))[0]
        pred = pred.T if info.layout.transposed else pred
        largest[model] = float(np.abs(pred[:, :4]).max())
    assert largest["shapes_yolov8_float32.tflite"] <= 1.5 and largest["shapes_yolov8_int8.tflite"] <= 1.5
    assert largest["shapes_yolov5_float32.tflite"] > 2.0
