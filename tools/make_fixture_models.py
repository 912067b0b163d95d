"""Train and export the fixture detection models in ``models/`` (needs TensorFlow; CPU is enough).

    PYTHONPATH=. python tools/make_fixture_models.py --out models/

Writes
  shapes_ssd_float32.tflite  SSD detector, float32 input [1,128,128,3] normalised to [-1,1] (x/127.5-1)
  shapes_ssd_uint8.tflite    the same network, full-integer quantized, uint8 input with its own scale/zero point
  shapes_labels.txt          circle, square, triangle
  not_a_detector.tflite      a tiny float32 classifier ([1,64,64,3] -> softmax [1,3]), no detection outputs

The detector is a small SSD: a plain conv backbone with stride-8/16/32 feature maps, 6 anchors per cell,
focal loss + Huber, trained from scratch on synthetic scenes from ``batch_detect.synthetic.draw_scene``
resized with ``batch_detect.geometry.resize_to_input`` (half stretch, half letterbox), so the pixels it
sees in training are the pixels the pipeline gives it. It is exported the way the TF2 Object Detection
API exports SSDs (export_tflite_graph_lib_tf2.py): a tf.Module whose function ends in an empty
``tf.function(experimental_implements="name: \\"TFLite_Detection_PostProcess\\" ...")`` that the converter
replaces with the real custom op. Nothing is downloaded; every run with the same arguments gives the
same training data and (with op determinism) the same weights.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from batch_detect.geometry import resize_to_input  # noqa: E402
from batch_detect.synthetic import CLASSES, DEFAULT_SIZES, draw_scene  # noqa: E402

INPUT_SIZE = 128
NUM_CLASSES = len(CLASSES)
SCALES = {"y_scale": 10.0, "x_scale": 10.0, "h_scale": 5.0, "w_scale": 5.0}
MAX_DETECTIONS = 20
NMS_SCORE_THRESHOLD = 1e-8
NMS_IOU_THRESHOLD = 0.5
# (feature map size, anchor sizes as fractions of the input). Objects span ~10%..42% of the input.
LEVELS = ((16, (0.10, 0.14)), (8, (0.20, 0.28)), (4, (0.38, 0.52)))
ASPECTS = (0.6, 1.0, 1.65)  # width / height: stretched 16:9 shapes are narrow, stretched 3:4 ones wide
ANCHORS_PER_CELL = len(LEVELS[0][1]) * len(ASPECTS)
POS_IOU, NEG_IOU = 0.5, 0.4
TRAIN_SEED = 20240611  # disjoint from the seeds tests and the check use for their images
ASPECT_CHOICES = sorted({round(w / h, 4) for w, h in DEFAULT_SIZES})


# ----------------------------------------------------------------------------------------- anchors


def make_anchors() -> np.ndarray:
    """[A,4] anchors in center-size form (ycenter, xcenter, h, w), normalised; order matches the heads."""
    out = []
    for n, sizes in LEVELS:
        centers = (np.arange(n, dtype=np.float64) + 0.5) / n
        cy, cx = np.meshgrid(centers, centers, indexing="ij")
        per_cell = []
        for s in sizes:
            for ar in ASPECTS:
                per_cell.append((s / np.sqrt(ar), s * np.sqrt(ar)))
        hw = np.array(per_cell)  # [K,2]
        grid = np.stack([cy, cx], -1).reshape(n * n, 1, 2)
        level = np.concatenate([np.broadcast_to(grid, (n * n, len(hw), 2)),
                                np.broadcast_to(hw[None], (n * n, len(hw), 2))], -1)
        out.append(level.reshape(-1, 4))
    return np.concatenate(out).astype(np.float32)


def encode_targets(anchors: np.ndarray, boxes: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SSD matching. boxes [K,4] yxyx in input space; labels [K] in 1..C.
    Returns cls [A] int8 (0 background, -1 ignore, 1..C) and box encodings [A,4] (ty,tx,th,tw)."""
    a_num = len(anchors)
    cls = np.zeros(a_num, np.int8)
    enc = np.zeros((a_num, 4), np.float32)
    if len(boxes) == 0:
        return cls, enc
    ay, ax, ah, aw = anchors.T
    a_yxyx = np.stack([ay - ah / 2, ax - aw / 2, ay + ah / 2, ax + aw / 2], -1)
    iy0 = np.maximum(a_yxyx[:, None, 0], boxes[None, :, 0])
    ix0 = np.maximum(a_yxyx[:, None, 1], boxes[None, :, 1])
    iy1 = np.minimum(a_yxyx[:, None, 2], boxes[None, :, 2])
    ix1 = np.minimum(a_yxyx[:, None, 3], boxes[None, :, 3])
    inter = np.clip(iy1 - iy0, 0, None) * np.clip(ix1 - ix0, 0, None)
    area_b = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    iou = inter / ((ah * aw)[:, None] + area_b[None, :] - inter)
    best_gt = iou.argmax(1)
    best_iou = iou.max(1)
    cls[best_iou >= NEG_IOU] = -1
    pos = best_iou >= POS_IOU
    # Every object gets at least its best anchor.
    forced = iou.argmax(0)
    best_gt[forced] = np.arange(len(boxes))
    pos[forced] = True
    cls[pos] = labels[best_gt[pos]]
    g = boxes[best_gt[pos]]
    gh, gw = g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
    gy, gx = g[:, 0] + gh / 2, g[:, 1] + gw / 2
    enc[pos, 0] = (gy - ay[pos]) / ah[pos] * SCALES["y_scale"]
    enc[pos, 1] = (gx - ax[pos]) / aw[pos] * SCALES["x_scale"]
    enc[pos, 2] = np.log(gh / ah[pos]) * SCALES["h_scale"]
    enc[pos, 3] = np.log(gw / aw[pos]) * SCALES["w_scale"]
    return cls, enc


