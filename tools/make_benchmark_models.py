"""Realistic-cost benchmark detectors with random (seeded) weights: each costs what the real network costs to
run, which is all a throughput benchmark needs.

- `ssd_mobilenet_v2_300_uint8.tflite`: SSD with a MobileNetV2 (alpha 1.0) backbone at 300x300, uint8
  post-training quantized, with the TFLite_Detection_PostProcess op (≈1.5 G ops).
- `yolov8n_style_320_float32.tflite`: YOLOv8n at 320x320, float32 compute with float16-stored weights (3.2 M parameters; the converter counts
  2.4 G ops with the element-wise ones, the real YOLOv8n's 8.7 GFLOPs at 640 being 2.2 at 320):
  CSPDarknet backbone (Conv-BN-SiLU folded into conv+bias+SiLU, C2f blocks, SPPF), PAN neck and decoupled
  head over strides 8/16/32, with the DFL box decoding (softmax over 16 bins, expectation, dist2bbox with
  anchors) in the graph like the real export. Input [1, 320, 320, 3] float32 in 0..1; output [1, 84, 2100]:
  xc, yc, w, h in pixels of the 320 input, then 80 sigmoid class scores (2100 = 40² + 20² + 10² anchors; the
  real TFLite export gives boxes normalised to 0..1, which the runtime reads as well). Weights are
  He-initialised, then each conv's folded batch-norm is fitted on 20 synthetic scenes like the benchmark's
  (per-channel zero mean, unit variance before SiLU) so activations stay in range; the class head is scaled
  and biased so that the median calibration scene has 10 anchors scoring 0.25 or more. Other scenes vary
  widely (0 to a few hundred such anchors; noise images light up all 2100), as random weights do.

Weights are frozen as constants (the TFLite files hold no resource variables). Both files (the default,
`--family all`), or one with `--family ssd` or `--family yolov8`; reproducible byte for byte with the same
TensorFlow (2.21 made the committed ones) and seeds (`--seed` overrides the per-family defaults):

    PYTHONPATH=. python tools/make_benchmark_models.py --out benchmarks/models/
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixture_models import postprocess_signature  # noqa: E402  (same op attributes)

SIZE = 300
NUM_CLASSES = 90
# MobileNetV2: (expansion, out channels, repeats, stride)
BLOCKS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
SEEDS = {"ssd": 300, "yolov8": 320}

YOLO_SIZE = 320
YOLO_CLASSES = 80
YOLO_STRIDES = (8, 16, 32)
REG_MAX = 16  # DFL bins per box side
YOLO_TARGET_CANDIDATES = 10  # anchors scoring >= 0.25 on the median calibration image
YOLO_SCORE_TEMPERATURE = 0.5  # class logits = 0.5 * (standardised head output) + bias: scores rarely saturate


def build(rng: np.random.Generator):
    def w(*shape):
        fan_in = np.prod(shape[:-1]) if len(shape) == 4 and shape[2] != 1 else shape[0] * shape[1]
        return tf.constant(rng.normal(0, np.sqrt(2.0 / fan_in), shape).astype(np.float32))

    def b(n):
        return tf.constant(np.zeros(n, np.float32))

    layers = []  # closures over constant weights
    stem = (w(3, 3, 3, 32), b(32))
    cin = 32
    for t, c, n, s in BLOCKS:
        for r in range(n):
            hidden = cin * t
            layers.append(dict(expand=(w(1, 1, cin, hidden), b(hidden)) if t != 1 else None,
                               dw=(w(3, 3, hidden, 1), b(hidden)), project=(w(1, 1, hidden, c), b(c)),
                               stride=s if r == 0 else 1, residual=(s == 1 and r > 0 and cin == c)))
            cin = c
    head_last = (w(1, 1, 320, 1280), b(1280))
    anchors_per_cell = 6
    # 1x1 heads, as SSDLite-MobileNetV2 uses light heads: the backbone dominates the cost
    heads = {19: (w(1, 1, 96, anchors_per_cell * 4), w(1, 1, 96, anchors_per_cell * (NUM_CLASSES + 1))),
             10: (w(1, 1, 1280, anchors_per_cell * 4), w(1, 1, 1280, anchors_per_cell * (NUM_CLASSES + 1)))}

    # SSD's extra feature layers after the backbone: 10x10 → 5 → 3 → 2 → 1 (1x1 reduce, 3x3 stride 2)
    extras = [(w(1, 1, 1280, 256), w(3, 3, 256, 512)), (w(1, 1, 512, 128), w(3, 3, 128, 256)),
              (w(1, 1, 256, 128), w(3, 3, 128, 256)), (w(1, 1, 256, 64), w(3, 3, 64, 128))]
    for grid, ch in ((5, 512), (3, 256), (2, 256), (1, 128)):
        heads[grid] = (w(1, 1, ch, anchors_per_cell * 4), w(1, 1, ch, anchors_per_cell * (NUM_CLASSES + 1)))

    def forward(x):
        x = tf.nn.relu6(tf.nn.conv2d(x, stem[0], 2, "SAME") + stem[1])
        feats = {}
        for layer in layers:
            y = x
            if layer["expand"] is not None:
                y = tf.nn.relu6(tf.nn.conv2d(y, layer["expand"][0], 1, "SAME") + layer["expand"][1])
            y = tf.nn.relu6(tf.nn.depthwise_conv2d(y, layer["dw"][0], [1, layer["stride"], layer["stride"], 1],
                                                   "SAME") + layer["dw"][1])
            y = tf.nn.conv2d(y, layer["project"][0], 1, "SAME") + layer["project"][1]
            x = x + y if layer["residual"] else y
            feats[x.shape[1]] = x if x.shape[-1] == 96 else feats.get(x.shape[1])
        x = tf.nn.relu6(tf.nn.conv2d(x, head_last[0], 1, "SAME") + head_last[1])
        feats[10] = x
        for reduce, expand in extras:
            x = tf.nn.relu6(tf.nn.conv2d(x, reduce, 1, "SAME"))
            x = tf.nn.relu6(tf.nn.conv2d(x, expand, 2, "SAME"))
            feats[x.shape[1]] = x
        boxes, scores = [], []
        for grid in (19, 10, 5, 3, 2, 1):
            f = feats[grid]
            bw, cw = heads[grid]
            boxes.append(tf.reshape(tf.nn.conv2d(f, bw, 1, "SAME"), [1, -1, 4]))
            scores.append(tf.reshape(tf.nn.conv2d(f, cw, 1, "SAME"), [1, -1, NUM_CLASSES + 1]))
        return tf.concat(boxes, 1), tf.sigmoid(tf.concat(scores, 1))

    anchors = []
    for grid, scale in ((19, 0.2), (10, 0.35), (5, 0.5), (3, 0.65), (2, 0.8), (1, 0.95)):
        for i in range(grid):
            for j in range(grid):
                for s in (scale, scale * 1.4):
                    for r in (1.0, 0.5, 2.0):
                        anchors.append(((i + 0.5) / grid, (j + 0.5) / grid, s / np.sqrt(r), s * np.sqrt(r)))
    return forward, tf.constant(np.array(anchors, np.float32))


def make_ssd(out: str, seed: int) -> str:
    rng = np.random.default_rng(seed)
    forward, anchors = build(rng)
    signature = postprocess_signature().replace('value { i: 3 }', f'value {{ i: {NUM_CLASSES} }}').replace(
        '"max_detections" value { i: 20 }', '"max_detections" value { i: 100 }')

    @tf.function(experimental_implements=signature)
    def detection_postprocess(box_encodings, class_predictions, anchor_boxes):
        return tuple(tf.constant(0.0, name=n) for n in ("boxes", "classes", "scores", "num_detections"))

    class Detector(tf.Module):
        @tf.function
        def detect(self, image):
            box_encodings, scores = forward(image)
            return detection_postprocess(box_encodings, scores, anchors)[::-1]

    module = Detector()
    concrete = module.detect.get_concrete_function(tf.TensorSpec([1, SIZE, SIZE, 3], tf.float32, name="image"))
    saved = os.path.join(out, "_saved_model_tmp")
    tf.saved_model.save(module, saved, signatures=concrete)
    converter = tf.lite.TFLiteConverter.from_saved_model(saved)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    data_rng = np.random.default_rng(seed + 1)
    converter.representative_dataset = lambda: (
        [data_rng.uniform(-1, 1, (1, SIZE, SIZE, 3)).astype(np.float32)] for _ in range(16))
    converter.inference_input_type = tf.uint8
    path = os.path.join(out, "ssd_mobilenet_v2_300_uint8.tflite")
    with open(path, "wb") as fh:
        fh.write(converter.convert())
    tf.io.gfile.rmtree(saved)
    return path


class YoloV8n:
    """YOLOv8n (width 0.25, depth 0.33) over float32 numpy weights: 63 convs, 3,151,888 parameters (the
    fused YOLOv8n's 3,151,904 less the DFL's fixed 0..15 conv). Each Conv is conv+bias+SiLU, a batch-norm
    folded in; one eager pass of `raw` with `calibrating` set fits every folded batch-norm to the
    statistics it sees (per-channel zero mean, unit variance before SiLU), in execution order."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.weights: list[list] = []  # [kernel, bias, has SiLU], in creation order
        self.calibrating = False
        c = [16, 32, 64, 128, 256]
        self.spec = dict(
            stem=[self._conv(3, c[0], 3), self._conv(c[0], c[1], 3)],
            c2f2=self._c2f(c[1], c[1], 1), down3=self._conv(c[1], c[2], 3), c2f3=self._c2f(c[2], c[2], 2),
            down4=self._conv(c[2], c[3], 3), c2f4=self._c2f(c[3], c[3], 2),
            down5=self._conv(c[3], c[4], 3), c2f5=self._c2f(c[4], c[4], 1),
            sppf=(self._conv(c[4], c[4] // 2, 1), self._conv(c[4] // 2 * 4, c[4], 1)),
            up4=self._c2f(c[4] + c[3], c[3], 1), up3=self._c2f(c[3] + c[2], c[2], 1),
            pan4_down=self._conv(c[2], c[2], 3), pan4=self._c2f(c[2] + c[3], c[3], 1),
            pan5_down=self._conv(c[3], c[3], 3), pan5=self._c2f(c[3] + c[4], c[4], 1))
        c2, c3 = max(16, c[2] // 4, REG_MAX * 4), max(c[2], min(YOLO_CLASSES, 100))  # 64, 80 as in Detect
        self.heads = [(self._conv(ch, c2, 3), self._conv(c2, c2, 3), self._conv(c2, 4 * REG_MAX, 1, act=False),
                       self._conv(ch, c3, 3), self._conv(c3, c3, 3), self._conv(c3, YOLO_CLASSES, 1, act=False))
                      for ch in (c[2], c[3], c[4])]

    def _conv(self, cin: int, cout: int, k: int, act: bool = True) -> int:
        fan_in = k * k * cin
        kernel = self.rng.normal(0, np.sqrt(2.0 / fan_in), (k, k, cin, cout)).astype(np.float32)
        self.weights.append([kernel, np.zeros(cout, np.float32), act])
        return len(self.weights) - 1

    def _c2f(self, cin: int, cout: int, n: int) -> tuple:
        h = cout // 2
        return (self._conv(cin, 2 * h, 1), [(self._conv(h, h, 3), self._conv(h, h, 3)) for _ in range(n)],
                self._conv((2 + n) * h, cout, 1))

    def conv(self, x, i: int, stride: int = 1):
        kernel, bias, act = self.weights[i]
        if stride == 2:  # PyTorch's symmetric padding 1, as the real export's PAD + VALID conv
            x = tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
        y = tf.nn.conv2d(x, kernel, stride, "VALID" if stride == 2 else "SAME")
        if self.calibrating and act:  # fold a batch-norm that normalises what this conv sees here
            std = coarse(tf.math.reduce_std(y, [0, 1, 2]).numpy() + 1e-6)
            shift = np.round(-tf.reduce_mean(y, [0, 1, 2]).numpy() / std * 16) / 16
            self.weights[i][:2] = [(kernel / std).astype(np.float32), shift.astype(np.float32)]
            y, bias = y / std, self.weights[i][1]
        y = tf.nn.bias_add(y, bias)
        return y * tf.sigmoid(y) if act else y

    def c2f(self, x, block, shortcut: bool):
        cv1, bottlenecks, cv2 = block
        ys = tf.split(self.conv(x, cv1), 2, axis=-1)
        for a, b in bottlenecks:
            y = self.conv(self.conv(ys[-1], a), b)
            ys.append(ys[-1] + y if shortcut else y)
        return self.conv(tf.concat(ys, -1), cv2)

    def raw(self, x):
        """[batch, 2100, 64 + 80]: DFL logits and class logits per anchor, levels 40², 20², 10² row-major."""
        s = self.spec
        x = self.conv(self.conv(x, s["stem"][0], 2), s["stem"][1], 2)
        x = self.c2f(x, s["c2f2"], True)
        p3 = self.c2f(self.conv(x, s["down3"], 2), s["c2f3"], True)
        p4 = self.c2f(self.conv(p3, s["down4"], 2), s["c2f4"], True)
        x = self.c2f(self.conv(p4, s["down5"], 2), s["c2f5"], True)
        x = self.conv(x, s["sppf"][0])
        pools = [x]
        for _ in range(3):
            pools.append(tf.nn.max_pool2d(pools[-1], 5, 1, "SAME"))
        p5 = self.conv(tf.concat(pools, -1), s["sppf"][1])

        def up(t):
            return tf.image.resize(t, [t.shape[1] * 2, t.shape[2] * 2], method="nearest")

        n4 = self.c2f(tf.concat([up(p5), p4], -1), s["up4"], False)
        o3 = self.c2f(tf.concat([up(n4), p3], -1), s["up3"], False)
        o4 = self.c2f(tf.concat([self.conv(o3, s["pan4_down"], 2), n4], -1), s["pan4"], False)
        o5 = self.c2f(tf.concat([self.conv(o4, s["pan5_down"], 2), p5], -1), s["pan5"], False)
        levels = []
        for f, (b1, b2, b3, c1, c2, c3) in zip((o3, o4, o5), self.heads):
            box = self.conv(self.conv(self.conv(f, b1), b2), b3)
            cls = self.conv(self.conv(self.conv(f, c1), c2), c3)
            levels.append(tf.reshape(tf.concat([box, cls], -1), [x.shape[0], -1, 4 * REG_MAX + YOLO_CLASSES]))
        return tf.concat(levels, 1)

    def __call__(self, x):
        """[1, 84, 2100]: xc, yc, w, h in input pixels, then sigmoid class scores, as the real export."""
        raw = self.raw(x)
        n = raw.shape[1]
        box, cls = raw[..., :4 * REG_MAX], raw[..., 4 * REG_MAX:]
        # DFL: softmax over the 16 bins of each side, expectation as a 1x1 conv / matmul with 0..15
        bins = tf.nn.softmax(tf.reshape(box, [n * 4, REG_MAX]), axis=-1)
        dist = tf.reshape(tf.matmul(bins, np.arange(REG_MAX, dtype=np.float32)[:, None]), [1, n, 4])
        anchors, strides = yolo_anchors()
        lt, rb = dist[..., :2], dist[..., 2:]
        x1y1, x2y2 = anchors - lt, anchors + rb  # dist2bbox, xywh
        xywh = tf.concat([(x1y1 + x2y2) / 2, x2y2 - x1y1], -1) * strides
        return tf.transpose(tf.concat([xywh, tf.sigmoid(cls)], -1), [0, 2, 1])


def coarse(x):
    """Rounded to a quarter octave: calibration statistics that differ in their last bits between CPUs
    (oneDNN or not) give the same weights, so the file is the same bytes."""
    return np.exp2(np.round(np.log2(x) * 4) / 4)


def yolo_anchors() -> tuple[np.ndarray, np.ndarray]:
    """Grid-cell centres in grid units [2100, 2] (x, y) and each anchor's stride [2100, 1]."""
    points, strides = [], []
    for s in YOLO_STRIDES:
        g = YOLO_SIZE // s
        yy, xx = np.meshgrid(np.arange(g) + 0.5, np.arange(g) + 0.5, indexing="ij")
        points.append(np.stack([xx.ravel(), yy.ravel()], -1))
        strides.append(np.full((g * g, 1), s))
    return np.concatenate(points).astype(np.float32), np.concatenate(strides).astype(np.float32)


def yolo_calibration_images(seed: int, count: int = 20) -> np.ndarray:
    """[count, 320, 320, 3] in 0..1: the benchmark's kind of image (synthetic scenes of several sizes,
    stretched to the input) that the folded batch-norms are fitted to."""
    from PIL import Image

    from batch_detect.synthetic import draw_scene

    rng = np.random.default_rng(seed)
    sizes = [(640, 480), (1280, 720), (1920, 1080), (1024, 768), (800, 600)]  # as benchmarks/bench.py
    images = [draw_scene(rng, *sizes[i % len(sizes)])[0].resize((YOLO_SIZE, YOLO_SIZE), Image.BILINEAR)
              for i in range(count)]
    return np.stack([np.asarray(im, np.float32) / 255.0 for im in images])


def make_yolov8(out: str, seed: int) -> str:
    rng = np.random.default_rng(seed)
    model = YoloV8n(rng)
    model.calibrating = True
    logits = model.raw(yolo_calibration_images(seed + 1)).numpy()[..., 4 * REG_MAX:]
    model.calibrating = False
    # class head: like a trained model's, mostly confident "no"; on the median calibration image,
    # YOLO_TARGET_CANDIDATES anchors score 0.25 or more (random weights: other images vary widely)
    last = [h[5] for h in model.heads]
    gain = YOLO_SCORE_TEMPERATURE / coarse(logits.std() + 1e-6)
    for i in last:
        model.weights[i][0] = (model.weights[i][0] * gain).astype(np.float32)
    per_image = -np.sort(-(logits * gain).max(-1), axis=1)[:, YOLO_TARGET_CANDIDATES - 1]
    bias = float(np.round((np.log(0.25 / 0.75) - np.median(per_image)) * 16) / 16)
    for i in last:
        model.weights[i][1] = np.full(YOLO_CLASSES, bias, np.float32)

    class Detector(tf.Module):
        @tf.function
        def detect(self, images):
            return {"output0": model(images)}

    module = Detector()
    concrete = module.detect.get_concrete_function(
        tf.TensorSpec([1, YOLO_SIZE, YOLO_SIZE, 3], tf.float32, name="images"))
    saved = os.path.join(out, "_saved_model_tmp")
    tf.saved_model.save(module, saved, signatures=concrete)
    converter = tf.lite.TFLiteConverter.from_saved_model(saved)
    # Weights stored as float16 (dequantized once, when the interpreter loads): half the file (12.7 MB as
    # float32, over the repository's 8 MiB per file) for the same float32 compute.
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]
    path = os.path.join(out, "yolov8n_style_320_float32.tflite")
    with open(path, "wb") as fh:
        fh.write(converter.convert())
    tf.io.gfile.rmtree(saved)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/models")
    parser.add_argument("--family", choices=("ssd", "yolov8", "all"), default="all")
    parser.add_argument("--seed", type=int, default=None,
                        help=f"weights seed (default per family: {', '.join(f'{k} {v}' for k, v in SEEDS.items())})")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    makers = {"ssd": make_ssd, "yolov8": make_yolov8}
    for family in (makers if args.family == "all" else [args.family]):
        path = makers[family](args.out, SEEDS[family] if args.seed is None else args.seed)
        print(path, os.path.getsize(path), "bytes")


if __name__ == "__main__":
    main()
