"""Building blocks: conv-BN-activation, MobileNetV2 inverted residual, ResNet basic block, exit heads, fusion."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of `divisor` without dropping more than 10% (MobileNetV2's rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvBNAct(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, groups: int = 1, act: bool = True):
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        if act:
            layers.append(nn.ReLU6(inplace=True))
        super().__init__(*layers)
        self.out_channels = out_ch


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection, residual when shapes allow."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int):
        super().__init__()
        hidden = in_ch * expand
        layers: list[nn.Module] = [] if expand == 1 else [ConvBNAct(in_ch, hidden, 1)]
        layers += [ConvBNAct(hidden, hidden, 3, stride, groups=hidden), ConvBNAct(hidden, out_ch, 1, act=False)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and in_ch == out_ch
        self.out_channels = out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with an identity or 1x1 projection shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = ConvBNAct(in_ch, out_ch, 3, stride)
        self.conv2 = ConvBNAct(out_ch, out_ch, 3, 1, act=False)
        self.shortcut = nn.Identity() if stride == 1 and in_ch == out_ch else ConvBNAct(in_ch, out_ch, 1, stride, act=False)
        self.out_channels = out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ExitHead(nn.Module):
    """Internal classifier: pool to at most 4x4 (cheap), 1x1 conv, global pool, linear.

    Pooling first keeps the head's cost tiny even on large early feature maps.
    """

    def __init__(self, in_ch: int, hidden: int, num_classes: int):
        super().__init__()
        self.conv = ConvBNAct(in_ch, hidden, 1)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 4:
            x = F.adaptive_avg_pool2d(x, 4)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.conv(x), 1), 1))


class ClassifierHead(nn.Module):
    """The backbone's own final classifier (optional 1x1 conv to `hidden`, global pool, dropout, linear)."""

    def __init__(self, in_ch: int, hidden: int, num_classes: int, dropout: float = 0.2):
        super().__init__()
        self.conv = ConvBNAct(in_ch, hidden, 1) if hidden else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden or in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(torch.flatten(F.adaptive_avg_pool2d(self.conv(x), 1), 1)))


class Fusion(nn.Module):
    """Feature fusion by reuse (ours, after RANet): the thin high-resolution path's features plus the
    low-resolution path's features, upsampled to the same grid and projected; one 1x1 conv mixes both."""

    def __init__(self, hr_ch: int, lr_ch: int, out_ch: int):
        super().__init__()
        self.mix = ConvBNAct(hr_ch + lr_ch, out_ch, 1)
        self.out_channels = out_ch

    def forward(self, hr: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        lr_up = F.interpolate(lr, size=hr.shape[-2:], mode="nearest")
        return self.mix(torch.cat([hr, lr_up], dim=1))
