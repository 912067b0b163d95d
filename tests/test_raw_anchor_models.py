"""Real raw per-anchor detectors as people ship them (../shared/realworld): an SSD-MobileNetV2 exported without
its post-processing op and MediaPipe's BlazeFace. The job's rows are checked against an independent decode
written here (anchors rebuilt from the published settings, numpy only, the interpreter called directly) and
against the shared README's best detections; both models stay at one image per invoke."""

from __future__ import annotations

import math
import os

import duckdb
import numpy as np
import pytest
from PIL import Image

from batch_detect.config import RunConfig
from batch_detect.errors import ModelError
from batch_detect.model.anchors import mediapipe_anchors, recognise_anchors
from batch_detect.model.detector import Detector
from batch_detect.model.interpreter import load_backend, read_model
from batch_detect.pipeline import run

SSD = "ssd_mobilenetv2_oidv4_fp16.tflite"
FACE = "blazeface_short_range.tflite"
PHOTOS = ("astronaut.png", "camera.png", "chelsea.png", "coffee.png")
# The shared README's best detection per photo (None: nothing at 0.5; the test runs at 0.3 to see chelsea's).
README_BEST = {
    SSD: {"astronaut.png": ("Person", 0.59), "camera.png": ("Person", 0.47), "chelsea.png": ("Cat", 0.85),
          "coffee.png": ("Coffee cup", 0.56)},
    FACE: {"astronaut.png": (None, 0.92), "camera.png": (None, 0.78), "chelsea.png": (None, 0.37),
           "coffee.png": None},
}


def _interpreter(path):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        from tflite_runtime.interpreter import Interpreter
    interp = Interpreter(model_path=path)
    interp.allocate_tensors()
    return interp


def _pixels(path, size):
    rgb = Image.open(path).convert("RGB").resize(size, Image.BILINEAR)
    return (np.asarray(rgb, np.float32) / 127.5 - 1.0)[None]


def _ref_ssd_anchors():
    """multiple_grid_anchor_generator.create_ssd_anchors as ssd_mobilenet_v2's pipeline.config sets it."""
    grids, scales = (19, 10, 5, 3, 2, 1), [0.2 + 0.75 * i / 5 for i in range(6)] + [1.0]
    rows = []
    for layer, g in enumerate(grids):
        if layer == 0:
            specs = [(0.1, 1.0), (scales[0], 2.0), (scales[0], 0.5)]
        else:
            specs = [(scales[layer], a) for a in (1.0, 2.0, 0.5, 3.0, 0.3333)]
            specs.append((math.sqrt(scales[layer] * scales[layer + 1]), 1.0))
        for y in range(g):
            for x in range(g):
                rows += [((y + 0.5) / g, (x + 0.5) / g, s / math.sqrt(a), s * math.sqrt(a)) for s, a in specs]
    return np.array(rows)


def _ref_ssd(path, photo):
    interp = _interpreter(path)
    interp.set_tensor(interp.get_input_details()[0]["index"], _pixels(photo, (300, 300)))
    interp.invoke()
    out = {d["name"]: interp.get_tensor(d["index"])[0] for d in interp.get_output_details()}
    enc, logits = out["raw_outputs/box_encodings"], out["raw_outputs/class_predictions"]
    scores = 1 / (1 + np.exp(-logits[:, 1:]))
    i, c = np.unravel_index(np.argmax(scores), scores.shape)
    a, e = _ref_ssd_anchors()[i], enc[i] / [10, 10, 5, 5]
    cy, cx, h, w = e[0] * a[2] + a[0], e[1] * a[3] + a[1], math.exp(e[2]) * a[2], math.exp(e[3]) * a[3]
    return c + 1, float(scores[i, c]), [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], None


def _face_centres():
    # strides 8, 16, 16, 16: a 16x16 grid with 2 anchors per cell, then an 8x8 one with 6
    return [((y + 0.5) / g, (x + 0.5) / g) for g, k in ((16, 2), (8, 6)) for y in range(g) for x in range(g)
            for _ in range(k)]


