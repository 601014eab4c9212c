"""The training augmentation: pad-and-crop for small CIFAR-layout inputs, random-resized-crop above."""
from __future__ import annotations

import pytest
import torch

from rapnet.preprocess import augment, random_crop_flip, random_resized_crop_flip


def _ramp(n: int, size: int) -> torch.Tensor:
    """Each pixel holds 1 + its column, so a sample's value says where in the image it came from."""
    return (torch.arange(size, dtype=torch.float32) + 1).view(1, 1, 1, size).expand(n, 3, size, size).contiguous()


@pytest.mark.parametrize("size", [32, 96, 224])
@pytest.mark.parametrize("layout", ["cifar", "imagenet"])
def test_augment_keeps_shape_and_device(size: int, layout: str) -> None:
    x = torch.rand(5, 3, size, size)
    y = augment(x, layout, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device


def test_random_resized_crop_stays_within_the_image() -> None:
    x = _ramp(64, 128)
    y = random_resized_crop_flip(x, generator=torch.Generator().manual_seed(1))
    assert y.min() >= 1.0 and y.max() <= 128.0  # no padding or outside sample: every value is an image column
    assert not torch.equal(y, x)
    # The whole image at aspect 1 is the image itself or its mirror image.
    full = random_resized_crop_flip(x, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=torch.Generator().manual_seed(2))
    for a, b in zip(full, x):
        assert min((a - b).abs().max(), (a - b.flip(-1)).abs().max()) < 1e-3
    flipped = sum(bool((a - b.flip(-1)).abs().max() < 1e-3) for a, b in zip(full, x))
    assert 10 < flipped < 54  # about half
    # Crops cover a share of the area within the scale range: a constant image stays constant.
    const = torch.full((8, 3, 64, 64), 0.7)
    assert torch.allclose(random_resized_crop_flip(const), const)


def test_random_resized_crop_is_seeded() -> None:
    x = torch.rand(4, 3, 96, 96)
    a = random_resized_crop_flip(x, generator=torch.Generator().manual_seed(3))
    b = random_resized_crop_flip(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_cifar_layout_pads_in_proportion_to_the_size() -> None:
    for size, padding in ((32, 4), (64, 8)):
        x = _ramp(200, size)
        y = augment(x, "cifar", torch.Generator().manual_seed(0))
        zero_columns = (y == 0).all(dim=2).all(dim=1)  # (n, w): columns taken from the zero padding
        assert int(zero_columns.sum(1).max()) == padding  # the shift reaches the padding, never further
        torch.manual_seed(0)
        same = random_crop_flip(x, padding, torch.Generator().manual_seed(0))
        assert torch.equal(y, same)


def test_large_inputs_use_random_resized_crop_even_in_the_cifar_layout() -> None:
    x = _ramp(16, 96)
    y = augment(x, "cifar", torch.Generator().manual_seed(0))
    assert y.min() >= 1.0  # no zero padding