# -------------------------------------------------------------------------------------------- data


def _scene_size(rng: np.random.Generator) -> tuple[int, int]:
    """Random image size: aspect ratios of DEFAULT_SIZES (and in between), landscape and portrait.
    Most are drawn small (cheap); a quarter at the pipeline's usual sizes (smoother after resizing)."""
    if rng.random() < 0.7:
        aspect = float(rng.choice(ASPECT_CHOICES))
    else:
        aspect = float(np.exp(rng.uniform(np.log(9 / 16), np.log(16 / 9))))
    long_side = rng.uniform(192, 448) if rng.random() < 0.75 else rng.uniform(448, 800)
    if aspect >= 1:
        return int(round(long_side)), max(16, int(round(long_side / aspect)))
    return max(16, int(round(long_side * aspect))), int(round(long_side))


def make_sample(args: tuple[int, int]):
    """Training image ``i`` (depends only on (seed, i)): uint8 [S,S,3], boxes yxyx in input space, labels."""
    seed, i = args
    rng = np.random.default_rng([seed, i])
    width, height = _scene_size(rng)
    image, truth = draw_scene(rng, width, height)
    if rng.random() < 0.5:  # the pipeline mostly reads JPEGs
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=int(rng.integers(75, 96)))
        buf.seek(0)
        from PIL import Image

        image = Image.open(buf).convert("RGB")
    mode = "stretch" if i % 2 == 0 else "letterbox"
    resized, placement = resize_to_input(image, INPUT_SIZE, INPUT_SIZE, mode)
    boxes = np.array([[b.ymin, b.xmin, b.ymax, b.xmax] for b in truth], np.float32).reshape(-1, 4)
    boxes = placement.to_input(boxes)
    labels = np.array([b.class_id + 1 for b in truth], np.int8)
    return np.asarray(resized, np.uint8), boxes, labels


def make_dataset(count: int, seed: int, workers: int):
    anchors = make_anchors()
    images = np.empty((count, INPUT_SIZE, INPUT_SIZE, 3), np.uint8)
    cls = np.empty((count, len(anchors)), np.int8)
    enc = np.empty((count, len(anchors), 4), np.float16)
    jobs = [(seed, i) for i in range(count)]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) as pool:
        for i, (img, boxes, labels) in enumerate(pool.imap(make_sample, jobs, chunksize=64)):
            images[i] = img
            cls[i], e = encode_targets(anchors, boxes, labels)
            enc[i] = e
    return images, cls, enc


# ------------------------------------------------------------------------------------------- model


# (filters, stride, feature level fed to the heads or None)
BACKBONE = ((16, 2, None), (32, 2, None), (32, 1, None), (64, 2, None), (64, 1, None), (64, 1, 0),
            (96, 2, None), (96, 1, 1), (80, 2, None), (80, 1, 2))
BN_EPS = 1e-3


