"""`batch-detect report`: terminal numbers, an HTML folder whose PNGs exist, and a gallery image with the
box drawn where the known synthetic object is (checked on pixels)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import duckdb
import numpy as np
import pytest
from PIL import Image

from batch_detect.config import RunConfig
from batch_detect.run.pipeline import run
from batch_detect.commands.report import colour
from batch_detect.synthetic import write_dataset
from helpers import iou, write_bad_inputs


@pytest.fixture(scope="module")
def reported(local_ray, models_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    images = root / "images"
    truth = write_dataset(str(images), 16, seed=55, sizes=((320, 240),))
    write_bad_inputs(str(images))
    out = root / "out"
    run(RunConfig(model=os.path.join(models_dir, "shapes_ssd_uint8.tflite"),
                  labels=os.path.join(models_dir, "shapes_labels.txt"), input=str(images), output=str(out),
                  score_threshold=0.5))
    html_dir = root / "html"
    result = subprocess.run([sys.executable, "-m", "batch_detect", "report", str(out), "--html", str(html_dir),
                             "--samples", "16"], capture_output=True, text=True, timeout=120)
    return truth, out, html_dir, result


def test_terminal_summary_and_html(reported):
    truth, out, html_dir, result = reported
    assert result.returncode == 0, result.stderr
    assert "16 processed, 3 failed" in result.stdout and "detections per class" in result.stdout
    assert "decode/empty_file 1" in result.stdout
    page = (html_dir / "index.html").read_text()
    sources = re.findall(r'src="([^"]+)"', page)
    assert "scores.png" in sources and len([s for s in sources if s.startswith("gallery/")]) >= 10
    for src in sources:
        assert (html_dir / src).is_file(), src
    assert "empty_file" in page and "bad_zero_bytes.jpg" in page


def test_gallery_box_is_drawn_where_the_object_is(reported):
    truth, out, html_dir, _ = reported
    page = (html_dir / "index.html").read_text()
    pairs = re.findall(r'<img src="(gallery/[^"]+)" alt="([^"]+)"', page)
    checked = 0
    for src, uri in pairs:
        gt = truth[os.path.basename(uri)]
        dets = duckdb.execute(f"""SELECT class_id, xmin, ymin, xmax, ymax FROM read_parquet('{out}/detections/*.parquet')
                                  WHERE uri = ?""", [uri]).fetchall()
        if len(gt) != 1 or len(dets) != 1:
            continue
        cid, x0, y0, x1, y1 = dets[0]
        g = gt[0]
        assert cid == g.class_id and iou((x0, y0, x1, y1), (g.xmin, g.ymin, g.xmax, g.ymax)) >= 0.5
        img = np.asarray(Image.open(html_dir / src).convert("RGB")).astype(int)
        h, w, _ = img.shape
        want = np.array(colour(cid))

        def drawn(x: float, y: float) -> bool:
            # the outline is drawn inward from the box edge, 2+ px wide
            xs, ys = int(round(x)), int(round(y))
            patch = img[max(ys - 2, 0): ys + 3, max(xs - 2, 0): xs + 3].reshape(-1, 3)
            return bool((np.abs(patch - want).sum(1) < 30).any())

        mid_x, mid_y = (x0 + x1) / 2 * w, (y0 + y1) / 2 * h
        assert drawn(x0 * w + 1, mid_y) and drawn(x1 * w - 2, mid_y), src  # left and right edges
        assert drawn(mid_x, y1 * h - 2), src  # bottom edge (the top carries the label)
        # and the ground-truth box's centre is inside the drawn rectangle, not on it
        assert x0 * w < (g.xmin + g.xmax) / 2 * w < x1 * w
        checked += 1
    assert checked >= 3, "too few single-object images to check"


def test_report_renders_in_headless_chromium(reported, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        msg = "Chromium is not installed (Debian package `chromium`); the screenshot check is not run"
        print(f"SKIP: {msg}")
        pytest.skip(msg)
    _, _, html_dir, _ = reported
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,1600",
                    f"file://{html_dir / 'index.html'}"], capture_output=True, timeout=120)
    assert shot.is_file()
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    # the page rendered images, not a blank page: some colourful pixels from the gallery
    assert (pixels.std(axis=2) > 40).mean() > 0.01
