"""Dataset discovery, loading and caching.

Every supported layout is decoded once into a uint8 (N, H, W, 3) RGB array at the requested size and cached as
an .npy file, written row by row while decoding and memory-mapped when loaded, so memory use does not grow with
the split's size and later runs start in well under a second. What is decoded is bounded first: an archive
member's or file's size, and an image's pixel count and decoded bytes (its bit depth and channels) read from its
header; an image whose header this module cannot read is not decoded. A CIFAR pickle must hold its pixels as a
uint8 array, so a few bytes of shared references cannot expand into a large cache.

A dataset with train and val splits only (Imagenette) uses val as its test split; the validation split for
calibration is carved from train, as for every dataset.

Supported layouts (auto-detected):
  * tar / tar.gz / tgz archive of an ImageFolder tree: ``[top/]split/class/image``
  * ImageFolder directory: ``root/split/class/image``
  * torchvision pickles: ``cifar-10-batches-py/`` and ``cifar-100-python/`` (fine labels)
  * Tiny ImageNet: ``tiny-imagenet-200/``

Only numpy, cv2 and the standard library are used here; torch is not needed to load data.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import pickle
import re
import struct
import sys
import tarfile
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator, Sequence

import cv2
import numpy as np

# Bump whenever decoding/resizing changes, so stale caches are never reused.
LOADER_VERSION = 1

DEFAULT_SEARCH_ENV = "RAPNET_DATA"
CACHE_ENV = "RAPNET_CACHE"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
ARCHIVE_EXTS = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz")
SPLITS = ("train", "test", "val")
MAX_IMAGE_PIXELS_ENV = "RAPNET_MAX_IMAGE_PIXELS"
MAX_IMAGE_BYTES_ENV = "RAPNET_MAX_IMAGE_BYTES"
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000  # a 100-megapixel photograph decodes to 300 MB
DEFAULT_MAX_IMAGE_BYTES = 64 << 20  # one encoded image file or archive member
WRITE_WINDOW_BYTES = 64 << 20  # decoded rows mapped at once while a cache file is written

# Folder/file names each dataset name is known under, in order of preference.
_ALIASES: dict[str, tuple[str, ...]] = {
    "cifar10": ("cifar10", "cifar-10", "cifar-10-batches-py"),
    "cifar100": ("cifar100", "cifar-100", "cifar-100-python"),
    "tiny-imagenet": ("tiny-imagenet-200", "tiny-imagenet", "tinyimagenet"),
}

_FIX_HINT = (
    "Pass the dataset explicitly (--data PATH) or set RAPNET_DATA=PATH, where PATH is the dataset "
    "archive/folder or a folder that contains it."
)


class DatasetError(Exception):
    """A dataset could not be found or read; the message says what was wrong and how to fix it."""


class MixedSizesError(DatasetError):
    """A split's images differ in size and no common size was asked for. The message names the API's
    `image_size=N`; a command-line tool says `hint(flag)` instead, with its own flag."""

    def __init__(self, where: str, first: tuple[str, tuple[int, ...]], other: tuple[str, tuple[int, ...]]):
        (self.first_name, a), (self.other_name, b) = first, other
        self.detail = (f"Images in {where} have different sizes ({self.first_name} is {a[1]}x{a[0]}, {self.other_name} "
                       f"is {b[1]}x{b[0]}).")
        super().__init__(self.hint("image_size=N"))

    def hint(self, option: str) -> str:
        return f"{self.detail} Pass {option} to load them at N x N (shorter side resized to N, then centre-cropped)."


@dataclass
class ImageDataset:
    images: np.ndarray  # (N, H, W, 3) uint8, RGB
    labels: np.ndarray  # (N,) int64
    classes: list[str]  # label order
    source: str  # where it came from (path)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: Sequence[int] | np.ndarray) -> "ImageDataset":
        idx = np.asarray(indices, dtype=np.int64)
        return ImageDataset(self.images[idx], self.labels[idx], list(self.classes), self.source)


# --------------------------------------------------------------------------------------------------
# Locating datasets
# --------------------------------------------------------------------------------------------------


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def default_search_roots() -> list[Path]:
    """Folders searched when neither an explicit path nor $RAPNET_DATA is given."""
    roots = [
        Path.cwd() / ".." / "shared" / "datasets",
        _repo_root().parent / "shared" / "datasets",
        Path.home() / ".cache" / "rapnet" / "datasets",
        Path.cwd() / "data",
    ]
    unique: list[Path] = []
    for r in roots:
        r = Path(os.path.abspath(r))  # normalise ".." without requiring existence
        if r not in unique:
            unique.append(r)
    return unique


def _aliases(name: str) -> tuple[str, ...]:
    key = name.lower()
    for canonical, names in _ALIASES.items():
        if key == canonical or key in names:
            return names
    return (name,)


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def _is_archive_name(p: Path) -> bool:
    return p.name.lower().endswith(ARCHIVE_EXTS)


def _find_in_root(root: Path, name: str) -> Path | None:
    """Find a dataset called `name` inside the search folder `root`, or None."""
    if not root.is_dir():
        return None
    names = _aliases(name)
    for alias in names:
        base = root / alias
        if detect_format(base) is not None:
            return base
        for ext in ARCHIVE_EXTS:
            if (root / (alias + ext)).is_file():
                return root / (alias + ext)
        if base.is_dir():
            # Nested layouts, e.g. cifar10/cifar-10-batches-py or cifar10/cifar10-jpeg.tar.gz.
            for inner in names:
                if inner != alias and detect_format(base / inner) is not None:
                    return base / inner
            wanted = {_norm(n) for n in names}
            archives = sorted(
                p for p in base.iterdir()
                if p.is_file() and _is_archive_name(p) and any(w in _norm(p.name) for w in wanted)
            )
            if archives:
                return archives[0]
    return None


def _searched_names(name: str) -> str:
    names = _aliases(name)
    exts = "|".join(e.lstrip(".") for e in ARCHIVE_EXTS)
    return (", ".join(f"{n}/, {n}.{{{exts}}}" for n in names)
            + f", and archives named like them inside {names[0]}/")


def locate_dataset(path: str | os.PathLike | None = None, name: str = "cifar10") -> Path:
    """Return the path of dataset `name`.

    Order: explicit `path`, then $RAPNET_DATA, then :func:`default_search_roots`. An explicit path or
    $RAPNET_DATA may be the dataset itself or a folder containing it.
    """
    explicit: list[tuple[Path, str]] = []
    if path is not None:
        explicit.append((Path(path).expanduser(), "given path"))
    elif os.environ.get(DEFAULT_SEARCH_ENV):
        explicit.append((Path(os.environ[DEFAULT_SEARCH_ENV]).expanduser(), f"${DEFAULT_SEARCH_ENV}"))

    for p, what in explicit:
        # The user asked for this place explicitly: never silently fall back to another one.
        if not p.exists():
            raise DatasetError(
                f"Dataset path {p} ({what}) does not exist. Check the spelling, or point --data / "
                f"{DEFAULT_SEARCH_ENV} at an existing dataset archive or folder."
            )
        if detect_format(p) is not None:
            return p.resolve()
        found = _find_in_root(p, name)
        if found is not None:
            return found.resolve()
        raise DatasetError(
            f"{p} ({what}) exists but is not a recognised dataset and contains no '{name}' dataset "
            f"(looked for {_searched_names(name)}). Accepted layouts: tar/tar.gz of split/class/image, "
            "an ImageFolder directory split/class/image, cifar-10-batches-py/, cifar-100-python/, "
            "tiny-imagenet-200/. Point --data at one of those."
        )

    looked: list[str] = []
    for root in default_search_roots():
        found = _find_in_root(root, name)
        if found is not None:
            return found.resolve()
        looked.append(f"  - {root}" + ("" if root.is_dir() else "  (does not exist)"))
    raise DatasetError(
        f"Could not find dataset '{name}'. {DEFAULT_SEARCH_ENV} is not set; searched these folders for "
        f"{_searched_names(name)}:\n" + "\n".join(looked) + "\n" + _FIX_HINT
    )


def detect_format(path: Path) -> str | None:
    """Return 'tar', 'cifar10', 'cifar100', 'tinyimagenet', 'imagefolder' or None."""
    path = Path(path)
    if path.is_file():
        if _is_archive_name(path):
            return "tar"
        try:
            return "tar" if tarfile.is_tarfile(path) else None
        except OSError:
            return None
    if not path.is_dir():
        return None
    if (path / "batches.meta").is_file() or (path / "data_batch_1").is_file():
        return "cifar10"
    if (path / "meta").is_file() and ((path / "train").is_file() or (path / "test").is_file()):
        return "cifar100"
    if (path / "wnids.txt").is_file():
        return "tinyimagenet"
    if any((path / s).is_dir() for s in SPLITS):
        return "imagefolder"
    return None


# --------------------------------------------------------------------------------------------------
# Decoding helpers
# --------------------------------------------------------------------------------------------------


def is_image_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    # Skip hidden files and macOS "._x.jpg" resource forks that tar on macOS adds.
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTS)


def _positive_limit(env: str, default: int) -> int:
    raw = os.environ.get(env)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise DatasetError(f"${env}={raw!r} is not a positive integer; unset it or give a number.")
    return value


def max_image_pixels() -> int:
    """The most pixels one image may have to be decoded ($RAPNET_MAX_IMAGE_PIXELS, default 100 million)."""
    return _positive_limit(MAX_IMAGE_PIXELS_ENV, DEFAULT_MAX_IMAGE_PIXELS)


def max_image_bytes() -> int:
    """The largest encoded image file or archive member read ($RAPNET_MAX_IMAGE_BYTES, default 64 MiB)."""
    return _positive_limit(MAX_IMAGE_BYTES_ENV, DEFAULT_MAX_IMAGE_BYTES)


def _check_file_size(size: int, what: str) -> None:
    limit = max_image_bytes()
    if size > limit:
        raise DatasetError(
            f"Image {what} is {size:,} bytes, above the limit of {limit:,} bytes on one image file. "
            f"Remove it from the dataset, or raise ${MAX_IMAGE_BYTES_ENV} (bytes) if it is a genuine image."
        )


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame: precision, height, width
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return width, height
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    order = "<" if data[:2] == b"II" else ">"
    offset = struct.unpack(order + "I", data[4:8])[0]
    count = struct.unpack(order + "H", data[offset:offset + 2])[0]
    found: dict[int, int] = {}
    for k in range(count):
        entry = data[offset + 2 + 12 * k:offset + 14 + 12 * k]
        tag, kind = struct.unpack(order + "HH", entry[:4])
        if tag in (256, 257):  # ImageWidth, ImageLength: SHORT or LONG
            found[tag] = struct.unpack(order + ("H" if kind == 3 else "I"), entry[8:10] if kind == 3 else entry[8:12])[0]
    return (found[256], found[257]) if 256 in found and 257 in found else None


def image_header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) read from an encoded image's header without decoding it (PNG, JPEG, BMP, WebP, TIFF), or
    None where the header is none of those or cannot be read."""
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
            width, height = struct.unpack(">II", data[16:24])
            return width, height
        if data[:2] == b"\xff\xd8":
            return _jpeg_size(data)
        if data[:2] == b"BM":
            if struct.unpack("<I", data[14:18])[0] == 12:  # OS/2 core header: 16-bit sizes
                width, height = struct.unpack("<HH", data[18:22])
            else:
                width, height = struct.unpack("<ii", data[18:26])
            return abs(width), abs(height)
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            chunk = data[12:16]
            if chunk == b"VP8 ":
                width, height = struct.unpack("<HH", data[26:30])
                return width & 0x3FFF, height & 0x3FFF
            if chunk == b"VP8L":
                bits = int.from_bytes(data[21:25], "little")
                return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
            if chunk == b"VP8X":
                return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
        if data[:4] in (b"II*\x00", b"MM\x00*"):
            return _tiff_size(data)
    except (struct.error, IndexError):
        return None
    return None


