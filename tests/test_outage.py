"""Store outages on the real S3 protocol (moto's server behind a fault proxy on 127.0.0.1): a storm of 503
SlowDown on every request for longer than the storage library's retries, connection resets, requests that
time out and random 503s are waited out (outage.py): exit 0, no failure record, every image once, `verify`
OK. A storm longer than --store-timeout stops the run in one sentence, and the same command resumes."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time

import duckdb
import pytest
import s3fs

from batch_detect.commands.verify import verify
from batch_detect.config import RunConfig
from batch_detect.errors import StoreUnavailable
from batch_detect.outage import OUTAGE, is_transient
from batch_detect.run.pipeline import run
from batch_detect.synthetic import write_dataset
from flaky_proxy import FlakyProxy
from helpers import recall_precision

KEYS = {"key": "testing-key-id", "secret": "testing-secret"}
# The library's own retries made short (one attempt per botocore call; s3fs still tries a few times within a
# second or two): a storm of a few seconds already outlasts them, as a minute's storm outlasts the defaults.
SHORT_LIBRARY_RETRIES = {"retries": {"max_attempts": 1}, "read_timeout": 2, "connect_timeout": 2}


@pytest.fixture
def stormy(s3_server, tmp_path, models_dir):
    """A bucket holding images, model and labels, and a fault proxy in front of the server."""
    fs = s3fs.S3FileSystem(**KEYS, endpoint_url=s3_server)
    name = f"bd-{os.getpid()}-{tmp_path.name[-12:].lower().replace('_', '-')}"
    fs.mkdir(name)
    local = tmp_path / "images"
    truth = write_dataset(str(local), 96, seed=31)
    fs.put(str(local) + "/", f"{name}/in/", recursive=True)
    fs.put(os.path.join(models_dir, "shapes_ssd_uint8.tflite"), f"{name}/models/m.tflite")
    fs.put(os.path.join(models_dir, "shapes_labels.txt"), f"{name}/models/labels.txt")
    with FlakyProxy(s3_server) as proxy:
        yield name, fs, truth, proxy


def options(proxy: FlakyProxy) -> dict:
    return {**KEYS, "endpoint_url": proxy.url, "config_kwargs": SHORT_LIBRARY_RETRIES}


def config(name: str, proxy: FlakyProxy, out: str = "out", **extra) -> RunConfig:
    return RunConfig(model=f"s3://{name}/models/m.tflite", labels=f"s3://{name}/models/labels.txt",
                     input=f"s3://{name}/in/", output=f"s3://{name}/{out}", shard_size=8,
                     storage_options=options(proxy), **extra)


def storm_when(proxy: FlakyProxy, ready, phases: list[tuple[str, float]]) -> threading.Thread:
    """Once `ready()`, each phase in turn: ("storm", s): every request 503 SlowDown; ("slow", s): every answer
    later than the client's read timeout."""
    def go():
        deadline = time.monotonic() + 120
        while not ready() and time.monotonic() < deadline:
            time.sleep(0.02)
        for kind, seconds in phases:
            if kind == "storm":
                proxy.storm = True
            else:
                proxy.latency_s = SHORT_LIBRARY_RETRIES["read_timeout"] + 1.0
            time.sleep(seconds)
            proxy.storm, proxy.latency_s = False, 0.0

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread


def staged(proxy: FlakyProxy) -> bool:
    return any(method == "PUT" and "/_staging/" in path for method, path in list(proxy.requests))


