"""Shared test fixtures. Ray's local-only switch is read when ray is imported, so it is set here, before any
test module imports ray: every Ray port then binds 127.0.0.1."""
from __future__ import annotations

import os
import shutil
import tempfile
from types import SimpleNamespace

import numpy as np
import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def pytest_collection_modifyitems(config, items):
    """Every test that starts Ray is marked slow, so `pytest -m "not slow"` never starts it; a missing mark fails."""
    unmarked = [item.nodeid for item in items
                if "ray_instance" in getattr(item, "fixturenames", ()) and item.get_closest_marker("slow") is None]
    if unmarked:
        raise pytest.UsageError("tests that start Ray must be marked @pytest.mark.slow:\n  " + "\n  ".join(unmarked))


@pytest.fixture(scope="session", autouse=True)
def rapnet_cache(tmp_path_factory):
    """$RAPNET_CACHE in a folder of this session's: decoded datasets, ONNX exports and trace caches the tests (and
    the commands they start) write stay out of the user's ~/.cache/rapnet, and each is made once per session."""
    path = tmp_path_factory.mktemp("rapnet-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("RAPNET_CACHE", str(path))
    yield path
    patch.undo()


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


def _jpeg_heldout_views(n: int = 200, k: int = 4):
    """Held-out views where every exit is as accurate from JPEG as losslessly (exit 0 always wrong, the others always
    right), but JPEG makes exit 0 confident at 0.5 where it was at 0.0: a stop confidence of 0.5 or below answers
    wrong at exit 0 from JPEG, right at exit 1 losslessly."""
    correct = np.ones((n, k), dtype=bool)
    correct[:, 0] = False
    confidence = np.ones((n, k), dtype=np.float32)
    confidence[:, 0] = 0.0
    jpeg_confidence = confidence.copy()
    jpeg_confidence[:, 0] = 0.5
    scores = np.tile(np.linspace(0.1, 0.9, k, dtype=np.float32), (n, 1))  # price 0 caps every frame at the last exit
    return SimpleNamespace(heldout_correct=correct, heldout_confidence=confidence, heldout_scores=scores,
                           heldout_jpeg_correct=correct.copy(), heldout_jpeg_confidence=jpeg_confidence,
                           heldout_jpeg_scores=scores)


@pytest.fixture
def jpeg_heldout_views():
    """_jpeg_heldout_views(n, k): held-out views (a ModelTraces stand-in) where JPEG makes a wrong exit confident."""
    return _jpeg_heldout_views
