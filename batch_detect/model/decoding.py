"""Model outputs → detections. Outputs are identified by shape and name, never by position:
TF2-exported SSD models list their four outputs in a scrambled order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..errors import ModelError, PostprocessError
from .interpreter import TensorSpec
from .per_anchor import MediapipeLayout, RawSsdLayout, decode_mediapipe, decode_raw_ssd, identify_per_anchor

_SUFFIX = re.compile(r":(\d+)$")
# TFLite_Detection_PostProcess emits boxes, classes, scores, count as its outputs 0..3. Exporters name
# the tensors either in that order (TF1: "TFLite_Detection_PostProcess", ":1", ":2", ":3") or reversed
# (TF2 Object Detection API: "StatefulPartitionedCall:3" is boxes ... ":0" is count, because its export
# returns the tuple reversed), and list them in yet another order. Boxes and count are known by shape,
# so their suffixes tell which naming the model uses, and that names classes and scores.
_OP_ORDER = ("boxes", "classes", "scores", "count")
_NAME_HINTS = (("class", "classes"), ("score", "scores"))


def _suffix(spec: TensorSpec) -> int:
    match = _SUFFIX.search(spec.name)
    return int(match.group(1)) if match else 0


@dataclass(frozen=True)
class SsdLayout:
    """Where each of the SSD post-processed outputs lives, by tensor index."""

    boxes: TensorSpec
    classes: TensorSpec
    scores: TensorSpec
    count: TensorSpec
    family: str = "ssd_postprocess"

    @property
    def max_detections(self) -> int:
        return self.boxes.shape[1]


@dataclass(frozen=True)
class Detections:
    boxes: np.ndarray  # [N, 4] ymin, xmin, ymax, xmax, normalised to the model input
    class_ids: np.ndarray  # [N] int32
    scores: np.ndarray  # [N] float32
    keypoints: np.ndarray | None = None  # [N, K, 2] x, y like the boxes; None for families without keypoints


def identify_ssd_outputs(outputs: list[TensorSpec]) -> SsdLayout:
    """Find boxes [1,N,4], classes [1,N], scores [1,N] and count [1] among the model's outputs."""
    shapes = ", ".join(f"{o.name} {list(o.shape)} {o.dtype}" for o in outputs)
    if len(outputs) != 4:
        raise ModelError(
            f"the model has {len(outputs)} output(s) ({shapes}); an SSD detector with the "
            "TFLite_Detection_PostProcess op has 4: boxes [1,N,4], classes [1,N], scores [1,N], count [1]. "
            "Export the model with its detection post-processing, or use a supported detector."
        )
    boxes = [o for o in outputs if len(o.shape) == 3 and o.shape[-1] == 4]
    counts = [o for o in outputs if int(np.prod(o.shape)) == 1]
    if len(boxes) != 1 or len(counts) != 1:
        raise ModelError(f"cannot find one boxes [1,N,4] and one count [1] output among: {shapes}")
    n = boxes[0].shape[1]
    rest = [o for o in outputs if o is not boxes[0] and o is not counts[0]]
    if any(tuple(o.shape) != (1, n) for o in rest):
        raise ModelError(f"classes and scores must both be [1,{n}] to match boxes; outputs: {shapes}")
    roles: dict[str, TensorSpec] = {}
    suffixes = (_suffix(boxes[0]), _suffix(counts[0]))
    if suffixes in ((0, 3), (3, 0)):
        order = _OP_ORDER if suffixes == (0, 3) else _OP_ORDER[::-1]
        roles = {order[_suffix(o)]: o for o in rest if _suffix(o) in (1, 2)}
    if set(roles) != {"classes", "scores"}:
        roles = {role: o for o in rest for hint, role in _NAME_HINTS if hint in o.name.lower()}
    if set(roles) != {"classes", "scores"}:
        raise ModelError(
            "cannot tell the classes output from the scores output by name "
            f"(outputs: {shapes}); name them ...:1/:2 consistently with boxes/count, or 'classes'/'scores'"
        )
    return SsdLayout(boxes=boxes[0], classes=roles["classes"], scores=roles["scores"], count=counts[0])