def _ref_face_candidates(path, photo, threshold):
    """Every anchor over the threshold as MediaPipe's TensorsToDetections makes it: (score, [xmin, ymin, xmax,
    ymax], [(x, y)] * 6), normalised to the 128x128 input."""
    interp = _interpreter(path)
    interp.set_tensor(interp.get_input_details()[0]["index"], _pixels(photo, (128, 128)))
    interp.invoke()
    out = {d["name"]: interp.get_tensor(d["index"])[0] for d in interp.get_output_details()}
    scores = 1 / (1 + np.exp(-np.clip(out["classificators"][:, 0].astype(np.float64), -100, 100)))
    found = []
    for i, (ay, ax) in enumerate(_face_centres()):
        if scores[i] >= threshold:
            r = [float(v) / 128 for v in out["regressors"][i]]
            cx, cy, w, h = r[0] + ax, r[1] + ay, r[2], r[3]
            points = [(r[4 + 2 * k] + ax, r[5 + 2 * k] + ay) for k in range(6)]
            found.append((float(scores[i]), [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], points))
    return sorted(found, key=lambda d: -d[0])


def _ref_weighted_nms(candidates, threshold=0.3):
    """NonMaxSuppressionCalculator::WeightedNonMaxSuppression, line by line: the best remaining detection's
    overlapping candidates (IoU > threshold, itself included) averaged by score, keypoints too."""
    remained, kept = list(candidates), []
    while remained:
        best = remained[0]
        group = [d for d in remained if _iou(d[1], best[1]) > threshold]
        rest = [d for d in remained if _iou(d[1], best[1]) <= threshold]
        total = sum(d[0] for d in group)
        box = [sum(d[0] * d[1][j] for d in group) / total for j in range(4)]
        points = [tuple(sum(d[0] * d[2][k][j] for d in group) / total for j in range(2)) for k in range(6)]
        kept.append((best[0], box, points))
        if len(rest) == len(remained):
            break
        remained = rest
    return kept


def _ref_face(path, photo, threshold=0.3, weighted=True):
    candidates = _ref_face_candidates(path, photo, threshold)
    score, box, points = (_ref_weighted_nms(candidates) if weighted else candidates)[0]
    return 0, score, box, points


def _iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.mark.parametrize("model", [SSD, FACE])
def test_the_job_matches_an_independent_decode(realworld, tmp_path, model):
    out = str(tmp_path / "out")
    labels = os.path.join(realworld, "oidv4_labelmap.txt") if model == SSD else None
    manifest = run(RunConfig(model=os.path.join(realworld, model), labels=labels, normalization="-1,1",
                             input=os.path.join(realworld, "images"), output=out, score_threshold=0.3,
                             resize="stretch")).manifest
    assert manifest["status"] == "complete" and manifest["counts"]["images"] == 4
    assert manifest["model"]["family"] == ("ssd_raw" if model == SSD else "mediapipe")
    rows = duckdb.execute(f"""SELECT regexp_extract(uri, '[^/]+$'), class_id, label, score, xmin, ymin, xmax, ymax
                              FROM read_parquet('{out}/detections/*.parquet') ORDER BY score DESC""").fetchall()
    reference = _ref_ssd if model == SSD else _ref_face
    lengths = duckdb.execute(f"SELECT DISTINCT len(keypoints) FROM read_parquet('{out}/detections/*.parquet')").fetchall()
    assert lengths == ([(None,)] if model == SSD else [(6,)])  # null where the family has no keypoints
    for photo in PHOTOS:
        best = next((r for r in rows if r[0] == photo), None)
        expected = README_BEST[model][photo]
        if expected is None:
            assert best is None, (photo, best)
            continue
        assert best is not None, photo
        ref_class, ref_score, ref_box, *_ = reference(os.path.join(realworld, model),
                                                      os.path.join(realworld, "images", photo))
        assert best[1] == ref_class and best[2] == expected[0], (photo, best)
        assert best[3] == pytest.approx(ref_score, abs=0.02) and best[3] == pytest.approx(expected[1], abs=0.02)
        assert _iou(list(best[4:]), ref_box) >= 0.9, (photo, best, ref_box)


