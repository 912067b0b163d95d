from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, "models")
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def models_dir() -> str:
    return MODELS


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for the in-process end-to-end tests (2 CPUs, like the CI machine)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield ray
    ray.shutdown()
