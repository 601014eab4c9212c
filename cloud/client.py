"""A minimal client for the cloud front (tests, benchmark, docs; the edge agent has its own).

    channel = open_channel(server.address, ca="dev-certs/ca.pem")
    stub = InferenceStub(channel)
    response = stub.Infer(request, metadata=auth_metadata(token), timeout=2.0)
"""
from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.rapnet.v1.inference_pb2_grpc import InferenceStub  # noqa: F401 - re-exported for callers

from .security import auth_metadata, client_credentials  # noqa: F401

DEFAULT_MAX_MESSAGE_BYTES = 1 << 20  # match FrontSettings.max_message_bytes


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_message_bytes), ("grpc.max_receive_message_length", max_message_bytes)]


def open_channel(address: str, ca: str | None = None, client_cert: str | None = None, client_key: str | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, aio: bool = False):
    """A channel to the front: TLS when `ca` is given (the CA that signed the server certificate)."""
    make = grpc.aio if aio else grpc
    options = channel_options(max_message_bytes)
    if ca is None:
        return make.insecure_channel(address, options=options)
    return make.secure_channel(address, client_credentials(ca, client_cert, client_key), options=options)


def health_status(channel: grpc.Channel, service: str = "", timeout: float = 2.0) -> str:
    """'SERVING', 'NOT_SERVING', ... as grpc.health.v1 reports it."""
    response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
