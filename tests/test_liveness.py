"""The call deadline and the node watch's bookkeeping, without a cluster (the cluster tests with real
faults are in test_netns_cluster.py)."""

from __future__ import annotations

import time

from ray.exceptions import RaySystemError

from batch_detect.run.liveness import (DEADLINE_FLOOR_S, DEADLINE_UNMEASURED_S, MIN_SAMPLES, CallClock, NodeWatch)


def test_deadline_is_unmeasured_then_floored_then_ten_times_p95():
    clock = CallClock()
    assert clock.deadline_s() == DEADLINE_UNMEASURED_S
    for _ in range(MIN_SAMPLES):
        clock.record(0.5)
    assert clock.deadline_s() == DEADLINE_FLOOR_S  # 10 x 0.5 s is under the floor
    for _ in range(100):
        clock.record(4.0)
    assert clock.deadline_s() == 40.0


def test_watch_reports_a_used_node_dead_once_and_measures_silence():
    answers = [[{"NodeID": "a", "Alive": True, "NodeManagerAddress": "10.0.0.1"},
                {"NodeID": "b", "Alive": False, "NodeManagerAddress": "10.0.0.2"},
                {"NodeID": "c", "Alive": False, "NodeManagerAddress": "10.0.0.3"}]]

    def nodes():
        if not answers:
            raise RaySystemError("GCS unreachable")
        return answers.pop()

    watch = NodeWatch(nodes, period=0.05)
    assert watch.silent_s() == 0.0
    watch.start()
    deadline = time.time() + 5
    found = []
    while not found and time.time() < deadline:
        found = watch.poll({"a", "b"})  # c is dead too, but holds none of our actors
        time.sleep(0.01)
    assert [(e["node_id"], e["address"], e["why"]) for e in found] == [("b", "10.0.0.2", "reported dead by Ray")]
    assert watch.poll({"a", "b"}) == []  # reported once
    time.sleep(0.3)  # every later question fails: the GCS is silent
    assert watch.silent_s() >= 0.25
    watch.stop()
