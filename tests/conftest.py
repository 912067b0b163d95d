from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Tests talk to 127.0.0.1 only: never let botocore look for instance credentials on the network.
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, "models")
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def models_dir() -> str:
    return MODELS


@pytest.fixture(scope="session")
def realworld() -> str:
    """../shared/realworld: real pretrained detectors and photos (CI has it); tests that need it skip, saying why."""
    real = os.path.join(SHARED, "realworld")
    if not os.path.isdir(real):
        msg = f"{real} is absent (CI provides ../shared/realworld); real-model checks not run"
        print(f"SKIP: {msg}")
        pytest.skip(msg)
    return real


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for the in-process end-to-end tests (2 CPUs, like the CI machine)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a free loopback port (as s3fs's own tests do), stopped at the end."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def empty_bucket(s3_server, tmp_path):
    """A new bucket on the loopback server, named after the test: (name, storage options, s3fs)."""
    import s3fs

    options = {"key": "testing-key-id", "secret": "testing-secret", "endpoint_url": s3_server}
    fs = s3fs.S3FileSystem(**options)
    name = f"bd-{os.getpid()}-{tmp_path.name[-12:].lower().replace('_', '-')}"
    fs.mkdir(name)
    return name, options, fs


@pytest.fixture(autouse=True)
def _store_outage_forgotten():
    """The process's store-outage tracker (batch_detect.outage) starts each test answering, with the default
    budget: an outage one test provoked must not shorten the next test's waits."""
    from batch_detect.outage import OUTAGE

    OUTAGE.reset()
    yield
    OUTAGE.reset()
