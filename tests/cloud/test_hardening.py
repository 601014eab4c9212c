"""Hardening of the cloud tier and the wire, one test (or a few) per class of weakness: work before limits, answers
that are not answers, unbounded echo, secrets, faults. Served tests share one Ray instance (started, like the others,
with a secret in this process's environment) and one front with one replica; the replica is killed last."""
from __future__ import annotations

import io
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from protos.rapnet.v1 import inference_pb2 as pb
from protos.rapnet.v1.inference_pb2_grpc import InferenceStub
from rapnet.build import build_model
from rapnet.checkpoint import save_checkpoint
from rapnet.codec import (EncodeOptions, LimitExceeded, MalformedMessage, ModelContract, build_request,
                          parse_request_bytes, request_budget)
from rapnet.config import ModelConfig
from rapnet.transport import TOKEN_ENV, auth_metadata, open_channel

TOKEN = "hardening-token-" + "z" * 24
SECRET = "from-the-environment-" + secrets.token_hex(12)  # $RAPNET_TOKEN while Ray starts: must reach none of it
Code = grpc.StatusCode
FP32 = EncodeOptions(encoding="fp32", zstd_level=None)
ROOT = Path(__file__).resolve().parents[2]
# The wire contract of a model like the shipped one (no network built: the quick tests need only its carry shapes).
WIRE = ModelContract("a" * 64, 4, (1, 2, 3), ({"image": (3, 32, 32)}, {"image": (3, 32, 32), "lr": (16, 16, 16)},
                                               {"hr": (32, 8, 8)}, {"hr": (80, 4, 4)}), has_predictor=True)


def _request(model, contract, split: int, seed: int = 0, options: EncodeOptions = FP32, **kwargs) -> pb.InferRequest:
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        carry = model.edge_part(image, split)
    return build_request(contract, carry, split, model.num_exits - 1, options, **kwargs)


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details() or ""


# ------------------------------------------------------------------------------------------------------
# Work before limits: the request budget (no Ray)
# ------------------------------------------------------------------------------------------------------


def test_the_budget_holds_every_legitimate_request_and_not_much_more():
    """Noise (which no codec compresses) at every split, in every encoding a client may choose, with the longest
    request id: each fits the budget, bytes and fields; the largest takes more than half of it."""
    contract = WIRE
    budget = request_budget(contract)
    rng = np.random.default_rng(0)
    options = [FP32, EncodeOptions("fp32", 3), EncodeOptions("fp16", 3), EncodeOptions("int8", None),
               EncodeOptions("int4", 3, per_channel=False, params="f16"), EncodeOptions("int8", 19, params="f16"),
               EncodeOptions("int8", 3, image_format="jpeg", jpeg_quality=100), EncodeOptions(image_format="raw_zstd")]
    largest = 0
    for split in range(contract.num_stages):
        carry = {k: torch.from_numpy((rng.standard_normal((1, *s)) * 30).astype(np.float32))
                 for k, s in contract.carry_shapes[split].items()}
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        for opts in options:
            for image in (None, pixels) if "image" in carry else (None,):
                req = build_request(contract, carry, split, contract.num_exits - 1, opts, image=image,
                                    request_id="r" * 128, deadline_ms=2**31, cloud_exit_price=1e9 if split == 0 else None,
                                    stop_confidence=0.5)
                data = req.SerializeToString()
                budget.check(data)  # raises if over
                largest = max(largest, len(data))
    assert budget.max_bytes / 2 < largest <= budget.max_bytes


