"""Train fixture detectors for the other families the decoder supports, on the same synthetic shapes
as the SSD fixtures, and export them as TFLite. Deterministic (seeded).

    pip install -e '.[fixtures]'; PYTHONPATH=. python tools/make_family_models.py --out models/

- shapes_yolov8_float32.tflite: one output [1, 4+C, N] (xc, yc, w, h normalised 0..1, then per-class
  scores; no objectness), float32 input in 0..1.
- shapes_yolov8_int8.tflite: the same network, full-integer int8 (int8 input and output, post-training
  quantized with a representative dataset). Boxes and scores share the output's one scale, which is why
  this family's boxes are normalised (as Ultralytics' TFLite exports do).
- shapes_yolov5_float32.tflite: one output [1, N, 5+C] (xc, yc, w, h in input pixels, objectness, class
  scores), float32 input in 0..1: the pixel-box convention, where v8 covers the normalised one.
- shapes_ssd_tf1order_uint8.tflite: the committed SSD (weights read back from
  shapes_ssd_float32.tflite, never retrained) re-exported with its post-processing outputs returned in
  op order, so the names say ":0" boxes, ":1" classes, ":2" scores, ":3" count (TF1 order, where the
  committed SSDs use the TF2 export's reversed order); uint8 quantized with the same calibration images.
- shapes_effdet_lite_style_uint8.tflite: the same weights exported as a Model Maker EfficientDet-Lite
  model is: the graph takes 0..1 and normalises inside, so its uint8 input is quantized as 0..1
  (scale 1/255, zero point 0), with the post-processing op and TF2 (reversed) output naming, held as variables so the outputs are
  named "StatefulPartitionedCall:N" as Model Maker's are.

The YOLO-style networks are not real YOLOs, only their output layouts and conventions: the SSD fixture's
small conv backbone with anchor-free heads on three grids (16×16, 8×8, 4×4: N = 336 predictions, as
YOLOv8's P3-P5). Each object goes to the grid for its size, to the cells whose centres lie within one cell
of its centre (the cell holding it and its nearest neighbours, as YOLOv5 assigns); boxes are learned with
GIoU + L1, scores with a focal loss. As in make_fixture_models.py the weights are trained as variables and exported
as constants, so the TFLite files hold no resource variables.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixture_models as ssd  # noqa: E402  (the SSD fixture's data, constants and network)

SIZE = ssd.SIZE
NUM_CLASSES = ssd.NUM_CLASSES
# (out channels, stride): 64, 32, 32, 16, 16, 8, 8, 4 pixels square (the SSD fixture's backbone)
BACKBONE = ssd.LAYERS
# Prediction grids, as YOLOv8's P3/P4/P5: layer index -> grid size, and the object sizes (sqrt(w·h),
# normalised to the input) each one is responsible for, after the SSD fixture's anchor scales.
LEVELS = {4: 16, 6: 8, 7: 4}
SIZE_RANGES = {16: (0.0, 0.18), 8: (0.18, 0.34), 4: (0.34, 2.0)}
N = sum(g * g for g in LEVELS.values())  # 256 + 64 + 16 = 336 predictions


def _cells() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per prediction, flattened level by level, row-major: its cell centre (x, y) in cells, its grid size,
    and the index of its left-right mirror image (for flip augmentation)."""
    centres, grids, mirror = [], [], []
    base = 0
    for g in LEVELS.values():
        y, x = np.mgrid[0:g, 0:g]
        centres.append(np.stack([x.ravel(), y.ravel()], -1) + 0.5)
        grids.append(np.full(g * g, g))
        mirror.append(base + (y * g + (g - 1 - x)).ravel())
        base += g * g
    return (np.concatenate(centres).astype(np.float32), np.concatenate(grids).astype(np.float32)[:, None],
            np.concatenate(mirror))


CELLS, GRIDS, MIRROR = _cells()


def init_weights(rng: np.random.Generator, objectness: bool) -> list[np.ndarray]:
    ws = []
    cin = 3
    for cout, _ in BACKBONE:
        ws += [rng.normal(0, np.sqrt(2 / (9 * cin)), (3, 3, cin, cout)).astype(np.float32), np.zeros(cout, np.float32)]
        cin = cout
    scores = int(objectness) + NUM_CLASSES
    for idx in LEVELS:  # per level, a 3x3 box conv and a 3x3 score conv, as the SSD fixture's heads
        c = BACKBONE[idx][0]
        ws += [rng.normal(0, 0.01, (3, 3, c, 4)).astype(np.float32), np.zeros(4, np.float32)]
        # prior 1% foreground (objectness or class scores): a stable focal-loss start
        ws += [rng.normal(0, 0.01, (3, 3, c, scores)).astype(np.float32), np.full(scores, -4.6, np.float32)]
    return ws


