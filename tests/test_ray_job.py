"""Integration: a real `ray start --head` on 127.0.0.1 and `ray job submit` of the jobs/ entrypoint."""

from __future__ import annotations

import os
import secrets
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
    # Short path: Ray's unix sockets live under the temp dir and have a length limit.
    temp_dir = tempfile.mkdtemp(prefix="bdray-", dir="/tmp")
    token_path = os.path.join(temp_dir, "auth_token")
    with open(token_path, "w") as fh:
        fh.write(secrets.token_hex(32))
    # Token authentication, as Ray >= 2.59 does for local clusters; the token is this test's own.
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ["PATH"], "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_path}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)
    dash, gcs = free_port(), free_port()
    cmd = [os.path.join(bindir, "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
           f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           "--include-dashboard=true", "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats",
           # Own ports for every agent: the suite's other local Ray holds the default ones.
           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
           f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
           f"--ray-client-server-port={free_port()}"]
    started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield f"http://127.0.0.1:{dash}", env, gcs
    finally:
        kill_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_job_entrypoint(head, tmp_path):
    address, env, _ = head
    images = tmp_path / "images"
    truth = write_dataset(str(images), 40, seed=99)
    out = tmp_path / "out"
    cmd = [os.path.join(os.path.dirname(sys.executable), "ray"), "job", "submit", "--address", address,
           "--working-dir", ROOT, "--",
           "python", "jobs/detect.py", "--model", "models/shapes_ssd_uint8.tflite",
           "--labels", "models/shapes_labels.txt", "--input", str(images), "--output", str(out),
           "--shard-size", "8"]
    # Right after `ray start` the job agent may not be up yet ("No available agent"): retry that only.
    deadline = time.time() + 120
    while True:
        result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
        log = result.stdout + result.stderr
        if result.returncode == 0 or "No available agent" not in log or time.time() > deadline:
            break
        time.sleep(3)
    assert result.returncode == 0, log[-4000:]
    assert "status: complete" in log and "succeeded" in log
    n_ok = duckdb.execute(f"SELECT count(*) FROM read_parquet('{out}/images/*.parquet')").fetchone()[0]
    n_det = duckdb.execute(f"SELECT count(*) FROM read_parquet('{out}/detections/*.parquet')").fetchone()[0]
    assert n_ok == len(truth)
    assert n_det >= 0.8 * sum(len(v) for v in truth.values())


def test_cli_joins_a_running_cluster_and_reports_auth_problems(head, tmp_path):
    _, env, gcs = head
    images = tmp_path / "images"
    write_dataset(str(images), 10, seed=3)
    base = [sys.executable, "-m", "batch_detect", "run", "--model", os.path.join(ROOT, "models", "shapes_ssd_uint8.tflite"),
            "--input", str(images), "--address", f"127.0.0.1:{gcs}"]
    ok = subprocess.run(base + ["--output", str(tmp_path / "out")], env=env, capture_output=True, text=True,
                        timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "status: complete" in ok.stdout
    no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    bad = subprocess.run(base + ["--output", str(tmp_path / "out2")], env=no_token, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2, bad.stderr[-3000:]
    assert "cannot join the Ray cluster" in bad.stderr and "RAY_AUTH_MODE=token" in bad.stderr
    assert not (tmp_path / "out2").exists()
