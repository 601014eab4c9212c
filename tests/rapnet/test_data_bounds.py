"""What a dataset file may cost to read is bounded before the work: images by the size and bytes per pixel their
header declares (and not decoded where it declares nothing), CIFAR pickles by the bytes the file really holds."""
from __future__ import annotations

import pickle
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from rapnet import data
from rapnet.data import DatasetError, load_dataset


def _png(width: int, height: int, depth: int, colour: int) -> bytes:
    """A PNG of zeros written by hand (any bit depth and colour type; OpenCV writes 8-bit RGB only)."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    row = b"\x00" + bytes(width * channels * depth // 8)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(row * height, 9))
            + chunk(b"IEND", b""))


def _folder(root: Path, payloads: dict[str, bytes]) -> Path:
    for name, payload in payloads.items():
        (root / "train" / "a").mkdir(parents=True, exist_ok=True)
        (root / "train" / "a" / name).write_bytes(payload)
    return root


def test_a_png_is_bounded_by_the_bytes_it_decodes_in_not_only_its_pixels(tmp_path, monkeypatch):
    """16-bit RGBA works in 8 bytes per pixel while decoding: at the pixel limit it takes 8/3 of the memory an 8-bit
    RGB image does (a 0.8 MB file of 100 megapixels peaked at 618 MB)."""
    monkeypatch.setenv(data.MAX_IMAGE_PIXELS_ENV, "1000")
    ok = _folder(tmp_path / "ok", {"x.png": _png(20, 20, 8, 2)})  # 400 px x 3 bytes
    assert load_dataset(ok, "train", cache_dir=tmp_path / "c").images.shape == (1, 20, 20, 3)
    deep = _folder(tmp_path / "deep", {"x.png": _png(20, 20, 16, 6)})  # 400 px x 8 bytes > 1000 px x 3
    with pytest.raises(DatasetError, match="8 bytes per pixel .*RAPNET_MAX_IMAGE_PIXELS"):
        load_dataset(deep, "train", cache_dir=tmp_path / "c")


def test_an_image_whose_header_tells_no_size_is_not_decoded(tmp_path):
    """OpenCV decodes by content, not by name: a PPM named .png would be decoded at whatever size it declares."""
    ppm = b"P6\n16 16\n255\n" + bytes(16 * 16 * 3)
    assert cv2.imdecode(np.frombuffer(ppm, np.uint8), cv2.IMREAD_COLOR) is not None  # OpenCV would decode it
    folder = _folder(tmp_path / "ds", {"x.png": ppm})
    with pytest.raises(DatasetError, match="size cannot be read from its header"):
        load_dataset(folder, "train", cache_dir=tmp_path / "c")


def test_a_cifar_pickle_cannot_expand_shared_rows_into_a_large_array(tmp_path):
    """A pickle may repeat one row by reference: 20,000 rows of 3,072 pixels (61 MB) in a file of about 60 KB. The
    real files hold their pixels as one uint8 array, as large in the file as in memory; nothing else is accepted."""
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a", b"b"]}, protocol=2))
    row = [0] * 3072
    bomb = {b"data": [row] * 20_000, b"labels": [0] * 20_000}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (root / name).write_bytes(pickle.dumps(bomb, protocol=2))
    assert (root / "test_batch").stat().st_size < 100_000
    with pytest.raises(DatasetError, match="not one uint8 array"):
        load_dataset(root, "test", cache_dir=tmp_path / "c")
    rows = np.zeros((2, 3072), np.uint8)
    nested_labels = {b"data": rows, b"labels": [[0] * 1000] * 2}  # labels that would expand in turn
    (root / "test_batch").write_bytes(pickle.dumps(nested_labels, protocol=2))
    with pytest.raises(DatasetError, match="labels"):
        load_dataset(root, "test", cache_dir=tmp_path / "c")