def _too_many_pixels(what: str, width: int, height: int, limit: int) -> DatasetError:
    return DatasetError(
        f"Image {what} is {width}x{height} px ({width * height:,} pixels), above the limit of {limit:,} pixels on "
        "what is decoded. Remove it from the dataset, or raise "
        f"${MAX_IMAGE_PIXELS_ENV} if it is a genuine image."
    )


def _decoding_bytes_per_pixel(data: bytes) -> int:
    """Bytes per pixel the decoder works in: a PNG's channels x sample bytes from its header (16-bit RGBA: 8),
    at least the 3 of the RGB result; 3 for the other formats."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 26:
        depth, colour = data[24], data[25]
        channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour, 4)
        return max(3, channels * (2 if depth == 16 else 1))
    return 3


def _decode(data: bytes, what: str) -> np.ndarray:
    """Decode image bytes into an RGB uint8 array. Refused before decoding: an image whose size its header does not
    tell, above max_image_pixels(), or whose decoding works in more bytes than an 8-bit RGB image at that limit."""
    limit = max_image_pixels()
    size = image_header_size(data)
    if size is None:
        raise DatasetError(
            f"Image {what}: its size cannot be read from its header (not a PNG, JPEG, BMP, WebP or TIFF file, or a "
            "damaged one), so it is not decoded. Delete or replace that file, or convert it to PNG or JPEG.")
    if size[0] * size[1] > limit:
        raise _too_many_pixels(what, size[0], size[1], limit)
    per_pixel = _decoding_bytes_per_pixel(data)
    if size[0] * size[1] * per_pixel > 3 * limit:
        raise DatasetError(
            f"Image {what} is {size[0]}x{size[1]} px at {per_pixel} bytes per pixel while decoding "
            f"({size[0] * size[1] * per_pixel:,} bytes), above the {3 * limit:,} bytes an 8-bit RGB image at the pixel "
            f"limit takes. Convert it to 8-bit RGB, or raise ${MAX_IMAGE_PIXELS_ENV} if it is a genuine image.")
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise DatasetError(
            f"Could not decode image {what}: it is not a valid JPEG/PNG/BMP (corrupt, truncated or "
            "mislabelled). Delete or replace that file, or re-download the dataset."
        )
    if img.shape[0] * img.shape[1] > limit:  # a header that understated the size
        raise _too_many_pixels(what, img.shape[1], img.shape[0], limit)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def fit_image(img: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to `size` (INTER_AREA) and centre-crop to size x size. The edge agent fits
    camera frames with this same function, so a frame meets the model as an evaluation image does."""
    h, w = img.shape[:2]
    if h == size and w == size:
        return img
    scale = size / min(h, w)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.ascontiguousarray(img[top:top + size, left:left + size])


