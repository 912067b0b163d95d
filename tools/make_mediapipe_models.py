"""Make small MediaPipe-shaped detectors for the layouts the project recognises but ships no real model of:
each has MediaPipe's input size and outputs (`regressors [1,N,4+2K]`, `classificators [1,N,1]`, named as
MediaPipe's are) and no learned weights, only a known answer: on a bright image its one chosen anchor scores
sigmoid(10 × mean pixel) (0.99995 on white, ~0 on black, the input in [-1, 1]) with the regressors in SPECS,
every other anchor a logit of -20. Deterministic; each file is under 160 KB (the regressors constant-folded).

    pip install -e '.[fixtures]'; PYTHONPATH=. python tools/make_mediapipe_models.py --out models/

The anchor index, the regressors and the layouts are in SPECS; tests/test_raw_anchor_models.py reads them
from here and computes the box and keypoints they must give from its own SsdAnchorsCalculator.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

# name: (input h, w, anchors N, keypoints K, the chosen anchor, regressors in input pixels: x, y, w, h
# offsets of the box centre and size, then K keypoint offsets from the anchor centre)
SPECS = {
    # face full range: one stride-4 layer, 48x48 cells, one anchor each; cell (row 30, column 10)
    "mediapipe_face_full_range": (192, 192, 2304, 6, 30 * 48 + 10, (6.0, -4.0, 40.0, 48.0),
                                  ((-9, -8), (9, -8), (0, 0), (0, 10), (-18, -4), (18, -4))),
    # face back camera: strides 16, 32, 32, 32: 16x16 cells of 2, then 8x8 of 6; the second grid's cell
    # (3, 5), its 4th anchor
    "mediapipe_face_back_camera": (256, 256, 896, 6, 16 * 16 * 2 + (3 * 8 + 5) * 6 + 3, (-5.0, 7.0, 60.0, 64.0),
                                   ((-12, -10), (12, -10), (0, 2), (0, 14), (-26, -4), (26, -4))),
    # palm: strides 8, 16, 16, 16: 24x24 cells of 2, then 12x12 of 6; the first grid's cell (20, 4), 2nd anchor
    "mediapipe_palm": (192, 192, 2016, 7, (20 * 24 + 4) * 2 + 1, (3.0, 2.0, 50.0, 44.0),
                       ((0, 20), (-10, 10), (-14, -6), (-6, -18), (2, -20), (10, -16), (16, -8))),
    # pose: strides 8, 16, 32, 32, 32: 28x28 cells of 2, 14x14 of 2, then 7x7 of 6; the middle grid's cell
    # (9, 2), 1st anchor
    "mediapipe_pose": (224, 224, 2254, 4, 28 * 28 * 2 + (9 * 14 + 2) * 2, (-2.0, 4.0, 36.0, 36.0),
                       ((0, 6), (0, -30), (4, -6), (-6, 30))),
}
GAIN, BACKGROUND = 10.0, -20.0


def export(name: str, out_dir: str) -> str:
    import tensorflow as tf
    from tensorflow.lite.tools import flatbuffer_utils

    h, w, n, k, anchor, box, points = SPECS[name]
    chosen = np.zeros(n, np.float32)
    chosen[anchor] = 1.0
    regress = np.array([*box, *np.ravel(points)], np.float32)
    assert regress.shape == (4 + 2 * k,)

    @tf.function(input_signature=[tf.TensorSpec([1, h, w, 3], tf.float32, name="input")])
    def detect(image):
        brightness = tf.reduce_mean(image)  # 1 on a white image in [-1, 1], -1 on a black one
        logits = tf.constant(chosen) * (GAIN * brightness - BACKGROUND) + BACKGROUND
        regressors = tf.constant(chosen)[:, None] * tf.constant(regress)[None, :]
        return tf.reshape(regressors, [1, n, 4 + 2 * k]), tf.reshape(logits, [1, n, 1])

    converter = tf.lite.TFLiteConverter.from_concrete_functions([detect.get_concrete_function()], detect)
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(converter.convert()))
    graph = model.subgraphs[0]
    for index, tensor_name in zip(graph.outputs, (b"regressors", b"classificators")):
        graph.tensors[index].name = tensor_name  # as MediaPipe's graphs name them: the family is found by name
    path = os.path.join(out_dir, f"{name}.tflite")
    with open(path, "wb") as f:
        f.write(flatbuffer_utils.convert_object_to_bytearray(model))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="models")
    args = parser.parse_args()
    for name in SPECS:
        path = export(name, args.out)
        print(os.path.basename(path), os.path.getsize(path), "bytes")


if __name__ == "__main__":
    main()
