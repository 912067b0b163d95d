"""Listing in several processes (`inputs/pages.py`): the same URIs and versions in the same order as one
process lists, on moto's S3 server on 127.0.0.1 and on a local folder, with the pages really parsed in
worker processes; errors and early stops as one process has them."""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import uuid

import pytest

import batch_detect.inputs.pages as pages
import batch_detect.inputs.walk as walk_module
from batch_detect.errors import InputError
from batch_detect.inputs.listing import ListingStats, iter_listed

from test_walk import S3_KEYS, TRICKY, _fs, _put_direct, _touch


def _listed(url, processes, options=None, extensions=()):
    stats = ListingStats()
    got = list(iter_listed(url, extensions, storage_options=options, stats=stats, processes=processes))
    return got, stats


@pytest.fixture
def processes_from_the_first_page(monkeypatch):
    """Every page in the worker processes (else a small listing stays on threads, as it should)."""
    monkeypatch.setattr(pages, "THRESHOLD", 0)


def _options(endpoint):
    return {"key": "testing-key-id", "secret": "x", "endpoint_url": endpoint, "skip_instance_cache": True}


@pytest.fixture(scope="module")
def wide_bucket(s3_server):
    """Tricky names (markers, a key that is also a prefix, '-' and '.' beside '/', unicode) and enough
    sub-prefixes and pages to keep several processes busy at once."""
    fs = _fs(s3_server)
    name = f"procs-{uuid.uuid4().hex[:10]}"
    rng = random.Random(7)
    keys = S3_KEYS + [f"p/w/{i:03d}/{rng.choice('ab-.é')}{j}.jpg" for i in range(40) for j in range(30)]
    _put_direct(fs, name, keys)
    return name


@pytest.mark.parametrize("processes", [2, 3])
@pytest.mark.parametrize("page", [1000, 7])  # 7: many pages per level, tokens carried across processes
def test_s3_prefix_same_as_one_process(s3_server, wide_bucket, processes_from_the_first_page, monkeypatch,
                                       processes, page):
    monkeypatch.setattr(walk_module, "_PAGE", page)
    url, options = f"s3://{wide_bucket}/p/", _options(s3_server)
    one, one_stats = _listed(url, 1, options)
    several, stats = _listed(url, processes, options)
    assert several == one and len(one) > 1200
    assert all(v and v.split(":")[1] for _, v in several)  # size:ETag, as the listing gives it
    assert one_stats.processes == 1 and stats.processes == processes  # the pages went to the processes
    assert stats.keys == len(several) and stats.listing_s > 0


@pytest.mark.parametrize("pattern", ["**/*.jpg", "w/0[0-1]*/*.jpg", "*/*", "n*/0[0-4]/*"])
def test_s3_glob_same_as_one_process(s3_server, wide_bucket, processes_from_the_first_page, pattern):
    url, options = f"s3://{wide_bucket}/p/{pattern}", _options(s3_server)
    one, _ = _listed(url, 1, options)
    several, stats = _listed(url, 2, options)
    assert several == one and one and stats.processes == 2


def _local_tree(root) -> None:
    for rel in TRICKY + [f"w/{i:02d}/{j}.jpg" for i in range(30) for j in range(5)] + ["notes.txt", ".h.jpg"]:
        _touch(str(root / rel))
    (root / "empty").mkdir()
    os.symlink(root / "w", root / "loop")  # a symlink to a folder is not followed, in either
    os.symlink(root / "a0.jpg", root / "link.jpg")  # one to a file is a file, in either
    os.symlink(root / "missing.jpg", root / "broken.jpg")


