"""One preloaded interpreter and the per-image path through it: bytes → tensor → invoke → detections.
No Ray here: the actor in `distributed.py` wraps a Detector, and tests drive one directly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from dataclasses import replace

from .decoding import (Detections, SsdLayout, YoloLayout, confirm_by_values, decode_outputs,
                       identify_outputs)
from .per_anchor import MEDIAPIPE_NMS_IOU, NMS_CHOICES, MediapipeLayout, RawSsdLayout
from ..errors import InferenceError, ModelError, failure_fields
from .geometry import RESIZE_CHOICES
from .interpreter import Backend, TensorSpec, make_interpreter, tensor_specs
from .modelfile import metadata_normalization
from .preprocess import InputSpec, PixelMapping, build_input, decode_image, mean_std_spec, pixel_mapping


@dataclass(frozen=True)
class ModelInfo:
    input: InputSpec
    outputs: tuple[TensorSpec, ...]
    layout: SsdLayout | YoloLayout | RawSsdLayout | MediapipeLayout
    mapping: PixelMapping
    normalization_from: str = "the family's default"

    def describe(self) -> dict:
        t = self.input.tensor
        return {
            "family": self.layout.family,
            "input": {
                "name": t.name,
                "shape": list(t.shape),
                "dtype": t.dtype,
                "scale": t.scale,
                "zero_point": t.zero_point,
                "normalization": self.mapping.normalization,
                "normalization_from": self.normalization_from,
            },
            "outputs": [
                {"name": o.name, "shape": list(o.shape), "dtype": o.dtype, "role": role}
                for o in self.outputs
                for role in [_role_of(self.layout, o)]
            ],
            "max_detections": self.layout.max_detections,
            "default_resize": self.default_resize,
            **_per_anchor_settings(self.layout),
        }

    @property
    def default_resize(self) -> str:
        # Ultralytics trains and exports YOLO on letterboxed inputs (a stretched cat is lost by the full-integer
        # YOLOv8n); SSD exports (TF OD API, Model Maker) are trained on stretched ones.
        return "letterbox" if isinstance(self.layout, YoloLayout) else "stretch"


def _per_anchor_settings(layout) -> dict:
    """The decode settings of a raw per-anchor family, for `inspect`: its anchors and how it scores."""
    if isinstance(layout, RawSsdLayout):
        return {"anchors": layout.anchors.describe(), "score": layout.score, "box_scales": [10, 10, 5, 5]}
    if isinstance(layout, MediapipeLayout):
        nms = "weighted (MediaPipe's default)" if layout.nms == "weighted" else "plain (--nms plain)"
        return {"anchors": layout.anchors.describe(), "score": "sigmoid (logits clipped to ±100)",
                "nms": f"{nms}, IoU {MEDIAPIPE_NMS_IOU}", "keypoints": layout.num_keypoints}
    return {}


_ROLES = {YoloLayout: {"output": "predictions"}, RawSsdLayout: {"boxes": "box_encodings", "classes": "class_logits"},
          MediapipeLayout: {"regressors": "regressors", "classificators": "scores"},
          SsdLayout: {r: r for r in ("boxes", "classes", "scores", "count")}}


def _role_of(layout, spec: TensorSpec) -> str:
    for attr, role in _ROLES[type(layout)].items():
        if getattr(layout, attr).index == spec.index:
            return role
    return "unused"


def _score_converter(interp, layout):
    """A raw SSD whose graph already ends in a sigmoid or softmax gives scores, not logits."""
    if not isinstance(layout, RawSsdLayout):
        return layout
    try:
        ops = {int(o): d["op_name"] for d in interp._get_ops_details() for o in d["outputs"]}
    except Exception:  # a private API: without it the published setting (sigmoid) stands
        return layout
    last = ops.get(layout.classes.index)
    if last in ("LOGISTIC", "SOFTMAX"):
        return replace(layout, score="none")
    return layout


def _normalization(spec: InputSpec, normalization: str, model_content: bytes | None) -> tuple[str, str]:
    """The pixel normalization to use and where it came from: a flag, the model's own TFLite metadata
    (float inputs; an integer input's quantization decides), or the family's default."""
    if normalization != "auto":
        return normalization, "given"
    if spec.tensor.dtype != "float32":
        return normalization, "the input's quantization"
    said = metadata_normalization(model_content) if model_content else None
    if said is None:
        return normalization, "the family's default"
    return mean_std_spec(*said), "the model's TFLite metadata (NormalizationOptions)"


def _with_nms(layout, nms: str):
    """--nms: weighted is MediaPipe's algorithm, for its family only; auto keeps each family's own."""
    if nms not in NMS_CHOICES:
        raise ModelError(f"--nms must be one of {', '.join(NMS_CHOICES)}, got {nms!r}")
    if isinstance(layout, MediapipeLayout):
        return replace(layout, nms="weighted" if nms == "auto" else nms)
    if nms == "weighted":
        raise ModelError(f"--nms weighted is MediaPipe's algorithm, for the mediapipe family; this model is "
                         f"{layout.family}: use --nms auto or plain")
    return layout


def inspect_interpreter(interp, normalization: str, output_format: str = "auto",
                        anchors: str | np.ndarray | None = None, model_content: bytes | None = None,
                        nms: str = "auto") -> ModelInfo:
    inputs, outputs = tensor_specs(interp)
    if len(inputs) != 1:
        raise ModelError(
            f"the model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); a detector takes one image"
        )
    spec = InputSpec.from_tensor(inputs[0])
    layout = _score_converter(interp, identify_outputs(outputs, output_format, (spec.height, spec.width), anchors))
    layout = _with_nms(layout, nms)
    # SSD exports (TF Object Detection API, Model Maker) expect float input in [-1, 1]; YOLO in [0, 1].
    default = "0,1" if isinstance(layout, YoloLayout) else "-1,1"
    normalization, normalization_from = _normalization(spec, normalization, model_content)
    mapping = pixel_mapping(spec, normalization, default_normalization=default)
    probe = _probe(interp, spec, mapping, outputs)
    if isinstance(layout, SsdLayout):
        layout = confirm_by_values(layout, probe)
    return ModelInfo(input=spec, outputs=tuple(outputs), layout=layout, mapping=mapping,
                     normalization_from=normalization_from)


def _probe(interp, spec: InputSpec, mapping: PixelMapping, outputs: list[TensorSpec]) -> dict[int, np.ndarray]:
    """One invoke on seeded noise: proves the model runs here and gives values to check roles with."""
    pixels = np.random.default_rng(0).integers(0, 256, (spec.height, spec.width, spec.channels), dtype=np.uint8)
    try:
        interp.set_tensor(spec.tensor.index, mapping.apply(pixels)[None, ...])
        interp.invoke()
        return {o.index: np.array(interp.get_tensor(o.index)) for o in outputs}
    except Exception as exc:
        raise ModelError(f"the model fails on a test input: {type(exc).__name__}: {exc}") from None


@dataclass
class ImageResult:
    uri: str
    width: int
    height: int
    detections: Detections  # boxes already mapped to the original image, xyxy order
    decode_ms: float
    infer_ms: float


@dataclass
class ImageFailure:
    uri: str
    stage: str
    error_type: str
    message: str


class Detector:
    def __init__(
        self,
        backend: Backend,
        model_content: bytes,
        *,
        num_threads: int,
        score_threshold: float,
        resize: str,
        normalization: str,
        max_pixels: int,
        model_url: str = "model",
        jpeg_draft: bool = True,
        output_format: str = "auto",
        anchors: str | np.ndarray | None = None,
        nms: str = "auto",
    ):
        if resize not in RESIZE_CHOICES:  # the CLI and config check it too; a library caller gets it here, once
            raise ValueError(f"resize must be one of {RESIZE_CHOICES}, got {resize!r}")
        self.interpreter = make_interpreter(backend, model_content, num_threads, model_url)
        self.info = inspect_interpreter(self.interpreter, normalization, output_format, anchors, model_content, nms)
        self.score_threshold = score_threshold
        self.resize = self.info.default_resize if resize == "auto" else resize
        self.max_pixels = max_pixels
        self.fit_to = (self.info.input.width, self.info.input.height, self.resize) if jpeg_draft else None
        self._output_indices = [o.index for o in self.info.outputs]
        self.batch = 1

    def prepare(self, data: bytes):
        """Decode and build the input tensor (thread-safe: no interpreter state is touched)."""
        t0 = time.perf_counter()
        decoded = decode_image(data, self.max_pixels, self.fit_to)
        tensor, placement = build_input(decoded, self.info.input, self.info.mapping, self.resize)
        return decoded.width, decoded.height, tensor, placement, (time.perf_counter() - t0) * 1000

    def set_batch(self, size: int) -> int:
        """Run `size` images per invoke when the model's batch dimension is dynamic (shape signature
        -1); a fixed batch stays 1. Returns the batch size in effect."""
        spec = self.info.input.tensor
        if size <= 1 or spec.shape_signature[0] != -1:
            return self.batch
        try:
            self.interpreter.resize_tensor_input(spec.index, [size, *spec.shape[1:]])
            self.interpreter.allocate_tensors()
            shapes = [tuple(d["shape"]) for d in self.interpreter.get_output_details()]
        except Exception:
            shapes = []
        if shapes and all(s and s[0] == size for s in shapes):
            self.batch = size
        else:  # outputs that do not follow the input's batch: keep one image per invoke
            self.interpreter.resize_tensor_input(spec.index, list(spec.shape))
            self.interpreter.allocate_tensors()
        return self.batch

    def infer(self, tensor: np.ndarray) -> dict[int, np.ndarray]:
        return self.infer_batch([tensor])[0]

    def infer_batch(self, tensors: list[np.ndarray]) -> list[dict[int, np.ndarray]]:
        """One invoke for up to `batch` images ([1,H,W,C] each); a short batch is padded with zeros,
        so the interpreter is never re-allocated mid-run. Per image outputs keep a leading 1."""
        n = len(tensors)
        try:
            if self.batch == 1:
                batch = tensors[0]
            else:
                batch = np.zeros((self.batch, *tensors[0].shape[1:]), tensors[0].dtype)
                np.concatenate(tensors, axis=0, out=batch[:n])
            self.interpreter.set_tensor(self.info.input.tensor.index, batch)
            self.interpreter.invoke()
            outputs = {i: self.interpreter.get_tensor(i) for i in self._output_indices}
        except Exception as exc:
            raise InferenceError(f"{type(exc).__name__}: {exc}") from None
        if self.batch == 1:
            return [outputs]
        return [{i: a[k:k + 1] for i, a in outputs.items()} for k in range(n)]

    def process(self, uri: str, data: bytes) -> ImageResult | ImageFailure:
        """Run one image; every per-image problem comes back as an ImageFailure with its stage."""
        stage = "decode"
        try:
            width, height, tensor, placement, decode_ms = self.prepare(data)
            return self.finish(uri, width, height, tensor, placement, decode_ms)
        except Exception as exc:
            return ImageFailure(uri, *failure_fields(exc, stage))

    def finish(self, uri, width, height, tensor, placement, decode_ms) -> ImageResult | ImageFailure:
        return self.finish_batch([(uri, width, height, tensor, placement, decode_ms)])[0]

    def finish_batch(self, items: list[tuple]) -> list[ImageResult | ImageFailure]:
        """Infer and post-process prepared images, `batch` per invoke. If a batched invoke fails, its
        images are run one by one, so only the image at fault becomes a failure record."""
        t0 = time.perf_counter()
        try:
            outputs = self.infer_batch([item[3] for item in items])
        except InferenceError as exc:
            if len(items) == 1:
                return [ImageFailure(items[0][0], *failure_fields(exc, "infer"))]
            # One image per invoke (padded to the allocated batch): only the image at fault fails.
            return [r for item in items for r in self.finish_batch([item])]
        infer_ms = (time.perf_counter() - t0) * 1000 / len(items)
        return [self._postprocess(*item[:3], item[4], item[5], arrays, infer_ms)
                for item, arrays in zip(items, outputs)]

    def _postprocess(self, uri, width, height, placement, decode_ms, arrays, infer_ms) -> ImageResult | ImageFailure:
        stage = "postprocess"
        try:
            raw = decode_outputs(arrays, self.info.layout, self.score_threshold,
                                 (self.info.input.height, self.info.input.width))
            image_yxyx = placement.to_image(raw.boxes)
            keep = (image_yxyx[:, 2] > image_yxyx[:, 0]) & (image_yxyx[:, 3] > image_yxyx[:, 1])
            detections = Detections(
                boxes=image_yxyx[keep][:, [1, 0, 3, 2]],  # → xmin, ymin, xmax, ymax
                class_ids=raw.class_ids[keep],
                scores=raw.scores[keep],
                keypoints=None if raw.keypoints is None else placement.points_to_image(raw.keypoints[keep]),
            )
            return ImageResult(uri, width, height, detections, decode_ms, infer_ms)
        except Exception as exc:
            return ImageFailure(uri, *failure_fields(exc, stage))
