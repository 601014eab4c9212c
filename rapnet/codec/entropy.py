"""zstd for the wire: compression, bounded decompression (no zstd bomb allocates) and feature dictionaries."""
from __future__ import annotations

import threading

import zstandard

from .limits import MalformedMessage

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
