"""Pool sizing when --cpus-per-actor is not given: one CPU per actor while actors fill the cluster; the
CPUs a smaller pool leaves unused (memory holds fewer actors, or fewer shards than CPUs) go to the actors'
interpreter threads."""

from __future__ import annotations

import os

import pytest

from batch_detect.config import RunConfig
from batch_detect.run.distributed import MIB, threads_per_actor
from batch_detect.run.pipeline import run
from batch_detect.run.sizing import MAX_AUTO_THREADS, auto_threads
from batch_detect.run.worker import decode_threads
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


def test_auto_threads_rule_is_one_for_ray_and_worker_processes():
    assert auto_threads(2, 2) == 1 and auto_threads(16, 20) == 1  # workers fill the CPUs
    assert auto_threads(16, 4) == 4 and auto_threads(17, 4) == 4  # the spare CPUs shared out, whole
    assert auto_threads(64, 1) == MAX_AUTO_THREADS
    assert auto_threads(16, 2, fits=lambda t: t <= 3) == 3  # the most that still places every worker
    assert auto_threads(16, 2, fits=lambda t: False) == 1


def test_decode_threads_follow_the_interpreter_within_the_decode_window():
    assert decode_threads(1, 4) == 2  # one decoding while another waits, beside a one-thread interpreter
    assert decode_threads(4, 4) == 4
    assert decode_threads(8, 4) == 4  # more than the images that may wait decoded would idle
    assert decode_threads(8, 16) == 8  # a window of two dynamic batches of 8
    assert decode_threads(1, 1) == 1


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


def test_runs_without_a_cluster_go_without_ray_up_to_a_threshold_that_grows_with_the_machine():
    from batch_detect.run.sizing import RAY_MIN_IMAGES_CAP, RAY_MIN_IMAGES_PER_CPU, auto_ray_min_images

    assert auto_ray_min_images(2) == 2 * RAY_MIN_IMAGES_PER_CPU == 5_000
    assert auto_ray_min_images(16) == 16 * RAY_MIN_IMAGES_PER_CPU
    assert auto_ray_min_images(64) == RAY_MIN_IMAGES_CAP  # the driver counts at most this many URIs first
    assert auto_ray_min_images() == min(RAY_MIN_IMAGES_CAP, RAY_MIN_IMAGES_PER_CPU * (os.cpu_count() or 1))
    assert RunConfig(model="m", input="i", output="o").ray_min_images is None  # auto unless given


@pytest.mark.parametrize("cpus, memory_gib, per_worker_gib, share, expected", [
    (16, 64, 0.5, 0.8, 16),  # CPUs bound it
    (16, 4, 0.5, 0.8, 6),  # memory bounds it: 3.2 GiB / 0.5
    (2, 0.5, 1, 0.8, 0),  # none fits (the local path still starts one; Ray's pool refuses)
])
def test_workers_fitting_one_machine(cpus, memory_gib, per_worker_gib, share, expected):
    from batch_detect.run.sizing import workers_fitting

    assert workers_fitting(cpus, memory_gib * GIB, 1, int(per_worker_gib * GIB), share) == expected


def test_worker_processes_without_ray_respect_this_machines_memory():
    """The processes of a run without Ray follow the rule Ray's pool follows per node: a reservation of
    half this machine's memory lets one in, whatever its CPUs; a small one lets one per CPU."""
    from batch_detect.run.local import worker_count
    from batch_detect.run.sizing import machine_memory

    memory = machine_memory()
    if memory is None:
        pytest.skip("this machine's memory cannot be read (/proc/meminfo): the memory bound is not applied")
    cpus = os.cpu_count() or 1
    assert worker_count(1, 1000, memory // 2, 0.8) == 1
    assert worker_count(1, 1000, 64 * MIB, 0.8) == min(cpus, int(memory * 0.8 // (64 * MIB)))
    assert worker_count(1, 1, 64 * MIB, 0.8) == 1  # never more than shards
