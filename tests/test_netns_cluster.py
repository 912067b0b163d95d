"""Real nodes, real network, real faults: Ray nodes in network namespaces (tests/netns.py), each with its
own address and 1 CPU, token auth, the driver run as a user runs it (`batch-detect run --address`), and
faults made mid-run: a worker's link cut, a worker's raylet SIGKILLed, the S3 server's namespace cut off
for 20 s, the head cut off from the driver. Every run must end verified, exactly once, and leave no
process or namespace behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

import netns
from batch_detect.synthetic import write_dataset
from batch_detect.commands.verify import verify
from helpers import committed_count, shard_events

MODEL = os.path.join(netns.ROOT, "models", "shapes_ssd_uint8.tflite")
IMAGES = 1200
SHARDS = -(-IMAGES // 32)


@pytest.fixture(scope="module")
def netns_ok():
    reason = netns.unavailable_reason()
    if reason:
        print(f"SKIP: {reason}")
        pytest.skip(reason)


@pytest.fixture
def make_cluster(netns_ok):
    """make_cluster(n) -> a NetCluster of n nodes; torn down by the namespaces' PIDs afterwards."""
    made: list[netns.NetCluster] = []

    def make(n: int, **kw) -> netns.NetCluster:
        made.append(netns.build(n, **kw))
        return made[-1]

    yield make
    for cluster in made:
        left = cluster.teardown()
        assert not left, f"left behind: {left}"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("netns") / "images"
    write_dataset(str(folder), IMAGES, seed=18, sizes=((160, 120), (120, 160)))
    return str(folder)


def run_driver(cluster: netns.NetCluster, images: str, out: str, *, fault=None, ready=None, ns: str | None = None,
               extra: tuple = (), timeout: float = 400) -> tuple[int, str, float, float | None]:
    """`batch-detect run --address head:6390` inside namespace `ns` (the head's by default); `fault()` is
    called once `ready()` holds (by default: 30% of the 1,200 images' shards are committed). Returns (exit
    code, output, wall seconds, seconds to the fault)."""
    cmd = cluster.exec_cmd(ns or cluster.head.ns, [
        sys.executable, "-m", "batch_detect", "run", "--model", MODEL, "--input", images, "--output", out,
        "--address", cluster.gcs, "--shard-size", "32", *extra])
    # With a fault to make, each image takes 10 ms longer (a test-only hook, forwarded to the actors): the
    # 1,200 images took ~1.5 s, and the commit log the trigger reads lags by up to a second, so a fault
    # "at 30%" could arrive after the last image.
    env = {**cluster.env, "BATCH_DETECT_TEST_SLOW_BATCH_S": "0.01"} if fault is not None else cluster.env
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, cwd=netns.ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    fault_at = None
    try:
        if fault is not None:
            ready = ready or (lambda: committed_count(out) >= 0.3 * SHARDS)
            while proc.poll() is None and not ready():
                time.sleep(0.1)
            assert proc.poll() is None, f"the run ended before the fault: {proc.stdout.read()[-3000:]}"
            fault_at = time.monotonic() - t0
            fault()
        output = proc.communicate(timeout=timeout)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, output, time.monotonic() - t0, fault_at


def manifest_of(out: str) -> dict:
    with open(os.path.join(out, "_manifest.json")) as fh:
        return json.load(fh)


def assert_exactly_once(out: str, images: str, n: int) -> dict:
    manifest = manifest_of(out)
    assert manifest["status"] == "complete", manifest.get("error")
    assert manifest["counts"]["images"] == n and manifest["counts"]["failures"] == 0, manifest["counts"]
    check = verify(out, images)
    assert check.ok, check.problems
    return manifest


