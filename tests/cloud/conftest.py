"""Fixtures the cloud tests share: one small model saved as a checkpoint per module, and its wire contract."""
from __future__ import annotations

import pytest
import torch

from rapnet.build import build_model
from rapnet.checkpoint import save_checkpoint
from rapnet.codec import ModelContract
from rapnet.config import ModelConfig


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(ModelConfig(width=0.35)).eval()
    path = tmp_path_factory.mktemp("model") / "rapnet.pt"
    identity = save_checkpoint(path, model)
    return model, identity, str(path)


@pytest.fixture(scope="module")
def contract(model_file):
    model, identity, _ = model_file
    return ModelContract.from_model(model, identity)
