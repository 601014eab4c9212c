"""The wire codec: tensors, images and whole requests, encoded by the edge and decoded by the cloud.

One module used by both sides, so the two can never disagree on a format. Wire format: protos/rapnet/v1/
inference.proto; description and measured sizes: docs/wire.md.

Tensor encodings (the carry that crosses the network at a split point):
  * fp32   lossless, 4 bytes per element;
  * fp16   2 bytes per element, relative error <= 2**-11 for normal values;
  * int8   affine per-channel quantisation, value = (q - zero_point[c]) * scale[c], q in 0..255, error <= scale/2;
  * int4   the same with q in 0..15, two values per byte (first in the low nibble), error <= scale/2;
each optionally followed by zstd (configurable level, optional dictionary trained on features). Quantisation
parameters travel as repeated float32 or, with params="f16", compactly (float16 scales rounded up + uint8
zero points, 3 bytes per channel). `recommended_encoding(split)` gives the measured default per split point.
Images (where the cloud needs the full-resolution input): PNG, JPEG (quality configurable) or raw uint8 + zstd.

Decoding is bounded and strict. Everything a message declares (enums, shape, sizes, quantisation parameters,
image header) is checked against `DecodeLimits` and the model's expected carry *before* any buffer is
allocated; zstd output is capped at the declared raw size (a frame that declares or produces more fails
without allocating it); decoded values must be finite. Every refusal is a `CodecError` whose `status` is the
gRPC status code the server should answer with: INVALID_ARGUMENT for a malformed request,
FAILED_PRECONDITION when the request was made for another model (identity, split point or exit).
"""
from __future__ import annotations

import math
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Mapping

import cv2
import grpc
import numpy as np
import torch
import zstandard

from protos.rapnet.v1 import inference_pb2 as pb

from .preprocess import MEAN as PREPROCESS_MEAN
from .preprocess import STD as PREPROCESS_STD
from .preprocess import to_model_input

# --------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------
# Names and limits
# --------------------------------------------------------------------------------------------------------

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
_QMAX = {pb.ENCODING_INT8: 255, pb.ENCODING_INT4: 15}
IMAGE_KEY = "image"  # the carry entry an ImagePayload stands for
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class DecodeLimits:
    """What a decoder accepts. Checked against what a message declares, before anything is allocated."""

    max_elements: int = 1 << 20  # per tensor
    max_total_bytes: int = 16 << 20  # decoded float32 tensors + decoded image pixels, per request
    max_dims: int = 4
    max_tensors: int = 8
    max_batch: int = 64
    max_image_pixels: int = 1 << 20  # width * height
    allowed_dtypes: frozenset[int] = frozenset({pb.DTYPE_FLOAT32})
    allowed_encodings: frozenset[int] = frozenset(ENCODINGS.values())
    allowed_codecs: frozenset[int] = frozenset({pb.CODEC_NONE, pb.CODEC_ZSTD})
    allowed_image_formats: frozenset[int] = frozenset(IMAGE_FORMATS.values())


DEFAULT_LIMITS = DecodeLimits()


def _enum_name(enum, value: int) -> str:
    try:
        return enum.Name(value)
    except ValueError:
        return f"unknown value {value}"


def _encoding_value(encoding: str | int) -> int:
    if isinstance(encoding, str):
        if encoding.lower() not in ENCODINGS:
            raise ValueError(f"unknown encoding {encoding!r}: choose one of {sorted(ENCODINGS)}")
        return ENCODINGS[encoding.lower()]
    if encoding not in ENCODINGS.values():
        raise ValueError(f"unknown encoding {encoding!r}")
    return int(encoding)


# --------------------------------------------------------------------------------------------------------
# zstd (bounded)
# --------------------------------------------------------------------------------------------------------

_local = threading.local()  # zstd contexts are not thread-safe: one cache per thread


def _compressor(level: int, dictionary: zstandard.ZstdCompressionDict | None) -> zstandard.ZstdCompressor:
    cache = _local.__dict__.setdefault("cctx", {})
    key = (level, id(dictionary) if dictionary is not None else 0)
    cctx = cache.get(key)
    if cctx is None:
        cctx = zstandard.ZstdCompressor(level=level, dict_data=dictionary, write_content_size=True, write_checksum=False)
        cache[key] = (cctx, dictionary)  # keep the dictionary alive while its id is a key
        return cctx
    return cctx[0]