def network(x, ws):
    """x: [B,128,128,3] in [0,1] → raw predictions [B, N, 4 (+1) + C], level by level, row-major."""
    k = 0
    feats = {}
    for li, (_, stride) in enumerate(BACKBONE):
        x = tf.nn.relu6(tf.nn.conv2d(x, ws[k], stride, "SAME") + ws[k + 1])
        k += 2
        feats[li] = x
    out = []
    for idx, g in LEVELS.items():
        b = tf.nn.conv2d(feats[idx], ws[k], 1, "SAME") + ws[k + 1]
        c = tf.nn.conv2d(feats[idx], ws[k + 2], 1, "SAME") + ws[k + 3]
        k += 4
        out.append(tf.reshape(tf.concat([b, c], -1), [-1, g * g, b.shape[-1] + c.shape[-1]]))
    return tf.concat(out, 1)


def decode_boxes(raw):
    """raw [B,N,≥4] → xc, yc, w, h normalised to the input: centres within ±2 cells of their cell."""
    xy = (CELLS + 2.0 * tf.tanh(raw[..., :2])) / GRIDS
    wh = tf.sigmoid(raw[..., 2:4])
    return tf.concat([xy, wh], -1)


def targets(yxyx_list: list[np.ndarray], cls_list: list[np.ndarray]):
    """Per image: positive predictions [N], their box (xc,yc,w,h) [N,4] and one-hot class [N,C]. An object
    belongs to the level for its size, where a cell is positive when the object's centre is less than one
    cell away on both axes (the cell holding it and its nearest neighbours; the nearest object wins)."""
    n = len(yxyx_list)
    pos = np.zeros((n, N), np.float32)
    box = np.zeros((n, N, 4), np.float32)
    onehot = np.zeros((n, N, NUM_CLASSES), np.float32)
    for i, (yxyx, cls) in enumerate(zip(yxyx_list, cls_list)):
        best = np.full(N, np.inf, np.float32)
        for (y0, x0, y1, x1), c in zip(yxyx, cls):
            xc, yc, w, h = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
            g = next(g for g, (lo, hi) in SIZE_RANGES.items() if lo <= np.sqrt(w * h) < hi)
            d = np.abs(CELLS - np.array([xc, yc], np.float32) * GRIDS)  # [N,2] in cells of each level
            dist = np.hypot(d[:, 0], d[:, 1])
            take = (GRIDS[:, 0] == g) & (d.max(-1) < 1.0) & (dist < best)
            best[take] = dist[take]
            pos[i, take] = 1
            box[i, take] = (xc, yc, w, h)
            onehot[i, take] = 0
            onehot[i, take, c] = 1
    return pos, box, onehot


def build_dataset(seed: int, count: int):
    xs = np.zeros((count, SIZE, SIZE, 3), np.uint8)
    boxes, classes = [], []
    for i in range(count):
        xs[i], yxyx, cls = ssd.sample(seed, i)
        boxes.append(yxyx)
        classes.append(cls)
    return (xs, *targets(boxes, classes))


def giou(a, b):
    """a, b: [..., 4] xc, yc, w, h → (IoU, GIoU)."""
    a0, a1 = a[..., :2] - a[..., 2:] / 2, a[..., :2] + a[..., 2:] / 2
    b0, b1 = b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2
    inter = tf.reduce_prod(tf.maximum(tf.minimum(a1, b1) - tf.maximum(a0, b0), 0.0), -1)
    union = tf.reduce_prod(a[..., 2:], -1) + tf.reduce_prod(b[..., 2:], -1) - inter
    iou = inter / (union + 1e-9)
    hull = tf.reduce_prod(tf.maximum(a1, b1) - tf.minimum(a0, b0), -1)
    return iou, iou - (hull - union) / (hull + 1e-9)


def focal(logits, labels):
    p = tf.sigmoid(logits)
    ce = tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)
    pt = labels * p + (1 - labels) * (1 - p)
    alpha = labels * 0.25 + (1 - labels) * 0.75
    return alpha * (1 - pt) ** 2 * ce


def loss_fn(ws, x, pos, box, onehot, objectness: bool):
    raw = network(tf.cast(x, tf.float32) / 255.0, ws)
    npos = tf.maximum(tf.reduce_sum(pos), 1.0)
    pred = decode_boxes(raw)
    _, g = giou(pred, box)
    l1 = tf.reduce_sum(tf.abs(pred - box), -1) * 5.0
    box_loss = tf.reduce_sum(((1.0 - g) + l1) * pos) / npos
    if objectness:  # YOLOv5: objectness over every cell, classes on the positives only
        obj_loss = tf.reduce_sum(focal(raw[..., 4], pos)) / npos
        ce = tf.nn.sigmoid_cross_entropy_with_logits(labels=onehot, logits=raw[..., 5:])
        cls_loss = tf.reduce_sum(tf.reduce_sum(ce, -1) * pos) / npos
        return box_loss + obj_loss + cls_loss
    return box_loss + tf.reduce_sum(focal(raw[..., 4:], onehot)) / npos  # YOLOv8: per-class scores only


