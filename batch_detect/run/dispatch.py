"""One invocation's dispatch: shards from the listing thread to the executor in use, staged shards logged
as they come, parts cut behind them, fail-fast judged on what this invocation did, and the manifest
written last. `Dispatch` holds what the loop's callbacks share; the executors (`executors.py`) do the
work and the committer (`committer.py`) the logging."""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass, field
from typing import Iterator

from ..config import RunConfig
from ..errors import FailureRateExceeded, LeaseLost, StoreUnavailable, count
from ..inputs.plan import Shard
from ..model.anchors import load_anchors
from ..output.commitlog import CommitLog
from ..outage import OUTAGE
from ..output.lease import Lease
from ..output.sink import MANIFEST
from . import manifest as facts
from .committer import Committer
from .executors import Hooks, LocalExecutor, RayExecutor, RayFacts, SmallRun, local_threads, start_ray
from .feed import PlanFeed, first_shard_of
from .metrics import record_dispatch
from .prepare import Prepared
from .worker import WorkerSettings

FAIL_FAST_MIN = 500  # images an invocation processes before --max-failure-rate may stop it early
LAST_WRITES_S = 60.0  # a run stopped by a store outage: how long its last writes may wait for the store


@dataclass
class FailFast:
    """--max-failure-rate judged on this invocation's own images (a resumed run is judged on what it does
    itself, so fixing the cause lets it go on), after at least FAIL_FAST_MIN of them."""

    limit: float | None
    images: int = 0
    failures: int = 0
    types: dict = field(default_factory=dict)
    why: str | None = None  # set once: why the run stops

    def judge(self, summary: dict) -> bool:
        """True the moment this shard takes the run over the limit."""
        if self.limit is None or self.why is not None:
            return False
        self.images += summary["images"]
        self.failures += summary["failures"]
        for kind, n in summary.get("failure_types", {}).items():
            self.types[kind] = self.types.get(kind, 0) + n
        done = self.images + self.failures
        if done < FAIL_FAST_MIN or self.failures <= self.limit * done:
            return False
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(self.types.items(), key=lambda kv: (-kv[1], kv[0])))
        self.why = (f"{self.failures} of the first {done} images failed ({self.failures / done:.0%}), over "
                    f"--max-failure-rate {self.limit:g} ({kinds}): stopped early instead of running the whole input. "
                    "What was processed is committed; fix the cause (the model, the input, credentials) and re-run "
                    "the same command to go on, or pass --overwrite to start again")
        return True


@dataclass
class Callbacks:
    """The caller's view of the run (see `pipeline.run`); each may be None."""

    on_start: object = None
    on_shard: object = None
    on_listed: object = None
    on_phase: object = None


