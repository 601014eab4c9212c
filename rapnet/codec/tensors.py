"""Tensors on the wire: float32 feature maps as fp32, fp16, or int8/int4 with affine per-channel quantisation.

  * fp32   lossless, 4 bytes per element;
  * fp16   2 bytes per element, relative error <= 2**-11 for normal values;
  * int8   affine per-channel quantisation, value = (q - zero_point[c]) * scale[c], q in 0..255, error <= scale/2;
  * int4   the same with q in 0..15, two values per byte (first in the low nibble), error <= scale/2;
each optionally followed by zstd (configurable level, optional dictionary trained on features). Quantisation
parameters travel as repeated float32 or, with params="f16", compactly (float16 scales rounded up + uint8
zero points, 3 bytes per channel). Decoding checks everything the header declares before allocating.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Mapping

import numpy as np
import zstandard

from protos.rapnet.v1 import inference_pb2 as pb

from .entropy import zstd_compress, zstd_decompress_bounded
from .limits import DEFAULT_LIMITS, ENCODINGS, CodecError, DecodeLimits, LimitExceeded, MalformedMessage, clip, enum_name

if TYPE_CHECKING:  # torch only where a caller hands in or asks for torch tensors: the edge on ONNX Runtime has none
    import torch

_QMAX = {pb.ENCODING_INT8: 255, pb.ENCODING_INT4: 15}


def _encoding_value(encoding: str | int) -> int:
    if isinstance(encoding, str):
        if encoding.lower() not in ENCODINGS:
            raise ValueError(f"unknown encoding {encoding!r}: choose one of {sorted(ENCODINGS)}")
        return ENCODINGS[encoding.lower()]
    if encoding not in ENCODINGS.values():
        raise ValueError(f"unknown encoding {encoding!r}")
    return int(encoding)


def _raw_size(encoding: int, numel: int) -> int:
    if encoding == pb.ENCODING_FP32:
        return numel * 4
    if encoding == pb.ENCODING_FP16:
        return numel * 2
    if encoding == pb.ENCODING_INT8:
        return numel
    return (numel + 1) // 2  # INT4


def _round_up_f16(scale: np.ndarray) -> np.ndarray:
    """float32 scales -> the nearest float16 values >= them (as float32), so the covered range never shrinks."""
    s16 = scale.astype(np.float16)
    low = s16.astype(np.float32) < scale
    s16[low] = np.nextafter(s16[low], np.float16(np.inf))
    return s16.astype(np.float32)


def quantization_params(x: np.ndarray, axis: int, qmax: int, half: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel affine parameters covering [min(x, 0), max(x, 0)], zero exactly representable.

    half=True: scales rounded up to float16 values (sent as scale_f16); the caller checks they are finite.
    """
    c = x.shape[axis]
    flat = np.moveaxis(x, axis, 0).reshape(c, -1)
    lo = np.minimum(flat.min(axis=1), 0.0).astype(np.float64)
    hi = np.maximum(flat.max(axis=1), 0.0).astype(np.float64)
    # Slightly widened so that float32 rounding of the scale never pushes the range past 0..qmax.
    scale = ((hi - lo) / qmax * (1 + 2.0**-20)).astype(np.float32)
    scale[scale <= np.finfo(np.float32).tiny] = 1.0  # all-zero channel (or subnormal range)
    if half:
        with np.errstate(over="ignore"):
            scale = _round_up_f16(scale)  # > 65504 becomes Inf: the caller falls back to float32 parameters
    zero_point = np.clip(np.rint(-lo / scale.astype(np.float64)), 0, qmax).astype(np.float32)
    return scale, zero_point


def _bshape(ndim: int, axis: int) -> tuple[int, ...]:
    return tuple(-1 if i == axis else 1 for i in range(ndim))


