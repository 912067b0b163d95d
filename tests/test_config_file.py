"""`--config job.toml`: every flag as a key, flags override the file, unknown keys are errors with a
suggestion; `--dry-run` prints the plan and writes nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from batch_detect.commands.cli import build_parser, config_from_args
from batch_detect.commands.dryrun import _quotas
from batch_detect.errors import ConfigError
from batch_detect.synthetic import write_dataset


def parse(*argv):
    return config_from_args(build_parser().parse_args(["run", *argv]))


def test_flags_override_the_file_which_overrides_defaults(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('model = "m.tflite"\ninput = "s3://b/in/"\noutput = "s3://b/out"\n'
                   'score-threshold = 0.5\nshard_size = 10\nextensions = ["jpg", "png"]\n'
                   '[storage_options]\nendpoint_url = "http://127.0.0.1:9000"\n')
    cfg = parse("--config", str(job), "--score-threshold", "0.4", "--storage-option", "anon=false")
    assert cfg.score_threshold == 0.4 and cfg.shard_size == 10 and cfg.resize == "auto"
    assert cfg.extensions == ("jpg", "png") and cfg.input == "s3://b/in/"
    # a flag value is typed as the TOML one would be: anon=false is the boolean, not the truthy string
    assert cfg.storage_options == {"endpoint_url": "http://127.0.0.1:9000", "anon": False}
    assert parse("--model", "a", "--input", "b", "--output", "c").shard_size == 64


def test_unknown_keys_are_errors_with_a_suggestion(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('model = "m"\nscore_treshold = 0.3\n')
    with pytest.raises(ConfigError, match=r"unknown key 'score_treshold'.*did you mean 'score_threshold'"):
        parse("--config", str(job))
    job.write_text('model = "m\n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse("--config", str(job))


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, models_dir):
    images = tmp_path / "images"
    write_dataset(str(images), 20, seed=2)
    out = tmp_path / "out"
    job = tmp_path / "job.toml"
    job.write_text(f'model = "{os.path.join(models_dir, "shapes_ssd_uint8.tflite")}"\n'
                   f'input = "{images}"\noutput = "{out}"\nshard_size = 8\n')
    result = subprocess.run([sys.executable, "-m", "batch_detect", "run", "--config", str(job), "--dry-run"],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": ""})
    assert result.returncode == 0, result.stderr
    assert "20 images found" in result.stdout and "3 shards" in result.stdout
    assert "sample: 16 images" in result.stdout  # the README's sample size, spread over the 3 shards
    assert "ssd_postprocess" in result.stdout and "uint8" in result.stdout and "estimate:" in result.stdout
    assert not out.exists()
    bad = subprocess.run([sys.executable, "-m", "batch_detect", "run", "--config", str(job), "--shard-sise", "3"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2


@pytest.mark.parametrize("line, key, expected, given", [
    ('score_threshold = "high"', "score_threshold", "must be a number", "a string 'high'"),
    ("shard_size = 3.5", "shard_size", "must be an integer", "a decimal number 3.5"),
    ('input = ["a/", "b/"]', "input", "must be a string", "a list ['a/', 'b/']"),
    ('storage_options = "key=AKIA1,secret=s3cr3t"', "storage_options", "must be a table", "a string"),
])
def test_wrongly_typed_values_name_the_key_the_type_and_the_value(tmp_path, line, key, expected, given):
    job = tmp_path / "job.toml"
    job.write_text(f'model = "m.tflite"\noutput = "o"\n{line}\n' + ("" if key == "input" else 'input = "i"\n'))
    with pytest.raises(ConfigError) as err:
        parse("--config", str(job))
    message = str(err.value)
    assert key in message and expected in message and given in message and str(job) in message
    assert "s3cr3t" not in message  # a storage_options string can carry credentials


def test_a_wrongly_typed_value_exits_2_without_a_traceback(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('model = "m.tflite"\ninput = "i"\noutput = "o"\nscore_threshold = "high"\n')
    result = subprocess.run([sys.executable, "-m", "batch_detect", "run", "--config", str(job)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "score_threshold" in result.stderr and "must be a number" in result.stderr


def test_the_dry_run_sample_is_16_images_or_all_when_fewer():
    assert sum(_quotas([8, 8, 4], 16)) == 16 and sum(_quotas([16, 1], 16)) == 16
    assert _quotas([2, 3], 16) == [2, 3] and _quotas([64] * 20, 16).count(1) == 16