def _progress(it: Iterable, total: int | None, desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return it
    try:
        from tqdm import tqdm
    except ImportError:  # progress is cosmetic; never fail because of it
        return it
    return tqdm(it, total=total, desc=desc, unit="img")


@dataclass
class _Plan:
    """What one split holds, before anything is decoded."""

    split: str  # the split the rows come from: val where test was asked for and the dataset has no test split
    classes: list[str]
    labels: np.ndarray  # (N,) int64, row order
    names: list[str]  # each row's file, for messages
    rows: Callable[[], Iterator[tuple[int, bytes | np.ndarray]]]  # (row, encoded bytes or RGB pixels), any order
    where: str
    decoded_by_rows: bool = True  # False where the plan decoded while reading names (a tar archive): no second bar


def _open_rows(path: Path, shape: tuple[int, ...]) -> np.memmap:
    """A new .npy file of uint8 `shape`, its disk space reserved up front (a full disk fails here with an
    OSError, not later with a bus error while writing through the mapping)."""
    try:
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
        if hasattr(os, "posix_fallocate"):
            with open(path, "r+b") as f:
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
    except OSError as err:
        raise DatasetError(
            f"Could not create the decoded-image cache {path} ({err}): it needs {np.prod(shape) / 2**20:.0f} MiB. "
            f"Free some space there, or set {CACHE_ENV} (or --cache-dir) to a folder with room."
        ) from err
    return out


def _materialise(plan: _Plan, image_size: int | None, target: Path | None, progress: bool) -> np.ndarray:
    """Decode (and resize) every row of `plan` into the .npy file `target`, written through a window of at most
    WRITE_WINDOW_BYTES mapped at once, and return it memory-mapped read-only. `target=None` decodes into memory."""
    n = len(plan.labels)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}") if target is not None else None
    out: np.ndarray | None = None
    first: tuple[str, tuple[int, ...]] = ("", ())
    window, written = 1, 0
    try:
        for row, payload in _progress(plan.rows(), n, f"decoding {plan.split}", progress and plan.decoded_by_rows):
            img = payload if isinstance(payload, np.ndarray) else _decode(payload, plan.names[row])
            if image_size is not None:
                img = fit_image(img, image_size)
            if out is None:
                first = (plan.names[row], img.shape)
                out = _open_rows(tmp, (n, *img.shape)) if tmp is not None else np.empty((n, *img.shape), np.uint8)
                window = max(1, WRITE_WINDOW_BYTES // max(1, img.nbytes))
            elif img.shape != first[1]:
                raise MixedSizesError(plan.where, first, (plan.names[row], img.shape))
            out[row] = img
            written += 1
            if tmp is not None and written % window == 0:  # unmap the written pages: they leave this process
                out.flush()
                del out
                out = np.load(tmp, mmap_mode="r+")
        if written != n or out is None:
            raise DatasetError(f"{plan.where}: read {written} of {n} images; the dataset changed while it was read. Run again.")
        if tmp is None:
            return out
        out.flush()
        del out
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()
    return np.load(target, mmap_mode="r", allow_pickle=False)


def _empty_split(split: str, where: str) -> DatasetError:
    return DatasetError(
        f"Split '{split}' in {where} contains no images ({'/'.join(IMAGE_EXTS)}). Check that the "
        "dataset was extracted/copied completely and that the split name is right."
    )


# --------------------------------------------------------------------------------------------------
# Plans, one per layout: what a split holds and how to read it, decoded later by _materialise.
# --------------------------------------------------------------------------------------------------


def _test_served_by_val(has: Callable[[str], bool], split: str) -> str:
    """The split to read: val where test was asked for and the dataset has only train and val."""
    return "val" if split == "test" and not has("test") and has("val") else split


def _file_rows(items: list[tuple[Path, int]]) -> Callable[[], Iterator[tuple[int, bytes]]]:
    def rows() -> Iterator[tuple[int, bytes]]:
        for row, (f, _) in enumerate(items):
            _check_file_size(f.stat().st_size, str(f))
            yield row, f.read_bytes()
    return rows


def _plan_imagefolder(root: Path, split: str) -> _Plan:
    split = _test_served_by_val(lambda s: (root / s).is_dir(), split)
    split_dir = root / split
    if not split_dir.is_dir():
        have = [s for s in SPLITS if (root / s).is_dir()]
        raise DatasetError(
            f"Split folder {split_dir} does not exist (splits present in {root}: {', '.join(have) or 'none'}). "
            f"Use one of those splits, or lay the dataset out as {root}/<split>/<class>/<image>."
        )
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    items: list[tuple[Path, int]] = []
    for label, cls in enumerate(classes):
        # Recurse, like torchvision's ImageFolder, so class/images/x.jpg also works.
        for f in sorted((split_dir / cls).rglob("*")):
            if f.is_file() and is_image_name(f.name):
                items.append((f, label))
    if not items:
        raise _empty_split(split, str(split_dir))
    return _Plan(split, classes, np.array([lab for _, lab in items], dtype=np.int64), [str(f) for f, _ in items],
                 _file_rows(items), str(split_dir))


def _tar_error(path: Path, err: BaseException) -> DatasetError:
    return DatasetError(
        f"Could not read archive {path}: {type(err).__name__}: {err}. The file is probably truncated or "
        "corrupt (interrupted download or copy). Re-download/re-copy it and compare `sha256sum` with "
        "the published checksum."
    )


def _tar_parts(member: tarfile.TarInfo) -> tuple[str, ...]:
    return tuple(p for p in PurePosixPath(member.name).parts if p not in (".", ""))


class _Spill:
    """Decoded images appended to an anonymous temporary file in archive order and read back one at a time
    (os.pread, never mapped), so a single pass over a compressed archive decodes a split in bounded memory."""

    def __init__(self, folder: Path | None):
        try:
            self.file = tempfile.TemporaryFile(dir=folder)
        except OSError:
            self.file = tempfile.TemporaryFile()
        self.where: dict[int, tuple[int, tuple[int, ...]]] = {}  # member ordinal -> (offset, shape)
        self.size = 0

    def add(self, ordinal: int, img: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(img).data)
        self.where[ordinal] = (self.size, img.shape)
        self.size += img.nbytes

    def get(self, ordinal: int) -> np.ndarray:
        offset, shape = self.where[ordinal]
        self.file.flush()
        data = os.pread(self.file.fileno(), int(np.prod(shape)), offset)
        return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def _tar_pass(path: Path, decode: Callable[[int, tuple[str, ...]], bool], spill: _Spill, image_size: int | None,
              progress: bool, desc: str) -> tuple[set[str], dict, dict]:
    """One sequential pass over the archive (cheap for .gz): every member's name, and the members `decode` picks
    decoded (and resized) into `spill` as they stream past."""
    tops: set[str] = set()
    cand: dict[int, list[tuple[int, tuple[str, ...], int]]] = {0: [], 1: []}  # keyed by prefix depth
    class_dirs: dict[int, set[tuple[str, str]]] = {0: set(), 1: set()}
    bar = _progress(iter(()), None, desc, progress)
    try:
        with tarfile.open(path, "r:*") as tf:
            for ordinal, m in enumerate(tf):
                parts = _tar_parts(m)
                if not parts or parts[0] == "__MACOSX":
                    continue
                tops.add(parts[0])
                for depth in (0, 1):
                    rest = parts[depth:]
                    if len(rest) < 2:
                        continue
                    if m.isdir() and len(rest) == 2:
                        class_dirs[depth].add((rest[0], rest[1]))
                    elif m.isfile() and len(rest) >= 3 and is_image_name(parts[-1]):
                        cand[depth].append((ordinal, rest, m.size))
                        if ordinal not in spill.where and decode(ordinal, rest):
                            what = "/".join(parts) + f" in {path}"
                            _check_file_size(m.size, what)
                            f = tf.extractfile(m)
                            img = _decode(f.read() if f else b"", what)
                            spill.add(ordinal, fit_image(img, image_size) if image_size is not None else img)
                            if hasattr(bar, "update"):
                                bar.update(1)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise _tar_error(path, err) from err
    finally:
        if hasattr(bar, "close"):
            bar.close()
    return tops, cand, class_dirs


def _plan_tar(path: Path, split: str, image_size: int | None, spill_dir: Path | None, progress: bool) -> _Plan:
    # Whether there is a single wrapper folder, and so which members belong to the split, is only known once every
    # name has been seen: members that may belong to it are decoded as they stream past, into a spill file.
    spill = _Spill(spill_dir)
    tops, cand, class_dirs = _tar_pass(path, lambda _, rest: rest[0] == split, spill, image_size, progress,
                                       f"decoding {split}")
    # A single top-level folder that is not itself a split is a wrapper folder (e.g. cifar10/train/...).
    depth = 1 if len(tops) == 1 and next(iter(tops)) not in SPLITS else 0
    present = {rest[0] for _, rest, _ in cand[depth]}
    split = _test_served_by_val(lambda s: s in present, split)
    members = [c for c in cand[depth] if c[1][0] == split]
    if not members:
        if tops & {"cifar-10-batches-py", "cifar-100-python"}:
            raise DatasetError(
                f"{path} is a torchvision CIFAR pickle archive, not an ImageFolder archive. Extract it "
                f"(tar xzf {path.name}) and pass the extracted {' / '.join(sorted(tops))} folder instead."
            )
        where = f"archive {path}"
        raise DatasetError(
            f"No images for split '{split}' in {where} (top-level entries: {', '.join(sorted(tops)[:10]) or 'none'}). "
            f"Expected members like [top/]{split}/<class>/<image>.jpg; check the split name or re-create the archive."
        )
    classes = sorted({c for s, c in class_dirs[depth] if s == split} | {rest[1] for _, rest, _ in members})
    index = {c: i for i, c in enumerate(classes)}
    members.sort(key=lambda x: x[1])  # deterministic order regardless of archive order

    def rows() -> Iterator[tuple[int, np.ndarray]]:
        wanted = {ordinal for ordinal, _, _ in members}
        if not wanted <= spill.where.keys():  # a split served by another one: read the archive again for it
            _tar_pass(path, lambda ordinal, _: ordinal in wanted, spill, image_size, progress, f"decoding {split}")
        for row, (ordinal, _, _) in enumerate(members):
            yield row, spill.get(ordinal)

    return _Plan(split, classes, np.array([index[rest[1]] for _, rest, _ in members], dtype=np.int64),
                 ["/".join(rest) + f" in {path}" for _, rest, _ in members], rows, f"{path}:{split}", decoded_by_rows=False)


# Globals a CIFAR pickle legitimately needs; everything else (os.system, eval, ...) is refused.
try:
    from numpy._core.multiarray import _reconstruct, scalar  # numpy >= 2
    from numpy._core.numeric import _frombuffer
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct, scalar  # type: ignore[no-redef]
    from numpy.core.numeric import _frombuffer  # type: ignore[no-redef]

_SAFE_GLOBALS: dict[tuple[str, str], object] = {}
for _mod in ("builtins", "__builtin__"):
    for _name, _obj in (("dict", dict), ("list", list), ("bytes", bytes), ("str", str), ("int", int)):
        _SAFE_GLOBALS[(_mod, _name)] = _obj
for _mod in ("numpy.core", "numpy._core"):
    _SAFE_GLOBALS[(f"{_mod}.multiarray", "_reconstruct")] = _reconstruct
    _SAFE_GLOBALS[(f"{_mod}.multiarray", "scalar")] = scalar
    _SAFE_GLOBALS[(f"{_mod}.numeric", "_frombuffer")] = _frombuffer  # protocol-5 pickles
# Python 3 writes bytes at protocol <= 2 as _codecs.encode(str, "latin1"); a pure data transform.
_SAFE_GLOBALS[("_codecs", "encode")] = codecs.encode
_SAFE_GLOBALS[("numpy", "ndarray")] = np.ndarray
_SAFE_GLOBALS[("numpy", "dtype")] = np.dtype


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}") from None


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, encoding="bytes").load()
    except FileNotFoundError as err:
        raise DatasetError(
            f"Missing file {path}. The CIFAR pickle folder is incomplete; re-extract the torchvision archive."
        ) from err
    except Exception as err:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise DatasetError(
            f"Could not read CIFAR pickle {path}: {type(err).__name__}: {err}. The file is corrupt or not a "
            "genuine CIFAR pickle (only plain data and numpy arrays are allowed, so no code is run). "
            "Re-download the torchvision CIFAR archive."
        ) from err
    if not isinstance(obj, dict):
        raise DatasetError(f"CIFAR pickle {path} holds a {type(obj).__name__}, not a dict; re-download it.")
    return obj


