"""The cheap accurate JPEG decode (issue #34): libjpeg-turbo through simplejpeg straight into a numpy
array, at the reduced scale Pillow's draft would pick, then EXIF orientation by OpenCV; the array is resized by
OpenCV's area average (geometry.resize_array_to_input). Against Pillow's draft + bilinear it skips the
image object's copies and antialiases better per millisecond (benchmarks/results/decode_path_2core.md).

Both packages are optional: where either is missing (or ENABLED is turned off) every image takes
Pillow's path, as do JPEGs this one does not take (CMYK, MPO) and whatever libjpeg-turbo complains about,
so Pillow decides those as it always did.
"""

from __future__ import annotations

import numpy as np

from .geometry import cv2  # None where OpenCV is not installed

try:
    import simplejpeg
except ImportError:
    simplejpeg = None

ENABLED = simplejpeg is not None and cv2 is not None

# EXIF orientation → what displays the stored array upright (Pillow's exif_transpose). OpenCV's copies, not
# numpy's strided views made contiguous: 0.3 against 3.2 ms for a 1000x750 photo turned by 90°.
_ORIENT = {
    2: lambda a: cv2.flip(a, 1),  # mirrored
    3: lambda a: cv2.rotate(a, cv2.ROTATE_180),
    4: lambda a: cv2.flip(a, 0),  # flipped
    5: lambda a: cv2.transpose(a),
    6: lambda a: cv2.rotate(a, cv2.ROTATE_90_CLOCKWISE),
    7: lambda a: cv2.transpose(cv2.rotate(a, cv2.ROTATE_180)),  # transversed
    8: lambda a: cv2.rotate(a, cv2.ROTATE_90_COUNTERCLOCKWISE),
}


def takes(fmt: str | None, mode: str) -> bool:
    """Whether this path decodes an image Pillow identified as `fmt` in `mode` (YCbCr and greyscale JPEGs)."""
    return ENABLED and fmt == "JPEG" and mode in ("RGB", "L")


def draft_scale(width: int, height: int, target_w: int, target_h: int) -> int:
    """Pillow's draft rule: the largest of 1/8, 1/4, 1/2 that keeps both sides at least the target (full
    size where a side is below it). The n/8 scales in between decode slower than 1/2 (Huffman decoding
    dominates), so they are never used."""
    scale = min(width // target_w, height // target_h)
    return next((s for s in (8, 4, 2) if scale >= s), 1)


def decode(data: bytes, width: int, height: int, target: tuple[int, int], orientation) -> np.ndarray | None:
    """The stored width x height JPEG as an upright H x W x 3 RGB array, decoded at the scale that still
    covers `target` (stored orientation); None where libjpeg-turbo reports any problem, even one it
    could recover from, so that Pillow's path decides that image as before."""
    s = draft_scale(width, height, *target)
    try:
        pixels = simplejpeg.decode_jpeg(data, "RGB", min_height=-(-height // s), min_width=-(-width // s))
    except ValueError:
        return None
    turn = _ORIENT.get(orientation) if isinstance(orientation, int) else None
    return pixels if turn is None else turn(pixels)
