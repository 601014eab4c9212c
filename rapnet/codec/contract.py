"""Whole requests: the contract a request must match, build_request on the edge, parse_request on the cloud.

One package used by both sides, so the two can never disagree on a format. Wire format: protos/rapnet/v1/
inference.proto; description and measured sizes: docs/wire.md. Parsing is bounded and strict: everything a
request declares (identity, route, carry names and shapes, sizes) is checked against the model's contract and
the DecodeLimits before any tensor or image is decoded.
"""
from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np
import zstandard

from protos.rapnet.v1 import inference_pb2 as pb

from .images import decode_image, encode_image, pixels_to_array, pixels_to_tensor
from .limits import (DEFAULT_LIMITS, CodecError, ContractMismatch, DecodeLimits, LimitExceeded, MalformedMessage,
                     clip)
from .menu import EncodeOptions
from .tensors import check_tensor_header, decode_array, encode_tensor

if TYPE_CHECKING:  # torch only where a caller asks for torch tensors: the edge on ONNX Runtime has none
    import torch

    from .budget import RequestBudget

IMAGE_KEY = "image"  # the carry entry an ImagePayload stands for


@dataclass(frozen=True)
class ModelContract:
    """What a request must match: the model's identity and the carry (names, shapes) at every split."""

    identity: str
    num_stages: int
    exit_stages: tuple[int, ...]
    carry_shapes: tuple[dict[str, tuple[int, ...]], ...]  # per split point, shapes without the batch dim
    has_predictor: bool = False  # the model can pick an exit itself (requests with CloudExit)

    @property
    def num_exits(self) -> int:
        return len(self.exit_stages)

    @classmethod
    def from_model(cls, model, identity: str | None = None) -> "ModelContract":
        """Derive the contract from the model itself (identity hash + the measured split shapes)."""
        from ..checkpoint import model_identity
        from ..costs import measure_costs

        return cls.from_costs(identity or model_identity(model), measure_costs(model), model.predictor is not None)

    @classmethod
    def from_costs(cls, identity: str, costs, has_predictor: bool) -> "ModelContract":
        """The contract from a model's cost table (rapnet.costs.CostTable, which holds the carry at every split):
        what an edge without torch builds it from (the export manifest's table)."""
        shapes = tuple(dict(zip(keys, shp)) for keys, shp in zip(costs.split_keys, costs.split_shapes))
        return cls(identity, len(costs.stage_flops), tuple(costs.exit_stages), shapes, has_predictor)

    def check_route(self, split: int, exit_index: int) -> None:
        if not 0 <= split < self.num_stages:
            raise ContractMismatch(f"split point {split} is outside 0..{self.num_stages - 1} for this model")
        if not 0 <= exit_index < self.num_exits:
            raise ContractMismatch(f"exit {exit_index} is outside 0..{self.num_exits - 1} for this model")
        if self.exit_stages[exit_index] < split:
            raise ContractMismatch(f"exit {exit_index} sits before split point {split}: the edge answers it locally")

    def check_cloud_exit(self, split: int, price: float) -> None:
        """A request that lets the cloud pick the exit: the predictor reads the image, so split 0 only."""
        if not self.has_predictor:
            raise ContractMismatch("this model has no exit predictor: send target_exit without cloud_exit")
        if split != 0:
            raise ContractMismatch(f"cloud_exit needs split point 0 (the predictor reads the image), got {split}")
        if not 0.0 <= price < math.inf:
            raise MalformedMessage(f"cloud_exit.price must be a finite number >= 0, got {price}")

    @staticmethod
    def check_stop_confidence(value: float) -> None:
        if not 0.0 <= value <= 1.0:  # NaN fails too
            raise MalformedMessage(f"stop_confidence must lie in 0..1 (0: answer at target_exit), got {value}")


@dataclass
class ParsedRequest:
    request_id: str
    split: int
    exit: int
    carry: dict[str, Any]  # torch tensors, or numpy arrays when parsed with numpy=True
    deadline_ms: int
    client_sent_unix_ns: int
    decode_ms: float = 0.0
    exit_price: float | None = None  # set: the cloud picks the exit (priced rule, exits <= `exit`)
    stop_confidence: float = 0.0  # > 0: capped rule, stop at the first exit this confident (exits <= `exit`)


