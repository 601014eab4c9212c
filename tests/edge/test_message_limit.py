"""The edge's gRPC message limit follows the model contract: by default it is the largest request the checkpoint's
carry and the encoding menu can make (rapnet.codec.budget, the cloud front's receive limit for the same model), every
request the menu can make fits it, and the agent hands the same number to the link and to the planner.
--max-message-bytes (cloud.max_message_bytes) overrides it. The cloud address is a closed port: no cloud starts."""
from __future__ import annotations

import socket

import cv2
import numpy as np
import pytest

from edge import agent as edge_agent
from edge.config import CloudSettings, ConfigError, EdgeConfig
from edge.link import CloudTarget
from edge.runtime import open_runtime
from rapnet.codec import DecodeLimits, build_request, encode_options, encodings_for_split, request_budget
from rapnet.codec.budget import link_message_limit, menu_splits, response_bytes
from rapnet.codec.menu import DEFAULT_ENCODINGS, IMAGE_ENCODINGS
from rapnet.shipped import model_for

SHIPPED = ("cifar10", "imagenette")


@pytest.fixture(scope="module", params=SHIPPED)
def shipped(request):
    """(checkpoint path, the model on PyTorch) of the shipped RAPNet for a dataset."""
    checkpoint = str(model_for(request.param))
    return checkpoint, open_runtime(checkpoint, "torch", 1).runtime


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_default_limit_is_the_models_request_budget(shipped):
    _, runtime = shipped
    contract = runtime.contract
    budget = request_budget(contract).max_bytes
    front = request_budget(contract, DecodeLimits(max_batch=1)).max_bytes  # cloud.front.InferenceFront's budget
    assert CloudSettings().max_message_bytes is None  # auto
    assert CloudSettings().message_limit(contract, DEFAULT_ENCODINGS) == budget == front
    assert CloudSettings().message_limit(contract) == budget
    assert budget > response_bytes(contract)  # the receive side: any answer fits too
    assert CloudSettings(max_message_bytes=4096).message_limit(contract) == 4096  # an explicit value wins
    # an image-only menu sends split 0 only: its limit is split 0's budget, under the full menu's
    image_only = CloudSettings().message_limit(contract, IMAGE_ENCODINGS)
    assert image_only == max(request_budget(contract, splits=[0]).max_bytes, response_bytes(contract)) < budget


def test_every_request_the_menu_can_make_fits_the_default_limit(shipped):
    """At every split point the menu reaches, in every menu encoding, with the longest request id: the model's own
    features on a noise image, and noise in the carry's shapes (which no codec compresses), with the image as an
    image payload (as the agent sends it) or as a tensor. Each request fits the limit; the largest takes more than
    half of it."""
    _, runtime = shipped
    contract = runtime.contract
    limit = link_message_limit(contract, DEFAULT_ENCODINGS)
    size = runtime.config.image_size
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    x = rng.standard_normal((1, 3, size, size)).astype(np.float32) * 3
    largest = 0
    for split in menu_splits(contract, DEFAULT_ENCODINGS):
        shapes = contract.carry_shapes[split]
        noise = {k: (rng.standard_normal((1, *s)) * 30).astype(np.float32) for k, s in shapes.items()}
        for carry in (runtime.edge_part(x, split), noise):
            for name in (e for e in encodings_for_split(split) if e in DEFAULT_ENCODINGS):
                for image in (pixels, None) if "image" in shapes and split > 0 else (pixels,) if split == 0 else (None,):
                    request = build_request(contract, carry, split, contract.num_exits - 1, encode_options(name),
                                            image=image, request_id="r" * 128, deadline_ms=2**31, stop_confidence=0.5,
                                            cloud_exit_price=1e9 if split == 0 else None)
                    nbytes = request.ByteSize()
                    assert nbytes <= limit, f"split {split}, {name}: {nbytes} bytes over the limit {limit}"
                    largest = max(largest, nbytes)
    assert limit / 2 < largest <= limit