def _get(d: dict, key: str, path: Path) -> object:
    # Python-2 pickles loaded with encoding="bytes" have bytes keys; Python-3 ones have str keys.
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise DatasetError(f"CIFAR pickle {path} has no '{key}' entry; it is not a valid CIFAR file. Re-download it.")


def _names(values: object) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]  # type: ignore[union-attr]


def _plan_cifar_pickles(root: Path, fmt: str, split: str) -> _Plan:
    if fmt == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        meta, label_key, names_key = "batches.meta", "labels", "label_names"
    else:
        files = ["train" if split == "train" else "test"]
        meta, label_key, names_key = "meta", "fine_labels", "fine_label_names"
    classes = _names(_get(_unpickle(root / meta), names_key, root / meta))
    data, labels = [], []
    for name in files:
        d = _unpickle(root / name)
        x, y = _get(d, "data", root / name), _get(d, label_key, root / name)
        # Checked before any conversion: a pickle can repeat one row by reference, so a list of rows a few bytes
        # long each would expand into an array (and a cache file) far larger than the file. The real files hold
        # the pixels as one uint8 array, which is as large on disk as in memory.
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8:
            raise DatasetError(
                f"CIFAR pickle {root / name} holds its pixels as {type(x).__name__}"
                f"{' of ' + str(x.dtype) if isinstance(x, np.ndarray) else ''}, not one uint8 array (N, 3072) as the "
                "real files do. The file is corrupt or not a CIFAR file; re-download it.")
        if not (isinstance(y, np.ndarray) and y.ndim == 1) and not (
                isinstance(y, list) and len(y) == len(x) and all(isinstance(v, int) for v in y)):
            raise DatasetError(f"CIFAR pickle {root / name} holds its labels as {type(y).__name__}, not one whole number "
                               "per image. The file is corrupt; re-download it.")
        x, y = np.asarray(x, dtype=np.uint8), np.asarray(y, dtype=np.int64)
        if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or x.shape[0] != y.shape[0]:
            raise DatasetError(
                f"CIFAR pickle {root / name} has data of shape {x.shape} for {y.shape[0]} labels; expected "
                "(N, 3072). The file is corrupt; re-download it."
            )
        data.append(x)
        labels.append(y)
    # Rows are channel-planar (1024 R, 1024 G, 1024 B) -> (N, 32, 32, 3) RGB.
    images = np.concatenate(data).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    y = np.concatenate(labels)
    if len(y) == 0:
        raise _empty_split(split, str(root))
    if y.min() < 0 or y.max() >= len(classes):
        raise DatasetError(f"Labels in {root} are outside 0..{len(classes) - 1}; the files are corrupt. Re-download them.")
    return _Plan(split, classes, y, [f"{root}:{split}[{i}]" for i in range(len(y))],
                 lambda: ((i, np.ascontiguousarray(im)) for i, im in enumerate(images)), f"{root}:{split}")