def build_network(tf):
    """Input [B,S,S,3] in [-1,1] -> (box encodings [B,A,4], class logits [B,A,C])."""
    L = tf.keras.layers
    inp = tf.keras.Input((INPUT_SIZE, INPUT_SIZE, 3))
    x, feats = inp, []
    for i, (filters, stride, level) in enumerate(BACKBONE):
        x = L.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = L.BatchNormalization(epsilon=BN_EPS, name=f"bn{i}")(x)
        x = L.ReLU(6.0)(x)
        if level is not None:
            feats.append(x)
    boxes, logits = [], []
    prior = -np.log((1 - 0.01) / 0.01)
    for j, (feat, (n, _)) in enumerate(zip(feats, LEVELS)):
        b = L.Conv2D(ANCHORS_PER_CELL * 4, 3, padding="same", name=f"box{j}")(feat)
        c = L.Conv2D(ANCHORS_PER_CELL * NUM_CLASSES, 3, padding="same", name=f"cls{j}",
                     bias_initializer=tf.keras.initializers.Constant(prior))(feat)
        boxes.append(L.Reshape((n * n * ANCHORS_PER_CELL, 4))(b))
        logits.append(L.Reshape((n * n * ANCHORS_PER_CELL, NUM_CLASSES))(c))
    return tf.keras.Model(inp, [L.Concatenate(1)(boxes), L.Concatenate(1)(logits)], name="shapes_ssd")


def frozen_forward(tf, model):
    """The trained network as plain TF ops over constants (batch norm folded into the convolutions).

    The exported module must hold no variables: the TFLite converter keeps Keras 3 variables as
    resource variables (READ_VARIABLE ops) instead of freezing them, which breaks quantization, and
    freezing the graph afterwards would inline away the TFLite_Detection_PostProcess function."""
    params = []
    for i, (_, stride, level) in enumerate(BACKBONE):
        (kernel,) = model.get_layer(f"conv{i}").get_weights()
        gamma, beta, mean, var = model.get_layer(f"bn{i}").get_weights()
        factor = gamma / np.sqrt(var + BN_EPS)
        params.append((kernel * factor, beta - mean * factor, stride, level))
    heads = [tuple(model.get_layer(f"{kind}{j}").get_weights() for kind in ("box", "cls")) for j in range(len(LEVELS))]

    def forward(image):
        x, feats = image, []
        for kernel, bias, stride, level in params:
            x = tf.nn.conv2d(x, tf.constant(kernel, tf.float32), stride, "SAME")
            x = tf.nn.relu6(tf.nn.bias_add(x, tf.constant(bias, tf.float32)))
            if level is not None:
                feats.append(x)
        boxes, logits = [], []
        for feat, ((bk, bb), (ck, cb)), (n, _) in zip(feats, heads, LEVELS):
            b = tf.nn.bias_add(tf.nn.conv2d(feat, tf.constant(bk, tf.float32), 1, "SAME"), tf.constant(bb, tf.float32))
            c = tf.nn.bias_add(tf.nn.conv2d(feat, tf.constant(ck, tf.float32), 1, "SAME"), tf.constant(cb, tf.float32))
            boxes.append(tf.reshape(b, [-1, n * n * ANCHORS_PER_CELL, 4]))
            logits.append(tf.reshape(c, [-1, n * n * ANCHORS_PER_CELL, NUM_CLASSES]))
        return tf.concat(boxes, 1), tf.concat(logits, 1)

    return forward


def detection_loss(tf, box_pred, logits, cls_t, enc_t):
    cls_t = tf.cast(cls_t, tf.int32)
    enc_t = tf.cast(enc_t, tf.float32)
    pos = tf.cast(cls_t > 0, tf.float32)
    valid = tf.cast(cls_t >= 0, tf.float32)
    num_pos = tf.maximum(tf.reduce_sum(pos), 1.0)
    onehot = tf.one_hot(tf.maximum(cls_t, 0) - 1, NUM_CLASSES)  # background -> all zeros
    ce = tf.nn.sigmoid_cross_entropy_with_logits(labels=onehot, logits=logits)
    p = tf.sigmoid(logits)
    p_t = onehot * p + (1 - onehot) * (1 - p)
    alpha_t = onehot * 0.25 + (1 - onehot) * 0.75
    focal = alpha_t * tf.pow(1 - p_t, 2.0) * ce
    cls_loss = tf.reduce_sum(tf.reduce_sum(focal, -1) * valid) / num_pos
    huber = tf.keras.losses.Huber(delta=1.0, reduction="none")
    box_loss = tf.reduce_sum(huber(enc_t[..., None], box_pred[..., None]) * pos[..., None]) / num_pos
    return cls_loss, box_loss


