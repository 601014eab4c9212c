"""Cloud tier over real Ray Serve and real gRPC on 127.0.0.1 (one Ray instance for the whole module)."""
from __future__ import annotations

import asyncio
import gc
import io
import json
import logging
import os
import platform
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

ray = pytest.importorskip("ray")

from cloud.app import build_app  # noqa: E402
from cloud.batching import Sample, run_batch  # noqa: E402
from cloud.config import CloudConfig  # noqa: E402
from cloud.logs import JsonFormatter, redact  # noqa: E402
from cloud.security import TLSFiles, make_dev_cert  # noqa: E402
from cloud.server import CloudServer  # noqa: E402
from protos.rapnet.v1 import inference_pb2 as pb  # noqa: E402
from protos.rapnet.v1.inference_pb2_grpc import InferenceStub  # noqa: E402
from rapnet.codec import EncodeOptions, build_request  # noqa: E402
from rapnet.transport import BearerToken, auth_metadata, health_status, open_channel  # noqa: E402

TOKEN = "test-token-" + "x" * 24
Code = grpc.StatusCode
FP32 = EncodeOptions(encoding="fp32", zstd_level=None)


# ------------------------------------------------------------------------------------------------------
# Fixtures: one certificate set, one Ray instance, one deployed app with a TLS front (the model: conftest.py)
# ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_dev_cert(tmp_path_factory.mktemp("certs"))


def _config(**front) -> CloudConfig:
    return CloudConfig().with_overrides(
        autoscaling={"min_replicas": 2, "max_replicas": 2},
        batch={"max_batch_size": 8, "batch_wait_ms": 5},
        replica={"num_cpus": 0.5, "health_check_period_s": 1.0},
        front={"port": 0, "request_timeout_s": 30.0, **front},
        metrics={"port": 0},
    )


@pytest.fixture(scope="module")
def server(ray_instance, model_file, certs):
    _, _, path = model_file
    srv = CloudServer(path, _config(), token=TOKEN, tls=TLSFiles(str(certs.cert), str(certs.key))).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def channel(server, certs):
    ch = open_channel(server.address, ca=str(certs.ca))
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def stub(channel):
    return InferenceStub(channel)


def _request(model, contract, split: int, exit_index: int | None = None, seed: int = 0, **kwargs):
    exit_index = model.num_exits - 1 if exit_index is None else exit_index
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        carry = model.edge_part(image, split)
        reference = torch.softmax(model.run_to_exit(image, exit_index)[0], 0)
    return build_request(contract, carry, split, exit_index, FP32, **kwargs), reference


def _good(stub, model, contract) -> pb.InferResponse:
    req, ref = _request(model, contract, split=model.num_stages - 1, seed=123)
    resp = stub.Infer(req, metadata=auth_metadata(TOKEN), timeout=30)
    assert resp.class_index == int(ref.argmax())
    return resp


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


# ------------------------------------------------------------------------------------------------------
# Batching (no Ray)
# ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_run_batch_regroups_mixed_splits_and_exits(model_file):
    model, _, _ = model_file
    samples, expected = [], []
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i, split in enumerate([0, 3, 1, 3, model.num_stages - 1, 0, 2]):
            image = torch.randn(1, 3, 32, 32, generator=gen)
            exits = [k for k, s in enumerate(model.exit_stages) if s >= split]
            exit_index = exits[i % len(exits)]
            samples.append(Sample(split, exit_index, {k: v.numpy() for k, v in model.edge_part(image, split).items()}))
            expected.append(model.run_to_exit(image, exit_index)[0])
    results = run_batch(model, samples)
    assert [r.error for r in results] == [None] * len(samples)
    for result, ref in zip(results, expected):
        torch.testing.assert_close(torch.from_numpy(result.logits), ref, rtol=1e-4, atol=1e-5)
    assert sum(r.first_in_batch for r in results) == 1
    assert sum(r.first_in_group for r in results) == len({s.split for s in samples})
    assert all(r.batch_size == len(samples) for r in results)