def _image_folder(root, size: int, count: int = 3):
    rng = np.random.default_rng(0)
    root.mkdir()
    for i in range(count):
        cv2.imwrite(str(root / f"{i}.png"), rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    return root


def _build(checkpoint: str, folder, monkeypatch, *extra: str):
    """The agent's app on `folder`, with the max_request_bytes it hands the planner captured."""
    import edge.decide

    seen = {}
    real = edge.decide.build_decider

    def spy(*args, **kwargs):
        seen["max_request_bytes"] = kwargs.get("max_request_bytes")
        return real(*args, **kwargs)

    monkeypatch.setattr(edge.decide, "build_decider", spy)
    lines: list[str] = []
    app = edge_agent.build_app(["--images", str(folder), "--checkpoint", checkpoint, "--cloud",
                                f"127.0.0.1:{_free_port()}", "--no-cloud-check", "--fixed-network", "--device-gflops",
                                "1", "--calibration-frames", "2", "--quiet", "--runtime", "torch", *extra],
                               log=lines.append)
    return app, seen["max_request_bytes"], lines


def test_the_agent_hands_the_contracts_limit_to_the_link_and_the_planner(shipped, tmp_path, monkeypatch):
    checkpoint, runtime = shipped
    folder = _image_folder(tmp_path / "frames", runtime.config.image_size)
    budget = request_budget(runtime.contract).max_bytes
    app, planned, lines = _build(checkpoint, folder, monkeypatch)
    try:
        assert app.message_limit == planned == app.link.target.max_message_bytes == budget
        assert f"gRPC message limit: {budget} bytes (from the model contract)" in lines
        assert app.decider.planner.menu  # nothing a real request needs was left off the menu
    finally:
        edge_agent.close_app(app)


def test_an_explicit_limit_overrides_the_contract_and_bounds_every_plan(shipped, tmp_path, monkeypatch):
    """--max-message-bytes under the largest requests: the link and the planner get it, and no (split, encoding) on
    the planner's menu makes a request over it on the calibration frames (so no plan sends one)."""
    checkpoint, runtime = shipped
    folder = _image_folder(tmp_path / "frames", runtime.config.image_size)
    from orchestration.calibration import measure_payloads

    pixels = np.stack([cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in sorted(folder.iterdir())[:2]])
    sizes, _, _, _ = measure_payloads(runtime, pixels)
    largest = {key: int(v.max()) for key, v in sizes.items()}
    limit = max(1024, sorted(largest.values())[len(largest) // 2])  # about half the menu fits
    app, planned, lines = _build(checkpoint, folder, monkeypatch, "--max-message-bytes", str(limit))
    try:
        assert app.message_limit == planned == app.link.target.max_message_bytes == limit
        assert f"gRPC message limit: {limit} bytes (--max-message-bytes)" in lines
        menu = app.decider.planner.menu
        assert menu and all(largest[key] <= limit for key in menu)
        assert any(largest[key] > limit for key in largest)  # the limit did leave something off
    finally:
        edge_agent.close_app(app)


def test_the_limit_is_auto_unless_given_and_checked(capsys):
    assert EdgeConfig.from_mapping({"source": {"camera": 0}, "cloud": {"max_message_bytes": "auto"}}).cloud == \
        CloudSettings()
    assert edge_agent.parse_config(["--camera", "0", "--max-message-bytes", "auto"]).cloud.max_message_bytes is None
    assert edge_agent.parse_config(["--camera", "0", "--max-message-bytes", "65536"]).cloud.max_message_bytes == 65536
    with pytest.raises(ConfigError, match=r"--max-message-bytes.*at least 1024 bytes, or auto"):
        CloudSettings(max_message_bytes=100)
    with pytest.raises(SystemExit):  # a usage error
        edge_agent.parse_config(["--camera", "0", "--max-message-bytes", "lots"])
    assert "neither a number of bytes nor 'auto'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"auto: pass the model contract's limit"):
        CloudTarget.from_settings(CloudSettings(), token=None, address="127.0.0.1:1")
    assert CloudTarget.from_settings(CloudSettings(), None, "127.0.0.1:1", max_message_bytes=5000).max_message_bytes == 5000
    assert CloudTarget.from_settings(CloudSettings(max_message_bytes=3000), None, "127.0.0.1:1",
                                     max_message_bytes=5000).max_message_bytes == 3000
