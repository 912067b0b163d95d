"""Raw per-anchor detectors, decoded here with their anchors because the model leaves it to the caller:
the TF Object Detection API's SSD exported without its post-processing op (box encodings [1,N,4] and class
logits [1,N,C+1], background first) and MediaPipe detectors such as BlazeFace (regressors [1,N,4+2K] and
one logit per anchor [1,N,1]). Tensors are told apart by shape and name, never position."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import PostprocessError
from .anchors import AnchorLayout, recognise_anchors
from .interpreter import TensorSpec

# The TF OD API's FasterRcnnBoxCoder scales (ty, tx, th, tw) of every SSD-MobileNet config.
SSD_BOX_SCALES = (10.0, 10.0, 5.0, 5.0)
# MediaPipe's TensorsToDetectionsCalculator clips logits before its sigmoid (score_clipping_thresh).
MEDIAPIPE_CLIP = 100.0
# MediaPipe face detection suppresses at 0.3 (min_suppression_threshold); its weighted NMS is not
# reproduced: plain greedy NMS keeps the best-scoring box as it is.
MEDIAPIPE_NMS_IOU = 0.3


@dataclass(frozen=True)
class RawSsdLayout:
    boxes: TensorSpec  # [1, N, 4] ty, tx, th, tw
    classes: TensorSpec  # [1, N, C+1] logits, column 0 background
    anchors: AnchorLayout
    score: str = "sigmoid"  # sigmoid, softmax, or none (the graph already ends in one)
    family: str = "ssd_raw"

    @property
    def output(self) -> TensorSpec:  # what labels.model_classes names as the class count's source
        return self.classes

    @property
    def num_classes(self) -> int:  # label ids are class columns, background included, as label maps count
        return self.classes.shape[2]

    @property
    def max_detections(self) -> int:
        return 100


@dataclass(frozen=True)
class MediapipeLayout:
    regressors: TensorSpec  # [1, N, 4+2K] x, y, w, h, then K keypoints (x, y), in input pixels
    classificators: TensorSpec  # [1, N, 1] logit
    anchors: AnchorLayout
    family: str = "mediapipe"

    @property
    def output(self) -> TensorSpec:
        return self.classificators

    @property
    def num_classes(self) -> int:
        return self.classificators.shape[2]

    @property
    def max_detections(self) -> int:
        return 100


def _named(outputs: list[TensorSpec], *hints: str) -> list[TensorSpec]:
    return [o for o in outputs if any(h in o.name.lower() for h in hints)]


def identify_per_anchor(outputs: list[TensorSpec], input_hw: tuple[int, int],
                        anchors_file: str | np.ndarray | None = None) -> RawSsdLayout | MediapipeLayout | None:
    """The per-anchor family these outputs are, or None when they are not two [1,N,·] tensors of one N."""
    if len(outputs) != 2 or any(len(o.shape) != 3 or o.shape[0] != 1 for o in outputs):
        return None
    a, b = outputs
    if a.shape[1] != b.shape[1]:
        return None
    n = a.shape[1]
    regress, classif = _named(outputs, "regressor"), _named(outputs, "classificator")
    if len(regress) == 1 and len(classif) == 1 and regress[0] is not classif[0]:
        r, c = regress[0], classif[0]
        if r.shape[2] >= 4 and r.shape[2] % 2 == 0 and c.shape[2] == 1:
            return MediapipeLayout(r, c, recognise_anchors("mediapipe", input_hw, n, anchors_file))
    boxes = [o for o in outputs if o.shape[2] == 4 and "class" not in o.name.lower()]
    named_boxes = _named(boxes, "box")
    boxes = named_boxes or boxes
    if len(boxes) != 1:
        return None
    classes = next(o for o in outputs if o is not boxes[0])
    if classes.shape[2] < 2:
        return None
    return RawSsdLayout(boxes[0], classes, recognise_anchors("ssd", input_hw, n, anchors_file))


def _outputs(arrays, *specs: TensorSpec) -> list[np.ndarray]:
    try:
        out = [s.dequantize(arrays[s.index])[0].astype(np.float32) for s in specs]
    except (KeyError, ValueError) as exc:
        raise PostprocessError(f"model outputs do not match their description: {exc}") from None
    if not all(np.isfinite(o).all() for o in out):
        raise PostprocessError("model produced non-finite predictions", error_type="non_finite_output")
    return out


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # float64: exp(100) overflows float32
    return (1.0 / (1.0 + np.exp(-np.clip(x.astype(np.float64), -MEDIAPIPE_CLIP, MEDIAPIPE_CLIP)))).astype(np.float32)


def ssd_scores(logits: np.ndarray, how: str) -> np.ndarray:
    if how == "softmax":
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    return _sigmoid(logits) if how == "sigmoid" else logits


def decode_raw_ssd(arrays, layout: RawSsdLayout, score_threshold: float, nms, iou: float):
    """Box coder decode against the anchors, every (anchor, class) pair over the threshold (class 0, the
    background, never), then class-aware NMS; class ids are class columns, as the label map counts."""
    enc, logits = _outputs(arrays, layout.boxes, layout.classes)
    scores = ssd_scores(logits, layout.score)[:, 1:]
    anchor_idx, cls = np.nonzero(scores >= score_threshold)
    a = layout.anchors.anchors[anchor_idx]
    e = enc[anchor_idx] / np.array(SSD_BOX_SCALES, np.float32)
    cy, cx = e[:, 0] * a[:, 2] + a[:, 0], e[:, 1] * a[:, 3] + a[:, 1]
    h, w = np.exp(e[:, 2]) * a[:, 2], np.exp(e[:, 3]) * a[:, 3]
    yxyx = np.stack([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2], 1)
    return _suppressed(yxyx, scores[anchor_idx, cls], (cls + 1).astype(np.int32), nms, iou, layout.max_detections)


def decode_mediapipe(arrays, layout: MediapipeLayout, score_threshold: float, input_hw: tuple[int, int], nms):
    """MediaPipe's TensorsToDetections: centre = r[0:2] / input size × anchor size + anchor centre, size =
    r[2:4] / input size × anchor size, score = sigmoid of the clipped logit; then plain NMS."""
    reg, logit = _outputs(arrays, layout.regressors, layout.classificators)
    scores = _sigmoid(logit[:, 0])
    keep = np.flatnonzero(scores >= score_threshold)
    a, r = layout.anchors.anchors[keep], reg[keep]
    ih, iw = input_hw
    cx, cy = r[:, 0] / iw * a[:, 3] + a[:, 1], r[:, 1] / ih * a[:, 2] + a[:, 0]
    w, h = r[:, 2] / iw * a[:, 3], r[:, 3] / ih * a[:, 2]
    yxyx = np.stack([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2], 1)
    return _suppressed(yxyx, scores[keep], np.zeros(len(keep), np.int32), nms, MEDIAPIPE_NMS_IOU,
                       layout.max_detections)


def _suppressed(yxyx: np.ndarray, scores: np.ndarray, class_ids: np.ndarray, nms, iou: float, limit: int):
    """(boxes ymin, xmin, ymax, xmax; class ids; scores) kept, best first: decoding makes Detections of it."""
    kept = nms(yxyx[:, [1, 0, 3, 2]], scores, class_ids, iou, limit)
    return yxyx[kept].astype(np.float32), class_ids[kept].astype(np.int32), scores[kept].astype(np.float32)