def build_request(
    contract: ModelContract,
    carry: Mapping[str, torch.Tensor | np.ndarray],
    split: int,
    exit_index: int,
    options: EncodeOptions = EncodeOptions(),
    *,
    image: np.ndarray | None = None,
    request_id: str | None = None,
    deadline_ms: int = 0,
    cloud_exit_price: float | None = None,
    stop_confidence: float = 0.0,
) -> pb.InferRequest:
    """Turn the carry the edge produced at `split` into an InferRequest for the cloud.

    `image` (uint8 HWC RGB) is sent as an ImagePayload in place of the carry entry "image" where that entry
    is live; without it the "image" tensor is encoded like the other tensors. `cloud_exit_price` (split 0
    only): the cloud runs the predictor and picks the exit by the priced rule at that price, up to `exit_index`.
    `stop_confidence` (> 0): the capped rule, the cloud stops at the first exit from `split` this confident.
    """
    try:
        contract.check_route(split, exit_index)
        if cloud_exit_price is not None:
            contract.check_cloud_exit(split, cloud_exit_price)
        contract.check_stop_confidence(stop_confidence)
    except CodecError as err:
        raise ValueError(str(err)) from None
    expected = contract.carry_shapes[split]
    if set(carry) != set(expected):
        raise ValueError(f"carry at split {split} must hold exactly {sorted(expected)}, got {sorted(carry)}")
    req = pb.InferRequest(
        request_id=request_id or uuid.uuid4().hex,
        model_identity=contract.identity,
        split_point=split,
        target_exit=exit_index,
        deadline_ms=deadline_ms,
        client_sent_unix_ns=time.time_ns(),
        stop_confidence=stop_confidence,
    )
    if cloud_exit_price is not None:
        req.cloud_exit.price = cloud_exit_price
    for key in sorted(carry):
        if key == IMAGE_KEY and image is not None:
            req.image.CopyFrom(encode_image(image, options.image_format, options.jpeg_quality))
            continue
        req.tensors.append(encode_tensor(
            carry[key], options.encoding, options.zstd_level, options.dictionary, name=key,
            per_channel=options.per_channel, params=options.params,
        ))
    return req


def parse_request_bytes(data: bytes, contract: ModelContract, limits: DecodeLimits = DEFAULT_LIMITS,
                        budget: RequestBudget | None = None, **kwargs) -> ParsedRequest:
    """Deserialize and parse a request from its wire bytes (protobuf errors become MalformedMessage). With a
    `budget` (rapnet.codec.budget.request_budget), bytes and field count are checked before protobuf parses."""
    if budget is not None:
        budget.check(data)
    try:
        req = pb.InferRequest.FromString(data)
    except Exception as err:  # protobuf's DecodeError, or anything else a broken message provokes
        raise MalformedMessage(f"not a valid InferRequest message ({err.__class__.__name__})") from None
    return parse_request(req, contract, limits, **kwargs)


