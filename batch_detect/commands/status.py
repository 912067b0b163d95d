"""`batch-detect status OUT`: where a run stands, from anywhere that can read its output (local or an
object store), while it runs or after. It reads only what the job commits: the manifest and the commit
log (a checkpoint and a few segments), so it needs no connection to the cluster and costs the same on a
million-image output as on a small one."""

from __future__ import annotations

import time

from ..output.commitlog import read_state
from ..output.records import retryable_by_type
from ..errors import OutputError, count
from ..output.sink import MANIFEST, OutputStore

RATE_WINDOW_S = 300  # the rate is over the last five minutes of commits
STALE_S = 120  # a "running" output with no commit for this long may have lost its driver


def status(output: str, storage_options: dict | None = None, now: float | None = None) -> dict:
    store = OutputStore(output, storage_options)
    if not store.exists(MANIFEST):
        raise OutputError(f"{output!r} holds no {MANIFEST}: not a batch-detect output (or no run has started)")
    manifest = store.read_json(MANIFEST)
    state = read_state(store)
    now = time.time() if now is None else now
    done = state.totals["images"] + state.totals["failures"]
    planned = state.planned_items if state.listed else None  # every run's plan, as `done` counts every run
    last_commit = state.recent[-1][0] if state.recent else None
    state_name = manifest.get("status", "unknown")
    if state_name == "running" and last_commit is not None and now - last_commit > STALE_S:
        state_name = "stalled"  # the manifest says running, but nothing has committed for a while
    ended = state_name not in ("running", "stalled")
    # A run that ended is measured up to its last commit: the time since is not the run's
    end = last_commit if ended and last_commit is not None else now
    recent = [r for r in state.recent if r[0] >= end - RATE_WINDOW_S]
    rate = None
    if ended and manifest.get("status") == "complete" and (manifest.get("timings") or {}).get("images_per_s"):
        rate = manifest["timings"]["images_per_s"]  # the run's own measure, start to end
    elif ended and len(recent) > 1:  # the first commit's images were done before the window opens
        rate = sum(r[1] for r in recent[1:]) / max(recent[-1][0] - recent[0][0], 1e-3)
    elif recent and not ended:
        span = max(now - min(r[0] for r in recent), 1.0)
        rate = sum(r[1] for r in recent) / span
    return {
        "output": output, "state": state_name, "run_id": manifest.get("run_id"), "runs": len(state.runs),
        "done": done, "planned": planned, "listed_so_far": state.planned_items,
        "images": state.totals["images"], "failures": state.totals["failures"],
        "detections": state.totals["detections"], "failures_by_type": dict(state.failure_types),
        "shards_committed": state.num_committed, "parts": len(state.parts),
        "rate_images_per_s": rate, "ended": ended,
        "eta_s": (planned - done) / rate if rate and not ended and planned is not None and planned > done else None,
        "last_commit_s_ago": None if last_commit is None else round(now - last_commit, 1),
        "nodes": len({r[2] for r in recent}), "actors": len({(r[2], r[3]) for r in recent}),
        "last_error": manifest.get("error"),
        # how long the driver waits out a store it cannot reach, writing nothing meanwhile
        "store_timeout_s": (manifest.get("config") or {}).get("store_timeout"),
        # Read from the parts once the run ended (while it runs, its newest rows are not in parts yet)
        "retryable": retryable_by_type(store) if ended and state.totals["failures"] else {},
    }


def render(s: dict) -> str:
    if s["planned"] is not None:
        total = s["planned"]
    elif s["ended"]:
        total = f"≥{s['listed_so_far']} (the listing stopped with the run; re-running the same command finishes it)"
    else:
        total = f"≥{s['listed_so_far']} (still listing)"
    runs = f" of {s['runs']}" if s["runs"] > 1 else ""
    lines = [f"{s['output']}: {s['state']} (run {s['run_id']}{runs})",
             f"images: {s['done']} of {total} done ({s['images']} processed, {s['failures']} failed, "
             f"{s['detections']} detections); {count(s['shards_committed'], 'shard')} committed, "
             f"{count(s['parts'], 'part')}"]
    if s["rate_images_per_s"]:
        eta = f", ETA {s['eta_s']:.0f}s" if s["eta_s"] is not None else ""
        when = "until it ended" if s["ended"] else f"over the last {RATE_WINDOW_S // 60} minutes"
        lines.append(f"rate: {s['rate_images_per_s']:.1f} images/s {when}{eta}; "
                     f"{count(s['actors'], 'worker')} on {count(s['nodes'], 'node')} committed in its last "
                     f"{RATE_WINDOW_S // 60} minutes")
    if s["last_commit_s_ago"] is not None:
        lines.append(f"last commit: {s['last_commit_s_ago']:.0f}s ago")
    if s["state"] == "stalled":
        waits = s.get("store_timeout_s")
        lines.append(f"nothing committed for over {STALE_S}s although the manifest says running: the driver may be "
                     "waiting out a store it cannot reach (it writes nothing meanwhile"
                     + (f", for up to {waits:.0f} s of --store-timeout, then stops" if waits else "")
                     + "), or it may be gone; re-running the same command resumes the run")
    if s["failures_by_type"]:
        lines.append("failures: " + ", ".join(f"{k} {v}" for k, v in sorted(s["failures_by_type"].items())))
    if s["retryable"]:
        kinds = ", ".join(f"{k} {v}" for k, v in s["retryable"].items())
        lines.append(f"retryable (latest record a failure): {kinds}; `batch-detect run ... --retry-failures STAGE[/TYPE]` "
                     "processes them again as a new run")
    if s["last_error"]:
        lines.append(f"last error: {s['last_error']}")
    return "\n".join(lines)
