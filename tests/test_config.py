import pytest

from batch_detect.config import RunConfig
from batch_detect.errors import ConfigError, failure_fields, DecodeError
from batch_detect.model.labels import parse_labels


def test_invalid_settings_name_the_flag():
    for kwargs, flag in [({"score_threshold": 1.5}, "--score-threshold"), ({"shard_size": 0}, "--shard-size"),
                         ({"resize": "crop"}, "--resize"), ({"normalization": "x"}, "--normalization"),
                         ({"decode_threads": -1}, "--decode-threads")]:
        with pytest.raises(ConfigError, match=flag):
            RunConfig(model="m", input="i", output="o", **kwargs).validate()


def test_secrets_are_redacted_for_the_manifest():
    cfg = RunConfig(model="m", input="i", output="o",
                    storage_options={"key": "AKIA123", "secret": "s3cr3t", "endpoint_url": "http://127.0.0.1:1"})
    red = cfg.redacted()
    assert red["storage_options"] == {"key": "***", "secret": "***", "endpoint_url": "http://127.0.0.1:1"}
    assert "s3cr3t" not in repr(red)


def test_labels_plain_and_with_ids():
    assert parse_labels("circle\nsquare\n\ntriangle\n") == ["circle", "square", "triangle"]
    assert parse_labels("0 person\n2 car\n") == ["person", None, "car"]


def test_failure_fields_come_from_the_exception_type():
    assert failure_fields(DecodeError("bad", error_type="corrupt_image"), "read") == ("decode", "corrupt_image", "bad")
    # unexpected exceptions get their stage's documented type; the class name stays in the message
    assert failure_fields(ZeroDivisionError("x"), "infer") == ("infer", "inference_error", "ZeroDivisionError: x")
    assert failure_fields(KeyError(), "decode") == ("decode", "decode_error", "KeyError")


def test_local_paths_become_absolute_urls_do_not(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = RunConfig(model="m.tflite", input="file://imgs", output="s3://bucket/out", labels="l.txt").validate()
    assert cfg.model == str(tmp_path / "m.tflite") and cfg.input == str(tmp_path / "imgs")
    assert cfg.output == "s3://bucket/out" and cfg.labels == str(tmp_path / "l.txt")