def _decompressor(dictionary: zstandard.ZstdCompressionDict | None) -> zstandard.ZstdDecompressor:
    cache = _local.__dict__.setdefault("dctx", {})
    key = id(dictionary) if dictionary is not None else 0
    entry = cache.get(key)
    if entry is None:
        # The window can never need more than the (capped) output; 1 << 24 also bounds frames of unknown size.
        entry = (zstandard.ZstdDecompressor(dict_data=dictionary, max_window_size=1 << 24), dictionary)
        cache[key] = entry
    return entry[0]


def zstd_compress(data: bytes, level: int = 3, dictionary: zstandard.ZstdCompressionDict | None = None) -> bytes:
    return _compressor(level, dictionary).compress(data)


def zstd_decompress_bounded(
    data: bytes, raw_size: int, dictionary: zstandard.ZstdCompressionDict | None = None, what: str = "payload"
) -> bytes:
    """Decompress one zstd frame whose output must be exactly `raw_size` bytes.

    The frame header must declare its content size, equal to `raw_size`, before anything is allocated
    (zstandard's one-shot decompress allocates whatever the header declares); output beyond it, a second
    frame or trailing bytes are refused.
    """
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as err:
        raise MalformedMessage(f"{what}: not a zstd frame ({err})") from None
    if declared < 0 or declared == zstandard.CONTENTSIZE_UNKNOWN:
        raise MalformedMessage(f"{what}: zstd frame does not declare its content size (required, must be {raw_size})")
    if declared != raw_size:
        raise MalformedMessage(f"{what}: zstd frame declares {declared} bytes, the message declares {raw_size}")
    if raw_size == 0:
        raise MalformedMessage(f"{what}: empty payload")
    try:
        out = _decompressor(dictionary).decompress(data, max_output_size=raw_size, allow_extra_data=False)
    except zstandard.ZstdError as err:
        raise MalformedMessage(f"{what}: corrupt zstd frame ({err})") from None
    if len(out) != raw_size:
        raise MalformedMessage(f"{what}: zstd frame decoded to {len(out)} bytes, expected {raw_size}")
    return out


def train_dictionary(samples: list[bytes], dict_size: int = 4096, level: int = 3) -> zstandard.ZstdCompressionDict:
    """A zstd dictionary trained on encoded feature payloads (both sides must hold the same one)."""
    return zstandard.train_dictionary(dict_size, samples, level=level)


# --------------------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------------------


def _raw_size(encoding: int, numel: int) -> int:
    if encoding == pb.ENCODING_FP32:
        return numel * 4
    if encoding == pb.ENCODING_FP16:
        return numel * 2
    if encoding == pb.ENCODING_INT8:
        return numel
    return (numel + 1) // 2  # INT4


_F16_MAX = float(np.finfo(np.float16).max)


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
    x = tensor.detach().cpu().numpy() if isinstance(tensor, torch.Tensor) else np.asarray(tensor)
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
    what = f"tensor {msg.name!r}"
    if msg.dtype not in limits.allowed_dtypes:
        raise MalformedMessage(f"{what}: dtype {_enum_name(pb.DType, msg.dtype)} is not accepted")
    if msg.encoding not in limits.allowed_encodings:
        raise MalformedMessage(f"{what}: encoding {_enum_name(pb.Encoding, msg.encoding)} is not accepted")
    if msg.codec not in limits.allowed_codecs:
        raise MalformedMessage(f"{what}: codec {_enum_name(pb.Codec, msg.codec)} is not accepted")
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
    """Decode a wire Tensor into a float32 torch tensor, or raise a CodecError (never anything else)."""
    try:
        return _decode_tensor(msg, limits, expected_shape, dictionaries)
    except CodecError:
        raise
    except (ValueError, TypeError, OverflowError, MemoryError, zstandard.ZstdError) as err:  # defensive
        raise MalformedMessage(f"tensor {getattr(msg, 'name', '?')!r}: undecodable ({err.__class__.__name__}: {err})") from None


