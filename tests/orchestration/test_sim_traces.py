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
from rapnet.shipped import CAMERA_DATASET, default_checkpoint


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
    assert set(cli.DATASETS) == set(traces.DEFAULT_TEST_IMAGES) == set(traces.DEFAULT_HELDOUT_IMAGES)
    assert cli.DEFAULT_DATASET == CAMERA_DATASET and TraceSettings() == TraceSettings.default(CAMERA_DATASET)
    args = cli.build_parser().parse_args(["sweep", "--full"])
    assert cli.trace_settings(args) == TraceSettings.full()
    args = cli.build_parser().parse_args(["sweep"])
    assert args.dataset == CAMERA_DATASET and cli.trace_settings(args) == TraceSettings.default(CAMERA_DATASET)
    assert not Path(args.out).is_absolute()  # relative to the current folder


@pytest.mark.parametrize("dataset", ["cifar10", "imagenette"])
def test_each_dataset_has_its_own_default_sample_sizes(dataset):
    args = cli.build_parser().parse_args(["traces", "--dataset", dataset])
    settings = cli.trace_settings(args)
    assert settings == TraceSettings.default(dataset)
    assert settings.test_images == traces.DEFAULT_TEST_IMAGES[dataset]
    assert settings.heldout_images == traces.DEFAULT_HELDOUT_IMAGES[dataset]
    given = cli.trace_settings(cli.build_parser().parse_args(["traces", "--dataset", dataset, "--test-images", "7"]))
    assert given.test_images == 7 and given.heldout_images == settings.heldout_images
    assert TraceSettings.default("cifar10") != TraceSettings.default("imagenette")


def test_a_dataset_without_its_own_defaults_gets_the_camera_sets():
    assert TraceSettings.default("tiny-imagenet") == TraceSettings.default(CAMERA_DATASET)


@pytest.mark.parametrize("command", ["traces", "run", "sweep", "live"])
def test_every_command_simulates_the_dataset_it_is_given(command, monkeypatch):
    """--dataset picks the checkpoints (rapnet.shipped.default_checkpoints) and the data the traces are built on."""
    import torch

    seen = {}

    def fake_ensure(checkpoints, data, cache, settings, **kw):
        seen.update(checkpoints=checkpoints, settings=settings, **kw)
        raise _Stop

    monkeypatch.setattr(traces, "ensure_traces", fake_ensure)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(_Stop):
            cli.main([command, "--dataset", "cifar10"])
    finally:
        torch.set_num_threads(threads)
    assert seen["dataset"] == "cifar10" and seen["settings"] == TraceSettings.default("cifar10")
    assert {name: p.name for name, p in seen["checkpoints"].items()} == {
        "rapnet": "rapnet-cifar10.pt", "sdn": "sdn-cifar10.pt", "static": "static-cifar10.pt"}


class _Stop(Exception):
    pass


def _tiny_checkpoints(root: Path, classes: list[str]) -> dict[str, Path]:
    import torch

    from rapnet.build import build_model
    from rapnet.checkpoint import save_checkpoint
    from rapnet.config import ModelConfig

    torch.manual_seed(0)
    split = {"val": 4, "predictor_fit": 2, "predictor_split": "random"}
    paths = {}
    for kind in ("rapnet", "sdn", "static"):
        paths[kind] = root / f"{kind}-toy.pt"
        model = build_model(ModelConfig(kind=kind, width=0.25, num_classes=len(classes))).eval()
        save_checkpoint(paths[kind], model, {"classes": classes, "split": split})
    return paths


def test_traces_are_built_on_the_named_dataset_and_the_agent_reads_the_same_frames(tmp_path, monkeypatch):
    """A dataset found by its name (here through $RAPNET_DATA) is what the traces hold, what their metadata names,
    and what rapnet-sim live hands the edge agent; sample_rows finds the agent's --limit frames in them."""
    from orchestration import live
    from orchestration.traces import ensure_traces, sample_rows

    monkeypatch.setenv("RAPNET_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "datasets"
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 4)):
        for cls in ("a", "b"):
            (root / "toy" / split / cls).mkdir(parents=True)
            for i in range(count):
                cv2.imwrite(str(root / "toy" / split / cls / f"{i}.png"), rng.integers(0, 256, (32, 32, 3), np.uint8))
    monkeypatch.setenv("RAPNET_DATA", str(root))
    checkpoints = _tiny_checkpoints(tmp_path, ["a", "b"])
    small = TraceSettings(test_images=6, heldout_images=0, payload_images=2)
    built, meta = ensure_traces(checkpoints, None, None, small, log=lambda _: None, progress=False, dataset="toy")
    assert meta["dataset"] == "toy" and Path(meta["data"]) == (root / "toy").resolve()
    assert built["rapnet"].num_samples == 6 and meta["test_images_total"] == 8
    again, meta_again = ensure_traces(checkpoints, None, None, small, log=pytest.fail, progress=False, dataset="toy")
    assert meta_again["key"] == meta["key"]  # the cache, found again: no rebuild (log would fail)
    rows = sample_rows(meta, 4)
    assert len(rows) == 4 and len(set(rows.tolist())) == 4
    with pytest.raises(ValueError, match="--test-images 7"):
        sample_rows(meta, 7)
    command = live.agent_command(1, tmp_path / "token", [], 1.0, 4, live.DEFAULT_POINTS[0], 0.0, tmp_path / "o",
                                 tmp_path / "s", checkpoints["rapnet"], Path(meta["path"]), meta["data"], runtime="torch")
    assert command[command.index("--dataset") + 1] == meta["data"]
    assert command[command.index("--runtime") + 1] == "torch"


def test_an_edge_on_onnx_runtime_plans_the_cloud_part_with_the_traces_leaf_layers(tmp_path, monkeypatch):
    """The agent's planner from a trace cache charges its own runtime's calls on the device and the cloud's eager
    PyTorch leaf layers in the cloud, as the simulator's planner does."""
    from orchestration.calibration import planner_for_model
    from rapnet.checkpoint import load_model
    from rapnet.execution import as_runtime

    monkeypatch.setenv("RAPNET_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 2)):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                cv2.imwrite(str(root / split / cls / f"{i}.png"), rng.integers(0, 256, (32, 32, 3), np.uint8))
    checkpoints = _tiny_checkpoints(tmp_path, ["a", "b"])
    built, path = traces.build_traces(checkpoints, str(root), TraceSettings(test_images=4, payload_images=2),
                                      out=tmp_path / "t.npz", log=lambda _: None, progress=False)
    run = as_runtime(load_model(checkpoints["rapnet"])[0])
    t = built["rapnet"]
    run.layer_calls = ((1,) * len(t.stage_layers), (1,) * len(t.exit_layers), 1)  # as ONNX Runtime counts them
    planner = planner_for_model(run, traces=path)
    assert planner.layers == t.layer_counts("onnx") != t.layer_counts("torch")
    assert planner.cloud_layers == t.layer_counts("torch")
