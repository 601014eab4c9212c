"""Images on the wire (where the cloud needs the full-resolution input): PNG, JPEG or raw uint8 + zstd.

Decoding checks the declared and the embedded (PNG IHDR / JPEG SOF) dimensions against the limits and the
model's expected input before OpenCV allocates anything.
"""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import cv2
import numpy as np
import zstandard

from protos.rapnet.v1 import inference_pb2 as pb

from ..preprocess import MEAN as PREPROCESS_MEAN
from ..preprocess import STD as PREPROCESS_STD
from ..preprocess import to_model_array, to_model_input
from .entropy import zstd_compress, zstd_decompress_bounded
from .limits import DEFAULT_LIMITS, IMAGE_FORMATS, CodecError, DecodeLimits, LimitExceeded, MalformedMessage, enum_name

if TYPE_CHECKING:  # torch only for the torch twins below: the edge on ONNX Runtime has none
    import torch

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def pixels_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 HWC RGB pixels -> the model's input (1, C, H, W), via rapnet.preprocess (the one place for it).

    The cloud rebuilds the carry entry "image" from an image payload with this function; parse_request takes
    another one (`image_to_tensor`) for models trained with a different input convention.
    """
    return to_model_input(np.ascontiguousarray(pixels, dtype=np.uint8))


def pixels_to_array(pixels: np.ndarray) -> np.ndarray:
    """pixels_to_tensor's numpy twin (rapnet.preprocess.to_model_array): the same values, no torch."""
    return to_model_array(np.ascontiguousarray(pixels, dtype=np.uint8))


def tensor_to_pixels(image: torch.Tensor) -> np.ndarray:
    """Inverse of pixels_to_tensor for one (1, C, H, W) or (C, H, W) model input."""
    import torch

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
        raise MalformedMessage(f"image: format {enum_name(pb.ImageFormat, msg.format)} is not accepted")
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
