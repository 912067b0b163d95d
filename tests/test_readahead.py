"""Reads ahead of the interpreter sized to the store's latency (`readahead.py`): the rule itself, and a run
reading from S3 (moto's server on 127.0.0.1) through a proxy that adds latency to every request."""

from __future__ import annotations

import os

import pytest
import s3fs

from batch_detect.config import RunConfig
from batch_detect.run.pipeline import run
from batch_detect.run.readahead import BYTES_BUDGET, MAX_READS, START, ReadAhead
from batch_detect.synthetic import write_dataset
from batch_detect.commands.verify import verify
from batch_detect.run.worker import PREFETCH


def test_littles_law_from_measurements():
    ra = ReadAhead()
    assert ra.reads == START  # nothing measured yet
    ra.read_done(0.100, 200_000)  # 100 ms per read
    ra.images_done(0.200, 10)  # 20 ms per image at the interpreter
    assert ra.reads == 6  # ceil(100 / 20) + 1: five reads cover one read's wait
    for _ in range(50):  # a local disk: reads far quicker than the model
        ra.read_done(0.0002, 200_000)
    assert ra.reads == 2


def test_bounded_by_the_cap_and_the_bytes_budget():
    ra = ReadAhead()
    ra.read_done(5.0, 1_000)
    ra.images_done(0.010, 1)
    assert ra.reads == MAX_READS  # a very slow store: capped, not 501
    big = ReadAhead()
    big.read_done(5.0, 8 * 1024 * 1024)  # 8 MiB files: the bytes budget decides
    big.images_done(0.010, 1)
    assert big.reads == BYTES_BUDGET // (8 * 1024 * 1024)
    fixed = ReadAhead(fixed=3)
    fixed.read_done(5.0, 1_000)
    fixed.images_done(0.010, 1)
    assert fixed.reads == 3


@pytest.fixture
def slow_bucket(s3_server, tmp_path, models_dir):
    from flaky_proxy import FlakyProxy

    options = {"key": "testing-key-id", "secret": "testing-secret", "endpoint_url": s3_server}
    fs = s3fs.S3FileSystem(**options)
    name = f"bd-ra-{os.getpid()}-{tmp_path.name[-10:].lower().replace('_', '-')}"
    fs.mkdir(name)
    local = tmp_path / "images"
    truth = write_dataset(str(local), 48, seed=5, sizes=[(320, 240)])
    fs.put(str(local) + "/", f"{name}/in/", recursive=True)
    with FlakyProxy(s3_server, latency_s=0.15) as proxy:
        yield name, {**options, "endpoint_url": proxy.url}, truth, proxy


def test_slow_store_gets_more_reads_ahead(slow_bucket, models_dir, tmp_path):
    """150 ms per request: the worker measures it and keeps more reads in flight than its decode window
    (seen at the store: the proxy counts GETs answered at once); a fixed --read-ahead keeps the window.
    Every image is processed exactly once either way."""
    name, options, truth, proxy = slow_bucket
    manifests, in_flight = {}, {}
    for arm, read_ahead in (("auto", 0), ("fixed", 2)):
        proxy.max_in_flight = 0
        out = str(tmp_path / f"out-{arm}")
        cfg = RunConfig(model=os.path.join(models_dir, "shapes_ssd_uint8.tflite"), input=f"s3://{name}/in/",
                        output=out, shard_size=24, read_ahead=read_ahead, num_actors=1, storage_options=options)
        manifests[arm] = run(cfg).manifest
        assert manifests[arm]["counts"]["images"] == len(truth) and manifests[arm]["counts"]["failures"] == 0
        assert verify(out).ok
        in_flight[arm] = proxy.max_in_flight
    auto, fixed = manifests["auto"]["sizing"], manifests["fixed"]["sizing"]
    print("auto:", auto["images_ahead"], auto["measured"], "fixed:", fixed["images_ahead"], "GETs at once:", in_flight)
    # The proxy counts a GET until its handler returns, a moment after the worker has its bytes and may
    # have asked for the next: one more than the window can show at once.
    assert in_flight["auto"] > PREFETCH + 1 >= in_flight["fixed"] > 1
    assert auto["measured"]["read_ms_per_image"] >= 150  # the latency was seen where it is measured
    assert PREFETCH < auto["images_ahead"] <= MAX_READS
    assert fixed["images_ahead"] == PREFETCH  # --read-ahead 2 is below the decode window: the window holds
    assert fixed["read_ahead"].startswith("fixed: 2")


def test_a_tar_or_parquet_stream_is_read_ahead_on_its_own_thread_within_its_bound():
    """Tar members and Parquet cells come from one sequential stream: a thread reads it at most `ahead`
    items beyond what the shard took, hands its errors over, and stops (closing the stream) when told."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from batch_detect.run.worker import StreamAhead

    produced, closed, main = [], threading.Event(), threading.get_ident()

    def stream(n: int, fail_at: int | None = None):
        try:
            for i in range(n):
                if i == fail_at:
                    raise RuntimeError("the store went away")
                assert threading.get_ident() != main  # read off the interpreter's thread
                produced.append(i)
                yield f"item{i}", (lambda i=i: b"x" * i)
        finally:
            closed.set()

    def read(uri, get_bytes):
        return get_bytes(), None, 0.0

    def settle(condition) -> bool:
        deadline = time.monotonic() + 5
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.01)
        return condition()

    with ThreadPoolExecutor(2) as pool:
        ahead = StreamAhead(stream(100), read, 4, pool)
        uri, (data, failure, _) = next(ahead)
        assert (uri, data, failure) == ("item0", b"", None)
        # read ahead without being asked: 4 queued and one more read, waiting for room; no further
        assert settle(lambda: len(produced) == 6), produced
        time.sleep(0.2)
        assert len(produced) == 6
        assert [next(ahead)[0] for _ in range(3)] == ["item1", "item2", "item3"]
        ahead.close()
        assert settle(closed.is_set), "the stream was not closed"
        assert len(produced) < 100

        produced.clear()
        closed.clear()
        assert [u for u, _ in StreamAhead(stream(5), read, 2, pool)] == [f"item{i}" for i in range(5)]
        assert closed.is_set()
        failing = StreamAhead(stream(10, fail_at=3), read, 2, pool)
        assert [next(failing)[0] for _ in range(3)] == ["item0", "item1", "item2"]
        with pytest.raises(RuntimeError, match="the store went away"):
            next(failing)

        produced.clear()  # large members: bounded by bytes before count (60-byte items, 150 bytes queued at most)
        big = StreamAhead(stream(100), lambda uri, get: (b"y" * 60, None, 0.0), 8, pool, max_bytes=150)
        assert settle(lambda: len(produced) >= 3)
        time.sleep(0.2)
        assert len(produced) == 3, produced  # two queued (120 bytes), a third read and waiting for room
        assert [next(big)[0] for _ in range(4)] == ["item0", "item1", "item2", "item3"]
        closed.clear()
        big.close()
        assert settle(closed.is_set), "the stream was not closed"
        after = len(produced)
        time.sleep(0.2)
        assert len(produced) == after, "read on after close"