def _plan_tinyimagenet(root: Path, split: str) -> _Plan:
    classes = [w.strip() for w in (root / "wnids.txt").read_text().splitlines() if w.strip()]
    index = {c: i for i, c in enumerate(classes)}
    items: list[tuple[Path, int]] = []
    if split == "train":
        if not (root / "train").is_dir():
            raise DatasetError(f"{root / 'train'} does not exist; the Tiny ImageNet folder is incomplete. Re-extract it.")
        for wnid in classes:
            for f in sorted((root / "train" / wnid / "images").glob("*")):
                if f.is_file() and is_image_name(f.name):
                    items.append((f, index[wnid]))
    else:  # "val" (the official test split has no labels)
        ann = root / "val" / "val_annotations.txt"
        if not ann.is_file():
            raise DatasetError(f"{ann} does not exist; the Tiny ImageNet val split is incomplete. Re-extract it.")
        for line_no, line in enumerate(ann.read_text().splitlines(), 1):
            cols = line.split("\t")
            if not line.strip():
                continue
            if len(cols) < 2 or cols[1] not in index:
                raise DatasetError(
                    f"{ann} line {line_no} is malformed or names a class not in wnids.txt: {line!r}. Re-extract the dataset."
                )
            items.append((root / "val" / "images" / cols[0], index[cols[1]]))
        items.sort(key=lambda it: str(it[0]))
    if not items:
        raise _empty_split(split, str(root))
    read = _file_rows(items)

    def rows() -> Iterator[tuple[int, bytes]]:
        try:
            yield from read()
        except FileNotFoundError as err:
            raise DatasetError(f"{err.filename} is listed but missing; the Tiny ImageNet folder is incomplete. Re-extract it.") from err

    return _Plan(split, classes, np.array([lab for _, lab in items], dtype=np.int64), [str(f) for f, _ in items],
                 rows, f"{root}:{split}")


