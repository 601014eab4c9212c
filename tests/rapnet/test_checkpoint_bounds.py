"""A checkpoint is checked before it is trusted: its config's fields are bounded and its weights must be the tensors
that config lays out before any of the network is built for real."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rapnet.build import build_model
from rapnet.checkpoint import FORMAT, CheckpointError, load_model, save_checkpoint
from rapnet.config import ModelConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(ModelConfig(width=0.25)).eval()
    path = tmp_path_factory.mktemp("ckpt") / "small.pt"
    save_checkpoint(path, model)
    return model, path


def _forge(path: Path, config: dict, state_dict: dict) -> Path:
    """A checkpoint file whose config says `config` and whose weights are `state_dict` (as an attacker writes one)."""
    torch.save({"format": FORMAT, "config": config, "state_dict": state_dict, "identity": "0" * 64,
                "metadata": json.dumps({})}, path)
    return path


@pytest.mark.parametrize("field, value", [
    ("ic_channels", 1 << 20), ("ic_channels", 0), ("num_classes", 10 ** 7), ("num_classes", 1),
    ("image_size", 1 << 16), ("lowres_factor", 1 << 12), ("predictor_channels", (1 << 20,)),
    ("predictor_channels", ()), ("predictor_channels", (24,) * 100), ("rapnet_exit_fractions", (0.5, math.nan)),
    ("rapnet_exit_fractions", (2.0,)), ("sdn_exit_fractions", (0.5,) * 10_000), ("width", True),
    ("num_classes", 10.0),
])
def test_every_field_that_sizes_the_network_is_bounded(field, value):
    with pytest.raises(ValueError, match=field.rstrip("s").split("_")[0]):
        ModelConfig(**{field: value})


def test_a_checkpoint_is_refused_on_its_config_and_weights_before_anything_is_built(tmp_path):
    config = {**ModelConfig().to_dict(), "ic_channels": 1 << 20}
    with pytest.raises(CheckpointError, match="bad model config .*ic_channels"):
        load_model(_forge(tmp_path / "huge.pt", config, {}))
    with pytest.raises(CheckpointError, match="not a mapping of names to tensors"):
        load_model(_forge(tmp_path / "list.pt", ModelConfig().to_dict(), [1, 2, 3]))


@pytest.mark.slow
def test_weights_that_contradict_the_config_are_named_before_anything_is_built(small, tmp_path):
    model, _ = small
    wider = {**model.config.to_dict(), "ic_channels": 4096, "num_classes": 10_000}  # within bounds, not these weights
    with pytest.raises(CheckpointError, match="weights do not match .*of another shape"):
        load_model(_forge(tmp_path / "wider.pt", wider, model.state_dict()))
    dropped = dict(model.state_dict())
    name = sorted(dropped)[0]
    del dropped[name]
    with pytest.raises(CheckpointError, match=f"1 missing \\({name}"):
        load_model(_forge(tmp_path / "dropped.pt", model.config.to_dict(), dropped))
    doubled = {k: v.double() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="float64"):
        load_model(_forge(tmp_path / "double.pt", model.config.to_dict(), doubled))


@pytest.mark.slow
def test_a_checkpoint_loads_into_the_network_its_weights_build(small):
    model, path = small
    loaded, metadata = load_model(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(loaded(x), model(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(not p.is_meta and p.requires_grad for p in loaded.parameters())
    assert metadata["identity"]


@pytest.mark.slow
def test_a_config_that_claims_gigabytes_costs_nothing_to_refuse(small, tmp_path):
    """The weights are small, the config (within its bounds) claims a network of 600 million parameters: loading it
    allocates nothing of that network (checked on the meta device), so the process's peak memory stays small."""
    model, _ = small
    huge = {**model.config.to_dict(), "width": 4.0, "num_classes": 10_000, "ic_channels": 4096,
            "predictor_channels": [1024, 1024, 1024], "image_size": 1024}
    path = _forge(tmp_path / "claims.pt", huge, model.state_dict())
    script = (
        "import resource, sys\n"
        "from rapnet.checkpoint import CheckpointError, load_model\n"
        "try:\n"
        f"    load_model({str(path)!r})\n"
        "except CheckpointError as err:\n"
        "    print('refused:', str(err)[:120])\n"
        "print('peak_mb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert "refused: " in out.stdout and "weights do not match" in out.stdout, out.stdout + out.stderr
    peak_mb = int(out.stdout.split("peak_mb")[1])
    assert peak_mb < 1500, f"loading peaked at {peak_mb} MB"  # the network it claims takes 2.4 GB of float32
