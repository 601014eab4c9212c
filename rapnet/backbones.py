"""Base networks as data tables (MobileNetV2 primary, ResNet-18 second) in two stride layouts, and how RAPNet
splits them.

A backbone is the full-resolution network as a stem and a flat list of blocks, plus what RAPNet needs to know
about it: how many leading blocks its low-resolution path runs, and the thin high-resolution stem that brings
the full-size image to the grid where the two paths are fused.

Stride layouts (`ModelConfig.layout`):

- "cifar", for 32-64 px inputs: MobileNetV2 with stride 1 in the stem and in the 24-channel stage, ResNet-18
  with a 3x3 stride-1 stem; total stride 8.
- "imagenet", for camera frames: the standard schedules. MobileNetV2 with a stride-2 stem and strides
  1,2,2,2,1,2,1 over its seven stages (torchvision's), ResNet-18 with a 7x7 stride-2 conv and a 3x3 stride-2
  max-pool stem, then layers at strides 1,2,2,2; total stride 32.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .blocks import BasicBlock, ConvBNAct, InvertedResidual, make_divisible
from .config import ModelConfig


@dataclass(frozen=True)
class BlockSpec:
    in_ch: int
    out_ch: int
    stride: int
    expand: int = 0  # MobileNetV2 expansion ratio; 0 means a ResNet basic block


@dataclass(frozen=True)
class StemSpec:
    out_ch: int
    kernel: int = 3
    stride: int = 1
    pool: bool = False  # a 3x3 stride-2 max-pool after the conv (ResNet's ImageNet stem)

    @property
    def total_stride(self) -> int:
        return self.stride * (2 if self.pool else 1)


@dataclass(frozen=True)
class Backbone:
    stem: StemSpec
    blocks: tuple[BlockSpec, ...]
    head_ch: int  # width of the final 1x1 conv before pooling (0: none, as in ResNet)
    lowres_blocks: int  # RAPNet's low-resolution path runs the stem and blocks[:lowres_blocks]
    hr_stem: StemSpec  # the thin high-resolution path's first conv ...
    hr_blocks: tuple[BlockSpec, ...]  # ... and its blocks; together they must land on the fusion grid

    def stride_before(self, index: int) -> int:
        """The full-resolution backbone's total stride in front of blocks[index]."""
        total = self.stem.total_stride
        for spec in self.blocks[:index]:
            total *= spec.stride
        return total

    @property
    def hr_stride(self) -> int:
        total = self.hr_stem.total_stride
        for spec in self.hr_blocks:
            total *= spec.stride
        return total


# MobileNetV2: the stem conv's stride, and (expansion, channels, repeats, stride) per stage (torchvision's
# inverted_residual_setting). The CIFAR layout keeps the full resolution through the stem and the 24-channel stage.
MOBILENETV2 = {
    "cifar": (1, ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))),
    "imagenet": (2, ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))),
}
# ResNet-18: the stem (kernel, stride, max-pool), and (channels, repeats, stride) per layer.
RESNET18 = {
    "cifar": ((3, 1, False), ((64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2))),
    "imagenet": ((7, 2, True), ((64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2))),
}
# How many leading blocks RAPNet's low-resolution path runs, by fusion_stride. The same blocks in both layouts
# (ours): fusion_stride names the stage where the paths meet by its stride in the CIFAR layout, so in the
# ImageNet layout it keeps the same role (low-res path through the same stages, the same widths at the fusion
# point, the same split of blocks between the paths) on a grid 4x coarser (config.fusion_grid_stride).
LOWRES_BLOCKS = {
    "mobilenetv2": {1: 3, 2: 6, 4: 10},  # through the 24-, 32- or 64-channel stage
    "resnet": {1: 2, 2: 4, 4: 6},  # through layer 1, 2 or 3
}