def _plan(path: Path, fmt: str, split: str, image_size: int | None, spill_dir: Path | None, progress: bool) -> _Plan:
    if fmt == "tar":
        return _plan_tar(path, split, image_size, spill_dir, progress)
    if fmt == "imagefolder":
        return _plan_imagefolder(path, split)
    if fmt in ("cifar10", "cifar100"):
        return _plan_cifar_pickles(path, fmt, split)
    if fmt == "tinyimagenet":
        return _plan_tinyimagenet(path, split)
    raise AssertionError(fmt)


# --------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rapnet")


def _fingerprint(path: Path) -> list:
    """Cheap identity of the source: size+mtime for a file, file count/total size/newest mtime for a folder."""
    if path.is_file():
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]
    count = size = newest = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            st = os.stat(os.path.join(dirpath, f))
            count, size, newest = count + 1, size + st.st_size, max(newest, st.st_mtime_ns)
    return [count, size, newest]


def _cache_key(path: Path, fmt: str, split: str, image_size: int | None, fingerprint: list) -> str:
    ident = [str(path), fmt, fingerprint, split, image_size, LOADER_VERSION]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:20]


def cache_paths(cache_dir: Path, path: Path, key: str, split: str) -> tuple[Path, Path, Path]:
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", path.name)[:40]
    base = Path(cache_dir) / f"{stem}-{split}-{key}"
    return Path(f"{base}.images.npy"), Path(f"{base}.labels.npy"), Path(f"{base}.json")


