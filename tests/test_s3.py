"""Images, model and labels in a bucket, output to the bucket: the S3 protocol for real (moto's server
on 127.0.0.1), with credentials that must not leak into the output."""

from __future__ import annotations

import json
import os

import duckdb
import pytest
import s3fs

from batch_detect.config import RunConfig
from batch_detect.run.pipeline import run
from batch_detect.synthetic import write_dataset

SECRET = "s3cr3t-Value-that-must-not-leak-7f3a"


@pytest.fixture
def bucket(s3_server, tmp_path, models_dir):
    options = {"key": "testing-key-id", "secret": SECRET, "endpoint_url": s3_server}
    fs = s3fs.S3FileSystem(**options)
    name = f"bd-{os.getpid()}-{tmp_path.name[-12:].lower().replace('_', '-')}"
    fs.mkdir(name)
    local = tmp_path / "images"
    truth = write_dataset(str(local), 30, seed=21)
    fs.put(str(local) + "/", f"{name}/in/", recursive=True)
    fs.put(os.path.join(models_dir, "shapes_ssd_uint8.tflite"), f"{name}/models/m.tflite")
    fs.put(os.path.join(models_dir, "shapes_labels.txt"), f"{name}/models/labels.txt")
    return name, options, fs, truth


def test_bucket_in_bucket_out(local_ray, bucket, tmp_path):
    name, options, fs, truth = bucket
    cfg = RunConfig(model=f"s3://{name}/models/m.tflite", labels=f"s3://{name}/models/labels.txt",
                    input=f"s3://{name}/in/", output=f"s3://{name}/out", shard_size=8,
                    storage_options=options)
    manifest = run(cfg).manifest
    assert manifest["status"] == "complete"
    assert manifest["counts"]["images"] == len(truth) and manifest["counts"]["failures"] == 0
    # Everything the job wrote, pulled down and read with DuckDB
    local_out = tmp_path / "out"
    fs.get(f"{name}/out/", str(local_out) + "/", recursive=True)
    uris = [r[0] for r in duckdb.execute(f"SELECT uri FROM read_parquet('{local_out}/images/*.parquet')").fetchall()]
    assert sorted(uris) == sorted(f"s3://{name}/in/{k}" for k in truth)
    for path in local_out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"secret leaked into {path}"
    assert manifest["config"]["storage_options"]["secret"] == "***"


def test_manifest_input_transient_faults_and_a_missing_key(local_ray, bucket, tmp_path):
    """Input as a manifest in the bucket, read through a proxy that throttles ~5% of GETs: the storage
    library's retries absorb them (no failure records); a key that does not exist is a `read` failure."""
    from flaky_proxy import FlakyProxy

    name, options, fs, truth = bucket
    listed = [f"s3://{name}/in/{k}" for k in sorted(truth)] + [f"s3://{name}/in/deleted_after_listing.jpg"]
    fs.pipe(f"{name}/list.txt", "\n".join(listed).encode())
    with FlakyProxy(options["endpoint_url"], fail_fraction=0.05, seed=1) as proxy:
        flaky = {**options, "endpoint_url": proxy.url}
        manifest = run(RunConfig(model=f"s3://{name}/models/m.tflite", input=f"s3://{name}/list.txt",
                                 output=f"s3://{name}/out-flaky", shard_size=4, storage_options=flaky)).manifest
        assert proxy.injected > 0, "no fault was injected: the test tested nothing"
    assert manifest["status"] == "complete"
    assert manifest["counts"]["images"] == len(truth)
    assert manifest["counts"]["failure_types"] == {"read/not_found": 1}


