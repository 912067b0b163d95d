"""`batch-detect inspect`: the fixture detectors are recognised with their I/O and ops; a classifier is
explained as not a detector (exit 1); --json is machine-readable."""

from __future__ import annotations

import json
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
