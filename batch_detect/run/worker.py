"""One shard through one Detector: reads and decodes run ahead in small thread pools (Pillow and
fsspec release the GIL) while the interpreter works on the previous image, then rows are collected.
`ShardProcessor` is the worker that holds the detector: a Ray actor on a cluster, a plain process for a
small run without Ray (`local.py`).
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator

import numpy as np
import pyarrow as pa

from ..inputs.containers import Item, iter_parquet, iter_tar
from ..model.detector import Detector, ImageFailure, ImageResult
from ..errors import ModelError, StoreUnavailable, failure_fields
from .. import outage
from ..model.interpreter import load_backend, read_model, sha256
from ..inputs.plan import Shard
from .readahead import BYTES_BUDGET as READ_BYTES_BUDGET, MAX_READS, ReadAhead
from ..inputs.reading import Reader
from ..output.schema import DETECTIONS, KEYPOINT
from ..output.sink import OutputStore

log = logging.getLogger(__name__)

PREFETCH = 4  # images decoded ahead of the interpreter, per worker (reads go further ahead: readahead.py)


@dataclass(frozen=True)
class WorkerSettings:
    model_url: str
    model_sha256: str
    memory_per_actor: int
    backend: str
    num_threads: int
    score_threshold: float
    resize: str
    normalization: str
    max_pixels: int
    jpeg_draft: bool
    labels: list | None
    output_url: str
    storage_options: dict
    extensions: tuple[str, ...] = ()  # which tar members are images
    image_column: str | None = None  # Parquet input: the column of image bytes
    batch_size: int = 1  # images per invoke, where the model's batch dimension is dynamic
    prefetch: int = PREFETCH
    output_format: str = "auto"
    anchors: np.ndarray | None = None  # --anchors as the driver read it: workers need not see the file
    nms: str = "auto"
    read_ahead: int = 0  # images read ahead per worker; 0: sized from the measured read latency
    decode_threads: int | None = None  # None: decode_threads(num_threads, depth); 0: on the interpreter's thread
    store_timeout: float = outage.DEFAULT_BUDGET_S  # --store-timeout: how long this process waits out a store


class ShardProcessor:
    """Holds one interpreter for its lifetime; processes whole shards and stages their rows itself."""

    def __init__(self, settings: WorkerSettings, node_id: str):
        outage.configure(settings.store_timeout)
        backend = load_backend(settings.backend)
        # Each worker streams the model from its URL (a restart reads it again), and runs only the
        # exact bytes the driver checked.
        model_content = read_model(settings.model_url, settings.storage_options)
        if sha256(model_content) != settings.model_sha256:
            raise ModelError(f"model {settings.model_url!r} changed since the job started (sha256 differs)")
        self.detector = Detector(
            backend,
            model_content,
            num_threads=settings.num_threads,
            score_threshold=settings.score_threshold,
            resize=settings.resize,
            normalization=settings.normalization,
            max_pixels=settings.max_pixels,
            model_url=settings.model_url,
            jpeg_draft=settings.jpeg_draft,
            output_format=settings.output_format,
            anchors=settings.anchors,
            nms=settings.nms,
        )
        self.detector.set_batch(settings.batch_size)
        self.settings = settings
        self.node_id = node_id
        self.reader = Reader(settings.storage_options)
        self.store = OutputStore(settings.output_url, settings.storage_options)
        depth = max(settings.prefetch, 2 * self.detector.batch)  # a full batch ready while the previous one runs
        self.pools = Pools.create(decode_threads(settings.num_threads, depth, settings.decode_threads), depth)
        self.read_ahead = ReadAhead(settings.read_ahead)  # kept across shards: the next starts sized

    def _run(self, shard: Shard):
        s = self.settings
        return run_shard(shard, self.detector, self.reader, s.labels, self.pools, self.read_ahead, s.extensions,
                         s.image_column)

    def process_part(self, part: Shard) -> dict:
        """Some of a shard's images, rows returned instead of written (used to isolate poison images)."""
        rows, _ = self._run(part)
        return {"images": rows.images, "detections": rows.detections, "failures": rows.failures}

    def process_timed(self, shard: Shard) -> tuple[dict, dict]:
        t0, retries = time.perf_counter(), outage.OUTAGE.retries
        rows, timings = self._run(shard)
        self.store.write_shard(shard.shard_id, rows.columns, shard.run)
        timings["store_retries"] = outage.OUTAGE.retries - retries  # this process's, while the shard ran
        return summarize_shard(rows, timings, time.perf_counter() - t0, self.node_id), timings

    def process(self, shard: Shard) -> dict:
        return self.process_timed(shard)[0]


