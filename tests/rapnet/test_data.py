"""Tests for rapnet.data, on tiny datasets built in tmp_path (plus the shared CIFAR-10 archive if present)."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from rapnet import data
from rapnet.data import (
    DatasetError, load_dataset, locate_dataset, predictor_calibration_split, sha256_of_file, stratified_sample,
    train_val_split,
)

CLASSES = ["cat", "dog", "frog"]  # deliberately sorted = label order
SHARED = Path(__file__).resolve().parents[3] / "shared" / "datasets"  # next to the checkout


def _img(seed: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def _make_imagefolder(root: Path, per_class: int = 2, size: int = 8) -> dict[str, list[tuple[np.ndarray, int]]]:
    """Write root/{train,test}/<class>/NNNN.png; return expected (image, label) per split in load order."""
    expected: dict[str, list[tuple[np.ndarray, int]]] = {}
    seed = 0
    for split in ("train", "test"):
        expected[split] = []
        for label, cls in enumerate(CLASSES):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                seed += 1
                img = _img(seed, size)
                ext = ".PNG" if i == 1 else ".png"  # extensions are matched case-insensitively
                (root / split / cls / f"{i:04d}{ext}").write_bytes(_png(img))
                expected[split].append((img, label))
    (root / "train" / "cat" / "notes.txt").write_text("not an image")  # ignored
    return expected


def _check(ds: data.ImageDataset, expected: list[tuple[np.ndarray, int]], classes: list[str] = CLASSES) -> None:
    assert ds.classes == classes
    assert ds.images.dtype == np.uint8 and ds.labels.dtype == np.int64
    assert ds.images.shape == (len(expected), *expected[0][0].shape)
    np.testing.assert_array_equal(ds.labels, [lab for _, lab in expected])
    np.testing.assert_array_equal(ds.images, np.stack([img for img, _ in expected]))


def _tar(src: Path, out: Path, top: str | None) -> Path:
    mode = "w:gz" if out.name.endswith((".gz", ".tgz")) else "w"
    with tarfile.open(out, mode) as tf:
        for split in ("train", "test"):
            tf.add(src / split, arcname=f"{top}/{split}" if top else split)
    return out


# ---------------------------------------------------------------------------- formats


def test_imagefolder(tmp_path: Path) -> None:
    exp = _make_imagefolder(tmp_path / "ds")
    for split in ("train", "test"):
        ds = load_dataset(tmp_path / "ds", split, cache_dir=tmp_path / "cache", progress=True)
        _check(ds, exp[split])
        assert ds.source == str((tmp_path / "ds").resolve())


@pytest.mark.parametrize("name,top", [("a.tar", None), ("a.tar.gz", None), ("a.tar.gz", "cifar10"), ("a.tgz", "x")])
def test_tar_archives(tmp_path: Path, name: str, top: str | None) -> None:
    exp = _make_imagefolder(tmp_path / "ds")
    archive = _tar(tmp_path / "ds", tmp_path / name, top)
    for split in ("train", "test"):
        _check(load_dataset(archive, split, cache_dir=tmp_path / "cache"), exp[split])


def _write_pickle(path: Path, obj: object) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))  # the real files are protocol-2 pickles


def _cifar_rows(images: np.ndarray) -> np.ndarray:
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # planar R, G, B like the real files


def test_cifar10_pickles(tmp_path: Path) -> None:
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    names = [b"airplane", b"automobile", b"bird"]
    _write_pickle(root / "batches.meta", {b"label_names": names, b"num_cases_per_batch": 2})
    rng = np.random.default_rng(1)
    batches = []
    for fname in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        imgs = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 3, 2).tolist()
        _write_pickle(root / fname, {b"batch_label": b"x", b"data": _cifar_rows(imgs), b"labels": labels})
        batches.append((imgs, labels))
    train = load_dataset(root, "train", cache_dir=tmp_path / "c")
    assert train.classes == ["airplane", "automobile", "bird"]
    np.testing.assert_array_equal(train.images, np.concatenate([b[0] for b in batches[:5]]))
    np.testing.assert_array_equal(train.labels, sum((b[1] for b in batches[:5]), []))
    test = load_dataset(root, "test", cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(test.images, batches[5][0])
    assert len(test) == 2
    # image_size resizes the 32x32 images
    assert load_dataset(root, "test", image_size=16, cache_dir=tmp_path / "c").images.shape == (2, 16, 16, 3)


def test_cifar100_pickles_str_keys(tmp_path: Path) -> None:
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    # Python-3 style pickle (str keys, default protocol) must work as well as Python-2 bytes keys.
    (root / "meta").write_bytes(pickle.dumps({"fine_label_names": ["apple", "bee"], "coarse_label_names": ["x"]}))
    imgs = np.random.default_rng(2).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    for split in ("train", "test"):
        d = {"data": _cifar_rows(imgs), "fine_labels": [1, 0, 1], "coarse_labels": [0, 0, 0]}
        (root / split).write_bytes(pickle.dumps(d))
    ds = load_dataset(root, "train", cache_dir=tmp_path / "c")
    assert ds.classes == ["apple", "bee"]
    np.testing.assert_array_equal(ds.images, imgs)
    np.testing.assert_array_equal(ds.labels, [1, 0, 1])


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickle_with_forbidden_global_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    _write_pickle(root / "batches.meta", {b"label_names": [_Evil()]})
    _write_pickle(root / "test_batch", {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]})
    with pytest.raises(DatasetError, match="forbidden global"):
        load_dataset(root, "test", cache_dir=tmp_path / "c")
    assert not (tmp_path / "PWNED").exists()


def test_tiny_imagenet(tmp_path: Path) -> None:
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n02", "n01"]  # class order is wnids.txt order, not sorted
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    train_exp, ann, val_exp = [], [], []
    for label, w in enumerate(wnids):
        (root / "train" / w / "images").mkdir(parents=True)
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
        for i in range(2):
            img = _img(10 * label + i)
            (root / "train" / w / "images" / f"{w}_{i}.JPEG").write_bytes(_png(img))  # PNG bytes: exact
            train_exp.append((img, label))
    for i, label in enumerate([1, 0, 1]):
        img = _img(100 + i)
        (root / "val" / "images" / f"val_{i}.JPEG").write_bytes(_png(img))
        ann.append(f"val_{i}.JPEG\t{wnids[label]}\t0\t0\t8\t8")
        val_exp.append((img, label))
    (root / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    _check(load_dataset(root, "train", cache_dir=tmp_path / "c"), train_exp, wnids)
    _check(load_dataset(root, "val", cache_dir=tmp_path / "c"), val_exp, wnids)
    _check(load_dataset(root, "test", cache_dir=tmp_path / "c"), val_exp, wnids)  # alias for val


# ---------------------------------------------------------------------------- sizes


def test_mixed_sizes_need_image_size(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    (root / "train" / "a").mkdir(parents=True)
    (root / "train" / "a" / "0.png").write_bytes(_png(_img(0, 8)))
    wide = np.zeros((8, 16, 3), np.uint8)
    wide[:, 4:12] = 200  # centre crop of the resized image keeps only the bright middle
    (root / "train" / "a" / "1.png").write_bytes(_png(wide))
    with pytest.raises(DatasetError, match="image_size"):
        load_dataset(root, "train", cache_dir=tmp_path / "c")
    ds = load_dataset(root, "train", image_size=4, cache_dir=tmp_path / "c")
    assert ds.images.shape == (2, 4, 4, 3)
    assert (ds.images[1] == 200).all()


# ---------------------------------------------------------------------------- cache


def _count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    decoded: list[str] = []
    real = data._decode

    def counting(payload: bytes, what: str) -> np.ndarray:
        decoded.append(what)
        return real(payload, what)

    monkeypatch.setattr(data, "_decode", counting)
    return decoded


def test_cache_hit_does_not_decode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _make_imagefolder(tmp_path / "ds")
    cache = tmp_path / "cache"
    decoded = _count_decodes(monkeypatch)
    first = load_dataset(tmp_path / "ds", "train", cache_dir=cache)
    assert len(decoded) == 6
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 3 and not any(".tmp" in f for f in files)
    assert isinstance(first.images, np.memmap) and not first.images.flags.writeable  # mapped from the cache file

    second = load_dataset(tmp_path / "ds", "train", cache_dir=cache)
    assert len(decoded) == 6  # nothing decoded again
    assert isinstance(second.images, np.memmap)
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.labels, second.labels)
    assert first.classes == second.classes
    # The images' own size asked for explicitly is the same cache entry ...
    assert load_dataset(tmp_path / "ds", "train", image_size=8, cache_dir=cache).images.shape == (6, 8, 8, 3)
    assert len(decoded) == 6
    # ... another image_size is a different one, so it decodes, once.
    assert load_dataset(tmp_path / "ds", "train", image_size=4, cache_dir=cache).images.shape == (6, 4, 4, 3)
    assert load_dataset(tmp_path / "ds", "train", image_size=4, cache_dir=cache).images.shape == (6, 4, 4, 3)
    assert len(decoded) == 12


def test_unwritable_cache_decodes_into_memory(tmp_path: Path) -> None:
    exp = _make_imagefolder(tmp_path / "ds")
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    with pytest.warns(UserWarning, match="not writable"):
        ds = load_dataset(tmp_path / "ds", "test", cache_dir=blocker)
    _check(ds, exp["test"])


def test_cache_invalidated_when_source_changes(tmp_path: Path) -> None:
    _make_imagefolder(tmp_path / "ds")
    cache = tmp_path / "cache"
    assert len(load_dataset(tmp_path / "ds", "test", cache_dir=cache)) == 6
    (tmp_path / "ds" / "test" / "cat" / "extra.png").write_bytes(_png(_img(99)))
    assert len(load_dataset(tmp_path / "ds", "test", cache_dir=cache)) == 7


def test_incomplete_cache_is_ignored(tmp_path: Path) -> None:
    exp = _make_imagefolder(tmp_path / "ds")
    cache = tmp_path / "cache"
    load_dataset(tmp_path / "ds", "test", cache_dir=cache)
    next(cache.glob("*.json")).unlink()  # as if the run died before the final (marker) write
    _check(load_dataset(tmp_path / "ds", "test", cache_dir=cache), exp["test"])


# ---------------------------------------------------------------------------- errors


def test_corrupt_and_truncated_archives(tmp_path: Path) -> None:
    _make_imagefolder(tmp_path / "ds", per_class=20, size=32)
    good = _tar(tmp_path / "ds", tmp_path / "good.tar.gz", "top")
    blob = good.read_bytes()
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(blob[: len(blob) // 2])
    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(b"this is not an archive" * 100)
    plain = _tar(tmp_path / "ds", tmp_path / "plain.tar", None)
    cut_plain = tmp_path / "cut.tar"
    cut_plain.write_bytes(plain.read_bytes()[: plain.stat().st_size // 2 + 100])
    for bad in (truncated, garbage, cut_plain):
        with pytest.raises(DatasetError, match="truncated or corrupt"):
            load_dataset(bad, "test", cache_dir=tmp_path / "c")


def test_garbage_image(tmp_path: Path) -> None:
    _make_imagefolder(tmp_path / "ds")
    bad = tmp_path / "ds" / "test" / "dog" / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.raises(DatasetError, match="bad.jpg"):
        load_dataset(tmp_path / "ds", "test", cache_dir=tmp_path / "c")


def test_missing_and_empty_split(tmp_path: Path) -> None:
    (tmp_path / "ds" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match="contains no images"):
        load_dataset(tmp_path / "ds", "train", cache_dir=tmp_path / "c")
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "ds", "test", cache_dir=tmp_path / "c")
    with pytest.raises(DatasetError, match="Unknown split"):
        load_dataset(tmp_path / "ds", "dev", cache_dir=tmp_path / "c")
    only_train = tmp_path / "t.tar"
    with tarfile.open(only_train, "w") as tf:
        info = tarfile.TarInfo("train/a/0.png")
        payload = _png(_img(0))
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    with pytest.raises(DatasetError, match="No images for split 'test'"):
        load_dataset(only_train, "test", cache_dir=tmp_path / "c")


# ---------------------------------------------------------------------------- locating


def test_locate_missing_lists_every_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(data.DEFAULT_SEARCH_ENV, raising=False)
    with pytest.raises(DatasetError) as info:
        locate_dataset(name="no-such-dataset")
    msg = str(info.value)
    for root in data.default_search_roots():
        assert str(root) in msg
    assert str(tmp_path.parent / "shared" / "datasets") in msg  # relative to the current dir
    assert str(Path(data.__file__).resolve().parents[1].parent / "shared" / "datasets") in msg  # repo root
    assert "--data" in msg and "RAPNET_DATA" in msg
    with pytest.raises(DatasetError, match="does not exist"):
        locate_dataset(tmp_path / "nope")


def test_locate_explicit_env_and_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "store"
    (store / "cifar10").mkdir(parents=True)
    archive = store / "cifar10" / "cifar10-jpeg.tar.gz"
    archive.write_bytes(b"")  # locating only looks at names
    (store / "cifar-100-python").mkdir()
    (store / "cifar-100-python" / "meta").write_bytes(b"")
    (store / "cifar-100-python" / "train").write_bytes(b"")

    assert locate_dataset(archive) == archive.resolve()  # explicit dataset path
    assert locate_dataset(store) == archive.resolve()  # explicit search root
    assert locate_dataset(store, name="cifar100") == (store / "cifar-100-python").resolve()
    monkeypatch.setenv(data.DEFAULT_SEARCH_ENV, str(store))
    assert locate_dataset() == archive.resolve()
    monkeypatch.delenv(data.DEFAULT_SEARCH_ENV)
    # ./data is part of the default search
    work = tmp_path / "work"
    (work / "data" / "tiny-imagenet-200").mkdir(parents=True)
    (work / "data" / "tiny-imagenet-200" / "wnids.txt").write_text("n01\n")
    monkeypatch.chdir(work)
    assert locate_dataset(name="tiny-imagenet") == (work / "data" / "tiny-imagenet-200").resolve()


# ---------------------------------------------------------------------------- utilities


def test_train_val_split() -> None:
    tr, va = train_val_split(100, 0.2, seed=3)
    tr2, va2 = train_val_split(100, 0.2, seed=3)
    np.testing.assert_array_equal(tr, tr2)
    np.testing.assert_array_equal(va, va2)
    assert len(va) == 20 and len(tr) == 80
    assert not set(tr) & set(va)
    assert sorted(set(tr) | set(va)) == list(range(100))
    assert (np.diff(tr) > 0).all() and (np.diff(va) > 0).all()
    assert not np.array_equal(va, train_val_split(100, 0.2, seed=4)[1])
    assert len(train_val_split(10, 3)[1]) == 3
    with pytest.raises(ValueError):
        train_val_split(10, 11)


def test_predictor_and_calibration_parts_mix_classes() -> None:
    # Archives are stored class by class (the shared CIFAR-10 one is): a slice of the sorted validation
    # indices would give the predictor classes 0-7 and calibration classes 8-9.
    labels = np.repeat(np.arange(10), 500)
    _, val = train_val_split(len(labels), 1000, seed=0)
    fit, cal = predictor_calibration_split(val, 800, seed=0)
    assert len(fit) == 800 and len(cal) == 200 and not set(fit) & set(cal)
    assert sorted(set(fit) | set(cal)) == sorted(val)
    for part in (fit, cal):
        counts = np.bincount(labels[part], minlength=10) / len(part)
        assert counts.min() > 0.05 and counts.max() < 0.15, counts
    np.testing.assert_array_equal(cal, predictor_calibration_split(val, 800, seed=0)[1])
    with pytest.raises(ValueError):
        predictor_calibration_split(val, 1001)


def test_subset_and_sha256(tmp_path: Path) -> None:
    ds = data.ImageDataset(np.arange(4 * 2 * 2 * 3, dtype=np.uint8).reshape(4, 2, 2, 3),
                           np.arange(4, dtype=np.int64), ["a"], "x")
    sub = ds.subset([3, 1])
    assert len(sub) == 2 and sub.labels.tolist() == [3, 1] and sub.images[0, 0, 0, 0] == 36
    f = tmp_path / "f.bin"
    f.write_bytes(b"abc")
    assert sha256_of_file(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


# ---------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_shared_cifar10_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = SHARED / "cifar10" / "cifar10-jpeg.tar.gz"
    if not archive.is_file():
        pytest.skip(f"shared CIFAR-10 archive not present at {archive}")
    monkeypatch.delenv(data.DEFAULT_SEARCH_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # so only the repo-root-relative default search can find it
    found = locate_dataset()
    assert found == archive.resolve()
    ds = load_dataset(found, "test", cache_dir=tmp_path / "cache")
    assert ds.images.shape == (10000, 32, 32, 3)
    assert ds.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    np.testing.assert_array_equal(np.bincount(ds.labels), [1000] * 10)
    assert 110 < ds.images.mean() < 135  # README: about 123 for test (JPEG export)


def test_stratified_sample_covers_every_class_evenly() -> None:
    labels = np.repeat(np.arange(10), 100)  # stored class by class, as test splits are
    for n in (10, 25, 137):
        idx = stratified_sample(labels, n, seed=0)
        assert len(idx) == n and len(set(idx.tolist())) == n
        assert np.all(np.diff(idx) > 0)  # sorted
        counts = np.bincount(labels[idx], minlength=10)
        assert counts.min() >= 1 and counts.max() - counts.min() <= 1


def test_stratified_sample_is_deterministic_and_seeded() -> None:
    labels = np.random.default_rng(3).integers(0, 7, 500)
    a, b = stratified_sample(labels, 40, seed=0), stratified_sample(labels, 40, seed=0)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, stratified_sample(labels, 40, seed=1))


def test_stratified_sample_edges() -> None:
    labels = np.array([0] * 3 + [1] * 50)
    assert np.array_equal(stratified_sample(labels, 100), np.arange(53))  # n >= len: all of them
    assert np.array_equal(stratified_sample(labels, 53), np.arange(53))
    assert len(stratified_sample(labels, 0)) == 0
    small = stratified_sample(labels, 10)
    assert np.bincount(labels[small]).tolist() == [3, 7]  # a class that runs out leaves its turns to the others


# ---------------------------------------------------------------------------- train/val-only datasets


def _make_train_val(root: Path, sizes: tuple[int, int] = (8, 8)) -> dict[str, list[tuple[np.ndarray, int]]]:
    """root/{train,val}/<class>/NNNN.png (no test split), like Imagenette."""
    expected: dict[str, list[tuple[np.ndarray, int]]] = {"train": [], "val": []}
    for split, per_class, base in (("train", 4, 0), ("val", 2, 500)):
        for label, cls in enumerate(CLASSES):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                img = _img(base + 10 * label + i, sizes[i % 2])
                (root / split / cls / f"{i:04d}.png").write_bytes(_png(img))
                expected[split].append((img, label))
    return expected


def test_train_val_only_folder_serves_test_from_val(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    from rapnet.train import TrainConfig, dataset_parts

    exp = _make_train_val(tmp_path / "ds")
    archive = tmp_path / "ds.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for split in ("train", "val"):
            tf.add(tmp_path / "ds" / split, arcname=f"imagenette/{split}")
    monkeypatch.setattr(data, "_NOTED", set())
    for source in (tmp_path / "ds", archive):
        cache = tmp_path / f"cache-{source.name}"
        _check(load_dataset(source, "test", cache_dir=cache), exp["val"])
        _check(load_dataset(source, "val", cache_dir=cache), exp["val"])
        assert capsys.readouterr().err.count("no test split: its val split is the test split") == 1  # said once
        decoded = _count_decodes(monkeypatch)
        monkeypatch.setattr(data, "_plan", lambda *a, **k: pytest.fail("read the dataset again"))
        _check(load_dataset(source, "test", cache_dir=cache), exp["val"])  # from the cache, val's entry
        assert not decoded
        monkeypatch.undo()
        monkeypatch.setattr(data, "_NOTED", set())
        # The validation split is carved from train, never from val.
        train = load_dataset(source, "train", cache_dir=cache)
        _check(train, exp["train"])
        _, train_idx, val_idx, _ = dataset_parts(train, TrainConfig(val_size=3, seed=0))
        assert len(val_idx) == 3 and len(train_idx) == len(exp["train"]) - 3
        assert max(val_idx) < len(train)
        capsys.readouterr()


def test_a_test_split_is_used_where_there_is_one(tmp_path: Path) -> None:
    exp = _make_imagefolder(tmp_path / "ds")
    (tmp_path / "ds" / "val" / "cat").mkdir(parents=True)
    (tmp_path / "ds" / "val" / "cat" / "0.png").write_bytes(_png(_img(77)))
    _check(load_dataset(tmp_path / "ds", "test", cache_dir=tmp_path / "c"), exp["test"])
    assert len(load_dataset(tmp_path / "ds", "val", cache_dir=tmp_path / "c")) == 1


def test_mixed_sizes_load_at_image_size_in_a_train_val_archive(tmp_path: Path) -> None:
    _make_train_val(tmp_path / "ds", sizes=(8, 12))
    archive = _tar_dirs(tmp_path / "ds", tmp_path / "mixed.tar", ("train", "val"))
    with pytest.raises(data.MixedSizesError, match="image_size=N"):
        load_dataset(archive, "test", cache_dir=tmp_path / "c")
    ds = load_dataset(archive, "test", image_size=6, cache_dir=tmp_path / "c")
    assert ds.images.shape == (6, 6, 6, 3) and len(ds) == 6
    assert not list((tmp_path / "c").glob("*.tmp*"))  # the failed attempt left no partial file


def _tar_dirs(src: Path, out: Path, splits: tuple[str, ...]) -> Path:
    with tarfile.open(out, "w") as tf:
        for split in splits:
            tf.add(src / split, arcname=split)
    return out


def test_cli_mixed_sizes_error_names_the_commands_own_flag(tmp_path: Path) -> None:
    from rapnet.evaluate import build_parser as eval_parser
    from rapnet.train import main as train_main

    _make_train_val(tmp_path / "ds", sizes=(8, 12))
    with pytest.raises(SystemExit) as info:
        train_main(["--data", str(tmp_path / "ds"), "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "o")])
    assert "Pass --image-size N" in str(info.value) and "image_size=N" not in str(info.value)
    assert "--image-size" in eval_parser().format_help() and "--split" in eval_parser().format_help()


# ---------------------------------------------------------------------------- bounds on what is decoded


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".webp", ".tiff"])
def test_image_header_size(ext: str) -> None:
    img = np.zeros((7, 13, 3), np.uint8)  # 13 wide, 7 high
    ok, buf = cv2.imencode(ext, img)
    assert ok
    assert data.image_header_size(buf.tobytes()) == (13, 7)
    assert data.image_header_size(b"not an image") is None


def test_oversized_images_are_refused_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _make_imagefolder(tmp_path / "ds")
    archive = _tar(tmp_path / "ds", tmp_path / "a.tar", None)
    monkeypatch.setattr(data.cv2, "imdecode", lambda *a: pytest.fail("decoded an image above the limit"))
    monkeypatch.setenv(data.MAX_IMAGE_PIXELS_ENV, "63")  # the images are 8x8 = 64 px
    for source in (tmp_path / "ds", archive):
        with pytest.raises(DatasetError, match="8x8 px .*RAPNET_MAX_IMAGE_PIXELS"):
            load_dataset(source, "test", cache_dir=tmp_path / "c")
    monkeypatch.delenv(data.MAX_IMAGE_PIXELS_ENV)
    monkeypatch.setenv(data.MAX_IMAGE_BYTES_ENV, "10")
    for source in (tmp_path / "ds", archive):
        with pytest.raises(DatasetError, match="RAPNET_MAX_IMAGE_BYTES"):
            load_dataset(source, "test", cache_dir=tmp_path / "c")
    monkeypatch.setenv(data.MAX_IMAGE_BYTES_ENV, "lots")
    with pytest.raises(DatasetError, match="not a positive integer"):
        load_dataset(tmp_path / "ds", "test", cache_dir=tmp_path / "c")


def test_grayscale_images_decode_to_rgb(tmp_path: Path) -> None:
    (tmp_path / "ds" / "val" / "a").mkdir(parents=True)
    gray = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    ok, buf = cv2.imencode(".png", gray)
    (tmp_path / "ds" / "val" / "a" / "g.png").write_bytes(buf.tobytes())
    (tmp_path / "ds" / "val" / "a" / "c.png").write_bytes(_png(_img(1)))
    ds = load_dataset(tmp_path / "ds", "val", cache_dir=tmp_path / "c")
    assert ds.images.shape == (2, 8, 8, 3)
    np.testing.assert_array_equal(ds.images[1], np.repeat(gray[:, :, None], 3, axis=2))
