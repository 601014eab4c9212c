"""Checkpoints, model identity and the model contract.

A checkpoint is a plain dict of tensors, numbers and strings loaded with `weights_only=True`, so loading
never runs code from the file. The model identity is a content hash of the architecture config and every
weight: edge and cloud compare it on every request.

The model contract (InputContract) is what a checkpoint promises about its input and output: the image size and
stride layout (its config), the ordered class names its outputs mean and the normalisation its pixels go through
(its metadata). Data is checked against it (check_classes) and brought to its size by its own preprocessing
(InputContract.fit). The metadata is not part of the identity, so checkpoints written without class names or
normalisation (the shipped CIFAR-10 ones) read with the CIFAR-10 defaults and keep their identity.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .config import ModelConfig
from .data import DatasetError, fit_image
from .preprocess import MEAN, STD

if TYPE_CHECKING:  # torch loads where a checkpoint is read or written: the contract below is read without it
    from .network import MultiExitNetwork

FORMAT = "rapnet-checkpoint/1"
# The class names a 10-class checkpoint without "classes" in its metadata is read with (CIFAR-10's label order).
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# The normalisation rapnet.preprocess applies, per RGB channel on pixels scaled to 0..1, as checkpoints record it.
NORMALIZATION = {"mean": [MEAN] * 3, "std": [STD] * 3}


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message says why and what to do."""


class ClassMismatchError(DatasetError):
    """Data whose classes are not the model's (other names, or the same names in another order)."""


def check_classes(model_classes, dataset_classes, model: str = "the model", data: str = "the dataset") -> None:
    """Refuse data labelled with other classes than the model's outputs, naming both lists. The order matters:
    label k of the data must mean what output k of the model means."""
    ours, theirs = list(model_classes), list(dataset_classes)
    if ours == theirs:
        return
    if sorted(ours) == sorted(theirs):
        moved = [f"{k}: {a} vs {b}" for k, (a, b) in enumerate(zip(ours, theirs)) if a != b]
        raise ClassMismatchError(
            f"{data} has the same {len(ours)} class names as {model} but in another order, so its labels would be "
            f"scored against the wrong outputs (label: model's class vs data's: {', '.join(moved[:5])}"
            f"{', ...' if len(moved) > 5 else ''}). Classes of {model}: {ours}; of {data}: {theirs}. Use the data in "
            "the layout the model was trained on.")
    raise ClassMismatchError(
        f"{data} has other classes than {model}. Classes of {model} ({len(ours)}): {ours}; of {data} "
        f"({len(theirs)}): {theirs}. Use data labelled with the model's classes, or a model trained on this data.")


