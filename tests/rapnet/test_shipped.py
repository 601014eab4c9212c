"""Where the shipped models are (checkout, installed package, $RAPNET_MODELS), that a built wheel carries them,
and the machine record every result file holds."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from rapnet import shipped
from rapnet.machine import machine_info

ROOT = Path(__file__).resolve().parents[2]


def test_default_checkpoint_in_a_checkout(monkeypatch):
    monkeypatch.delenv(shipped.MODELS_ENV, raising=False)
    assert shipped.models_dir() == ROOT / "models"
    for kind in shipped.KINDS:
        path = shipped.default_checkpoint(kind)
        assert path == ROOT / "models" / f"{kind}-cifar10.pt"
        assert path.exists() and path.with_suffix(".json").exists()
    assert shipped.default_checkpoints()["sdn"] == ROOT / "models" / "sdn-cifar10.pt"


def test_environment_overrides_the_models_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(shipped.MODELS_ENV, str(tmp_path))
    assert shipped.models_dir() == tmp_path
    assert shipped.default_checkpoint("static", "cifar100") == tmp_path / "static-cifar100.pt"
    assert shipped.default_checkpoints(folder=tmp_path / "x")["rapnet"] == tmp_path / "x" / "rapnet-cifar10.pt"


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="rapnet, sdn, static"):
        shipped.default_checkpoint("resnet")


def test_installed_package_models_come_first(tmp_path, monkeypatch):
    """In a non-editable install the models sit in rapnet/models/ beside the code (package data)."""
    monkeypatch.delenv(shipped.MODELS_ENV, raising=False)
    package = tmp_path / "site-packages" / "rapnet"
    (package / "models").mkdir(parents=True)
    (package / "models" / "rapnet-cifar10.pt").write_bytes(b"x")
    monkeypatch.setattr(shipped, "_PACKAGE", package)
    assert shipped.default_checkpoint() == package / "models" / "rapnet-cifar10.pt"
    (package / "models" / "rapnet-cifar10.pt").unlink()  # neither place holds any: the checkout's path, for --help
    assert shipped.models_dir() == package.parent / "models"


@pytest.mark.slow
def test_a_built_wheel_carries_the_models(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    wheel = next(tmp_path.glob("rapnet-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for kind in shipped.KINDS:
        assert f"rapnet/models/{kind}-cifar10.pt" in names and f"rapnet/models/{kind}-cifar10.json" in names
    assert "cloud/cluster/serve-config.yaml" in names
    assert "rapnet/shipped.py" in names and "orchestration/cli.py" in names


def test_machine_info():
    info = machine_info(torch_threads=3)
    assert info["torch_threads"] == 3 and info["cores"] >= 1 and info["cpu"]
    for key in ("python", "torch", "numpy", "load_average"):
        assert key in info
    if (ROOT / ".git").exists():
        assert len(info["git_commit"]) == 40 and isinstance(info["git_dirty"], bool)


def test_a_dataset_gets_its_own_shipped_set_and_everything_else_the_camera_model(tmp_path, monkeypatch):
    from rapnet import shipped

    monkeypatch.setenv(shipped.MODELS_ENV, str(tmp_path))
    (tmp_path / "rapnet-cifar10.pt").write_bytes(b"")
    assert shipped.model_for("cifar10") == tmp_path / "rapnet-cifar10.pt"
    camera = tmp_path / f"rapnet-{shipped.CAMERA_DATASET}.pt"
    assert shipped.model_for(None) == shipped.model_for("tinyimagenet") == camera
    assert shipped.model_for("cifar10", kind="sdn") == tmp_path / f"sdn-{shipped.CAMERA_DATASET}.pt"
