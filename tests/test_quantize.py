"""`batch-detect quantize`: a real SavedModel detector (YOLOv8-style raw output, weights of the committed
float fixture) quantized to int8 with calibration images from a folder, compared with its float parent,
and run by the job on local Ray. Without TensorFlow the command exits 2 naming the extra."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from batch_detect.synthetic import write_dataset
from conftest import ROOT
from helpers import recall_precision

HAS_TF = importlib.util.find_spec("tensorflow") is not None
NO_TF_REASON = (f"TensorFlow is not importable in {sys.executable} (CI's venv has no TF: the [quantize] extra); "
                "run with a Python that has it: pip install -e '.[quantize,test]' in a venv, then "
                "VENV/bin/python -m pytest tests/test_quantize.py")
# The fixture's uint8 PTQ against its float parent measures 1.000/0.996/0.004 (README); this model measures
# recall 1.000, precision 1.000, mean |dscore| 0.004 here (0.007 on another 60 scenes with 50 calibration
# images). The bounds leave room for that; a wrong scale or zero point loses boxes and moves scores > 0.1.
MIN_RECALL, MIN_PRECISION, MAX_DSCORE = 0.95, 0.95, 0.03


def cli(*args, block_tensorflow=False, timeout=600):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    if block_tensorflow:
        # `import tensorflow` raises ImportError, as in an environment without the extra.
        code = ("import sys; sys.modules['tensorflow'] = None; from batch_detect.commands.cli import main; "
                "sys.exit(main(sys.argv[1:]))")
        cmd = [sys.executable, "-c", code, *args]
    else:
        cmd = [sys.executable, "-m", "batch_detect", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quantize") / "images"
    truth = write_dataset(str(folder), 60, seed=808)
    return str(folder), truth


def test_without_tensorflow_exits_2_naming_the_extra(images, tmp_path):
    out = tmp_path / "q.tflite"
    result = cli("quantize", "--saved-model", str(tmp_path / "sm"), "--input", images[0], "--output", str(out),
                 block_tensorflow=HAS_TF)
    assert result.returncode == 2, result.stderr
    assert "needs TensorFlow" in result.stderr and "pip install 'batch-detect[quantize]'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def _need_tf():
    if not HAS_TF:
        print(f"SKIP: {NO_TF_REASON}")
        pytest.skip(NO_TF_REASON)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    _need_tf()
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from make_yolo_savedmodel import build

    return build(str(tmp_path_factory.mktemp("savedmodel") / "shapes_yolo"))


def quantized_truth_check(out_dir, truth):
    """Recall/precision of a run's detections against the drawn ground truth."""
    det = pq.read_table(os.path.join(out_dir, "detections")).to_pylist()
    pred: dict = {}
    for r in det:
        pred.setdefault(os.path.basename(r["uri"]), []).append(
            (r["class_id"], r["xmin"], r["ymin"], r["xmax"], r["ymax"]))
    gt = {k: [(b.class_id, b.xmin, b.ymin, b.xmax, b.ymax) for b in v] for k, v in truth.items()}
    return recall_precision(gt, pred), det


@pytest.mark.parametrize("io", ["int8", "uint8"])
def test_quantize_savedmodel_then_run_it(saved_model, images, tmp_path, io, request):
    folder, truth = images
    out = tmp_path / f"shapes_yolo_{io}.tflite"
    result = cli("quantize", "--saved-model", saved_model, "--input", folder, "--output", str(out),
                 "--samples", "40", "--io", io, "--labels", os.path.join(ROOT, "models", "shapes_labels.txt"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "calibration: 40 images of 60" in result.stdout and "worst images" in result.stdout
    reference = tmp_path / f"shapes_yolo_{io}.float32.tflite"
    report = tmp_path / f"shapes_yolo_{io}.compare"
    assert out.exists() and reference.exists()
    assert out.stat().st_size < reference.stat().st_size / 2  # int8 weights
    summary = json.load(open(report / "compare.json"))
    print(f"quantized ({io} I/O) vs float: recall {summary['recall']:.3f} precision {summary['precision']:.3f} "
          f"mean |dscore| {summary['mean_abs_dscore']:.4f} on {summary['images']} images, "
          f"{summary['matched_boxes']} boxes matched")
    assert summary["images"] == 60 and summary["matched_boxes"] >= 60
    assert summary["recall"] >= MIN_RECALL and summary["precision"] >= MIN_PRECISION
    assert summary["mean_abs_dscore"] <= MAX_DSCORE
    assert pq.read_table(report / "compare.parquet").num_rows == 60

    info = json.loads(cli("inspect", str(out), "--json").stdout)
    assert info["family"] == "yolov8" and info["inputs"][0]["dtype"] == io
    assert info["outputs"][0]["dtype"] == io and info["outputs"][0]["quantization"]
    assert "CONV_2D" in info["ops"]

    if io != "int8":
        return  # one run through the job is enough
    from batch_detect.config import RunConfig
    from batch_detect.run.pipeline import run

    request.getfixturevalue("local_ray")
    job_out = tmp_path / "run"
    manifest = run(RunConfig(model=str(out), input=folder, output=str(job_out), shard_size=16,
                             labels=os.path.join(ROOT, "models", "shapes_labels.txt"))).manifest
    assert manifest["status"] == "complete" and manifest["counts"]["images"] == 60
    assert manifest["model"]["family"] == "yolov8" and manifest["model"]["input"]["dtype"] == "int8"
    (recall, precision), det = quantized_truth_check(str(job_out), truth)
    print(f"quantized model run: recall {recall:.3f} precision {precision:.3f} against the drawn shapes")
    assert recall >= 0.85 and precision >= 0.7
    assert {r["label"] for r in det} <= {"circle", "square", "triangle"}


def test_a_savedmodel_that_is_no_detector_is_refused(images, tmp_path):
    _need_tf()
    import tensorflow as tf

    class Classifier(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 32, 32, 3], tf.float32)])
        def classify(self, image):
            return {"probs": tf.nn.softmax(tf.reduce_mean(image, [1, 2]))}

    module = Classifier()
    tf.saved_model.save(module, str(tmp_path / "cls"), signatures={"serving_default": module.classify})
    out = tmp_path / "cls.tflite"
    result = cli("quantize", "--saved-model", str(tmp_path / "cls"), "--input", images[0], "--output", str(out))
    assert result.returncode == 2
    assert "converts, but not to a detector" in result.stderr and "1 output" in result.stderr
    assert not out.exists()
    missing = cli("quantize", "--saved-model", str(tmp_path / "nope"), "--input", images[0], "--output", str(out))
    assert missing.returncode == 2 and "not found" in missing.stderr