def test_hostile_messages_are_refused_before_protobuf_parses_them():
    """Many empty repeated entries: valid protobuf, costly to parse (about 0.2 us per entry, all under the GIL) and to
    walk. The budget refuses them on the raw bytes, looking at no more fields than a legitimate request has."""
    contract = WIRE
    budget = request_budget(contract)
    empties = b"\x32\x00" * (budget.max_bytes // 2)  # field 6 (tensors), empty entries, within the byte budget
    with pytest.raises(LimitExceeded, match="protobuf fields"):
        parse_request_bytes(empties, contract, budget=budget)
    with pytest.raises(LimitExceeded, match="largest legitimate request"):
        budget.check(b"\x32\x00" * budget.max_bytes)
    few = b"\x18\x01" * 50  # one tensor with 50 unpacked shape entries ...
    budget.check(b"\x32" + _varint(len(few)) + few)
    with pytest.raises(LimitExceeded):  # ... or with more fields than any legitimate request
        many = b"\x18\x01" * budget.max_fields
        budget.check(b"\x32" + _varint(len(many)) + many)
    with pytest.raises(MalformedMessage, match="wire type 3"):
        budget.check(b"\x0b" + b"\x0c")  # a group: never written by proto3
    carry = {k: torch.zeros(1, *shape) for k, shape in contract.carry_shapes[1].items()}
    legit = build_request(contract, carry, 1, contract.num_exits - 1, FP32).SerializeToString()
    assert set(parse_request_bytes(legit, contract, budget=budget).carry) == {"image", "lr"}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


# ------------------------------------------------------------------------------------------------------
# Secrets on the client side (no Ray)
# ------------------------------------------------------------------------------------------------------


def test_the_token_never_goes_out_in_plaintext_to_another_host():
    from edge.link import CloudLink, CloudTarget

    for address in ("10.0.0.5:50051", "cloud.example.com:443", "[2001:db8::1]:50051"):
        with pytest.raises(ValueError, match="plaintext .*--tls-ca"):
            open_channel(address)
        with pytest.raises(ValueError, match="--tls-ca"):
            CloudLink(CloudTarget(address, token=TOKEN), deadline_ms=100)
    for address in ("127.0.0.1:1", "localhost:1", "[::1]:1", "127.0.0.2:1"):
        open_channel(address).close()
    open_channel("10.0.0.5:50051", allow_plaintext=True).close()  # the library caller's explicit choice


# ------------------------------------------------------------------------------------------------------
# Faults on the edge side: an answer to another request (a real gRPC server that answers wrongly; no Ray)
# ------------------------------------------------------------------------------------------------------


def test_the_edge_uses_no_answer_that_is_not_to_its_request():
    from edge.link import CloudCallError, CloudLink, CloudTarget

    contract = WIRE
    answers = {"request_id": "", "model_identity": contract.identity, "split_point": 3}

    def infer(raw: bytes, context) -> pb.InferResponse:
        request = pb.InferRequest.FromString(raw)
        return pb.InferResponse(request_id=answers["request_id"] or request.request_id, class_index=1,
                                top_k=[pb.TopK(class_index=1, score=0.9)], model_identity=answers["model_identity"],
                                split_point=answers["split_point"])

    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("rapnet.v1.Inference", {
        "Infer": grpc.unary_unary_rpc_method_handler(infer, request_deserializer=None,
                                                     response_serializer=pb.InferResponse.SerializeToString)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    link = CloudLink(CloudTarget(f"127.0.0.1:{port}", token=TOKEN), deadline_ms=5000)
    try:
        data = pb.InferRequest(request_id="mine", split_point=3).SerializeToString()
        expect = ("mine", contract.identity, 3)
        assert link.infer(data, expect=expect).response.class_index == 1
        for field, wrong in (("request_id", "someone-else"), ("model_identity", "f" * 64), ("split_point", 4)):
            answers.update({"request_id": "", "model_identity": contract.identity, "split_point": 3, field: wrong})
            with pytest.raises(CloudCallError) as info:
                link.infer(data, expect=expect)
            assert info.value.code == "MISMATCHED_ANSWER" and field.split("_")[0] in info.value.detail
        assert link.breaker.state == "open"  # three answers that were not answers: the circuit opened
    finally:
        link.close()
        server.stop(0)


# ------------------------------------------------------------------------------------------------------
# Served: one Ray instance started with a secret in the environment, one front, one replica
# ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secret_in_env(request):
    before = os.environ.get(TOKEN_ENV)
    os.environ[TOKEN_ENV] = SECRET
    request.getfixturevalue("ray_instance")  # Ray starts while $RAPNET_TOKEN holds the secret
    yield SECRET
    if before is None:
        os.environ.pop(TOKEN_ENV, None)
    else:
        os.environ[TOKEN_ENV] = before


def _config(app: str = "rapnet"):
    from cloud.config import CloudConfig

    return CloudConfig(app_name=app).with_overrides(
        autoscaling={"min_replicas": 1, "max_replicas": 1},
        replica={"num_cpus": 0.5, "health_check_period_s": 1.0},
        front={"port": 0, "request_timeout_s": 60.0},
    )


@pytest.fixture(scope="module")
def server(secret_in_env, model_file):
    from cloud.server import CloudServer

    srv = CloudServer(model_file[2], _config(), token=TOKEN).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def stub(server):
    channel = open_channel(server.address, max_message_bytes=4 << 20)  # sends what the server must refuse
    yield InferenceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def raw_infer(server):
    channel = open_channel(server.address, max_message_bytes=4 << 20)
    yield channel.unary_unary("/rapnet.v1.Inference/Infer", request_serializer=None, response_deserializer=None)
    channel.close()


def _ok(stub, model, contract, split=4, seed=1) -> pb.InferResponse:
    return stub.Infer(_request(model, contract, split, seed), metadata=auth_metadata(TOKEN), timeout=60)


@pytest.mark.slow
def test_the_front_takes_no_more_than_the_largest_legitimate_request(server, raw_infer, stub, model_file, contract):
    model, _, _ = model_file
    budget = server.front.budget
    assert server.max_receive_bytes == budget.max_bytes == request_budget(contract, server.front.limits).max_bytes
    over = b"\x32\x00" * 50_000  # 100 KB of empty tensor entries: over this model's budget, under gRPC's 4 MiB
    code, _ = _code(lambda: raw_infer(over, metadata=auth_metadata(TOKEN), timeout=30))
    assert code == Code.RESOURCE_EXHAUSTED  # gRPC's receive limit: never read into the front
    within = b"\x32\x00" * (budget.max_bytes // 2 - 8)
    code, details = _code(lambda: raw_infer(within, metadata=auth_metadata(TOKEN), timeout=30))
    assert code == Code.INVALID_ARGUMENT and "protobuf fields" in details
    assert _ok(stub, model, contract).model_identity == contract.identity


class _CountingParses:
    """Stands in for the generated module in rapnet.codec.contract: counts InferRequest.FromString calls (the front
    runs in this process) and passes everything else through."""

    def __init__(self, real):
        self._real, self.parses = real, 0
        counter = self

        class InferRequest:
            @staticmethod
            def FromString(data):
                counter.parses += 1
                return real.InferRequest.FromString(data)

        self.InferRequest = InferRequest

    def __getattr__(self, name):
        return getattr(self._real, name)


@pytest.mark.slow
def test_requests_over_the_contracts_limit_are_refused_unparsed(server, raw_infer, stub, model_file, contract,
                                                                monkeypatch):
    """A well-formed request one byte class over the budget (a big tensor), and one within its bytes but with more
    fields than any legitimate request: both refused with protobuf never parsing them; a legitimate request is
    parsed once and answered."""
    import rapnet.codec.contract as wire

    model, _, _ = model_file
    budget = server.front.budget
    ok = _request(model, contract, 4, seed=2).SerializeToString()
    over = pb.InferRequest(model_identity=contract.identity, split_point=4, target_exit=model.num_exits - 1,
                           tensors=[pb.Tensor(name="hr", data=b"\x01" * budget.max_bytes)]).SerializeToString()
    fields = b"\x32\x00" * (budget.max_bytes // 2 - 8)
    assert len(over) > budget.max_bytes >= len(fields) and len(ok) <= budget.max_bytes
    counting = _CountingParses(wire.pb)
    monkeypatch.setattr(wire, "pb", counting)
    code, _ = _code(lambda: raw_infer(over, metadata=auth_metadata(TOKEN), timeout=30))
    assert code == Code.RESOURCE_EXHAUSTED and counting.parses == 0
    code, details = _code(lambda: raw_infer(fields, metadata=auth_metadata(TOKEN), timeout=30))
    assert code == Code.INVALID_ARGUMENT and "protobuf fields" in details and counting.parses == 0
    answer = pb.InferResponse.FromString(raw_infer(ok, metadata=auth_metadata(TOKEN), timeout=60))
    assert answer.model_identity == contract.identity and counting.parses == 1


@pytest.mark.slow
def test_extreme_but_finite_values_are_refused_not_answered_with_nan(server, stub, model_file, contract):
    model, _, _ = model_file
    split = 4
    carry = {k: (torch.rand(1, *s, generator=torch.Generator().manual_seed(3)) * 2 - 1) * 3e38  # finite
             for k, s in contract.carry_shapes[split].items()}
    req = build_request(contract, carry, split, model.num_exits - 1, FP32)
    code, details = _code(lambda: stub.Infer(req, metadata=auth_metadata(TOKEN), timeout=30))
    assert code == Code.INVALID_ARGUMENT and "float16 range" in details
    edge_of_range = {k: torch.full((1, *s), 65504.0) for k, s in contract.carry_shapes[split].items()}
    response = stub.Infer(build_request(contract, edge_of_range, split, model.num_exits - 1, FP32),
                          metadata=auth_metadata(TOKEN), timeout=60)
    assert all(np.isfinite(t.score) for t in response.top_k)


@pytest.mark.slow
def test_scores_that_are_not_finite_are_internal_not_ok(server, model_file, tmp_path):
    """A checkpoint whose last classifier overflows on any input: its NaN scores never leave as an answer."""
    from cloud.server import CloudServer

    model, _, _ = model_file
    torch.manual_seed(0)
    broken = build_model(ModelConfig(width=0.35)).eval()
    with torch.no_grad():
        broken.exits[-1].fc.bias.fill_(float("inf"))  # every logit +inf: softmax gives NaN
    path = tmp_path / "overflows.pt"
    identity = save_checkpoint(path, broken)
    contract = ModelContract.from_model(broken, identity)
    front = CloudServer(str(path), _config(app="overflows"), token=TOKEN).start()
    try:
        with open_channel(front.address) as channel:
            code, details = _code(lambda: InferenceStub(channel).Infer(
                _request(broken, contract, split=4), metadata=auth_metadata(TOKEN), timeout=60))
        assert code == Code.INTERNAL and "not finite" in details
    finally:
        front.stop()


@pytest.mark.slow
def test_long_client_strings_stay_short_in_details_and_logs(server, stub, model_file, contract):
    model, _, _ = model_file
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    from cloud.logs import JsonFormatter

    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("rapnet.cloud")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        split = min(range(model.num_stages), key=lambda k: _request(model, contract, k).ByteSize())
        req = _request(model, contract, split=split)
        length = min(20_000, server.front.budget.max_bytes - req.ByteSize() - 512)  # within the request budget ...
        assert length > 12_000  # ... and far over gRPC's 8 KiB of metadata
        req.tensors[0].name = "n" * length
        code, details = _code(lambda: stub.Infer(req, metadata=auth_metadata(TOKEN), timeout=30))
        assert code == Code.INVALID_ARGUMENT and len(details) < 1100 and "chars)" in details
        req = _request(model, contract, split=split, request_id="i" * 5000)
        code, details = _code(lambda: stub.Infer(req, metadata=auth_metadata(TOKEN), timeout=30))
        assert code == Code.INVALID_ARGUMENT and "request_id" in details and len(details) < 1100
        time.sleep(0.2)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    lines = stream.getvalue().splitlines()
    refused = [json.loads(line) for line in lines if '"refused"' in line]
    assert len(refused) >= 2 and max(map(len, lines)) < 2500


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/environ"), reason="reads /proc")
def test_a_token_from_the_environment_reaches_no_ray_process(server, stub, model_file, contract):
    """This process held the secret in $RAPNET_TOKEN while it started Ray, Serve and a replica: no other process
    (GCS, raylet, agents, controller, replica) has it in its environment."""
    _ok(stub, model_file[0], contract)
    holders = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")[:100]
        except OSError:
            continue
        if SECRET.encode() in environ:
            holders.append((entry.name, cmdline))
    assert not holders, holders
    assert os.environ[TOKEN_ENV] == SECRET  # this process keeps what it was given


# ------------------------------------------------------------------------------------------------------
# Faults: the front stopped by SIGTERM while it starts, a replica killed mid-request (last: it disturbs the app)
# ------------------------------------------------------------------------------------------------------


def _descendants(root: int) -> dict[int, bytes]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = {}, [root]
    while todo:
        pid = todo.pop()
        try:
            found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        todo += children.get(pid, [])
    return found


def _still_running(pid: int, cmdline: bytes) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z" and Path(f"/proc/{pid}/cmdline").read_bytes() == cmdline
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc")
def test_sigterm_while_the_front_starts_leaves_no_ray_process(model_file, tmp_path):
    """`rapnet-cloud serve` gets SIGTERM while its replica is being built (Ray up, the app not yet serving): it stops
    what it started, and no process of its Ray session is left (Ray's own handler would leave its agents running)."""
    token = tmp_path / "token.txt"
    token.write_text(TOKEN)
    temp = tempfile.mkdtemp(prefix="rapnet-ray-term-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k not in (TOKEN_ENV, "RAY_ADDRESS")}
    proc = subprocess.Popen([sys.executable, "-m", "cloud.cli", "serve", "--checkpoint", model_file[2], "--port", "0",
                             "--token-file", str(token), "--ray-temp-dir", temp, "--replicas", "1"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen: dict[int, bytes] = {}
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            seen.update(_descendants(proc.pid))
            if any(b"ServeReplica" in cmd for cmd in seen.values()):
                break
            time.sleep(0.1)
        assert proc.poll() is None and any(b"raylet" in cmd for cmd in seen.values()), "Ray did not start"
        seen.update(_descendants(proc.pid))
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        deadline = time.monotonic() + 20  # Ray's agents that outlive their raylet linger for a minute
        left = {pid: cmd for pid, cmd in seen.items() if _still_running(pid, cmd)}
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = {pid: cmd for pid, cmd in left.items() if _still_running(pid, cmd)}
        assert not left, (left, out.decode(errors="replace")[-2000:])
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid, cmd in seen.items():  # never leave this test's processes behind, whatever happened
            if pid != proc.pid and _still_running(pid, cmd):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_replica_killed_mid_request_answers_unavailable_within_the_deadline(server, stub, model_file, contract):
    """The only replica dies (SIGKILL) under a burst: every call ends OK or UNAVAILABLE well within its deadline,
    none DEADLINE_EXCEEDED; calls while Serve replaces it are answered UNAVAILABLE at once; then service resumes."""
    from ray import serve

    model, _, _ = model_file
    handle = serve.get_deployment_handle(server.config.deployment_name, server.config.app_name)
    pid = handle.whoami.remote().result(timeout_s=60)["pid"]
    requests = [_request(model, contract, split=i % model.num_stages, seed=400 + i) for i in range(40)]
    deadline_s = 30.0
    calls = []
    for i, req in enumerate(requests):
        calls.append((time.monotonic(), stub.Infer.future(req, metadata=auth_metadata(TOKEN), timeout=deadline_s)))
        if i == 8:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    outcomes = []
    for sent, call in calls:
        try:
            call.result()
            code = Code.OK
        except grpc.RpcError as err:
            code = err.code()
        outcomes.append((code, time.monotonic() - sent))
    codes = {c.name: sum(1 for o, _ in outcomes if o == c) for c, _ in outcomes}
    assert {c for c, _ in outcomes} <= {Code.OK, Code.UNAVAILABLE}, codes
    assert Code.UNAVAILABLE in {c for c, _ in outcomes}, codes  # the kill did land mid-burst
    assert max(s for c, s in outcomes if c == Code.UNAVAILABLE) < deadline_s / 2, outcomes
    deadline = time.monotonic() + 240  # Serve replaces the replica (seconds; more on a loaded machine)
    while time.monotonic() < deadline:
        try:
            assert _ok(stub, model, contract).model_identity == contract.identity
            break
        except grpc.RpcError as err:
            assert err.code() == Code.UNAVAILABLE, err
            time.sleep(1)
    else:
        pytest.fail("the replica was not replaced")
