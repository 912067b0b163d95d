"""Check the fixture detectors on the seeded validation set: recall and precision at IoU >= 0.5 (class
must match), per model and resize mode. Standalone: numpy, Pillow and ai-edge-litert, no TensorFlow,
and nothing from the pipeline except the shared resize (``batch_detect.geometry``) and scene drawing.

    PYTHONPATH=. python tools/check_fixture_models.py [--models models/] [--min-recall 0.9]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from batch_detect.geometry import resize_to_input  # noqa: E402
from batch_detect.synthetic import write_dataset  # noqa: E402

MODELS = ("shapes_ssd_float32.tflite", "shapes_ssd_uint8.tflite")
MODES = ("stretch", "letterbox")
ROLES = ("boxes", "classes", "scores", "count")  # TFLite_Detection_PostProcess outputs 0..3


class Model:
    def __init__(self, path: str, raw_uint8: bool = False):
        self.raw_uint8 = raw_uint8
        from ai_edge_litert.interpreter import Interpreter

        self.interp = Interpreter(model_path=path, num_threads=2)
        self.interp.allocate_tensors()
        self.input = self.interp.get_input_details()[0]
        _, self.height, self.width, _ = (int(v) for v in self.input["shape"])
        # Outputs by the suffix of their name (op order), never by position: the TF2 export scrambles it.
        self.outputs = {}
        for d in self.interp.get_output_details():
            match = re.search(r":(\d+)$", d["name"])
            self.outputs[ROLES[int(match.group(1)) if match else 0]] = d["index"]
        if set(self.outputs) != set(ROLES):
            raise SystemExit(f"{path}: cannot name the outputs {[d['name'] for d in self.interp.get_output_details()]}")

    def feed(self, pixels: np.ndarray) -> np.ndarray:
        real = pixels.astype(np.float32) / 127.5 - 1.0  # what the float model takes
        if self.input["dtype"] == np.float32:
            return real[None]
        if self.raw_uint8 and self.input["dtype"] == np.uint8:
            return pixels.astype(np.uint8)[None]  # what the pipeline feeds when scale ~ 1/127.5
        scale, zero_point = self.input["quantization"]
        info = np.iinfo(self.input["dtype"])
        q = np.clip(np.round(real / scale + zero_point), info.min, info.max)
        return q.astype(self.input["dtype"])[None]

    def detect(self, image: Image.Image, mode: str, threshold: float):
        resized, placement = resize_to_input(image, self.width, self.height, mode)
        self.interp.set_tensor(self.input["index"], self.feed(np.asarray(resized)))
        self.interp.invoke()
        out = {role: self.interp.get_tensor(index) for role, index in self.outputs.items()}
        n = int(out["count"].reshape(-1)[0])
        boxes = out["boxes"].reshape(-1, 4)[:n]
        classes = out["classes"].reshape(-1)[:n].astype(int)
        scores = out["scores"].reshape(-1)[:n]
        keep = scores >= threshold
        return placement.to_image(boxes[keep]), classes[keep], scores[keep]


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of one yxyx box against [N,4] yxyx boxes."""
    ih = np.clip(np.minimum(a[2], b[:, 2]) - np.maximum(a[0], b[:, 0]), 0, None)
    iw = np.clip(np.minimum(a[3], b[:, 3]) - np.maximum(a[1], b[:, 1]), 0, None)
    inter = ih * iw
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    return inter / np.maximum(union, 1e-12)


def evaluate(model: Model, folder: str, truth: dict, mode: str, threshold: float) -> tuple[float, float]:
    tp = n_true = n_pred = 0
    for name, gts in truth.items():
        with Image.open(os.path.join(folder, name)) as im:
            image = im.convert("RGB")
        boxes, classes, _ = model.detect(image, mode, threshold)
        n_true += len(gts)
        n_pred += len(boxes)
        used = np.zeros(len(boxes), bool)
        # Greedy matching, one prediction per object: same class, IoU >= 0.5.
        for gt in gts:
            if len(boxes) == 0:
                break
            ious = iou(np.array([gt.ymin, gt.xmin, gt.ymax, gt.xmax]), boxes)
            ious[(classes != gt.class_id) | used] = 0
            j = int(ious.argmax())
            if ious[j] >= 0.5:
                used[j] = True
                tp += 1
    return tp / max(n_true, 1), tp / max(n_pred, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=os.path.join(ROOT, "models"))
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--score-threshold", type=float, default=0.3)
    parser.add_argument("--min-recall", type=float, default=0.9)
    parser.add_argument("--min-precision", type=float, default=0.8)
    parser.add_argument("--raw-uint8", action="store_true",
                        help="feed raw 0..255 pixels to uint8 inputs instead of quantizing x/127.5-1")
    args = parser.parse_args()
    ok = True
    with tempfile.TemporaryDirectory() as folder:
        truth = write_dataset(folder, args.count, seed=args.seed)
        print(f"{sum(map(len, truth.values()))} objects in {len(truth)} images (seed {args.seed}), "
              f"score threshold {args.score_threshold}")
        print(f"{'model':<28} {'resize':<10} {'recall':>7} {'precision':>9}")
        for name in MODELS:
            model = Model(os.path.join(args.models, name), args.raw_uint8)
            for mode in MODES:
                recall, precision = evaluate(model, folder, truth, mode, args.score_threshold)
                ok &= recall >= args.min_recall and precision >= args.min_precision
                print(f"{name:<28} {mode:<10} {recall:7.3f} {precision:9.3f}", flush=True)
    print("OK" if ok else f"FAIL: recall < {args.min_recall} or precision < {args.min_precision}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
