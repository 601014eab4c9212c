"""The backbones' two stride layouts (ModelConfig.layout) at every supported input size.

- "cifar" (stride-1 stem and 24-channel stage; what the shipped CIFAR-10 checkpoints use, and what a checkpoint
  without the field loads as) and "imagenet" (the standard MobileNetV2 and ResNet-18 schedules);
- split execution equals monolithic execution at 32, 64, 128 and 224 px in both layouts, for every kind;
- the static MobileNetV2-1.0 in the ImageNet layout costs what the published network does at 224 px;
- the exit predictor stays within 3% of RAPNet's full cost at every supported size in both layouts;
- sizes a layout cannot take are refused with a message that says which sizes it can.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from rapnet import train
from rapnet.build import build_model
from rapnet.checkpoint import load_model, model_identity, save_checkpoint
from rapnet.config import LAYOUTS, ModelConfig
from rapnet.costs import count_flops, measure_costs

ROOT = Path(__file__).resolve().parents[2]
SIZES = (32, 64, 128, 160, 224)
TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small batch-1 models gain nothing from intra-op threads on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _make(seed: int = 0, **config) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(ModelConfig(**config))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so every buffer matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    return model.eval()


def _image(size: int, batch: int = 1, seed: int = 7) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _check_split_equals_monolithic(model, size: int) -> None:
    """Every split point and every exit at or beyond it: edge_part + cloud_part == run_to_exit; forward() agrees."""
    x = _image(size, batch=2 if size <= 64 else 1)
    checked = 0
    with torch.inference_mode():
        reference = [model.run_to_exit(x, k) for k in range(model.num_exits)]
        for k, out in enumerate(model(x)):
            assert out.shape == (x.shape[0], model.config.num_classes) and torch.isfinite(out).all()
            assert (out - reference[k]).abs().max().item() <= TOL
        for s in range(model.num_stages + 1):
            carry = model.edge_part(x, s)
            assert tuple(sorted(carry)) == model.live_keys(s)
            for k in range(model.num_exits):
                if model.exit_stages[k] >= s:
                    assert (model.cloud_part(carry, s, k) - reference[k]).abs().max().item() <= TOL, (s, k)
                    checked += 1
    assert checked == sum(1 for s in range(model.num_stages + 1) for e in model.exit_stages if e >= s)


def _split_cases():
    """MobileNetV2 (width 0.35) for every kind at 32-224 px in both layouts, ResNet (width 0.25) at 64 px in both.
    The CIFAR layout keeps the full grid through its 24-channel stage, so from 128 px on it is the slow case; at
    32 px it is test_model.py's quick check."""
    cases = []
    for layout in LAYOUTS:
        for size in (32, 64, 128, 224):
            slow = layout == "cifar" and size != 64
            for kind in ("rapnet", "sdn", "static"):
                marks = [pytest.mark.slow] if slow else []
                cases.append(pytest.param(layout, size, "mobilenetv2", 0.35, kind, marks=marks,
                                          id=f"{layout}-{size}-mobilenetv2-{kind}"))
        for kind in ("rapnet", "sdn", "static"):
            cases.append(pytest.param(layout, 64, "resnet", 0.25, kind, id=f"{layout}-64-resnet-{kind}"))
    return cases


@pytest.mark.parametrize("layout,size,arch,width,kind", _split_cases())
def test_split_execution_equals_monolithic(layout, size, arch, width, kind):
    model = _make(arch=arch, kind=kind, width=width, image_size=size, layout=layout)
    _check_split_equals_monolithic(model, size)
    if kind != "static":
        assert model.num_exits >= 4


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_resnet_split_execution_at_224(layout):
    _check_split_equals_monolithic(_make(arch="resnet", kind="rapnet", width=0.25, image_size=224, layout=layout), 224)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_quarter_resolution_low_res_path_splits_and_stays_cheap(layout):
    """lowres_factor 4: the low-resolution path (and the predictor) see a quarter of the image's side."""
    model = _make(kind="rapnet", width=0.35, image_size=128, layout=layout, lowres_factor=4)
    _check_split_equals_monolithic(model, 128)
    assert model.stages[0].downsample == 4
    assert model.predictor.downsample == 4 * {"cifar": 1, "imagenet": 2}[layout]
    table = measure_costs(model)
    assert 0 < table.predictor_flops <= 0.03 * table.full_cost


