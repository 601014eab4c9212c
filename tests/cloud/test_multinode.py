"""A two-node Ray cluster on this machine loses a node under load (benchmarks/node_failure.py runs the scenario):
a head and a second node on 127.0.0.1 (ray.cluster_utils.Cluster), one replica on each, clients sending frames through
the edge's link, every process of the second node killed."""
from __future__ import annotations

import pytest

from benchmarks.node_failure import LocalCluster, run_scenario
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


def test_the_front_stops_with_its_cluster_and_nothing_is_left():
    """`ray down` is `ray stop` on the head: a front left behind would report SERVING while every call fails."""
    import time

    import ray

    from cloud.config import CloudConfig
    from cloud.server import CloudServer

    cluster = LocalCluster()
    server = None
    try:
        cluster.start_node("head", head=True)
        config = CloudConfig().with_overrides(front={"host": "127.0.0.1", "port": 0}, ray={"address": cluster.address},
                                              autoscaling={"min_replicas": 1, "max_replicas": 1})
        server = CloudServer(str(default_checkpoint()), config).start(timeout_s=180)
        assert server.running and cluster.leftovers()
        cluster.close()  # the head's processes end, as `ray stop` ends them
        deadline = time.monotonic() + 30
        while server.running and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not server.running and server.cluster_lost
    finally:
        if server is not None:
            server.stop()
        if ray.is_initialized():
            ray.shutdown()
        cluster.close()
    assert cluster.leftovers() == []
