"""The request budget: how large, and how many fields, the largest legitimate request for a model can be.

A receiver checks these two numbers on the raw bytes before it parses anything, so a hostile message costs it no
more than a legitimate one: the cloud front sets gRPC's receive limit to `max_bytes` and calls `check_wire` before
protobuf parses the message (parsing is pure CPU under the GIL, about 0.2 us per field: a message of 1 MiB made of
empty repeated entries holds half a million fields).

The bound follows from the model contract (the carry at every split point) and the decode limits:

  * each carry tensor at its costliest encoding (float32 elements in a zstd frame that did not compress,
    per-channel float32 quantisation parameters on top, and the tensor's header fields);
  * the image entry, where live, as the larger of that and an image payload (PNG, JPEG at quality 100 or raw + zstd:
    at most twice its pixels plus 2 KiB of headers, measured on noise);
  * the request's own fields (request id up to `DecodeLimits.max_request_id_chars`, model identity, route, deadline,
    cloud exit, stop confidence);

at the split whose carry is largest, for one sample (the cloud serves batch 1) or `batch`, plus a margin (a quarter
and 4 KiB) for encoders that spend more bytes on varints than ours. Fields: every field of the request and of each
of those entries once (repeated numbers packed, as every proto3 encoder writes them by default), doubled, plus 32.
The edge and the planner read the same numbers (one place): `link_message_limit` is the edge's gRPC send and receive
limit by default, the largest request the edge's encoding menu can make for this model (the request budget over
the split points the menu reaches, split 0 always: the start-up check sends the image) or the largest response
(`response_bytes`), whichever is larger; the planner keeps every request under it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from protos.rapnet.v1 import inference_pb2 as pb

from .limits import DEFAULT_LIMITS, DecodeLimits, LimitExceeded, MalformedMessage

MARGIN_FRACTION = 0.25
MARGIN_BYTES = 4096
_TENSOR_HEADER_BYTES = 96  # tag + length, dtype, encoding, codec, quant_axis, packed shape, raw_size, dict id
_TENSOR_FIELDS = 13  # every field of a Tensor once
_REQUEST_FIELD_BYTES = 96  # split, exit, deadline, client time, cloud exit, stop confidence, tags and lengths
_REQUEST_FIELDS = 12
# The largest response: every field of an InferResponse at its longest varint, the request id echoed back (UTF-8, up
# to 4 bytes a character), the model identity, and up to MAX_RESPONSE_TOP_K top-k entries (the front sends 5; the
# bound covers a server that sends every class of an ImageNet-1k model).
MAX_RESPONSE_TOP_K = 1000
_TOP_K_ENTRY_BYTES = 2 + 6 + 5  # tag + length, class index, score
_RESPONSE_FIELD_BYTES = 6 + 6 + 17 + 6 + 16  # class index, exit used, timings, split point, tags and lengths


@dataclass(frozen=True)
class RequestBudget:
    """The largest legitimate request for one model: bytes on the wire and protobuf fields."""

    max_bytes: int
    max_fields: int

    def check(self, data: bytes) -> None:
        """Refuse (LimitExceeded, MalformedMessage) a serialized request beyond the budget, before it is parsed."""
        if len(data) > self.max_bytes:
            raise LimitExceeded(f"request is {len(data)} bytes; the largest legitimate request for this model is "
                                f"{self.max_bytes}")
        check_wire(data, self.max_fields)


def zstd_bound(n: int) -> int:
    """The most bytes one zstd frame of `n` input bytes can take (ZSTD_COMPRESSBOUND plus the frame header)."""
    small = ((128 << 10) - n) >> 11 if n < (128 << 10) else 0
    return n + (n >> 8) + small + 32


def _tensor_bytes(name: str, shape: tuple[int, ...], batch: int) -> int:
    channels = shape[0] if shape else 1
    return zstd_bound(4 * batch * math.prod(shape)) + 8 * channels + 16 + _TENSOR_HEADER_BYTES + len(name.encode())


def _image_bytes(shape: tuple[int, ...]) -> int:
    return 2 * math.prod(shape) + 2048 + 32


def request_budget(contract, limits: DecodeLimits = DEFAULT_LIMITS, batch: int = 1,
                   splits=None) -> RequestBudget:
    """The budget of `contract` (a rapnet.codec.ModelContract): see the module docstring for what it counts.
    `splits`: only requests at these split points (None: every split point)."""
    from .contract import IMAGE_KEY

    fixed = limits.max_request_id_chars + len(contract.identity) + _REQUEST_FIELD_BYTES
    largest_bytes = largest_fields = 0
    chosen = range(len(contract.carry_shapes)) if splits is None else sorted(set(splits))
    for split in chosen:
        if not 0 <= split < len(contract.carry_shapes):
            raise ValueError(f"split point {split} is outside 0..{len(contract.carry_shapes) - 1} for this model")
        carry = contract.carry_shapes[split]
        nbytes, fields = fixed, _REQUEST_FIELDS
        for name, shape in carry.items():
            entry = _tensor_bytes(name, tuple(shape), batch)
            if name == IMAGE_KEY:
                entry = max(entry, _image_bytes(tuple(shape)))
            nbytes += entry
            fields += _TENSOR_FIELDS
        largest_bytes, largest_fields = max(largest_bytes, nbytes), max(largest_fields, fields)
    return RequestBudget(max_bytes=math.ceil(largest_bytes * (1 + MARGIN_FRACTION)) + MARGIN_BYTES,
                         max_fields=2 * largest_fields + 32)


def response_bytes(contract, limits: DecodeLimits = DEFAULT_LIMITS) -> int:
    """The largest InferResponse a cloud serving `contract` sends (with MAX_RESPONSE_TOP_K top-k entries), with the
    request budget's margin."""
    nbytes = (4 * limits.max_request_id_chars + 3 + len(contract.identity) + 3 + _RESPONSE_FIELD_BYTES
              + MAX_RESPONSE_TOP_K * _TOP_K_ENTRY_BYTES)
    return math.ceil(nbytes * (1 + MARGIN_FRACTION)) + MARGIN_BYTES


