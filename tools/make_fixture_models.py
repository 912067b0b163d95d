"""Train the fixture SSD detectors on synthetic shapes and export them as TFLite (TF2 path with the
TFLite_Detection_PostProcess op), float32 and uint8 post-training quantized. Deterministic (seeded).

    pip install -e '.[fixtures]'; PYTHONPATH=. python tools/make_fixture_models.py --out models/

The network is written in plain TF ops over a list of weights, trained with variables and exported with
the same weights as constants, so the TFLite file holds no resource variables.
"""

from __future__ import annotations

import argparse
import io
import os
import time

import numpy as np
import tensorflow as tf
from PIL import Image

from batch_detect.model.geometry import resize_to_input
from batch_detect.synthetic import CLASSES, draw_scene

SIZE = 128
NUM_CLASSES = len(CLASSES)
# (out channels, stride); feature maps are taken after the layers marked in FEATURES
LAYERS = [(16, 2), (24, 2), (24, 1), (48, 2), (48, 1), (64, 2), (64, 1), (96, 2)]
FEATURES = {4: 16, 6: 8, 7: 4}  # layer index -> grid size (stride 8, 16, 32)
ANCHOR_SCALES = {16: (0.10, 0.15), 8: (0.21, 0.29), 4: (0.39, 0.52)}
ANCHOR_RATIOS = (1.0, 0.6, 1.7)  # width / height
A = len(ANCHOR_RATIOS) * 2
SCALES = np.array([10.0, 10.0, 5.0, 5.0], np.float32)
MAX_DETECTIONS = 20
SOURCE_SIZES = [(320, 240), (240, 320), (256, 256), (320, 180), (180, 320), (300, 400), (400, 300),
                (360, 200), (288, 216), (224, 300)]


def make_anchors() -> np.ndarray:
    """[N, 4] (ycenter, xcenter, h, w), in the order the heads are flattened."""
    out = []
    for grid in (16, 8, 4):
        for i in range(grid):
            for j in range(grid):
                for s in ANCHOR_SCALES[grid]:
                    for r in ANCHOR_RATIOS:
                        out.append(((i + 0.5) / grid, (j + 0.5) / grid, s / np.sqrt(r), s * np.sqrt(r)))
    return np.array(out, np.float32)


ANCHORS = make_anchors()


def init_weights(rng: np.random.Generator) -> list[np.ndarray]:
    ws = []
    cin = 3
    for cout, _ in LAYERS:
        ws += [rng.normal(0, np.sqrt(2 / (9 * cin)), (3, 3, cin, cout)).astype(np.float32), np.zeros(cout, np.float32)]
        cin = cout
    for idx in FEATURES:
        c = LAYERS[idx][0]
        ws += [rng.normal(0, 0.01, (3, 3, c, A * 4)).astype(np.float32), np.zeros(A * 4, np.float32)]
        bias = np.full(A * NUM_CLASSES, -4.6, np.float32)  # prior 1% foreground: stable focal-loss start
        ws += [rng.normal(0, 0.01, (3, 3, c, A * NUM_CLASSES)).astype(np.float32), bias]
    return ws


def network(x, ws):
    """x: [B,128,128,3] in [-1,1] → (box encodings [B,N,4], class logits [B,N,C])."""
    feats = {}
    k = 0
    for li, (_, stride) in enumerate(LAYERS):
        x = tf.nn.relu6(tf.nn.conv2d(x, ws[k], stride, "SAME") + ws[k + 1])
        k += 2
        if li in FEATURES:
            feats[li] = x
    boxes, logits = [], []
    for li in FEATURES:
        f = feats[li]
        b = tf.nn.conv2d(f, ws[k], 1, "SAME") + ws[k + 1]
        c = tf.nn.conv2d(f, ws[k + 2], 1, "SAME") + ws[k + 3]
        k += 4
        boxes.append(tf.reshape(b, [-1, f.shape[1] * f.shape[2] * A, 4]))
        logits.append(tf.reshape(c, [-1, f.shape[1] * f.shape[2] * A, NUM_CLASSES]))
    return tf.concat(boxes, 1), tf.concat(logits, 1)


