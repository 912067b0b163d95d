"""--output-format forces the decoder family: it settles shapes auto-detection reads the wrong way, and a
family the outputs cannot fit is refused before the run (exit 2, nothing written)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from batch_detect.config import RunConfig, config_from_values
from batch_detect.model.decoding import decode_yolo, identify_outputs
from batch_detect.errors import ConfigError, ModelError
from batch_detect.model.interpreter import TensorSpec
from batch_detect.synthetic import write_dataset


def out(shape, name="output0"):
    return TensorSpec(0, name, shape, shape, "float32", 0.0, 0)


def test_forcing_yolov8_reads_few_predictions_right():
    # YOLOv8 with 80 classes at a tiny input: [1, 84, 80] has fewer predictions than channels, so
    # auto-detection takes it for YOLOv5 ([1, N, 5+C]) with 75 classes.
    spec = out((1, 84, 80))
    assert identify_outputs([spec]).family == "yolov5"
    forced = identify_outputs([spec], "yolov8")
    assert forced.family == "yolov8" and forced.num_classes == 80 and forced.transposed
    pred = np.zeros((1, 84, 80), np.float32)
    pred[0, :4, 7] = (0.5, 0.5, 0.2, 0.4)  # prediction 7: a box in the middle
    pred[0, 4 + 33, 7] = 0.9  # class 33
    dets = decode_yolo({0: pred}, forced, 0.25, (64, 64))
    assert dets.class_ids.tolist() == [33] and dets.scores.tolist() == pytest.approx([0.9])
    np.testing.assert_allclose(dets.boxes[0], [0.3, 0.4, 0.7, 0.6], atol=1e-6)
    assert identify_outputs([out((1, 80, 85))], "yolov5").num_classes == 80


@pytest.mark.parametrize("fmt,outputs,message", [
    ("yolov8", [out((1, 10, 4)), out((1, 10)), out((1, 10)), out((1,))], "needs one output [1, 4+C, N]"),
    ("yolov5", [out((1, 2016, 5))], "at least one class"),
    ("yolov8", [out((1, 4, 2016))], "at least one class"),
    ("ssd", [out((1, 7, 2016))], "--output-format ssd does not fit"),
])
def test_families_the_outputs_cannot_fit_are_refused(fmt, outputs, message):
    with pytest.raises(ModelError, match=message.replace("[", r"\[").replace("+", r"\+")):
        identify_outputs(outputs, fmt)


def test_config_and_toml_key(tmp_path):
    with pytest.raises(ConfigError, match="--output-format must be one of auto, ssd, yolov8, yolov5"):
        RunConfig(model="m", input="i", output="o", output_format="yolo").validate()
    toml = tmp_path / "job.toml"
    toml.write_text('model = "m.tflite"\ninput = "in"\noutput = "out"\noutput-format = "yolov5"\n')
    from batch_detect.config import load_config_file

    assert config_from_values(load_config_file(str(toml))).validate().output_format == "yolov5"


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "batch_detect", *args], capture_output=True, text=True,
                          timeout=120)


def test_forcing_a_family_that_does_not_fit_is_a_pre_run_error(models_dir, tmp_path):
    images = tmp_path / "images"
    write_dataset(str(images), 2, seed=3)
    model = os.path.join(models_dir, "shapes_ssd_uint8.tflite")
    target = tmp_path / "out"
    result = run_cli("run", "--model", model, "--input", str(images), "--output", str(target),
                     "--output-format", "yolov8")
    assert result.returncode == 2
    assert "--output-format yolov8 needs one output" in result.stderr and "has 4" in result.stderr
    assert not target.exists()
    toml = tmp_path / "job.toml"
    toml.write_text(f'model = "{model}"\ninput = "{images}"\noutput = "{target}"\noutput_format = "yolov5"\n')
    result = run_cli("run", "--config", str(toml))
    assert result.returncode == 2 and "--output-format yolov5" in result.stderr and not target.exists()
    # forcing the family the model has works like auto
    ok = run_cli("inspect", model, "--output-format", "ssd")
    assert ok.returncode == 0 and "family: ssd_postprocess" in ok.stdout
    bad = run_cli("inspect", model, "--output-format", "yolov5")
    assert bad.returncode == 1 and "family: none: --output-format yolov5 needs one output" in bad.stdout
