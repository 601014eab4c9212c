"""The camera-resolution model behind the sources a device has: a folder of photographs and a 640x480 video, with
no --checkpoint (the agent picks the camera model for them). The photographs are Imagenette val images, so the
answers can be checked against their labels: a wrong colour order, crop or scale in the frame path shows up as
accuracy falling towards chance (10%), far below the model's 81%."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from rapnet.data import locate_dataset


REPO = Path(__file__).resolve().parents[2]
PER_CLASS = 2
MIN_CORRECT = 0.6  # of 20 photos; the model's val accuracy is 81% (P(<12 of 20) is about 0.3%)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """PER_CLASS val photographs of each class as JPEG files named L<label>-<n>.jpg (labels: the sorted wnids)."""
    folder = tmp_path_factory.mktemp("photos")
    found: dict[str, list[bytes]] = {}
    with tarfile.open(locate_dataset(None, "imagenette"), "r:gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) >= 3 and parts[-3] == "val":
                kept = found.setdefault(parts[-2], [])
                if len(kept) < PER_CLASS:
                    kept.append(tar.extractfile(member).read())
                if len(found) == 10 and all(len(v) == PER_CLASS for v in found.values()):
                    break
    for label, wnid in enumerate(sorted(found)):
        for n, data in enumerate(found[wnid]):
            (folder / f"L{label}-{n}.jpg").write_bytes(data)
    return folder


def label_of(name: str) -> int:
    return int(Path(name).name[1:].split("-")[0])


def run_agent(args: list[str], tmp_path: Path) -> tuple[list[dict], str]:
    out = tmp_path / "out.jsonl"
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAPNET_TOKEN", None)
    proc = subprocess.run([sys.executable, "-m", "edge.agent", *args, "--output", str(out), "--quiet"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in out.read_text().splitlines()], proc.stderr


@pytest.mark.slow
def test_a_folder_of_photographs_end_to_end_with_the_cloud(photos, tmp_path):
    folder = photos
    # a slow device and the deepest exit's price: the planner offloads, to the cloud tier the agent starts here
    rows, err = run_agent(["--images", str(folder), "--device-gflops", "0.5", "--price", "0"], tmp_path)
    assert "rapnet-imagenette.pt" in err or "4ac2ee6db8d5" in err, err[-2000:]  # the camera model, not CIFAR-10's
    assert len(rows) == 20
    assert sum(r["where"] == "cloud" for r in rows) >= 10, [r["where"] for r in rows]
    correct = [r["class"] == label_of(r["name"]) for r in rows]
    assert np.mean(correct) >= MIN_CORRECT, correct


@pytest.mark.slow
def test_a_640x480_video_answered_on_the_device(photos, tmp_path):
    """Each photograph scaled to 480x480 in the middle of a black 640x480 frame: the agent's resize and centre
    crop give the photograph back. No cloud answers (the address is closed): every frame is the device's."""
    folder = photos
    paths = sorted(folder.glob("*.jpg"))
    video = tmp_path / "camera.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (640, 480))
    assert writer.isOpened()
    for path in paths:
        frame = np.zeros((480, 640, 3), np.uint8)
        frame[:, 80:560] = cv2.resize(cv2.imread(str(path)), (480, 480), interpolation=cv2.INTER_CUBIC)
        writer.write(frame)
    writer.release()
    rows, err = run_agent(["--video", str(video), "--cloud", "127.0.0.1:9", "--no-cloud-check", "--runtime", "onnx"],
                          tmp_path)
    assert len(rows) == len(paths)
    assert all(r["where"] in ("edge", "edge-fallback") for r in rows)
    correct = [r["class"] == label_of(path.name) for r, path in zip(rows, paths)]
    assert np.mean(correct) >= MIN_CORRECT, correct


def test_wordnet_ids_are_shown_by_their_names_and_kept_as_ids():
    from edge.pipeline import FrameResult
    from rapnet.class_names import readable

    assert readable("n03888257") == "parachute" and readable("cat") == "cat"
    result = FrameResult(frame=0, source_index=0, class_index=1, confidence=0.9, exit=2, target_exit=2, where="edge",
                         split=None, encoding=None, bytes_sent=0, bytes_received=0, latency_ms={})
    out = result.to_json(["n01440764", "n02102040"])
    assert out["class_name"] == "English springer" and out["class_id"] == "n02102040"
    assert "class_id" not in result.to_json(["airplane", "automobile"])