def _best_rows(out):
    return {r[0]: r for r in duckdb.execute(f"""
        SELECT regexp_extract(uri, '[^/]+$') AS photo, score, [xmin, ymin, xmax, ymax], keypoints
        FROM read_parquet('{out}/detections/*.parquet') QUALIFY row_number() OVER (PARTITION BY uri ORDER BY score DESC) = 1
        """).fetchall()}


def _face_job(realworld, out, images=None, resize="stretch", **kw):
    return run(RunConfig(model=os.path.join(realworld, FACE), input=images or os.path.join(realworld, "images"),
                         output=str(out), score_threshold=0.5, resize=resize, **kw)).manifest


@pytest.mark.parametrize("nms", ["auto", "plain"])
def test_blazeface_keypoints_lie_on_the_face_and_match_an_independent_decode(realworld, tmp_path, nms):
    """MediaPipe's default (auto: weighted) averages boxes and keypoints over the overlapping anchors; plain keeps
    the best anchor's. Both against the reference decode; the six points where a face has them."""
    _face_job(realworld, tmp_path / "out", nms=nms)
    best = _best_rows(tmp_path / "out")
    assert sorted(best) == ["astronaut.png", "camera.png"]
    for photo, (_, score, box, keypoints) in best.items():
        _, ref_score, ref_box, ref_points = _ref_face(os.path.join(realworld, FACE),
                                                      os.path.join(realworld, "images", photo), 0.5, nms == "auto")
        assert score == pytest.approx(ref_score, abs=0.02) and _iou(box, ref_box) >= 0.95, (photo, box, ref_box)
        points = [(p["x"], p["y"]) for p in keypoints]
        assert np.allclose(points, ref_points, atol=0.01), (photo, points, ref_points)
        (rx, ry), (lx, ly), nose, mouth, right_ear, left_ear = points  # the subject's right eye is on the image's left
        xmin, ymin, xmax, ymax = box
        assert all(xmin < x < xmax and ymin < y < ymax for x, y in points[:4]), (photo, points, box)
        margin = 0.1 * (xmax - xmin)  # ear tragions sit on the box's side edges
        assert all(xmin - margin < x < xmax + margin and ymin < y < ymax for x, y in (right_ear, left_ear))
        assert right_ear[0] < rx < nose[0] < lx < left_ear[0], (photo, points)
        assert max(ry, ly) < nose[1] < mouth[1], (photo, points)  # eyes above the nose above the mouth


def test_keypoints_go_through_the_letterbox_inverse_like_the_boxes(realworld, tmp_path):
    """The astronaut pasted at the right of a canvas 1.25 times as wide, letterboxed: its face's box and
    keypoints, normalised to the wide image, are the square run's moved into the right 80%."""
    images = tmp_path / "images"
    images.mkdir()
    photo = Image.open(os.path.join(realworld, "images", "astronaut.png")).convert("RGB")
    wide = Image.new("RGB", (640, 512), (114, 114, 114))
    wide.paste(photo, (128, 0))
    wide.save(images / "wide.png")
    photo.save(images / "square.png")
    _face_job(realworld, tmp_path / "out", images=str(images), resize="letterbox")
    best = _best_rows(tmp_path / "out")
    _, _, square_box, square_kp = best["square.png"]
    _, _, wide_box, wide_kp = best["wide.png"]

    def moved(x):  # the square's x in the wide image's normalised coordinates
        return 0.2 + 0.8 * x

    expected = [moved(square_box[0]), square_box[1], moved(square_box[2]), square_box[3]]
    assert _iou(wide_box, expected) >= 0.8, (wide_box, expected)
    assert np.allclose([(p["x"], p["y"]) for p in wide_kp], [(moved(p["x"]), p["y"]) for p in square_kp], atol=0.02)


