"""One shard through one Detector: reads and decodes run ahead in a small thread pool (Pillow and
fsspec release the GIL) while the interpreter works on the previous image, then rows are collected.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator

from .containers import Item, iter_parquet, iter_tar
from .detector import Detector, ImageFailure, ImageResult
from .errors import failure_fields
from .plan import Shard
from .reading import Reader

log = logging.getLogger(__name__)


@dataclass
class ShardRows:
    shard_id: str
    images: dict = field(default_factory=lambda: {k: [] for k in _IMAGE_COLS})
    detections: dict = field(default_factory=lambda: {k: [] for k in _DET_COLS})
    failures: dict = field(default_factory=lambda: {k: [] for k in _FAIL_COLS})

    def add(self, outcome: ImageResult | ImageFailure, labels: list[str] | None) -> None:
        if isinstance(outcome, ImageFailure):
            for k, v in zip(_FAIL_COLS, (outcome.uri, self.shard_id, outcome.stage, outcome.error_type,
                                          outcome.message)):
                self.failures[k].append(v)
            _log_first_failure(self.shard_id, outcome)
            return
        d = outcome.detections
        for k, v in zip(_IMAGE_COLS, (outcome.uri, self.shard_id, outcome.width, outcome.height,
                                       len(d.scores), outcome.decode_ms, outcome.infer_ms)):
            self.images[k].append(v)
        for box, cid, score in zip(d.boxes.tolist(), d.class_ids.tolist(), d.scores.tolist()):
            label = labels[cid] if labels is not None and 0 <= cid < len(labels) else None
            for k, v in zip(_DET_COLS, (outcome.uri, self.shard_id, cid, label, score, *box)):
                self.detections[k].append(v)

    def extend(self, other: "ShardRows") -> None:
        for mine, theirs in ((self.images, other.images), (self.detections, other.detections),
                             (self.failures, other.failures)):
            for k in mine:
                mine[k].extend(theirs[k])

    @classmethod
    def from_columns(cls, shard_id: str, columns: dict) -> "ShardRows":
        rows = cls(shard_id)
        rows.images, rows.detections, rows.failures = columns["images"], columns["detections"], columns["failures"]
        return rows

    @property
    def columns(self) -> dict[str, dict]:
        return {"images": self.images, "detections": self.detections, "failures": self.failures}

    @property
    def counts(self) -> dict:
        return {
            "images": len(self.images["uri"]),
            "detections": len(self.detections["uri"]),
            "failures": len(self.failures["uri"]),
        }


_logged_kinds: set[tuple[str, str]] = set()


def _log_first_failure(shard_id: str, failure: ImageFailure) -> None:
    """The actor's log names the shard and image of the first failure of each kind it meets; the rest
    are counted in the failures table (a bad prefix must not write a million log lines)."""
    kind = (failure.stage, failure.error_type)
    if kind not in _logged_kinds:
        _logged_kinds.add(kind)
        log.warning("%s: %s failed (%s/%s): %s; further %s/%s failures are in the failures table only",
                    shard_id, failure.uri, *kind, failure.message[:300], *kind)


# Set only by tests (forwarded to actors by the driver): images whose URI contains it crash the worker.
_CRASH_ON = os.environ.get("BATCH_DETECT_TEST_CRASH_ON")

_IMAGE_COLS = ("uri", "shard_id", "width", "height", "num_detections", "decode_ms", "infer_ms")
_DET_COLS = ("uri", "shard_id", "class_id", "label", "score", "xmin", "ymin", "xmax", "ymax")
_FAIL_COLS = ("uri", "shard_id", "stage", "error_type", "message")


def shard_items(shard: Shard, reader: Reader, extensions: tuple[str, ...], image_column: str | None,
                stats: dict) -> Iterator[Item]:
    """(uri, bytes getter) for each image of a shard. Files are read on the prefetch threads (the getter
    reads); tar members and Parquet cells arrive from one sequential stream (the getter hands them over)."""
    if shard.form == "tar":
        return iter_tar(shard.source, reader.filesystem(shard.source), extensions, stats)
    if shard.form == "parquet":
        return iter_parquet(shard, reader.filesystem(shard.source), image_column)
    return ((uri, partial(reader.read, uri)) for uri in shard.uris)


def run_shard(
    shard: Shard,
    detector: Detector,
    reader: Reader,
    labels: list[str] | None,
    pool: ThreadPoolExecutor,
    prefetch: int,
    extensions: tuple[str, ...] = (),
    image_column: str | None = None,
) -> tuple[ShardRows, dict]:
    rows = ShardRows(shard.shard_id)
    timings = {"read_decode_s": 0.0, "infer_s": 0.0}

    def load(uri: str, get_bytes):
        # read + decode + tensor, off the inference thread; exceptions travel back as values
        t0 = time.perf_counter()
        stage = "read"
        try:
            data = get_bytes()
            stage = "decode"
            prepared = detector.prepare(data)
            return prepared, None, time.perf_counter() - t0
        except Exception as exc:
            return None, ImageFailure(uri, *failure_fields(exc, stage)), time.perf_counter() - t0

    window: deque = deque()
    items = shard_items(shard, reader, extensions, image_column, timings)
    depth = max(prefetch, 2 * detector.batch)  # a full batch ready while the previous one runs

    def refill() -> None:
        while len(window) < depth:
            nxt = next(items, None)
            if nxt is None:
                return
            window.append((nxt[0], pool.submit(load, *nxt)))

    refill()
    while window:
        batch = []
        while window and len(batch) < detector.batch:
            uri, future = window.popleft()
            refill()
            prepared, failure, spent = future.result()
            timings["read_decode_s"] += spent
            if failure is not None:
                rows.add(failure, labels)
            else:
                batch.append((uri, *prepared))
        if not batch:
            continue
        t0 = time.perf_counter()
        if _CRASH_ON and any(_CRASH_ON in item[0] for item in batch):
            # Test-only fault injection: die the way a segfault in native code would.
            os.kill(os.getpid(), signal.SIGSEGV)
        for outcome in detector.finish_batch(batch):
            rows.add(outcome, labels)
        timings["infer_s"] += time.perf_counter() - t0
    return rows, timings
