"""The edge on ONNX Runtime: graphs from rapnet-export answer as PyTorch does at every exit and split point, a
request built from them gets the same class from the real cloud, the agent runs with torch, Ray and matplotlib
blocked from import, and the edge install's dependencies hold none of them."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch

from rapnet.build import build_model
from rapnet.checkpoint import load_model, save_checkpoint
from rapnet.codec import ModelContract, build_request, encode_options, parse_request_bytes
from rapnet.config import ModelConfig
from rapnet.costs import measure_costs
from rapnet.data import fit_image, load_dataset, locate_dataset, stratified_sample
from rapnet.execution import OnnxRuntime, TorchRuntime, leaf_layers
from rapnet.export import MANIFEST, ExportError, export_device_graphs, export_dir_beside, find_export
from rapnet.preprocess import to_model_array, to_model_input
from rapnet.shipped import default_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-4  # rapnet.export.EXPORT_TOLERANCE: ONNX Runtime vs PyTorch, on logits and crossing tensors
BLOCKED = ("torch", "ray", "matplotlib")


@pytest.fixture(scope="module")
def cifar_images():
    """A class-stratified sample of the real CIFAR-10 test images (the shared archive)."""
    try:
        test = load_dataset(locate_dataset(None, "cifar10"), "test")
    except Exception as err:  # noqa: BLE001 - no dataset on this machine
        pytest.skip(f"no CIFAR-10 archive: {err}")
    idx = stratified_sample(test.labels, 20, seed=1)
    return np.ascontiguousarray(test.images[idx])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small fresh RAPNet checkpoint, exported beside itself."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "tiny.pt"
    save_checkpoint(path, build_model(ModelConfig(width=0.25)).eval(), {"price": 0.1})
    return path, export_device_graphs(path)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """The shipped CIFAR-10 RAPNet in PyTorch and on ONNX Runtime (graphs exported into a temporary folder)."""
    path = default_checkpoint("rapnet")
    model, meta = load_model(path)
    manifest = export_device_graphs(path, tmp_path_factory.mktemp("shipped") / "rapnet-onnx")
    return model, meta, OnnxRuntime(manifest)


def _close(a, b, what):
    a, b = np.asarray(a), np.asarray(b.detach().numpy() if hasattr(b, "detach") else b)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    diff = float(np.abs(a - b).max())
    assert diff <= TOL, f"{what}: ONNX Runtime and PyTorch differ by {diff:.3g}"


def _check_every_exit_and_split(model, run: OnnxRuntime, pixels: np.ndarray) -> None:
    """Every exit's logits, every split's crossing carry and every continuation from it, against the
    MultiExitNetwork's own methods (PyTorch on the batch; ONNX Runtime's batch-1 graphs image by image)."""
    x, xt = to_model_array(pixels), to_model_input(pixels)
    with torch.no_grad():
        if model.predictor is not None:
            _close(run.exit_scores(x), model.exit_scores(xt), "predictor")
        for k in range(model.num_exits):
            _close(run.run_to_exit(x, k), model.run_to_exit(xt, k), f"exit {k}")
        for split in range(model.num_stages + 1):
            ours, theirs = run.edge_part(x, split), model.edge_part(xt, split)
            assert set(ours) == set(theirs) == set(model.live_keys(split))
            for key in ours:
                _close(ours[key], theirs[key], f"carry {key!r} at split {split}")
            for k in range(model.num_exits):
                if model.exit_stages[k] >= split:  # the cloud's side, which the edge runs when it falls back
                    _close(run.cloud_part(ours, split, k), model.cloud_part(theirs, split, k),
                           f"split {split} to exit {k}")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """PyTorch on one thread, as the agent runs it (and no oversubscription of a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow  # exports graphs: seconds
def test_export_writes_a_manifest_an_edge_reads_without_torch(tiny):
    path, manifest = tiny
    assert manifest.folder == export_dir_beside(path) and (manifest.folder / MANIFEST).is_file()
    model, meta = load_model(path)
    assert manifest.identity == meta["identity"] and manifest.metadata["price"] == 0.1
    assert ModelConfig.from_dict(manifest.config) == model.config
    assert len(manifest.stages) == model.num_stages and len(manifest.exits) == len(manifest.to_exit) == model.num_exits
    data = json.loads((manifest.folder / MANIFEST).read_text())
    assert data["opset"] == 17 and data["versions"]["torch"] == torch.__version__ and data["versions"]["onnx"]
    for s, (graph, stage) in enumerate(zip(manifest.stages, model.stages)):  # carry keys in and out
        assert [key for _, key, _ in graph.inputs] == list(stage.reads) and graph.outputs[0][1] == stage.writes
    run = OnnxRuntime(manifest)
    assert run.costs == measure_costs(model)  # the one cost table, read back from JSON
    assert run.contract == ModelContract.from_model(model, meta["identity"])
    assert run.layer_calls == ((1,) * model.num_stages, (1,) * model.num_exits, 1)  # one call per graph
    assert manifest.leaf_layers["stage_layers"] == [leaf_layers(s) for s in model.stages]
    assert find_export(path).folder == manifest.folder and find_export(manifest.folder).identity == manifest.identity


@pytest.mark.slow  # exports graphs: seconds
def test_an_edited_checkpoint_is_not_served_by_its_old_graphs(tiny, tmp_path):
    path, manifest = tiny
    copy = tmp_path / path.name
    copy.write_bytes(path.read_bytes())
    os.symlink(manifest.folder, export_dir_beside(copy))
    assert find_export(copy) is not None  # same bytes: the graphs fit
    torch.manual_seed(1)
    save_checkpoint(copy, build_model(ModelConfig(width=0.25)).eval())
    assert find_export(copy) is None  # other bytes: the manifest's sha256 no longer matches
    os.unlink(export_dir_beside(copy))
    export_dir_beside(copy).mkdir()
    (export_dir_beside(copy) / MANIFEST).write_text('{"format": "rapnet-onnx/0"}')
    assert find_export(copy) is None  # another version's folder: exported again, not an error
    with pytest.raises(ExportError, match="rapnet-export"):
        find_export(export_dir_beside(copy))  # named as the model itself: an error that says what to run


@pytest.mark.slow  # exports graphs: seconds
def test_tiny_model_on_onnx_runtime_equals_pytorch(tiny, cifar_images):
    path, manifest = tiny
    model, _ = load_model(path)
    _check_every_exit_and_split(model, OnnxRuntime(manifest), cifar_images[:3])


def test_numpy_preprocessing_and_codec_equal_the_torch_ones():
    # any uint8 pixels: this quick check needs no decoded dataset (the slow ones here run on real images)
    cifar_images = np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    x = to_model_array(cifar_images)
    assert x.dtype == np.float32 and np.array_equal(x, to_model_input(cifar_images).numpy())  # bit for bit
    torch.manual_seed(0)
    run = TorchRuntime(build_model(ModelConfig(width=0.25)).eval())
    carry = run.edge_part(to_model_array(cifar_images[0]), 2)
    request = build_request(run.contract, carry, 2, run.num_exits - 1, encode_options("int8+zstd"),
                            image=cifar_images[0])
    data = request.SerializeToString()
    as_numpy, as_torch = parse_request_bytes(data, run.contract, numpy=True), parse_request_bytes(data, run.contract)
    assert set(as_numpy.carry) == set(as_torch.carry) == set(carry)
    for key in carry:
        assert isinstance(as_numpy.carry[key], np.ndarray) and isinstance(as_torch.carry[key], torch.Tensor)
        assert np.array_equal(as_numpy.carry[key], as_torch.carry[key].numpy())


@pytest.mark.slow  # exports graphs: seconds
def test_the_planner_is_calibrated_on_the_runtime_in_use(tiny, cifar_images):
    from edge.config import DecisionSettings
    from edge.decide import build_decider, measure_device_gflops
    from orchestration.calibration import measure_payloads

    path, manifest = tiny
    model, meta = load_model(path)
    onnx, eager = OnnxRuntime(manifest), TorchRuntime(model, meta["identity"])
    decider = build_decider(onnx, cifar_images[:4], DecisionSettings(device_gflops=None, encodings=("png", "fp32+zstd")),
                            manifest.metadata)
    # the device model counts the runtime's own calls: one per graph (eager PyTorch: its leaf layers)
    assert decider.planner.layers.stage_layers == (1,) * model.num_stages
    assert eager.layer_calls[0] == tuple(leaf_layers(s) for s in model.stages)
    assert decider.planner.costs == measure_costs(model) and decider.price == 0.1  # the manifest's price
    assert decider.settings.device_gflops > 0  # timed on ONNX Runtime
    gflops, ms = measure_device_gflops(onnx, decider.planner, cifar_images[0])
    assert gflops > 0 and ms > 0
    # the same requests from either runtime: PNG of the same pixels, features equal within float rounding
    sizes, _, _, agreement = measure_payloads(onnx, cifar_images[:4])
    ref_sizes, _, _, ref_agreement = measure_payloads(eager, cifar_images[:4])
    assert sizes.keys() == ref_sizes.keys() and agreement == ref_agreement
    for key, ref in ref_sizes.items():
        assert np.abs(sizes[key].astype(int) - ref).max() <= (0 if key[1] in ("png", "raw+zstd") else 16), key


@pytest.mark.slow
def test_shipped_model_on_onnx_runtime_equals_pytorch_at_every_exit_and_split(shipped, cifar_images):
    model, _, run = shipped
    _check_every_exit_and_split(model, run, cifar_images)
    # the control loop of the capped rule decides as the network's own does
    for image in cifar_images[:10]:
        x, xt = to_model_array(image), to_model_input(image)
        with torch.no_grad():
            logits, k = run.run_until_confident(x, 0.9)
            ref_logits, ref_k = model.run_until_confident(xt, 0.9)
            assert k == ref_k
            _close(logits, ref_logits, "run_until_confident")
            for split in (2, 4):
                (carry, answer), (ref_carry, ref_answer) = run.edge_part_capped(x, split, 0.9), \
                    model.edge_part_capped(xt, split, 0.9)
                assert (answer is None) == (ref_answer is None) and (carry is None) == (ref_carry is None)
                if answer is not None:
                    assert answer[1] == ref_answer[1]


@pytest.mark.slow
def test_imagenet_layout_at_128_px_on_onnx_runtime_equals_pytorch(tmp_path, cifar_images):
    torch.manual_seed(0)
    model = build_model(ModelConfig(layout="imagenet", image_size=128, width=0.25)).eval()
    path = tmp_path / "imagenet128.pt"
    save_checkpoint(path, model, {"classes": [f"c{i}" for i in range(10)]})
    manifest = export_device_graphs(path)
    assert manifest.image_size() == 128 and manifest.stages[0].inputs[0][2] == (1, 3, 128, 128)
    model, _ = load_model(path)
    pixels = np.stack([fit_image(image, 128) for image in cifar_images[:4]])  # real images at the model's size
    _check_every_exit_and_split(model, OnnxRuntime(manifest), pixels)


# --- against the real cloud, and with torch, Ray and matplotlib blocked ------------------------------------------
TOKEN = "onnx-runtime-test-" + "t" * 20


@pytest.fixture(scope="module")
def cloud(ray_instance):
    from cloud.config import CloudConfig
    from cloud.server import CloudServer

    config = CloudConfig().with_overrides(
        autoscaling={"min_replicas": 1, "max_replicas": 1}, batch={"max_batch_size": 4, "batch_wait_ms": 2},
        replica={"num_cpus": 0.5}, front={"port": 0, "request_timeout_s": 30.0}, metrics={"port": 0})
    server = CloudServer(str(default_checkpoint("rapnet")), config, token=TOKEN).start()
    yield server
    server.stop()


@pytest.mark.slow
def test_a_request_built_on_onnx_runtime_gets_the_same_class_from_the_real_cloud(cloud, shipped, cifar_images):
    from protos.rapnet.v1.inference_pb2_grpc import InferenceStub
    from rapnet.transport import auth_metadata, open_channel

    model, _, run = shipped
    channel = open_channel(cloud.address)
    stub = InferenceStub(channel)
    try:
        for i, image in enumerate(cifar_images[:6]):
            x = to_model_array(image)
            for split in range(model.num_stages):
                first = next(j for j, s in enumerate(model.exit_stages) if s >= split)
                k = model.num_exits - 1 if i % 2 else first
                encoding = "png" if split == 0 else "fp32+zstd"
                request = build_request(run.contract, run.edge_part(x, split), split, k, encode_options(encoding),
                                        image=image)
                reply = stub.Infer(request, metadata=auth_metadata(TOKEN), timeout=30)
                with torch.no_grad():
                    expected = int(model.run_to_exit(to_model_input(image), k).argmax(1)[0])
                assert (reply.class_index, reply.exit_used) == (expected, k), (i, split, k)
    finally:
        channel.close()


BLOCKER = textwrap.dedent(f"""
    import sys

    class Blocked:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {BLOCKED!r}:
                raise ImportError(f"{{name}} is blocked in this test")
            return None

    sys.meta_path.insert(0, Blocked())
    from edge.agent import main
    code = main(sys.argv[1:])
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r})
    print("BLOCKED-MODULES-LOADED", loaded, file=sys.stderr)
    sys.exit(code)
""")


def _blocked_agent(args, tmp_path):
    env = dict(os.environ, RAPNET_TOKEN=TOKEN, RAPNET_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", BLOCKER, *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)


@pytest.mark.slow
def test_the_agent_on_onnx_runtime_runs_with_torch_ray_and_matplotlib_blocked(cloud, shipped, tmp_path):
    _, _, run = shipped
    out = tmp_path / "frames.jsonl"
    done = _blocked_agent(["--checkpoint", str(run.manifest.folder), "--dataset", "cifar10", "--limit", "24",
                           "--cloud", cloud.address, "--runtime", "onnx", "--bandwidth-mbps", "1000",
                           "--device-gflops", "0.2", "--quiet", "--output", str(out)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "BLOCKED-MODULES-LOADED []" in done.stderr and "ONNX Runtime on" in done.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 24 and not any(r["degraded"] for r in lines)
    assert any(r["where"] == "cloud" for r in lines)  # the cloud answered requests built without torch
    assert sum(r["correct"] for r in lines) >= 18  # the shipped model: about 85-90% on CIFAR-10

    # graphs missing and no torch to export them: one line naming the command, before any frame
    bare = tmp_path / "bare.pt"
    bare.write_bytes(Path(default_checkpoint("rapnet")).read_bytes())
    done = _blocked_agent(["--checkpoint", str(bare), "--dataset", "cifar10", "--limit", "2", "--cloud",
                           cloud.address], tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"rapnet-export {bare}" in done.stderr and "--runtime torch" in done.stderr


@pytest.mark.slow  # exports graphs: seconds
def test_the_agent_exports_missing_graphs_on_the_fly(tmp_path):
    """With torch installed, --runtime onnx on a checkpoint without graphs exports them into the cache, in a child
    process (the agent's own process never imports torch), and finds them there the next time."""
    torch.manual_seed(0)
    path = tmp_path / "fresh.pt"
    save_checkpoint(path, build_model(ModelConfig(width=0.25)).eval())
    script = textwrap.dedent(f"""
        import sys
        from edge.runtime import open_runtime
        loaded = open_runtime({str(path)!r}, "onnx", threads=1, log=print)
        print("RUNTIME", loaded.runtime.name, loaded.runtime.manifest.folder, "torch" in sys.modules)
    """)
    env = dict(os.environ, RAPNET_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    first, again = (subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                                   cwd=tmp_path, timeout=600) for _ in range(2))
    assert first.returncode == 0, first.stderr[-2000:]
    assert "exporting" in first.stdout and f"RUNTIME onnx {tmp_path / 'cache'}" in first.stdout
    assert first.stdout.rstrip().endswith("False")  # torch stayed in the child that exported
    assert "exporting" not in again.stdout and "RUNTIME onnx" in again.stdout  # found in the cache
    assert not export_dir_beside(path).exists()  # nothing written beside a checkpoint the agent only reads


def test_rapnet_export_refuses_what_it_cannot_export(tmp_path, capsys):
    from rapnet.export import main

    assert main([str(tmp_path / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "text.pt").write_text("not a checkpoint")
    assert main([str(tmp_path / "text.pt"), "--out", str(tmp_path / "out")]) == 2
    assert "Use a checkpoint written by rapnet-train" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main([str(tmp_path / "text.pt"), "--out", str(tmp_path / "o"), "--cache"]) == 2


# --- the edge install ------------------------------------------------------------------------------------------
def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _closure(requirements: list[str]) -> set[str]:
    """Every distribution the requirements pull in, through the installed packages' own metadata (extras of the
    installed packages, such as ray[serve], are not followed: the edge names none)."""
    seen, todo = set(), [_name(r) for r in requirements]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for req in metadata.requires(name) or []:
            if ";" in req and "extra" in req.split(";", 1)[1]:
                continue  # an optional extra of that package
            if ";" in req:
                from packaging.markers import Marker

                if not Marker(req.split(";", 1)[1]).evaluate():
                    continue
            todo.append(_name(req))
    return seen


def test_the_edge_extra_pulls_in_neither_torch_ray_nor_matplotlib():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    edge = project["optional-dependencies"]["edge"]
    assert all("==" in r for r in edge)  # pinned
    assert {"onnxruntime", "numpy", "opencv-python-headless", "grpcio"} <= {_name(r) for r in edge}
    closure = _closure(edge)
    assert not closure & {"torch", "ray", "matplotlib"}, sorted(closure)
    # the plain install (the README's setup, the cloud nodes) still holds everything
    assert project["dependencies"] == ["rapnet[edge,torch,export,cloud,plots]"]
    assert "rapnet-export" in project["scripts"]
    assert '".[dev]"' in (ROOT / "scripts" / "setup.sh").read_text()
    assert 'extra=="edge"' in (ROOT / "scripts" / "install_edge.sh").read_text().replace(" ", "")
