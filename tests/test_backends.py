"""LiteRT and tflite-runtime through the one code path give the same detections.

tflite-runtime's last release only works with numpy<2, so it lives in its own environment
(`make test` creates .venv-tflite); the test skips, saying why, where that environment is absent.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from batch_detect.synthetic import write_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TFLITE_PYTHON = os.environ.get("BATCH_DETECT_TFLITE_PYTHON", os.path.join(ROOT, ".venv-tflite", "bin", "python"))
PROBE = os.path.join(ROOT, "tests", "backend_probe.py")


def probe(python: str, backend: str, model: str, images: list[str]) -> dict:
    result = subprocess.run([python, PROBE, backend, model, *images], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# Float kernels agree to rounding. Quantized kernels differ between the runtimes (XNNPACK vs the
# reference int8 ops) by an LSB or two of an int8 logit: about 0.02 of a sigmoid score near 0.8 each.
TOLERANCE = {"shapes_ssd_float32.tflite": 1e-3, "shapes_ssd_uint8.tflite": 0.05}


@pytest.mark.parametrize("model", sorted(TOLERANCE))
def test_litert_and_tflite_runtime_agree(tmp_path, models_dir, model):
    if not os.path.exists(TFLITE_PYTHON):
        msg = f"no tflite-runtime environment at {TFLITE_PYTHON} (make test creates .venv-tflite)"
        print(f"SKIP: {msg}")
        pytest.skip(msg)
    write_dataset(str(tmp_path), 12, seed=77)
    images = sorted(glob.glob(str(tmp_path / "*.jpg")))
    path = os.path.join(models_dir, model)
    litert = probe(sys.executable, "litert", path, images)
    legacy = probe(TFLITE_PYTHON, "tflite_runtime", path, images)
    assert litert["backend"] == "litert" and legacy["backend"] == "tflite_runtime"
    assert legacy["numpy"].startswith("1.")
    assert sum(len(v) for v in litert["images"].values()) > 0
    for name, dets in litert["images"].items():
        other = legacy["images"][name]
        assert len(dets) == len(other), name
        for a, b in zip(sorted(dets), sorted(other)):
            assert a[0] == b[0]
            assert a[1:] == pytest.approx(b[1:], abs=TOLERANCE[model])
