"""The Parquet tables of an output folder: one schema each, used by the writer, the tests and the docs."""

from __future__ import annotations

import pyarrow as pa

IMAGES = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("shard_id", pa.string(), nullable=False),
        pa.field("run_id", pa.int32(), nullable=False),  # the run of the output that processed the row (1, 2, …)
        pa.field("width", pa.int32(), nullable=False),  # after EXIF orientation
        pa.field("height", pa.int32(), nullable=False),
        pa.field("num_detections", pa.int32(), nullable=False),  # at or above the score threshold
        pa.field("decode_ms", pa.float32(), nullable=False),
        pa.field("infer_ms", pa.float32(), nullable=False),
    ]
)

# One landmark of a detection (MediaPipe's face keypoints: eyes, nose tip, mouth, ear tragions), normalised
# like the boxes.
KEYPOINT = pa.struct([pa.field("x", pa.float32(), nullable=False), pa.field("y", pa.float32(), nullable=False)])

DETECTIONS = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("shard_id", pa.string(), nullable=False),
        pa.field("run_id", pa.int32(), nullable=False),
        pa.field("class_id", pa.int32(), nullable=False),
        pa.field("label", pa.string(), nullable=True),  # null when the id is outside the labels file
        pa.field("score", pa.float32(), nullable=False),
        # normalised to the original (EXIF-oriented) image, origin top-left, clipped to [0, 1]
        pa.field("xmin", pa.float32(), nullable=False),
        pa.field("ymin", pa.float32(), nullable=False),
        pa.field("xmax", pa.float32(), nullable=False),
        pa.field("ymax", pa.float32(), nullable=False),
        # in the model's order, mapped back to the original image through the same resize inverse as the box and
        # clipped to [0, 1]; null for families whose models have no keypoints (every family but mediapipe)
        pa.field("keypoints", pa.list_(KEYPOINT), nullable=True),
    ]
)

FAILURES = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("shard_id", pa.string(), nullable=False),
        pa.field("run_id", pa.int32(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),  # read | decode | validate | infer | postprocess
        pa.field("error_type", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
    ]
)

# The stored plan (`_plan/chunk-*.parquet`): one row per planned image (per tar, for tar input), with the
# version the listing gave it (size and ETag or mtime; null for manifest input outside incremental runs).
PLAN_SCHEMA = pa.schema([pa.field("shard_id", pa.string(), nullable=False), pa.field("uri", pa.string(), nullable=False),
                         pa.field("version", pa.string(), nullable=True)])

TABLES: dict[str, pa.Schema] = {"images": IMAGES, "detections": DETECTIONS, "failures": FAILURES}
