"""Checkpoints and model identity.

A checkpoint is a plain dict of tensors, numbers and strings loaded with `weights_only=True`, so loading
never runs code from the file. The model identity is a content hash of the architecture config and every
weight: edge and cloud compare it on every request.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import torch

from .build import build_model
from .config import ModelConfig
from .network import MultiExitNetwork

FORMAT = "rapnet-checkpoint/1"


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message says why and what to do."""


def model_identity(model: MultiExitNetwork) -> str:
    """sha256 over the architecture config and all weights and buffers (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256(json.dumps(model.config.identity_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{t.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def save_checkpoint(path: str | os.PathLike, model: MultiExitNetwork, metadata: dict | None = None, **extra) -> str:
    """Write atomically (tmp + rename) so an interrupted save never leaves a half file. Returns the identity."""
    identity = model_identity(model)
    payload = {
        "format": FORMAT,
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "identity": identity,
        "metadata": json.dumps(metadata or {}),
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


def load_model(path: str | os.PathLike, expected: ModelConfig | None = None) -> tuple[MultiExitNetwork, dict]:
    """Build the model the checkpoint describes and load its weights; returns (model in eval mode, metadata)."""
    payload = read_checkpoint(path)
    try:
        config = ModelConfig.from_dict(payload.get("config"))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: bad model config ({err})") from None
    if expected is not None and config != expected:
        raise CheckpointError(f"{path} holds a {config} model, but {expected} was asked for")
    model = build_model(config)
    try:
        model.load_state_dict(payload.get("state_dict"), strict=True)
    except (RuntimeError, TypeError, AttributeError) as err:
        first = str(err).splitlines()[0]
        raise CheckpointError(f"{path}: weights do not match the architecture in its config ({first})") from None
    identity = model_identity(model)
    if identity != payload.get("identity"):
        raise CheckpointError(f"{path}: content hash mismatch, the file is damaged or was edited")
    try:
        metadata = json.loads(payload.get("metadata") or "{}")
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: metadata is not JSON text ({err})") from None
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: metadata must be a JSON object, got {type(metadata).__name__}")
    metadata["identity"] = identity
    return model.eval(), metadata