def encode_tensor(
    tensor: torch.Tensor | np.ndarray,
    encoding: str | int = "fp32",
    zstd_level: int | None = 3,
    dictionary: zstandard.ZstdCompressionDict | None = None,
    name: str = "",
    per_channel: bool = True,
    params: str = "f32",
) -> pb.Tensor:
    """Encode one float tensor into a wire `Tensor` (zstd_level=None: no entropy coding).

    Quantised encodings are per channel along axis 1 (NCHW; axis 0 for a 1-d tensor), or with
    per_channel=False one scale and zero point for the whole tensor (saves 8 bytes per channel of header,
    which matters for small maps: 160 channels x 4x4 carries 1280 bytes of int4 data and 1280 of parameters).
    params="f16" sends the quantisation parameters compactly (scale_f16 + zero_point_u8: 3 bytes per channel
    instead of 8 + tags); scales are rounded up to float16 before quantising, so the error bound (half a step
    of the scale on the wire) holds. A tensor whose scales exceed the float16 range falls back to float32
    parameters.
    Raises ValueError for inputs no encoding can carry (non-finite values, fp16 overflow).
    """
    enc = _encoding_value(encoding)
    if params not in ("f32", "f16"):
        raise ValueError(f"unknown quantisation parameter format {params!r}: choose 'f32' or 'f16'")
    x = tensor.detach().cpu().numpy() if hasattr(tensor, "detach") else np.asarray(tensor)  # torch or numpy
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 0 or x.size == 0:
        raise ValueError(f"cannot encode a tensor of shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"tensor {name!r} holds NaN or Inf: refusing to send it")
    msg = pb.Tensor(name=name, dtype=pb.DTYPE_FLOAT32, shape=x.shape, encoding=enc)
    if enc == pb.ENCODING_FP32:
        raw = x.astype("<f4", copy=False).tobytes()
    elif enc == pb.ENCODING_FP16:
        if np.abs(x).max() > np.finfo(np.float16).max:
            raise ValueError(f"tensor {name!r} exceeds the float16 range (|x| > 65504): use fp32 or int8")
        raw = x.astype("<f2").tobytes()
    else:
        qmax = _QMAX[enc]
        axis = 1 if x.ndim >= 2 else 0
        flat, fa = (x, axis) if per_channel else (x.reshape(1, -1), 0)
        half = params == "f16"
        scale, zero_point = quantization_params(flat, fa, qmax, half)
        if half and not np.isfinite(scale).all():
            half = False
            scale, zero_point = quantization_params(flat, fa, qmax)
        bs = _bshape(x.ndim, axis) if per_channel else (1,) * x.ndim
        q = np.clip(np.rint(x / scale.reshape(bs) + zero_point.reshape(bs)), 0, qmax).astype(np.uint8).reshape(-1)
        if enc == pb.ENCODING_INT4:
            if q.size % 2:
                q = np.append(q, np.uint8(0))
            q = q[0::2] | (q[1::2] << 4)
        raw = q.tobytes()
        if half:
            msg.scale_f16 = scale.astype("<f2").tobytes()
            msg.zero_point_u8 = zero_point.astype(np.uint8).tobytes()
        else:
            msg.scale.extend(scale.tolist())
            msg.zero_point.extend(zero_point.tolist())
        msg.quant_axis = axis
    msg.raw_size = len(raw)
    if zstd_level is None:
        msg.codec = pb.CODEC_NONE
        msg.data = raw
    else:
        msg.codec = pb.CODEC_ZSTD
        msg.data = zstd_compress(raw, zstd_level, dictionary)
        if dictionary is not None:
            msg.zstd_dict_id = dictionary.dict_id()
    return msg


def check_tensor_header(msg: pb.Tensor, limits: DecodeLimits = DEFAULT_LIMITS) -> tuple[tuple[int, ...], int]:
    """Validate everything a Tensor declares, allocating nothing. Returns (shape, decoded float32 bytes)."""
    what = f"tensor {clip(msg.name)}"
    if msg.dtype not in limits.allowed_dtypes:
        raise MalformedMessage(f"{what}: dtype {enum_name(pb.DType, msg.dtype)} is not accepted")
    if msg.encoding not in limits.allowed_encodings:
        raise MalformedMessage(f"{what}: encoding {enum_name(pb.Encoding, msg.encoding)} is not accepted")
    if msg.codec not in limits.allowed_codecs:
        raise MalformedMessage(f"{what}: codec {enum_name(pb.Codec, msg.codec)} is not accepted")
    shape = tuple(int(d) for d in msg.shape[: limits.max_dims + 1])
    if not 1 <= len(msg.shape) <= limits.max_dims:
        raise LimitExceeded(f"{what}: {len(msg.shape)} dimensions, accepted 1..{limits.max_dims}")
    numel = 1
    for d in shape:
        if d < 1:
            raise MalformedMessage(f"{what}: shape {shape} has a non-positive dimension")
        numel *= d
        if numel > limits.max_elements:
            raise LimitExceeded(f"{what}: shape {shape} exceeds {limits.max_elements} elements")
    expected_raw = _raw_size(msg.encoding, numel)
    if msg.raw_size != expected_raw:
        raise MalformedMessage(f"{what}: raw_size {msg.raw_size} does not match shape {shape} ({expected_raw} bytes)")
    if msg.codec == pb.CODEC_NONE and len(msg.data) != expected_raw:
        raise MalformedMessage(f"{what}: payload is {len(msg.data)} bytes, shape {shape} needs {expected_raw}")
    if msg.codec == pb.CODEC_NONE and msg.zstd_dict_id:
        raise MalformedMessage(f"{what}: zstd_dict_id set without zstd")
    if msg.encoding in _QMAX:
        axis = msg.quant_axis
        if not 0 <= axis < len(shape):
            raise MalformedMessage(f"{what}: quant_axis {axis} outside 0..{len(shape) - 1}")
        compact = bool(msg.scale_f16 or msg.zero_point_u8)
        if compact and (len(msg.scale) or len(msg.zero_point)):
            raise MalformedMessage(f"{what}: both float32 and compact (f16/u8) quantisation parameters")
        if compact:
            if len(msg.scale_f16) % 2:
                raise MalformedMessage(f"{what}: scale_f16 holds {len(msg.scale_f16)} bytes, not whole float16s")
            n, n_zp = len(msg.scale_f16) // 2, len(msg.zero_point_u8)
        else:
            n, n_zp = len(msg.scale), len(msg.zero_point)
        if n not in (1, shape[axis]) or n_zp != n:
            raise MalformedMessage(
                f"{what}: {n} scales and {n_zp} zero points for {shape[axis]} channels "
                "(need one per channel, or one of each for the whole tensor)"
            )
    elif len(msg.scale) or len(msg.zero_point) or msg.quant_axis or msg.scale_f16 or msg.zero_point_u8:
        raise MalformedMessage(f"{what}: quantisation parameters on an unquantised encoding")
    return shape, numel * 4


def decode_tensor(
    msg: pb.Tensor,
    limits: DecodeLimits = DEFAULT_LIMITS,
    expected_shape: tuple[int, ...] | None = None,
    dictionaries: Mapping[int, zstandard.ZstdCompressionDict] | None = None,
) -> torch.Tensor:
    """Decode a wire Tensor into a float32 torch tensor (decode_array's values, shared), or raise a CodecError."""
    import torch

    return torch.from_numpy(decode_array(msg, limits, expected_shape, dictionaries))


def decode_array(
    msg: pb.Tensor,
    limits: DecodeLimits = DEFAULT_LIMITS,
    expected_shape: tuple[int, ...] | None = None,
    dictionaries: Mapping[int, zstandard.ZstdCompressionDict] | None = None,
) -> np.ndarray:
    """Decode a wire Tensor into a float32 numpy array (C-contiguous, writable), or raise a CodecError (never
    anything else)."""
    try:
        return _decode_tensor(msg, limits, expected_shape, dictionaries)
    except CodecError:
        raise
    except (ValueError, TypeError, OverflowError, MemoryError, zstandard.ZstdError) as err:  # defensive
        raise MalformedMessage(f"tensor {clip(getattr(msg, 'name', '?'))}: undecodable ({err.__class__.__name__}: {err})") from None


def _decode_tensor(msg, limits, expected_shape, dictionaries) -> np.ndarray:
    shape, _ = check_tensor_header(msg, limits)
    what = f"tensor {clip(msg.name)}"
    if expected_shape is not None and shape != tuple(expected_shape):
        raise MalformedMessage(f"{what}: shape {shape}, the model expects {tuple(expected_shape)} here")
    enc = msg.encoding
    if enc in _QMAX:
        if msg.scale_f16:
            scale = np.frombuffer(msg.scale_f16, dtype="<f2").astype(np.float32)
            zero_point = np.frombuffer(msg.zero_point_u8, dtype=np.uint8).astype(np.float32)
        else:
            scale = np.asarray(msg.scale, dtype=np.float32)
            zero_point = np.asarray(msg.zero_point, dtype=np.float32)
        if not (np.isfinite(scale).all() and (scale > 0).all()):
            raise MalformedMessage(f"{what}: scales must be finite and positive")
        if not (np.isfinite(zero_point).all() and (zero_point >= 0).all() and (zero_point <= _QMAX[enc]).all()):
            raise MalformedMessage(f"{what}: zero points must lie in 0..{_QMAX[enc]}")
    if msg.codec == pb.CODEC_ZSTD:
        dictionary = None
        if msg.zstd_dict_id:
            dictionary = (dictionaries or {}).get(msg.zstd_dict_id)
            if dictionary is None:
                raise MalformedMessage(f"{what}: compressed with zstd dictionary {msg.zstd_dict_id}, which this side lacks")
        raw = zstd_decompress_bounded(msg.data, msg.raw_size, dictionary, what)
    else:
        raw = msg.data
    numel = math.prod(shape)
    if enc == pb.ENCODING_FP32:
        x = np.frombuffer(raw, dtype="<f4").astype(np.float32)  # copy: writable, native order
    elif enc == pb.ENCODING_FP16:
        x = np.frombuffer(raw, dtype="<f2").astype(np.float32)
    else:
        q = np.frombuffer(raw, dtype=np.uint8)
        if enc == pb.ENCODING_INT4:
            if numel % 2 and q[-1] >> 4:
                raise MalformedMessage(f"{what}: padding nibble of an odd-length int4 payload is not zero")
            q = np.stack((q & 0x0F, q >> 4), axis=1).reshape(-1)[:numel]
        axis = msg.quant_axis
        bs = _bshape(len(shape), axis) if scale.size > 1 else (1,) * len(shape)
        with np.errstate(over="ignore", invalid="ignore"):  # overflow becomes Inf, refused below
            x = (q.reshape(shape).astype(np.float32) - zero_point.reshape(bs)) * scale.reshape(bs)
    x = x.reshape(shape)
    peak = float(np.abs(x).max()) if x.size else 0.0  # NaN propagates, so one pass checks both
    if not peak <= limits.max_abs_value:
        if not np.isfinite(x).all():
            raise MalformedMessage(f"{what}: decoded values include NaN or Inf")
        raise LimitExceeded(f"{what}: a value of magnitude {peak:.3g} is beyond {limits.max_abs_value:g}, more than "
                            "any carry the edge produces (the float16 range)")
    return np.ascontiguousarray(x, dtype=np.float32)