def iou_matrix(gt_yxyx: np.ndarray) -> np.ndarray:
    a = np.stack([ANCHORS[:, 0] - ANCHORS[:, 2] / 2, ANCHORS[:, 1] - ANCHORS[:, 3] / 2,
                  ANCHORS[:, 0] + ANCHORS[:, 2] / 2, ANCHORS[:, 1] + ANCHORS[:, 3] / 2], 1)
    y0 = np.maximum(a[:, None, 0], gt_yxyx[None, :, 0])
    x0 = np.maximum(a[:, None, 1], gt_yxyx[None, :, 1])
    y1 = np.minimum(a[:, None, 2], gt_yxyx[None, :, 2])
    x1 = np.minimum(a[:, None, 3], gt_yxyx[None, :, 3])
    inter = np.clip(y1 - y0, 0, None) * np.clip(x1 - x0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_g = (gt_yxyx[:, 2] - gt_yxyx[:, 0]) * (gt_yxyx[:, 3] - gt_yxyx[:, 1])
    return inter / (area_a[:, None] + area_g[None, :] - inter)


def encode_targets(gt_yxyx: np.ndarray, gt_cls: np.ndarray):
    """SSD targets: (box encodings [N,4], class one-hot [N,C], weights: 1 pos / 0 neg / -1 ignore)."""
    n = len(ANCHORS)
    enc = np.zeros((n, 4), np.float32)
    onehot = np.zeros((n, NUM_CLASSES), np.float32)
    state = np.zeros(n, np.float32)
    if len(gt_yxyx) == 0:
        return enc, onehot, state
    ious = iou_matrix(gt_yxyx)
    best_gt = ious.argmax(1)
    best_iou = ious.max(1)
    state[best_iou >= 0.4] = -1
    pos = best_iou >= 0.5
    pos[ious.argmax(0)] = True  # every object gets its best anchor
    best_gt[ious.argmax(0)] = np.arange(len(gt_yxyx))
    state[pos] = 1
    g = gt_yxyx[best_gt[pos]]
    an = ANCHORS[pos]
    gh, gw = g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
    gy, gx = g[:, 0] + gh / 2, g[:, 1] + gw / 2
    enc[pos] = np.stack([(gy - an[:, 0]) / an[:, 2], (gx - an[:, 1]) / an[:, 3],
                         np.log(gh / an[:, 2]), np.log(gw / an[:, 3])], 1) * SCALES
    onehot[pos, gt_cls[best_gt[pos]]] = 1
    return enc, onehot, state


def sample(seed: int, index: int):
    """One training example: a scene at a random source size, JPEG-compressed or not, fitted to the
    input by stretch or letterbox with the same code inference uses."""
    rng = np.random.default_rng([seed, index])
    w, h = SOURCE_SIZES[int(rng.integers(len(SOURCE_SIZES)))]
    image, boxes = draw_scene(rng, w, h)
    if rng.random() < 0.6:
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=int(rng.integers(70, 96)))
        image = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    mode = "letterbox" if rng.random() < 0.5 else "stretch"
    fitted, placement = resize_to_input(image, SIZE, SIZE, mode)
    yxyx = np.array([[b.ymin, b.xmin, b.ymax, b.xmax] for b in boxes], np.float32).reshape(-1, 4)
    yxyx = placement.to_input(yxyx) if len(yxyx) else yxyx
    cls = np.array([b.class_id for b in boxes], np.int64)
    return np.asarray(fitted, np.uint8), yxyx, cls


def build_dataset(seed: int, count: int):
    xs = np.zeros((count, SIZE, SIZE, 3), np.uint8)
    encs = np.zeros((count, len(ANCHORS), 4), np.float32)
    ones = np.zeros((count, len(ANCHORS), NUM_CLASSES), np.float32)
    states = np.zeros((count, len(ANCHORS)), np.float32)
    for i in range(count):
        x, yxyx, cls = sample(seed, i)
        xs[i] = x
        encs[i], ones[i], states[i] = encode_targets(yxyx, cls)
    return xs, encs, ones, states


def normalise(pixels):
    return tf.cast(pixels, tf.float32) / 127.5 - 1.0


def loss_fn(ws, x, enc, onehot, state):
    pred_box, logits = network(normalise(x), ws)
    pos = tf.cast(state > 0, tf.float32)
    valid = tf.cast(state >= 0, tf.float32)
    npos = tf.maximum(tf.reduce_sum(pos), 1.0)
    # sigmoid focal loss (alpha 0.25, gamma 2) over foreground classes
    p = tf.sigmoid(logits)
    ce = tf.nn.sigmoid_cross_entropy_with_logits(labels=onehot, logits=logits)
    pt = onehot * p + (1 - onehot) * (1 - p)
    alpha = onehot * 0.25 + (1 - onehot) * 0.75
    focal = tf.reduce_sum(alpha * (1 - pt) ** 2 * ce, -1)
    cls_loss = tf.reduce_sum(focal * valid) / npos
    box_loss = tf.reduce_sum(tf.reduce_sum(tf.keras.losses.huber(enc[..., None], pred_box[..., None]), -1) * pos)
    return cls_loss + box_loss / npos