class Dispatch:
    def __init__(self, config: RunConfig, ready: Prepared, manifest: dict, commit_log: CommitLog, lease: Lease,
                 t_start: float, small: SmallRun | None, ray_facts: RayFacts | None, calls: Callbacks):
        self.config, self.ready, self.manifest, self.lease, self.t_start = config, ready, manifest, lease, t_start
        self.small, self.ray_facts, self.calls = small, ray_facts, calls
        self.state = commit_log.state
        self.run_no = ready.planning.run
        self.previous_parts = list(self.state.parts)
        self.done_before = self.state.num_committed
        self.run_before = dict(self.state.run_totals.get(self.run_no, {}))
        self.measured = facts.Measured()
        self.fail_fast = FailFast(config.max_failure_rate)
        self.reported = (0.0, self.state.num_committed)  # when the metrics were last recorded, and at how many
        self.local: LocalExecutor | None = None
        self.ray: RayExecutor | None = None
        self.resume = ready.planning.mode == "resume"
        self.feed = PlanFeed(ready.plan, ready.store, ready.planning, self.state.chunks if self.resume else [],
                             self.state.listed if self.resume else None)
        self.committer = Committer(commit_log, self._compact, part_rows=config.part_rows)
        planning = ready.planning
        if planning.mode in ("fresh", "new-run"):
            self.committer.start_run(self.run_no, planning.first_chunk, planning.first_shard, config.incremental,
                                     config.retry_failures)
        elif planning.mode == "continue":
            self.committer.relist(self.run_no, planning.first_chunk)
        self.settings = self._settings()
        self.hooks = Hooks(on_shard=self._shard_done, tick=self._tick, drained=lambda: self.committer.cut(final=True))

    @property
    def executor(self) -> LocalExecutor | RayExecutor:
        """The one in use: Ray once the run went there, else the worker processes."""
        return self.ray or self.local

    def _settings(self) -> WorkerSettings:
        config, ready, ray_facts = self.config, self.ready, self.ray_facts
        return WorkerSettings(
            model_url=config.model, model_sha256=ready.identity["model_sha256"],
            memory_per_actor=ray_facts.memory_per_actor if ray_facts else 0,
            backend=ready.backend.name,
            num_threads=ray_facts.cpus_per_actor if ray_facts else local_threads(config, self.small.workers),
            score_threshold=config.score_threshold, resize=config.resize,
            normalization=config.pixel_normalization, max_pixels=config.max_pixels, jpeg_draft=config.jpeg_draft,
            output_format=config.output_format, anchors=load_anchors(config.anchors) if config.anchors else None,
            nms=config.nms,
            labels=ready.labels, extensions=config.extensions, image_column=config.image_column,
            batch_size=config.batch_size, read_ahead=config.read_ahead, decode_threads=config.decode_threads,
            store_timeout=config.store_timeout,
            output_url=config.output, storage_options=config.storage_options,
        )

    # --- the loop's callbacks, on the dispatch thread -------------------------------------------

    def _compact(self, part: int, shard_ids: list[str], done) -> None:
        def finished(rows: dict) -> None:
            if self.measured.first_part_s is None:
                self.measured.first_part_s = time.perf_counter() - self.t_start
            done(rows)

        self.executor.compact(part, shard_ids, finished)

    def _source(self) -> Iterator[Shard | None]:
        state, committer = self.state, self.committer
        for chunk in self.feed.chunks():
            if chunk is None:
                yield None
                continue
            if chunk.index >= len(state.chunks):
                committer.chunk(chunk)
            for shard in chunk.shards:
                if not state.is_committed(shard.index):
                    yield shard
        if state.listed is None:
            committer.listed(**self.feed.facts)
        if self.calls.on_listed is not None:
            first = first_shard_of(state, self.run_no)
            run_items = sum(c["items"] for c in state.chunks if c["first_shard"] >= first)
            self.calls.on_listed(None if self.ready.plan.form == "tar" else run_items, state.planned_end - first)

    def _shard_done(self, summary: dict) -> None:
        if self.measured.first_shard_s is None:
            self.measured.first_shard_s = time.perf_counter() - self.t_start
        self.measured.add(summary)
        self.committer.shard(summary)
        if self.calls.on_shard is not None:
            self.calls.on_shard(summary)
        if self.fail_fast.judge(summary):
            self.executor.stop()  # what is in flight commits and is compacted; nothing new starts

    def _tick(self) -> None:
        self.lease.check()  # before the committer writes: a run that lost its lease logs nothing more
        self.committer.tick()
        at, shards = self.reported
        if self.ray is not None and time.monotonic() - at >= 1.0:
            record_dispatch(self.config.output, self.state.num_committed - shards, len(self.executor.inflight))
            self.reported = (time.monotonic(), self.state.num_committed)

    # --- the run ----------------------------------------------------------------------------------

    def run(self) -> dict:
        """The run to its end; the manifest it wrote. Raises what stopped it (the manifest says so too)."""
        shards = self._source()
        try:
            if self.calls.on_start is not None:
                self.calls.on_start(self.small.workers if self.small else self.ray_facts.num_actors,
                                    self.run_before.get("shards", 0),
                                    self.run_before.get("images", 0) + self.run_before.get("failures", 0),
                                    without_ray=self.small is not None, threads=self.settings.num_threads)
            t_run = time.perf_counter()
            self.feed.start()
            if self.small is not None:
                shards = self._run_locally(shards)
            if self.ray_facts is not None:
                finished = self.resume and self.state.listed and self.state.num_committed == self.state.planned_end
                self.ray = RayExecutor(self.config, self.ray_facts, self.settings, shards, self.ready.store,
                                       self.hooks, start_pool=not finished)
                if self.small is None:
                    self.committer.resume()
                self.ray.run()
            self.committer.flush()
            if self.fail_fast.why:
                raise FailureRateExceeded(self.fail_fast.why)
            run_s = time.perf_counter() - t_run
        except BaseException as exc:
            self._stopped(exc)
            raise
        finally:
            if self.ray is not None:
                self.ray.close()
        return self._finish(run_s)

    def _run_locally(self, shards: Iterator[Shard | None]) -> Iterator[Shard | None]:
        """Worker processes first; the shards they leave (a worker died) go on with Ray, which retries them
        and isolates an image that kills workers. Returns what is left for Ray."""
        self.local = LocalExecutor(self.config, self.settings, self.small, shards, self.ready.store, self.hooks)
        self.committer.resume()
        handed_back = self.local.run()
        if not handed_back:
            return shards
        self.calls.on_phase(f"a worker process failed ({self.local.dispatcher.why_ray}): going on with Ray, which "
                            f"retries the {count(len(handed_back), 'shard')} left and isolates an image that kills "
                            "workers")
        self.ray_facts = start_ray(self.config, self.ready, None, None, self.calls.on_phase, most=len(handed_back))
        self.settings = dataclasses.replace(self.settings, memory_per_actor=self.ray_facts.memory_per_actor,
                                            num_threads=self.ray_facts.cpus_per_actor)
        return itertools.chain(handed_back, shards)

    def _stopped(self, exc: BaseException) -> None:
        """A run that ends early keeps what it committed; the manifest says so (or is left as it was)."""
        self.feed.close()
        if isinstance(exc, LeaseLost) or self.lease.lost is not None:
            return  # the output is another run's now: nothing more is written there, not even the manifest
        if not isinstance(exc, StoreUnavailable):
            self._record_stop(exc)
            return
        with OUTAGE.grace(LAST_WRITES_S):
            try:
                self._record_stop(exc)
            except (StoreUnavailable, OSError):
                exc.add_note("the store did not answer for the manifest either: it still says 'running'; the "
                             "commit log holds what was committed, and re-running resumes from it")

    def _record_stop(self, exc: BaseException) -> None:
        state, store, previous = self.state, self.ready.store, self.ready.previous
        try:
            self.committer.flush()  # what was staged and logged stays committed: a re-run skips it
        finally:
            if previous is not None and self.committer.staged_now == 0 and not state.parts[len(self.previous_parts):] \
                    and self.resume:
                store.write_json(MANIFEST, previous)  # refused before it changed anything: left as it was
            else:
                facts.stopped(self.manifest, state, self.config, self.ready.planning, self.done_before,
                              self.ready.labels, exc)
                store.write_json(MANIFEST, self.manifest)
                if isinstance(exc, KeyboardInterrupt):
                    exc.add_note(facts.what_stays(state))

    def _cluster(self) -> dict:
        """Where the run ran, for the manifest: Ray's pool, or this machine's worker processes (and why it
        went on with Ray when they failed)."""
        out = self.executor.facts()
        if self.local is not None:
            out["without_ray"] = self.local.handed_over()
        return out

    def _finish(self, run_s: float) -> dict:
        facts.finish(self.manifest, self.state, self.config, self.ready, run_before=self.run_before,
                     done_before=self.done_before, cluster=self._cluster(), measured=self.measured,
                     ray_start_s=self.ray_facts.ray_start_s if self.ray_facts else None, run_s=run_s,
                     total_s=time.perf_counter() - self.t_start, changed=self.feed.changed)
        self.lease.check()  # the manifest says the output is whole: only while it is still this run's
        self.ready.store.write_json(MANIFEST, self.manifest)
        return self.manifest