@pytest.mark.parametrize("attempt", [1, 2, 3])
def test_worker_link_cut_mid_run_is_survived_promptly(make_cluster, images, tmp_path, attempt):
    """The issue's case, three times on fresh clusters (it must be reproducible): two nodes, the worker's
    cable pulled at 30% of 1,200 images. The lost node's shards go to the head's actor promptly."""
    cluster = make_cluster(2)
    clean_s = float("nan")
    if attempt == 1:
        rc, output, clean_s, _ = run_driver(cluster, images, str(tmp_path / "clean"))
        assert rc == 0, output[-4000:]
        manifest = assert_exactly_once(str(tmp_path / "clean"), images, IMAGES)
        assert len(manifest["cluster"]["nodes"]) == 2, manifest["cluster"]  # an actor on each node

    rc, output, cut_s, cut_at = run_driver(cluster, images, str(tmp_path / "cut"), fault=lambda: cluster.cut(1))
    print(f"without the cut: {clean_s:.1f}s; worker cut at {cut_at:.1f}s: {cut_s:.1f}s in all")
    assert rc == 0, output[-4000:]
    manifest = assert_exactly_once(str(tmp_path / "cut"), images, IMAGES)
    lost = manifest["cluster"]["lost_nodes"]
    assert [n["address"] for n in lost] == [cluster.nodes[1].address], lost
    assert f"node {lost[0]['node_id'][:8]} ({cluster.nodes[1].address}) lost" in output, output[-3000:]
    assert f"node lost: {lost[0]['node_id'][:8]} ({cluster.nodes[1].address})" in output  # in the summary too
    # Ray itself declares the node dead only after ~60 s (its default health checks), and the calls there
    # fail then: before this fix the run took 72 s here (cut at 6 s); the call deadline gives them up sooner.
    assert cut_s < 60, f"the run took {cut_s:.0f}s with the worker cut"


def test_worker_raylet_killed_mid_run(make_cluster, images, tmp_path):
    """SIGKILL to the worker's raylet: its actor dies with it, the calls there fail at once, and its
    shards finish on the head's actor."""
    cluster = make_cluster(2)
    out = str(tmp_path / "out")
    pid = cluster.raylet_pid(1)
    rc, output, wall_s, killed_at = run_driver(cluster, images, out, fault=lambda: os.kill(pid, signal.SIGKILL))
    print(f"raylet killed at {killed_at:.1f}s: {wall_s:.1f}s in all")
    assert rc == 0, output[-4000:]
    # Its calls fail at once and are retried ("actor died on shard …") unless the actor had finished them
    # before it noticed its raylet was gone (a fast run on a quiet machine): either way, exactly once.
    print("calls retried after the kill:", output.count("actor died on shard"))
    manifest = assert_exactly_once(out, images, IMAGES)
    # Ray declares the node dead some seconds later: only a run still going by then records it.
    assert {n["address"] for n in manifest["cluster"]["lost_nodes"]} <= {cluster.nodes[1].address}
    assert wall_s < 60, f"{wall_s:.0f}s"


def test_job_submitted_to_three_nodes_uses_every_node(make_cluster, images, tmp_path):
    """`ray job submit` to a 3-node cluster: an actor on every node, and traffic over every worker's link."""
    cluster = make_cluster(3, dashboard=True)
    before = [cluster.tx_bytes(i) for i in (1, 2)]
    out = str(tmp_path / "out")
    cmd = cluster.exec_cmd(cluster.head.ns, [
        os.path.join(netns.BINDIR, "ray"), "job", "submit", "--address", f"http://{cluster.head.address}:8265",
        "--working-dir", netns.ROOT, "--", "python", "jobs/detect.py", "--model", "models/shapes_ssd_uint8.tflite",
        "--input", images, "--output", out, "--shard-size", "32"])
    deadline = time.time() + 120
    while True:  # right after `ray start` the job agent may not be up yet: retry that only
        result = subprocess.run(cmd, env=cluster.env, cwd=netns.ROOT, capture_output=True, text=True, timeout=400)
        log = result.stdout + result.stderr
        if result.returncode == 0 or "No available agent" not in log or time.time() > deadline:
            break
        time.sleep(3)
    assert result.returncode == 0, log[-4000:]
    manifest = assert_exactly_once(out, images, IMAGES)
    assert sorted(manifest["cluster"]["actors_per_node"].values()) == [1, 1, 1], manifest["cluster"]
    sent = [cluster.tx_bytes(i) - b for i, b in zip((1, 2), before)]
    per_node = Counter(e["node_id"] for e in shard_events(out))
    print(f"bytes the workers sent over their links during the job: {sent}; shards per node: {per_node}")
    # Every node's actor did work (its shards' results crossed its link); bytes alone vary with the run's
    # speed (98 to 101 kB for the same job), shards per node do not lie.
    assert len(per_node) == 3 and all(n >= 1 for n in per_node.values()), per_node
    assert all(s > 0 for s in sent), sent


S3_NS, S3_PORT_NAME, S3_ADDRESS = netns.PREFIX + "s3", netns.PREFIX + "ps3", f"{netns.SUBNET}.100"
S3_ENDPOINT = f"http://{S3_ADDRESS}:5000"
MOTO = ("import logging,sys,time;logging.basicConfig(level=logging.INFO,stream=sys.stdout,format='%(message)s');"
        "from moto.server import ThreadedMotoServer as S;S(ip_address=sys.argv[1],port=5000).start();"
        "time.sleep(100000)")
