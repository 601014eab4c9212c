"""Dataset discovery, loading and caching.

Every supported layout is decoded once into a uint8 (N, H, W, 3) RGB array and cached as .npy files,
so training and evaluation runs start in well under a second after the first one.

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
import tarfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Sequence

import cv2
import numpy as np

# Bump whenever decoding/resizing changes, so stale caches are never reused.
LOADER_VERSION = 1

DEFAULT_SEARCH_ENV = "RAPNET_DATA"
CACHE_ENV = "RAPNET_CACHE"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
ARCHIVE_EXTS = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz")
SPLITS = ("train", "test", "val")

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


def _decode(data: bytes, what: str) -> np.ndarray:
    """Decode image bytes into an RGB uint8 array."""
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise DatasetError(
            f"Could not decode image {what}: it is not a valid JPEG/PNG/BMP (corrupt, truncated or "
            "mislabelled). Delete or replace that file, or re-download the dataset."
        )
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


def _progress(it: Iterable, total: int, desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return it
    try:
        from tqdm import tqdm
    except ImportError:  # progress is cosmetic; never fail because of it
        return it
    return tqdm(it, total=total, desc=desc, unit="img")


def _stack(arrays: list[np.ndarray], names: list[str], image_size: int | None, where: str) -> np.ndarray:
    """Resize (if asked) and stack decoded images, insisting on one common size."""
    if image_size is not None:
        arrays = [fit_image(a, image_size) for a in arrays]
    first = arrays[0].shape
    for a, n in zip(arrays, names):
        if a.shape != first:
            raise DatasetError(
                f"Images in {where} have different sizes ({names[0]} is {first[1]}x{first[0]}, {n} is "
                f"{a.shape[1]}x{a.shape[0]}). Pass image_size=N (--image-size N) to resize them to NxN."
            )
    return np.ascontiguousarray(np.stack(arrays).astype(np.uint8, copy=False))


def _decode_items(
    items: list[tuple[str, Callable[[], bytes], int]],
    image_size: int | None,
    where: str,
    progress: bool,
    desc: str,
) -> tuple[np.ndarray, np.ndarray]:
    arrays = [_decode(read(), what) for what, read, _ in _progress(items, len(items), desc, progress)]
    labels = np.array([lab for _, _, lab in items], dtype=np.int64)
    return _stack(arrays, [w for w, _, _ in items], image_size, where), labels


def _empty_split(split: str, where: str) -> DatasetError:
    return DatasetError(
        f"Split '{split}' in {where} contains no images ({'/'.join(IMAGE_EXTS)}). Check that the "
        "dataset was extracted/copied completely and that the split name is right."
    )


# --------------------------------------------------------------------------------------------------
# Loaders, one per layout. Each returns (images, labels, classes) without caching.
# --------------------------------------------------------------------------------------------------

Loaded = tuple[np.ndarray, np.ndarray, list[str]]


def _load_imagefolder(root: Path, split: str, image_size: int | None, progress: bool) -> Loaded:
    split_dir = root / split
    if not split_dir.is_dir():
        have = [s for s in SPLITS if (root / s).is_dir()]
        raise DatasetError(
            f"Split folder {split_dir} does not exist (splits present in {root}: {', '.join(have) or 'none'}). "
            f"Use one of those splits, or lay the dataset out as {root}/<split>/<class>/<image>."
        )
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    items: list[tuple[str, Callable[[], bytes], int]] = []
    for label, cls in enumerate(classes):
        # Recurse, like torchvision's ImageFolder, so class/images/x.jpg also works.
        for f in sorted((split_dir / cls).rglob("*")):
            if f.is_file() and is_image_name(f.name):
                items.append((str(f), f.read_bytes, label))
    if not items:
        raise _empty_split(split, str(split_dir))
    images, labels = _decode_items(items, image_size, str(split_dir), progress, f"decoding {split}")
    return images, labels, classes


def _tar_error(path: Path, err: BaseException) -> DatasetError:
    return DatasetError(
        f"Could not read archive {path}: {type(err).__name__}: {err}. The file is probably truncated or "
        "corrupt (interrupted download or copy). Re-download/re-copy it and compare `sha256sum` with "
        "the published checksum."
    )


def _load_tar(path: Path, split: str, image_size: int | None, progress: bool) -> Loaded:
    # One sequential pass (cheap for .gz); keep only this split's bytes, since whether there is a
    # single top folder is only known once all names have been seen.
    tops: set[str] = set()
    cand: dict[int, list[tuple[tuple[str, ...], bytes]]] = {0: [], 1: []}  # keyed by prefix depth
    class_dirs: dict[int, set[str]] = {0: set(), 1: set()}
    try:
        with tarfile.open(path, "r:*") as tf:
            for m in tf:
                parts = PurePosixPath(m.name).parts
                parts = tuple(p for p in parts if p not in (".", ""))
                if not parts or parts[0] == "__MACOSX":
                    continue
                tops.add(parts[0])
                for depth in (0, 1):
                    rest = parts[depth:]
                    if len(rest) < 2 or rest[0] != split:
                        continue
                    if m.isdir() and len(rest) == 2:
                        class_dirs[depth].add(rest[1])
                    elif m.isfile() and len(rest) >= 3 and is_image_name(parts[-1]):
                        f = tf.extractfile(m)
                        cand[depth].append((rest, f.read() if f else b""))
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise _tar_error(path, err) from err

    # A single top-level folder that is not itself a split is a wrapper folder (e.g. cifar10/train/...).
    depth = 1 if len(tops) == 1 and next(iter(tops)) not in SPLITS else 0
    members = cand[depth]
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
    classes = sorted(class_dirs[depth] | {rest[1] for rest, _ in members})
    index = {c: i for i, c in enumerate(classes)}
    members.sort(key=lambda x: x[0])  # deterministic order regardless of archive order
    items = [("/".join(rest) + f" in {path}", (lambda d=data: d), index[rest[1]]) for rest, data in members]
    images, labels = _decode_items(items, image_size, f"{path}:{split}", progress, f"decoding {split}")
    return images, labels, classes


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


def _load_cifar_pickles(root: Path, fmt: str, split: str, image_size: int | None) -> Loaded:
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
        x = np.asarray(_get(d, "data", root / name), dtype=np.uint8)
        y = np.asarray(_get(d, label_key, root / name), dtype=np.int64)
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
    if image_size is not None and image_size != 32:
        images = np.stack([fit_image(im, image_size) for im in images])
    return np.ascontiguousarray(images), y, classes


def _load_tinyimagenet(root: Path, split: str, image_size: int | None, progress: bool) -> Loaded:
    classes = [w.strip() for w in (root / "wnids.txt").read_text().splitlines() if w.strip()]
    index = {c: i for i, c in enumerate(classes)}
    items: list[tuple[str, Callable[[], bytes], int]] = []
    if split == "train":
        if not (root / "train").is_dir():
            raise DatasetError(f"{root / 'train'} does not exist; the Tiny ImageNet folder is incomplete. Re-extract it.")
        for wnid in classes:
            for f in sorted((root / "train" / wnid / "images").glob("*")):
                if f.is_file() and is_image_name(f.name):
                    items.append((str(f), f.read_bytes, index[wnid]))
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
            f = root / "val" / "images" / cols[0]
            items.append((str(f), f.read_bytes, index[cols[1]]))
        items.sort(key=lambda it: it[0])
    if not items:
        raise _empty_split(split, str(root))
    try:
        images, labels = _decode_items(items, image_size, f"{root}:{split}", progress, f"decoding {split}")
    except FileNotFoundError as err:
        raise DatasetError(f"{err.filename} is listed but missing; the Tiny ImageNet folder is incomplete. Re-extract it.") from err
    return images, labels, classes


def _load_uncached(path: Path, fmt: str, split: str, image_size: int | None, progress: bool) -> Loaded:
    if fmt == "tar":
        return _load_tar(path, split, image_size, progress)
    if fmt == "imagefolder":
        return _load_imagefolder(path, split, image_size, progress)
    if fmt in ("cifar10", "cifar100"):
        return _load_cifar_pickles(path, fmt, split, image_size)
    if fmt == "tinyimagenet":
        return _load_tinyimagenet(path, split, image_size, progress)
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


def _cache_key(path: Path, fmt: str, split: str, image_size: int | None) -> str:
    ident = [str(path), fmt, _fingerprint(path), split, image_size, LOADER_VERSION]
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


def _read_cache(paths: tuple[Path, Path, Path], key: str) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    img_p, lab_p, meta_p = paths
    if not meta_p.is_file():  # the .json is written last, so its presence marks a complete cache
        return None
    try:
        meta = json.loads(meta_p.read_text())
        images = np.load(img_p, mmap_mode=None, allow_pickle=False)
        labels = np.load(lab_p, mmap_mode=None, allow_pickle=False)
    except (OSError, ValueError) as err:
        warnings.warn(f"Ignoring unreadable dataset cache {meta_p} ({err}); decoding again.")
        return None
    ok = (
        meta.get("key") == key
        and images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3
        and labels.dtype == np.int64 and labels.shape == (images.shape[0],) and images.shape[0] == meta.get("n")
    )
    return (images, labels, list(meta["classes"])) if ok else None


def _write_cache(paths: tuple[Path, Path, Path], key: str, data: Loaded, source: Path, split: str) -> None:
    images, labels, classes = data
    img_p, lab_p, meta_p = paths
    try:
        img_p.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(img_p, lambda f: np.save(f, images, allow_pickle=False))
        _atomic_write(lab_p, lambda f: np.save(f, labels, allow_pickle=False))
        meta = {"key": key, "n": int(len(labels)), "classes": classes, "source": str(source),
                "split": split, "loader_version": LOADER_VERSION}
        _atomic_write(meta_p, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    except OSError as err:  # a read-only cache must not stop training; it is only slower next time
        warnings.warn(f"Could not write dataset cache in {img_p.parent} ({err}); set {CACHE_ENV} to a writable folder.")


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

    `path=None` uses :func:`locate_dataset` (CIFAR-10 by default search).
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
    split = split.lower()
    if fmt == "tinyimagenet" and split == "test":
        split = "val"  # Tiny ImageNet's test images are unlabelled; val is the usual held-out set.
    allowed = ("train", "val") if fmt == "tinyimagenet" else ("train", "test") if fmt in ("cifar10", "cifar100") else SPLITS
    if split not in allowed:
        raise DatasetError(f"Unknown split {split!r} for {src}; use one of: {', '.join(allowed)}.")

    key = _cache_key(src, fmt, split, image_size)
    paths = cache_paths(Path(cache_dir) if cache_dir is not None else default_cache_dir(), src, key, split)
    cached = _read_cache(paths, key)
    if cached is None:
        cached = _load_uncached(src, fmt, split, image_size, progress)
        _write_cache(paths, key, cached, src, split)
    images, labels, classes = cached
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
