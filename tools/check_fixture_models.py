"""Check the fixture models the way the job runs them: recall and precision at IoU ≥ 0.5 on the
seeded validation set, per model and resize mode. No TensorFlow needed.

    python tools/check_fixture_models.py [--models models/] [--min-recall 0.9]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from batch_detect.model.detector import Detector  # noqa: E402
from batch_detect.model.geometry import box_iou as iou  # noqa: E402
from batch_detect.model.interpreter import load_backend, read_model  # noqa: E402
from batch_detect.synthetic import write_dataset  # noqa: E402


# The SSD fixtures (make_fixture_models.py), then the other families (make_family_models.py).
MODELS = ("shapes_ssd_float32.tflite", "shapes_ssd_uint8.tflite", "shapes_ssd_tf1order_uint8.tflite", "shapes_effdet_lite_style_uint8.tflite",
          "shapes_yolov8_float32.tflite", "shapes_yolov8_int8.tflite", "shapes_yolov5_float32.tflite")


def evaluate(model: str, folder: str, truth: dict, resize: str, threshold: float) -> tuple[float, float]:
    det = Detector(load_backend(), read_model(model), num_threads=2, score_threshold=threshold, resize=resize,
                   normalization="auto", max_pixels=10**8)
    tp = n_true = n_pred = 0
    for name, boxes in truth.items():
        with open(os.path.join(folder, name), "rb") as fh:
            d = det.process(name, fh.read()).detections
        preds = [(int(c), *map(float, b)) for c, b in zip(d.class_ids, d.boxes)]
        n_true += len(boxes)
        n_pred += len(preds)
        used: set[int] = set()
        for gt in boxes:
            g = (gt.xmin, gt.ymin, gt.xmax, gt.ymax)
            cands = [(iou(g, p[1:]), j) for j, p in enumerate(preds) if j not in used and p[0] == gt.class_id]
            best = max(cands, default=(0.0, None))
            if best[0] >= 0.5:
                used.add(best[1])
                tp += 1
    return tp / max(n_true, 1), tp / max(n_pred, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=os.path.join(ROOT, "models"))
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--score-threshold", type=float, default=0.3)
    parser.add_argument("--min-recall", type=float, default=0.9)
    parser.add_argument("--model", action="append", help="check only this file in --models (repeatable)")
    args = parser.parse_args()
    ok = True
    with tempfile.TemporaryDirectory() as folder:
        truth = write_dataset(folder, args.count, seed=1234)
        print(f"{'model':<34} {'resize':<10} {'recall':>7} {'precision':>9}")
        for model in args.model or MODELS:
            path = os.path.join(args.models, model)
            for resize in ("stretch", "letterbox"):
                r, p = evaluate(path, folder, truth, resize, args.score_threshold)
                ok &= r >= args.min_recall
                print(f"{model:<34} {resize:<10} {r:7.3f} {p:9.3f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