@pytest.mark.parametrize("processes", [2, 4])
def test_local_folder_same_as_one_process(tmp_path, processes_from_the_first_page, processes):
    _local_tree(tmp_path)
    extensions = (".jpg", ".png")
    one, one_stats = _listed(str(tmp_path), 1, extensions=extensions)
    several, stats = _listed(str(tmp_path), processes, extensions=extensions)
    assert several == one and len(one) == len(TRICKY) - 1 + 150 + 1  # '.../x!' has no extension; link.jpg
    assert all(v and v.split(":")[1] for _, v in several)  # size:mtime_ns from a stat, as one process does
    assert stats.processes == processes and one_stats.processes == 1
    assert stats.skipped == one_stats.skipped == 2  # notes.txt and x!
    glob = f"{tmp_path}/w/*/[0-2].jpg"
    assert _listed(glob, processes)[0] == _listed(glob, 1)[0] != []


def test_errors_and_early_stop_as_one_process(s3_server, wide_bucket, tmp_path, processes_from_the_first_page):
    options = _options(s3_server)
    for url in (f"s3://{wide_bucket}/no-such-prefix/", str(tmp_path / "missing")):
        with pytest.raises(InputError, match="does not exist"):
            _listed(url, 2, options if url.startswith("s3") else None)
    stream = iter_listed(f"s3://{wide_bucket}/p/w/", (), storage_options=options, processes=2)
    first = list(itertools.islice(stream, 5))
    stream.close()  # stops the processes, leaves nothing running
    assert first == _listed(f"s3://{wide_bucket}/p/w/", 1, options)[0][:5]


def test_small_listing_starts_no_process(tmp_path):
    """Below the threshold the pages stay on threads: a small input pays nothing for processes."""
    _local_tree(tmp_path)
    one, _ = _listed(str(tmp_path), 1)
    several, stats = _listed(str(tmp_path / "w" / "01"), 4)
    assert stats.processes == 1 and [u for u, _ in several] == [u for u, _ in one if "/w/01/" in u]


def test_pool_hands_back_errors_and_a_dead_process():
    """What a page raises in a worker process is raised where the walk takes the page; a worker that dies
    fails its page and those queued, never hangs the listing."""
    with pages.ListingPool(2, threshold=0) as pool:
        assert pool.submit(os.path.basename, "a/b.jpg").result(timeout=30) == "b.jpg"
        with pytest.raises(FileNotFoundError, match="no-such-folder"):
            pool.submit(os.listdir, "/no-such-folder").result(timeout=30)
        assert pool.in_processes == 2
        for runner in pool.remote.runners:
            runner.proc.kill()
        with pytest.raises(OSError, match="listing process"):
            pool.submit(os.getpid).result(timeout=30)


def test_a_process_has_several_pages_in_flight(tmp_path):
    """A listing page mostly waits on the store: one worker process takes PAGES_PER_PROCESS at once. Four
    tasks that each wait until all four have started finish only if they run side by side."""
    assert pages.PAGES_PER_PROCESS >= 4
    barrier = tmp_path / "started"
    barrier.mkdir()
    wait_for_all = (f'touch "{barrier}/$$"; n=0; while [ "$(ls "{barrier}" | wc -l)" -lt 4 ]; do '
                    'n=$((n+1)); [ $n -gt 400 ] && exit 7; sleep 0.05; done')
    slots = pages._Slots([pages._Process(())])
    try:
        futures = [slots.submit(subprocess.run, ["sh", "-c", wait_for_all]) for _ in range(4)]
        assert [f.result(timeout=60).returncode for f in futures] == [0, 0, 0, 0]
        assert slots.submit(os.path.basename, "a/b.jpg").result(timeout=30) == "b.jpg"  # and goes on after
    finally:
        slots.close()


# --- how fast the listing went: the manifest's input section and the progress lines ----------------------