def _decode_tensor(msg, limits, expected_shape, dictionaries) -> torch.Tensor:
    shape, _ = check_tensor_header(msg, limits)
    what = f"tensor {msg.name!r}"
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
    if not np.isfinite(x).all():
        raise MalformedMessage(f"{what}: decoded values include NaN or Inf")
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


# --------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------


def pixels_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 HWC RGB pixels -> the model's input (1, C, H, W), via rapnet.preprocess (the one place for it).

    The cloud rebuilds the carry entry "image" from an image payload with this function; parse_request takes
    another one (`image_to_tensor`) for models trained with a different input convention.
    """
    return to_model_input(np.ascontiguousarray(pixels, dtype=np.uint8))


def tensor_to_pixels(image: torch.Tensor) -> np.ndarray:
    """Inverse of pixels_to_tensor for one (1, C, H, W) or (C, H, W) model input."""
    x = image.detach().cpu()
    if x.dim() == 4:
        if x.shape[0] != 1:
            raise ValueError("one image at a time")
        x = x[0]
    x = (x * PREPROCESS_STD + PREPROCESS_MEAN) * 255.0
    return np.ascontiguousarray(x.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def encode_image(pixels: np.ndarray, fmt: str | int = "png", jpeg_quality: int = 90, zstd_level: int = 3,
                 png_compression: int = 9) -> pb.ImagePayload:
    """uint8 HWC RGB pixels -> ImagePayload (PNG, JPEG at `jpeg_quality`, or raw + zstd)."""
    pixels = np.ascontiguousarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] not in (1, 3):
        raise ValueError(f"expected uint8 HWC pixels with 1 or 3 channels, got {pixels.dtype} {pixels.shape}")
    fmt_value = IMAGE_FORMATS[fmt.lower()] if isinstance(fmt, str) else int(fmt)
    h, w, c = pixels.shape
    msg = pb.ImagePayload(format=fmt_value, width=w, height=h, channels=c)
    if fmt_value == pb.IMAGE_FORMAT_RAW_ZSTD:
        msg.data = zstd_compress(pixels.tobytes(), zstd_level)
        return msg
    bgr = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR) if c == 3 else pixels
    if fmt_value == pb.IMAGE_FORMAT_PNG:
        ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, int(png_compression)])
    elif fmt_value == pb.IMAGE_FORMAT_JPEG:
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
    else:
        raise ValueError(f"unknown image format {fmt!r}: choose one of {sorted(IMAGE_FORMATS)}")
    if not ok:
        raise ValueError("OpenCV failed to encode the image")
    msg.data = buf.tobytes()
    return msg


def _png_size(data: bytes) -> tuple[int, int]:
    if len(data) < 24 or data[:8] != _PNG_MAGIC or data[12:16] != b"IHDR":
        raise MalformedMessage("image: not a PNG (bad signature or IHDR)")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the first SOF segment, walking markers without decoding anything."""
    if len(data) < 4 or data[:2] != b"\xff\xd8":
        raise MalformedMessage("image: not a JPEG (no SOI marker)")
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise MalformedMessage("image: corrupt JPEG marker stream")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01,) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):
            break
        length = struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        if length < 2:
            raise MalformedMessage("image: corrupt JPEG segment length")
        if marker in _SOF_MARKERS:
            if pos + 9 > len(data):
                break
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return width, height
        pos += 2 + length
    raise MalformedMessage("image: JPEG without a frame header before the scan")


def decode_image(msg: pb.ImagePayload, limits: DecodeLimits = DEFAULT_LIMITS,
                 expected_hwc: tuple[int, int, int] | None = None) -> np.ndarray:
    """ImagePayload -> uint8 HWC RGB pixels, or a CodecError (never anything else).

    Declared and embedded (PNG IHDR / JPEG SOF) dimensions are checked against the limits and the model's
    expected input before OpenCV allocates anything.
    """
    try:
        return _decode_image(msg, limits, expected_hwc)
    except CodecError:
        raise
    except (ValueError, TypeError, OverflowError, MemoryError, struct.error, cv2.error, zstandard.ZstdError) as err:
        raise MalformedMessage(f"image: undecodable ({err.__class__.__name__}: {err})") from None


