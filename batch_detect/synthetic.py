"""Synthetic scenes with known boxes: the ground truth for fixtures, tests and the demo.

Only numpy and Pillow, so tests and `make demo` can draw images without TensorFlow.
Image ``i`` of a dataset depends only on ``(seed, i)``, never on how many images are drawn.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

CLASSES: tuple[str, ...] = ("circle", "square", "triangle")

# (width, height) pairs covering landscape, portrait and square images of several sizes.
DEFAULT_SIZES: tuple[tuple[int, int], ...] = (
    (320, 240), (640, 480), (480, 640), (400, 400), (800, 450), (300, 400), (512, 384),
)


@dataclass(frozen=True)
class GroundTruthBox:
    class_id: int
    label: str
    xmin: float  # normalised to the image, origin top-left
    ymin: float
    xmax: float
    ymax: float


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    base = rng.uniform(40, 215, size=3)
    # A linear gradient plus per-pixel noise: backgrounds vary but never look like a shape.
    gy, gx = np.mgrid[0:height, 0:width].astype(np.float32)
    direction = rng.uniform(-1, 1, size=(2, 3)) * 40
    grad = gx[..., None] / max(width, 1) * direction[0] + gy[..., None] / max(height, 1) * direction[1]
    noise = rng.normal(0, rng.uniform(4, 18), size=(height, width, 3))
    return np.clip(base + grad + noise, 0, 255).astype(np.uint8)


def _contrasting_colour(rng: np.random.Generator, background_mean: np.ndarray) -> tuple[int, int, int]:
    for _ in range(50):
        colour = rng.integers(0, 256, size=3)
        if np.abs(colour - background_mean).sum() > 180:
            return tuple(int(c) for c in colour)
    return tuple(int(c) for c in (255 - background_mean))


def _overlaps(box: tuple[float, float, float, float], others: list[tuple[float, float, float, float]]) -> bool:
    x0, y0, x1, y1 = box
    return any(not (x1 <= a0 or a1 <= x0 or y1 <= b0 or b1 <= y0) for a0, b0, a1, b1 in others)


def draw_scene(
    rng: np.random.Generator,
    width: int,
    height: int,
    max_objects: int = 3,
    min_size: float = 0.18,
    max_size: float = 0.42,
) -> tuple[Image.Image, list[GroundTruthBox]]:
    """Draw 1..max_objects non-overlapping shapes; sizes are fractions of the shorter side."""
    pixels = _background(rng, width, height)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    mean = pixels.reshape(-1, 3).mean(axis=0)
    placed: list[tuple[float, float, float, float]] = []
    boxes: list[GroundTruthBox] = []
    short = min(width, height)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(30):
            class_id = int(rng.integers(0, len(CLASSES)))
            size = float(rng.uniform(min_size, max_size)) * short
            w = h = size
            if CLASSES[class_id] == "triangle":
                h = size * 0.9
            x0 = float(rng.uniform(0, width - w))
            y0 = float(rng.uniform(0, height - h))
            box = (x0, y0, x0 + w, y0 + h)
            # A margin keeps shapes from touching, so each box is unambiguous.
            padded = (x0 - 4, y0 - 4, x0 + w + 4, y0 + h + 4)
            if not _overlaps(padded, placed):
                break
        else:
            continue
        colour = _contrasting_colour(rng, mean)
        label = CLASSES[class_id]
        if label == "circle":
            draw.ellipse(box, fill=colour)
        elif label == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(x0 + w / 2, y0), (x0 + w, y0 + h), (x0, y0 + h)], fill=colour)
        placed.append(box)
        boxes.append(
            GroundTruthBox(class_id, label, box[0] / width, box[1] / height, box[2] / width, box[3] / height)
        )
    return image, boxes


def scene_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


def write_dataset(
    folder: str,
    count: int,
    seed: int = 0,
    sizes: tuple[tuple[int, int], ...] = DEFAULT_SIZES,
    fmt: str = "jpg",
    quality: int = 92,
) -> dict[str, list[GroundTruthBox]]:
    """Write ``count`` images and ``ground_truth.json``; returns {file name: boxes}."""
    os.makedirs(folder, exist_ok=True)
    truth: dict[str, list[GroundTruthBox]] = {}
    for i in range(count):
        rng = scene_rng(seed, i)
        width, height = sizes[i % len(sizes)]
        image, boxes = draw_scene(rng, width, height)
        name = f"img_{i:05d}.{fmt}"
        if fmt == "jpg":
            image.save(os.path.join(folder, name), quality=quality)
        else:
            image.save(os.path.join(folder, name))
        truth[name] = boxes
    with open(os.path.join(folder, "ground_truth.json"), "w") as fh:
        json.dump({k: [asdict(b) for b in v] for k, v in truth.items()}, fh, indent=1)
    return truth


def load_ground_truth(path: str) -> dict[str, list[GroundTruthBox]]:
    with open(path) as fh:
        raw = json.load(fh)
    return {k: [GroundTruthBox(**b) for b in v] for k, v in raw.items()}
