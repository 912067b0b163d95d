"""`batch-detect run --dry-run`: what a run would do and roughly how long it would take, without
writing anything: the listing and plan, the model's family and I/O, and the model timed on a sample."""

from __future__ import annotations

import itertools
import os
import random
import time

from ..config import RunConfig
from ..model.detector import Detector
from ..run.local import worker_count
from ..run.executors import described, memory_per_worker, ray_address, shut_down_ray, start_ray, without_ray
from ..run.prepare import prepare
from ..inputs.reading import Reader
from ..run.worker import shard_items

SAMPLE = 16


def _sample(shards, k: int):
    """(shards counted, items counted, up to k shards spread over the plan): reservoir sampling with a
    fixed seed, so the listing is streamed, never held."""
    rng = random.Random(0)
    picked, n, items = [], 0, 0
    for shard in shards:
        n += 1
        items += len(shard.uris)
        if len(picked) < k:
            picked.append(shard)
        elif (j := rng.randrange(n)) < k:
            picked[j] = shard
    return n, items, sorted(picked, key=lambda s: s.index)


def _quotas(sizes: list[int], k: int) -> list[int]:
    """Up to k items taken round-robin from groups of these sizes: k in all unless the groups hold fewer."""
    quotas, left = [0] * len(sizes), k
    while left and any(q < n for q, n in zip(quotas, sizes)):
        for i, n in enumerate(sizes):
            if left and quotas[i] < n:
                quotas[i], left = quotas[i] + 1, left - 1
    return quotas


def dry_run(config: RunConfig) -> str:
    ready = prepare(config)  # every check a run makes before it starts; leaves nothing written
    plan, info = ready.plan, ready.info
    # Where the run would go, decided as the run decides it (before the plan is consumed by the sample).
    small = without_ray(config, ready, ready.planning, plan)
    pool = None
    if small is None and ray_address(config):  # the cluster's pool, sized as the run sizes it
        pool = start_ray(config, ready, ready.planning, plan, lambda text: None)
        shut_down_ray(pool)
    num_shards, num_items, picked = _sample(plan.shards, SAMPLE)
    detector = Detector(ready.backend, ready.model_content, num_threads=config.cpus_per_actor or 1,
                        score_threshold=config.score_threshold, resize=config.resize,
                        normalization=config.pixel_normalization, max_pixels=config.max_pixels,
                        model_url=config.model, output_format=config.output_format, anchors=config.anchors,
                        nms=config.nms)
    reader = Reader(config.storage_options)
    # The sample: SAMPLE images spread over the sampled shards (files, Parquet rows, tar members).
    t0 = time.perf_counter()
    failures = sampled = 0
    sizes = [len(s.uris) if plan.form != "tar" else SAMPLE for s in picked]  # a tar's members are not counted yet
    for shard, quota in zip(picked, _quotas(sizes, SAMPLE)):
        items = shard_items(shard, reader, config.extensions, config.image_column, {})
        for uri, get_bytes in itertools.islice(items, quota):
            try:
                data = get_bytes()
            except Exception:
                data = None
            failures += int(data is None or not hasattr(detector.process(uri, data), "detections"))
            sampled += 1
    per_image = (time.perf_counter() - t0) / max(sampled, 1)

    where, cpus = described(config, plan.form, small), float(os.cpu_count() or 1)
    actors = small.workers if small else 0
    if small is None:
        if pool is not None:
            actors, cpus = pool.num_actors, pool.cluster_cpus
        else:  # an embedded Ray is not started for this: its one node is this machine, sized by the same rule
            actors = config.num_actors or worker_count(config.cpus_per_actor or 1, max(1, num_shards),
                                                       memory_per_worker(config, ready), config.node_memory_share)
        where = f"{actors} actors on {where}"
    images = num_items if plan.form != "tar" else None
    estimate = (images or 0) * per_image / actors
    d = info.describe()
    i = d["input"]
    lines = [
        f"dry run: nothing was written to {config.output} (a file created there and deleted again showed that "
        "the run can write it)",
        f"input ({plan.form}): {f'{images} images' if images is not None else f'{num_shards} tar shards'} "
        f"found at {config.input} ({plan.stats.skipped} other files skipped)",
        f"plan: {num_shards} shards" + (f" of up to {config.shard_size} images" if images is not None else ""),
        f"model: {config.model} ({d['family']}, backend {ready.backend.name} {ready.backend.version})",
        f"  input {i['name']} {i['shape']} {i['dtype']} scale={i['scale']:g} zero_point={i['zero_point']} "
        f"normalization={i['normalization']}",
        *[f"  output {o['name']} {o['shape']} {o['dtype']} -> {o['role']}" for o in d["outputs"]],
        f"sample: {sampled} images, {per_image * 1000:.1f} ms each on one CPU "
        f"({failures} would fail)",
        (f"estimate: {where}, {cpus:g} CPUs: about {estimate:.0f}s of processing plus start-up")
        if images is not None else
        f"estimate: {where}, {cpus:g} CPUs: {per_image * 1000 / actors:.1f} ms per image (tar members are counted "
        "while streaming)",
    ]
    return "\n".join(lines)