def confirm_by_values(layout: SsdLayout, arrays: dict[int, np.ndarray]) -> SsdLayout:
    """Check the name-based roles against one real output: class ids are whole numbers, scores are
    not (nearly always). Swap the two when the values say the names lied; keep them when unsure."""
    n = int(min(max(round(float(np.ravel(arrays[layout.count.index])[0])), 0), layout.max_detections))
    if n == 0:
        return layout
    cls = layout.classes.dequantize(arrays[layout.classes.index]).reshape(-1)[:n]
    sco = layout.scores.dequantize(arrays[layout.scores.index]).reshape(-1)[:n]

    def whole(v: np.ndarray) -> bool:
        return bool(np.all(np.abs(v - np.rint(v)) < 1e-6))

    if not whole(cls) and whole(sco):
        return SsdLayout(boxes=layout.boxes, classes=layout.scores, scores=layout.classes, count=layout.count)
    return layout


def decode_ssd(arrays: dict[int, np.ndarray], layout: SsdLayout, score_threshold: float) -> Detections:
    """Keep the first `count` detections scoring at least `score_threshold`."""
    try:
        boxes = layout.boxes.dequantize(arrays[layout.boxes.index]).reshape(-1, 4)
        classes = layout.classes.dequantize(arrays[layout.classes.index]).reshape(-1)
        scores = layout.scores.dequantize(arrays[layout.scores.index]).reshape(-1)
        count = layout.count.dequantize(arrays[layout.count.index]).reshape(-1)[0]
    except (KeyError, ValueError) as exc:
        raise PostprocessError(f"model outputs do not match their description: {exc}") from None
    if not np.isfinite(count):
        raise PostprocessError(f"detection count is not finite ({count})", error_type="non_finite_output")
    n = int(min(max(round(float(count)), 0), boxes.shape[0]))
    keep = np.flatnonzero(scores[:n] >= score_threshold)
    if not (np.isfinite(boxes[keep]).all() and np.isfinite(scores[keep]).all()):
        raise PostprocessError("model produced non-finite boxes or scores", error_type="non_finite_output")
    return Detections(
        boxes=boxes[keep].astype(np.float32),
        class_ids=np.rint(classes[keep]).astype(np.int32),
        scores=scores[keep].astype(np.float32),
    )


@dataclass(frozen=True)
class YoloLayout:
    """One raw prediction tensor: YOLOv8-style [1, 4+C, N] (transposed, no objectness) or
    YOLOv5-style [1, N, 5+C] (objectness first); boxes are xc, yc, w, h, normalised or in pixels."""

    output: TensorSpec
    transposed: bool
    objectness: bool
    num_classes: int
    family: str = "yolo"

    @property
    def max_detections(self) -> int:
        return MAX_DETECTIONS


MAX_DETECTIONS = 100
NMS_IOU = 0.45


OUTPUT_FORMATS = ("auto", "ssd", "yolov8", "yolov5")


def identify_outputs(outputs: list[TensorSpec], output_format: str = "auto", input_hw: tuple[int, int] | None = None,
                     anchors_file: str | np.ndarray | None = None
                     ) -> SsdLayout | YoloLayout | RawSsdLayout | MediapipeLayout:
    """The detector family, from the outputs' number, shapes and names, or the one forced by
    `output_format` (refused when the outputs cannot be read that way). Raw per-anchor families need the
    input size (`input_hw`) to recognise their anchors."""
    if output_format != "auto":
        return _forced(outputs, output_format)
    per_anchor = identify_per_anchor(outputs, input_hw, anchors_file) if input_hw else None
    if per_anchor is not None:
        return per_anchor
    if len(outputs) == 1 and len(outputs[0].shape) == 3 and outputs[0].shape[0] == 1:
        o = outputs[0]
        _, a, b = o.shape
        if b > a > 4:  # [1, 4+C, N]: more predictions than channels
            return YoloLayout(o, transposed=True, objectness=False, num_classes=a - 4, family="yolov8")
        if a > b > 5:  # [1, N, 5+C]
            return YoloLayout(o, transposed=False, objectness=True, num_classes=b - 5, family="yolov5")
    return identify_ssd_outputs(outputs)