def _decode_image(msg, limits, expected_hwc) -> np.ndarray:
    if msg.format not in limits.allowed_image_formats:
        raise MalformedMessage(f"image: format {_enum_name(pb.ImageFormat, msg.format)} is not accepted")
    w, h, c = msg.width, msg.height, msg.channels
    if c not in (1, 3) or w < 1 or h < 1:
        raise MalformedMessage(f"image: bad dimensions {w}x{h}x{c}")
    if w * h > limits.max_image_pixels or w * h * c > limits.max_total_bytes:
        raise LimitExceeded(f"image: {w}x{h} exceeds {limits.max_image_pixels} pixels")
    if expected_hwc is not None and (h, w, c) != tuple(expected_hwc):
        raise MalformedMessage(f"image: {h}x{w}x{c} (HxWxC), the model expects {tuple(expected_hwc)}")
    data = bytes(msg.data)
    if msg.format == pb.IMAGE_FORMAT_RAW_ZSTD:
        raw = zstd_decompress_bounded(data, w * h * c, None, "image")
        return np.frombuffer(raw, dtype=np.uint8).reshape(h, w, c).copy()
    embedded = _png_size(data) if msg.format == pb.IMAGE_FORMAT_PNG else _jpeg_size(data)
    if embedded != (w, h):
        raise MalformedMessage(f"image: payload is {embedded[0]}x{embedded[1]}, the message declares {w}x{h}")
    flag = cv2.IMREAD_COLOR if c == 3 else cv2.IMREAD_GRAYSCALE
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flag)
    if img is None:
        raise MalformedMessage("image: OpenCV could not decode the payload")
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape != (h, w, c) or img.dtype != np.uint8:
        raise MalformedMessage(f"image: decoded to {img.shape} {img.dtype}, declared {(h, w, c)} uint8")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if c == 3 else img


# --------------------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------------------


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
        from .checkpoint import model_identity
        from .costs import measure_costs

        costs = measure_costs(model)
        shapes = tuple(dict(zip(keys, shp)) for keys, shp in zip(costs.split_keys, costs.split_shapes))
        return cls(identity or model_identity(model), model.num_stages, tuple(model.exit_stages), shapes,
                   model.predictor is not None)

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
    carry: dict[str, torch.Tensor]
    policy: pb.Policy
    deadline_ms: int
    client_sent_unix_ns: int
    decode_ms: float = 0.0
    exit_price: float | None = None  # set: the cloud picks the exit (priced rule, exits <= `exit`)
    stop_confidence: float = 0.0  # > 0: capped rule, stop at the first exit this confident (exits <= `exit`)


@dataclass(frozen=True)
class EncodeOptions:
    """How the edge encodes a request (one place for the knobs the benchmark sweeps)."""

    encoding: str = "int8"
    zstd_level: int | None = 3
    per_channel: bool = True
    params: str = "f32"  # quantisation parameters: "f32" (repeated float) or "f16" (scale_f16 + zero_point_u8)
    dictionary: zstandard.ZstdCompressionDict | None = field(default=None, compare=False)
    image_format: str = "png"
    jpeg_quality: int = 90


