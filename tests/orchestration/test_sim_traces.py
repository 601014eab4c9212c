"""The simulator's trace cache is keyed by content (checkpoints, dataset, build settings), never by path."""
from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from orchestration import cli, traces
from orchestration.traces import TraceSettings, cache_key, checkpoint_identities, dataset_identity
from rapnet.shipped import default_checkpoint


def _imagefolder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(3):
                cv2.imwrite(str(folder / f"{i}.png"), rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    return root


def test_same_archive_at_two_paths_gives_the_same_key(tmp_path):
    src = _imagefolder(tmp_path / "src")
    archive = tmp_path / "a" / "toy.tar"
    archive.parent.mkdir()
    with tarfile.open(archive, "w") as tar:
        tar.add(src, arcname="toy")
    copy = tmp_path / "b" / "elsewhere.tar"
    copy.parent.mkdir()
    shutil.copy(archive, copy)
    assert dataset_identity(archive) == dataset_identity(copy)
    ids = {"rapnet": "abc"}
    assert cache_key(ids, dataset_identity(archive), TraceSettings()) == cache_key(ids, dataset_identity(copy), TraceSettings())


def test_same_folder_dataset_at_two_paths_gives_the_same_key(tmp_path, monkeypatch):
    monkeypatch.setenv("RAPNET_CACHE", str(tmp_path / "cache"))
    a = _imagefolder(tmp_path / "one" / "toy")
    b = tmp_path / "two" / "toy-copy"
    shutil.copytree(a, b)
    assert dataset_identity(a) == dataset_identity(b)
    cv2.imwrite(str(b / "test" / "cat" / "0.png"), np.zeros((8, 8, 3), dtype=np.uint8))  # other content: other key
    assert dataset_identity(a) != dataset_identity(tmp_path / "two" / "toy-copy")


def test_same_checkpoint_at_two_paths_gives_the_same_identity(tmp_path):
    shipped = default_checkpoint("static")
    if not shipped.exists():
        pytest.skip("no shipped checkpoint")
    for name in ("x", "y"):
        (tmp_path / name).mkdir()
        shutil.copy(shipped, tmp_path / name / "static-cifar10.pt")
        shutil.copy(shipped.with_suffix(".json"), tmp_path / name / "static-cifar10.json")
    a = checkpoint_identities({"static": tmp_path / "x" / "static-cifar10.pt"})
    b = checkpoint_identities({"static": tmp_path / "y" / "static-cifar10.pt"})
    assert a == b


def test_the_key_changes_with_the_build_settings():
    ids, data = {"rapnet": "abc"}, "sha256:00"
    keys = {cache_key(ids, data, s) for s in (TraceSettings(), TraceSettings.full(), TraceSettings(test_images=500),
                                               TraceSettings(heldout_images=500), TraceSettings(seed=1))}
    assert len(keys) == 5


def test_default_cache_is_in_the_user_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("RAPNET_CACHE", str(tmp_path))
    assert traces.default_cache_path("0123").parent == tmp_path / traces.CACHE_FOLDER


def test_cli_sample_defaults_match_the_library():
    """rapnet-sim writes the defaults out (importing orchestration.traces at --help would load torch)."""
    assert cli.DEFAULT_TEST_IMAGES == traces.DEFAULT_TEST_IMAGES
    assert cli.DEFAULT_HELDOUT_IMAGES == traces.DEFAULT_HELDOUT_IMAGES
    args = cli.build_parser().parse_args(["sweep", "--full"])
    assert cli.trace_settings(args) == TraceSettings.full()
    args = cli.build_parser().parse_args(["sweep"])
    assert cli.trace_settings(args) == TraceSettings()
    assert not Path(args.out).is_absolute()  # relative to the current folder
