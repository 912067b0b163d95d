"""A realistic-cost benchmark detector: SSD with a MobileNetV2 (alpha 1.0) backbone at 300x300, uint8
post-training quantized, with the TFLite_Detection_PostProcess op. Weights are random (seeded): it costs
what SSD-MobileNetV2 costs to run, which is all a throughput benchmark needs.

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/models")
    parser.add_argument("--seed", type=int, default=300)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(args.seed)
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
    saved = os.path.join(args.out, "_saved_model_tmp")
    tf.saved_model.save(module, saved, signatures=concrete)
    converter = tf.lite.TFLiteConverter.from_saved_model(saved)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    data_rng = np.random.default_rng(args.seed + 1)
    converter.representative_dataset = lambda: (
        [data_rng.uniform(-1, 1, (1, SIZE, SIZE, 3)).astype(np.float32)] for _ in range(16))
    converter.inference_input_type = tf.uint8
    path = os.path.join(args.out, "ssd_mobilenet_v2_300_uint8.tflite")
    with open(path, "wb") as fh:
        fh.write(converter.convert())
    tf.io.gfile.rmtree(saved)
    print(path, os.path.getsize(path), "bytes")


if __name__ == "__main__":
    main()
