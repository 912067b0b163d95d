"""The cheap decode paths keep accuracy (issues #14, #34): large photos decoded at a reduced JPEG scale (never
below what the resize keeps, turned photos included) and shrunk, by Pillow (reducing gap, bilinear) or by
fastjpeg (simplejpeg, OpenCV's area average), give the detections of the exact path (full decode, plain
bilinear resize) — on ground truth with the fixture models, and box for box with the real YOLOv8n."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

import batch_detect.model.geometry as geometry
from batch_detect.model import fastjpeg
from batch_detect.model.detector import Detector
from batch_detect.model.interpreter import load_backend, read_model
from batch_detect.synthetic import draw_scene, scene_rng
from conftest import SHARED
from helpers import recall_precision

LARGE = [(1920, 1080, "JPEG"), (4000, 3000, "JPEG"), (1280, 720, "JPEG"), (1920, 1080, "PNG"), (2400, 1600, "JPEG")]
FIXTURES = {  # model: resize mode, so that both modes and every input dtype are covered
    "shapes_ssd_uint8.tflite": "stretch",
    "shapes_yolov8_int8.tflite": "letterbox",
    "shapes_yolov5_float32.tflite": "letterbox",
    "shapes_yolov8_float32.tflite": "stretch",
}


def encode(img: Image.Image, fmt: str, turn: bool = False) -> bytes:
    """`turn`: stored on its side with EXIF orientation 6, as phones do, so it displays as `img`."""
    buf = io.BytesIO()
    if turn:
        exif = Image.Exif()
        exif[0x0112] = 6
        img.transpose(Image.ROTATE_90).save(buf, fmt, quality=90, exif=exif)
    else:
        img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


# "exact": full decode, plain bilinear; "pillow": Pillow's draft and reducing gap (where fastjpeg's packages are
# missing); "fast": what runs by default, fastjpeg where installed.
ARMS = ("exact", "pillow", "fast")


def detect(model: str, mode: str, images: dict[str, bytes], arm: str, monkeypatch, threshold=0.3) -> dict:
    """{name: [(class, xmin, ymin, xmax, ymax, score), ...]} by one of the ARMS."""
    with monkeypatch.context() as m:
        if arm == "exact":
            m.setattr(geometry, "REDUCING_GAP", None)
        if arm != "fast":
            m.setattr(fastjpeg, "ENABLED", False)
        det = Detector(load_backend(), read_model(model), num_threads=2, score_threshold=threshold, resize=mode,
                       normalization="auto", max_pixels=10**9, jpeg_draft=arm != "exact")
        out = {}
        for name, data in images.items():
            d = det.process(name, data).detections
            out[name] = [(int(c), *map(float, b), float(s)) for c, b, s in zip(d.class_ids, d.boxes, d.scores)]
    return out


@pytest.fixture(scope="module")
def large_scenes():
    images, truth = {}, {}
    for i in range(30):
        w, h, fmt = LARGE[i % len(LARGE)]
        img, boxes = draw_scene(scene_rng(4242, i), w, h)
        name = f"scene_{i}.{fmt.lower()}"
        images[name] = encode(img, fmt, turn=(i % 3 == 1 and fmt == "JPEG"))
        truth[name] = [(b.class_id, b.xmin, b.ymin, b.xmax, b.ymax) for b in boxes]
    return images, truth


@pytest.mark.parametrize("model", list(FIXTURES))
def test_fixtures_find_the_same_shapes_on_large_photos(models_dir, large_scenes, model, monkeypatch):
    images, truth = large_scenes
    mode = FIXTURES[model]
    scores = {}
    for arm in ARMS:
        found = detect(os.path.join(models_dir, model), mode, images, arm, monkeypatch)
        scores[arm] = recall_precision(truth, {k: [p[:5] for p in v] for k, v in found.items()})
    print(f"{model} ({mode}): recall/precision " + ", ".join(f"{a} {tuple(round(v, 3) for v in scores[a])}"
                                                             for a in ARMS) + f"; fastjpeg {fastjpeg.ENABLED}")
    for arm in ("pillow", "fast"):
        assert scores[arm][0] >= 0.9 and scores[arm][1] >= 0.8, arm
        assert scores[arm][0] >= scores["exact"][0] - 0.02 and scores[arm][1] >= scores["exact"][1] - 0.03, arm


@pytest.fixture(scope="module")
def enlarged_photos():
    folder = os.path.join(SHARED, "realworld", "images")
    if not os.path.isdir(folder):
        msg = f"{folder} is absent (CI provides ../shared/realworld); the real-model decode check is not run"
        print(f"SKIP: {msg}")
        pytest.skip(msg)
    photos = {}
    for name in sorted(os.listdir(folder)):
        img = Image.open(os.path.join(folder, name)).convert("RGB")
        for k in (2, 4):  # 1024 to 2400 pixels wide: 1/2 and 1/4 draft scales
            big = img.resize((img.width * k, img.height * k), Image.LANCZOS)
            photos[f"{name}x{k}"] = encode(big, "JPEG")
        photos[f"{name}x3 turned"] = encode(img.resize((img.width * 3, img.height * 3), Image.LANCZOS), "JPEG", True)
    return photos


@pytest.mark.parametrize("mode", ["stretch", "letterbox"])
def test_real_yolov8n_sees_the_same_on_large_photos(enlarged_photos, mode, monkeypatch):
    model = os.path.join(SHARED, "realworld", "yolov8n_int8.tflite")
    found = {arm: detect(model, mode, enlarged_photos, arm, monkeypatch, threshold=0.4) for arm in ARMS}
    for name in enlarged_photos:
        assert found["exact"][name], name
        want = max(found["exact"][name], key=lambda d: d[5])
        for arm in ("pillow", "fast"):
            got = max(found[arm][name], key=lambda d: d[5])
            print(f"{mode} {name}: exact {np.round(want, 3).tolist()} {arm} {np.round(got, 3).tolist()}")
            assert got[0] == want[0], (name, arm)
            assert got[5] == pytest.approx(want[5], abs=0.03), (name, arm)
            assert list(got[1:5]) == pytest.approx(list(want[1:5]), abs=0.02), (name, arm)