def test_weighted_nms_matches_mediapipes_algorithm_written_out():
    from batch_detect.model.per_anchor import weighted_nms

    rng = np.random.default_rng(7)
    centres = rng.uniform(0.2, 0.8, (5, 2))  # five faces, each found by a cloud of anchors
    xy = centres[rng.integers(0, 5, 60)] + rng.normal(0, 0.02, (60, 2))
    wh = rng.uniform(0.1, 0.2, (60, 2))
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], 1)
    points = xy[:, None, :] + rng.normal(0, 0.03, (60, 6, 2))
    scores = rng.uniform(0.5, 1.0, 60)
    ref = _ref_weighted_nms(sorted(((float(s), list(b), [tuple(p) for p in ps])
                                    for s, b, ps in zip(scores, boxes, points)), key=lambda d: -d[0]))
    yxyx = boxes[:, [1, 0, 3, 2]].astype(np.float32)
    got_yxyx, class_ids, got_scores, got_points = weighted_nms(yxyx, scores.astype(np.float32),
                                                               points.astype(np.float32), 0.3, 100)
    assert 1 < len(ref) < 60 and len(got_scores) == len(ref) and not class_ids.any()
    assert np.allclose(got_scores, [d[0] for d in ref], atol=1e-6)
    assert np.allclose(got_yxyx[:, [1, 0, 3, 2]], [d[1] for d in ref], atol=1e-5)
    assert np.allclose(got_points, [d[2] for d in ref], atol=1e-5)
    # a box merged from several differs from the best one's own: the averaging happened
    assert not np.allclose(got_yxyx[0], yxyx[int(np.argmax(scores))], atol=1e-3)


def test_weighted_nms_is_the_mediapipe_familys_alone(realworld):
    det = _detector(realworld, FACE, nms="plain")
    assert det.info.describe()["nms"].startswith("plain")
    assert _detector(realworld, FACE).info.describe()["nms"].startswith("weighted")
    with pytest.raises(ModelError, match="--nms weighted is MediaPipe's algorithm.*ssd_raw"):
        _detector(realworld, SSD, nms="weighted")


def _detector(realworld, model, **kw) -> Detector:
    return Detector(load_backend(), read_model(os.path.join(realworld, model)), num_threads=1, score_threshold=0.5,
                    resize="auto", normalization="auto", max_pixels=10**8, **kw)


@pytest.mark.parametrize("model", [SSD, FACE])
def test_fixed_batch_models_are_never_batched_by_resizing(realworld, model):
    """BlazeFace resized to batch 2 folds the batch into its anchor axis ([1,1792,16]): the batch stays 1."""
    det = _detector(realworld, model)
    assert det.set_batch(2) == 1 and det.batch == 1
    photo = open(os.path.join(realworld, "images", "astronaut.png"), "rb").read()
    assert len(det.process("astronaut.png", photo).detections.scores) >= 1


def test_the_layouts_and_the_anchors_file(realworld, tmp_path):
    det = _detector(realworld, FACE)
    assert det.info.describe()["anchors"] == "mediapipe face short range (896 anchors)"
    # MediaPipe's other published face layouts are recognised from input size and N alone
    assert len(recognise_anchors("mediapipe", (192, 192), 2304).anchors) == 2304
    assert len(recognise_anchors("mediapipe", (256, 256), 896).anchors) == 896
    with pytest.raises(ModelError, match="--anchors FILE") as exc:
        recognise_anchors("mediapipe", (160, 160), 1000)
    assert "mediapipe face short range" in str(exc.value)
    # A file of the same anchors gives the same rows
    anchors = mediapipe_anchors((128, 128), (8, 16, 16, 16))
    path = tmp_path / "anchors.csv"
    np.savetxt(path, anchors, delimiter=",")
    given = _detector(realworld, FACE, anchors=str(path))
    assert given.info.describe()["anchors"].startswith("file anchors.csv")
    photo = open(os.path.join(realworld, "images", "astronaut.png"), "rb").read()
    a, b = det.process("a", photo).detections, given.process("a", photo).detections
    assert np.allclose(a.boxes, b.boxes, atol=1e-5) and np.allclose(a.scores, b.scores)
    np.save(tmp_path / "short.npy", anchors[:10])
    with pytest.raises(ModelError, match="holds 10 anchors"):
        _detector(realworld, FACE, anchors=str(tmp_path / "short.npy"))