def _atomic_write(target: Path, write: Callable) -> None:
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


Cached = tuple[np.ndarray, np.ndarray, list[str], str]  # images (memory-mapped), labels, classes, split read


def _read_meta(meta_p: Path, key: str) -> dict | None:
    if not meta_p.is_file():  # the .json is written last, so its presence marks a complete cache
        return None
    try:
        meta = json.loads(meta_p.read_text())
    except (OSError, ValueError) as err:
        warnings.warn(f"Ignoring unreadable dataset cache {meta_p} ({err}); decoding again.")
        return None
    return meta if isinstance(meta, dict) and meta.get("key") == key else None


def _read_cache(paths: tuple[Path, Path, Path], meta: dict, size: int | None) -> Cached | None:
    """The cached split, its images memory-mapped read-only; None unless complete (and `size` x `size` if given)."""
    img_p, lab_p, meta_p = paths
    try:
        images = np.load(img_p, mmap_mode="r", allow_pickle=False)
        labels = np.load(lab_p, allow_pickle=False)
        ok = (
            images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3
            and labels.dtype == np.int64 and labels.shape == (images.shape[0],) and images.shape[0] == meta.get("n")
        )
        if not ok or (size is not None and images.shape[1:3] != (size, size)):
            return None
        return images, labels, list(meta["classes"]), str(meta["split"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        warnings.warn(f"Ignoring unreadable dataset cache {meta_p} ({err}); decoding again.")
        return None


@dataclass
class _Cache:
    root: Path
    source: Path
    fmt: str
    fingerprint: list

    def paths(self, split: str, image_size: int | None) -> tuple[str, tuple[Path, Path, Path]]:
        key = _cache_key(self.source, self.fmt, split, image_size, self.fingerprint)
        return key, cache_paths(self.root, self.source, key, split)

    def folder(self) -> Path | None:
        """The cache folder, created if need be; None where it cannot be."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError:
            return None
        return self.root if self.root.is_dir() else None

    def lookup(self, split: str, image_size: int | None, follow: bool = True) -> Cached | None:
        """The split at `image_size` from the cache: decoded at that size, or decoded at its own size where that is
        `image_size` already (so CIFAR-10 at 32 px is one cache entry), following a test split served by val."""
        tries = [(image_size, None)] + ([(None, image_size)] if image_size is not None else [])
        for size, want in tries:
            key, paths = self.paths(split, size)
            meta = _read_meta(paths[2], key)
            if meta is None:
                continue
            if meta.get("served_by"):
                if follow:
                    return self.lookup(str(meta["served_by"]), image_size, follow=False)
                continue
            cached = _read_cache(paths, meta, want)
            if cached is not None:
                return cached
        return None

    def write_alias(self, split: str, served_by: str, image_size: int | None) -> None:
        """Remember that `split` is served by another split, so a later load skips reading the archive."""
        key, (_, _, meta_p) = self.paths(split, image_size)
        meta = {"key": key, "split": split, "served_by": served_by, "source": str(self.source),
                "loader_version": LOADER_VERSION}
        try:
            meta_p.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(meta_p, lambda f: f.write(json.dumps(meta, indent=1).encode()))
        except OSError:
            pass  # only the archive is read again next time

    def decode(self, plan: _Plan, image_size: int | None, progress: bool) -> Cached:
        """Decode `plan` into the cache (images first, then labels, then the .json that marks it complete) and
        return it memory-mapped; with an unwritable cache folder, decode into memory and warn."""
        key, (img_p, lab_p, meta_p) = self.paths(plan.split, image_size)
        try:
            img_p.parent.mkdir(parents=True, exist_ok=True)
            writable = os.access(img_p.parent, os.W_OK)
        except OSError:
            writable = False
        if not writable:
            warnings.warn(f"Dataset cache folder {img_p.parent} is not writable; decoding into memory. Set {CACHE_ENV} "
                          "to a writable folder so later runs skip decoding and map the images from disk.")
        images = _materialise(plan, image_size, img_p if writable else None, progress)
        if writable:
            meta = {"key": key, "n": int(len(plan.labels)), "classes": plan.classes, "source": str(self.source),
                    "split": plan.split, "loader_version": LOADER_VERSION}
            try:
                _atomic_write(lab_p, lambda f: np.save(f, plan.labels, allow_pickle=False))
                _atomic_write(meta_p, lambda f: f.write(json.dumps(meta, indent=1).encode()))
            except OSError as err:  # a full cache folder must not stop training; it is only slower next time
                warnings.warn(f"Could not write dataset cache in {img_p.parent} ({err}); set {CACHE_ENV} to a writable folder.")
        return images, plan.labels, plan.classes, plan.split


_NOTED: set[tuple[str, str]] = set()


def _note_served_by(source: Path, split: str, served_by: str) -> None:
    """Say once per process and dataset that a split is read from another one."""
    if (str(source), split) in _NOTED:
        return
    _NOTED.add((str(source), split))
    print(f"{source.name} has no {split} split: its {served_by} split is the {split} split here (the validation "
          "split for calibration is carved from train, as for every dataset)", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------


def load_dataset(
    path: str | os.PathLike | None,
    split: str = "train",
    image_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> ImageDataset:
    """Load one split of a dataset (any supported layout) as uint8 RGB arrays, via the decode cache.

    `path=None` uses :func:`locate_dataset` (CIFAR-10 by default search). `image_size=N` resizes every image (shorter
    side to N, then a centre crop, as :func:`fit_image`); None keeps the images' own size, which must then be one
    size. The images come memory-mapped read-only from the cache (in memory where the cache folder is not
    writable). A dataset without a test split serves split="test" from its val split, and says so once.
    """
    src = locate_dataset(None) if path is None else Path(path).expanduser()
    if not src.exists():
        raise DatasetError(f"Dataset path {src} does not exist. {_FIX_HINT}")
    src = src.resolve()
    fmt = detect_format(src)
    if fmt is None:
        raise DatasetError(
            f"{src} is not a recognised dataset. Expected a tar/tar.gz archive of split/class/image, an "
            "ImageFolder directory split/class/image, cifar-10-batches-py/, cifar-100-python/ or "
            "tiny-imagenet-200/. If it is a folder of datasets, use locate_dataset() or pass the dataset inside it."
        )
    if image_size is not None and (not isinstance(image_size, int) or image_size <= 0):
        raise DatasetError(f"image_size must be a positive integer, got {image_size!r}.")
    asked = split = split.lower()
    if fmt == "tinyimagenet" and split == "test":
        split = "val"  # Tiny ImageNet's test images are unlabelled; val is the usual held-out set.
    allowed = ("train", "val") if fmt == "tinyimagenet" else ("train", "test") if fmt in ("cifar10", "cifar100") else SPLITS
    if split not in allowed:
        raise DatasetError(f"Unknown split {split!r} for {src}; use one of: {', '.join(allowed)}.")

    cache = _Cache(Path(cache_dir) if cache_dir is not None else default_cache_dir(), src, fmt, _fingerprint(src))
    cached = cache.lookup(split, image_size)
    if cached is None:
        plan = _plan(src, fmt, split, image_size, cache.folder(), progress)
        if plan.split != split:
            cache.write_alias(split, plan.split, image_size)
            cached = cache.lookup(plan.split, image_size)
        if cached is None:
            cached = cache.decode(plan, image_size, progress)
    images, labels, classes, served = cached
    if served != asked:
        _note_served_by(src, asked, served)
    return ImageDataset(images=images, labels=labels, classes=classes, source=str(src))


def train_val_split(n: int, val_size: int | float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split range(n) into sorted (train, val) index arrays with a fixed seeded permutation.

    `val_size` is a count (int) or a fraction in (0, 1) (float).
    """
    if isinstance(val_size, bool) or n < 0:
        raise ValueError(f"Bad arguments n={n}, val_size={val_size!r}; use n >= 0 and an int count or float fraction.")
    if isinstance(val_size, float):
        if not 0.0 < val_size < 1.0:
            raise ValueError(f"val_size fraction must be in (0, 1), got {val_size}; or pass an int count.")
        n_val = int(round(n * val_size))
    else:
        n_val = int(val_size)
    if not 0 <= n_val <= n:
        raise ValueError(f"val_size={val_size} gives {n_val} validation items, but only {n} exist; use 0..{n}.")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]).astype(np.int64), np.sort(perm[:n_val]).astype(np.int64)