def decode_threads(interpreter_threads: int, depth: int, chosen: int | None = None) -> int:
    """Decode threads per worker: `chosen` (--decode-threads; 0: on the interpreter's thread) or enough to
    keep an interpreter of this many threads fed, and no more than the `depth` decoded images that may wait
    for it (more would idle: the window, not the threads, bounds the memory of images being decoded).
    (Decoding on the interpreter's thread, as a node full of workers gains nothing from the overlap,
    measured within noise on 2 cores, median +1% over five paired runs, and on 16: not the default.)"""
    if chosen is not None:
        return chosen
    return max(1, min(depth, max(2, interpreter_threads)))


def _peak_rss_mb() -> float:
    """This process's resident peak so far: what its memory reservation must cover. /proc's VmHWM starts
    afresh at exec (getrusage's maximum would carry the driver's peak into a worker it started)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def summarize_shard(rows: "ShardRows", timings: dict, wall_s: float, node_id: str) -> dict:
    """A committed shard's line in the commit log: counts, failure kinds, where and how long."""
    breakdown: dict[str, int] = {}
    for stage, etype in zip(rows.failures["stage"], rows.failures["error_type"]):
        key = f"{stage}/{etype}"
        breakdown[key] = breakdown.get(key, 0) + 1
    unlabelled = rows.unlabelled_class_ids()
    peak_rss_mb = _peak_rss_mb()
    return {"shard_id": rows.shard_id, **rows.counts, "failure_types": breakdown, "wall_s": round(wall_s, 4),
            "unlabelled_class_ids": unlabelled, "node_id": node_id, "pid": os.getpid(), "peak_rss_mb": peak_rss_mb,
            **{k: round(v, 4) if isinstance(v, float) else v for k, v in timings.items()}}


@dataclass
class ShardRows:
    """A shard's rows, column by column. Detections are kept as each image's arrays and joined once per
    shard with numpy (no Python per box): an image can have hundreds of boxes."""

    shard_id: str
    images: dict = field(default_factory=lambda: {k: [] for k in _IMAGE_COLS})
    failures: dict = field(default_factory=lambda: {k: [] for k in _FAIL_COLS})
    # per image with detections: (uri, boxes [n,4] xyxy, class ids, scores); and column dicts (extend)
    _boxes: list = field(default_factory=list)
    _chunks: list = field(default_factory=list)
    _labels: list | None = None

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
        if len(d.scores):
            self._boxes.append((outcome.uri, d.boxes, d.class_ids, d.scores, d.keypoints))
            self._labels = labels

    @property
    def detections(self) -> dict:
        """The detections table's columns as Arrow arrays (null labels where an id has none)."""
        if self._boxes:
            self._chunks.append(_detection_columns(self.shard_id, self._boxes, self._labels))
            self._boxes = []
        if not self._chunks:
            return {k: pa.array([], type=DETECTIONS.field(k).type) for k in _DET_COLS}
        if len(self._chunks) > 1:
            self._chunks = [{k: pa.concat_arrays([_as_arrow(c[k], k) for c in self._chunks]) for k in _DET_COLS}]
        return self._chunks[0]

    def extend(self, other: "ShardRows") -> None:
        for mine, theirs in ((self.images, other.images), (self.failures, other.failures)):
            for k in mine:
                mine[k].extend(theirs[k])
        self.detections  # noqa: B018 - this shard's own boxes first, in order
        self._chunks.append(other.detections)

    @classmethod
    def from_columns(cls, shard_id: str, columns: dict) -> "ShardRows":
        rows = cls(shard_id)
        rows.images, rows.failures = columns["images"], columns["failures"]
        rows._chunks = [columns["detections"]]
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

    def unlabelled_class_ids(self) -> dict[str, int]:
        """Detections whose class id has no label, counted per id (the run warns about them)."""
        det = self.detections
        missing = det["label"].is_null().to_numpy(zero_copy_only=False)
        ids, counts = np.unique(det["class_id"].to_numpy()[missing], return_counts=True)
        return {str(int(i)): int(n) for i, n in zip(ids, counts)}


