"""The one place that turns uint8 RGB frames into model input, used by training, evaluation, edge and cloud."""
from __future__ import annotations

import numpy as np
import torch

# Fixed affine normalisation (ours): close to CIFAR's statistics and dataset-independent, so a checkpoint
# never depends on a separately shipped mean/std.
MEAN, STD = 0.5, 0.25


def to_model_input(images: np.ndarray | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """(N, H, W, 3) or (H, W, 3) uint8 RGB -> (N, 3, H, W) float32, normalised."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        raise TypeError(f"expected uint8 RGB pixels, got {x.dtype}")
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) RGB pixels, got shape {tuple(x.shape)}")
    x = x.to(device, non_blocking=True) if device is not None else x
    return (x.permute(0, 3, 1, 2).float().div_(255.0).sub_(MEAN).div_(STD)).contiguous()


def random_crop_flip(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard CIFAR augmentation on a normalised batch, on whatever device it lives: zero-pad, random crop,
    random horizontal flip. Done on the batch at once so the GPU is never waiting on per-image Python."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    gen_device = generator.device if generator is not None else x.device
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=gen_device).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=gen_device).to(x.device)
    flip = torch.rand(n, generator=generator, device=gen_device).to(x.device) < 0.5
    rows = (torch.arange(h, device=x.device)[None, :] + dy[:, None])  # (n, h)
    cols = torch.arange(w, device=x.device)[None, :].expand(n, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + dx[:, None]
    batch_idx = torch.arange(n, device=x.device)[:, None, None, None]
    chan_idx = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch_idx, chan_idx, rows[:, None, :, None], cols[:, None, None, :]]