def test_the_grids_follow_the_layout():
    """Final grid: 1/8 of the image in the CIFAR layout, 1/32 in the ImageNet one; RAPNet's paths meet on the
    grid config.fusion_grid_stride names, the low-resolution features lowres_factor times coarser."""
    for layout, total in (("cifar", 8), ("imagenet", 32)):
        for arch in ("mobilenetv2", "resnet"):
            for fusion_stride in (1, 2, 4):
                config = ModelConfig(arch=arch, width=0.25, image_size=64, layout=layout, fusion_stride=fusion_stride)
                model = build_model(config).eval()
                fusion = next(s for s in model.stages if len(s.reads) == 2)
                with torch.inference_mode():
                    carry = {"image": _image(64)}
                    for stage in model.stages:
                        if stage is fusion:
                            assert fusion.stem(carry["image"]).shape[-1] == 64 // config.fusion_grid_stride
                            assert carry["lr"].shape[-1] == 64 // config.fusion_grid_stride // 2
                        carry[stage.writes] = stage(carry)
                assert carry["hr"].shape[-1] == 64 // total, (layout, arch, fusion_stride)
    assert ModelConfig(layout="imagenet").fusion_grid_stride == 8 and ModelConfig().fusion_grid_stride == 2
    resnet_stem = build_model(ModelConfig(arch="resnet", kind="static", width=0.25, layout="imagenet")).stages[0].layers[0]
    assert isinstance(resnet_stem[0][0], nn.Conv2d) and resnet_stem[0][0].kernel_size == (7, 7)
    assert isinstance(resnet_stem[1], nn.MaxPool2d)


def test_flop_counter_counts_a_multiply_add_as_two():
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
    flops, _ = count_flops(conv, torch.zeros(1, 8, 10, 10))
    assert flops == 2 * (10 * 10) * 16 * 8 * 9


@pytest.mark.slow
def test_static_mobilenetv2_in_the_imagenet_layout_costs_the_published_figure():
    """MobileNetV2-1.0 at 224 px: 300 M multiply-adds (Sandler et al., 2018), 0.60 GFLOPs in the counter's
    convention of 2 FLOPs per multiply-add (ImageNet's 1000 classes, as published)."""
    model = build_model(ModelConfig(kind="static", image_size=224, layout="imagenet", num_classes=1000))
    full = measure_costs(model).full_cost
    assert abs(full - 0.60e9) <= 0.05 * 0.60e9, full
    cifar = build_model(ModelConfig(kind="static", image_size=224, num_classes=1000))
    assert measure_costs(cifar).full_cost > 10 * full  # the CIFAR layout keeps 4x finer grids


def _predictor_cases():
    cases = []
    for layout in LAYOUTS:
        for size in SIZES:
            for width in (1.0, 0.5):
                # quick: width 0.5 up to 64 px (CIFAR layout) or 224 px (ImageNet layout)
                slow = width == 1.0 or layout == "cifar" and size > 64
                cases.append(pytest.param(layout, size, width, marks=[pytest.mark.slow] if slow else [],
                                          id=f"{layout}-{size}-w{width}"))
    return cases


@pytest.mark.parametrize("layout,size,width", _predictor_cases())
def test_predictor_stays_within_three_percent(layout, size, width):
    model = build_model(ModelConfig(kind="rapnet", width=width, image_size=size, layout=layout)).eval()
    table = measure_costs(model)
    assert 0 < table.predictor_flops <= 0.03 * table.full_cost, (table.predictor_flops, table.full_cost)
    x = _image(size)
    with torch.inference_mode():
        assert count_flops(model.exit_scores, x)[0] == table.predictor_flops
        assert model.exit_scores(x).shape == (1, model.num_exits)
    costs = [table.exit_cost(k) for k in range(table.num_exits)]
    assert costs == sorted(costs) and len(set(costs)) == len(costs)  # exits at distinct, rising costs