def _detection_columns(shard_id: str, boxes: list, labels: list | None) -> dict:
    # Arrow builds the string columns by index (`take`): from Python objects it costs ~100x more.
    counts = [len(scores) for _, _, _, scores, _ in boxes]
    total = sum(counts)
    image_of = np.repeat(np.arange(len(boxes), dtype=np.int32), counts)
    xyxy = np.concatenate([b for _, b, _, _, _ in boxes]).astype(np.float32, copy=False).reshape(total, 4)
    class_ids = np.concatenate([c for _, _, c, _, _ in boxes]).astype(np.int32, copy=False)
    if labels:
        known = (class_ids >= 0) & (class_ids < len(labels))
        label = pa.array(list(labels) + [None], type=pa.string()).take(np.where(known, class_ids, len(labels)))
    else:
        label = pa.nulls(total, type=pa.string())
    return {
        "uri": pa.array([u for u, _, _, _, _ in boxes], type=pa.string()).take(image_of),
        "shard_id": pa.array([shard_id], type=pa.string()).take(np.zeros(total, dtype=np.int32)),
        "class_id": pa.array(class_ids),
        "label": label,
        "score": pa.array(np.concatenate([s for _, _, _, s, _ in boxes]).astype(np.float32, copy=False)),
        "xmin": pa.array(np.ascontiguousarray(xyxy[:, 0])), "ymin": pa.array(np.ascontiguousarray(xyxy[:, 1])),
        "xmax": pa.array(np.ascontiguousarray(xyxy[:, 2])), "ymax": pa.array(np.ascontiguousarray(xyxy[:, 3])),
        "keypoints": _keypoint_column(boxes, total),
    }


def _keypoint_column(boxes: list, total: int) -> pa.Array:
    """The keypoints list column: one list per detection, null where the image's family has none."""
    points = [(len(s), k) for _, _, _, s, k in boxes]
    if all(k is None for _, k in points):
        return pa.nulls(total, type=DETECTIONS.field("keypoints").type)
    lengths = np.concatenate([np.full(n, 0 if k is None else k.shape[1], np.int32) for n, k in points])
    flat = np.concatenate([k.reshape(-1, 2) for _, k in points if k is not None]).astype(np.float32, copy=False)
    values = pa.StructArray.from_arrays([pa.array(flat[:, 0]), pa.array(flat[:, 1])], fields=list(KEYPOINT))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    missing = pa.array(np.concatenate([np.full(n, k is None) for n, k in points]))
    return pa.ListArray.from_arrays(offsets, values, type=DETECTIONS.field("keypoints").type, mask=missing)


def _as_arrow(values, name: str) -> pa.Array:
    return values if isinstance(values, pa.Array) else pa.array(values, type=DETECTIONS.field(name).type)


_logged_kinds: set[tuple[str, str]] = set()


def _log_first_failure(shard_id: str, failure: ImageFailure) -> None:
    """The actor's log names the shard and image of the first failure of each kind it meets; the rest
    are counted in the failures table (a bad prefix must not write a million log lines)."""
    kind = (failure.stage, failure.error_type)
    if kind not in _logged_kinds:
        _logged_kinds.add(kind)
        log.warning("%s: %s failed (%s/%s): %s; progress counts it once its shard commits, and further %s/%s "
                    "failures are in the failures table only", shard_id, failure.uri, *kind, failure.message[:300],
                    *kind)


# Set only by tests (forwarded to actors by the driver): images whose URI contains it crash the worker.
_CRASH_ON = os.environ.get("BATCH_DETECT_TEST_CRASH_ON")
# Set only by tests: seconds each batch takes longer, so that a run can be stopped while it is surely under way.
_SLOW_BATCH_S = float(os.environ.get("BATCH_DETECT_TEST_SLOW_BATCH_S") or 0)

_IMAGE_COLS = ("uri", "shard_id", "width", "height", "num_detections", "decode_ms", "infer_ms")
_DET_COLS = ("uri", "shard_id", "class_id", "label", "score", "xmin", "ymin", "xmax", "ymax", "keypoints")
_FAIL_COLS = ("uri", "shard_id", "stage", "error_type", "message")


