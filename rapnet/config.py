"""Typed configuration of a model: everything that decides its architecture, in one place.

The config travels inside checkpoints and feeds the model identity hash, so edge and cloud agree on it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

ARCHES = ("mobilenetv2", "resnet")
KINDS = ("rapnet", "sdn", "static")
FUSION_STRIDES = (1, 2, 4)
# Stride layouts of the backbones (rapnet/backbones.py): "cifar" for 32-64 px inputs, "imagenet" (the standard
# MobileNetV2 and ResNet-18 schedules) for camera frames.
LAYOUTS = ("cifar", "imagenet")
# How much coarser the ImageNet layout's grids are than the CIFAR layout's from the end of the 24-channel stage
# (ResNet: layer 1) on: its stride-2 stem and stride-2 24-channel stage (ResNet: its stride-4 stem).
_LAYOUT_STRIDE = {"cifar": 1, "imagenet": 4}
# Bounds on the fields that size the network. A config arrives inside checkpoint files, so every field is checked
# before anything is built from it: far beyond any network here, well below what would take gigabytes to build.
MAX_IMAGE_SIZE = 1024  # px; camera models run at 128-320
MAX_NUM_CLASSES = 10_000
MAX_LOWRES_FACTOR = 16
MAX_CHANNELS = 4096  # ic_channels, and each predictor layer (times the width)
MAX_EXIT_FRACTIONS = 32
MAX_PREDICTOR_LAYERS = 8
# Fields a checkpoint may lack, with the value such a checkpoint implies. They are left out of the identity hash
# while they hold that value, so a checkpoint written without them keeps its identity.
LEGACY_VALUES = {"fusion_stride": 4, "layout": "cifar"}


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "mobilenetv2"  # base network: "mobilenetv2" (primary) or "resnet"
    kind: str = "rapnet"  # "rapnet" (ours), "sdn" (confidence exits, full res), "static" (no exits)
    width: float = 1.0  # channel width multiplier
    num_classes: int = 10
    image_size: int = 32
    lowres_factor: int = 2  # RAPNet's early stages (and its exit predictor) see the image downsampled by this factor
    # Where RAPNet's two paths meet, as the full-resolution backbone's total stride there: 2 fuses on the 16x16
    # grid of a CIFAR image (the low-res path runs through the 32-channel stage), 4 on the 8x8 grid (through the
    # 64-channel stage; checkpoints without the field use it: its last exit ends under the static network's).
    # 1 fuses on the full 32x32 grid (the low-res path runs through the 24-channel stage only).
    # In the ImageNet layout the value names the same stage (the same blocks on each path), whose grid there is 4x
    # coarser: see fusion_grid_stride.
    fusion_stride: int = 2
    # Exit placement (ours): cut points nearest these fractions of the full network's measured FLOPs.
    # RAPNet additionally always exits at the end of the low-resolution path and at the end of the network.
    rapnet_exit_fractions: tuple[float, ...] = (0.05, 0.1, 0.3, 0.5, 0.75)
    # SDN's own rule: ICs at fixed fractions of the backbone's cost (Kaya et al., 2019).
    sdn_exit_fractions: tuple[float, ...] = (0.15, 0.3, 0.45, 0.6, 0.75, 0.9)
    ic_channels: int = 128  # width of the internal-classifier heads
    predictor_channels: tuple[int, ...] = (24, 48, 96)  # exit predictor CNN on the low-res image, x width
    layout: str = "cifar"  # backbone stride layout: "cifar" (32-64 px inputs) or "imagenet" (camera frames)

    def __post_init__(self) -> None:
        if self.arch not in ARCHES:
            raise ValueError(f"unknown arch {self.arch!r}: choose one of {ARCHES}")
        if self.kind not in KINDS:
            raise ValueError(f"unknown model kind {self.kind!r}: choose one of {KINDS}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}: choose one of {LAYOUTS}")
        if self.fusion_stride not in FUSION_STRIDES:
            raise ValueError(f"fusion_stride {self.fusion_stride} is not one of {FUSION_STRIDES}")
        if isinstance(self.lowres_factor, bool) or not isinstance(self.lowres_factor, int) or self.lowres_factor < 2:
            raise ValueError(f"lowres_factor {self.lowres_factor!r} must be an integer >= 2 (the low-res path sees "
                             f"1/lowres_factor of the image's side)")
        multiple = self.lowres_factor * self.fusion_grid_stride
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size <= 0 \
                or self.image_size % multiple:
            raise ValueError(
                f"image_size {self.image_size!r} must be a positive multiple of {multiple} (lowres_factor "
                f"{self.lowres_factor} x the backbone's stride {self.fusion_grid_stride} where RAPNet's paths meet in "
                f"the {self.layout} layout with fusion_stride {self.fusion_stride}) so that low- and high-resolution "
                f"feature maps line up; e.g. 32, 64, 128, 160 or 224 with the defaults"
            )
        if isinstance(self.width, bool) or not isinstance(self.width, (int, float)) or not 0.1 <= self.width <= 4.0:
            raise ValueError(f"width multiplier {self.width!r} is outside 0.1..4.0")
        if self.image_size > MAX_IMAGE_SIZE:
            raise ValueError(f"image_size {self.image_size} is above {MAX_IMAGE_SIZE} px")
        if self.lowres_factor > MAX_LOWRES_FACTOR:
            raise ValueError(f"lowres_factor {self.lowres_factor} is above {MAX_LOWRES_FACTOR}")
        _check_count("num_classes", self.num_classes, 2, MAX_NUM_CLASSES)
        _check_count("ic_channels", self.ic_channels, 1, MAX_CHANNELS)
        layers = self.predictor_channels
        if not isinstance(layers, tuple) or not 1 <= len(layers) <= MAX_PREDICTOR_LAYERS:
            raise ValueError(f"predictor_channels must list 1..{MAX_PREDICTOR_LAYERS} layer widths, got {layers!r}")
        for channels in layers:
            _check_count("a predictor_channels entry", channels, 1, MAX_CHANNELS)
        for name in ("rapnet_exit_fractions", "sdn_exit_fractions"):
            fractions = getattr(self, name)
            if not isinstance(fractions, tuple) or len(fractions) > MAX_EXIT_FRACTIONS or not all(
                    isinstance(f, (int, float)) and not isinstance(f, bool) and 0.0 < f < 1.0 for f in fractions):
                raise ValueError(f"{name} must list at most {MAX_EXIT_FRACTIONS} fractions strictly between 0 and 1, "
                                 f"got {fractions!r}")

    @property
    def fusion_grid_stride(self) -> int:
        """The full-resolution backbone's total stride where RAPNet's two paths meet."""
        return self.fusion_stride * _LAYOUT_STRIDE[self.layout]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def identity_dict(self) -> dict:
        """What the model identity hashes: to_dict() less added fields that hold their legacy value."""
        return {k: v for k, v in self.to_dict().items() if k not in LEGACY_VALUES or LEGACY_VALUES[k] != v}

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config fields {sorted(unknown)}: checkpoint from a newer version?")
        values = {**LEGACY_VALUES, **{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}}
        return cls(**values)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _check_count(name: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} {value!r} must be a whole number in {low}..{high}")