def _priced(model, image, price, cap=None):
    from rapnet.costs import measure_costs
    from rapnet.exit_rules import priced_exits, relative_exit_costs

    cap = model.num_exits if cap is None else cap + 1
    with torch.no_grad():
        scores = model.exit_scores(image).numpy()
    return int(priced_exits(scores[:, :cap], price, relative_exit_costs(measure_costs(model))[:cap])[0])


def test_run_batch_picks_exits_for_samples_that_ask(model_file):
    model, _, _ = model_file
    gen = torch.Generator().manual_seed(5)
    images = [torch.randn(1, 3, 32, 32, generator=gen) for _ in range(4)]
    last = model.num_exits - 1
    samples = [Sample(0, last, {"image": images[0].numpy()}, exit_price=0.0),
               Sample(0, 2, {"image": images[1].numpy()}, exit_price=0.5),  # the cloud may pick up to exit 2
               Sample(0, 3, {"image": images[2].numpy()}),  # the edge chose exit 3
               Sample(0, last, {"image": images[3].numpy()}, exit_price=20.0)]
    results = run_batch(model, samples)
    expected = [_priced(model, images[0], 0.0), _priced(model, images[1], 0.5, cap=2), 3, _priced(model, images[3], 20.0)]
    assert [r.exit for r in results] == expected and expected[1] <= 2
    with torch.no_grad():
        for r, im, k in zip(results, images, expected):
            torch.testing.assert_close(torch.from_numpy(r.logits), model.run_to_exit(im, k)[0], rtol=1e-4, atol=1e-5)


def _capped_exit(model, image, cap, stop, split=0):
    """Where the per-image capped run (run_until_confident up to `cap`) answers, counting from `split`'s first exit."""
    with torch.no_grad():
        probs = [float(torch.softmax(z, 1).max()) for z in model(image)]
    first = next(k for k, s in enumerate(model.exit_stages) if s >= split)
    return next((k for k in range(first, cap + 1) if probs[k] >= stop), cap)


def test_run_batch_stops_samples_that_carry_a_stop_confidence(model_file):
    model, _, _ = model_file
    gen = torch.Generator().manual_seed(9)
    images = [torch.randn(1, 3, 32, 32, generator=gen) for _ in range(6)]
    with torch.no_grad():
        stop = float(np.median([float(torch.softmax(z, 1).max()) for im in images for z in model(im)]))
    last = model.num_exits - 1
    samples = [Sample(0, last, {"image": im.numpy()}, stop_confidence=stop if i % 3 else 0.0)
               for i, im in enumerate(images)]
    results = run_batch(model, samples)
    expected = [_capped_exit(model, im, last, stop) if i % 3 else last for i, im in enumerate(images)]
    assert [r.exit for r in results] == expected and min(expected) < last
    with torch.no_grad():
        for r, im, k in zip(results, images, expected):
            torch.testing.assert_close(torch.from_numpy(r.logits), model.run_to_exit(im, k)[0], rtol=1e-4, atol=1e-5)


def test_coalescer_holds_partial_chunks_only_while_the_replica_is_busy():
    """The front's chunking policy, against a handle whose calls finish when the test says (the real Ray path is
    covered by every served test below)."""
    from types import SimpleNamespace

    from cloud.config import FrontSettings
    from cloud.front import Coalescer
    from cloud.metrics import FrontMetrics

    def answers(n, compute_ms=100.0):
        return [SimpleNamespace(first_in_batch=i == 0, compute_ms=compute_ms) for i in range(n)]

    async def scenario():
        calls = []

        class ManualHandle:
            def remote(self, samples):
                call = asyncio.get_running_loop().create_future()
                calls.append((list(samples), call))
                return call

        coalescer = Coalescer(ManualHandle(), FrontSettings(pipeline_per_replica=2, chunk_hold_ms=1000),
                              FrontMetrics(), max_chunk=4)
        submit = lambda n: [coalescer.submit(SimpleNamespace(name=i)) for i in range(n)]  # noqa: E731
        sizes = lambda: [len(samples) for samples, _ in calls]  # noqa: E731
        first = submit(1)
        await asyncio.sleep(0)
        assert sizes() == [1]  # an idle replica gets the sample at once
        calls[0][1].set_result(answers(1))  # the replica reports 100 ms of compute per batch
        await first[0]
        submit(1)
        await asyncio.sleep(0)
        assert sizes() == [1, 1]  # idle again: at once
        submit(2)
        await asyncio.sleep(0.02)
        assert sizes() == [1, 1]  # the replica is busy: two samples wait for company
        submit(2)
        await asyncio.sleep(0)
        assert sizes() == [1, 1, 4]  # a full chunk leaves without waiting
        held = submit(1)  # both call slots are taken
        calls[1][1].set_result(answers(1))
        await asyncio.sleep(0.02)
        assert sizes() == [1, 1, 4]  # a slot is free, but the replica is still busy: hold ...
        await asyncio.sleep(0.15)
        assert sizes() == [1, 1, 4, 1]  # ... for about one batch's compute time, not the 1000 ms cap
        calls[3][1].set_result(answers(1))
        calls[2][1].set_result(answers(4))
        await held[0]

    asyncio.run(scenario())


