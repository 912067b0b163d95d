"""Integration: a real `ray start --head` on 127.0.0.1 and `ray job submit` of the jobs/ entrypoint."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import duckdb
import pytest

from batch_detect.synthetic import write_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_cluster(temp_dir: str) -> None:
    """Stop only this test's cluster: `ray stop` would also stop the other tests' local Ray."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    cmd = fh.read()
            except OSError:
                continue
            if temp_dir.encode() in cmd and int(pid) != os.getpid():
                try:
                    os.kill(int(pid), sig)
                except ProcessLookupError:
                    pass
        time.sleep(1)


@pytest.fixture
def head():
    bindir = os.path.dirname(sys.executable)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ["PATH"], "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    # Short path: Ray's unix sockets live under the temp dir and have a length limit.
    temp_dir = tempfile.mkdtemp(prefix="bdray-", dir="/tmp")
    dash = free_port()
    cmd = [os.path.join(bindir, "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
           f"--port={free_port()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           "--include-dashboard=true", "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield f"http://127.0.0.1:{dash}", env
    finally:
        kill_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_job_entrypoint(head, tmp_path):
    address, env = head
    images = tmp_path / "images"
    truth = write_dataset(str(images), 40, seed=99)
    out = tmp_path / "out"
    cmd = [os.path.join(os.path.dirname(sys.executable), "ray"), "job", "submit", "--address", address,
           "--working-dir", ROOT, "--",
           "python", "jobs/detect.py", "--model", "models/shapes_ssd_uint8.tflite",
           "--labels", "models/shapes_labels.txt", "--input", str(images), "--output", str(out),
           "--shard-size", "8"]
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "status: complete" in log and "succeeded" in log
    n_ok = duckdb.sql(f"SELECT count(*) FROM read_parquet('{out}/images/*.parquet')").fetchone()[0]
    n_det = duckdb.sql(f"SELECT count(*) FROM read_parquet('{out}/detections/*.parquet')").fetchone()[0]
    assert n_ok == len(truth)
    assert n_det >= 0.8 * sum(len(v) for v in truth.values())
