"""Where the shipped models are.

The trained checkpoints ship with the project (``models/<kind>-<dataset>.pt`` with a ``.json`` metadata
file beside each). They are found, in this order:

1. ``$RAPNET_MODELS``, when set: a folder holding the checkpoints;
2. ``rapnet/models/`` inside the installed package (a non-editable install: ``pip install .`` carries them
   there as package data);
3. ``models/`` at the top of the checkout this package is imported from (a checkout or an editable install).
"""
from __future__ import annotations

import os
from pathlib import Path

MODELS_ENV = "RAPNET_MODELS"
KINDS = ("rapnet", "sdn", "static")
# The camera-resolution set: what cameras, streams, videos and folders of photographs are classified with.
CAMERA_DATASET = "imagenette"

_PACKAGE = Path(__file__).resolve().parent


def _holds_checkpoints(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("*.pt"))


def models_dir() -> Path:
    """The folder that holds the shipped checkpoints (see the module docstring for the search order).

    Always returns a path, even when no folder holds checkpoints (then the checkout's ``models/``), so that a
    command's --help can show it; loading a missing checkpoint fails with a message that names it."""
    override = os.environ.get(MODELS_ENV)
    if override:
        return Path(override).expanduser()
    for folder in (_PACKAGE / "models", _PACKAGE.parent / "models"):
        if _holds_checkpoints(folder):
            return folder
    return _PACKAGE.parent / "models"


def default_checkpoint(kind: str = "rapnet", dataset: str = "cifar10") -> Path:
    """The shipped checkpoint of this kind (rapnet, sdn or static) trained on this dataset."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}: expected one of {', '.join(KINDS)}")
    return models_dir() / f"{kind}-{dataset}.pt"


def default_checkpoints(dataset: str = "cifar10", folder: str | os.PathLike | None = None) -> dict[str, Path]:
    """Every kind's checkpoint for this dataset: the shipped ones, or those in `folder` when given."""
    base = Path(folder) if folder is not None else models_dir()
    return {kind: base / f"{kind}-{dataset}.pt" for kind in KINDS}


def model_for(dataset: str | None = None, kind: str = "rapnet") -> Path:
    """The shipped checkpoint for a dataset's images: the dataset's own set where one ships, else the
    camera-resolution set (CAMERA_DATASET), which is also the model for cameras, streams and other images."""
    if dataset:
        own = default_checkpoint(kind, dataset)
        if own.exists():
            return own
    return default_checkpoint(kind, CAMERA_DATASET)
