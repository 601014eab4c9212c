"""Shared test fixtures. Ray's local-only switch is read when ray is imported, so it is set here, before any
test module imports ray: every Ray port then binds 127.0.0.1."""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


@pytest.fixture(scope="module")
def ray_instance():
    """One small Ray instance per test module (starting Ray costs seconds), torn down with Serve."""
    ray = pytest.importorskip("ray")
    from ray import serve

    from cloud.config import RaySettings
    from cloud.server import ensure_ray

    temp = tempfile.mkdtemp(prefix="rapnet-ray-", dir="/tmp")
    ensure_ray(RaySettings(num_cpus=2, temp_dir=temp))  # the path start_local takes: 127.0.0.1, 200 MB store
    yield temp
    try:
        serve.shutdown()
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
