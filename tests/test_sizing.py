"""Pool sizing when --cpus-per-actor is not given: one CPU per actor while actors fill the cluster; the
CPUs a smaller pool leaves unused (memory holds fewer actors, or fewer shards than CPUs) go to the actors'
interpreter threads."""

from __future__ import annotations

import os

import pytest

from batch_detect.config import RunConfig
from batch_detect.distributed import MAX_AUTO_THREADS, MIB, threads_per_actor
from batch_detect.pipeline import run
from batch_detect.synthetic import write_dataset

GIB = 1024 * MIB


_ids = iter(range(10**6))


def node(cpus: int, memory_gib: float, alive: bool = True) -> dict:
    return {"NodeID": f"node-{next(_ids)}", "Alive": alive,
            "Resources": {"CPU": float(cpus), "memory": memory_gib * GIB}}


@pytest.mark.parametrize("nodes, actors, per_actor_gib, expected", [
    ([node(16, 64)], 16, 0.5, 1),  # actors fill the node: one CPU each
    ([node(16, 2.5)], 4, 0.5, 4),  # memory holds 4 (0.8 x 2.5 GiB): 16 CPUs shared out
    ([node(16, 3.8)], 6, 0.5, 2),  # memory holds 6: 2 threads each (12 of 16 CPUs; 3 would need 18)
    ([node(16, 64)], 3, 0.5, 5),  # 3 shards only: 5 threads each
    ([node(64, 256)], 1, 0.5, MAX_AUTO_THREADS),  # one actor never gets more than the cap
    ([node(16, 64), node(16, 2.5)], 20, 0.5, 1),  # the pool fills both nodes: one each
    ([node(4, 64), node(4, 64)], 3, 0.5, 2),  # 8 CPUs, 3 actors: 2 each still fits (2 + 2 places)
    ([node(16, 64), node(16, 64, alive=False)], 2, 0.5, 8),  # a dead node's CPUs are not shared out
    ([node(8, 64), node(2, 64)], 2, 0.5, 4),  # 5 each would not fit (the 2-CPU node takes none): 4, both on one
])
def test_threads_per_actor(nodes, actors, per_actor_gib, expected):
    assert threads_per_actor(actors, int(per_actor_gib * GIB), 0.8, nodes) == expected


def test_memory_bound_pool_gets_the_spare_cpus(local_ray, models_dir, tmp_path):
    """On the 2-CPU local cluster, an actor reservation of 60% of its memory lets one actor in: with
    --cpus-per-actor unset it gets 2 interpreter threads (both CPUs), with --cpus-per-actor 1 it gets one."""
    images = str(tmp_path / "images")
    truth = write_dataset(images, 40, seed=8, sizes=[(320, 240)])
    memory = local_ray.cluster_resources()["memory"]
    per_actor_mb = int(memory * 0.8 * 0.6 / MIB)
    facts = {}
    for arm, cpus in (("auto", None), ("one", 1)):
        cfg = RunConfig(model=os.path.join(models_dir, "shapes_ssd_uint8.tflite"), input=images,
                        output=str(tmp_path / arm), shard_size=8, memory_per_actor_mb=per_actor_mb,
                        cpus_per_actor=cpus)
        manifest = run(cfg).manifest
        assert manifest["counts"]["images"] == len(truth)
        facts[arm] = (manifest["cluster"]["actors"], manifest["cluster"]["cpus_per_actor"],
                      manifest["sizing"]["interpreter_threads"], manifest["sizing"]["decode_threads"])
    assert facts["auto"] == (1, 2, 2, 2)
    assert facts["one"] == (1, 1, 1, 2)
