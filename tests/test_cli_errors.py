"""Bad models, labels and inputs stop the CLI before any actor starts: exit 2, a message naming the
problem, and no output written."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from batch_detect.synthetic import write_dataset


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "images"
    write_dataset(str(folder), 3, seed=5)
    return str(folder)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "batch_detect", "run", *args],
                          capture_output=True, text=True, timeout=120)


def bad_model_cases(tmp_path, models_dir):
    text = tmp_path / "model.tflite"
    text.write_text("definitely not a flatbuffer")
    return [
        (str(tmp_path / "missing.tflite"), "not found"),
        (str(text), "not a TFLite file"),
        (os.path.join(models_dir, "not_a_detector.tflite"), "has 1 output"),
    ]


def test_bad_models_are_refused_before_anything_runs(tmp_path, models_dir, images):
    for model, message in bad_model_cases(tmp_path, models_dir):
        out = tmp_path / "out"
        result = cli("--model", model, "--input", images, "--output", str(out))
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and model in result.stderr
        assert "Traceback" not in result.stderr
        assert not out.exists()


def test_bad_input_and_labels(tmp_path, models_dir, images):
    model = os.path.join(models_dir, "shapes_ssd_uint8.tflite")
    out = tmp_path / "out"
    result = cli("--model", model, "--input", str(tmp_path / "nothing-here"), "--output", str(out))
    assert result.returncode == 2 and "does not exist" in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("x")
    result = cli("--model", model, "--input", str(empty), "--output", str(out))
    assert result.returncode == 2 and "no images found" in result.stderr and "1 files skipped" in result.stderr
    result = cli("--model", model, "--input", images, "--output", str(out), "--labels", str(tmp_path / "l.txt"))
    assert result.returncode == 2 and "labels file" in result.stderr
    result = cli("--model", model, "--input", images, "--output", str(out), "--score-threshold", "2")
    assert result.returncode == 2 and "--score-threshold" in result.stderr
    assert not out.exists()


def test_unknown_storage_option_keys_are_refused_with_the_closest_key(tmp_path, models_dir, images):
    model = os.path.join(models_dir, "shapes_ssd_uint8.tflite")
    out = tmp_path / "out"
    result = cli("--model", model, "--input", images, "--output", str(out), "--storage-option", "bogus_key=1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "'bogus_key' is unknown to fsspec.LocalFileSystem" in result.stderr
    # an s3 input: the misspelled key would otherwise send the job to AWS instead of the given endpoint
    result = cli("--model", model, "--input", "s3://bucket/in/", "--output", str(out),
                 "--storage-option", "endpont_url=http://127.0.0.1:9")
    assert result.returncode == 2 and "s3fs.S3FileSystem" in result.stderr
    assert "did you mean 'endpoint_url'?" in result.stderr
    assert not out.exists()


def test_storage_option_keys_the_stores_document_are_accepted():
    from batch_detect.config import RunConfig

    documented = {"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s", "anon": False,
                  "client_kwargs": {"region_name": "us-east-1"}, "config_kwargs": {"retries": {"max_attempts": 1}},
                  "profile": "dev", "use_listings_cache": False}
    RunConfig(model="m.tflite", input="s3://b/in/", output="s3://b/out", storage_options=documented).validate()
    RunConfig(model="m.tflite", input="in", output="out", storage_options={"auto_mkdir": True}).validate()


def test_a_mistyped_flag_gets_the_closest_one(tmp_path, models_dir, images):
    out = tmp_path / "out"
    result = cli("--model", os.path.join(models_dir, "shapes_ssd_uint8.tflite"), "--input", images,
                 "--output", str(out), "--score-treshold", "0.3", "--shard-sise=3")
    assert result.returncode == 2
    assert "unknown flag --score-treshold; did you mean --score-threshold?" in result.stderr
    assert "unknown flag --shard-sise; did you mean --shard-size?" in result.stderr
    assert not out.exists()


def test_an_output_among_the_input_or_beside_other_files_is_refused(tmp_path, models_dir, images):
    model = os.path.join(models_dir, "shapes_ssd_uint8.tflite")
    before = sorted(os.listdir(images))
    for output, message in [(images, "is the input folder"), (os.path.join(images, "results"), "inside --input")]:
        result = cli("--model", model, "--input", images, "--output", output)
        assert result.returncode == 2 and message in result.stderr and "--allow-nonempty-output" in result.stderr
    assert sorted(os.listdir(images)) == before
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"mine")
    for extra in ([], ["--overwrite"]):  # --overwrite must not take it as a previous run to replace either
        result = cli("--model", model, "--input", images, "--output", str(photos), *extra)
        assert result.returncode == 2, result.stderr
        assert "already holds 1 entries (e.g. 'holiday.jpg') and is not a batch-detect output" in result.stderr
        assert os.listdir(photos) == ["holiday.jpg"]
    allowed = cli("--model", model, "--input", images, "--output", str(photos), "--allow-nonempty-output",
                  "--dry-run")
    assert allowed.returncode == 0, allowed.stderr


def test_other_commands_check_storage_option_keys_too(tmp_path):
    for command in (["verify", str(tmp_path)], ["status", str(tmp_path)], ["inspect", str(tmp_path / "m.tflite")]):
        result = subprocess.run([sys.executable, "-m", "batch_detect", *command, "--storage-option", "auto_mkdri=1"],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and "did you mean 'auto_mkdir'?" in result.stderr, (command, result.stderr)