def train(seed: int, count: int, epochs: int, batch: int, objectness: bool, data):
    tf.random.set_seed(seed)
    rng = np.random.default_rng([seed, int(objectness)])
    t0 = time.time()
    ws = [tf.Variable(w) for w in init_weights(rng, objectness)]
    steps = epochs * (count // batch)
    opt = tf.keras.optimizers.Adam(tf.keras.optimizers.schedules.CosineDecay(2e-3, steps, alpha=0.02))

    @tf.function(reduce_retracing=True)
    def step(x, pos, box, onehot):
        with tf.GradientTape() as tape:
            loss = loss_fn(ws, x, pos, box, onehot, objectness)
        opt.apply_gradients(zip(tape.gradient(loss, ws), ws))
        return loss

    xs, pos, box, onehot = data
    for epoch in range(epochs):
        order = rng.permutation(count)
        losses = []
        for s in range(count // batch):
            idx = np.sort(order[s * batch:(s + 1) * batch])
            xb, pb, bb, ob = xs[idx], pos[idx], box[idx].copy(), onehot[idx]
            if rng.random() < 0.5:  # mild brightness jitter, as for the SSD fixtures
                xb = np.clip(xb.astype(np.int16) + int(rng.integers(-20, 21)), 0, 255).astype(np.uint8)
            if rng.random() < 0.5:  # mirror left-right: images, cells and box centres together
                xb, pb, bb, ob = xb[:, :, ::-1], pb[:, MIRROR], bb[:, MIRROR], ob[:, MIRROR]
                bb[..., 0] = np.where(pb > 0, 1.0 - bb[..., 0], 0.0)
            losses.append(float(step(xb, pb, bb, ob)))
        print(f"epoch {epoch + 1}/{epochs}: loss {np.mean(losses):.4f} ({time.time() - t0:.0f}s)", flush=True)
    return [w.numpy() for w in ws]


def _convert(module, fn, out_path: str, quantize=None) -> None:
    concrete = fn.get_concrete_function(tf.TensorSpec([1, SIZE, SIZE, 3], tf.float32, name="image"))
    saved = out_path + "._saved_model_tmp"
    tf.saved_model.save(module, saved, signatures=concrete)
    converter = tf.lite.TFLiteConverter.from_saved_model(saved)
    if quantize is not None:
        quantize(converter)
    with open(out_path, "wb") as fh:
        fh.write(converter.convert())
    tf.io.gfile.rmtree(saved)


def export_yolo(weights, calibration: np.ndarray, out: str, objectness: bool) -> list[str]:
    consts = [tf.constant(w) for w in weights]

    class Yolo(tf.Module):
        @tf.function
        def detect(self, image):
            raw = network(image, consts)
            xywh = decode_boxes(raw)
            if objectness:  # YOLOv5: [1, N, 5+C], boxes in input pixels
                pred = tf.concat([xywh * float(SIZE), tf.sigmoid(raw[..., 4:])], -1)
                return pred
            pred = tf.concat([xywh, tf.sigmoid(raw[..., 4:])], -1)  # YOLOv8: [1, 4+C, N], normalised
            return tf.transpose(pred, [0, 2, 1])

    module = Yolo()
    if objectness:
        path = os.path.join(out, "shapes_yolov5_float32.tflite")
        _convert(module, module.detect, path)
        return [path]
    path = os.path.join(out, "shapes_yolov8_float32.tflite")
    _convert(module, module.detect, path)

    def representative():
        for i in range(min(300, len(calibration))):
            yield [calibration[i:i + 1].astype(np.float32) / 255.0]

    def full_int8(converter):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8

    int8_path = os.path.join(out, "shapes_yolov8_int8.tflite")
    _convert(module, module.detect, int8_path, full_int8)
    return [path, int8_path]


def ssd_weights_from_tflite(path: str) -> list[np.ndarray]:
    """The committed SSD's weights, in make_fixture_models.init_weights order, read from its float32 file:
    each CONV_2D's filter (OHWI → HWIO) and bias, placed by the filter's shape (all distinct)."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(path)
    graph = model.subgraphs[0]
    codes = [c.builtinCode if c.builtinCode else c.deprecatedBuiltinCode for c in model.operatorCodes]

    def array(t: int) -> np.ndarray:
        tensor = graph.tensors[t]
        assert tensor.type == 0, "float32 weights expected"  # TensorType.FLOAT32
        return np.frombuffer(bytes(model.buffers[tensor.buffer].data), np.float32).reshape(tensor.shape).copy()

    found = {}
    for op in graph.operators:
        if codes[op.opcodeIndex] != 3:  # BuiltinOperator.CONV_2D
            continue
        filt = array(op.inputs[1]).transpose(1, 2, 3, 0)
        found[filt.shape] = (filt, array(op.inputs[2]))
    template = ssd.init_weights(np.random.default_rng(0))
    weights = []
    for k in range(0, len(template), 2):
        filt, bias = found.pop(template[k].shape)
        assert bias.shape == template[k + 1].shape
        weights += [filt, bias]
    assert not found, f"unplaced convolutions: {list(found)}"
    return weights


def export_ssd_tf1order(source_float: str, seed: int, out: str, effdet_style: bool = False) -> list[str]:
    """Re-export the committed SSD with TFLite_Detection_PostProcess outputs in op order (the TF1 naming),
    uint8 quantized with the calibration images the committed uint8 model was quantized with.

    `effdet_style`: as a Model Maker EfficientDet-Lite export instead: the graph takes 0..1 and normalises
    inside (so the uint8 input is quantized as 0..1, scale 1/255), outputs reversed (TF2 naming),
    weights held as variables (frozen by the converter) so the outputs are "StatefulPartitionedCall:N"."""
    consts = [tf.constant(w) for w in ssd_weights_from_tflite(source_float)]
    anchors = tf.constant(ssd.ANCHORS)

    @tf.function(experimental_implements=ssd.postprocess_signature())
    def detection_postprocess(box_encodings, class_predictions, anchor_boxes):
        # Placeholder body: the converter replaces this function by the TFLite custom op.
        return tuple(tf.constant(0.0, name=n) for n in ("boxes", "classes", "scores", "num_detections"))

    class Detector(tf.Module):
        def __init__(self):
            super().__init__()
            # Model Maker's SavedModel holds variables, so its signature calls StatefulPartitionedCall and the
            # TFLite outputs are named "StatefulPartitionedCall:N"; constants give "PartitionedCall:N".
            self.weights = [tf.Variable(w, trainable=False) for w in consts] if effdet_style else consts

        @tf.function
        def detect(self, image):
            box_encodings, logits = ssd.network(image * 2.0 - 1.0 if effdet_style else image, self.weights)
            scores = tf.sigmoid(logits)
            scores = tf.concat([tf.zeros_like(scores[..., :1]), scores], -1)
            outputs = detection_postprocess(box_encodings, scores, anchors)  # op order: not reversed
            return outputs[::-1] if effdet_style else outputs

    # make_fixture_models calibrates on the first 300 training images: sample(seed, 0..299)
    calibration = np.stack([ssd.sample(seed, i)[0] for i in range(300)])

    def representative():
        for i in range(len(calibration)):
            pixels = calibration[i:i + 1].astype(np.float32)
            yield [pixels / 255.0 if effdet_style else pixels / 127.5 - 1.0]

    def uint8(converter):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.inference_input_type = tf.uint8

    module = Detector()
    path = os.path.join(out, "shapes_effdet_lite_style_uint8.tflite" if effdet_style
                        else "shapes_ssd_tf1order_uint8.tflite")
    _convert(module, module.detect, path, uint8)
    return [path]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="models")
    parser.add_argument("--seed", type=int, default=20261125)
    parser.add_argument("--examples", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--only", choices=["yolov8", "yolov5", "ssd_tf1order", "effdet_style"], action="append",
                        help="build only these (repeatable); default: all")
    args = parser.parse_args()
    only = args.only or ["yolov8", "yolov5", "ssd_tf1order", "effdet_style"]
    os.makedirs(args.out, exist_ok=True)
    tf.config.experimental.enable_op_determinism()
    written = []
    t0 = time.time()
    if "ssd_tf1order" in only:
        written += export_ssd_tf1order(os.path.join(args.out, "shapes_ssd_float32.tflite"), args.seed, args.out)
    if "effdet_style" in only:
        written += export_ssd_tf1order(os.path.join(args.out, "shapes_ssd_float32.tflite"), args.seed, args.out,
                                       effdet_style=True)
    if {"yolov8", "yolov5"} & set(only):
        data = build_dataset(args.seed, args.examples)
        print(f"dataset: {args.examples} examples in {time.time() - t0:.0f}s", flush=True)
        for family in ("yolov8", "yolov5"):
            if family in only:
                objectness = family == "yolov5"
                weights = train(args.seed, args.examples, args.epochs, args.batch, objectness, data)
                written += export_yolo(weights, data[0], args.out, objectness)
    for path in written:
        print(os.path.basename(path), os.path.getsize(path), "bytes")
    print(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
