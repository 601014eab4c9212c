"""Build RAPNet, the SDN baseline and the static network from a ModelConfig.

Exit placement is by measured cost (ours): the backbone is laid out as a flat list of units, each unit's
FLOPs are measured with torch's flop counter, and stage boundaries go where the cumulative cost is nearest
the configured fractions. The same config therefore always gives the same cut points.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .backbones import Backbone, backbone_for, make_block, make_stem
from .blocks import ClassifierHead, ExitHead, Fusion
from .config import ModelConfig
from .costs import count_flops
from .network import IMAGE, ChainStage, ExitPredictor, FusionStage, MultiExitNetwork, Stage


@dataclass
class _Unit:
    module: nn.Module
    path: str  # "lr" (low-res), "fuse" (high-res stem + fusion) or "x"/"hr" (full-res chain)
    out_ch: int
    flops: int = 0


class _FusionUnit(nn.Module):
    def __init__(self, stem: nn.Module, fusion: Fusion):
        super().__init__()
        self.stem, self.fusion = stem, fusion


def build_model(config: ModelConfig) -> MultiExitNetwork:
    backbone = backbone_for(config)
    units = _rapnet_units(config, backbone) if config.kind == "rapnet" else _full_res_units(backbone)
    _measure_units(units, config)
    fractions = config.rapnet_exit_fractions if config.kind == "rapnet" else config.sdn_exit_fractions
    forced = [i for i in range(len(units) - 1) if units[i].path == "lr" and units[i + 1].path == "fuse"]
    cuts = _cut_points(units, fractions, forced)
    stages = _group_stages(units, cuts, config)
    out_channels = [units[c].out_ch for c in cuts]
    if config.kind == "static":
        exit_stages = [len(stages) - 1]
        exits: list[nn.Module] = [ClassifierHead(out_channels[-1], backbone.head_ch, config.num_classes)]
    else:
        exit_stages = list(range(len(stages)))
        exits = [ExitHead(ch, config.ic_channels, config.num_classes) for ch in out_channels[:-1]]
        exits.append(ClassifierHead(out_channels[-1], backbone.head_ch, config.num_classes))
    predictor = ExitPredictor(config, len(exits)) if config.kind == "rapnet" else None
    return MultiExitNetwork(config, stages, exits, exit_stages, predictor)


def _full_res_units(backbone: Backbone) -> list[_Unit]:
    units = [_Unit(make_stem(backbone.stem), "x", backbone.stem.out_ch)]
    units += [_Unit(make_block(spec), "x", spec.out_ch) for spec in backbone.blocks]
    return units


def _rapnet_units(config: ModelConfig, backbone: Backbone) -> list[_Unit]:
    lr_blocks = backbone.blocks[: backbone.lowres_blocks]
    units = [_Unit(make_stem(backbone.stem), "lr", backbone.stem.out_ch)]
    units += [_Unit(make_block(spec), "lr", spec.out_ch) for spec in lr_blocks]
    hr_stem = nn.Sequential(make_stem(backbone.hr_stem), *map(make_block, backbone.hr_blocks))
    fused_ch = backbone.blocks[backbone.lowres_blocks].in_ch
    hr_ch = backbone.hr_blocks[-1].out_ch if backbone.hr_blocks else backbone.hr_stem.out_ch
    fusion = Fusion(hr_ch, lr_blocks[-1].out_ch, fused_ch)
    units.append(_Unit(_FusionUnit(hr_stem, fusion), "fuse", fused_ch))
    units += [_Unit(make_block(spec), "hr", spec.out_ch) for spec in backbone.blocks[backbone.lowres_blocks :]]
    return units


@torch.no_grad()
def _measure_units(units: list[_Unit], config: ModelConfig) -> None:
    """FLOPs of each unit on a batch-1 input of the shape it sees at run time."""
    image = torch.zeros(1, 3, config.image_size, config.image_size)
    lowres = image[:, :, :: config.lowres_factor, :: config.lowres_factor]
    x = lowres if units[0].path == "lr" else image
    for unit in units:
        unit.module.eval()
        if isinstance(unit.module, _FusionUnit):
            unit.flops, hr = count_flops(unit.module.stem, image)
            fuse_flops, x = count_flops(unit.module.fusion, hr, x)
            unit.flops += fuse_flops
        else:
            unit.flops, x = count_flops(unit.module, x)


def _cut_points(units: list[_Unit], fractions: tuple[float, ...], forced: list[int]) -> list[int]:
    """Indices of the units after which a stage ends: nearest to each cost fraction, plus forced ones."""
    cumulative, total = [], 0
    for unit in units:
        total += unit.flops
        cumulative.append(total)
    cuts = set(forced) | {len(units) - 1}
    for fraction in fractions:
        cuts.add(min(range(len(units)), key=lambda i: abs(cumulative[i] / total - fraction)))
    return sorted(cuts)


def _group_stages(units: list[_Unit], cuts: list[int], config: ModelConfig) -> list[Stage]:
    stages: list[Stage] = []
    start = 0
    for end in cuts:
        group = units[start : end + 1]
        first = group[0]
        if isinstance(first.module, _FusionUnit):
            rest = [u.module for u in group[1:]]
            stages.append(FusionStage(first.module.stem, first.module.fusion, rest, "lr", "hr"))
        else:
            target = first.path
            source = IMAGE if start == 0 else target
            downsample = config.lowres_factor if (start == 0 and target == "lr") else 1
            stages.append(ChainStage([u.module for u in group], source, target, downsample))
        start = end + 1
    return stages