def menu_splits(contract, encodings) -> tuple[int, ...]:
    """The split points an edge with this encoding menu (rapnet.codec.menu names) may send requests at: split 0
    always (the image: an image encoding, the cloud picking the exit, and the edge's start-up check), every later
    split point whose carry crosses the wire when a feature encoding is on the menu."""
    from .menu import FEATURE_ENCODINGS

    later = range(1, len(contract.carry_shapes)) if any(e in FEATURE_ENCODINGS for e in encodings) else ()
    return (0, *(s for s in later if contract.carry_shapes[s]))


def link_message_limit(contract, encodings=None, limits: DecodeLimits = DEFAULT_LIMITS) -> int:
    """The edge's gRPC send and receive limit for `contract` by default: the request budget over the split points the
    encoding menu reaches (None: every encoding, rapnet.codec.menu.DEFAULT_ENCODINGS; the cloud front's receive
    limit for the model) or the largest response, whichever is larger."""
    from .menu import DEFAULT_ENCODINGS

    menu = DEFAULT_ENCODINGS if encodings is None else tuple(encodings)
    sent = request_budget(contract, limits, splits=menu_splits(contract, menu)).max_bytes
    return max(sent, response_bytes(contract, limits))


# ---- counting fields on the raw bytes -------------------------------------------------------------------------
def _message_fields(descriptor) -> dict:
    """{field number: the same map for its message type} for the message fields of `descriptor` (no recursion)."""
    return {f.number: ({g.number: {} for g in f.message_type.fields if g.message_type}) for f in descriptor.fields
            if f.message_type is not None}


_REQUEST_MESSAGES = _message_fields(pb.InferRequest.DESCRIPTOR)


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise MalformedMessage("not a valid InferRequest message (truncated or over-long varint)")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _count(data: bytes, pos: int, end: int, messages: dict, left: int, max_fields: int) -> int:
    while pos < end:
        left -= 1
        if left < 0:
            raise LimitExceeded(f"request holds more than {max_fields} protobuf fields, more than the largest "
                                "legitimate request for this model")
        key, pos = _varint(data, pos, end)
        wire = key & 7
        if wire == 0:
            _, pos = _varint(data, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(data, pos, end)
            inner = messages.get(key >> 3)
            if inner is not None and pos + length <= end:
                left = _count(data, pos, pos + length, inner, left, max_fields)
            pos += length
        else:  # groups (3, 4) are not part of proto3; 6 and 7 are not wire types
            raise MalformedMessage(f"not a valid InferRequest message (wire type {wire})")
        if pos > end:
            raise MalformedMessage("not a valid InferRequest message (a field runs past its end)")
    return left


def check_wire(data: bytes, max_fields: int) -> None:
    """Refuse a serialized InferRequest with more than `max_fields` fields (nested Tensor, ImagePayload and CloudExit
    fields count too), or with wire types proto3 never writes, walking its bytes without parsing them. Stops at the
    first field past the bound, so its cost is bounded by `max_fields`, not by the message."""
    _count(bytes(data), 0, len(data), _REQUEST_MESSAGES, max_fields, max_fields)
