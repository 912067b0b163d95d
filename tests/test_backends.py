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


def need_tflite_environment() -> None:
    if not os.path.exists(TFLITE_PYTHON):
        msg = f"no tflite-runtime environment at {TFLITE_PYTHON} (make test creates .venv-tflite)"
        print(f"SKIP: {msg}")
        pytest.skip(msg)


@pytest.mark.parametrize("model", sorted(TOLERANCE))
def test_litert_and_tflite_runtime_agree(tmp_path, models_dir, model):
    need_tflite_environment()
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


def test_the_tflite_runtime_install_runs_the_whole_job(tmp_path, models_dir):
    """`pip install 'batch-detect[tflite-runtime]'` resolves to numpy 1.x: every dependency it brings (Ray,
    pyarrow, s3fs, Pillow) must work with it, through a whole run, its Parquet and `verify`."""
    need_tflite_environment()
    versions = subprocess.run([TFLITE_PYTHON, "-c", "import numpy, pyarrow; print(numpy.__version__, pyarrow.__version__)"],
                              capture_output=True, text=True, timeout=120)
    assert versions.returncode == 0, versions.stderr[-3000:]
    assert versions.stdout.startswith("1."), f"the environment has numpy {versions.stdout}: not the extra's"
    truth = write_dataset(str(tmp_path / "images"), 12, seed=78)
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": "", "BATCH_DETECT_TFLITE_BACKEND": "tflite_runtime", "PYTHONPATH": ROOT}
    cli = [TFLITE_PYTHON, "-m", "batch_detect"]
    result = subprocess.run([*cli, "run", "--model", os.path.join(models_dir, "shapes_ssd_uint8.tflite"),
                             "--labels", os.path.join(models_dir, "shapes_labels.txt"), "--input",
                             str(tmp_path / "images"), "--output", str(out), "--shard-size", "4"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.load(open(out / "_manifest.json"))
    assert manifest["model"]["backend"] == "tflite_runtime" and manifest["counts"]["images"] == len(truth)
    checked = subprocess.run([*cli, "verify", str(out), "--input", str(tmp_path / "images")],
                             capture_output=True, text=True, timeout=300, env=env)
    assert checked.returncode == 0 and "OK" in checked.stdout, checked.stdout + checked.stderr[-2000:]
    import duckdb

    found = duckdb.execute(f"SELECT count(*) FROM read_parquet('{out}/detections/*.parquet')").fetchone()[0]
    assert found >= len(truth), "the shapes model finds at least one object per synthetic scene"