def test_inspect_names_the_family_the_layout_and_where_normalization_came_from(realworld):
    from batch_detect.commands.inspect import inspect_model, render

    face = inspect_model(os.path.join(realworld, FACE))
    assert face["family"] == "mediapipe" and face["decoding"]["anchors"].startswith("mediapipe face short range")
    assert face["decoding"]["input"]["normalization"] == "mean=127.5;std=127.5"
    assert "TFLite metadata" in face["decoding"]["input"]["normalization_from"]
    assert "anchors: mediapipe face short range (896 anchors)" in render(face)
    ssd = inspect_model(os.path.join(realworld, SSD))
    assert ssd["family"] == "ssd_raw" and ssd["classes"]["count"] == 24
    assert ssd["decoding"]["anchors"].startswith("tf-od-api ssd 300x300 (grids 19,10,5,3,2,1)")
    assert ssd["decoding"]["input"]["normalization"] == "-1,1"


def test_an_anchors_file_runs_through_the_job_and_is_part_of_its_identity(realworld, tmp_path):
    from batch_detect.errors import ConfigError, OutputError

    path = tmp_path / "face.npy"
    np.save(path, mediapipe_anchors((128, 128), (8, 16, 16, 16)))
    out = str(tmp_path / "out")

    def job(anchors):
        return run(RunConfig(model=os.path.join(realworld, FACE), input=os.path.join(realworld, "images"),
                             output=out, score_threshold=0.5, anchors=anchors))

    assert job(str(path)).manifest["counts"]["images"] == 4
    best = duckdb.execute(f"SELECT max(score) FROM read_parquet('{out}/detections/*.parquet')").fetchone()[0]
    assert best == pytest.approx(0.92, abs=0.02)
    np.save(path, mediapipe_anchors((128, 128), (8, 16, 16, 16)) + 0.01)  # same path, other anchors
    with pytest.raises(OutputError, match="different anchors"):
        job(str(path))
    with pytest.raises(ConfigError, match="want N rows of 4"):
        RunConfig(model="m.tflite", input="i", output="o", anchors=str(_csv(tmp_path, "1,2,3\n"))).validate()


def _csv(folder, text):
    path = folder / "bad.csv"
    path.write_text(text)
    return path


def _spec(index, name, shape):
    from batch_detect.model.interpreter import TensorSpec

    return TensorSpec(index, name, shape, shape, "float32", 0.0, 0)


def test_the_family_comes_from_shapes_and_names_never_position():
    from batch_detect.model.decoding import identify_outputs

    ssd = [_spec(0, "raw_outputs/box_encodings", (1, 1917, 4)),
           _spec(1, "raw_outputs/class_predictions", (1, 1917, 91))]
    face = [_spec(0, "regressors", (1, 896, 16)), _spec(1, "classificators", (1, 896, 1))]
    for outputs, family, hw in ((ssd, "ssd_raw", (300, 300)), (face, "mediapipe", (128, 128))):
        for order in (outputs, outputs[::-1]):
            layout = identify_outputs(order, "auto", hw)
            assert layout.family == family and layout.output.index == 1
    assert len(identify_outputs(ssd, "auto", (300, 300)).anchors.anchors) == 1917
    # 320x320 SSD-MobileNet: grids 20,10,5,3,2,1 (2034 anchors), recognised the same way
    ssd320 = [_spec(0, "box_encodings", (1, 2034, 4)), _spec(1, "class_predictions", (1, 2034, 91))]
    assert "grids 20,10,5,3,2,1" in identify_outputs(ssd320, "auto", (320, 320)).anchors.name
    with pytest.raises(ModelError, match="no known ssd anchor layout gives 1000 anchors.*--anchors FILE"):
        identify_outputs([_spec(0, "box_encodings", (1, 1000, 4)), _spec(1, "scores", (1, 1000, 5))], "auto",
                         (300, 300))