def train(tf, images, cls, enc, epochs: int, batch: int, lr: float, log_every: int = 100):
    model = build_network(tf)
    steps_per_epoch = len(images) // batch
    total = steps_per_epoch * epochs
    warmup = min(200, total // 10)
    schedule = tf.keras.optimizers.schedules.CosineDecay(
        0.0, total - warmup, alpha=0.01, warmup_target=lr, warmup_steps=warmup)
    opt = tf.keras.optimizers.Adam(schedule)

    @tf.function(jit_compile=False)
    def step(x, c, e):
        x = tf.cast(x, tf.float32) / 127.5 - 1.0
        with tf.GradientTape() as tape:
            b, l = model(x, training=True)
            cl, bl = detection_loss(tf, b, l, c, e)
            loss = cl + bl
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return cl, bl

    rng = np.random.default_rng(TRAIN_SEED)
    t0 = time.time()
    n = 0
    acc = np.zeros(2)
    for epoch in range(epochs):
        order = rng.permutation(len(images))
        for s in range(steps_per_epoch):
            idx = np.sort(order[s * batch:(s + 1) * batch])
            cl, bl = step(images[idx], cls[idx], enc[idx])
            acc += (float(cl), float(bl))
            n += 1
            if n % log_every == 0:
                print(f"  step {n}/{total} epoch {epoch + 1}: cls {acc[0] / log_every:.4f} "
                      f"box {acc[1] / log_every:.4f}  ({time.time() - t0:.0f}s)", flush=True)
                acc[:] = 0
    return model


# ------------------------------------------------------------------------------------------ export


def postprocess_signature() -> str:
    attrs = [
        'name: "TFLite_Detection_PostProcess"',
        'attr { key: "max_detections" value { i: %d } }' % MAX_DETECTIONS,
        'attr { key: "max_classes_per_detection" value { i: 1 } }',
        'attr { key: "use_regular_nms" value { b: false } }',
        'attr { key: "nms_score_threshold" value { f: %e } }' % NMS_SCORE_THRESHOLD,
        'attr { key: "nms_iou_threshold" value { f: %f } }' % NMS_IOU_THRESHOLD,
        'attr { key: "y_scale" value { f: %f } }' % SCALES["y_scale"],
        'attr { key: "x_scale" value { f: %f } }' % SCALES["x_scale"],
        'attr { key: "h_scale" value { f: %f } }' % SCALES["h_scale"],
        'attr { key: "w_scale" value { f: %f } }' % SCALES["w_scale"],
        'attr { key: "num_classes" value { i: %d } }' % NUM_CLASSES,
    ]
    return " ".join(attrs)


def export_saved_model(tf, model, path: str, check_images: np.ndarray) -> None:
    anchors = make_anchors()
    forward = frozen_forward(tf, model)
    x = tf.constant(check_images.astype(np.float32) / 127.5 - 1.0)
    diffs = [float(tf.reduce_max(tf.abs(a - b))) for a, b in zip(forward(x), model(x, training=False))]
    print(f"  frozen network vs Keras model: max |diff| boxes {diffs[0]:.2e}, logits {diffs[1]:.2e}")
    assert max(diffs) < 1e-3, diffs

    class SSDModule(tf.Module):

        @tf.function(experimental_implements=postprocess_signature())
        def _postprocess(self, box_encodings, class_predictions, anchors):  # noqa: ARG002
            # Replaced by the TFLite custom op during conversion; the body only fixes the arity.
            boxes = tf.constant(0.0, dtype=tf.float32, name="boxes")
            classes = tf.constant(0.0, dtype=tf.float32, name="classes")
            scores = tf.constant(0.0, dtype=tf.float32, name="scores")
            num_detections = tf.constant(0.0, dtype=tf.float32, name="num_detections")
            return boxes, classes, scores, num_detections

        @tf.function(input_signature=[tf.TensorSpec([1, INPUT_SIZE, INPUT_SIZE, 3], tf.float32, name="input")])
        def inference_fn(self, image):
            box_encodings, logits = forward(image)
            scores = tf.sigmoid(logits)
            background = tf.zeros_like(scores[..., :1])
            class_predictions = tf.concat([background, scores], -1)
            box_encodings = tf.identity(box_encodings, name="box_encodings")
            class_predictions = tf.identity(class_predictions, name="class_predictions")
            const_anchors = tf.constant(anchors, dtype=tf.float32, name="anchors")
            return self._postprocess(box_encodings, class_predictions, const_anchors)

    module = SSDModule()
    concrete = module.inference_fn.get_concrete_function()
    tf.saved_model.save(module, path, signatures=concrete)


def convert_float(tf, saved_model: str) -> bytes:
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
    converter.allow_custom_ops = True
    return converter.convert()


def convert_uint8(tf, saved_model: str, calibration: np.ndarray) -> bytes:
    def representative():
        for img in calibration:
            yield [(img[None].astype(np.float32) / 127.5 - 1.0)]

    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
    converter.inference_input_type = tf.uint8
    converter.allow_custom_ops = True
    return converter.convert()


def make_classifier(tf) -> bytes:
    """A tiny untrained float32 classifier: [1,64,64,3] -> softmax [1,3]. Fixed seeded weights as
    constants (no variables, so it runs in every interpreter); it only has to not be a detector."""
    rng = np.random.default_rng(TRAIN_SEED)
    k1 = tf.constant(rng.normal(0, 0.2, (3, 3, 3, 8)), tf.float32)
    k2 = tf.constant(rng.normal(0, 0.1, (3, 3, 8, 16)), tf.float32)
    dense = tf.constant(rng.normal(0, 0.3, (16, NUM_CLASSES)), tf.float32)
    bias = tf.constant(np.zeros(NUM_CLASSES), tf.float32)

    @tf.function(input_signature=[tf.TensorSpec([1, 64, 64, 3], tf.float32, name="input")])
    def serve(x):
        x = tf.nn.relu(tf.nn.conv2d(x, k1, 2, "SAME"))
        x = tf.nn.relu(tf.nn.conv2d(x, k2, 2, "SAME"))
        x = tf.reduce_mean(x, axis=[1, 2])
        return tf.nn.softmax(tf.matmul(x, dense) + bias)

    module = tf.Module()
    module.serve = serve
    path = tempfile.mkdtemp(prefix="not_a_detector_")
    try:
        tf.saved_model.save(module, path, signatures=serve.get_concrete_function())
        return tf.lite.TFLiteConverter.from_saved_model(path).convert()
    finally:
        shutil.rmtree(path, ignore_errors=True)


def describe(path: str) -> None:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=path)
    interp.allocate_tensors()
    print(f"{os.path.basename(path)}: {os.path.getsize(path) / 1024:.1f} KiB")
    for d in interp.get_input_details():
        print(f"  input  {d['name']!r} {d['dtype'].__name__} {list(d['shape'])} quantization={d['quantization']}")
    for pos, d in enumerate(interp.get_output_details()):
        print(f"  output[{pos}] {d['name']!r} {d['dtype'].__name__} {list(d['shape'])} "
              f"index={d['index']} quantization={d['quantization']}")