def mobilenetv2_backbone(config: ModelConfig) -> Backbone:
    ch = lambda c: make_divisible(c * config.width)  # noqa: E731
    stem_stride, setting = MOBILENETV2[config.layout]
    stem = StemSpec(ch(32), stride=stem_stride)
    blocks, in_ch = [], stem.out_ch
    for expand, channels, repeats, stride in setting:
        for i in range(repeats):
            blocks.append(BlockSpec(in_ch, ch(channels), stride if i == 0 else 1, expand))
            in_ch = ch(channels)
    head = make_divisible(1280 * max(1.0, config.width))
    lowres = LOWRES_BLOCKS["mobilenetv2"][config.fusion_stride]
    # Thin high-res stem (narrow, because the fused low-res features carry the semantics) ending on the grid where
    # the low-res path stops.
    if config.layout == "imagenet":
        # The standard stride-2 stem conv (16 channels), then one expanded block per stride-2 stage up to the
        # fusion point, each halving the grid: 24 channels (fusion_stride 1), then 32 (2), then 64 (4).
        widths = (16, 24, 32, 64)[: 1 + {1: 1, 2: 2, 4: 3}[config.fusion_stride]]
        hr_blocks = tuple(BlockSpec(ch(a), ch(b), 2, 6) for a, b in zip(widths, widths[1:]))
        return Backbone(stem, tuple(blocks), head, lowres, StemSpec(ch(16), stride=2), hr_blocks)
    if config.fusion_stride == 1:
        # Low-res path through the 24-channel stage only, fuse on the full 32x32 grid (CIFAR): from the 32-channel
        # stage on, RAPNet is the static network. After its conv the stem has one depthwise-separable block (no
        # expansion): at full resolution every channel is expensive (an expanded block puts the full path at 91%
        # of the static network's FLOPs instead of 86%).
        return Backbone(stem, tuple(blocks), head, lowres, StemSpec(ch(16)), (BlockSpec(ch(16), ch(16), 1, 1),))
    if config.fusion_stride == 2:
        # Low-res path through the 32-channel stage, fuse on the 16x16 grid (CIFAR). The stem's conv keeps the full
        # resolution and its first block halves it: more accurate at the deep exits than a stride-2
        # conv first, for 1.6% more FLOPs.
        return Backbone(stem, tuple(blocks), head, lowres, StemSpec(ch(16)),
                        (BlockSpec(ch(16), ch(24), 2, 6), BlockSpec(ch(24), ch(32), 1, 6)))
    # fusion_stride 4 (what checkpoints without the field use): low-res path through the 64-channel stage, fuse on the 8x8 grid
    return Backbone(stem, tuple(blocks), head, lowres, StemSpec(ch(16), stride=2),
                    (BlockSpec(ch(16), ch(24), 1, 6), BlockSpec(ch(24), ch(32), 2, 6)))


def resnet_backbone(config: ModelConfig) -> Backbone:
    ch = lambda c: make_divisible(c * config.width)  # noqa: E731
    (kernel, stem_stride, pool), setting = RESNET18[config.layout]
    stem = StemSpec(ch(64), kernel, stem_stride, pool)
    blocks, in_ch = [], stem.out_ch
    for channels, repeats, stride in setting:
        for i in range(repeats):
            blocks.append(BlockSpec(in_ch, ch(channels), stride if i == 0 else 1))
            in_ch = ch(channels)
    lowres = LOWRES_BLOCKS["resnet"][config.fusion_stride]
    if config.layout == "imagenet":
        # A 3x3 stride-2 conv and the max-pool (stride 4, as the standard stem), then the CIFAR layout's blocks
        # with every stride doubled after the first: through layer 1, 2 or 3.
        hr_stem = StemSpec(ch(32), stride=2, pool=True)
        hr_blocks = {1: (BlockSpec(ch(32), ch(32), 1),), 2: (BlockSpec(ch(32), ch(64), 2),),
                     4: (BlockSpec(ch(32), ch(64), 2), BlockSpec(ch(64), ch(64), 2))}[config.fusion_stride]
        return Backbone(stem, tuple(blocks), 0, lowres, hr_stem, hr_blocks)
    if config.fusion_stride == 1:  # low-res path through layer 1, fuse on the full-resolution grid
        return Backbone(stem, tuple(blocks), 0, lowres, StemSpec(ch(32)), (BlockSpec(ch(32), ch(32), 1),))
    if config.fusion_stride == 2:  # low-res path through layer 2; the stem's conv at full resolution, as above
        return Backbone(stem, tuple(blocks), 0, lowres, StemSpec(ch(32)), (BlockSpec(ch(32), ch(64), 2),))
    return Backbone(stem, tuple(blocks), 0, lowres, StemSpec(ch(32), stride=2), (BlockSpec(ch(32), ch(64), 2),))  # through layer 3


def backbone_for(config: ModelConfig) -> Backbone:
    backbone = {"mobilenetv2": mobilenetv2_backbone, "resnet": resnet_backbone}[config.arch](config)
    fusion = backbone.stride_before(backbone.lowres_blocks)
    assert fusion == config.fusion_grid_stride, "the config's fusion grid must be the backbone's"
    assert backbone.hr_stride == fusion, "high-res stem must land on the fusion grid"
    return backbone


def make_block(spec: BlockSpec) -> nn.Module:
    if spec.expand:
        return InvertedResidual(spec.in_ch, spec.out_ch, spec.stride, spec.expand)
    return BasicBlock(spec.in_ch, spec.out_ch, spec.stride)


def make_stem(spec: StemSpec) -> nn.Module:
    conv = ConvBNAct(3, spec.out_ch, spec.kernel, spec.stride)
    return nn.Sequential(conv, nn.MaxPool2d(3, 2, 1)) if spec.pool else conv
