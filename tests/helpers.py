"""Test helpers: ground-truth matching and a bad-input corpus drawn here, never downloaded."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def recall_precision(truth: dict, predicted: dict, threshold: float = 0.5) -> tuple[float, float]:
    """truth/predicted: {name: [(class_id, xmin, ymin, xmax, ymax), ...]}; greedy one-to-one matching."""
    tp = n_truth = n_pred = 0
    for name, gts in truth.items():
        preds = list(predicted.get(name, []))
        n_truth += len(gts)
        n_pred += len(preds)
        used = set()
        for gt in gts:
            best, best_j = threshold, None
            for j, p in enumerate(preds):
                if j in used or p[0] != gt[0]:
                    continue
                v = iou(gt[1:], p[1:])
                if v >= best:
                    best, best_j = v, j
            if best_j is not None:
                used.add(best_j)
                tp += 1
    return tp / max(n_truth, 1), tp / max(n_pred, 1)


def write_bad_inputs(folder: str) -> dict[str, str]:
    """Files that must become failure records: {file name: expected error_type}."""
    os.makedirs(folder, exist_ok=True)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    jpeg = buf.getvalue()
    files = {
        "bad_truncated.jpg": (jpeg[: len(jpeg) // 3], "corrupt_image"),
        "bad_zero_bytes.jpg": (b"", "empty_file"),
        "bad_text_named.jpg": (b"this is not an image, just text\n" * 10, "unidentified_image"),
    }
    for name, (data, _) in files.items():
        with open(os.path.join(folder, name), "wb") as fh:
            fh.write(data)
    return {name: etype for name, (_, etype) in files.items()}