def test_normalization_minus_one_one_is_taken_as_typed():
    from batch_detect.commands.cli import parse_args

    args = parse_args(["run", "--model", "m.tflite", "--input", "i", "--output", "o", "--normalization", "-1,1",
                       "--anchors", "a.npy"])
    assert args.normalization == "-1,1" and args.anchors == "a.npy"
    assert parse_args(["inspect", "m.tflite", "--normalization", "-1,1"]).normalization == "-1,1"


def test_an_output_written_before_keypoints_is_not_resumed_into_mixed_schemas(realworld, tmp_path):
    import json

    from batch_detect.errors import OutputError

    _face_job(realworld, tmp_path / "out")
    manifest = tmp_path / "out" / "_manifest.json"
    written = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**written, "layout": 3}))  # as the version before keypoints left it
    with pytest.raises(OutputError, match="output layout 3, this one writes 4: its tables' columns differ"):
        _face_job(realworld, tmp_path / "out", resume=True)


def _calc_scale(min_scale, max_scale, index, count):
    return (min_scale + max_scale) / 2 if count == 1 else min_scale + (max_scale - min_scale) * index / (count - 1)


def _ref_ssd_anchors_calculator(h, w, strides, interpolated=1.0, min_scale=0.1484375, max_scale=0.75):
    """mediapipe/calculators/tflite/ssd_anchors_calculator.cc as its face, palm and pose graphs set it
    (aspect ratio 1, offset 0.5, fixed_anchor_size), written out loop for loop: (cx, cy) per anchor."""
    centres, layer = [], 0
    while layer < len(strides):
        scales, last = [], layer
        while last < len(strides) and strides[last] == strides[layer]:
            scales.append(_calc_scale(min_scale, max_scale, last, len(strides)))
            if interpolated > 0.0:
                after = 1.0 if last == len(strides) - 1 else _calc_scale(min_scale, max_scale, last + 1, len(strides))
                scales.append(math.sqrt(scales[-1] * after))
            last += 1
        fm_h, fm_w = math.ceil(h / strides[layer]), math.ceil(w / strides[layer])
        for y in range(fm_h):
            for x in range(fm_w):
                centres += [((x + 0.5) / fm_w, (y + 0.5) / fm_h)] * len(scales)
        layer = last
    return np.array(centres)


# MediaPipe's published detector graphs: (input, strides, interpolated_scale_aspect_ratio, N)
PUBLISHED = {"mediapipe face short range": ((128, 128), (8, 16, 16, 16), 1.0, 896),
             "mediapipe face full range": ((192, 192), (4,), 0.0, 2304),
             "mediapipe face back camera": ((256, 256), (16, 32, 32, 32), 1.0, 896),
             "mediapipe palm": ((192, 192), (8, 16, 16, 16), 1.0, 2016),
             "mediapipe pose": ((224, 224), (8, 16, 32, 32, 32), 1.0, 2254)}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_each_published_layout_is_mediapipes_ssd_anchors_calculator(name):
    (h, w), strides, interpolated, n = PUBLISHED[name]
    ref = _ref_ssd_anchors_calculator(h, w, strides, interpolated)
    layout = recognise_anchors("mediapipe", (h, w), n)
    assert layout.name == name and len(ref) == n == len(layout.anchors)
    assert np.allclose(layout.anchors[:, [1, 0]], ref, atol=1e-6)  # every centre, in order
    assert np.all(layout.anchors[:, 2:] == 1.0)  # fixed_anchor_size


