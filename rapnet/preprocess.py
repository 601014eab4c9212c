"""The one place that turns uint8 RGB frames into model input, used by training, evaluation, edge and cloud.

Two twins over one formula (normalise): to_model_array in numpy, for the edge on ONNX Runtime (no torch), and
to_model_input in torch, for everything that runs the PyTorch model (on any device). Both give bit-identical
float32 values: the same IEEE operations in the same order.
"""
from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where a torch function runs: the edge on ONNX Runtime has none
    import torch

# Fixed affine normalisation (ours): close to CIFAR's statistics and dataset-independent, so a checkpoint
# never depends on a separately shipped mean/std.
MEAN, STD = 0.5, 0.25


def normalise(x):
    """float32 pixel values 0..255 (a numpy array or a torch tensor) -> the model's input scale."""
    return (x / 255.0 - MEAN) / STD


def _check_pixels(dtype_ok: bool, dtype, shape: tuple) -> None:
    if not dtype_ok:
        raise TypeError(f"expected uint8 RGB pixels, got {dtype}")
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) RGB pixels, got shape {tuple(shape)}")


def to_model_array(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) or (H, W, 3) uint8 RGB -> (N, 3, H, W) float32, normalised (numpy; no torch needed)."""
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[None]
    _check_pixels(x.dtype == np.uint8, x.dtype, x.shape)
    return np.ascontiguousarray(normalise(x.transpose(0, 3, 1, 2).astype(np.float32)))


def to_model_input(images: np.ndarray | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """(N, H, W, 3) or (H, W, 3) uint8 RGB -> (N, 3, H, W) float32, normalised (torch, on `device`: uint8 pixels
    travel there and are normalised there)."""
    import torch

    if isinstance(images, np.ndarray) and not images.flags.writeable:  # a memory-mapped dataset split
        with warnings.catch_warnings():  # read only, never written: the result below is a new tensor
            warnings.simplefilter("ignore", UserWarning)
            x = torch.as_tensor(images)
    else:
        x = torch.as_tensor(images)
    if x.ndim == 3:
        x = x.unsqueeze(0)
    _check_pixels(x.dtype == torch.uint8, x.dtype, tuple(x.shape))
    x = x.to(device, non_blocking=True) if device is not None else x
    return normalise(x.permute(0, 3, 1, 2).float()).contiguous()


def random_crop_flip(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """CIFAR-style augmentation on a normalised batch, on whatever device it lives: zero-pad, random crop,
    random horizontal flip. Done on the batch at once so the GPU is never waiting on per-image Python."""
    import torch

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


def random_resized_crop_flip(x: torch.Tensor, scale: tuple[float, float] = (0.35, 1.0),
                             ratio: tuple[float, float] = (3 / 4, 4 / 3),
                             generator: torch.Generator | None = None) -> torch.Tensor:
    """ImageNet-style augmentation on a normalised batch, on its device: each image's random crop (a `scale`
    share of its area, aspect ratio log-uniform in `ratio`, clipped to the image, placed uniformly inside it),
    resized back to the batch's size (bilinear) and flipped horizontally at random. Every sample lies inside
    the image, so no padding enters the batch."""
    import torch

    n, _, h, w = x.shape
    gen_device = generator.device if generator is not None else x.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator, device=gen_device).to(x.device)

    area = uniform(*scale)
    aspect = torch.exp(uniform(math.log(ratio[0]), math.log(ratio[1])))  # crop width / height, in pixels
    crop_w = torch.sqrt(area * aspect * h / w).clamp(max=1.0)  # as shares of the image's width and height
    crop_h = torch.sqrt(area / aspect * w / h).clamp(max=1.0)
    centre_x = (uniform(0.0, 1.0) * 2 - 1) * (1 - crop_w)  # in grid_sample's -1..1 coordinates
    centre_y = (uniform(0.0, 1.0) * 2 - 1) * (1 - crop_h)
    flip = torch.where(uniform(0.0, 1.0) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = crop_w * flip, centre_x
    theta[:, 1, 1], theta[:, 1, 2] = crop_h, centre_y
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# Above this size a CIFAR-layout model is fed camera-like images, and trains with the ImageNet-style augmentation.
LARGE_INPUT = 64


def augment(x: torch.Tensor, layout: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """The training augmentation for a model of `layout` on a normalised batch: random-resized-crop and flip for
    the imagenet layout or inputs above LARGE_INPUT px, else pad-and-crop and flip with the padding an eighth of
    the image's side (4 px at 32 px)."""
    size = max(x.shape[-2:])
    if layout == "imagenet" or size > LARGE_INPUT:
        return random_resized_crop_flip(x, generator=generator)
    return random_crop_flip(x, max(1, round(size / 8)), generator)
