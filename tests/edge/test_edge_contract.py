"""The edge agent keeps the model contract: it says at start-up what it classifies at, fits every frame to the
model's input size with the model's own preprocessing, refuses labelled data with other classes, and names its
answers with the model's class names. The cloud address points at a closed port, so no cloud tier starts."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from edge import agent as edge_agent
from rapnet.build import build_model
from rapnet.checkpoint import save_checkpoint
from rapnet.config import ModelConfig
from rapnet.data import fit_image
from rapnet.preprocess import to_model_input

MODEL_CLASSES = ["blue", "green", "red"]  # the order an ImageFolder tree of these names loads in


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_and_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(ModelConfig(width=0.25, num_classes=3)).eval()
    path = tmp_path_factory.mktemp("contract") / "rapnet.pt"
    save_checkpoint(path, model, {"classes": MODEL_CLASSES})
    return model, str(path)


def _image_folder(root: Path, classes, per_class: int = 2, size: tuple[int, int] = (64, 64)) -> Path:
    rng = np.random.default_rng(0)
    for name in classes:
        (root / "test" / name).mkdir(parents=True)
        for i in range(per_class):
            cv2.imwrite(str(root / "test" / name / f"{i}.png"), rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    return root


def _flags(checkpoint: str, *source: str) -> list[str]:
    return [*source, "--checkpoint", checkpoint, "--cloud", f"127.0.0.1:{_free_port()}", "--fixed-network",
            "--device-gflops", "10", "--calibration-frames", "2", "--deadline-ms", "300", "--quiet",
            "--runtime", "torch"]  # the runtime is not what these tests are about: no ONNX export of their checkpoints


@pytest.mark.parametrize("folders, expected", [
    (["cat", "dog", "eel"], "other classes"),
    (["red", "green", "blue"], "in another order"),
])
def test_the_agent_refuses_a_dataset_with_other_classes(model_and_checkpoint, tmp_path, capsys, folders, expected):
    _, checkpoint = model_and_checkpoint
    # sorted folder names: the "another order" case saves the model with them unsorted
    if expected == "in another order":
        model = build_model(ModelConfig(width=0.25, num_classes=3)).eval()
        checkpoint = str(tmp_path / "unsorted.pt")
        save_checkpoint(checkpoint, model, {"classes": folders})
    data = _image_folder(tmp_path / "data", folders, per_class=1)
    assert edge_agent.main(_flags(checkpoint, "--dataset", str(data))) == edge_agent.EXIT_USAGE
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    model_classes = folders if expected == "in another order" else MODEL_CLASSES
    assert str(model_classes) in err and str(sorted(folders)) in err


def test_the_agent_says_what_it_classifies_at(model_and_checkpoint, tmp_path):
    _, checkpoint = model_and_checkpoint
    data = _image_folder(tmp_path / "data", MODEL_CLASSES, per_class=1)
    lines: list[str] = []
    app = edge_agent.build_app(_flags(checkpoint, "--dataset", str(data)), log=lines.append)
    edge_agent.close_app(app)
    assert "model: RAPNet, 3 classes, 32x32 input, cifar layout" in lines
    assert app.contract.class_names == tuple(MODEL_CLASSES)


def test_larger_images_are_fitted_by_the_models_preprocessing_and_named_by_the_model(model_and_checkpoint, tmp_path):
    """A folder of 64x80 images through a 32-px model: each answer is the model's answer on fit_image's 32x32
    version at the exit the agent reports, named with the model's class names."""
    model, checkpoint = model_and_checkpoint
    folder = _image_folder(tmp_path / "images", MODEL_CLASSES, per_class=2, size=(64, 80))
    out = tmp_path / "out.jsonl"
    app = edge_agent.build_app([*_flags(checkpoint, "--images", str(folder)), "--output", str(out)], log=lambda _: None)
    try:
        edge_agent.run_app(app)
    finally:
        edge_agent.close_app(app)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    files = sorted(p for p in folder.rglob("*.png"))
    assert len(lines) == len(files) == 6
    with torch.inference_mode():
        for line, path in zip(lines, files):
            rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
            expected = int(model.run_to_exit(to_model_input(fit_image(rgb, 32)), line["exit"]).argmax(1)[0])
            assert line["class"] == expected and line["class_name"] == MODEL_CLASSES[expected]
