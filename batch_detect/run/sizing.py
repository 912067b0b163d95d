"""How many detector workers a machine holds and what each reserves: arithmetic shared by the Ray pool
(per node) and the worker processes of a run without Ray (this machine). No Ray import: a run without
Ray must not pay for one."""

from __future__ import annotations

import os

from .readahead import BYTES_BUDGET as READ_BYTES_BUDGET, MIB

# Runs without a cluster go without Ray below this many images per CPU of the machine. Ray's start and
# per-run processes cost ~8 s of a 2,400-image run on 2 cores (62.7 s with Ray, 55.1 s without, the same
# processing rate: benchmarks/results/rates_2core.md) and buy nothing per image on one machine; at ~25 SSD
# images/s per core, 2,500 per CPU is ~100 s of work, where that start is still a tenth of the run.
RAY_MIN_IMAGES_PER_CPU = 2_500
RAY_MIN_IMAGES_CAP = 50_000  # the driver counts this many URIs before it starts: keep that short
MAX_AUTO_THREADS = 8  # interpreter threads a worker gets from CPUs the pool leaves unused, at most


def auto_ray_min_images(cpus: int | None = None) -> int:
    return min(RAY_MIN_IMAGES_CAP, RAY_MIN_IMAGES_PER_CPU * max(1, cpus or os.cpu_count() or 1))


def estimate_actor_memory(model_bytes: int, input_bytes: int, prefetch: int) -> int:
    """A detector worker's resident memory, in bytes, to reserve: a Python worker with numpy,
    pyarrow and Pillow (~300 MiB), the interpreter (model plus arena, a few times the model), the
    images in flight (prefetch + 1 decoded images of up to ~12 MP RGB, plus their input tensors) and the
    files read ahead of them (readahead's bytes budget)."""
    return 300 * MIB + 4 * model_bytes + (prefetch + 1) * (36 * MIB + 2 * input_bytes) + READ_BYTES_BUDGET


def auto_threads(cpus: float, workers: int, fits=None) -> int:
    """Interpreter threads per worker when --cpus-per-actor is not given, on Ray and without it alike. One,
    the most efficient use of a CPU, while the workers fill the CPUs; when they cannot (memory holds fewer
    workers than there are CPUs, or there are fewer shards than CPUs), the CPUs no worker would use go to
    the interpreters: at most MAX_AUTO_THREADS, and the most for which `fits(threads)` (all workers still
    placed) holds."""
    t = min(MAX_AUTO_THREADS, int(cpus // max(1, workers)))
    while t > 1 and fits is not None and not fits(t):
        t -= 1
    return max(1, t)


def workers_fitting(cpus: float, memory: float, cpus_per_worker: int, memory_per_worker: int, share: float) -> int:
    """Workers one machine holds: bounded by its CPUs and by a share of its memory."""
    return min(int(cpus // max(1, cpus_per_worker)), int(memory * share // max(1, memory_per_worker)))


def machine_memory() -> int | None:
    """This machine's available memory in bytes (Linux /proc/meminfo; what Ray counts as a node's `memory`
    too, less its object store), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
