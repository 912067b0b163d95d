"""Issue #29, "the first hour", item 1: a model's own labels. Ultralytics exports embed their metadata as
a dict literal (temp_meta.txt) whose `names` are the labels; TFLite Support metadata names its label files;
a file that is not a label list is never taken as one; and a labels count that does not fit the model's
classes is a warning before the run, not after it."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import zipfile

import duckdb
import flatbuffers
import pytest

from batch_detect.config import RunConfig
from batch_detect.errors import ConfigError
from batch_detect.model.interpreter import load_backend, make_interpreter, read_model
from batch_detect.model.labels import (ULTRALYTICS, embedded_labels, label_warnings, load_labels, model_classes,
                                 model_labels, ultralytics_names)
from batch_detect.model.modelfile import LabelFile, metadata_label_files
from batch_detect.run.pipeline import prepare, run
from batch_detect.synthetic import write_dataset

SHAPES = ["circle", "square", "triangle"]
# A dict literal that runs code if anything evaluates it instead of parsing it.
HOSTILE = "{'task': 'detect', 'names': {0: __import__('pathlib').Path(%r).write_text('ran'), 1: 'dog'}}"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("first_hour_labels") / "images"
    write_dataset(str(folder), 6, seed=29)
    return str(folder)


def with_zip(content: bytes, files: dict[str, str]) -> bytes:
    """The model with a zip of `files` appended, as the metadata writers (and Ultralytics) store them."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return content + buf.getvalue()


def _vector(b: flatbuffers.Builder, offsets: list[int]) -> int:
    b.StartVector(4, len(offsets), 4)
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    return b.EndVector()


def tflite_metadata(files: list[tuple[str, int]], tensor: str) -> bytes:
    """A TFLite Support ModelMetadata (metadata_schema.fbs, "M001") with one subgraph whose output `tensor`
    carries these associated files (name, AssociatedFileType), written with the flatbuffers builder."""
    b = flatbuffers.Builder(256)
    assoc = []
    for name, kind in files:
        name_off = b.CreateString(name)
        b.StartObject(5)  # AssociatedFile: name, description, type, locale, version
        b.PrependUOffsetTRelativeSlot(0, name_off, 0)
        b.PrependInt8Slot(2, kind, 0)
        assoc.append(b.EndObject())
    files_off, tensor_name = _vector(b, assoc), b.CreateString(tensor)
    b.StartObject(7)  # TensorMetadata: ..., associated_files is field 6
    b.PrependUOffsetTRelativeSlot(0, tensor_name, 0)
    b.PrependUOffsetTRelativeSlot(6, files_off, 0)
    outputs = _vector(b, [b.EndObject()])
    b.StartObject(10)  # SubGraphMetadata: output_tensor_metadata is field 3
    b.PrependUOffsetTRelativeSlot(3, outputs, 0)
    subgraphs, model_name = _vector(b, [b.EndObject()]), b.CreateString("shapes detector")
    b.StartObject(8)  # ModelMetadata: name 0, subgraph_metadata 3
    b.PrependUOffsetTRelativeSlot(0, model_name, 0)
    b.PrependUOffsetTRelativeSlot(3, subgraphs, 0)
    b.Finish(b.EndObject(), file_identifier=b"M001")
    return bytes(b.Output())


def with_tflite_metadata(content: bytes, metadata: bytes) -> bytes:
    """The model rewritten with a TFLITE_METADATA entry, through LiteRT's own generated schema (an
    independent writer for the reader under test)."""
    schema = pytest.importorskip("ai_edge_litert.schema_py_generated",
                                 reason="LiteRT's generated TFLite schema writes the test model")
    model = schema.ModelT.InitFromPackedBuf(content, 0)
    buffer = schema.BufferT()
    buffer.data = list(metadata)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = "TFLITE_METADATA", len(model.buffers) - 1
    model.metadata = (model.metadata or []) + [entry]
    b = flatbuffers.Builder(len(content) + 4096)
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def detections(out: str) -> list[tuple]:
    return duckdb.execute(f"SELECT regexp_extract(uri, '[^/]+$'), label, class_id, score "
                          f"FROM read_parquet('{out}/detections/*.parquet') ORDER BY score DESC").fetchall()