RANDOM_PREDICTOR_SPLIT = "random"  # metadata["split"]["predictor_split"] once the parts are drawn at random


def predictor_calibration_split(val_idx: np.ndarray, fit_count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split validation indices into the predictor's fitting part and the calibration part (sorted each).

    Drawn at random, not sliced: archives are usually stored class by class, so a slice of the sorted indices
    would give the two parts different classes (on CIFAR-10, the calibration part would hold ships and trucks only).
    """
    if not 0 <= fit_count <= len(val_idx):
        raise ValueError(f"fit_count={fit_count} must be within 0..{len(val_idx)} (the validation size)")
    order = np.random.default_rng([seed, 1]).permutation(len(val_idx))
    return np.sort(val_idx[order[:fit_count]]), np.sort(val_idx[order[fit_count:]])


def stratified_sample(labels: Sequence[int] | np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """`n` indices into `labels`, spread evenly over the classes (sorted, deterministic for a seed).

    Round robin over the classes (in a seeded order), each class's members taken in a seeded random order, so
    every class is covered once n >= the number of classes and no class has more than one image more than
    another until it runs out. Test splits are usually stored class by class, where the first n images would
    all be one class. n >= len(labels) returns every index; n <= 0 none.
    """
    labels = np.asarray(labels)
    total = len(labels)
    if n >= total:
        return np.arange(total, dtype=np.int64)
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng([seed, 2])
    classes = rng.permutation(np.unique(labels))
    rank = np.empty(total, dtype=np.int64)  # position of each sample within its class's random order
    turn = np.empty(total, dtype=np.int64)  # its class's place in the round robin
    for place, c in enumerate(classes):
        members = rng.permutation(np.flatnonzero(labels == c))
        rank[members] = np.arange(len(members))
        turn[members] = place
    order = np.lexsort((turn, rank))  # round 0 of every class, then round 1, ...
    return np.sort(order[:n]).astype(np.int64)


def sha256_of_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Streaming sha256 hex digest (for checkpoint metadata and archive checks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            h.update(block)
    return h.hexdigest()