def train(seed: int, count: int, epochs: int, batch: int):
    tf.random.set_seed(seed)
    rng = np.random.default_rng(seed)
    t0 = time.time()
    data = build_dataset(seed, count)
    print(f"dataset: {count} examples in {time.time() - t0:.0f}s", flush=True)
    ws = [tf.Variable(w) for w in init_weights(rng)]
    steps = epochs * (count // batch)
    schedule = tf.keras.optimizers.schedules.CosineDecay(2e-3, steps, alpha=0.02, warmup_target=None)
    opt = tf.keras.optimizers.Adam(schedule)

    @tf.function(reduce_retracing=True)
    def step(x, enc, onehot, state):
        with tf.GradientTape() as tape:
            loss = loss_fn(ws, x, enc, onehot, state)
        grads = tape.gradient(loss, ws)
        opt.apply_gradients(zip(grads, ws))
        return loss

    for epoch in range(epochs):
        order = rng.permutation(count)
        losses = []
        for s in range(count // batch):
            idx = np.sort(order[s * batch:(s + 1) * batch])
            xb = data[0][idx]
            if rng.random() < 0.5:  # mild brightness jitter keeps the float/uint8 models robust
                xb = np.clip(xb.astype(np.int16) + int(rng.integers(-20, 21)), 0, 255).astype(np.uint8)
            losses.append(float(step(xb, data[1][idx], data[2][idx], data[3][idx])))
        print(f"epoch {epoch + 1}/{epochs}: loss {np.mean(losses):.4f} ({time.time() - t0:.0f}s)", flush=True)
    return [w.numpy() for w in ws], data[0]


def postprocess_signature() -> str:
    attrs = [
        'name: "TFLite_Detection_PostProcess"',
        f'attr {{ key: "max_detections" value {{ i: {MAX_DETECTIONS} }} }}',
        'attr { key: "max_classes_per_detection" value { i: 1 } }',
        'attr { key: "use_regular_nms" value { b: false } }',
        'attr { key: "nms_score_threshold" value { f: 0.000001 } }',
        'attr { key: "nms_iou_threshold" value { f: 0.5 } }',
        'attr { key: "y_scale" value { f: 10.0 } }',
        'attr { key: "x_scale" value { f: 10.0 } }',
        'attr { key: "h_scale" value { f: 5.0 } }',
        'attr { key: "w_scale" value { f: 5.0 } }',
        f'attr {{ key: "num_classes" value {{ i: {NUM_CLASSES} }} }}',
    ]
    return " ".join(attrs)


def export(weights: list[np.ndarray], calibration: np.ndarray, out: str) -> None:
    consts = [tf.constant(w) for w in weights]
    anchors = tf.constant(ANCHORS)

    @tf.function(experimental_implements=postprocess_signature())
    def detection_postprocess(box_encodings, class_predictions, anchor_boxes):
        # Placeholder body: the converter replaces this function by the TFLite custom op.
        return tuple(tf.constant(0.0, name=n) for n in ("boxes", "classes", "scores", "num_detections"))

    class Detector(tf.Module):
        @tf.function
        def detect(self, image):
            box_encodings, logits = network(image, consts)
            scores = tf.sigmoid(logits)
            # column 0 is the background class the op skips
            scores = tf.concat([tf.zeros_like(scores[..., :1]), scores], -1)
            # As the TF2 Object Detection API export does, return the op's outputs reversed.
            return detection_postprocess(box_encodings, scores, anchors)[::-1]

    module = Detector()
    concrete = module.detect.get_concrete_function(tf.TensorSpec([1, SIZE, SIZE, 3], tf.float32, name="image"))
    saved = os.path.join(out, "_saved_model_tmp")
    tf.saved_model.save(module, saved, signatures=concrete)

    converter = tf.lite.TFLiteConverter.from_saved_model(saved)
    with open(os.path.join(out, "shapes_ssd_float32.tflite"), "wb") as fh:
        fh.write(converter.convert())

    def representative():
        for i in range(min(300, len(calibration))):
            yield [(calibration[i:i + 1].astype(np.float32) / 127.5 - 1.0)]

    converter = tf.lite.TFLiteConverter.from_saved_model(saved)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.inference_input_type = tf.uint8
    with open(os.path.join(out, "shapes_ssd_uint8.tflite"), "wb") as fh:
        fh.write(converter.convert())
    tf.io.gfile.rmtree(saved)

    with open(os.path.join(out, "shapes_labels.txt"), "w") as fh:
        fh.write("\n".join(CLASSES) + "\n")


def export_classifier(out: str, seed: int) -> None:
    """A tiny non-detector (image → 3 softmax scores) for the "not a detection model" checks."""
    rng = np.random.default_rng(seed)
    w = tf.constant(rng.normal(0, 0.1, (3, 3, 3, 8)).astype(np.float32))
    d = tf.constant(rng.normal(0, 0.1, (8, 3)).astype(np.float32))

    class Classifier(tf.Module):
        @tf.function
        def classify(self, image):
            x = tf.nn.relu(tf.nn.conv2d(image, w, 2, "SAME"))
            return tf.nn.softmax(tf.reduce_mean(x, [1, 2]) @ d)

    module = Classifier()
    concrete = module.classify.get_concrete_function(tf.TensorSpec([1, 64, 64, 3], tf.float32, name="image"))
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], module)
    with open(os.path.join(out, "not_a_detector.tflite"), "wb") as fh:
        fh.write(converter.convert())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="models")
    parser.add_argument("--seed", type=int, default=20261125)
    parser.add_argument("--examples", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    tf.config.experimental.enable_op_determinism()
    weights, images = train(args.seed, args.examples, args.epochs, args.batch)
    export(weights, images, args.out)
    export_classifier(args.out, args.seed)
    for name in ("shapes_ssd_float32.tflite", "shapes_ssd_uint8.tflite", "not_a_detector.tflite"):
        print(name, os.path.getsize(os.path.join(args.out, name)), "bytes")


if __name__ == "__main__":
    main()
