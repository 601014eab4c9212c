"""Every exit's answer per image, and the predictor's scores: what the exit rules (rapnet.exit_rules) read.
Collected once per model and data set, by the evaluation and by the simulator's trace builder.

    traces = collect_traces(model, images, labels)          # Traces(correct, confidence, scores)
    cal_idx = calibration_indices(len(train), meta, has_predictor=True)

The rules' settings are tuned on the calibration part of the validation split, never on the test set.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .checkpoint import CheckpointError
from .data import RANDOM_PREDICTOR_SPLIT, predictor_calibration_split, train_val_split
from .network import MultiExitNetwork
from .preprocess import to_model_input


def calibration_indices(n_train: int, meta: dict, has_predictor: bool) -> np.ndarray:
    """Training-archive indices of the calibration part: held out from training, never fitted by the predictor."""
    split = meta.get("split", {})
    if has_predictor and split.get("predictor_split") != RANDOM_PREDICTOR_SPLIT:
        raise CheckpointError(
            "this checkpoint's predictor was fitted on a slice of the class-sorted validation indices (classes 0-7), "
            "so no class-mixed calibration part exists for it: refit the predictor with "
            "`rapnet-train --predictor-only CHECKPOINT --out DIR`"
        )
    seed = meta.get("seed", 0)
    _, val_idx = train_val_split(n_train, split.get("val", 5000), seed=seed)
    return predictor_calibration_split(val_idx, split.get("predictor_fit", int(0.8 * len(val_idx))), seed)[1]


@dataclass
class Traces:
    """Everything a policy needs, per sample: every exit's logits-derived answers and the predictor's scores."""

    correct: np.ndarray  # (N, K) bool
    confidence: np.ndarray  # (N, K) top softmax probability
    scores: np.ndarray | None  # (N, K) predictor probabilities (RAPNet only)


@torch.no_grad()
def collect_traces(model: MultiExitNetwork, images: np.ndarray, labels: np.ndarray, batch_size: int = 64) -> Traces:
    """Every exit's answers on `images`, in batches of `batch_size`. Small batches keep each activation below
    glibc's mmap threshold, so its memory is reused instead of faulted in afresh: at 500 images a batch, a
    CIFAR-size forward spent more time in the kernel than in torch."""
    model.eval()
    correct, confidence, scores = [], [], []
    for i in range(0, len(images), batch_size):
        x = to_model_input(images[i : i + batch_size])
        probs = torch.stack([torch.softmax(z, 1) for z in model(x)], 1)  # (B, K, C)
        conf, pred = probs.max(2)
        correct.append((pred == torch.as_tensor(labels[i : i + batch_size])[:, None]).numpy())
        confidence.append(conf.numpy())
        if model.predictor is not None:
            scores.append(model.exit_scores(x).numpy())
    return Traces(np.concatenate(correct), np.concatenate(confidence), np.concatenate(scores) if scores else None)
