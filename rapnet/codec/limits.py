"""What the decoder refuses and how much it accepts: the CodecError family and DecodeLimits.

Every refusal is a `CodecError` whose `status` is the gRPC status code the server should answer with:
INVALID_ARGUMENT for a malformed request, FAILED_PRECONDITION when the request was made for another model
(identity, split point or exit).
"""
from __future__ import annotations

from dataclasses import dataclass

import grpc

from protos.rapnet.v1 import inference_pb2 as pb


class CodecError(ValueError):
    """A message the decoder refuses. `status` is the gRPC status code the server turns it into."""

    status: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT


class MalformedMessage(CodecError):
    """The request is broken: bad enum, shape, size, payload, non-finite values, wrong carry."""

    status = grpc.StatusCode.INVALID_ARGUMENT


class LimitExceeded(MalformedMessage):
    """The request declares more than the configured limits allow (refused before allocating)."""


class ContractMismatch(CodecError):
    """The request was made for another model: identity, split point or exit do not fit this one."""

    status = grpc.StatusCode.FAILED_PRECONDITION


# Wire names of the tensor element encodings and image formats (EncodeOptions.encoding / .image_format).
ENCODINGS: dict[str, int] = {
    "fp32": pb.ENCODING_FP32,
    "fp16": pb.ENCODING_FP16,
    "int8": pb.ENCODING_INT8,
    "int4": pb.ENCODING_INT4,
}
IMAGE_FORMATS: dict[str, int] = {
    "png": pb.IMAGE_FORMAT_PNG,
    "jpeg": pb.IMAGE_FORMAT_JPEG,
    "raw_zstd": pb.IMAGE_FORMAT_RAW_ZSTD,
}


@dataclass(frozen=True)
class DecodeLimits:
    """What a decoder accepts. Checked against what a message declares, before anything is allocated."""

    max_elements: int = 1 << 20  # per tensor
    max_total_bytes: int = 16 << 20  # decoded float32 tensors + decoded image pixels, per request
    max_dims: int = 4
    max_tensors: int = 8
    max_batch: int = 64
    max_image_pixels: int = 1 << 20  # width * height
    # Largest |value| a decoded tensor may hold: the float16 range. The edge's fp16 encoding refuses anything beyond,
    # and the shipped model's carries on real images stay orders of magnitude below it (docs/wire.md); values far
    # beyond (finite, but extreme) drive the network to Inf and NaN.
    max_abs_value: float = 65504.0
    max_request_id_chars: int = 128  # the edge sends 32 (a uuid4 in hex)
    allowed_dtypes: frozenset[int] = frozenset({pb.DTYPE_FLOAT32})
    allowed_encodings: frozenset[int] = frozenset(ENCODINGS.values())
    allowed_codecs: frozenset[int] = frozenset({pb.CODEC_NONE, pb.CODEC_ZSTD})
    allowed_image_formats: frozenset[int] = frozenset(IMAGE_FORMATS.values())


DEFAULT_LIMITS = DecodeLimits()


def clip(value, limit: int = 64) -> str:
    """A client-controlled value as it may appear in an error detail or a log line: its repr, cut to about `limit`
    characters with the full length noted. Every such string goes through here, so a long name never turns a
    refusal into an oversized status (gRPC drops details beyond its metadata limit) or a log line as long as it."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(value) if isinstance(value, (str, bytes)) else len(text)} chars)"


def enum_name(enum, value: int) -> str:
    """The name of a wire enum value for an error message, also for values the enum does not know."""
    try:
        return enum.Name(value)
    except ValueError:
        return f"unknown value {value}"
