"""The simulator's traces keep the model contract: the models share one input size and class list, and the data
they are replayed on is labelled with those classes in that order."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from orchestration import cli, traces
from rapnet.build import build_model
from rapnet.checkpoint import ClassMismatchError, save_checkpoint
from rapnet.config import ModelConfig


def _checkpoints(root, classes_by_kind: dict[str, list[str]]) -> dict:
    torch.manual_seed(0)
    paths = {}
    for kind, classes in classes_by_kind.items():
        paths[kind] = root / f"{kind}.pt"
        save_checkpoint(paths[kind], build_model(ModelConfig(kind=kind, width=0.25, num_classes=len(classes))).eval(),
                        {"classes": classes})
    return paths


def _data(root, classes):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            cv2.imwrite(str(root / split / name / "0.png"), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    return root


def test_traces_refuse_data_with_other_classes(tmp_path, monkeypatch):
    monkeypatch.setenv("RAPNET_CACHE", str(tmp_path / "cache"))
    checkpoints = _checkpoints(tmp_path, {"rapnet": ["a", "b"], "static": ["a", "b"]})
    data = _data(tmp_path / "data", ["a", "c"])
    with pytest.raises(ClassMismatchError, match=r"other classes.*\['a', 'b'\].*\['a', 'c'\]"):
        traces.build_traces(checkpoints, str(data), out=tmp_path / "t.npz", log=lambda _: None, progress=False)


def test_traces_refuse_models_with_other_classes(tmp_path, monkeypatch):
    monkeypatch.setenv("RAPNET_CACHE", str(tmp_path / "cache"))
    checkpoints = _checkpoints(tmp_path, {"rapnet": ["a", "b"], "static": ["b", "a"]})
    with pytest.raises(ClassMismatchError, match="in another order"):
        traces.build_traces(checkpoints, str(_data(tmp_path / "data", ["a", "b"])), out=tmp_path / "t.npz",
                            log=lambda _: None, progress=False)


def test_rapnet_sim_reports_a_class_mismatch_without_a_traceback(tmp_path, monkeypatch):
    def refuse(_args):
        raise ClassMismatchError("the dataset has other classes than the model")

    monkeypatch.setattr(cli, "build_parser", lambda: _parser_running(refuse))
    with pytest.raises(SystemExit, match="rapnet-sim: the dataset has other classes"):
        cli.main([])


def _parser_running(func):
    import argparse

    parser = argparse.ArgumentParser()
    parser.set_defaults(func=func)
    return parser
