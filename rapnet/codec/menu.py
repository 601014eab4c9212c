"""The encoding menu: the named ways the edge may encode a request, for the edge, the planner and the simulator.

A menu entry is a name that `encode_options(name)` turns into the `EncodeOptions` build_request takes:
  * image encodings, at split 0 where the request carries the image itself (an ImagePayload): "png", "raw+zstd"
    (uint8 pixels + zstd: about 30% more bytes than PNG, about 4x cheaper to encode, for slow devices) and "jpeg"
    (quality 90);
  * feature encodings, at later splits, for the live feature tensors (the image, where a later stage still reads it,
    goes as PNG): "fp32+zstd", "fp16+zstd", "int8+zstd" (int8 per channel, float32 parameters).
PNG, raw pixels and fp32 are exactly lossless (LOSSLESS). fp16, int8 and JPEG can change answers, so the planner
admits them only where they pass its accuracy test (orchestration.model_traces.ModelTraces.menu).

Besides the menu, RECOMMENDED_ENCODINGS holds a default per split point with the finer knobs (int4, one scale per
tensor, compact parameters): the smallest encoding benchmarks/codec_bench.py found within its accuracy budget.

This module imports nothing heavy (no torch, OpenCV or zstandard), so command-line parsers can use it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import zstandard

IMAGE_ENCODINGS = ("png", "raw+zstd", "jpeg")
FEATURE_ENCODINGS = ("fp32+zstd", "fp16+zstd", "int8+zstd")
ENCODING_NAMES = IMAGE_ENCODINGS + FEATURE_ENCODINGS
LOSSLESS = ("png", "raw+zstd", "fp32+zstd")
# The menu the planner picks from unless told otherwise: every encoding (lossy ones still pass the accuracy test).
DEFAULT_ENCODINGS = ("png", "raw+zstd", "jpeg", "int8+zstd", "fp16+zstd", "fp32+zstd")


@dataclass(frozen=True)
class EncodeOptions:
    """How the edge encodes a request: every knob of the codec in one place."""

    encoding: str = "int8"  # feature tensors: "fp32", "fp16", "int8" or "int4"
    zstd_level: int | None = 3  # None: no entropy coding
    per_channel: bool = True  # quantised encodings: one scale per channel (False: one for the whole tensor)
    params: str = "f32"  # quantisation parameters: "f32" (repeated float) or "f16" (scale_f16 + zero_point_u8)
    dictionary: zstandard.ZstdCompressionDict | None = field(default=None, compare=False)
    image_format: str = "png"  # "png", "jpeg" or "raw_zstd"
    jpeg_quality: int = 90


_MENU: dict[str, EncodeOptions] = {
    "png": EncodeOptions(image_format="png"),
    "raw+zstd": EncodeOptions(image_format="raw_zstd"),
    "jpeg": EncodeOptions(image_format="jpeg", jpeg_quality=90),
    "fp32+zstd": EncodeOptions(encoding="fp32", zstd_level=3, image_format="png"),
    "fp16+zstd": EncodeOptions(encoding="fp16", zstd_level=3, image_format="png"),
    "int8+zstd": EncodeOptions(encoding="int8", zstd_level=3, image_format="png"),
}


def encode_options(name: str) -> EncodeOptions:
    """The EncodeOptions of a menu entry ("png", "int8+zstd", ...); ValueError for a name not on the menu."""
    try:
        return _MENU[name]
    except KeyError:
        raise ValueError(f"unknown encoding {name!r}: choose one of {', '.join(ENCODING_NAMES)}") from None


def encodings_for_split(split: int) -> tuple[str, ...]:
    """The menu entries that fit a split point: the image encodings at split 0, the feature encodings later."""
    return IMAGE_ENCODINGS if split == 0 else FEATURE_ENCODINGS


def parse_encodings(text: str) -> tuple[str, ...]:
    """A menu from a command line: "auto" (DEFAULT_ENCODINGS) or comma-separated names, duplicates dropped.

    Raises ValueError naming the valid choices for an empty list or an unknown name.
    """
    if text.strip() == "auto":
        return DEFAULT_ENCODINGS
    chosen = tuple(dict.fromkeys(e.strip() for e in text.split(",") if e.strip()))
    unknown = [e for e in chosen if e not in ENCODING_NAMES]
    if unknown or not chosen:
        what = f"unknown {', '.join(map(repr, unknown))}" if unknown else "no encoding given"
        raise ValueError(f"encodings {text!r}: {what}; choose auto or a comma-separated list of "
                         f"{', '.join(ENCODING_NAMES)}")
    return chosen


# Defaults per split point index: what benchmarks/codec_bench.py picked, the smallest request without shared state
# such as a zstd dictionary whose CIFAR-10 test accuracy at the final exit stayed within 0.3 points of fp32 features
# ("recommended" in benchmarks/results/codec.json, which records the checkpoint it measured, the bytes and the
# accuracy change). The table is not tied to a model: any model gets these options by split index (SAFE_ENCODING
# past the table's end), and every entry is a valid encoding for any of them; only the size/accuracy trade-off is
# specific to the measured checkpoint, so re-run the benchmark for the model you deploy. docs/wire.md
# has the table and its caveats (2000 images: a 95% interval of +-0.3-0.5 points on the int4 and JPEG rows; the JPEG
# baseline is flattered by the dataset being a JPEG q75 export). tests/test_codec.py checks this table against the
# benchmark's JSON.
RECOMMENDED_ENCODINGS: dict[int, EncodeOptions] = {
    0: EncodeOptions(image_format="jpeg", jpeg_quality=75),  # cloud-only: the image as JPEG q75
    1: EncodeOptions("int4", 3, per_channel=False, params="f16"),  # the image as PNG + int4 features
    2: EncodeOptions("int8", 3, params="f16", image_format="jpeg", jpeg_quality=90),  # int8 + the image as JPEG q90
    3: EncodeOptions("int8", 3, params="f16", image_format="jpeg", jpeg_quality=90),
    4: EncodeOptions("int4", 3, params="f16"),  # int4 per channel
    5: EncodeOptions("int4", 3, per_channel=False, params="f16"),
    6: EncodeOptions("int4", 3, per_channel=False, params="f16"),
}
# Past the table's end: int8 per channel, compact parameters, zstd 3; within 0.1 points of fp32 (at most 3 of 2000
# predictions changed) at every split the benchmark measured.
SAFE_ENCODING = EncodeOptions("int8", 3, params="f16")


def recommended_encoding(split: int) -> EncodeOptions:
    """The benchmark's EncodeOptions for a split point (RECOMMENDED_ENCODINGS), SAFE_ENCODING outside the table."""
    if split < 0:
        raise ValueError(f"split point {split} is negative")
    return RECOMMENDED_ENCODINGS.get(split, SAFE_ENCODING)