@dataclass(frozen=True)
class InputContract:
    """What a checkpoint takes and what its outputs mean (not the wire contract, rapnet.codec.ModelContract)."""

    image_size: int  # square input side, px
    layout: str  # the backbone's stride layout ("cifar" or "imagenet")
    class_names: tuple[str, ...]  # output k means class_names[k]
    mean: tuple[float, float, float]  # per RGB channel, on pixels scaled to 0..1
    std: tuple[float, float, float]

    @classmethod
    def of(cls, config: ModelConfig, metadata: dict, where: str = "checkpoint") -> "InputContract":
        """The contract of a checkpoint with this config and metadata (defaults for what older ones lack)."""
        classes = metadata.get("classes")
        if classes is None:
            if config.num_classes != len(CIFAR10_CLASSES):
                raise CheckpointError(f"{where} names no classes for its {config.num_classes} outputs (no \"classes\" in "
                                      "its metadata): retrain it with rapnet-train, which records them")
            classes = CIFAR10_CLASSES
        if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes) \
                or len(classes) != config.num_classes:
            raise CheckpointError(f"{where}: its metadata names the classes {classes!r}, which are not "
                                  f"{config.num_classes} strings, one per output: the file was edited or is damaged")
        norm = metadata.get("normalization") or NORMALIZATION
        try:
            mean, std = tuple(float(v) for v in norm["mean"]), tuple(float(v) for v in norm["std"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{where}: bad normalisation in its metadata ({norm!r})") from None
        if mean != tuple(NORMALIZATION["mean"]) or std != tuple(NORMALIZATION["std"]):
            raise CheckpointError(f"{where} normalises its input with mean {list(mean)}, std {list(std)}; rapnet's one "
                                  f"preprocessing (rapnet.preprocess) uses mean {NORMALIZATION['mean']}, std "
                                  f"{NORMALIZATION['std']}: retrain it with rapnet-train")
        return cls(config.image_size, config.layout, tuple(classes), mean, std)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def describe(self) -> str:
        """e.g. "10 classes, 32x32 input, cifar layout"."""
        return f"{self.num_classes} classes, {self.image_size}x{self.image_size} input, {self.layout} layout"

    def check_classes(self, dataset_classes, data: str = "the dataset", model: str = "the model") -> None:
        check_classes(self.class_names, dataset_classes, model=model, data=data)

    def fit(self, images: np.ndarray) -> np.ndarray:
        """uint8 RGB images, (H, W, 3) or (N, H, W, 3), brought to the model's size by its own preprocessing
        (rapnet.data.fit_image: resize the shorter side, centre crop); already that size: returned as they are."""
        size = self.image_size
        if images.shape[-3:-1] == (size, size):
            return images
        if images.ndim == 3:
            return fit_image(images, size)
        return np.stack([fit_image(image, size) for image in images]) if len(images) \
            else np.zeros((0, size, size, 3), np.uint8)


def model_identity(model: MultiExitNetwork) -> str:
    """sha256 over the architecture config and all weights and buffers (names, dtypes, shapes, bytes)."""
    import torch

    digest = hashlib.sha256(json.dumps(model.config.identity_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{t.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def save_checkpoint(path: str | os.PathLike, model: MultiExitNetwork, metadata: dict | None = None, **extra) -> str:
    """Write atomically (tmp + rename) so an interrupted save never leaves a half file. Returns the identity.
    The metadata's "classes" (the model's ordered class names) are checked against the model and its
    "normalization" is filled in with rapnet.preprocess's: with the config, the model contract."""
    import torch

    metadata = {**(metadata or {})}
    metadata.setdefault("normalization", NORMALIZATION)
    if "classes" in metadata:
        InputContract.of(model.config, metadata, str(path))
    identity = model_identity(model)
    payload = {
        "format": FORMAT,
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "identity": identity,
        "metadata": json.dumps(metadata),
        **extra,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return identity


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The raw checkpoint dict, refusing anything that is not one of ours."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: pass --checkpoint with a file rapnet-train wrote")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refused {path}: it holds pickled objects other than tensors and plain data ({err.__class__.__name__}); "
            "loading it could run code. Use a checkpoint written by rapnet-train."
        ) from None
    except Exception as err:  # noqa: BLE001 - on a non-torch file (text, garbage) the weights-only unpickler
        # raises almost anything (KeyError, struct.error, IndexError, RuntimeError, EOFError...): all mean "unusable"
        raise CheckpointError(f"cannot read checkpoint {path}: truncated or not a torch file ({err}). Re-copy or retrain it.") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a RAPNet checkpoint (expected format {FORMAT!r})")
    return payload


def check_state_dict(expected: dict, weights, where: str) -> None:
    """Refuse weights (CheckpointError) unless they are exactly the tensors `expected` lays out (names, shapes and
    dtypes of a state dict, e.g. one on the meta device): the network is never built from a config they contradict."""
    import torch

    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"{where}: its weights are not a mapping of names to tensors: the file is damaged")
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    wrong = [f"{name} {tuple(weights[name].shape)} {weights[name].dtype} (the config: {tuple(t.shape)} {t.dtype})"
             for name, t in expected.items()
             if name in weights and (weights[name].shape != t.shape or weights[name].dtype != t.dtype)]
    if missing or unexpected or wrong:
        parts = [f"{len(missing)} missing ({', '.join(missing[:3])})" if missing else "",
                 f"{len(unexpected)} unexpected ({', '.join(str(n)[:80] for n in unexpected[:3])})" if unexpected else "",
                 f"{len(wrong)} of another shape or dtype ({'; '.join(wrong[:2])})" if wrong else ""]
        raise CheckpointError(f"{where}: weights do not match the architecture in its config: "
                              f"{', '.join(p for p in parts if p)}")


def load_model(path: str | os.PathLike, expected: ModelConfig | None = None) -> tuple[MultiExitNetwork, dict]:
    """Build the model the checkpoint describes and load its weights; returns (model in eval mode, metadata).
    The metadata's "classes" and "normalization" hold the model contract, with CIFAR-10's class names and
    rapnet.preprocess's normalisation where a 10-class checkpoint lacks them (InputContract.of reads it)."""
    import torch

    from .build import build_model

    payload = read_checkpoint(path)
    try:
        config = ModelConfig.from_dict(payload.get("config"))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: bad model config ({err})") from None
    if expected is not None and config != expected:
        raise CheckpointError(f"{path} holds a {config} model, but {expected} was asked for")
    # The network is laid out on the meta device (shapes only, no memory) and checked against the weights the file
    # holds before any of it is real: a config that claims a huge network costs nothing, and the weights then
    # become the network's own tensors (assign), so loading allocates no more than the file holds.
    weights = payload.get("state_dict")
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"{path}: its weights are not a mapping of names to tensors: the file is damaged")
    try:
        with torch.device("meta"):
            model = build_model(config)
    except Exception as err:  # noqa: BLE001 - a config that passed its bounds but still builds no network
        raise CheckpointError(f"{path}: its model config builds no network ({err.__class__.__name__}: "
                              f"{str(err)[:200]})") from None
    check_state_dict(model.state_dict(), weights, str(path))
    model.load_state_dict(weights, strict=True, assign=True)
    identity = model_identity(model)
    if identity != payload.get("identity"):
        raise CheckpointError(f"{path}: content hash mismatch, the file is damaged or was edited")
    try:
        metadata = json.loads(payload.get("metadata") or "{}")
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: metadata is not JSON text ({err})") from None
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: metadata must be a JSON object, got {type(metadata).__name__}")
    if "classes" in metadata or config.num_classes == len(CIFAR10_CLASSES):
        contract = InputContract.of(config, metadata, str(path))
        metadata["classes"] = list(contract.class_names)
        metadata["normalization"] = {"mean": list(contract.mean), "std": list(contract.std)}
    metadata["identity"] = identity
    return model.eval(), metadata