def test_manifest_says_keys_listed_and_keys_per_s(models_dir, tmp_path):
    import json
    import sys

    from batch_detect.synthetic import write_dataset

    folder = tmp_path / "images"
    write_dataset(str(folder), 40, seed=5, sizes=[(320, 240)])
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "batch_detect", "run", "--model", os.path.join(models_dir, "shapes_ssd_uint8.tflite"),
           "--input", str(folder), "--output", str(out), "--shard-size", "8", "--listing-processes", "2"]
    done = subprocess.run(cmd, env={**os.environ, "RAY_ADDRESS": ""}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    listed = json.load(open(out / "_manifest.json"))["input"]
    # ground_truth.json and notes.txt were listed, then skipped for their extension
    assert listed["keys_listed"] == 42 and listed["listed"] == 40 and listed["skipped_non_image"] == 2
    assert listed["listing_s"] > 0 and listed["keys_per_s"] == pytest.approx(42 / listed["listing_s"], rel=0.01)
    assert listed["listing_processes"] == 1  # 40 files in one folder: one page, no process started


def test_progress_lines_say_keys_listed_and_their_rate(tmp_path):
    import io

    from batch_detect.commands.progress import Progress, _short

    for i in range(300):
        _touch(str(tmp_path / f"d{i % 7}" / f"{i:04d}.jpg"))
    stats = ListingStats()
    stream = iter_listed(str(tmp_path), (".jpg",), stats=stats, processes=1)
    first = list(itertools.islice(stream, 120))
    log = io.StringIO()  # not a terminal: plain lines
    bar = Progress(None, None, stream=log, listing=stats)
    bar.update({"images": 64, "failures": 0, "detections": 1})
    rest = list(stream)
    bar.listed(len(first) + len(rest), 5)
    bar.interval = 0
    bar.update({"images": 64, "failures": 0, "detections": 1})
    lines = log.getvalue().splitlines()
    import re

    assert re.search(r", listing: 120 keys, [\d.]+k? keys/s$", lines[0]), lines
    assert float(re.search(r"([\d.]+)k? keys/s", lines[0]).group(1)) > 0
    assert "listing:" not in lines[1] and stats.keys == 300, lines  # the listing ended: totals instead
    assert [_short(n) for n in (999, 38_412, 2_100_000, 120_000_000)] == ["999", "38k", "2.1M", "120M"]


def test_pages_as_ray_tasks_same_as_one_process(s3_server, wide_bucket, local_ray, monkeypatch):
    """On a cluster the run joined, the pages go to Ray tasks (`executors.list_on_cluster`): mid-listing,
    as the run moves them once Ray is up; the same URIs and versions in the same order, errors as raised."""
    from batch_detect.config import RunConfig
    from batch_detect.inputs.plan import plan_input
    from batch_detect.run.distributed import ListingRunner, cluster_cpus
    from batch_detect.run.executors import RayFacts, list_on_cluster

    monkeypatch.setattr(walk_module, "_PAGE", 7)  # many pages, each its own task
    url, options = f"s3://{wide_bucket}/p/", _options(s3_server)
    one, _ = _listed(url, 1, options)
    plan = plan_input(url, form="files", extensions=(), shard_size=10, storage_options=options,
                      listing_processes=2)  # its first shard listed on threads, as prepare leaves it
    facts = RayFacts(started_ray=False, ray_start_s=0, num_actors=1, capacity=1, cluster_cpus=cluster_cpus(),
                     memory_per_actor=0)
    assert list_on_cluster(RunConfig(listing_processes=3), plan, facts) == 3
    got = [(u, v) for shard in plan.shards for u, v in zip(shard.uris, shard.versions)]
    assert got == one and plan.stats.processes == 3  # every page after the switch went to a Ray task
    embedded = plan_input(url, form="files", extensions=(), shard_size=10, storage_options=options,
                          listing_processes=2)
    assert list_on_cluster(RunConfig(), embedded, RayFacts(True, 0, 1, 1, 2, 0)) == 0  # this machine's processes
    assert sum(len(s.uris) for s in embedded.shards) == len(one) and embedded.stats.processes == 2
    with pages.ListingPool(2, threshold=0) as pool:
        pool.use([ListingRunner(), ListingRunner()])
        with pytest.raises(FileNotFoundError, match="no-such-folder"):
            pool.submit(os.listdir, "/no-such-folder").result(timeout=60)
