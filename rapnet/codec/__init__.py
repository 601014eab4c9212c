"""The wire codec: tensors, images and whole requests, encoded by the edge and decoded by the cloud.

One package used by both sides, so the two can never disagree on a format. Wire format: protos/rapnet/v1/
inference.proto; description and measured sizes: docs/wire.md. One module per concern:

  limits    the CodecError family (each carries the gRPC status the server answers with) and DecodeLimits;
  entropy   zstd: compression, decompression bounded by the declared size, dictionaries trained on features;
  tensors   feature tensors as fp32, fp16, int8 or int4 (affine per-channel quantisation);
  images    image payloads: PNG, JPEG or raw uint8 + zstd, and pixels <-> the model's input tensor;
  contract  ModelContract, build_request (edge), parse_request (cloud), build_response (cloud);
  budget    the largest legitimate request for a model (bytes, fields), checked on raw bytes before parsing;
  menu      the encoding menu ("png", "int8+zstd", ...) and the EncodeOptions each name stands for.

Decoding is bounded and strict. Everything a message declares (enums, shape, sizes, quantisation parameters,
image header) is checked against `DecodeLimits` and the model's expected carry *before* any buffer is
allocated; zstd output is capped at the declared raw size; decoded values must be finite. Every refusal is a
`CodecError` whose `status` is the gRPC status code the server should answer with: INVALID_ARGUMENT for a
malformed request, FAILED_PRECONDITION when the request was made for another model (identity, split point or
exit).

The public names below import from here (`from rapnet.codec import build_request`). They load on first use,
so `rapnet.codec.menu` stays importable without OpenCV (command-line parsers use it). No module here imports
torch at import time: torch tensors are taken and given where a caller uses them (decode_tensor,
pixels_to_tensor, parse_request's carry), numpy arrays everywhere else (the edge on ONNX Runtime has no torch).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "limits": ("CodecError", "MalformedMessage", "LimitExceeded", "ContractMismatch", "DecodeLimits",
               "DEFAULT_LIMITS", "ENCODINGS", "IMAGE_FORMATS", "clip"),
    "budget": ("RequestBudget", "request_budget", "check_wire"),
    "entropy": ("zstd_compress", "zstd_decompress_bounded", "train_dictionary"),
    "tensors": ("quantization_params", "encode_tensor", "check_tensor_header", "decode_tensor", "decode_array"),
    "images": ("pixels_to_tensor", "pixels_to_array", "tensor_to_pixels", "encode_image", "decode_image"),
    "contract": ("IMAGE_KEY", "ModelContract", "ParsedRequest", "build_request", "parse_request",
                 "parse_request_bytes", "build_response"),
    "menu": ("EncodeOptions", "IMAGE_ENCODINGS", "FEATURE_ENCODINGS", "ENCODING_NAMES", "LOSSLESS",
             "DEFAULT_ENCODINGS", "encode_options", "encodings_for_split", "parse_encodings",
             "RECOMMENDED_ENCODINGS", "SAFE_ENCODING", "recommended_encoding"),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from .budget import RequestBudget, check_wire, request_budget
    from .contract import (IMAGE_KEY, ModelContract, ParsedRequest, build_request, build_response, parse_request,
                           parse_request_bytes)
    from .entropy import train_dictionary, zstd_compress, zstd_decompress_bounded
    from .images import decode_image, encode_image, pixels_to_array, pixels_to_tensor, tensor_to_pixels
    from .limits import (DEFAULT_LIMITS, ENCODINGS, IMAGE_FORMATS, CodecError, ContractMismatch, DecodeLimits,
                         LimitExceeded, MalformedMessage, clip)
    from .menu import (DEFAULT_ENCODINGS, ENCODING_NAMES, FEATURE_ENCODINGS, IMAGE_ENCODINGS, LOSSLESS,
                       RECOMMENDED_ENCODINGS, SAFE_ENCODING, EncodeOptions, encode_options, encodings_for_split,
                       parse_encodings, recommended_encoding)
    from .tensors import check_tensor_header, decode_array, decode_tensor, encode_tensor, quantization_params
