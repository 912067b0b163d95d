"""Labels: the labels file a TFLite model with metadata carries in a zip after its flatbuffer is used when
--labels is not given (and shown by inspect); class ids the labels do not name get a null label, are
counted in the manifest and warned about, and never stop a run."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile

import pyarrow.parquet as pq
import pytest

from batch_detect.commands.cli import _print_summary
from batch_detect.config import RunConfig
from batch_detect.model.interpreter import load_backend, make_interpreter, read_model
from batch_detect.model.labels import embedded_labels
from batch_detect.run.pipeline import run
from batch_detect.commands.report import render_text, summarize
from batch_detect.synthetic import write_dataset

# Not the committed names, so the test knows which labels a run used.
EMBEDDED = ["round", "box", "wedge"]


def with_metadata_zip(src: str, dst: str, files: dict[str, str]) -> str:
    """A copy of `src` with a zip appended, as the TFLite metadata writers store associated files."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    with open(src, "rb") as fh, open(dst, "wb") as out:
        out.write(fh.read() + buf.getvalue())
    return dst


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("labels") / "images"
    write_dataset(str(folder), 24, seed=2024)
    return str(folder)


@pytest.fixture
def labelled_model(models_dir, tmp_path):
    return with_metadata_zip(os.path.join(models_dir, "shapes_ssd_uint8.tflite"), str(tmp_path / "meta.tflite"),
                             {"README.md": "not labels\n", "labelmap.txt": "\n".join(EMBEDDED) + "\n"})


def test_embedded_labels_are_found_and_the_model_still_loads(labelled_model, models_dir, tmp_path):
    content = read_model(labelled_model)
    assert embedded_labels(content) == (EMBEDDED, "labelmap.txt")
    interp = make_interpreter(load_backend(), content, 1, labelled_model)  # trailing zip is ignored by TFLite
    assert len(interp.get_output_details()) == 4
    assert embedded_labels(read_model(os.path.join(models_dir, "shapes_ssd_uint8.tflite"))) is None
    # a zip with one .txt not named like labels: taken; with two such: neither is guessed
    base = os.path.join(models_dir, "shapes_ssd_uint8.tflite")
    one = with_metadata_zip(base, str(tmp_path / "one.tflite"), {"classes.txt": "a\nb\n"})
    assert embedded_labels(read_model(one)) == (["a", "b"], "classes.txt")
    two = with_metadata_zip(base, str(tmp_path / "two.tflite"), {"a.txt": "a\n", "b.txt": "b\n"})
    assert embedded_labels(read_model(two)) is None

    shown = subprocess.run([sys.executable, "-m", "batch_detect", "inspect", labelled_model],
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "labels: 3 embedded in the model (labelmap.txt" in shown.stdout and "round, box, wedge" in shown.stdout
    as_json = json.loads(subprocess.run([sys.executable, "-m", "batch_detect", "inspect", labelled_model, "--json"],
                                        capture_output=True, text=True, timeout=120).stdout)
    assert as_json["labels"]["labels"] == EMBEDDED and as_json["family"] == "ssd_postprocess"


def labels_of(out: str) -> list:
    return pq.read_table(os.path.join(out, "detections"), columns=["class_id", "label"]).to_pylist()


def test_a_run_uses_embedded_labels_unless_given(local_ray, labelled_model, models_dir, images, tmp_path):
    out = str(tmp_path / "embedded")
    manifest = run(RunConfig(model=labelled_model, input=images, output=out, score_threshold=0.3)).manifest
    assert manifest["status"] == "complete" and manifest["labels"] == EMBEDDED
    assert manifest["labels_source"] == "embedded in the model (labelmap.txt)"
    rows = labels_of(out)
    assert rows and all(r["label"] == EMBEDDED[r["class_id"]] for r in rows)
    assert manifest["counts"]["unlabelled_class_ids"] == {} and manifest["warnings"] == []

    given = str(tmp_path / "given")
    manifest = run(RunConfig(model=labelled_model, input=images, output=given, score_threshold=0.3,
                             labels=os.path.join(models_dir, "shapes_labels.txt"))).manifest
    assert manifest["labels"] == ["circle", "square", "triangle"]
    assert {r["label"] for r in labels_of(given)} <= {"circle", "square", "triangle"}


def test_class_ids_outside_the_labels_get_null_and_a_warning(local_ray, models_dir, images, tmp_path):
    short = tmp_path / "two_labels.txt"
    short.write_text("circle\nsquare\n")  # the model also predicts class 2 (triangle)
    out = str(tmp_path / "out")
    manifest = run(RunConfig(model=os.path.join(models_dir, "shapes_ssd_uint8.tflite"), labels=str(short),
                             input=images, output=out, score_threshold=0.3, shard_size=8)).manifest
    assert manifest["status"] == "complete" and manifest["counts"]["failures"] == 0
    rows = labels_of(out)
    beyond = [r for r in rows if r["class_id"] >= 2]
    assert beyond, "the synthetic scenes hold triangles: class 2 must be detected"
    assert all(r["label"] is None for r in beyond)
    assert all(r["label"] == ["circle", "square"][r["class_id"]] for r in rows if r["class_id"] < 2)
    assert manifest["counts"]["unlabelled_class_ids"] == {"2": len(beyond)}
    print(manifest["warnings"])
    # the first is said before the run too (the model's post-process op knows its 3 classes), the second counts
    assert len(manifest["warnings"]) == 2 and manifest["warnings"][0].startswith(f"2 labels ({short}) but the model")
    assert f"{len(beyond)} detections have class ids" in manifest["warnings"][1]
    assert "2: " in manifest["warnings"][1] and str(short) in manifest["warnings"][1]
    on_disk = json.load(open(os.path.join(out, "_manifest.json")))
    assert on_disk["warnings"] == manifest["warnings"]
    text = io.StringIO()
    _print_summary(manifest, text)
    assert "warning: " + manifest["warnings"][1] in text.getvalue()


def test_no_labels_and_more_labels_than_classes_are_warned_about(local_ray, models_dir, images, tmp_path):
    bare = run(RunConfig(model=os.path.join(models_dir, "shapes_ssd_uint8.tflite"), input=images,
                         output=str(tmp_path / "bare"), score_threshold=0.3)).manifest
    assert bare["status"] == "complete" and bare["labels"] is None
    assert len(bare["warnings"]) == 1 and bare["warnings"][0].startswith("no labels: every detection's label is null")
    assert "--labels FILE" in bare["warnings"][0] and "embedded in the model's metadata zip" in bare["warnings"][0]
    text = io.StringIO()
    _print_summary(bare, text)
    assert "warning: no labels" in text.getvalue()
    report = render_text(summarize(str(tmp_path / "bare")))
    assert "class 1" in report and "warning: no labels" in report  # the report says why it shows class ids

    five = tmp_path / "five_labels.txt"
    five.write_text("circle\nsquare\ntriangle\nstar\nhexagon\n")  # the YOLO head [1, 4+3, N] has 3 classes
    many = run(RunConfig(model=os.path.join(models_dir, "shapes_yolov8_float32.tflite"), labels=str(five),
                         input=images, output=str(tmp_path / "many"), score_threshold=0.3)).manifest
    assert many["status"] == "complete"
    assert len(many["warnings"]) == 1 and many["warnings"][0].startswith(f"5 labels ({five}) but the model has 3 classes")
