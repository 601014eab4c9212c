"""The wire contract: generated code is current, importable, and serves over real gRPC on 127.0.0.1."""
from __future__ import annotations

import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2

from protos import generate
from protos.rapnet.v1 import inference_pb2 as pb
from protos.rapnet.v1 import inference_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]


def test_regenerating_gives_byte_identical_files(tmp_path):
    written = generate.generate(tmp_path)
    assert len(written) == 3
    for path in written:
        committed = ROOT / path.relative_to(tmp_path)
        assert committed.is_file(), f"{committed} is missing: run `python -m protos.generate`"
        assert path.read_bytes() == committed.read_bytes(), (
            f"{committed.relative_to(ROOT)} is stale: run `python -m protos.generate` and commit the result"
        )


def test_generate_script_runs_as_a_module(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "protos.generate", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "protos/rapnet/v1/inference_pb2_grpc.py").is_file()


def test_service_shape():
    service = pb.DESCRIPTOR.services_by_name["Inference"]
    assert pb.DESCRIPTOR.package == "rapnet.v1"
    infer, stream = service.methods_by_name["Infer"], service.methods_by_name["InferStream"]
    assert (infer.client_streaming, infer.server_streaming) == (False, False)
    assert (stream.client_streaming, stream.server_streaming) == (True, True)
    assert infer.input_type.name == "InferRequest" and infer.output_type.name == "InferResponse"


def test_every_enum_zero_is_unspecified():
    for enum in pb.DESCRIPTOR.enum_types_by_name.values():
        assert enum.values_by_number[0].name.endswith("_UNSPECIFIED"), enum.name


def test_tensor_field_numbers_are_stable():
    """Field numbers never change within v1 (old and new senders interoperate)."""
    fields = {f.name: f.number for f in pb.Tensor.DESCRIPTOR.fields}
    assert fields == {"name": 1, "dtype": 2, "shape": 3, "encoding": 4, "codec": 5, "scale": 6, "zero_point": 7,
                      "quant_axis": 8, "raw_size": 9, "zstd_dict_id": 10, "data": 11, "scale_f16": 12,
                      "zero_point_u8": 13}


def test_request_field_numbers_are_stable_and_unread_ones_reserved():
    """5 (policy) and 10 (edge_compute_ms) are reserved: the cloud does not read them and no new field may reuse them."""
    fields = {f.name: f.number for f in pb.InferRequest.DESCRIPTOR.fields}
    assert fields == {"request_id": 1, "model_identity": 2, "split_point": 3, "target_exit": 4, "tensors": 6,
                      "image": 7, "deadline_ms": 8, "client_sent_unix_ns": 9, "cloud_exit": 11, "stop_confidence": 12}
    proto = descriptor_pb2.DescriptorProto()
    pb.InferRequest.DESCRIPTOR.CopyToProto(proto)
    assert sorted((r.start, r.end) for r in proto.reserved_range) == [(5, 6), (10, 11)]
    assert sorted(proto.reserved_name) == ["edge_compute_ms", "policy"]


def test_health_service_is_the_standard_one():
    from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: F401

    assert health_pb2.DESCRIPTOR.package == "grpc.health.v1"


class _Echo(pb_grpc.InferenceServicer):
    def Infer(self, request, context):
        return pb.InferResponse(request_id=request.request_id, split_point=request.split_point,
                                model_identity=request.model_identity)

    def InferStream(self, request_iterator, context):
        for request in request_iterator:
            yield self.Infer(request, context)


@pytest.fixture
def channel():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_InferenceServicer_to_server(_Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch
    server.stop(None)


def test_unary_and_streaming_calls_over_loopback(channel):
    stub = pb_grpc.InferenceStub(channel)
    reply = stub.Infer(pb.InferRequest(request_id="a", split_point=3, model_identity="m"), timeout=10)
    assert (reply.request_id, reply.split_point, reply.model_identity) == ("a", 3, "m")
    replies = list(stub.InferStream(iter([pb.InferRequest(request_id=str(i)) for i in range(5)]), timeout=10))
    assert [r.request_id for r in replies] == [str(i) for i in range(5)]
