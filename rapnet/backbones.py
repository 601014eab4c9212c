"""Base networks as flat block layouts (MobileNetV2 primary, ResNet second), and how RAPNet splits them.

A layout is the full-resolution backbone as a list of blocks plus what RAPNet needs to know about it:
how many leading blocks its low-resolution path runs, and the thin high-resolution stem that brings the
full-size image to the grid where the two paths are fused.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .blocks import BasicBlock, ConvBNAct, InvertedResidual, make_divisible


@dataclass(frozen=True)
class BlockSpec:
    in_ch: int
    out_ch: int
    stride: int
    expand: int = 0  # MobileNetV2 expansion ratio; 0 means a ResNet basic block


@dataclass(frozen=True)
class Layout:
    stem_ch: int
    blocks: tuple[BlockSpec, ...]
    head_ch: int  # width of the final 1x1 conv before pooling (0: none, as in ResNet)
    lowres_blocks: int  # RAPNet's low-resolution path runs the stem and blocks[:lowres_blocks]
    hr_stem_stride: int  # the stem conv's stride on the thin high-resolution path
    hr_stem: tuple[BlockSpec, ...]  # after that conv; total stride must equal that of blocks[:lowres_blocks]

    def stride_before(self, index: int) -> int:
        total = 1
        for spec in self.blocks[:index]:
            total *= spec.stride
        return total


# (expansion, channels, repeats, stride) of MobileNetV2 adapted to 32x32 inputs: stride 1 in the stem and
# in the 24-channel stage, as is usual for CIFAR.
_MOBILENETV2 = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
_RESNET18 = ((64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2))


def mobilenetv2_layout(width: float, fusion_stride: int) -> Layout:
    ch = lambda c: make_divisible(c * width)  # noqa: E731
    stem = ch(32)
    blocks, in_ch = [], stem
    for expand, channels, repeats, stride in _MOBILENETV2:
        for i in range(repeats):
            blocks.append(BlockSpec(in_ch, ch(channels), stride if i == 0 else 1, expand))
            in_ch = ch(channels)
    head = make_divisible(1280 * max(1.0, width))
    # Thin high-res stem (narrow, because the fused low-res features carry the semantics) ending on the grid where
    # the low-res path stops.
    if fusion_stride == 1:
        # Low-res path through the 24-channel stage only, fuse on the full 32x32 grid (CIFAR): from the 32-channel
        # stage on, RAPNet is the static network. After its conv the stem has one depthwise-separable block (no
        # expansion): at full resolution every channel is expensive (an expanded block puts the full path at 91%
        # of the static network's FLOPs instead of 86%).
        return Layout(stem, tuple(blocks), head, 3, 1, (BlockSpec(ch(16), ch(16), 1, 1),))
    if fusion_stride == 2:
        # Low-res path through the 32-channel stage, fuse on the 16x16 grid (CIFAR). The stem's conv keeps the full
        # resolution and its first block halves it: more accurate at the deep exits than a stride-2
        # conv first, for 1.6% more FLOPs.
        return Layout(stem, tuple(blocks), head, 6, 1, (BlockSpec(ch(16), ch(24), 2, 6), BlockSpec(ch(24), ch(32), 1, 6)))
    # fusion_stride 4 (what checkpoints without the field use): low-res path through the 64-channel stage, fuse on the 8x8 grid
    return Layout(stem, tuple(blocks), head, 10, 2, (BlockSpec(ch(16), ch(24), 1, 6), BlockSpec(ch(24), ch(32), 2, 6)))


def resnet_layout(width: float, fusion_stride: int) -> Layout:
    ch = lambda c: make_divisible(c * width)  # noqa: E731
    stem = ch(64)
    blocks, in_ch = [], stem
    for channels, repeats, stride in _RESNET18:
        for i in range(repeats):
            blocks.append(BlockSpec(in_ch, ch(channels), stride if i == 0 else 1))
            in_ch = ch(channels)
    if fusion_stride == 1:  # low-res path through layer 1, fuse on the full-resolution grid
        return Layout(stem, tuple(blocks), 0, 2, 1, (BlockSpec(ch(32), ch(32), 1),))
    if fusion_stride == 2:  # low-res path through layer 2; the stem's conv at full resolution, as above
        return Layout(stem, tuple(blocks), 0, 4, 1, (BlockSpec(ch(32), ch(64), 2),))
    return Layout(stem, tuple(blocks), 0, 6, 2, (BlockSpec(ch(32), ch(64), 2),))  # through layer 3


def layout_for(arch: str, width: float, fusion_stride: int) -> Layout:
    layout = {"mobilenetv2": mobilenetv2_layout, "resnet": resnet_layout}[arch](width, fusion_stride)
    hr_stride = layout.hr_stem_stride
    for spec in layout.hr_stem:
        hr_stride *= spec.stride
    assert hr_stride == layout.stride_before(layout.lowres_blocks), "high-res stem must land on the fusion grid"
    return layout


def make_block(spec: BlockSpec) -> nn.Module:
    if spec.expand:
        return InvertedResidual(spec.in_ch, spec.out_ch, spec.stride, spec.expand)
    return BasicBlock(spec.in_ch, spec.out_ch, spec.stride)


def make_stem(out_ch: int, stride: int = 1) -> ConvBNAct:
    return ConvBNAct(3, out_ch, 3, stride)
