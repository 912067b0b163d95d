"""Integration: a real `ray start --head` on 127.0.0.1 and `ray job submit` of the jobs/ entrypoint."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import duckdb
import pytest

from batch_detect.output.commitlog import read_state
from batch_detect.output.sink import OutputStore
from batch_detect.synthetic import write_dataset
from batch_detect.commands.verify import verify
from helpers import token_cluster_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_GIVEN: set[int] = set()


def free_port() -> int:
    """A free port not given before in this process: the kernel may hand the same free port to two calls
    (CI: the GCS and the dashboard agent both got 49045, and `ray start` refused)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


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
    # metrics reach the endpoint within a second, not ten
    temp_dir, env = token_cluster_env("bdray-", RAY_metrics_report_interval_ms="1000")
    dash, gcs, metrics = free_port(), free_port(), free_port()
    cmd = [os.path.join(bindir, "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
           f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           "--include-dashboard=true", "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats",
           # Own ports for every agent: the suite's other local Ray holds the default ones.
           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
           f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={metrics}",
           f"--ray-client-server-port={free_port()}"]
    started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield f"http://127.0.0.1:{dash}", env, gcs, metrics
    finally:
        kill_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(address: str, env: dict, args: list[str], *, wait: bool = True) -> subprocess.CompletedProcess:
    """`ray job submit` of jobs/detect.py with the fixture SSD model and `args`."""
    cmd = [os.path.join(os.path.dirname(sys.executable), "ray"), "job", "submit", "--address", address,
           "--working-dir", ROOT, *([] if wait else ["--no-wait"]), "--",
           "python", "jobs/detect.py", "--model", "models/shapes_ssd_uint8.tflite", *args]
    # Right after `ray start` the job agent may not be up yet ("No available agent"): retry that only.
    deadline = time.time() + 120
    while True:
        result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
        log = result.stdout + result.stderr
        if result.returncode == 0 or "No available agent" not in log or time.time() > deadline:
            return result
        time.sleep(3)


def test_ray_job_submit_runs_the_job_entrypoint(head, tmp_path):
    address, env, _, _ = head
    images = tmp_path / "images"
    truth = write_dataset(str(images), 40, seed=99)
    out = tmp_path / "out"
    # A relative --output names Ray's temporary copy of the working dir: refused before anything runs.
    refused = submit(address, env, ["--input", str(images), "--output", "out-relative"])
    log = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "inside a Ray job give --output an absolute path" in log, log[-4000:]
    result = submit(address, env, ["--labels", "models/shapes_labels.txt", "--input", str(images), "--output",
                                    str(out), "--shard-size", "8"])
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "status: complete" in log and "succeeded" in log
    # the shipped model and labels, read from that copy, and the run says where
    assert re.search(r"relative paths are read from Ray's temporary copy of the job's --working-dir \(\S*"
                     r"runtime_resources\S*\): --model models/shapes_ssd_uint8.tflite, --labels", log), log[-4000:]
    n_ok = duckdb.execute(f"SELECT count(*) FROM read_parquet('{out}/images/*.parquet')").fetchone()[0]
    n_det = duckdb.execute(f"SELECT count(*) FROM read_parquet('{out}/detections/*.parquet')").fetchone()[0]
    assert n_ok == len(truth)
    assert n_det >= 0.8 * sum(len(v) for v in truth.values())


def test_cli_joins_a_running_cluster_and_reports_auth_problems(head, tmp_path):
    _, env, gcs, _ = head
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


def scrape(port: int, name: str, output: str) -> float:
    """The value of batch-detect metric `name` for `output` on the node's Prometheus endpoint (0 before the
    first sample)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    total = 0.0
    for m in re.finditer(r"^(?:ray_)?batch_detect_" + name + r"(?:_total)?\{([^}]*)\} (\S+)$", text, re.M):
        if f'output="{output}"' in m.group(1):
            total += float(m.group(2))
    return total


def test_metrics_move_and_ray_job_stop_leaves_a_resumable_output(head, tmp_path):
    address, env, gcs, metrics = head
    images = tmp_path / "images"
    # 500 shards: Ray exports metrics every few seconds, and on a quiet machine 1,200 tiny images were all
    # processed before the second sample (the stop then found nothing left to stop)
    write_dataset(str(images), 4000, seed=97, sizes=((96, 72), (72, 96)))
    out = str(tmp_path / "out")
    args = ["--input", str(images), "--output", out, "--shard-size", "8", "--num-actors", "1"]
    started = submit(address, env, args, wait=False)
    assert started.returncode == 0, (started.stdout + started.stderr)[-3000:]
    job_id = re.search(r"raysubmit_\w+", started.stdout + started.stderr).group(0)
    seen: list[float] = []
    deadline = time.time() + 240
    while time.time() < deadline and not (len(seen) >= 2 and 0 < seen[0] < seen[-1]):
        value = scrape(metrics, "images", out)
        if value and (not seen or value != seen[-1]):
            seen.append(value)
        time.sleep(0.5)
    assert len(seen) >= 2 and seen[0] < seen[-1], f"batch_detect_images never moved on the endpoint: {seen}"
    assert scrape(metrics, "infer_seconds", out) > 0 and scrape(metrics, "shards_committed", out) > 0

    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    stop = subprocess.run([ray, "job", "stop", "--address", address, job_id], env=env, capture_output=True,
                          text=True, timeout=120)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    manifest = json.load(open(os.path.join(out, "_manifest.json")))
    state = read_state(OutputStore(out))
    assert manifest["status"] == "interrupted", manifest["status"]  # not left "running" by a SIGKILL
    assert manifest["counts"]["committed_shards"] == state.num_committed < 500
    resumed = subprocess.run([sys.executable, "-m", "batch_detect", "run", "--model",
                              os.path.join(ROOT, "models", "shapes_ssd_uint8.tflite"), *args, "--resume",
                              "--address", f"127.0.0.1:{gcs}"], env=env, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = verify(out, str(images))
    assert report.ok and report.facts["images"] + report.facts["failures"] == 4000, report.problems
