"""The job's numbers as Ray metrics, so that the Ray dashboard, Prometheus and Grafana show a running
job: each node's metrics agent serves them in Prometheus format (`ray start --metrics-export-port`).

Actors count what they process per shard; the driver counts commits and shards in flight. Every series
carries the output URL (`output`), so several jobs on one cluster stay apart. Metric objects are made
on first use in each process: a process that never records (a test without Ray) never builds them.
"""

from __future__ import annotations

import functools
import logging
from functools import lru_cache

log = logging.getLogger(__name__)
PREFIX = "batch_detect_"


def _best_effort(fn):
    """Metrics are for watching a job: failing to record one must never fail a shard or the run."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 — logged once per process, then silent
            if not getattr(wrapper, "warned", False):
                wrapper.warned = True
                log.warning("Ray metrics could not be recorded (%s: %s); the job goes on without them",
                            type(exc).__name__, exc)

    return wrapper


@lru_cache(maxsize=None)
def _metrics():
    from ray.util.metrics import Counter, Gauge

    return {
        "images": Counter(PREFIX + "images", "Images processed (with or without detections)", tag_keys=("output",)),
        "failures": Counter(PREFIX + "failures", "Images that became failure records, by stage",
                            tag_keys=("output", "stage")),
        "detections": Counter(PREFIX + "detections", "Detections written", tag_keys=("output",)),
        "decode_seconds": Counter(PREFIX + "decode_seconds", "Time spent reading and decoding, per actor",
                                  tag_keys=("output", "actor")),
        "infer_seconds": Counter(PREFIX + "infer_seconds", "Time spent in the interpreter, per actor",
                                 tag_keys=("output", "actor")),
        "store_retries": Counter(PREFIX + "store_retries", "Store requests tried again after a transient error "
                                 "(throttling, unreachable), per actor", tag_keys=("output", "actor")),
        "shards_committed": Counter(PREFIX + "shards_committed", "Shards the driver committed",
                                    tag_keys=("output",)),
        "shards_in_flight": Gauge(PREFIX + "shards_in_flight", "Shards sent to actors and not yet back",
                                  tag_keys=("output",)),
    }


@_best_effort
def record_shard(output: str, actor: str, summary: dict, timings: dict) -> None:
    """An actor's processed shard: images, failures by stage, detections, its decode and invoke time."""
    m = _metrics()
    tags = {"output": output}
    if summary["images"]:
        m["images"].inc(summary["images"], tags)
    if summary["detections"]:
        m["detections"].inc(summary["detections"], tags)
    stages: dict[str, int] = {}
    for kind, n in summary.get("failure_types", {}).items():
        stage = kind.split("/", 1)[0]
        stages[stage] = stages.get(stage, 0) + n
    for stage, n in stages.items():
        m["failures"].inc(n, {**tags, "stage": stage})
    for key, name in (("read_decode_s", "decode_seconds"), ("infer_s", "infer_seconds"),
                      ("store_retries", "store_retries")):
        if timings.get(key):
            m[name].inc(timings[key], {**tags, "actor": actor})


@_best_effort
def record_dispatch(output: str, committed: int, in_flight: int) -> None:
    """The driver's view: shards committed since the last call, shards in flight now."""
    m = _metrics()
    if committed:
        m["shards_committed"].inc(committed, {"output": output})
    m["shards_in_flight"].set(in_flight, {"output": output})
