"""The job, start to finish: check everything that can be checked before any actor starts (config,
model, labels, input, output, cluster: `prepare.py`), then list, plan, dispatch and commit as one stream
(`dispatch.py`), manifest last (`manifest.py`).

The listing runs on a thread of its own (`feed.py`): it cuts the input into shards, stores the plan
chunk by chunk, and hands chunks to the dispatch loop through a short queue, so the first shards run
while the rest is still being listed and the driver never holds the whole input.

Re-running the same command into the same output resumes it: committed shards are skipped, the rest
are redone under the same deterministic names. A run whose model or settings differ is refused unless
--overwrite; one whose listing differs is stopped at the first plan chunk that differs.

With --incremental, an output holds a sequence of runs: each plans only the objects no earlier run
planned (or whose version changed), numbers its shards after theirs, and stamps its rows with its
`run_id`; the earlier runs' plans are the history it is compared with (`history.py`)."""

from __future__ import annotations

import contextlib
import itertools
import signal
import threading
import time
from dataclasses import dataclass

from ..config import RunConfig
from ..errors import OutputError, Terminated
from ..outage import configure as configure_outage
from ..output.commitlog import CommitLog
from ..output.lease import Lease
from ..output.sink import MANIFEST, OutputStore
from . import manifest as facts
from .dispatch import Callbacks, Dispatch
from .executors import described, list_on_cluster, shut_down_ray, start_ray, without_ray
from .feed import check_listing
from .prepare import Prepared, check_before_writing, prepare

__all__ = ["RunSummary", "prepare", "run"]


@dataclass
class RunSummary:
    output: str
    manifest: dict
    nothing_new: dict | None = None  # a run that found nothing to do (nothing new, or already complete): what it saw

    @property
    def counts(self) -> dict:
        return self.manifest["counts"]


def run(config: RunConfig, on_start=None, on_shard=None, on_listed=None, on_phase=None,
        on_listing=None) -> RunSummary:
    """`on_start(actors, done_shards, done_images, without_ray, threads)` once the pool is sized; `on_shard(summary)`
    per staged shard; `on_listed(images_or_None, shards)` when the listing ends (counts of this run's plan);
    `on_phase(text)` as each step before the first shard begins (so a user sees what the wait is);
    `on_listing(stats)` once the listing has begun: its live `ListingStats` (keys so far, keys/s)."""
    t_start = time.perf_counter()
    configure_outage(config.store_timeout)
    store = check_before_writing(config)  # before the lease: it is the run's first request to the output
    # An existing output is leased before its log is read: two drivers must never plan on one state.
    lease = Lease.acquire(store) if not config.overwrite and store.exists(MANIFEST) else None
    calls = Callbacks(on_start, on_shard, on_listed, on_phase or (lambda text: None))
    try:
        return _run(config, store, t_start, lease, calls, on_listing)
    finally:
        if lease is not None:
            lease.release()


def _run(config: RunConfig, store: OutputStore, t_start: float, lease, calls: Callbacks,
         on_listing=None) -> RunSummary:
    calls.on_phase(f"checking the model, the input and the output ({config.output})")
    ready = prepare(config, store)
    if on_listing is not None:
        on_listing(ready.plan.stats)
    done = _nothing_to_do(config, ready, t_start)
    if done is not None:
        return done
    manifest = facts.start(config, ready)
    small = without_ray(config, ready, ready.planning, ready.plan)
    if small is not None:
        _totals_at_start(calls, ready, small)
        calls.on_phase(f"using {described(config, ready.plan.form, small)}")
        lease, owns_lease, commit_log = _open_output(config, ready, manifest, lease)
        ray_facts = None
    else:
        # Ray is imported only now: a run with nothing to do (above) answers in the time Python starts.
        ray_facts = start_ray(config, ready, ready.planning, ready.plan, calls.on_phase)
        try:
            list_on_cluster(config, ready.plan, ray_facts)
            lease, owns_lease, commit_log = _open_output(config, ready, manifest, lease)
        except BaseException:
            shut_down_ray(ray_facts)
            raise
    try:
        with _sigterm_as_interrupt():
            dispatch = Dispatch(config, ready, manifest, commit_log, lease, t_start, small, ray_facts, calls)
            return RunSummary(output=config.output, manifest=dispatch.run())
    finally:
        if owns_lease:
            lease.release()


def _nothing_to_do(config: RunConfig, ready: Prepared, t_start: float) -> RunSummary | None:
    """The answer of a run that has nothing to do, from the listing alone, without starting Ray: nothing new
    for an incremental run, or a finished output whose input still lists what it planned."""
    planning, plan, previous = ready.planning, ready.plan, ready.previous
    state = ready.commit_log.state if ready.commit_log else None
    if planning.mode == "new-run":
        first = next(plan.shards, None)
        if first is None and facts.all_compacted(state):
            return RunSummary(output=config.output, manifest=previous,
                              nothing_new={**planning.selection.facts(), "runs": len(state.runs),
                                           "total_s": time.perf_counter() - t_start})
        plan.shards = itertools.chain([first] if first is not None else [], plan.shards)
    elif planning.mode == "resume" and previous.get("status") == "complete" and facts.all_compacted(state):
        changed = check_listing(plan, ready.store, planning, state)
        again = {**previous, "counts": {**previous["counts"], "skipped_committed_shards": state.num_committed}}
        return RunSummary(output=config.output, manifest=again,
                          nothing_new={"complete": True, "unchanged": state.planned_items - changed,
                                       "changed": changed, "runs": len(state.runs),
                                       "total_s": time.perf_counter() - t_start})
    return None


def _totals_at_start(calls: Callbacks, ready: Prepared, small) -> None:
    """A small run was listed to the end already (that is how it was found small): progress shows its totals
    from the start."""
    if calls.on_start is None or calls.on_listed is None or ready.planning.mode not in ("fresh", "resume") \
            or ready.plan.form == "tar":
        return
    started = calls.on_start

    def on_start(*args, **kwargs):
        started(*args, **kwargs)
        calls.on_listed(small.images, small.shards)

    calls.on_start = on_start


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (what Kubernetes and `ray job stop` send) stops the run as Ctrl-C does: committed shards
    stay committed and the manifest says interrupted, within a second. `ray job stop` sends SIGKILL 3 s
    later (RAY_JOB_STOP_WAIT_TIME_S), so nothing slow may happen on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _open_output(config: RunConfig, ready: Prepared, manifest: dict, lease):
    """The lease (a new output, or --overwrite: taken once the run is known to be able to run), the
    cleared output for --overwrite, the commit log and the running manifest."""
    store = ready.store
    if lease is None:
        lease = Lease.acquire(store)
        owns_lease = True
    else:
        owns_lease = False
    store.fence = lease.fence  # from here on every write of the driver's, log and manifest included
    try:
        if config.overwrite:
            store.clear()
        try:
            commit_log = ready.commit_log or CommitLog(store)
            store.write_json(MANIFEST, manifest)
        except OSError as exc:
            raise OutputError(f"cannot write to output {config.output!r}: {type(exc).__name__}: {exc}") from None
    except BaseException:
        if owns_lease:
            lease.release()
        raise
    return lease, owns_lease, commit_log
