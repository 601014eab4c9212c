"""The model contract: a checkpoint's input size, layout, ordered class names and normalisation, and the checks
every consumer runs against it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rapnet.build import build_model
from rapnet.checkpoint import (CIFAR10_CLASSES, NORMALIZATION, CheckpointError, ClassMismatchError, InputContract,
                               check_classes, load_model, model_identity, read_checkpoint, save_checkpoint)
from rapnet.config import ModelConfig
from rapnet.data import DatasetError, fit_image
from rapnet.preprocess import MEAN, STD

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("kind", ["rapnet", "sdn", "static"])
def test_shipped_checkpoints_read_with_the_cifar10_contract_and_keep_their_identity(kind):
    path = ROOT / "models" / f"{kind}-cifar10.pt"
    assert "normalization" not in json.loads(read_checkpoint(path)["metadata"])  # written before the field existed
    model, meta = load_model(path)
    contract = InputContract.of(model.config, meta)
    assert contract.class_names == CIFAR10_CLASSES == tuple(json.loads(path.with_suffix(".json").read_text())["classes"])
    assert (contract.image_size, contract.layout, contract.mean, contract.std) == (32, "cifar", (MEAN,) * 3, (STD,) * 3)
    assert contract.describe() == "10 classes, 32x32 input, cifar layout"
    recorded = json.loads(path.with_suffix(".json").read_text())["identity"]
    assert model_identity(model) == meta["identity"] == recorded


def test_a_ten_class_checkpoint_without_class_names_reads_as_cifar10(tmp_path):
    model = build_model(ModelConfig(kind="static", width=0.25)).eval()
    save_checkpoint(tmp_path / "m.pt", model)
    _, meta = load_model(tmp_path / "m.pt")
    assert meta["classes"] == list(CIFAR10_CLASSES) and meta["normalization"] == NORMALIZATION


def test_a_new_checkpoint_records_its_contract_outside_its_identity(tmp_path):
    model = build_model(ModelConfig(kind="static", width=0.25, num_classes=3, image_size=64, layout="imagenet")).eval()
    names = ["red", "green", "blue"]
    first = save_checkpoint(tmp_path / "a.pt", model, {"classes": names})
    second = save_checkpoint(tmp_path / "b.pt", model, {"classes": list(reversed(names))})
    assert first == second == model_identity(model)  # the contract lives in the metadata, not in the hash
    stored = json.loads(read_checkpoint(tmp_path / "a.pt")["metadata"])
    assert stored["classes"] == names and stored["normalization"] == NORMALIZATION
    loaded, meta = load_model(tmp_path / "a.pt")
    contract = InputContract.of(loaded.config, meta)
    assert contract == InputContract(64, "imagenet", tuple(names), (MEAN,) * 3, (STD,) * 3)
    assert contract.describe() == "3 classes, 64x64 input, imagenet layout"


def test_class_names_that_do_not_fit_the_outputs_are_refused(tmp_path):
    model = build_model(ModelConfig(kind="static", width=0.25, num_classes=3)).eval()
    with pytest.raises(CheckpointError, match="one per output"):
        save_checkpoint(tmp_path / "m.pt", model, {"classes": ["a", "b"]})
    save_checkpoint(tmp_path / "m.pt", model)  # no names and not 10 outputs: loads, but has no contract
    loaded, meta = load_model(tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="names no classes"):
        InputContract.of(loaded.config, meta)


def test_another_normalisation_is_refused(tmp_path):
    model = build_model(ModelConfig(kind="static", width=0.25)).eval()
    with pytest.raises(CheckpointError, match="normalises its input"):
        save_checkpoint(tmp_path / "m.pt", model, {"classes": list(CIFAR10_CLASSES),
                                                    "normalization": {"mean": [0.485, 0.456, 0.406],
                                                                      "std": [0.229, 0.224, 0.225]}})


def test_a_dataset_with_other_class_names_is_refused_naming_both_lists():
    with pytest.raises(ClassMismatchError) as err:
        check_classes(CIFAR10_CLASSES, ["cat", "dog"], model="models/m.pt", data="pets/")
    message = str(err.value)
    assert isinstance(err.value, DatasetError)  # the CLIs report it like any other data error
    assert str(list(CIFAR10_CLASSES)) in message and "['cat', 'dog']" in message
    assert "models/m.pt" in message and "pets/" in message and "order" not in message


def test_the_same_class_names_in_another_order_are_refused_and_said_so():
    shuffled = ["automobile", "airplane", *CIFAR10_CLASSES[2:]]
    with pytest.raises(ClassMismatchError, match="in another order") as err:
        check_classes(CIFAR10_CLASSES, shuffled)
    assert str(list(CIFAR10_CLASSES)) in str(err.value) and str(shuffled) in str(err.value)
    assert "0: airplane vs automobile" in str(err.value)
    check_classes(CIFAR10_CLASSES, list(CIFAR10_CLASSES))  # the same list passes


def test_images_of_another_size_are_brought_to_the_models_size_by_fit_image():
    contract = InputContract(32, "cifar", CIFAR10_CLASSES, (MEAN,) * 3, (STD,) * 3)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 64, 80, 3), dtype=np.uint8)
    fitted = contract.fit(images)
    assert fitted.shape == (3, 32, 32, 3)
    assert all(np.array_equal(f, fit_image(i, 32)) for f, i in zip(fitted, images))
    assert np.array_equal(contract.fit(images[0]), fit_image(images[0], 32))
    same = images[:, :32, :32]
    assert contract.fit(same) is same  # already the model's size: untouched


def test_the_contract_names_a_models_outputs():
    model = build_model(ModelConfig(kind="static", width=0.25)).eval()
    contract = InputContract.of(model.config, {"classes": list(CIFAR10_CLASSES)})
    with torch.inference_mode():
        logits = model.run_to_exit(torch.zeros(1, 3, 32, 32), 0)
    assert logits.shape[1] == contract.num_classes == len(contract.class_names)


# --- every consumer runs the check ----------------------------------------------------------------------------
def _image_folder(root: Path, classes, splits=("train", "test"), per_class: int = 4) -> Path:
    import cv2

    rng = np.random.default_rng(0)
    for split in splits:
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                cv2.imwrite(str(root / split / name / f"{i}.png"), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    return root


def _small_checkpoint(path: Path, classes, kind: str = "rapnet", metadata: dict | None = None) -> Path:
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind=kind, width=0.25, num_classes=len(classes))).eval()
    save_checkpoint(path, model, {"classes": list(classes), **(metadata or {})})
    return path


def test_rapnet_eval_refuses_a_dataset_with_other_classes(tmp_path):
    from rapnet import evaluate

    checkpoint = _small_checkpoint(tmp_path / "rapnet.pt", ["blue", "green", "red"])
    data = _image_folder(tmp_path / "data", ["cat", "dog", "eel"])
    with pytest.raises(SystemExit) as err:
        evaluate.main(["--checkpoint", str(checkpoint), "--data", str(data), "--cache-dir", str(tmp_path / "cache"),
                       "--out", str(tmp_path / "eval")])
    message = str(err.value)
    assert message.startswith("rapnet-eval: ") and "other classes" in message
    assert "['blue', 'green', 'red']" in message and "['cat', 'dog', 'eel']" in message


def test_rapnet_eval_refuses_a_baseline_with_other_classes(tmp_path):
    from rapnet import evaluate

    checkpoint = _small_checkpoint(tmp_path / "rapnet.pt", ["blue", "green", "red"])
    _small_checkpoint(tmp_path / "static.pt", ["red", "green", "blue"], kind="static")
    with pytest.raises(SystemExit, match="in another order"):
        evaluate.main(["--checkpoint", str(checkpoint), "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path)])


def test_predictor_refit_refuses_a_dataset_with_other_classes(tmp_path):
    from rapnet import train

    checkpoint = _small_checkpoint(tmp_path / "rapnet.pt", ["blue", "green", "red"])
    data = _image_folder(tmp_path / "data", ["blue", "green", "yellow"], splits=("train",))
    with pytest.raises(SystemExit, match=r"other classes.*'red'.*'yellow'"):
        train.main(["--predictor-only", str(checkpoint), "--data", str(data), "--cache-dir", str(tmp_path / "cache"),
                    "--out", str(tmp_path / "out")])


def test_a_teacher_with_other_classes_is_refused(tmp_path):
    from rapnet import train

    teacher = _small_checkpoint(tmp_path / "static.pt", ["blue", "green", "red"], kind="static", metadata={
        "seed": 0, "split": {"val": 6}, "train_config": {"limit_train": 0}})
    data = _image_folder(tmp_path / "data", ["blue", "green", "yellow"], splits=("train",))
    with pytest.raises(SystemExit, match=r"other classes than teacher .*static.pt.*yellow"):
        train.main(["--data", str(data), "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run"),
                    "--models", "rapnet", "--val-size", "6", "--teacher", str(teacher)])


def test_resuming_an_interrupted_run_on_other_classes_is_refused(tmp_path):
    from rapnet import train

    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="static", width=0.25, num_classes=2))
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    split = train.Split(images, torch.tensor([0, 1] * 4))
    cfg = train.TrainConfig(epochs=1, batch_size=8)
    state = tmp_path / "static.state.pt"
    train.train_network(model, split, split, cfg, torch.device("cpu"), state, [], classes=["cat", "dog"])
    assert json.loads(torch.load(state, weights_only=True)["classes"]) == ["cat", "dog"]
    with pytest.raises(ClassMismatchError, match="interrupted run"):
        train.train_network(model, split, split, train.TrainConfig(epochs=2, batch_size=8), torch.device("cpu"), state,
                            [], classes=["cat", "eel"])
