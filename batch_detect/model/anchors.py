"""Anchors for detectors that output one prediction per anchor and leave the decode to the caller: the TF
Object Detection API's SSD anchor generator and MediaPipe's SSD-anchors calculator, rebuilt from their
published settings, or a user's file. Anchors are [N, 4] cy, cx, h, w, normalised to the input."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, ModelError


@dataclass(frozen=True)
class AnchorLayout:
    """A recognised (or given) set of anchors and where it came from."""

    name: str
    anchors: np.ndarray  # [N, 4] cy, cx, h, w

    def describe(self) -> str:
        return f"{self.name} ({len(self.anchors)} anchors)"


def _tile(grid_h: int, grid_w: int, heights: list[float], widths: list[float]) -> np.ndarray:
    # Row-major cells, then the cell's boxes in spec order: both generators lay anchors out this way.
    ys = (np.arange(grid_h, dtype=np.float64) + 0.5) / grid_h
    xs = (np.arange(grid_w, dtype=np.float64) + 0.5) / grid_w
    cy, cx, k = np.meshgrid(ys, xs, np.arange(len(heights)), indexing="ij")
    h, w = np.asarray(heights)[k], np.asarray(widths)[k]
    return np.stack([cy, cx, h, w], -1).reshape(-1, 4)


SSD_ASPECT_RATIOS = (1.0, 2.0, 0.5, 3.0, 0.3333)


def ssd_anchors(grids: list[int], min_scale: float = 0.2, max_scale: float = 0.95,
                aspect_ratios: tuple[float, ...] = SSD_ASPECT_RATIOS, reduce_lowest: bool = True) -> np.ndarray:
    """The TF OD API `ssd_anchor_generator` (multiple_grid_anchor_generator.create_ssd_anchors) on square
    feature maps: linear scales, one interpolated sqrt(s_i s_i+1) box of aspect 1, and three boxes only
    (0.1 at 1:1, scale at 2:1 and 1:2) in the lowest layer."""
    n = len(grids)
    scales = [min_scale + (max_scale - min_scale) * i / (n - 1) for i in range(n)] + [1.0]
    out = []
    for layer, grid in enumerate(grids):
        s, s_next = scales[layer], scales[layer + 1]
        if layer == 0 and reduce_lowest:
            specs = [(0.1, 1.0), (s, 2.0), (s, 0.5)]
        else:
            specs = [(s, ar) for ar in aspect_ratios] + [(math.sqrt(s * s_next), 1.0)]
        heights = [sc / math.sqrt(ar) for sc, ar in specs]
        widths = [sc * math.sqrt(ar) for sc, ar in specs]
        out.append(_tile(grid, grid, heights, widths))
    return np.concatenate(out).astype(np.float32)


def _ssd_grids(size: int) -> list[int]:
    # SSD-MobileNet heads: the stride-16 feature map, then five stride-2 extra layers (ceil each time).
    grids = [math.ceil(size / 16)]
    while len(grids) < 6:
        grids.append(math.ceil(grids[-1] / 2))
    return grids


def mediapipe_anchors(input_hw: tuple[int, int], strides: tuple[int, ...], interpolated: bool = True) -> np.ndarray:
    """MediaPipe's SsdAnchorsCalculator with fixed_anchor_size (w = h = 1), aspect ratio 1 and centre offset
    0.5: consecutive layers of one stride share a grid, each adding one box (two with the interpolated
    scale) per cell."""
    out, layer = [], 0
    while layer < len(strides):
        same = [s for s in strides[layer:] if s == strides[layer]]
        per_cell = len(same) * (2 if interpolated else 1)
        grid_h, grid_w = math.ceil(input_hw[0] / strides[layer]), math.ceil(input_hw[1] / strides[layer])
        out.append(_tile(grid_h, grid_w, [1.0] * per_cell, [1.0] * per_cell))
        layer += len(same)
    return np.concatenate(out).astype(np.float32)


# MediaPipe's published detector graphs (mediapipe/modules/*/…_cpu.pbtxt): input size, strides, whether
# the interpolated-scale box is on.
MEDIAPIPE_LAYOUTS = {
    "mediapipe face short range": ((128, 128), (8, 16, 16, 16), True),
    "mediapipe face full range": ((192, 192), (4,), False),
    "mediapipe face back camera": ((256, 256), (16, 32, 32, 32), True),
    "mediapipe palm": ((192, 192), (8, 16, 16, 16), True),
    "mediapipe pose": ((224, 224), (8, 16, 32, 32, 32), True),
}


def _known(family: str, input_hw: tuple[int, int]) -> list[tuple[str, int, object]]:
    """(name, N, build) of every layout this family knows, for the message when none fits too."""
    if family == "mediapipe":
        return [(name, _count(hw, st, it), (lambda hw=hw, st=st, it=it: mediapipe_anchors(hw, st, it)))
                for name, (hw, st, it) in MEDIAPIPE_LAYOUTS.items() if hw == tuple(input_hw)] + \
               [(f"{name} (input {hw[0]}x{hw[1]})", _count(hw, st, it), None)
                for name, (hw, st, it) in MEDIAPIPE_LAYOUTS.items() if hw != tuple(input_hw)]
    grids = _ssd_grids(input_hw[0]) if input_hw[0] == input_hw[1] else None
    if grids is None:
        return []
    n = grids[0] ** 2 * 3 + sum(g * g * 6 for g in grids[1:])
    name = f"tf-od-api ssd {input_hw[0]}x{input_hw[1]} (grids {','.join(map(str, grids))})"
    return [(name, n, lambda: ssd_anchors(grids))]


def _count(hw, strides, interpolated) -> int:
    return len(mediapipe_anchors(hw, strides, interpolated))


def recognise_anchors(family: str, input_hw: tuple[int, int], n: int,
                      anchors_file: str | np.ndarray | None = None) -> AnchorLayout:
    """The anchors of a raw per-anchor detector: the user's (a file, or its rows as the driver read them for
    workers that may not see the file), else the published layout that fits the input size and the N
    predictions; refused, naming the layouts known, when none does."""
    if anchors_file is not None:
        given = isinstance(anchors_file, np.ndarray)
        anchors = anchors_file.astype(np.float32) if given else load_anchors(anchors_file)
        name = "--anchors (given)" if given else f"file {os.path.basename(anchors_file)}"
        if len(anchors) != n:
            raise ModelError(f"{name} holds {len(anchors)} anchors; the model predicts {n}")
        return AnchorLayout(name, anchors)
    known = _known(family, input_hw)
    for name, count, build in known:
        if count == n and build is not None:
            return AnchorLayout(name, build())
    listed = "; ".join(f"{name}: {count}" for name, count, _ in known) or "none for a non-square input"
    raise ModelError(f"no known {family} anchor layout gives {n} anchors for input {input_hw[0]}x{input_hw[1]} "
                     f"(known: {listed}). Pass --anchors FILE (N x 4 rows cy, cx, h, w normalised; .npy or .csv)")


def load_anchors(path: str) -> np.ndarray:
    """An [N, 4] cy, cx, h, w file: .npy, or .csv (comma or whitespace separated, no header)."""
    try:
        if path.endswith(".npy"):
            anchors = np.load(path, allow_pickle=False)
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read().replace(",", " ")
            anchors = np.array([[float(v) for v in line.split()] for line in text.splitlines() if line.strip()])
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--anchors {path}: cannot read it ({exc})") from None
    if anchors.ndim != 2 or anchors.shape[1] != 4 or not np.isfinite(anchors).all():
        raise ConfigError(f"--anchors {path}: want N rows of 4 finite numbers (cy, cx, h, w), got shape "
                          f"{list(anchors.shape)}")
    return anchors.astype(np.float32)