UPLOAD = ("import sys,time,s3fs;fs=s3fs.S3FileSystem(key='k',secret='s',endpoint_url=sys.argv[1])\n"
          "for _ in range(100):\n"
          "  try: fs.mkdir('bdnet'); break\n"
          "  except Exception: time.sleep(0.3)\n"
          "fs.put(sys.argv[2].rstrip('/')+'/','bdnet/in/',recursive=True);fs.put(sys.argv[3],'bdnet/models/m.tflite')")
S3_OPTIONS = ("--storage-option", "key=k", "--storage-option", "secret=s", "--storage-option",
              f"endpoint_url={S3_ENDPOINT}")


def test_s3_cut_off_for_20s_mid_run(make_cluster, images, tmp_path):
    """Input, model and output in a bucket on an S3 server in a namespace of its own, whose link is down
    for 20 s mid-run: the storage retries ride it out, or the shards hit fail and are retried; none is lost."""
    cluster = make_cluster(2)
    cluster.add_namespace(S3_NS, S3_ADDRESS, S3_PORT_NAME)
    requests = tmp_path / "s3.log"
    with open(requests, "w") as fh:  # its request log tells how far the run is (this namespace cannot reach it)
        subprocess.Popen(cluster.exec_cmd(S3_NS, [sys.executable, "-c", MOTO, S3_ADDRESS]), env=cluster.env,
                         stdout=fh, stderr=subprocess.STDOUT)
    subprocess.run(cluster.exec_cmd(cluster.head.ns, [sys.executable, "-c", UPLOAD, S3_ENDPOINT, images, MODEL]),
                   env=cluster.env, check=True, timeout=300, capture_output=True)

    def staged() -> int:
        return sum("PUT /bdnet/out/_staging/images/shard-" in ln for ln in requests.read_text().splitlines())

    def cut_for_20s() -> None:
        cluster.link(S3_PORT_NAME, up=False)
        try:
            time.sleep(20)
        finally:
            cluster.link(S3_PORT_NAME, up=True)

    out = "s3://bdnet/out"
    rc, output, wall_s, cut_at = run_driver(
        cluster, "s3://bdnet/in/", out, fault=cut_for_20s, ready=lambda: staged() >= 0.3 * SHARDS,
        extra=("--model", "s3://bdnet/models/m.tflite", *S3_OPTIONS))
    print(f"S3 cut off at {cut_at:.1f}s for 20 s: {wall_s:.1f}s in all")
    assert rc == 0, output[-4000:]
    assert "status: complete" in output
    check = subprocess.run(cluster.exec_cmd(cluster.head.ns, [
        sys.executable, "-m", "batch_detect", "verify", out, "--input", "s3://bdnet/in/", *S3_OPTIONS, "--json"]),
        env=cluster.env, cwd=netns.ROOT, capture_output=True, text=True, timeout=300)
    report = json.loads(check.stdout)
    assert report["ok"], report["problems"]
    assert report["facts"]["images"] == IMAGES and report["facts"]["failures"] == 0, report["facts"]


def test_head_cut_off_from_the_driver_stops_with_an_error_and_resumes(make_cluster, images, tmp_path):
    """The driver on the worker node, the head's link cut at 30%: the driver stops within a minute with
    an error that says so (not Ray's end of the process minutes later), the manifest says failed, and once
    the head is back the same command finishes the output exactly once."""
    cluster = make_cluster(2)
    out = str(tmp_path / "out")
    rc, output, wall_s, cut_at = run_driver(cluster, images, out, ns=cluster.nodes[1].ns,
                                            fault=lambda: cluster.cut(0), timeout=300)
    print(f"head cut off at {cut_at:.1f}s: the driver stopped at {wall_s:.1f}s")
    assert rc == 2, output[-4000:]
    assert "lost contact with the Ray cluster's head (GCS at 10.231.0.1:6390)" in output, output[-3000:]
    assert wall_s - cut_at < 90, f"the driver took {wall_s - cut_at:.0f}s after the cut to stop"
    manifest = manifest_of(out)
    assert manifest["status"] == "failed" and "HeadUnreachable" in manifest["error"], manifest.get("error")

    cluster.cut(0, up=True)
    rc, output, _, _ = run_driver(cluster, images, out)  # from the head, as a user would go on
    assert rc == 0, output[-4000:]
    assert "already committed, resuming" in output
    assert_exactly_once(out, images, IMAGES)