def parse_request(
    req: pb.InferRequest,
    contract: ModelContract,
    limits: DecodeLimits = DEFAULT_LIMITS,
    dictionaries: Mapping[int, zstandard.ZstdCompressionDict] | None = None,
    image_to_tensor: Callable[[np.ndarray], Any] | None = None,
    numpy: bool = False,
) -> ParsedRequest:
    """Check and decode a request into the carry cloud_part needs; CodecError on anything wrong. The carry holds
    torch tensors, or with `numpy` numpy arrays of the same values (for a runtime without torch). The image
    payload goes through `image_to_tensor` (default: rapnet.preprocess's, pixels_to_tensor or pixels_to_array)."""
    start = time.perf_counter()
    if image_to_tensor is None:
        image_to_tensor = pixels_to_array if numpy else pixels_to_tensor
    if req.model_identity != contract.identity:
        raise ContractMismatch(
            f"request was made for model {req.model_identity[:12] or '(none)'}, this worker holds "
            f"{contract.identity[:12]}: deploy the same checkpoint on edge and cloud"
        )
    contract.check_route(req.split_point, req.target_exit)
    exit_price = req.cloud_exit.price if req.HasField("cloud_exit") else None
    if exit_price is not None:
        contract.check_cloud_exit(req.split_point, exit_price)
    contract.check_stop_confidence(req.stop_confidence)
    if len(req.request_id) > limits.max_request_id_chars:
        raise LimitExceeded(f"request_id of {len(req.request_id)} characters, at most {limits.max_request_id_chars}")
    expected = contract.carry_shapes[req.split_point]
    if len(req.tensors) > limits.max_tensors:  # before anything walks them
        raise LimitExceeded(f"{len(req.tensors)} tensors, at most {limits.max_tensors} accepted")
    names = [t.name for t in req.tensors]
    has_image = req.HasField("image")
    if has_image:
        names.append(IMAGE_KEY)
    if len(set(names)) != len(names):
        raise MalformedMessage(f"duplicate carry entries in {clip(sorted(names), 256)}")
    if set(names) != set(expected):
        raise MalformedMessage(
            f"split point {req.split_point} needs carry {sorted(expected)}, the request holds {clip(sorted(names), 256)}"
        )
    # Declared sizes first (no allocation), then decode.
    total, batch = 0, None
    for t in req.tensors:
        shape, nbytes = check_tensor_header(t, limits)
        total += nbytes
        if batch is None:
            batch = shape[0]
        elif shape[0] != batch:
            raise MalformedMessage(f"tensors disagree on the batch size ({batch} vs {shape[0]})")
        if shape[1:] != tuple(expected[t.name]) or shape[0] > limits.max_batch:
            raise MalformedMessage(
                f"tensor {clip(t.name)}: shape {shape}, the model expects (N<={limits.max_batch}, "
                f"{', '.join(map(str, expected[t.name]))}) at split {req.split_point}"
            )
    if has_image:
        if batch not in (None, 1):
            raise MalformedMessage("an image payload carries one image: batch size must be 1")
        total += req.image.width * req.image.height * req.image.channels * 5  # pixels + float32 tensor
    if total > limits.max_total_bytes:
        raise LimitExceeded(f"request decodes to {total} bytes, at most {limits.max_total_bytes} accepted")
    carry = {
        t.name: decode_array(t, limits, (t.shape[0], *expected[t.name]), dictionaries) for t in req.tensors
    }
    if not numpy and carry:
        import torch

        carry = {name: torch.from_numpy(array) for name, array in carry.items()}
    if has_image:
        c, h, w = expected[IMAGE_KEY]
        pixels = decode_image(req.image, limits, (h, w, c))
        carry[IMAGE_KEY] = image_to_tensor(pixels)
    return ParsedRequest(
        request_id=req.request_id,
        split=req.split_point,
        exit=req.target_exit,
        carry=carry,
        deadline_ms=req.deadline_ms,
        client_sent_unix_ns=req.client_sent_unix_ns,
        decode_ms=(time.perf_counter() - start) * 1e3,
        exit_price=exit_price,
        stop_confidence=req.stop_confidence,
    )


def build_response(
    request_id: str,
    logits: np.ndarray | torch.Tensor,
    exit_used: int,
    contract: ModelContract,
    split: int,
    queue_ms: float = 0.0,
    compute_ms: float = 0.0,
    decode_ms: float = 0.0,
    top_k: int = 5,
) -> pb.InferResponse:
    """The answer for one sample's logits (shape (num_classes,) or (1, num_classes)).

    numpy, not torch: for ten numbers torch's per-op dispatch costs several times the arithmetic, and the
    front builds one of these per request (docs/cloud.md).
    """
    if hasattr(logits, "detach"):  # a torch tensor
        logits = logits.detach().float().cpu().numpy()
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    k = min(top_k, probs.size)
    classes = np.argsort(-probs, kind="stable")[:k].tolist()  # stable: ties go to the lower class, like argmax
    return pb.InferResponse(
        request_id=request_id,
        class_index=classes[0],
        top_k=[pb.TopK(class_index=c, score=float(probs[c])) for c in classes],
        exit_used=exit_used,
        timings=pb.ServerTimings(queue_ms=queue_ms, compute_ms=compute_ms, decode_ms=decode_ms),
        model_identity=contract.identity,
        split_point=split,
    )
