"""A two-node Ray cluster on this machine loses a node under load (benchmarks/node_failure.py runs the scenario):
a head and a second node on 127.0.0.1 (ray.cluster_utils.Cluster), one replica on each, clients sending frames through
the edge's link, every process of the second node killed."""
from __future__ import annotations

import pytest

from benchmarks.node_failure import run_scenario
from rapnet.shipped import default_checkpoint

pytestmark = pytest.mark.slow


def test_losing_a_node_loses_no_frame_and_service_comes_back():
    # No replacement node here (Serve bringing the replica back takes about a minute on a busy 2-core host):
    # benchmarks/node_failure.py measures that.
    result = run_scenario(str(default_checkpoint()), clients=2, warm_s=2.0, settle_s=2.0, replace=False)
    frames = result["frames"]
    print(result)
    assert frames["lost"] == 0, frames  # every frame answered: by the cloud or by the edge's explicit fallback
    assert frames["wrong"] == 0, frames  # no OK with another class than the model's: no answer that is not one
    assert frames["cloud"] > 0 and result["cloud_answers_after_kill"] > 0, result  # served on through the loss
    # Failed calls end in a status the edge falls back on, never a hang past the deadline or a client error.
    assert set(frames["codes"]) <= {"UNAVAILABLE", "DEADLINE_EXCEEDED", "CIRCUIT_OPEN", "RESOURCE_EXHAUSTED"}, frames
