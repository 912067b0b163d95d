"""The commit log and the committer without a cluster: events survive segments and checkpoints, replay
gives the same state, and parts are contiguous shard ranges cut by rows, never overlapping."""

from __future__ import annotations

import os

from batch_detect.output import commitlog
from batch_detect.output.commitlog import CommitLog, read_state
from batch_detect.run.committer import Committer
from batch_detect.output.sink import OutputStore


def shard(i: int, images: int = 8, failures: int = 0) -> dict:
    return {"shard_id": f"shard-{i:06d}", "images": images, "failures": failures, "detections": 2 * images,
            "failure_types": {"read/not_found": failures} if failures else {}, "unlabelled_class_ids": {}}


def test_segments_checkpoints_and_replay(tmp_path, monkeypatch):
    monkeypatch.setattr(commitlog, "CHECKPOINT_EVERY", 5)
    store = OutputStore(str(tmp_path / "out"))
    log = CommitLog(store)
    order = [3, 0, 1, 7, 2, 4, 5, 6, 9, 8, 11, 10] * 2  # out of order, and each shard logged twice
    for n, i in enumerate(order):
        ev = {"ev": "shard", "shard": i, **shard(i, failures=i % 3)}
        del ev["shard_id"]
        log.append(ev)
        if n % 2:
            log.flush()
    log.append({"ev": "part", "part": 0, "first": 0, "end": 6})
    log.append({"ev": "part_done", "part": 0, "rows": {"images": 48}})
    log.flush()
    names = os.listdir(tmp_path / "out" / "_log")
    assert any(n.endswith(".checkpoint.json") for n in names)
    assert len([n for n in names if n.endswith(".jsonl")]) < 5  # the checkpoint replaced the older segments
    again = read_state(store)
    assert again.num_committed == 12 == log.state.num_committed  # a repeated shard line counts once
    assert again.committed_runs() == [[0, 12]]
    assert again.totals == log.state.totals == {"images": 96, "failures": 12, "detections": 192}
    assert again.failure_types == {"read/not_found": 12}
    assert again.parts == [{"part": 0, "first": 0, "end": 6, "done": True, "rows": {"images": 48}}]
    assert sorted(again.pending_rows) == list(range(6, 12))
    # an appender opened on the output continues the sequence
    more = CommitLog.open(store)
    assert more.seq == log.seq and more.state.num_committed == 12


def test_committer_cuts_contiguous_parts_by_rows(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    calls = []
    committer = Committer(CommitLog(store), lambda part, ids, done: calls.append((part, ids, done)),
                         part_rows=20, first_part_s=3600)
    for i in (1, 2, 3):  # shard 0 is late: nothing can be cut past the gap
        committer.shard(shard(i))
    assert calls == []
    committer.shard(shard(0))  # 0-3: 32 rows → a part at 24 rows ([0, 3)), the rest waits
    assert [(p, ids) for p, ids, _ in calls] == [(0, ["shard-000000", "shard-000001", "shard-000002"])]
    for i in (4, 5):
        committer.shard(shard(i, images=4, failures=4))
    committer.cut(final=True)
    assert [(p, ids[0], ids[-1]) for p, ids, _ in calls] == [(0, "shard-000000", "shard-000002"),
                                                             (1, "shard-000003", "shard-000005")]
    assert committer.busy
    for _, _, done in calls:
        done({"images": 1})
    committer.flush()
    state = read_state(store)
    assert [(p["first"], p["end"], p["done"]) for p in state.parts] == [(0, 3, True), (3, 6, True)]
    assert not committer.busy and not state.pending_rows


def test_first_part_comes_early_then_parts_are_full(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    calls = []
    committer = Committer(CommitLog(store), lambda part, ids, done: calls.append(ids), part_rows=1000,
                          first_part_s=0)
    committer.shard(shard(0))
    assert calls == [["shard-000000"]]  # the output's first part does not wait for 1000 rows
    committer.shard(shard(1))
    committer.tick()
    assert len(calls) == 1  # later parts do