def test_every_supported_size_is_valid_and_others_are_refused():
    for layout in LAYOUTS:
        for size in SIZES:
            ModelConfig(image_size=size, layout=layout)
            ModelConfig(arch="resnet", image_size=size, layout=layout)
    with pytest.raises(ValueError, match=r"image_size 100 must be a positive multiple of 16 .*imagenet layout"):
        ModelConfig(image_size=100, layout="imagenet")
    with pytest.raises(ValueError, match="multiple of 64"):
        ModelConfig(image_size=224, layout="imagenet", lowres_factor=4, fusion_stride=4)
    with pytest.raises(ValueError, match="multiple of 4"):
        ModelConfig(image_size=30)
    with pytest.raises(ValueError, match="positive multiple"):
        ModelConfig(image_size=0)
    with pytest.raises(ValueError, match="unknown layout 'vga'"):
        ModelConfig(layout="vga")
    with pytest.raises(ValueError, match="lowres_factor 1 must be an integer >= 2"):
        ModelConfig(lowres_factor=1)


@pytest.mark.parametrize("kind", ["rapnet", "sdn", "static"])
def test_shipped_checkpoints_load_as_the_cifar_layout_with_their_identity(kind):
    """The shipped CIFAR-10 checkpoints carry no layout field: they load as "cifar", and the identity hash leaves
    the field out at that value, so their identity is the one recorded beside them."""
    path = ROOT / "models" / f"{kind}-cifar10.pt"
    assert "layout" not in torch.load(path, map_location="cpu", weights_only=True)["config"]
    model, meta = load_model(path)
    recorded = json.loads(path.with_suffix(".json").read_text())["identity"]
    assert model.config.layout == "cifar" and "layout" not in model.config.identity_dict()
    assert model_identity(model) == meta["identity"] == recorded


def test_the_layout_is_part_of_a_new_checkpoints_identity(tmp_path):
    model = _make(kind="rapnet", width=0.35, image_size=64, layout="imagenet")
    identity = save_checkpoint(tmp_path / "m.pt", model)
    loaded, meta = load_model(tmp_path / "m.pt")
    assert loaded.config.layout == "imagenet" and meta["identity"] == identity
    assert model.config.identity_dict()["layout"] == "imagenet"
    with torch.inference_mode():
        x = _image(64)
        assert torch.equal(loaded.run_to_exit(x, 2), model.run_to_exit(x, 2))


def test_train_cli_layout_option_and_an_impossible_size():
    args = train.build_parser().parse_args([])
    assert args.layout == "cifar" == ModelConfig.layout and args.image_size is None
    assert "(default: cifar)" in " ".join(train.build_parser().format_help().split())
    with pytest.raises(SystemExit, match="multiple of 16"):
        train.main(["--layout", "imagenet", "--image-size", "100", "--data", "/nonexistent"])


@pytest.mark.slow
def test_train_cli_trains_the_imagenet_layout_at_another_size(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 5)):
        for c, name in enumerate(("red", "green")):
            folder = tmp_path / "data" / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                image = rng.integers(0, 120, (48, 40, 3), dtype=np.uint8)
                image[..., 2 - c] += 120
                cv2.imwrite(str(folder / f"{i:03d}.png"), image)
    train.main(["--data", str(tmp_path / "data"), "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run"),
                "--models", "rapnet", "--layout", "imagenet", "--image-size", "64", "--width", "0.25", "--epochs", "1",
                "--predictor-epochs", "1", "--batch-size", "16", "--val-size", "20", "--threads", "1"])
    model, meta = load_model(tmp_path / "run" / "rapnet.pt")
    assert (model.config.layout, model.config.image_size) == ("imagenet", 64)
    assert meta["classes"] == ["green", "red"] or meta["classes"] == ["red", "green"]