def _forced(outputs: list[TensorSpec], output_format: str) -> SsdLayout | YoloLayout:
    if output_format not in OUTPUT_FORMATS:
        raise ModelError(f"--output-format must be one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r}")
    shapes = ", ".join(f"{o.name} {list(o.shape)}" for o in outputs)
    if output_format == "ssd":
        try:
            return identify_ssd_outputs(outputs)
        except ModelError as exc:
            raise ModelError(f"--output-format ssd does not fit this model: {exc}") from None
    want = "[1, 4+C, N]" if output_format == "yolov8" else "[1, N, 5+C]"
    if len(outputs) != 1 or len(outputs[0].shape) != 3 or outputs[0].shape[0] != 1:
        raise ModelError(f"--output-format {output_format} needs one output {want}; the model has "
                         f"{len(outputs)}: {shapes}. Use --output-format auto to detect the family")
    o = outputs[0]
    _, a, b = o.shape
    if output_format == "yolov8":
        if a <= 4 or b < 1:
            raise ModelError(f"--output-format yolov8 needs {want} with at least one class; {shapes} has "
                             f"{a} channels. Use --output-format auto to detect the family")
        return YoloLayout(o, transposed=True, objectness=False, num_classes=a - 4, family="yolov8")
    if b <= 5 or a < 1:
        raise ModelError(f"--output-format yolov5 needs {want} with at least one class; {shapes} has "
                         f"{b} values per prediction. Use --output-format auto to detect the family")
    return YoloLayout(o, transposed=False, objectness=True, num_classes=b - 5, family="yolov5")


def nms(boxes_xyxy: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float, limit: int) -> np.ndarray:
    """Class-aware greedy non-maximum suppression; returns kept indices, best first. Boxes of different
    classes are moved apart so one pass handles every class."""
    if len(scores) == 0:
        return np.zeros(0, np.int64)
    offset = classes.astype(np.float32)[:, None] * (float(boxes_xyxy.max()) + 1.0)
    b = boxes_xyxy + offset
    areas = (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size and len(keep) < limit:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = (np.minimum(b[i, 2], b[rest, 2]) - np.maximum(b[i, 0], b[rest, 0])).clip(0)
        h = (np.minimum(b[i, 3], b[rest, 3]) - np.maximum(b[i, 1], b[rest, 1])).clip(0)
        inter = w * h
        overlap = inter / (areas[i] + areas[rest] - inter + 1e-12)
        order = rest[overlap <= iou]
    return np.array(keep, np.int64)


def decode_yolo(arrays: dict[int, np.ndarray], layout: YoloLayout, score_threshold: float,
                input_hw: tuple[int, int]) -> Detections:
    try:
        pred = layout.output.dequantize(arrays[layout.output.index])[0]
    except (KeyError, ValueError) as exc:
        raise PostprocessError(f"model outputs do not match their description: {exc}") from None
    if not np.isfinite(pred).all():
        raise PostprocessError("model produced non-finite predictions", error_type="non_finite_output")
    first = 5 if layout.objectness else 4  # first class column
    # The best class score of every prediction, reduced along the layout's own axis (a max over
    # [C, 8400] rows is ~10x faster than an argmax over its transpose); argmax only for those kept.
    if layout.transposed:  # [4+C, N]
        scores = pred[first:].max(axis=0)
        objectness = pred[4] if layout.objectness else None
    else:  # [N, 5+C]
        scores = pred[:, first:].max(axis=1)
        objectness = pred[:, 4] if layout.objectness else None
    if objectness is not None:
        scores = scores * objectness
    keep = np.flatnonzero(scores >= score_threshold)
    rows = pred[:, keep].T if layout.transposed else pred[keep]  # [K, 4+C]
    boxes, scores, class_ids = rows[:, :4], scores[keep], rows[:, first:].argmax(1)
    if len(keep) and float(np.abs(boxes).max()) > 2.0:  # pixel units: normalise by the input size
        h, w = input_hw
        boxes = boxes / np.array([w, h, w, h], np.float32)
    xc, yc, bw, bh = boxes.T if len(boxes) else np.zeros((4, 0), np.float32)
    xyxy = np.stack([xc - bw / 2, yc - bh / 2, xc + bw / 2, yc + bh / 2], 1) if len(boxes) else np.zeros((0, 4))
    kept = nms(xyxy, scores, class_ids, NMS_IOU, MAX_DETECTIONS)
    xyxy = xyxy[kept]
    return Detections(
        boxes=xyxy[:, [1, 0, 3, 2]].astype(np.float32),  # → ymin, xmin, ymax, xmax like the SSD op
        class_ids=class_ids[kept].astype(np.int32),
        scores=scores[kept].astype(np.float32),
    )


def decode_outputs(arrays, layout, score_threshold: float, input_hw: tuple[int, int]) -> Detections:
    if isinstance(layout, YoloLayout):
        return decode_yolo(arrays, layout, score_threshold, input_hw)
    if isinstance(layout, RawSsdLayout):
        return Detections(*decode_raw_ssd(arrays, layout, score_threshold, nms, NMS_IOU))
    if isinstance(layout, MediapipeLayout):
        return Detections(*decode_mediapipe(arrays, layout, score_threshold, input_hw, nms))
    return decode_ssd(arrays, layout, score_threshold)
