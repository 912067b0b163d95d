"""Resizing to the model's input and mapping boxes back: one definition for training and inference.

The fixture trainer imports this module, so a model sees at inference exactly the pixels it was
trained on. Pure functions over Pillow images and numpy arrays; OpenCV, where installed, resizes the
arrays of the fast JPEG path (fastjpeg.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

try:
    import cv2

    # A worker's decode threads are its parallelism (run/sizing.py counts them); OpenCV's own pool
    # on top would oversubscribe the cores.
    cv2.setNumThreads(1)
except ImportError:
    cv2 = None

RESIZE_MODES = ("stretch", "letterbox")
# What a model was trained on decides: "auto" takes the family's own (detector.ModelInfo.default_resize).
RESIZE_CHOICES = ("auto", *RESIZE_MODES)
LETTERBOX_FILL = (114, 114, 114)
RESAMPLE = Image.BILINEAR
# Shrinking by 2x or more on an axis first reduces by whole factors (box averaging), then resamples the
# rest: Pillow's thumbnail default. Half the cost of resizing a 12-megapixel PNG, a mean pixel change of
# 0.35/255; a drafted JPEG rarely has such a factor left (benchmarks/prepare_cost.py).
REDUCING_GAP = 2.0


@dataclass(frozen=True)
class Placement:
    """Where the original image landed inside the model input, in normalised input coordinates."""

    x_offset: float = 0.0
    y_offset: float = 0.0
    x_scale: float = 1.0  # fraction of the input width the image covers
    y_scale: float = 1.0

    def to_image(self, boxes_yxyx: np.ndarray) -> np.ndarray:
        """Map [N,4] (ymin, xmin, ymax, xmax) boxes from input space to the original image, clipped to [0,1]."""
        if boxes_yxyx.size == 0:
            return boxes_yxyx.reshape(0, 4).astype(np.float32)
        out = np.empty_like(boxes_yxyx, dtype=np.float32)
        out[:, 0] = (boxes_yxyx[:, 0] - self.y_offset) / self.y_scale
        out[:, 2] = (boxes_yxyx[:, 2] - self.y_offset) / self.y_scale
        out[:, 1] = (boxes_yxyx[:, 1] - self.x_offset) / self.x_scale
        out[:, 3] = (boxes_yxyx[:, 3] - self.x_offset) / self.x_scale
        return np.clip(out, 0.0, 1.0)

    def points_to_image(self, points_xy: np.ndarray) -> np.ndarray:
        """Map [N,K,2] (x, y) points from input space to the original image as :meth:`to_image` maps boxes."""
        offset = np.array([self.x_offset, self.y_offset], np.float32)
        scale = np.array([self.x_scale, self.y_scale], np.float32)
        return np.clip((np.asarray(points_xy, np.float32) - offset) / scale, 0.0, 1.0)

    def to_input(self, boxes_yxyx: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_image` (used to build training targets)."""
        out = np.empty_like(boxes_yxyx, dtype=np.float32)
        out[:, 0] = boxes_yxyx[:, 0] * self.y_scale + self.y_offset
        out[:, 2] = boxes_yxyx[:, 2] * self.y_scale + self.y_offset
        out[:, 1] = boxes_yxyx[:, 1] * self.x_scale + self.x_offset
        out[:, 3] = boxes_yxyx[:, 3] * self.x_scale + self.x_offset
        return out


def fitted_size(src_w: int, src_h: int, width: int, height: int, mode: str) -> tuple[int, int]:
    """The size a src_w x src_h image takes inside a width x height input: all of it when stretched,
    the aspect-preserving fit when letterboxed. Also the least a JPEG may be drafted to."""
    if mode == "stretch":
        return width, height
    if mode != "letterbox":
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    scale = min(width / src_w, height / src_h)
    return max(1, min(width, round(src_w * scale))), max(1, min(height, round(src_h * scale)))


def resize_to_input(image: Image.Image, width: int, height: int, mode: str) -> tuple[Image.Image, Placement]:
    """Resize an RGB image to (width, height): ``stretch`` ignores aspect, ``letterbox`` pads it."""
    new_w, new_h = fitted_size(*image.size, width, height, mode)
    if mode == "stretch":
        if image.size == (width, height):
            return image, Placement()
        return image.resize((width, height), RESAMPLE, reducing_gap=REDUCING_GAP), Placement()
    left, top, placement = _letterbox_place(new_w, new_h, width, height)
    canvas = Image.new("RGB", (width, height), LETTERBOX_FILL)
    fitted = image if image.size == (new_w, new_h) else image.resize((new_w, new_h), RESAMPLE,
                                                                     reducing_gap=REDUCING_GAP)
    canvas.paste(fitted, (left, top))
    return canvas, placement


def resize_array_to_input(pixels: np.ndarray, width: int, height: int, mode: str) -> tuple[np.ndarray, Placement]:
    """:func:`resize_to_input` for an H x W x 3 uint8 array: where both sides shrink, OpenCV's area
    average (an antialiased box filter, closer to the exact image than Pillow's bilinear on a drafted
    JPEG, and cheaper); an enlargement, or no OpenCV, goes through Pillow as above."""
    src_h, src_w = pixels.shape[:2]
    new_w, new_h = fitted_size(src_w, src_h, width, height, mode)
    if cv2 is None or new_w > src_w or new_h > src_h:
        image, placement = resize_to_input(Image.fromarray(pixels), width, height, mode)
        return np.asarray(image), placement
    fitted = pixels if (new_w, new_h) == (src_w, src_h) else cv2.resize(pixels, (new_w, new_h),
                                                                          interpolation=cv2.INTER_AREA)
    if mode == "stretch":
        return fitted, Placement()
    left, top, placement = _letterbox_place(new_w, new_h, width, height)
    # one pass that writes the borders and copies the image: a broadcast fill of the canvas costs 60x more
    canvas = cv2.copyMakeBorder(fitted, top, height - new_h - top, left, width - new_w - left,
                                cv2.BORDER_CONSTANT, value=LETTERBOX_FILL)
    return canvas, placement


def _letterbox_place(new_w: int, new_h: int, width: int, height: int) -> tuple[int, int, Placement]:
    """The fitted image's top-left corner inside the input (centred), and its placement."""
    left, top = (width - new_w) // 2, (height - new_h) // 2
    return left, top, Placement(left / width, top / height, new_w / width, new_h / height)


def box_iou(a, b) -> float:
    """Intersection over union of two (xmin, ymin, xmax, ymax) boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