def test_replica_refuses_a_checkpoint_with_another_identity(model_file):
    from cloud.app import CloudStages, IdentityMismatch

    _, identity, path = model_file
    threads = torch.get_num_threads()
    try:
        with pytest.raises(IdentityMismatch, match="same checkpoint"):
            # sched_batch off: this process goes on running the other tests under its own scheduling policy
            CloudStages.func_or_class(path, "0" * 64, 8, 0.005, sched_batch=False)
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------------
# Serving (from here to the configuration tests every test starts Ray and is marked slow)
# ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_health_is_serving(channel):
    assert health_status(channel) == "SERVING"
    assert health_status(channel, "rapnet.v1.Inference") == "SERVING"


@pytest.mark.slow
def test_each_split_point_matches_the_monolithic_model(stub, model_file, contract):
    model, _, _ = model_file
    for split in range(model.num_stages):
        for exit_index in sorted({k for k, s in enumerate(model.exit_stages) if s >= split} & {split, model.num_exits - 1}):
            req, ref = _request(model, contract, split, exit_index, seed=split)
            resp = stub.Infer(req, metadata=auth_metadata(TOKEN), timeout=30)
            assert resp.request_id == req.request_id
            assert (resp.split_point, resp.exit_used) == (split, exit_index)
            assert resp.model_identity == contract.identity
            assert resp.class_index == int(ref.argmax()), f"split {split} exit {exit_index}"
            assert resp.top_k[0].score == pytest.approx(float(ref.max()), abs=1e-4)


@pytest.mark.slow
def test_cloud_picks_the_exit_with_the_edges_rule(stub, model_file, contract):
    model, _, _ = model_file
    for seed, price, cap in [(1, 0.0, None), (2, 0.05, None), (3, 0.0, 2), (4, 10.0, None)]:
        image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
        expected = _priced(model, image, price, cap)
        cap = model.num_exits - 1 if cap is None else cap
        with torch.no_grad():
            req = build_request(contract, model.edge_part(image, 0), 0, cap, FP32, cloud_exit_price=price)
            reference = model.run_to_exit(image, expected)[0]
        resp = stub.Infer(req, metadata=auth_metadata(TOKEN), timeout=30)
        assert resp.exit_used == expected <= cap
        assert resp.class_index == int(reference.argmax())


