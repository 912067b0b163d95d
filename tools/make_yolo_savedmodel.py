"""A YOLOv8-style SavedModel detector for `batch-detect quantize` tests and demos, built from the
committed float fixture (`models/shapes_ssd_float32.tflite`): its trained convolution weights are read
back out of the TFLite file and put into the same network (`tools/make_fixture_models.network`), whose
anchor decoding now happens in the graph. The serving signature takes `image` [1,128,128,3] float in
0..1 and returns one raw prediction tensor [1, 4+C, N] (xc, yc, w, h normalised, then per-class
probabilities): the layout `batch_detect/model/decoding.py` decodes as yolov8, with no custom op.

    PYTHONPATH=. python tools/make_yolo_savedmodel.py --out /tmp/shapes_yolo_savedmodel
    # the committed dynamic-batch model (batching tests):
    PYTHONPATH=.:tools python tools/make_yolo_savedmodel.py --out /tmp/yolo_dyn --dynamic-batch \
        --tflite models/shapes_yolov8_dynbatch_float32.tflite
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import tensorflow as tf

from make_fixture_models import ANCHORS, FEATURES, LAYERS, SCALES, SIZE, network

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOAT_FIXTURE = os.path.join(ROOT, "models", "shapes_ssd_float32.tflite")
NUM_CONVS = len(LAYERS) + 2 * len(FEATURES)


def weights_from_fixture(path: str = FLOAT_FIXTURE) -> list[np.ndarray]:
    """[filter, bias] per convolution, in `network`'s order. The converter names the filters
    Conv2D, Conv2D_1, ... in tracing order, and each CONV_2D op's third input is its bias."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interp = Interpreter(model_path=path,
                         experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interp.allocate_tensors()
    names = {t["index"]: t["name"] for t in interp.get_tensor_details()}
    by_name = {}
    for op in interp._get_ops_details():
        if op["op_name"] == "CONV_2D":
            _, filt, bias = (int(i) for i in op["inputs"])
            by_name[names[filt]] = (filt, bias)
    order = ["Conv2D"] + [f"Conv2D_{k}" for k in range(1, NUM_CONVS)]
    missing = [n for n in order if n not in by_name]
    if missing:
        raise RuntimeError(f"{path}: convolutions {missing} not found; regenerate the fixture models")
    ws = []
    for name in order:
        filt, bias = by_name[name]
        ws.append(np.transpose(interp.get_tensor(filt), (1, 2, 3, 0)).copy())  # OHWI -> HWIO
        ws.append(np.array(interp.get_tensor(bias)))
    return ws


def build(out: str, weights: list[np.ndarray] | None = None, dynamic_batch: bool = False) -> str:
    consts = [tf.constant(w) for w in (weights if weights is not None else weights_from_fixture())]
    anchors = tf.constant(ANCHORS)  # ycenter, xcenter, h, w
    scales = tf.constant(SCALES)

    class YoloShapes(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None if dynamic_batch else 1, SIZE, SIZE, 3], tf.float32,
                                                    name="image")])
        def detect(self, image):
            enc, logits = network(image * 2.0 - 1.0, consts)  # the network was trained on -1..1
            enc = enc / scales
            yc = enc[..., 0] * anchors[:, 2] + anchors[:, 0]
            xc = enc[..., 1] * anchors[:, 3] + anchors[:, 1]
            h = tf.exp(enc[..., 2]) * anchors[:, 2]
            w = tf.exp(enc[..., 3]) * anchors[:, 3]
            boxes = tf.stack([xc, yc, w, h], -1)
            pred = tf.concat([boxes, tf.sigmoid(logits)], -1)  # [1, N, 4+C]
            return {"predictions": tf.transpose(pred, [0, 2, 1])}  # [1, 4+C, N]: yolov8 layout

    module = YoloShapes()
    tf.saved_model.save(module, out, signatures={"serving_default": module.detect})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the SavedModel")
    parser.add_argument("--dynamic-batch", action="store_true", help="batch dimension None (-1 in TFLite)")
    parser.add_argument("--tflite", help="also convert it to this float32 .tflite file")
    args = parser.parse_args()
    print(build(args.out, dynamic_batch=args.dynamic_batch))
    if args.tflite:
        with open(args.tflite, "wb") as fh:
            fh.write(tf.lite.TFLiteConverter.from_saved_model(args.out).convert())
        print(args.tflite)


if __name__ == "__main__":
    main()