def _fixture_specs():
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "tools", "make_mediapipe_models.py")
    spec = importlib.util.spec_from_file_location("make_mediapipe_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # TensorFlow is imported only to make them, not to read SPECS
    return module.SPECS


FIXTURE_LAYOUTS = {"mediapipe_face_full_range": "mediapipe face full range",
                   "mediapipe_face_back_camera": "mediapipe face back camera",
                   "mediapipe_palm": "mediapipe palm", "mediapipe_pose": "mediapipe pose"}


@pytest.mark.parametrize("name", sorted(FIXTURE_LAYOUTS))
def test_other_mediapipe_detectors_run_without_a_code_change(models_dir, tmp_path, name):
    """Models with MediaPipe's face full range, back camera, palm and pose inputs and outputs (made by
    tools/make_mediapipe_models.py: one known anchor lights up on a bright image) through `batch-detect run`:
    the box and keypoints are where that anchor, found by the reference anchors calculator, puts them."""
    import subprocess
    import sys

    h, w, n, k, anchor, box, points = _fixture_specs()[name]
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (300, 200), (255, 255, 255)).save(images / "white.png")
    Image.new("RGB", (300, 200), (0, 0, 0)).save(images / "black.png")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "batch_detect", "run", "--model",
                           os.path.join(models_dir, f"{name}.tflite"), "--input", str(images), "--output", str(out),
                           "--score-threshold", "0.5"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = duckdb.execute(f"""SELECT regexp_extract(uri, '[^/]+$'), class_id, score, [xmin, ymin, xmax, ymax],
                              keypoints FROM read_parquet('{out}/detections/*.parquet')""").fetchall()
    assert [r[:2] for r in rows] == [("white.png", 0)], rows  # nothing on the black image
    _, _, score, got_box, got_points = rows[0]
    published = PUBLISHED[FIXTURE_LAYOUTS[name]]
    assert (h, w) == published[0] and n == published[3]
    ax, ay = _ref_ssd_anchors_calculator(h, w, published[1], published[2])[anchor]
    cx, cy, bw, bh = ax + box[0] / w, ay + box[1] / h, box[2] / w, box[3] / h
    assert score == pytest.approx(1 / (1 + math.exp(-10)), abs=1e-5)
    assert np.allclose(got_box, [cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], atol=1e-5), (got_box, ax, ay)
    assert len(got_points) == k
    assert np.allclose([(p["x"], p["y"]) for p in got_points], [(ax + x / w, ay + y / h) for x, y in points],
                       atol=1e-5)


def test_report_gallery_draws_the_keypoints(realworld, tmp_path):
    """`batch-detect report`'s gallery marks each face's keypoints (white dots ringed in the box colour) where
    the detections table puts them, on the photos as they were read back."""
    import re

    from batch_detect.commands.report import KEYPOINT_FILL, summarize, write_html

    out = tmp_path / "out"
    _face_job(realworld, out)
    best = _best_rows(out)
    folder = tmp_path / "html"
    write_html(summarize(str(out)), str(folder))
    page = (folder / "index.html").read_text()
    checked = 0
    for src, uri in re.findall(r'<img src="(gallery/[^"]+)" alt="([^"]+)"', page):
        photo = os.path.basename(uri)
        if photo not in best:
            continue
        drawn = np.asarray(Image.open(folder / src).convert("RGB")).astype(int)
        original = np.asarray(Image.open(os.path.join(realworld, "images", photo)).convert("RGB")
                              .resize((drawn.shape[1], drawn.shape[0]))).astype(int)
        h, w, _ = drawn.shape
        for p in best[photo][3]:
            x, y = int(p["x"] * w), int(p["y"] * h)
            assert (drawn[y, x] == KEYPOINT_FILL).all(), (photo, p, drawn[y, x])
            assert not (original[y, x] == KEYPOINT_FILL).all()  # the dot is the gallery's, not the photo's
            checked += 1
    assert checked == 12, checked  # six keypoints on each of the two faces