@pytest.mark.slow
def test_served_request_with_a_stop_confidence_answers_at_the_first_confident_exit(stub, model_file, contract):
    model, _, _ = model_file
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(21))
    with torch.no_grad():
        probs = sorted(float(torch.softmax(z, 1).max()) for z in model(image))
    split, cap = 2, model.num_exits - 1
    for stop in (probs[len(probs) // 2], 1.0):
        expected = _capped_exit(model, image, cap, stop, split)
        with torch.no_grad():
            req = build_request(contract, model.edge_part(image, split), split, cap, FP32, stop_confidence=stop)
            reference = model.run_to_exit(image, expected)[0]
        resp = stub.Infer(req, metadata=auth_metadata(TOKEN), timeout=30)
        assert resp.exit_used == expected and resp.class_index == int(reference.argmax())


@pytest.mark.slow
def test_concurrent_mixed_requests_are_batched_and_correct(stub, model_file, contract, server):
    model, _, _ = model_file
    cases = [_request(model, contract, split=i % model.num_stages, seed=100 + i) for i in range(24)]
    futures = [stub.Infer.future(req, metadata=auth_metadata(TOKEN), timeout=30) for req, _ in cases]
    for (req, ref), fut in zip(cases, futures):
        resp = fut.result()
        assert resp.request_id == req.request_id and resp.class_index == int(ref.argmax())
    reg = server.metrics.registry
    batches, samples = reg.get_sample_value("rapnet_cloud_batch_size_count"), reg.get_sample_value("rapnet_cloud_batch_size_sum")
    assert samples > batches  # some batch held more than one sample


@pytest.mark.slow
def test_infer_stream_answers_every_message(stub, model_file, contract):
    model, _, _ = model_file
    cases = [_request(model, contract, split=(2 * i) % model.num_stages, seed=200 + i) for i in range(10)]
    answers = {r.request_id: r for r in stub.InferStream(iter([req for req, _ in cases]),
                                                           metadata=auth_metadata(TOKEN), timeout=30)}
    assert set(answers) == {req.request_id for req, _ in cases}
    for req, ref in cases:
        assert answers[req.request_id].class_index == int(ref.argmax())


# ------------------------------------------------------------------------------------------------------
# Refusals: each gets its status and the server keeps serving
# ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_missing_or_wrong_token_is_unauthenticated(stub, model_file, contract):
    model, _, _ = model_file
    req, _ = _request(model, contract, split=4)
    assert _code(lambda: stub.Infer(req, timeout=10)) == Code.UNAUTHENTICATED
    assert _code(lambda: stub.Infer(req, metadata=auth_metadata("wrong-" + TOKEN), timeout=10)) == Code.UNAUTHENTICATED
    assert _code(lambda: stub.Infer(req, metadata=(("authorization", TOKEN),), timeout=10)) == Code.UNAUTHENTICATED
    assert _code(lambda: list(stub.InferStream(iter([req]), timeout=10))) == Code.UNAUTHENTICATED
    _good(stub, model, contract)


@pytest.mark.slow
def test_wrong_model_identity_is_failed_precondition(stub, model_file, contract):
    model, _, _ = model_file
    req, _ = _request(model, contract, split=3)
    req.model_identity = "f" * 64
    with pytest.raises(grpc.RpcError) as info:
        stub.Infer(req, metadata=auth_metadata(TOKEN), timeout=10)
    assert info.value.code() == Code.FAILED_PRECONDITION
    assert "same checkpoint" in info.value.details()
    _good(stub, model, contract)


@pytest.mark.slow
def test_garbage_bytes_are_invalid_argument(channel, stub, model_file, contract):
    model, _, _ = model_file
    raw = channel.unary_unary("/rapnet.v1.Inference/Infer", request_serializer=None, response_deserializer=None)
    for garbage in (b"\xff" * 64, os.urandom(3000), b"\x0a\x05hello\x32\x03abc\x18\x99"):
        with pytest.raises(grpc.RpcError) as info:
            raw(garbage, metadata=auth_metadata(TOKEN), timeout=10)
        assert info.value.code() in (Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION)
    with pytest.raises(grpc.RpcError) as info:
        raw(b"\xff" * 64, metadata=auth_metadata(TOKEN), timeout=10)
    assert info.value.code() == Code.INVALID_ARGUMENT
    # A well-formed message whose payload does not match its declared shape.
    req, _ = _request(model, contract, split=4)
    req.tensors[0].data = req.tensors[0].data[:-4]
    assert _code(lambda: stub.Infer(req, metadata=auth_metadata(TOKEN), timeout=10)) == Code.INVALID_ARGUMENT
    _good(stub, model, contract)


@pytest.mark.slow
def test_oversized_message_is_resource_exhausted(server, certs, stub, model_file, contract):
    model, _, _ = model_file
    big = open_channel(server.address, ca=str(certs.ca), max_message_bytes=8 << 20)
    try:
        req, _ = _request(model, contract, split=4)
        req.request_id = "x" * (2 << 20)  # 2 MiB > the server's 1 MiB limit
        assert _code(lambda: InferenceStub(big).Infer(req, metadata=auth_metadata(TOKEN), timeout=10)) == Code.RESOURCE_EXHAUSTED
    finally:
        big.close()
    _good(stub, model, contract)


@pytest.mark.slow
def test_expired_deadline_is_deadline_exceeded(stub, model_file, contract):
    model, _, _ = model_file
    # The request's own budget ran out before it arrived (deadline_ms from client_sent_unix_ns).
    req, _ = _request(model, contract, split=3, deadline_ms=5)
    req.client_sent_unix_ns -= 10 * 10**9
    assert _code(lambda: stub.Infer(req, metadata=auth_metadata(TOKEN), timeout=10)) == Code.DEADLINE_EXCEEDED
    # A gRPC deadline far too short for the work.
    req, _ = _request(model, contract, split=0)
    assert _code(lambda: stub.Infer(req, metadata=auth_metadata(TOKEN), timeout=0.001)) == Code.DEADLINE_EXCEEDED
    _good(stub, model, contract)


@pytest.mark.slow
def test_overload_is_refused_quickly(server, ray_instance, model_file, contract):
    model, _, path = model_file
    front = CloudServer(path, _config(max_in_flight=2).with_overrides(metrics={"port": None}), token=TOKEN,
                        deploy=False).start()
    try:
        ch = open_channel(front.address)
        stub = InferenceStub(ch)
        cases = [_request(model, contract, split=0, seed=i)[0] for i in range(32)]

        def call(req):
            t0 = time.perf_counter()
            try:
                stub.Infer(req, metadata=auth_metadata(TOKEN), timeout=30)
                return Code.OK, time.perf_counter() - t0
            except grpc.RpcError as err:
                return err.code(), time.perf_counter() - t0

        with ThreadPoolExecutor(16) as pool:
            outcomes = list(pool.map(call, cases))
        codes = [c for c, _ in outcomes]
        assert set(codes) <= {Code.OK, Code.RESOURCE_EXHAUSTED}
        assert Code.RESOURCE_EXHAUSTED in codes and Code.OK in codes
        refused = [s for c, s in outcomes if c == Code.RESOURCE_EXHAUSTED]
        assert max(refused) < 5.0  # answered at once, not queued behind the work
        assert stub.Infer(cases[0], metadata=auth_metadata(TOKEN), timeout=30).request_id == cases[0].request_id
        ch.close()
    finally:
        front.stop()


# ------------------------------------------------------------------------------------------------------
# Security
# ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_plaintext_to_the_tls_port_fails(server, model_file, contract):
    model, _, _ = model_file
    ch = open_channel(server.address)
    try:
        req, _ = _request(model, contract, split=4)
        assert _code(lambda: InferenceStub(ch).Infer(req, metadata=auth_metadata(TOKEN), timeout=5)) == Code.UNAVAILABLE
    finally:
        ch.close()


@pytest.mark.slow
def test_mutual_tls_requires_a_client_certificate(server, ray_instance, model_file, contract, certs):
    model, _, path = model_file
    tls = TLSFiles(str(certs.cert), str(certs.key), client_ca=str(certs.ca))
    front = CloudServer(path, _config().with_overrides(metrics={"port": None}), token=TOKEN, tls=tls, deploy=False).start()
    try:
        req, ref = _request(model, contract, split=4)
        anonymous = open_channel(front.address, ca=str(certs.ca))
        assert _code(lambda: InferenceStub(anonymous).Infer(req, metadata=auth_metadata(TOKEN), timeout=5)) == Code.UNAVAILABLE
        anonymous.close()
        with open_channel(front.address, ca=str(certs.ca), client_cert=str(certs.client_cert),
                          client_key=str(certs.client_key)) as ch:
            assert InferenceStub(ch).Infer(req, metadata=auth_metadata(TOKEN), timeout=30).class_index == int(ref.argmax())
    finally:
        front.stop()


@pytest.mark.slow
def test_token_never_reaches_the_logs(stub, model_file, contract):
    model, _, _ = model_file
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("rapnet.cloud")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        req, _ = _request(model, contract, split=4)
        wrong = "leaked-secret-" + "y" * 20
        _code(lambda: stub.Infer(req, metadata=auth_metadata(wrong), timeout=10))
        _code(lambda: stub.Infer(req, timeout=10))
        stub.Infer(req, metadata=auth_metadata(TOKEN), timeout=30)
        time.sleep(0.2)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    text = stream.getvalue()
    lines = [json.loads(line) for line in text.splitlines()]
    assert any(e.get("code") == "UNAUTHENTICATED" for e in lines)
    assert TOKEN not in text and wrong not in text
    assert "[redacted]" in redact(f"authorization: Bearer {TOKEN}") and TOKEN not in redact(f"Bearer {TOKEN}")
    assert TOKEN not in repr(BearerToken(TOKEN))


@pytest.mark.slow
def test_metrics_are_exported(server, stub, model_file, contract):
    _good(stub, *model_file[:1], contract)
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    assert 'rapnet_cloud_requests_total{code="OK",method="Infer"}' in body
    assert 'rapnet_cloud_requests_total{code="UNAUTHENTICATED",method="Infer"}' in body
    for name in ("rapnet_cloud_batch_size_count", 'rapnet_cloud_compute_seconds_count{split="4"}',
                 'rapnet_cloud_queue_seconds_count{split="4"}', "rapnet_cloud_in_flight"):
        assert name in body


@pytest.mark.slow
def test_starting_a_front_freezes_the_startup_heap(server, ray_instance, model_file):
    # Full collections then skip what startup allocated (torch, Ray, grpc): no 0.2 s stalls of the front's loop
    _, _, path = model_file
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    front = CloudServer(path, _config().with_overrides(metrics={"port": None}), token=TOKEN, deploy=False).start()
    try:
        assert gc.get_freeze_count() > 100_000
    finally:
        front.stop()


@pytest.mark.slow
@pytest.mark.skipif(platform.system() != "Linux", reason="Linux scheduling policies")
def test_a_stopped_front_gives_its_host_process_back_its_scheduling(server, ray_instance, model_file):
    """A process that goes on after its front stops (an edge agent with a local cloud, tests) gets back the policy
    it had: front.sched_batch must not leak into it."""
    from rapnet.runtime import set_thread_scheduling, thread_scheduling_policies

    _, _, path = model_file
    set_thread_scheduling(os.SCHED_OTHER)  # as a host process that never started a front
    try:
        front = CloudServer(path, _config().with_overrides(metrics={"port": None}), token=TOKEN, deploy=False).start()
        assert thread_scheduling_policies() == {"batch"}
        front.stop()
        assert thread_scheduling_policies() == {"other"}
    finally:
        set_thread_scheduling(os.SCHED_BATCH)  # the module's server runs on, as it started


@pytest.mark.slow
def test_replicas_run_at_the_configured_niceness(server):
    """Ray starts workers at nice 15; the replicas do the heavy work and must not yield to the front."""
    from ray import serve

    handle = serve.get_deployment_handle(server.config.deployment_name, server.config.app_name)
    pids = {handle.whoami.remote().result(timeout_s=30)["pid"] for _ in range(6)}
    assert pids
    for pid in pids:
        assert os.getpriority(os.PRIO_PROCESS, pid) == server.config.ray.worker_niceness == 0


@pytest.mark.slow
def test_the_front_reaches_replicas_over_the_configured_transport(server):
    """front.replica_transport grpc (the default): chunks go over Serve's direct gRPC channel, pickled, not as Ray
    object references (the requests in the other tests went this way too)."""
    options = server.front.coalescer.handle.handle_options
    assert server.config.front.replica_transport == "grpc"
    assert (options._by_reference, options.request_serialization, options.response_serialization) == (
        False, "pickle", "pickle")


def _listening_addresses(pid: int) -> set[str]:
    """IP addresses a process listens on (TCP), from /proc: its socket inodes matched against the LISTEN rows."""
    import ipaddress

    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    addresses = set()
    for table in ("tcp", "tcp6"):
        for row in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            cols = row.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                raw = bytes.fromhex(cols[1].split(":")[0])
                # /proc prints each 32-bit word of the address in host (little-endian) order
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                address = ipaddress.ip_address(words)
                addresses.add(str(getattr(address, "ipv4_mapped", None) or address))
    return addresses


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/net/tcp"), reason="reads /proc")
def test_replicas_listen_on_loopback_only(server):
    """Serve starts a gRPC server in every replica (the front's transport to it) on all interfaces; on a local Ray
    instance the replica binds it to 127.0.0.1 instead (cloud.app._bind_replica_grpc_to_loopback)."""
    from ray import serve

    handle = serve.get_deployment_handle(server.config.deployment_name, server.config.app_name)
    addresses = _listening_addresses(handle.whoami.remote().result(timeout_s=30)["pid"])
    assert addresses and addresses <= {"127.0.0.1", "::1"}


@pytest.mark.slow
def test_replicas_keep_freed_memory(server):
    """replica.keep_freed_memory (on by default) reaches the replica processes: glibc keeps their freed heap."""
    from ray import serve

    assert server.config.replica.keep_freed_memory
    handle = serve.get_deployment_handle(server.config.deployment_name, server.config.app_name)
    assert handle.whoami.remote().result(timeout_s=30)["keeps_freed_memory"] is True


@pytest.mark.slow
@pytest.mark.skipif(platform.system() != "Linux", reason="Linux scheduling policies")
def test_replicas_and_the_front_run_under_batch_scheduling(server):
    """replica.sched_batch and front.sched_batch (on by default): every thread of the replica and of the process
    hosting the front (this one) runs under SCHED_BATCH, the compute thread a replica starts later included."""
    from ray import serve

    from rapnet.runtime import thread_scheduling_policies

    assert server.config.replica.sched_batch and server.config.front.sched_batch
    handle = serve.get_deployment_handle(server.config.deployment_name, server.config.app_name)
    assert handle.whoami.remote().result(timeout_s=30)["scheduling_policies"] == ["batch"]
    assert thread_scheduling_policies() == {"batch"}


# ------------------------------------------------------------------------------------------------------
# A replica dies during a burst (last: it disturbs the deployment)
# ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_killing_a_replica_loses_no_request_silently(server, stub, model_file, contract):
    from ray import serve

    model, _, _ = model_file
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if "SERVE_REPLICA" in a["name"] and "CloudStages" in a["name"]]
    assert len(names) == 2, names
    victim = ray.get_actor(names[0], namespace="serve")
    cases = [_request(model, contract, split=i % model.num_stages, seed=300 + i)[0] for i in range(60)]
    futures = [stub.Infer.future(req, metadata=auth_metadata(TOKEN), timeout=40) for req in cases[:30]]
    time.sleep(0.05)  # the first wave is queued on both replicas
    ray.kill(victim, no_restart=True)
    for req in cases[30:]:
        futures.append(stub.Infer.future(req, metadata=auth_metadata(TOKEN), timeout=40))
        time.sleep(0.02)
    codes = []
    for fut in futures:
        try:
            fut.result(timeout=60)  # never hangs: every call ends with an answer or a status
            codes.append(Code.OK)
        except grpc.RpcError as err:
            codes.append(err.code())
    print("kill burst codes:", {c.name: codes.count(c) for c in set(codes)}, "retries:", server.metrics.registry.get_sample_value("rapnet_cloud_retries_total"))
    assert len(codes) == len(cases)
    assert set(codes) <= {Code.OK, Code.UNAVAILABLE}, codes
    assert codes.count(Code.OK) > 0
    # Ray Serve replaces the replica; the service keeps answering meanwhile and afterwards. It usually takes ~5 s
    # but can take over 90 s on a loaded machine, so the wait is generous and a failure says what Serve reported.
    deadline = time.time() + 240
    while time.time() < deadline and server.running_replicas() < 2:
        time.sleep(1)
    status = serve.status().applications.get(server.config.app_name)
    deployment = status.deployments.get(server.config.deployment_name) if status else None
    assert server.running_replicas() == 2, (deployment.replica_states, deployment.message) if deployment else status
    _good(stub, model, contract)


# ------------------------------------------------------------------------------------------------------
# Configuration, cluster files, CLI (no Ray)
# ------------------------------------------------------------------------------------------------------

CLUSTER_DIR = Path(__file__).resolve().parents[2] / "cloud" / "cluster"


@pytest.mark.parametrize("name", ["aws.yaml", "onprem.yaml"])
def test_cluster_files_match_rays_schema(name):
    import jsonschema

    schema_path = os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")
    with open(schema_path) as f:
        schema = json.load(f)
    with open(os.path.join(CLUSTER_DIR, name)) as f:
        config = yaml.safe_load(f)
    jsonschema.validate(config, schema)
    start = " ".join(config["head_start_ray_commands"])
    assert "ray start --head" in start and "rapnet-cloud serve --address $NODE_IP:6379" in start  # not `auto`
    assert "--tls-cert" in start and "--token-file" in start
    assert "rapnet-cloud health" in start and "--wait" in start and "exit 1" in start  # `ray up` waits for SERVING
    assert any("torch==2.13.0" in c for c in config["setup_commands"])
    # `ray down` runs a bare `ray stop` in a shell that sourced ~/.bashrc: the venv's bin is put on PATH there first.
    assert "venv/bin" in config["setup_commands"][0] and "~/.bashrc" in config["setup_commands"][0]
    mounted = {Path(local).name for local in config["file_mounts"].values()}
    assert {"server.pem", "server.key", "ca.pem", "token.txt"} <= mounted and "ca.key" not in mounted
    assert "~/rapnet" not in config["file_mounts"]  # the checkout there would shadow the rapnet package
    if name == "onprem.yaml":
        assert config["provider"]["type"] == "local" and config["provider"]["worker_ips"]


def test_config_yaml_is_strict(tmp_path):
    cfg = CloudConfig.from_yaml(os.path.join(CLUSTER_DIR, "serve-config.yaml"))
    assert cfg.autoscaling.serve_options()["autoscaling_config"]["max_replicas"] == cfg.autoscaling.max_replicas
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch: {max_batch_sise: 4}\n")
    with pytest.raises(ValueError, match="max_batch_sise"):
        CloudConfig.from_yaml(bad)
    with pytest.raises(ValueError):
        CloudConfig.from_dict({"autoscaling": {"min_replicas": 3, "max_replicas": 2}})
    with pytest.raises(ValueError, match="worker_niceness"):
        CloudConfig.from_dict({"ray": {"worker_niceness": -5}})  # raising priority needs privileges Ray lacks
    with pytest.raises(ValueError, match="inline_args_bytes"):
        CloudConfig.from_dict({"ray": {"inline_args_bytes": 64 << 20}})  # over what Ray inlines in one call
    assert CloudConfig().with_overrides(autoscaling={"min_replicas": 2, "max_replicas": 2}).autoscaling.serve_options() == {"num_replicas": 2}
    with pytest.raises(ValueError, match="env_vars"):
        CloudConfig.from_dict({"replica": {"env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": 0}}})  # unquoted
    env = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
    app = build_app("m.pt", "id", CloudConfig.from_dict({"replica": {"env_vars": env}}))
    assert app._bound_deployment.ray_actor_options["runtime_env"] == {"env_vars": env}
    assert "runtime_env" not in build_app("m.pt", "id", CloudConfig())._bound_deployment.ray_actor_options
    with pytest.raises(ValueError, match="replica_transport"):
        CloudConfig.from_dict({"front": {"replica_transport": "http"}})


def test_cli_helpers(tmp_path, monkeypatch, model_file):
    from cloud.cli import main

    assert main(["make-dev-cert", "--out", str(tmp_path / "c")]) == 0
    assert {p.name for p in (tmp_path / "c").iterdir()} >= {"ca.pem", "server.pem", "server.key", "client.pem", "client.key"}
    assert main(["make-token", "--out", str(tmp_path / "token.txt")]) == 0
    assert oct((tmp_path / "token.txt").stat().st_mode & 0o777) == "0o600"
    monkeypatch.delenv("RAPNET_TOKEN", raising=False)
    assert main(["serve", "--checkpoint", model_file[2]]) == 2  # no token: refuses with a message
    assert main(["serve", "--checkpoint", model_file[2], "--token-file", str(tmp_path / "token.txt"),
                 "--host", "192.0.2.1"]) == 2  # plaintext on a non-loopback address: refused before binding