# Measured defaults per split point for models/rapnet-cifar10.pt (identity 81dbf1bd6e4c..., whose backbone the
# refitted 61212a4a233d... shares bit for bit), from
# benchmarks/results/codec.json ("recommended"): the smallest request, without shared state such as a zstd
# dictionary, whose CIFAR-10 test accuracy (2000 images, final exit) is within 0.3 points of fp32 features.
# docs/wire.md has the table and the caveats (2000 images: +-0.3-0.5 points 95% interval on int4/tensor rows;
# the JPEG q75 baseline is flattered by the dataset being a JPEG q75 export). tests/test_codec.py checks this
# table against the benchmark's JSON.
RECOMMENDED_ENCODINGS: dict[int, EncodeOptions] = {
    0: EncodeOptions(image_format="jpeg", jpeg_quality=75),  # cloud-only: 1047 B, -0.05 pts
    1: EncodeOptions("int4", 3, per_channel=False, params="f16"),  # PNG image + int4 lr: 4628 B, -0.20 pts
    2: EncodeOptions("int4", 3, per_channel=False, params="f16"),  # 3255 B, +0.20 pts
    3: EncodeOptions("int8", 3, params="f16", image_format="jpeg", jpeg_quality=90),  # 2437 B, -0.05 pts
    4: EncodeOptions("int4", 3, per_channel=False, params="f16"),  # 2228 B (0.93x PNG), -0.05 pts
    5: EncodeOptions("int4", 3, per_channel=False, params="f16"),  # 1029 B (0.43x PNG), -0.15 pts
}
# For split points outside the table (another model): int8 per channel, compact parameters, zstd 3. At most
# 0.05 points from fp32 at every split of the shipped model (<= 3 of 2000 predictions changed).
SAFE_ENCODING = EncodeOptions("int8", 3, params="f16")


def recommended_encoding(split: int) -> EncodeOptions:
    """The measured default EncodeOptions for a split point (see RECOMMENDED_ENCODINGS); SAFE_ENCODING for
    split points the benchmark did not measure."""
    if split < 0:
        raise ValueError(f"split point {split} is negative")
    return RECOMMENDED_ENCODINGS.get(split, SAFE_ENCODING)


def build_request(
    contract: ModelContract,
    carry: Mapping[str, torch.Tensor],
    split: int,
    exit_index: int,
    options: EncodeOptions = EncodeOptions(),
    *,
    image: np.ndarray | None = None,
    request_id: str | None = None,
    policy: pb.Policy | None = None,
    deadline_ms: int = 0,
    edge_compute_ms: float = 0.0,
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
        edge_compute_ms=edge_compute_ms,
        stop_confidence=stop_confidence,
    )
    if policy is not None:
        req.policy.CopyFrom(policy)
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


def parse_request_bytes(data: bytes, contract: ModelContract, limits: DecodeLimits = DEFAULT_LIMITS, **kwargs) -> ParsedRequest:
    """Deserialize and parse a request from its wire bytes (protobuf errors become MalformedMessage)."""
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
    image_to_tensor: Callable[[np.ndarray], torch.Tensor] = pixels_to_tensor,
) -> ParsedRequest:
    """Check and decode a request into the carry cloud_part needs; CodecError on anything wrong."""
    start = time.perf_counter()
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
    expected = contract.carry_shapes[req.split_point]
    names = [t.name for t in req.tensors]
    if len(names) > limits.max_tensors:
        raise LimitExceeded(f"{len(names)} tensors, at most {limits.max_tensors} accepted")
    has_image = req.HasField("image")
    if has_image:
        names.append(IMAGE_KEY)
    if len(set(names)) != len(names):
        raise MalformedMessage(f"duplicate carry entries in {sorted(names)}")
    if set(names) != set(expected):
        raise MalformedMessage(
            f"split point {req.split_point} needs carry {sorted(expected)}, the request holds {sorted(names)}"
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
                f"tensor {t.name!r}: shape {shape}, the model expects (N<={limits.max_batch}, "
                f"{', '.join(map(str, expected[t.name]))}) at split {req.split_point}"
            )
    if has_image:
        if batch not in (None, 1):
            raise MalformedMessage("an image payload carries one image: batch size must be 1")
        total += req.image.width * req.image.height * req.image.channels * 5  # pixels + float32 tensor
    if total > limits.max_total_bytes:
        raise LimitExceeded(f"request decodes to {total} bytes, at most {limits.max_total_bytes} accepted")
    carry = {
        t.name: decode_tensor(t, limits, (t.shape[0], *expected[t.name]), dictionaries) for t in req.tensors
    }
    if has_image:
        c, h, w = expected[IMAGE_KEY]
        pixels = decode_image(req.image, limits, (h, w, c))
        carry[IMAGE_KEY] = image_to_tensor(pixels)
    return ParsedRequest(
        request_id=req.request_id,
        split=req.split_point,
        exit=req.target_exit,
        carry=carry,
        policy=req.policy,
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
    if isinstance(logits, torch.Tensor):
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
