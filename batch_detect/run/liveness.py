"""Noticing, from the dispatch loop, work that will not come back: actors on nodes Ray has declared dead,
and calls that have run far longer than shards take.

Ray tells a caller that an actor's node is gone only when the call's connection gives up, which over a
cut link takes minutes; meanwhile the other actors would sit idle behind it. The GCS learns of a dead
node within its health-check period (about 30 s by default), so the driver asks it every few seconds
which nodes are alive, and treats calls on a dead node's actors as lost at once. The deadline covers
what the node check cannot see (an unreachable or hung actor on a node that is still alive)."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections import deque
from typing import Callable, Iterable

import ray
from ray.exceptions import RayError

log = logging.getLogger(__name__)

NODE_CHECK_S = 2.0  # how often the driver asks the GCS which nodes are alive (one small RPC)
GCS_SILENCE_S = 30.0  # the head unreachable this long: the run stops with an error (Ray's own end is minutes away)
DEADLINE_FLOOR_S = 20.0  # never give up on a call sooner than this
DEADLINE_FACTOR = 10  # ... nor sooner than this many times the slowest usual (p95) call
DEADLINE_UNMEASURED_S = 300.0  # before enough calls have been timed
MIN_SAMPLES = 5


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class NodeWatch:
    """The GCS's view of the nodes, asked every `period` seconds on a thread of its own (over a cut link
    the question may hang: the dispatch loop must not); which of the nodes we use it reports dead; how long
    it has been silent; and the record of every node given up on, for the manifest: {node_id, address,
    lost_at, why, shards_requeued}."""

    def __init__(self, nodes: Callable[[], list[dict]] = ray.nodes, period: float = NODE_CHECK_S):
        self.nodes, self.period = nodes, period
        self.dead: set[str] = set()
        self.lost: dict[str, dict] = {}
        self.addresses: dict[str, str] = {}
        self.snapshot: list[dict] | None = None  # the latest answer not yet looked at by poll
        self.latest: list[dict] | None = None  # the latest answer
        self.answered_at = 0.0
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        if self.thread is None:
            self.answered_at = time.monotonic()
            self.thread = threading.Thread(target=self._ask, name="node-watch", daemon=True)
            self.thread.start()

    def stop(self) -> None:
        self.stopped.set()

    def _ask(self) -> None:
        while not self.stopped.is_set():
            try:
                self.snapshot = self.latest = self.nodes()
                self.answered_at = time.monotonic()
            except (RayError, RuntimeError, OSError) as exc:
                # No answer this time (the GCS unreachable, or Ray shutting down as the run ends): asked
                # again next period; the silence is what the dispatch loop watches.
                log.debug("cannot ask the GCS for nodes: %s", exc)
            self.stopped.wait(self.period)

    def silent_s(self) -> float:
        """Seconds since the GCS last answered (0 before the watch starts)."""
        return time.monotonic() - self.answered_at if self.thread is not None else 0.0

    def poll(self, used: Iterable[str]) -> list[dict]:
        """Nodes among `used` newly reported dead since the last poll (their records)."""
        self.start()
        nodes, self.snapshot = self.snapshot, None
        found = []
        for node in nodes or ():
            self.addresses[node["NodeID"]] = node.get("NodeManagerAddress")
            if node["NodeID"] in used and node["NodeID"] not in self.dead and not node.get("Alive"):
                self.dead.add(node["NodeID"])
                entry = self.record(node["NodeID"], "reported dead by Ray")
                entry.setdefault("reported_dead_at", _now())
                found.append(entry)
        return found

    def record(self, node_id: str, why: str) -> dict:
        """The node's record, made the first time it is given up on (dead, or an actor there unreachable)."""
        if node_id not in self.lost:
            self.lost[node_id] = {"node_id": node_id, "address": self.addresses.get(node_id), "lost_at": _now(),
                                  "why": why, "shards_requeued": 0}
        return self.lost[node_id]


class CallClock:
    """How long calls take from dispatch to result (queueing on the actor included), and from that the
    deadline after which one is presumed lost: max(DEADLINE_FLOOR_S, DEADLINE_FACTOR x p95)."""

    def __init__(self, window: int = 200):
        self.samples: deque[float] = deque(maxlen=window)

    def record(self, seconds: float) -> None:
        self.samples.append(seconds)

    def deadline_s(self) -> float:
        if len(self.samples) < MIN_SAMPLES:
            return DEADLINE_UNMEASURED_S
        ordered = sorted(self.samples)
        p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
        return max(DEADLINE_FLOOR_S, DEADLINE_FACTOR * p95)