def check_output(name: str, fs, truth: dict, tmp_path, out: str = "out") -> None:
    """Every image once, none failed, boxes right, and `verify` finds the output whole."""
    local = tmp_path / f"{out}-copy"
    fs.get(f"{name}/{out}/", str(local) + "/", recursive=True)
    rows, distinct = duckdb.execute(
        f"SELECT count(*), count(DISTINCT uri) FROM read_parquet('{local}/images/*.parquet')").fetchone()
    assert rows == distinct == len(truth), (rows, distinct, len(truth))
    failures = duckdb.execute(f"SELECT count(*) FROM read_parquet('{local}/failures/*.parquet')").fetchone()[0]
    assert failures == 0
    predicted: dict = {}
    for uri, *box in duckdb.execute(f"SELECT uri, class_id, xmin, ymin, xmax, ymax FROM "
                                    f"read_parquet('{local}/detections/*.parquet')").fetchall():
        predicted.setdefault(os.path.basename(uri), []).append(tuple(box))
    expected = {k: [(b.class_id, b.xmin, b.ymin, b.xmax, b.ymax) for b in v] for k, v in truth.items()}
    recall, precision = recall_precision(expected, predicted)
    assert recall >= 0.9 and precision >= 0.9, (recall, precision)
    report = verify(str(local))
    assert report.ok, report.problems


def test_transient_and_permanent_errors_as_the_store_gives_them(stormy):
    name, fs, truth, proxy = stormy
    client = s3fs.S3FileSystem(**options(proxy), skip_instance_cache=True)
    proxy.storm = True
    with pytest.raises(OSError) as throttled:
        client.cat_file(f"{name}/in/{next(iter(truth))}")
    proxy.storm = False
    with pytest.raises(FileNotFoundError) as missing:
        client.cat_file(f"{name}/in/no-such-image.jpg")
    proxy.reset_fraction = 1.0
    with pytest.raises(Exception) as reset:
        client.cat_file(f"{name}/in/{next(iter(truth))}")
    proxy.reset_fraction = 0.0
    assert is_transient(throttled.value), repr(throttled.value)
    assert is_transient(reset.value), repr(reset.value)
    assert not is_transient(missing.value)


def _run_manifest(cfg: RunConfig) -> dict:
    return run(cfg).manifest