def shard_items(shard: Shard, reader: Reader, extensions: tuple[str, ...], image_column: str | None,
                stats: dict) -> Iterator[Item]:
    """(uri, bytes getter) for each image of a shard. Files are read on the read threads (the getter
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
    pools: "Pools",
    read_ahead: ReadAhead,
    extensions: tuple[str, ...] = (),
    image_column: str | None = None,
) -> tuple[ShardRows, dict]:
    """Three stages, each bounded: reads (as many ahead as the store's latency needs, `read_ahead`),
    decodes (`pools.depth` decoded images at most: the memory that counts) and the interpreter on this
    thread. Order is kept: rows come out in the shard's order."""
    rows = ShardRows(shard.shard_id)
    window = _Window.open(shard, detector, reader, pools, read_ahead, extensions, image_column)
    try:
        _drain(window, rows, labels)
    finally:
        window.close()
    return rows, window.finish()


def _read(uri: str, get_bytes):
    # on a read thread (or a stream's); exceptions travel back as values
    t0 = time.perf_counter()
    try:
        return get_bytes(), None, time.perf_counter() - t0
    except StoreUnavailable:
        raise  # the whole shard stops: no image becomes a failure record for the store's outage
    except Exception as exc:
        return None, ImageFailure(uri, *failure_fields(exc, "read")), time.perf_counter() - t0


def _decode(detector: Detector, uri: str, read_future: Future):
    # on a decode thread, in shard order; exceptions travel back as values
    data, failure, read_s = read_future.result()
    if failure is not None:
        return None, failure, read_s, 0.0, 0
    t0 = time.perf_counter()
    try:
        return detector.prepare(data), None, read_s, time.perf_counter() - t0, len(data)
    except Exception as exc:
        return None, ImageFailure(uri, *failure_fields(exc, "decode")), read_s, time.perf_counter() - t0, len(data)


@dataclass(slots=True)
class _Window:
    """A shard's images ahead of the interpreter, in shard order: being read (`reads`: uri, read future)
    and decoded or decoding (`decodes`: uri, decode future), with the shard's timings."""

    items: Iterator[Item]  # a StreamAhead where `sequential`
    sequential: bool  # bytes arrive from one stream (tar, Parquet), read on a thread of its own
    detector: Detector
    pools: "Pools"
    read_ahead: ReadAhead
    timings: dict
    reads: deque = field(default_factory=deque)
    decodes: deque = field(default_factory=deque)
    exhausted: bool = False

    @classmethod
    def open(cls, shard: Shard, detector: Detector, reader: Reader, pools: "Pools", read_ahead: ReadAhead,
             extensions: tuple[str, ...], image_column: str | None) -> "_Window":
        timings = {"read_decode_s": 0.0, "infer_s": 0.0, "read_s": 0.0, "decode_s": 0.0, "stall_s": 0.0,
                   "read_bytes": 0}
        sequential = shard.form in ("tar", "parquet")
        items = shard_items(shard, reader, extensions, image_column, timings)
        if sequential:
            items = StreamAhead(items, _read, pools.depth, pools.read)
        return cls(items, sequential, detector, pools, read_ahead, timings)

    def ahead(self) -> int:
        return self.pools.depth if self.sequential else max(self.pools.depth, self.read_ahead.reads)

    def refill(self) -> None:
        # Images ahead of the interpreter: `depth` decoded (or decoding), and as many more being read as
        # the store's latency needs (read_ahead.reads counts both: Little's law over the whole window).
        reads, decodes, depth, sequential = self.reads, self.decodes, self.pools.depth, self.sequential
        target = self.ahead()
        while not self.exhausted and len(reads) + len(decodes) < target:
            t0 = time.perf_counter()
            nxt = next(self.items, None)
            if sequential:  # waiting for the stream's thread: the interpreter stalls on the store
                self.timings["stall_s"] += time.perf_counter() - t0
            if nxt is None:
                self.exhausted = True
                break
            if sequential:
                done: Future = Future()
                done.set_result(nxt[1])  # read on the stream's thread
                reads.append((nxt[0], done))
            else:
                reads.append((nxt[0], self.pools.read.submit(_read, *nxt)))
        while reads and len(decodes) < depth:
            uri, read_future = reads.popleft()
            decodes.append((uri, self.pools.decode.submit(_decode, self.detector, uri, read_future)))

    def close(self) -> None:
        # A shard that raised leaves nothing queued for the next one (started work just finishes).
        for _, future in (*self.reads, *self.decodes):
            future.cancel()
        if self.sequential:
            self.items.close()

    def finish(self) -> dict:
        """The shard's timings, with the window it ran with."""
        self.timings["images_ahead"] = self.ahead()
        self.timings["decode_depth"] = self.pools.depth
        return self.timings


def _drain(window: _Window, rows: "ShardRows", labels: list[str] | None) -> None:
    """The interpreter's loop: take decoded images in order, a batch at a time, and keep the stages fed."""
    decodes, refill, timings, sequential = window.decodes, window.refill, window.timings, window.sequential
    detector, read_ahead, inline = window.detector, window.read_ahead, window.pools.inline
    refill()
    while decodes:
        batch = []
        while decodes and len(batch) < detector.batch:
            uri, future = decodes.popleft()
            refill()
            t0 = time.perf_counter()
            prepared, failure, read_s, decode_s, nbytes = future.result()
            # decoded right here (--decode-threads 0): that time is decode, not a wait
            timings["stall_s"] += time.perf_counter() - t0 - (decode_s if inline else 0.0)
            timings["read_s"] += read_s
            timings["decode_s"] += decode_s
            timings["read_decode_s"] += read_s + decode_s
            timings["read_bytes"] += nbytes
            if not sequential and nbytes:
                read_ahead.read_done(read_s, nbytes)
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
        if _SLOW_BATCH_S:
            time.sleep(_SLOW_BATCH_S)
        for outcome in detector.finish_batch(batch):
            rows.add(outcome, labels)
        spent = time.perf_counter() - t0
        timings["infer_s"] += spent
        read_ahead.images_done(spent, len(batch))
        refill()  # the reads ahead follow what was just measured


class StreamAhead:
    """A sequential stream's items (tar members, Parquet cells) read on a thread of their own, at most
    `ahead` of what the shard has taken and, beyond the first, `max_bytes` of them: the stream's reads (a
    block fetched from the store every few images) overlap inference, as file reads on the read threads
    do, within the read budget the worker's memory reservation holds (a stream's shard has no file reads).
    Yields (uri, (bytes, failure, read seconds)); read seconds include the wait on the stream, so the
    manifest's read cost counts it."""

    _END = object()

    def __init__(self, items: Iterator[Item], read, ahead: int, pool: ThreadPoolExecutor,
                 max_bytes: int = READ_BYTES_BUDGET):
        self._ahead, self._max_bytes = max(1, ahead), max_bytes
        self._ready: deque = deque()  # (item, bytes), in stream order; one condition guards both bounds
        self._bytes = 0
        self._cond = threading.Condition()
        self._stopped = False
        self._done = pool.submit(self._produce, items, read)

    def _produce(self, items: Iterator[Item], read) -> None:
        try:
            while not self._stopped:  # closed: no further read (a stream opens its file on the first)
                t0 = time.perf_counter()
                nxt = next(items, None)
                if nxt is None:
                    break
                waited = time.perf_counter() - t0
                data, failure, read_s = read(*nxt)
                if not self._offer((nxt[0], (data, failure, read_s + waited)), len(data) if data else 0):
                    return
            self._offer(self._END, 0, bounded=False)
        except BaseException as exc:  # handed to the shard's thread, which raises it there
            self._offer(exc, 0, bounded=False)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # the stream's file, closed on the thread that iterated it

    def _offer(self, item, size: int, bounded: bool = True) -> bool:
        """Queue an item once there is room (always for one); False when the stream was closed."""
        with self._cond:
            while (bounded and not self._stopped and self._ready
                   and (len(self._ready) >= self._ahead or self._bytes + size > self._max_bytes)):
                self._cond.wait()
            if self._stopped:
                return False
            self._ready.append((item, size))
            self._bytes += size
            self._cond.notify_all()
            return True

    def __iter__(self) -> "StreamAhead":
        return self

    def __next__(self):
        with self._cond:
            while not self._ready:
                self._cond.wait()
            item, size = self._ready[0]
            if item is self._END:
                raise StopIteration  # left queued: asked again, still the end
            self._ready.popleft()
            self._bytes -= size
            self._cond.notify_all()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stop reading (a shard that raised, or one done): the thread ends after the read in progress."""
        with self._cond:
            self._stopped = True
            self._ready.clear()
            self._bytes = 0
            self._cond.notify_all()


@dataclass
class Pools:
    """A worker's threads: reads (threads start only as reads are asked for, up to readahead's cap) and
    decodes, with `depth` decoded images at most waiting for the interpreter."""

    read: ThreadPoolExecutor
    decode: "ThreadPoolExecutor | OnResult"
    depth: int

    @classmethod
    def create(cls, decode_threads: int, depth: int) -> "Pools":
        decode = (ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix="decode") if decode_threads
                  else OnResult())
        return cls(ThreadPoolExecutor(max_workers=MAX_READS, thread_name_prefix="read"), decode, depth)

    @property
    def inline(self) -> bool:
        return isinstance(self.decode, OnResult)


class OnResult:
    """An executor that runs each task on the thread asking for its result, when it asks: decoding on the
    interpreter's thread, in order. For a node whose interpreters already keep every core busy, where
    decoding ahead on other threads only adds threads contending for the same cores."""

    def submit(self, fn, *args) -> "_Deferred":
        return _Deferred(fn, args)


class _Deferred:
    __slots__ = ("_call", "_value")

    def __init__(self, fn, args):
        self._call = (fn, args)
        self._value = None

    def result(self):
        if self._call is not None:
            fn, args = self._call
            self._call = None
            self._value = fn(*args)  # decode() returns failures as values: nothing to keep but the value
        return self._value

    def cancel(self) -> bool:
        self._call = None
        return True