def test_real_yolov8n_without_labels_names_its_boxes(local_ray, realworld, tmp_path):
    for name in ("yolov8n_int8.tflite", "yolov8n_full_integer_quant.tflite"):
        found = model_labels(read_model(os.path.join(realworld, name)))
        assert (found.file, found.origin, len(found.labels)) == ("temp_meta.txt", ULTRALYTICS, 80), name
        assert found.labels[:3] == ["person", "bicycle", "car"] and found.labels[79] == "toothbrush"
    out, model = str(tmp_path / "out"), os.path.join(realworld, "yolov8n_int8.tflite")
    manifest = run(RunConfig(model=model, input=os.path.join(realworld, "images"), output=out, score_threshold=0.4,
                             resize="stretch")).manifest
    assert manifest["status"] == "complete" and manifest["counts"]["images"] == 4
    assert manifest["labels_source"] == f"embedded in the model (temp_meta.txt, {ULTRALYTICS})"
    assert manifest["warnings"] == [] and manifest["counts"]["unlabelled_class_ids"] == {}
    rows = detections(out)
    assert rows and all(label is not None and label == found.labels[cid] for _, label, cid, _ in rows), rows
    best = {photo: label for photo, label, _, _ in reversed(rows)}  # the highest score per photo wins
    assert best == {"astronaut.png": "person", "camera.png": "person", "chelsea.png": "dog", "coffee.png": "cup"}
    assert {label for _, label, _, _ in rows} >= {"person", "dog", "cup"}

    shown = subprocess.run([sys.executable, "-m", "batch_detect", "inspect", model], capture_output=True, text=True,
                           timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert f"labels: 80 embedded in the model (temp_meta.txt, {ULTRALYTICS}; used when --labels" in shown.stdout
    assert "person, bicycle, car" in shown.stdout and "classes: 80 (output " in shown.stdout
    assert "warning:" not in shown.stdout


def test_ultralytics_metadata_is_parsed_never_evaluated(models_dir, tmp_path):
    sentinel = tmp_path / "ran.txt"
    hostile = HOSTILE % str(sentinel)
    assert ultralytics_names(hostile) is None
    content = read_model(os.path.join(models_dir, "shapes_ssd_uint8.tflite"))
    found = model_labels(with_zip(content, {"temp_meta.txt": hostile}))
    assert found.labels is None and not sentinel.exists()
    assert found.passed_over == ("temp_meta.txt: not a label list (it is a dict or list literal, not one label "
                                 "per line)",)
    assert "temp_meta.txt: not a label list" in label_warnings(None, None, None, found.passed_over)[0]
    (tmp_path / "meta.txt").write_text(hostile)
    with pytest.raises(ConfigError, match="is not a label list"):
        load_labels(str(tmp_path / "meta.txt"))
    assert not sentinel.exists()

    # The forms Ultralytics writes: a dict literal, JSON (metadata.json, string keys), YAML (metadata.yaml).
    assert ultralytics_names("{'stride': 32, 'names': {0: 'person', 2: 'car'}}") == ["person", None, "car"]
    as_json = '{\n  "task": "detect",\n  "names": {"0": "cat", "1": "dog"}\n}'
    assert model_labels(with_zip(content, {"metadata.json": as_json})).labels == ["cat", "dog"]
    yaml = "author: Ultralytics\nimgsz:\n- 640\n- 640\nnames:\n  0: person\n  1: 'traffic light'\nargs:\n  batch: 1\n"
    assert ultralytics_names(yaml) == ["person", "traffic light"]
    assert ultralytics_names("names:\n- cat\n- dog\n") == ["cat", "dog"]
    assert ultralytics_names("names: {0: person, 1: dog}") == ["person", "dog"]
    (tmp_path / "metadata.yaml").write_text(yaml)
    assert load_labels(str(tmp_path / "metadata.yaml")) == ["person", "traffic light"]


def test_a_file_that_is_not_a_label_list_is_never_labels(models_dir):
    content = read_model(os.path.join(models_dir, "shapes_ssd_uint8.tflite"))
    not_lists = {
        "a dict on one line": "{'description': 'a model', 'stride': 32}",
        "a YAML mapping": "description: a model\nauthor: someone\nimgsz:\n- 640\n",
        "a 2 kB line": "x" * 2000 + "\n",
    }
    for what, text in not_lists.items():
        assert embedded_labels(with_zip(content, {"labels.txt": text})) is None, what
        assert embedded_labels(with_zip(content, {"only.txt": text})) is None, what
    assert embedded_labels(with_zip(content, {"labels.txt": "0 circle\n1 square\n2 triangle\n"})) == (SHAPES,
                                                                                                       "labels.txt")


@pytest.mark.parametrize("kind,type_name", [(2, "TENSOR_AXIS_LABELS"), (3, "TENSOR_VALUE_LABELS")])
def test_tflite_support_metadata_names_the_label_file(models_dir, images, tmp_path, kind, type_name):
    base = read_model(os.path.join(models_dir, "shapes_ssd_uint8.tflite"))
    # Two .txt files, neither named like labels: only the metadata tells which one holds them.
    meta = with_tflite_metadata(base, tflite_metadata([("shapes.txt", kind)], "category"))
    model = with_zip(meta, {"notes.txt": "trained on synthetic scenes\n", "shapes.txt": "\n".join(SHAPES) + "\n"})
    assert metadata_label_files(model) == [LabelFile("shapes.txt", type_name, "category", None)]
    assert len(make_interpreter(load_backend(), model, 1).get_output_details()) == 4  # it still loads
    found = model_labels(model)
    assert (found.labels, found.file, found.origin) == (SHAPES, "shapes.txt", f"TFLite metadata {type_name} of "
                                                                              "output 'category'")
    path = tmp_path / "with_metadata.tflite"
    path.write_bytes(model)
    ready = prepare(RunConfig(model=str(path), input=images, output=str(tmp_path / "out")))
    assert ready.labels == SHAPES and ready.label_warnings == []
    assert ready.labels_source == f"embedded in the model (shapes.txt, {found.origin})"

    # A declared file that is not a label list is passed over, and said so.
    bad = with_zip(meta, {"shapes.txt": "{'names': 3}"})
    assert model_labels(bad).labels is None
    assert model_labels(bad).passed_over == ("shapes.txt: not a label list (it is a dict or list literal, not one "
                                             "label per line)",)


def test_real_tflite_support_metadata_is_read(realworld):
    yolo = read_model(os.path.join(realworld, "yolov8n_int8.tflite"))
    # Ultralytics declares its metadata dict as the output's labels: only its `names` are labels.
    assert metadata_label_files(yolo) == [LabelFile("temp_meta.txt", "TENSOR_AXIS_LABELS", "output", None)]
    face = read_model(os.path.join(realworld, "blazeface_short_range.tflite"))
    assert metadata_label_files(face) == [] and model_labels(face).labels is None


def test_a_labels_count_that_does_not_fit_is_warned_before_any_work(models_dir, images, tmp_path, caplog):
    ssd = os.path.join(models_dir, "shapes_ssd_uint8.tflite")
    yolo = os.path.join(models_dir, "shapes_yolov8_float32.tflite")
    content = read_model(ssd)
    ready = prepare(RunConfig(model=ssd, input=images, output=str(tmp_path / "probe")))
    classes = model_classes(content, ready.info.layout)
    assert (classes.count, classes.without_background) == (3, True)
    assert "TFLite_Detection_PostProcess op's num_classes" in classes.where

    cases = {
        "five.txt": (SHAPES + ["star", "hexagon"], "5 labels ({}) but the model has 3 classes (the "
                     "TFLite_Detection_PostProcess op's num_classes); labels beyond class id 2 are never used"),
        "two.txt": (SHAPES[:2], "2 labels ({}) but the model has 3 classes (the TFLite_Detection_PostProcess op's "
                    "num_classes); class id 2 gets a null label"),
        "background.txt": (["???"] + SHAPES, "4 labels ({}) but the model has 3 classes (the "
                           "TFLite_Detection_PostProcess op's num_classes), and the first label, '???', stands for "
                           "the background"),
    }
    for name, (labels, expected) in cases.items():
        path = tmp_path / name
        path.write_text("\n".join(labels) + "\n")
        caplog.clear()
        out = tmp_path / f"out_{name}"
        with caplog.at_level(logging.WARNING, logger="batch_detect"):
            ready = prepare(RunConfig(model=ssd, labels=str(path), input=images, output=str(out)))
        assert len(ready.label_warnings) == 1 and ready.label_warnings[0].startswith(expected.format(path))
        said = [r.getMessage() for r in caplog.records if r.name.startswith("batch_detect")]
        assert said == ["warning: " + ready.label_warnings[0]]
        assert not out.exists() or not any(out.iterdir())  # said before anything is written
    fits = tmp_path / "three.txt"
    fits.write_text("\n".join(SHAPES) + "\n")
    fitting = prepare(RunConfig(model=ssd, labels=str(fits), input=images, output=str(tmp_path / "ok")))
    assert fitting.label_warnings == []
    yolo_ready = prepare(RunConfig(model=yolo, labels=str(tmp_path / "two.txt"), input=images,
                                   output=str(tmp_path / "yolo")))
    assert yolo_ready.label_warnings[0].startswith("2 labels") and "class id 2 gets a null label" in \
        yolo_ready.label_warnings[0]

    # The command line says it before the run starts, and in --dry-run.
    env = {**os.environ, "RAY_ADDRESS": ""}
    args = [sys.executable, "-m", "batch_detect", "run", "--model", ssd, "--labels", str(tmp_path / "background.txt"),
            "--input", images]
    dry = subprocess.run(args + ["--output", str(tmp_path / "dry"), "--dry-run"], capture_output=True, text=True,
                         timeout=300, env=env)
    assert dry.returncode == 0, dry.stderr
    assert "warning: 4 labels" in dry.stderr and "stands for the background" in dry.stderr
    real = subprocess.run(args + ["--output", str(tmp_path / "real")], capture_output=True, text=True, timeout=300,
                          env=env)
    assert real.returncode == 0, real.stderr
    assert "warning: 4 labels" in real.stderr and "running on" in real.stderr, real.stderr
    assert real.stderr.index("warning: 4 labels") < real.stderr.index("running on")


def test_inspect_warns_about_embedded_labels_that_do_not_fit(models_dir, tmp_path):
    content = read_model(os.path.join(models_dir, "shapes_ssd_uint8.tflite"))
    path = tmp_path / "labelmap.tflite"
    path.write_bytes(with_zip(content, {"labelmap.txt": "???\n" + "\n".join(SHAPES) + "\n"}))
    shown = subprocess.run([sys.executable, "-m", "batch_detect", "inspect", str(path)], capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "labels: 4 embedded in the model (labelmap.txt; used when --labels is not given): ???, circle" in \
        shown.stdout
    assert "classes: 3 (the TFLite_Detection_PostProcess op's num_classes)" in shown.stdout
    assert "warning: 4 labels (embedded in the model (labelmap.txt)) but the model has 3 classes" in shown.stdout
