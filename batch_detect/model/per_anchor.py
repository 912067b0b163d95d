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
# MediaPipe face detection suppresses at IoU 0.3 (min_suppression_threshold) with its WEIGHTED algorithm:
# each kept box (and its keypoints) is the score-weighted mean of the boxes it suppresses.
MEDIAPIPE_NMS_IOU = 0.3
# --nms: auto is the family's own (weighted for mediapipe, plain greedy for every other family).
NMS_CHOICES = ("auto", "plain", "weighted")


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
    nms: str = "weighted"  # MediaPipe's default for its detectors; "plain" keeps the best anchor's box as it is

    @property
    def num_keypoints(self) -> int:
        return (self.regressors.shape[2] - 4) // 2

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
    r[2:4] / input size × anchor size, keypoint k = r[4+2k:6+2k] / input size × anchor size + anchor centre,
    score = sigmoid of the clipped logit; then weighted (or plain) NMS. Boxes ymin, xmin, ymax, xmax and
    keypoints [N, K, 2] x, y, normalised to the input."""
    reg, logit = _outputs(arrays, layout.regressors, layout.classificators)
    scores = _sigmoid(logit[:, 0])
    keep = np.flatnonzero(scores >= score_threshold)
    a, r = layout.anchors.anchors[keep], reg[keep]
    ih, iw = input_hw
    # a row's (x, y) pairs, input pixels → anchor sizes: the centre offset, the size, then the keypoints
    pairs = r.reshape(len(r), r.shape[1] // 2, 2) / np.array([iw, ih], np.float32) * a[:, None, [3, 2]]
    centre = a[:, None, [1, 0]]  # the anchor's (x, y)
    (cx, cy), (w, h) = (pairs[:, 0] + centre[:, 0]).T, pairs[:, 1].T
    yxyx = np.stack([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2], 1)
    kps = pairs[:, 2:] + centre
    if layout.nms == "weighted":
        return weighted_nms(yxyx, scores[keep], kps, MEDIAPIPE_NMS_IOU, layout.max_detections)
    kept = nms(yxyx[:, [1, 0, 3, 2]], scores[keep], np.zeros(len(keep), np.int32), MEDIAPIPE_NMS_IOU,
               layout.max_detections)
    return (yxyx[kept].astype(np.float32), np.zeros(len(kept), np.int32), scores[keep][kept].astype(np.float32),
            kps[kept].astype(np.float32))


def weighted_nms(yxyx: np.ndarray, scores: np.ndarray, keypoints: np.ndarray, iou: float, limit: int):
    """MediaPipe's NonMaxSuppressionCalculator, WEIGHTED: take the best remaining box, gather every remaining
    box overlapping it by IoU > `iou` (itself included), and keep their score-weighted mean box and keypoints
    with the best one's score; the rest go round again. One class (MediaPipe's detectors have one)."""
    order = np.argsort(-scores, kind="stable")
    areas = (yxyx[:, 2] - yxyx[:, 0]).clip(0) * (yxyx[:, 3] - yxyx[:, 1]).clip(0)
    boxes, kept_scores, points = [], [], []
    while order.size and len(boxes) < limit:
        i, rest = order[0], order
        lo, hi = np.maximum(yxyx[i, :2], yxyx[rest, :2]), np.minimum(yxyx[i, 2:], yxyx[rest, 2:])
        inter = (hi - lo).clip(0).prod(1)
        overlap = inter / (areas[i] + areas[rest] - inter + 1e-12)
        overlap[0] = np.inf  # the best box is in its own group even where it has no area
        group, w = rest[overlap > iou], scores[rest[overlap > iou]].astype(np.float64)
        boxes.append((yxyx[group] * w[:, None]).sum(0) / w.sum())
        points.append((keypoints[group] * w[:, None, None]).sum(0) / w.sum())
        kept_scores.append(scores[i])
        order = rest[overlap <= iou]
    k = keypoints.shape[1]
    return (np.array(boxes, np.float32).reshape(-1, 4), np.zeros(len(boxes), np.int32),
            np.array(kept_scores, np.float32), np.array(points, np.float32).reshape(-1, k, 2))


def _suppressed(yxyx: np.ndarray, scores: np.ndarray, class_ids: np.ndarray, nms, iou: float, limit: int):
    """(boxes ymin, xmin, ymax, xmax; class ids; scores) kept, best first: decoding makes Detections of it."""
    kept = nms(yxyx[:, [1, 0, 3, 2]], scores, class_ids, iou, limit)
    return yxyx[kept].astype(np.float32), class_ids[kept].astype(np.int32), scores[kept].astype(np.float32)
