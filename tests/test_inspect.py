"""`batch-detect inspect`: the fixture detectors are recognised with their I/O and ops; a classifier is
explained as not a detector (exit 1); --json is machine-readable."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys

import pytest


def inspect(*args):
    return subprocess.run([sys.executable, "-m", "batch_detect", "inspect", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("model,dtype", [("shapes_ssd_uint8.tflite", "uint8"), ("shapes_ssd_float32.tflite", "float32")])
def test_fixture_detectors(models_dir, model, dtype):
    result = inspect(os.path.join(models_dir, model), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["family"] == "ssd_postprocess" and report["inputs"][0]["dtype"] == dtype
    assert "TFLite_Detection_PostProcess" in report["custom_ops"]
    roles = sorted(o["role"] for o in report["decoding"]["outputs"])
    assert roles == ["boxes", "classes", "count", "scores"]
    assert (report["inputs"][0]["quantization"] is not None) == (dtype == "uint8")
    assert not [w for w in report["warnings"] if "resource variables" in w]
    text = inspect(os.path.join(models_dir, model))
    assert "family: ssd_postprocess" in text.stdout


def test_non_detector_says_why(models_dir):
    result = inspect(os.path.join(models_dir, "not_a_detector.tflite"))
    assert result.returncode == 1
    assert "family: none" in result.stdout and "has 1 output" in result.stdout
    missing = inspect(os.path.join(models_dir, "nope.tflite"))
    assert missing.returncode == 2 and "not found" in missing.stderr


def test_a_post_processed_ssd_shows_its_ops_own_settings(models_dir):
    """TFLite_Detection_PostProcess decodes inside the model: inspect reads its settings from the op's
    flexbuffer options. Checked against the attributes tools/make_fixture_models.py gave the op."""
    tool = open(os.path.join(os.path.dirname(__file__), "..", "tools", "make_fixture_models.py")).read()
    from batch_detect.synthetic import CLASSES  # the tool's NUM_CLASSES = len(CLASSES)

    consts = {"MAX_DETECTIONS": int(re.search(r"^MAX_DETECTIONS = (\d+)", tool, re.M).group(1)),
              "NUM_CLASSES": len(CLASSES)}
    given = {k: (consts[v[1:-1]] if v.startswith("{") else float(v) if t == "f" else int(v) if t == "i" else v == "true")
             for k, t, v in re.findall(r'key: \\?"(\w+)\\?" value \{+ (\w): ([\w.{}]+) \}', tool)}
    assert len(given) == 10 and given["max_detections"] == consts["MAX_DETECTIONS"]
    report = json.loads(inspect(os.path.join(models_dir, "shapes_ssd_uint8.tflite"), "--json").stdout)
    op = report["decoding"]["postprocess"]
    for key, value in given.items():
        assert op[key] == pytest.approx(value), key
    assert op["detections_per_class"] == 100 and op["defaulted"] == ["detections_per_class"]
    assert op["max_detections"] == report["decoding"]["max_detections"]  # the boxes output holds that many
    text = inspect(os.path.join(models_dir, "shapes_ssd_uint8.tflite")).stdout
    assert ("num_classes 3, max_detections 20, max_classes_per_detection 1, detections_per_class 100 (the op's "
            "default), use_regular_nms false (fast: one class-agnostic NMS), score threshold 1e-06, IoU threshold "
            "0.5, box scales y 10 x 10 h 5 w 5") in text