def test_cli_secret_never_reaches_logs(bucket, tmp_path):
    """The CLI with credentials on the command line: the secret is in no log line, Ray log file,
    manifest or Parquet file."""
    import glob
    import subprocess
    import sys

    name, options, fs, truth = bucket
    args = [sys.executable, "-m", "batch_detect", "run", "--model", f"s3://{name}/models/m.tflite",
            "--input", f"s3://{name}/in/", "--output", f"s3://{name}/out-cli", "--shard-size", "8",
            "--storage-option", f"key={options['key']}", "--storage-option", f"secret={SECRET}",
            "--storage-option", f"endpoint_url={options['endpoint_url']}"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "RAY_ADDRESS": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    assert SECRET not in result.stdout + result.stderr
    for path in glob.glob("/tmp/ray/session_latest/logs/**/*", recursive=True):
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as fh:
            assert SECRET.encode() not in fh.read(), f"secret in Ray log {path}"
    for path in fs.find(f"{name}/out-cli"):
        assert SECRET.encode() not in fs.cat_file(path), f"secret in {path}"


def test_credentials_from_the_environment_and_typed_options(bucket, tmp_path):
    """No key on the command line: the standard AWS chain (here its environment variables) supplies the
    credentials, in the driver and in every actor; `--storage-option` values are typed (a JSON
    `client_kwargs`, a boolean) and recorded as such in the manifest, the secret nowhere."""
    import subprocess
    import sys

    name, options, fs, truth = bucket
    env = {**os.environ, "RAY_ADDRESS": "", "AWS_ACCESS_KEY_ID": options["key"],
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
    base = [sys.executable, "-m", "batch_detect", "run", "--model", f"s3://{name}/models/m.tflite",
            "--input", f"s3://{name}/in/", "--shard-size", "8",
            "--storage-option", f"endpoint_url={options['endpoint_url']}",
            "--storage-option", 'client_kwargs={"region_name": "us-east-1"}',
            "--storage-option", "anon=false"]
    result = subprocess.run(base + ["--output", f"s3://{name}/out-env"], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(fs.find(f"{name}/out-env/images")) >= 1
    manifest = json.loads(fs.cat_file(f"{name}/out-env/_manifest.json"))
    assert manifest["counts"]["images"] == len(truth)
    assert manifest["config"]["storage_options"]["anon"] is False
    assert manifest["config"]["storage_options"]["client_kwargs"] == {"region_name": "us-east-1"}
    assert SECRET not in json.dumps(manifest) and SECRET not in result.stdout + result.stderr


def test_credential_and_endpoint_problems_are_one_sentence_before_anything_is_written(bucket, tmp_path):
    """No credentials, a secret without its key, an endpoint nobody listens on: each exits 2 with one line
    naming the store, what failed and the fix, no secret in it, and nothing written to the output. The
    environment holds no AWS credentials (nor a profile file) for the CLI to find instead."""
    import socket
    import subprocess
    import sys
    import time

    name, options, fs, truth = bucket
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(RAY_ADDRESS="", AWS_EC2_METADATA_DISABLED="true", AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_CONFIG_FILE=str(tmp_path / "none"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"  # free once the socket closes: nothing listens
    endpoint = f"endpoint_url={options['endpoint_url']}"
    cases = {
        "no-credentials": ([endpoint], "no S3 credentials were found to sign requests to"),
        "secret-without-key": ([endpoint, f"secret={SECRET}"], "are incomplete (key is missing)"),
        "closed-port": ([f"endpoint_url={closed}", f"key={options['key']}", f"secret={SECRET}"],
                        f"cannot connect to the S3 endpoint {closed} to reach"),
    }
    for case, (storage, message) in cases.items():
        args = [sys.executable, "-m", "batch_detect", "run", "--model", f"s3://{name}/models/m.tflite",
                "--input", f"s3://{name}/in/", "--output", f"s3://{name}/out-{case}"]
        for option in storage:
            args += ["--storage-option", option]
        t0 = time.perf_counter()
        result = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
        assert result.returncode == 2, (case, result.stderr[-2000:])
        errors = [ln for ln in result.stderr.splitlines() if ln.startswith("batch-detect: error:")]
        assert len(errors) == 1 and message in errors[0] and f"s3://{name}/models/m.tflite" in errors[0], case
        assert "Traceback" not in result.stderr and SECRET not in result.stderr + result.stdout
        assert time.perf_counter() - t0 < 60, f"{case}: the check took too long"
        assert not fs.exists(f"{name}/out-{case}")
    # the other commands that read a bucket say the same
    status = subprocess.run([sys.executable, "-m", "batch_detect", "status", f"s3://{name}/out-any",
                             "--storage-option", endpoint], capture_output=True, text=True, timeout=120, env=env)
    assert status.returncode == 2 and "no S3 credentials were found" in status.stderr, status.stderr[-2000:]


def test_status_of_a_running_job_on_s3(local_ray, bucket, tmp_path, models_dir):
    """`batch-detect status` reads only what the job commits: from the bucket, while it runs and after."""
    import threading
    import time

    from batch_detect.commands.status import status

    name, options, fs, _ = bucket
    images = tmp_path / "many"
    write_dataset(str(images), 120, seed=22, sizes=((96, 72), (72, 96)))
    out = f"s3://{name}/status-out"
    cfg = RunConfig(model=os.path.join(models_dir, "shapes_ssd_uint8.tflite"), input=str(images), output=out,
                    shard_size=8, num_actors=1, storage_options=options)
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(m=run(cfg).manifest))
    worker.start()
    seen = []
    while worker.is_alive():
        if fs.exists(f"{name}/status-out/_manifest.json"):
            s = status(out, options)
            if s["state"] == "running" and (not seen or s["done"] != seen[-1]):
                seen.append(s["done"])
        time.sleep(0.5)
    worker.join()
    assert len(seen) >= 2 and seen == sorted(seen) and seen[-1] > seen[0], seen  # a moving count
    final = status(out, options)
    assert final["state"] == "complete" and final["done"] == final["planned"] == 120, final
    assert result["m"]["status"] == "complete"


def test_part_move_survives_a_stale_listing_from_another_thread(bucket):
    """fsspec shares one S3 filesystem per process, and s3fs answers "not found" from a cached listing: a
    listing of the folder that another thread (a `status` beside the run) took while a part's temporary file
    was being written must not make the move fail (it once failed a run in this suite, when every file was
    moved into place; on object stores only parts are, as they are streamed)."""
    from batch_detect.output.sink import OutputStore

    name, options, _, _ = bucket
    store = OutputStore(f"s3://{name}/stale-out", options)
    store.put_atomic("images/part-000000.parquet", b"0")
    fs = store.fs
    folder = store.path("images")
    before = fs.ls(folder, detail=True, refresh=True)  # the other thread's listing, taken before the write
    tmp = store._tmp("images/part-000001.parquet")
    fs.pipe_file(tmp, b"1")
    fs.dircache[folder] = before  # ... lands after it
    store._rename(tmp, store.path("images/part-000001.parquet"))
    fs.invalidate_cache()
    assert fs.cat_file(store.path("images/part-000001.parquet")) == b"1"
    assert not fs.exists(tmp)


def _staged_rows(shard: str, images: int):
    import numpy as np

    from batch_detect.model.decoding import Detections
    from batch_detect.model.detector import ImageResult
    from batch_detect.run.worker import ShardRows

    rows = ShardRows(shard)
    for i in range(images):
        boxes = np.array([[0.1, 0.2, 0.3, 0.4]] * (i % 3), dtype=np.float32).reshape(-1, 4)
        rows.add(ImageResult(f"s3://b/{shard}/{i}.jpg", 640, 480, Detections(
            boxes, np.zeros(len(boxes), np.int32), np.full(len(boxes), 0.9, np.float32)), 1.0, 2.0), None)
    return rows.columns


def test_staged_shard_is_one_put_per_table_and_compaction_reads_at_once(bucket):
    """On an object store a staged shard is put under its own name, one request per table, all three at
    once (a temp name then a move was 7 requests in a row per table: a move there is a copy and a delete);
    compaction fetches staged shards several at a time, one GET each, keeps shard order, and refuses a
    missing one."""
    import pyarrow.parquet as pq
    from flaky_proxy import FlakyProxy

    from batch_detect.inputs.plan import shard_id
    from batch_detect.output.sink import OutputStore

    name, options, fs, _ = bucket
    with FlakyProxy(options["endpoint_url"], latency_s=0.05) as proxy:
        store = OutputStore(f"s3://{name}/staged", {**options, "endpoint_url": proxy.url})
        shards = [shard_id(i) for i in range(12)]
        for i, sid in enumerate(shards):
            before = len(proxy.requests)
            store.write_shard(sid, _staged_rows(sid, 5 + i), run_id=0)
            made = proxy.requests[before:]
            assert sorted(made) == sorted(("PUT", f"/{name}/staged/_staging/{table}/{sid}.parquet")
                                          for table in ("images", "detections", "failures")), made
        fs.invalidate_cache()
        assert sorted(p.rsplit("/", 1)[1] for p in fs.find(f"{name}/staged")) == sorted(
            f"{sid}.parquet" for sid in shards for _ in range(3)), "a temp object was left"

        proxy.max_in_flight = 0
        before = len(proxy.requests)
        rows = store.compact(0, shards[:10])
        # three tables side by side: more than three GETs at once means each fetched several at a time
        assert proxy.max_in_flight > 3, "staged shards were fetched one at a time"
        staged_reads = [r for r in proxy.requests[before:] if "/_staging/" in r[1] and r[0] in ("GET", "HEAD")]
        assert sorted(staged_reads) == sorted(("GET", f"/{name}/staged/_staging/{table}/{sid}.parquet")
                                              for table in ("images", "detections", "failures")
                                              for sid in shards[:10]), "a staged shard cost more than one GET"
    assert rows["images"] == sum(5 + i for i in range(10))
    fs.invalidate_cache()
    part = pq.read_table(fs.open(f"{name}/staged/images/part-000000.parquet", "rb"))
    assert part["uri"].to_pylist() == [f"s3://b/{sid}/{k}.jpg" for i, sid in enumerate(shards[:10]) for k in range(5 + i)]
    assert pq.read_table(fs.open(f"{name}/staged/detections/part-000000.parquet", "rb")).num_rows == \
        sum(k % 3 for i in range(10) for k in range(5 + i))
    assert not fs.exists(f"{name}/staged/_staging/images/{shards[0]}.parquet"), "staging not cleared"

    fs.rm(f"{name}/staged/_staging/images/{shards[11]}.parquet")  # a committed shard's file gone
    store = OutputStore(f"s3://{name}/staged", options)
    with pytest.raises(FileNotFoundError):
        store.compact(1, shards[10:])
    fs.invalidate_cache()
    for table in ("images", "detections", "failures"):  # no table's part without the others'
        assert not fs.exists(f"{name}/staged/{table}/part-000001.parquet"), f"{table}: a part was named"


def test_an_image_read_is_one_get(bucket):
    """Reading an image from S3 is one GET: s3fs asks the object's size first (a HEAD, a round trip) to split
    large objects into ranges, which for images doubles the requests and the latency of every read."""
    from flaky_proxy import FlakyProxy

    from batch_detect.inputs.reading import Reader

    name, options, fs, truth = bucket
    key = sorted(truth)[0]
    with FlakyProxy(options["endpoint_url"]) as proxy:
        reader = Reader({**options, "endpoint_url": proxy.url})
        data = reader.read(f"s3://{name}/in/{key}")
        assert proxy.requests == [("GET", f"/{name}/in/{key}")], proxy.requests
    assert data == fs.cat_file(f"{name}/in/{key}")
