"""Typed configuration of a model: everything that decides its architecture, in one place.

The config travels inside checkpoints and feeds the model identity hash, so edge and cloud agree on it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

ARCHES = ("mobilenetv2", "resnet")
KINDS = ("rapnet", "sdn", "static")
FUSION_STRIDES = (1, 2, 4)
# Fields a checkpoint may lack, with the value such a checkpoint implies. They are left out of the identity hash
# while they hold that value, so a checkpoint written without them keeps its identity.
LEGACY_VALUES = {"fusion_stride": 4}


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "mobilenetv2"  # base network: "mobilenetv2" (primary) or "resnet"
    kind: str = "rapnet"  # "rapnet" (ours), "sdn" (confidence exits, full res), "static" (no exits)
    width: float = 1.0  # channel width multiplier
    num_classes: int = 10
    image_size: int = 32
    lowres_factor: int = 2  # RAPNet's early stages see the image downsampled by this factor
    # Where RAPNet's two paths meet, as the full-resolution backbone's total stride there: 2 fuses on the 16x16
    # grid of a CIFAR image (the low-res path runs through the 32-channel stage), 4 on the 8x8 grid (through the
    # 64-channel stage; checkpoints without the field use it: its last exit ends under the static network's).
    # 1 fuses on the full 32x32 grid (the low-res path runs through the 24-channel stage only).
    fusion_stride: int = 2
    # Exit placement (ours): cut points nearest these fractions of the full network's measured FLOPs.
    # RAPNet additionally always exits at the end of the low-resolution path and at the end of the network.
    rapnet_exit_fractions: tuple[float, ...] = (0.05, 0.1, 0.3, 0.5, 0.75)
    # SDN's own rule: ICs at fixed fractions of the backbone's cost (Kaya et al., 2019).
    sdn_exit_fractions: tuple[float, ...] = (0.15, 0.3, 0.45, 0.6, 0.75, 0.9)
    ic_channels: int = 128  # width of the internal-classifier heads
    predictor_channels: tuple[int, ...] = (24, 48, 96)  # exit predictor CNN on the low-res image, x width

    def __post_init__(self) -> None:
        if self.arch not in ARCHES:
            raise ValueError(f"unknown arch {self.arch!r}: choose one of {ARCHES}")
        if self.kind not in KINDS:
            raise ValueError(f"unknown model kind {self.kind!r}: choose one of {KINDS}")
        if self.image_size % (8 * self.lowres_factor):
            raise ValueError(
                f"image_size {self.image_size} must be a multiple of {8 * self.lowres_factor} "
                f"(8 x lowres_factor) so that low- and high-resolution feature maps line up"
            )
        if self.fusion_stride not in FUSION_STRIDES:
            raise ValueError(f"fusion_stride {self.fusion_stride} is not one of {FUSION_STRIDES}")
        if not 0.1 <= self.width <= 4.0:
            raise ValueError(f"width multiplier {self.width} is outside 0.1..4.0")

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