# -------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "models"))
    ap.add_argument("--images", type=int, default=12000, help="training images")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--calibration", type=int, default=300, help="representative images for quantization")
    ap.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    started = time.time()
    os.makedirs(args.out, exist_ok=True)

    print(f"drawing {args.images} training images ({args.workers} workers)...", flush=True)
    images, cls, enc = make_dataset(args.images, TRAIN_SEED, args.workers)
    npos = (cls > 0).sum(1)
    print(f"  done in {time.time() - started:.0f}s; {len(make_anchors())} anchors, "
          f"positives per image {npos.mean():.1f} (min {npos.min()})", flush=True)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.keras.utils.set_random_seed(TRAIN_SEED)  # python, numpy and tf seeds
    tf.random.set_seed(TRAIN_SEED)
    np.random.seed(TRAIN_SEED % 2**32)
    tf.config.experimental.enable_op_determinism()

    t = time.time()
    model = train(tf, images, cls, enc, args.epochs, args.batch, args.lr)
    print(f"trained in {time.time() - t:.0f}s", flush=True)

    tmp = tempfile.mkdtemp(prefix="shapes_ssd_")
    try:
        saved = os.path.join(tmp, "saved_model")
        export_saved_model(tf, model, saved, images[:8])
        outputs = {"shapes_ssd_float32.tflite": convert_float(tf, saved)}
        # Calibrate on training images from both resize modes.
        outputs["shapes_ssd_uint8.tflite"] = convert_uint8(tf, saved, images[: args.calibration])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    outputs["not_a_detector.tflite"] = make_classifier(tf)
    for name, data in outputs.items():
        with open(os.path.join(args.out, name), "wb") as fh:
            fh.write(data)
    with open(os.path.join(args.out, "shapes_labels.txt"), "w") as fh:
        fh.write("\n".join(CLASSES) + "\n")
    for name in outputs:
        describe(os.path.join(args.out, name))
    print(f"total {time.time() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