def run_without_ray(cfg: RunConfig) -> dict:
    """The run's manifest, from a fresh interpreter: a driver already inside Ray (the suite's local Ray, once
    an earlier test started it) would use Ray instead of worker processes."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_run_manifest, cfg).result(timeout=600)


def test_storms_resets_and_timeouts_are_waited_out_by_worker_processes(stormy, tmp_path):
    """A 503 storm on every request (input, model, output) for far longer than the library's retries, then
    a spell of requests that time out, with random 503s and resets throughout: nothing fails."""
    name, fs, truth, proxy = stormy
    proxy.fail_fraction, proxy.reset_fraction = 0.03, 0.01
    weather = storm_when(proxy, lambda: staged(proxy), [("storm", 12.0), ("slow", 5.0)])
    t0 = time.monotonic()
    manifest = run_without_ray(config(name, proxy, store_timeout=120))
    weather.join(30)
    assert manifest["status"] == "complete", manifest.get("error")
    assert manifest["cluster"]["executor"] != "ray", manifest["cluster"]
    assert manifest["cluster"]["without_ray"]["handed_to_ray"] == 0, \
        manifest["cluster"]["without_ray"]  # the workers waited: none failed over to Ray
    assert manifest["counts"]["failures"] == 0 and manifest["counts"]["images"] == len(truth)
    assert proxy.storm_answers > 0 and proxy.injected > 0 and proxy.resets > 0, "the weather never reached the store"
    assert time.monotonic() - t0 > 12, "the run ended before the storm did: it was not waited out"
    store = manifest["store"]  # driver_retries: its own requests waited too (its commit log, the lease)
    assert store["worker_retries"] > 0 and store["driver_retries"] > 0 and store["longest_outage_s"] >= 5, store
    check_output(name, fs, truth, tmp_path)


def test_a_storm_is_waited_out_on_ray(local_ray, stormy, tmp_path):
    name, fs, truth, proxy = stormy
    proxy.fail_fraction = 0.03
    weather = storm_when(proxy, lambda: staged(proxy), [("storm", 25.0)])  # past the actors' call deadline (20 s)
    manifest = run(config(name, proxy, store_timeout=120)).manifest
    weather.join(40)
    assert manifest["status"] == "complete" and "without_ray" not in manifest["cluster"], manifest["cluster"]
    assert manifest["counts"]["failures"] == 0 and manifest["counts"]["images"] == len(truth)
    assert proxy.storm_answers > 0
    check_output(name, fs, truth, tmp_path)


def test_a_storm_past_store_timeout_stops_in_one_sentence_and_the_same_command_resumes(stormy, tmp_path):
    name, fs, truth, proxy = stormy
    proxy.latency_s = 0.01  # a few seconds of run: the storm begins well before its end
    so = options(proxy)
    cmd = [sys.executable, "-m", "batch_detect", "run", "--model", f"s3://{name}/models/m.tflite",
           "--labels", f"s3://{name}/models/labels.txt", "--input", f"s3://{name}/in/",
           "--output", f"s3://{name}/out", "--shard-size", "8", "--store-timeout", "3",
           *(a for k, v in so.items() for a in ("--storage-option", f"{k}={json.dumps(v) if isinstance(v, dict) else v}"))]
    weather = storm_when(proxy, lambda: staged(proxy), [("storm", 15.0)])
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    weather.join(30)
    assert first.returncode == 1, first.stderr[-3000:]
    assert "Traceback" not in first.stderr, first.stderr[-3000:]
    said = [line for line in first.stderr.splitlines() if line.startswith("batch-detect: ")]
    assert said and "unavailable for" in said[-1] and "--store-timeout (3 s)" in said[-1] \
        and "re-run the same command" in said[-1], first.stderr[-3000:]
    assert KEYS["secret"] not in first.stderr + first.stdout
    assert "pausing and retrying for up to 3 s (--store-timeout)" in first.stderr, first.stderr[-3000:]
    manifest = json.loads(fs.cat_file(f"{name}/out/_manifest.json"))
    assert manifest["status"] == "interrupted" and "StoreUnavailable" in manifest["error"], manifest.get("error")
    assert manifest["counts"]["failures"] == 0

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    manifest = json.loads(fs.cat_file(f"{name}/out/_manifest.json"))
    assert manifest["status"] == "complete" and manifest["counts"]["images"] == len(truth)
    check_output(name, fs, truth, tmp_path)


def test_permanent_errors_are_not_retried(stormy):
    """A missing object is a failure record at once, not a wait (a 404 means the same thing next time)."""
    name, fs, truth, proxy = stormy
    listed = [f"s3://{name}/in/{k}" for k in sorted(truth)[:8]] + [f"s3://{name}/in/gone.jpg"]
    fs.pipe(f"{name}/list.txt", "\n".join(listed).encode())
    manifest = run(RunConfig(model=f"s3://{name}/models/m.tflite", input=f"s3://{name}/list.txt",
                             output=f"s3://{name}/out-missing", storage_options=options(proxy),
                             store_timeout=600)).manifest
    assert manifest["counts"]["failure_types"] == {"read/not_found": 1}
    assert OUTAGE.retries == 0


def test_retry_failures_processes_exactly_those_images_again_as_the_next_run(stormy, tmp_path):
    """Images whose GET was denied become `read/permission_denied` records, a corrupt one a `decode` record.
    Once access is back, `--retry-failures read` processes exactly the five denied images as run 2 (the
    README's current-rows query then shows every image but the corrupt one processed), a second time finds
    nothing to retry, and `--retry-failures decode` takes only the corrupt image again (which fails again)."""
    from batch_detect.output.records import retryable_by_type
    from batch_detect.output.sink import OutputStore

    name, fs, truth, proxy = stormy
    fs.pipe(f"{name}/in/zz_corrupt.jpg", b"\xff\xd8 not really a jpeg")
    denied = sorted(truth)[3:8]
    proxy.denied = {f"/{name}/in/{k}" for k in denied}
    first = run(config(name, proxy)).manifest
    types = first["counts"]["failure_types"]
    assert types.pop("read/permission_denied") == 5 and list(types) == ["decode/unidentified_image"], types
    proxy.denied = set()
    store = OutputStore(f"s3://{name}/out", options(proxy))
    assert retryable_by_type(store) == {"decode/unidentified_image": 1, "read/permission_denied": 5}
    shown = subprocess.run([sys.executable, "-m", "batch_detect", "status", f"s3://{name}/out",
                            *(a for k, v in options(proxy).items() for a in
                              ("--storage-option", f"{k}={json.dumps(v) if isinstance(v, dict) else v}"))],
                           capture_output=True, text=True, timeout=120)
    assert "retryable (latest record a failure): decode/unidentified_image 1, read/permission_denied 5" \
        in shown.stdout, shown.stdout + shown.stderr[-2000:]

    second = run(config(name, proxy, retry_failures="read"))
    manifest = second.manifest
    assert second.nothing_new is None and manifest["run_id"] == 2 and manifest["status"] == "complete"
    entry = manifest["runs"][-1]
    assert entry["retried"] == 5 and entry["images"] == 5 and entry["failures"] == 0, entry
    local = tmp_path / "copy"
    fs.get(f"{name}/out/", str(local) + "/", recursive=True)
    run2 = {os.path.basename(u) for (u,) in duckdb.execute(
        f"SELECT uri FROM read_parquet('{local}/images/*.parquet') WHERE run_id = 2").fetchall()}
    assert run2 == set(denied)
    current = dict(duckdb.execute(f"""
        WITH latest AS (
          SELECT uri, max(run_id) AS run_id FROM (
            SELECT uri, run_id FROM read_parquet('{local}/images/*.parquet')
            UNION ALL SELECT uri, run_id FROM read_parquet('{local}/failures/*.parquet'))
          GROUP BY uri)
        SELECT regexp_extract(uri, '[^/]+$'), f.stage FROM latest LEFT JOIN read_parquet('{local}/failures/*.parquet') f
          USING (uri, run_id)""").fetchall())
    assert len(current) == len(truth) + 1
    assert {k for k, stage in current.items() if stage is not None} == {"zz_corrupt.jpg"}
    assert retryable_by_type(store) == {"decode/unidentified_image": 1}

    again = run(config(name, proxy, retry_failures="read"))
    assert again.nothing_new is not None and again.nothing_new["retried"] == 0
    third = run(config(name, proxy, retry_failures="decode")).manifest
    assert third["run_id"] == 3 and third["runs"][-1]["retried"] == 1 and third["runs"][-1]["failures"] == 1


def test_tar_and_parquet_streams_resume_where_they_broke(stormy, tmp_path, monkeypatch):
    """A tar streamed in small blocks and a Parquet file's row groups, read while a third of object GETs
    answer 503 or drop the connection past the library's retries, and through a storm of several seconds
    mid-stream: every member and row arrives with its bytes, none becomes a failure; each broken read
    opened the object again at its offset. An object replaced mid-stream is an error, never a splice."""
    import io
    import tarfile
    from types import SimpleNamespace

    import pyarrow as pa
    import pyarrow.parquet as pq

    from batch_detect.inputs import containers
    from batch_detect.inputs.reading import Reader

    name, fs, truth, proxy = stormy
    names = sorted(truth)[:40]
    images = {n: fs.cat_file(f"{name}/in/{n}") for n in names}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for n in names:
            info = tarfile.TarInfo(n)
            info.size = len(images[n])
            tar.addfile(info, io.BytesIO(images[n]))
    fs.pipe_file(f"{name}/tars/a.tar", buf.getvalue())
    sink = io.BytesIO()
    pq.write_table(pa.table({"jpeg": [images[n] for n in names]}), sink, row_group_size=5)
    fs.pipe_file(f"{name}/pq/a.parquet", sink.getvalue())

    monkeypatch.setattr(containers, "_STREAM_BLOCK", 64 * 1024)  # many range GETs per tar
    reader = Reader(options(proxy))
    proxy.fail_fraction, proxy.reset_fraction = 0.2, 0.1
    stats: dict = {}
    stream = containers.iter_tar(f"s3://{name}/tars/a.tar", reader.filesystem(f"s3://{name}/"), (".jpg",), stats)
    members = [(uri, get()) for uri, get in itertools.islice(stream, 5)]
    weather = storm_when(proxy, lambda: True, [("storm", 8.0)])  # now, mid-stream: past s3fs's own retries (~4 s)
    members += [(uri, get()) for uri, get in stream]
    weather.join(30)
    assert proxy.storm_answers > 0 and proxy.injected > 0, "the weather never reached the stream"
    assert OUTAGE.retries > 0 and OUTAGE.longest_s > 1, (OUTAGE.retries, OUTAGE.longest_s)
    assert [(u.rsplit("#", 1)[1], data) for u, data in members] == [(n, images[n]) for n in names]

    shard = SimpleNamespace(start=3, uris=tuple(f"row{i}" for i in range(3, 37)), source=f"s3://{name}/pq/a.parquet")
    rows = [(uri, get()) for uri, get in containers.iter_parquet(shard, reader.filesystem(shard.source), "jpeg")]
    assert rows == [(f"row{i}", images[names[i]]) for i in range(3, 37)]
    proxy.fail_fraction = proxy.reset_fraction = 0.0

    fh = reader.filesystem(f"s3://{name}/").open(f"{name}/tars/a.tar", "rb", block_size=64 * 1024)
    first = fh.read(1000)
    fs.pipe_file(f"{name}/tars/a.tar", b"x" * len(buf.getvalue()))  # replaced while it is read
    fh._fh = None  # as after a broken read: the next read opens it again
    with pytest.raises(OSError, match="changed while it was read"):
        fh.read(1000)
    assert first == buf.getvalue()[:1000]


class _Broken:
    """A file whose every read is refused like a dropped connection."""

    details = {"ETag": '"x"'}

    def read(self, size=-1):
        raise ConnectionResetError("connection reset by peer")

    def tell(self):
        return 0

    def seek(self, *args):
        return 0

    def close(self):
        pass


def test_a_stream_that_opens_but_never_reads_is_an_outage_past_its_budget():
    """Each failed read opens the object again; those opens must not count as the store answering, or the
    clock restarts forever: the budget runs out and StoreUnavailable stops the run, with a growing backoff."""
    from batch_detect.outage import Outage, ResumingFile

    clock = Outage(budget_s=1.5)
    opened = []
    fh = ResumingFile(lambda: opened.append(1) or _Broken(), "b/a.tar", "s3://b", clock)
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable, match="unavailable for"):
        fh.read(100)
    assert time.monotonic() - t0 < 10 and clock.retries < 20 and len(opened) < 20, (clock.retries, len(opened))
    from s3fs.utils import FileExpired  # errno EBUSY, but the object changed: no retry helps

    assert not is_transient(FileExpired("b/a.tar", '"x"'))


def test_an_outage_past_the_budget_stops_containers_instead_of_failing_their_items():
    """A tar or Parquet input whose store stays away past --store-timeout ends the run (exit 1, resumable),
    never a corrupt_archive or read_error record for every image in it."""
    from types import SimpleNamespace

    from batch_detect.inputs import containers

    class Away:
        def _strip_protocol(self, path):
            return path

        def open(self, *args, **kwargs):
            raise StoreUnavailable("s3://b was unavailable for 601 s")

    with pytest.raises(StoreUnavailable):
        list(containers.iter_tar("s3://b/a.tar", Away(), (".jpg",), {}))
    shard = SimpleNamespace(start=0, uris=("r0", "r1"), source="s3://b/a.parquet")
    with pytest.raises(StoreUnavailable):
        list(containers.iter_parquet(shard, Away(), "jpeg"))


def test_planning_waits_out_a_storm_on_a_manifest(stormy):
    """A manifest on a store that answers nothing but 503 SlowDown for longer than the library's retries while
    the run plans: the listing waits (is it a file, then the manifest streamed through the outage clock) and
    gives every URI; before, the storm ended the run before it started."""
    from batch_detect.inputs.listing import list_input

    name, fs, truth, proxy = stormy
    uris = sorted(f"s3://{name}/in/{n}" for n in truth)
    fs.pipe_file(f"{name}/lists/manifest.txt", ("\n".join(uris[::-1]) + "\n").encode())
    weather = storm_when(proxy, lambda: True, [("storm", 8.0)])
    t0 = time.monotonic()
    listing = list_input(f"s3://{name}/lists/manifest.txt", (".jpg",), options(proxy))
    weather.join(30)
    assert listing.uris == uris
    assert proxy.storm_answers > 0 and OUTAGE.retries > 0 and time.monotonic() - t0 > 4, OUTAGE.retries


def test_status_elsewhere_says_the_store_is_unavailable_while_it_waits(stormy):
    """`status` run from anywhere reads the output through the same outage clock as the run: during a storm it
    says the store did not answer and that it is retrying, then how long it was unavailable, and answers once
    the store is back (within its own 30 s; the run's is --store-timeout)."""
    name, fs, truth, proxy = stormy
    manifest = run(config(name, proxy, out="out-status")).manifest
    assert manifest["status"] == "complete"
    proxy.storm = True
    try:
        shown = subprocess.Popen([sys.executable, "-m", "batch_detect", "status", f"s3://{name}/out-status",
                                  *(a for k, v in options(proxy).items() for a in
                                    ("--storage-option", f"{k}={json.dumps(v) if isinstance(v, dict) else v}"))],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while proxy.storm_answers < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(8)  # long enough for a "did not answer" and an "unavailable for N s" line
    finally:
        proxy.storm = False
    out, err = shown.communicate(timeout=120)
    assert shown.returncode == 0, out + err[-2000:]
    assert f"s3://{name}/out-status: complete" in out and f"{len(truth)} processed" in out, out
    assert f"s3://{name}/out-status did not answer" in err and "retrying for up to 30 s (what `status` waits)" \
        in err, err[-2000:]
    assert re.search(r"answers again after \d+ s unavailable", err), err[-2000:]


def test_retry_failures_streams_the_failures_sorted_on_disk(models_dir, tmp_path, monkeypatch):
    """The failures to retry are sorted (spilled to disk past a run of strings: 4 here), never held in a dict:
    12 corrupt images fail; 5 are repaired; `--retry-failures decode` takes all 12 again (5 now processed),
    and a second retry exactly the 7 still failing, the repaired ones superseded by their later image rows."""
    import tempfile

    import batch_detect.inputs.extsort as extsort

    folder = tmp_path / "in"
    write_dataset(str(folder), 30, seed=9, sizes=[(160, 120)])
    good = sorted(folder.glob("*.jpg"))[:5]
    for i in range(12):
        (folder / f"broken_{i:02d}.jpg").write_bytes(b"\xff\xd8 not a jpeg %d" % i)
    cfg = dict(model=os.path.join(models_dir, "shapes_ssd_uint8.tflite"), input=str(folder),
               output=str(tmp_path / "out"), shard_size=8)
    first = run(RunConfig(**cfg)).manifest
    assert first["counts"]["failure_types"] == {"decode/unidentified_image": 12}
    for i, source in enumerate(good):
        (folder / f"broken_{i:02d}.jpg").write_bytes(source.read_bytes())
    spills = []
    real_mkdtemp = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: spills.append(k.get("prefix")) or real_mkdtemp(*a, **k))
    monkeypatch.setattr(extsort, "RUN_SIZE", 4)
    second = run(RunConfig(**cfg, retry_failures="decode")).manifest
    entry = second["runs"][-1]
    assert entry["retried"] == 12 and entry["images"] == 5 and entry["failures"] == 7, entry
    assert "batch-detect-sort-" in spills  # the failures went through the on-disk sort
    third = run(RunConfig(**cfg, retry_failures="decode")).manifest
    entry = third["runs"][-1]
    assert third["run_id"] == 3 and entry["retried"] == 7 and entry["failures"] == 7, entry
    retried = {os.path.basename(u) for (u,) in duckdb.execute(
        f"SELECT uri FROM read_parquet('{tmp_path}/out/failures/*.parquet') WHERE run_id = 3").fetchall()}
    assert retried == {f"broken_{i:02d}.jpg" for i in range(5, 12)}
