"""A shard's rows, built with numpy/Arrow per image (no Python per box): the same table as one row per box."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from batch_detect.model.decoding import Detections
from batch_detect.model.detector import ImageFailure, ImageResult
from batch_detect.output.schema import DETECTIONS
from batch_detect.run.worker import ShardRows, summarize_shard


def result(uri: str, class_ids, seed: int, keypoints: int | None = None) -> ImageResult:
    rng = np.random.default_rng(seed)
    n = len(class_ids)
    lo = rng.random((n, 2)).astype(np.float32) / 2
    boxes = np.concatenate([lo, lo + 0.25], axis=1)
    points = None if keypoints is None else rng.random((n, keypoints, 2)).astype(np.float32)
    return ImageResult(uri, 640, 480, Detections(boxes=boxes, class_ids=np.asarray(class_ids, np.int64),
                                                 scores=rng.random(n).astype(np.float32), keypoints=points), 1.0, 2.0)


def per_box(shard_id: str, outcomes, labels) -> list[tuple]:
    """The table as the obvious loop over boxes writes it."""
    out = []
    for o in outcomes:
        if isinstance(o, ImageFailure):
            continue
        d = o.detections
        points = [None] * len(d.scores) if d.keypoints is None else d.keypoints.tolist()
        for box, cid, score, kps in zip(d.boxes.tolist(), d.class_ids.tolist(), d.scores.tolist(), points):
            label = labels[cid] if labels and 0 <= cid < len(labels) else None
            kps = None if kps is None else [{"x": np.float32(x), "y": np.float32(y)} for x, y in kps]
            out.append((o.uri, shard_id, cid, label, np.float32(score), *map(np.float32, box), kps))
    return out


def table_rows(columns: dict) -> list[tuple]:
    table = pa.table({k: columns[k] for k in DETECTIONS.names if k != "run_id"})
    def cell(v):
        if isinstance(v, list):
            return [{k: np.float32(x) for k, x in p.items()} for p in v]
        return np.float32(v) if isinstance(v, float) else v

    return [tuple(cell(v) for v in row.values()) for row in table.to_pylist()]


def test_rows_match_the_per_box_loop_with_labels_out_of_range_ids_and_empty_images():
    labels = ["cat", "dog"]
    outcomes = [result("a.jpg", [0, 1, 5, -1], 1), result("b.jpg", [], 2),
                ImageFailure("c.jpg", "decode", "corrupt_image", "bad"), result("d.jpg", [1, 1], 3),
                result("e.jpg", [0, 0, 1], 8, keypoints=6), result("f.jpg", [1], 9, keypoints=0)]
    rows = ShardRows("shard-000003")
    for o in outcomes:
        rows.add(o, labels)
    assert table_rows(rows.detections) == per_box("shard-000003", outcomes, labels)
    assert rows.counts == {"images": 5, "detections": 10, "failures": 1}
    # null where the family has none, a list (empty for a model with no points) where it has
    assert rows.detections["keypoints"].null_count == 6 and rows.detections["keypoints"][-1].as_py() == []
    assert rows.unlabelled_class_ids() == {"-1": 1, "5": 1}
    assert summarize_shard(rows, {}, 0.5, "node")["unlabelled_class_ids"] == {"-1": 1, "5": 1}


def test_rows_without_labels_and_without_any_detection():
    rows = ShardRows("shard-000001")
    rows.add(result("a.jpg", [2], 4), None)
    assert rows.detections["label"].null_count == 1 and rows.unlabelled_class_ids() == {"2": 1}
    empty = ShardRows("shard-000002")
    empty.add(result("b.jpg", [], 5), ["x"])
    assert empty.counts["detections"] == 0
    assert all(len(v) == 0 and v.type == DETECTIONS.field(k).type for k, v in empty.detections.items())


def test_extend_and_round_trip_keep_the_order_of_the_parts():
    labels = ["cat", "dog"]
    first, second = [result("a.jpg", [0], 6)], [result("b.jpg", [1, 0], 7, keypoints=3)]
    whole = ShardRows("shard-000004")
    for o in first:
        whole.add(o, labels)
    part = ShardRows("shard-000004")
    for o in second:
        part.add(o, labels)
    # what an isolating driver does: a part's columns come back from an actor and are appended
    whole.extend(ShardRows.from_columns("shard-000004", part.columns))
    assert table_rows(whole.detections) == per_box("shard-000004", first + second, labels)
    assert whole.images["uri"] == ["a.jpg", "b.jpg"]
