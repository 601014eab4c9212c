"""Which runtime runs the edge's share of the network: ONNX Runtime on the graphs rapnet-export wrote (no torch in
the process), or eager PyTorch on the checkpoint.

    loaded = open_runtime(checkpoint, "onnx", threads=1, log=print)     # None: onnx where onnxruntime is installed
    loaded.runtime.run_to_exit(x, k)                                     # rapnet.execution's numpy API

ONNX Runtime reads its graphs and everything else it needs (config, identity, classes, cost table) from the export
manifest (rapnet.export): beside the checkpoint (`rapnet-export CHECKPOINT`), in the rapnet cache, or --checkpoint
naming the export folder itself. When there is none and this install has torch and onnx, the graphs are exported
on the fly into the cache, in a child process, so the agent itself never imports torch (in-process where torch is
loaded already); without them the error names the command to run.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

RUNTIMES = ("onnx", "torch")


class RuntimeSetupError(Exception):
    """The runtime cannot start; the message says why and what to do."""


def installed(module: str) -> bool:
    """Whether `module` can be imported here (looked up, not imported)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def default_runtime() -> str:
    """onnx where onnxruntime is installed, else torch."""
    return "onnx" if installed("onnxruntime") else "torch"


@dataclass
class LoadedModel:
    runtime: object  # rapnet.execution.Runtime
    metadata: dict  # the checkpoint's metadata (identity, classes, normalisation, per-exit accuracy, ...)
    contract: object  # rapnet.checkpoint.InputContract
    where: str  # what was loaded, for the start-up line


def open_runtime(checkpoint: str | Path, runtime: str | None = None, threads: int = 1, log=None) -> LoadedModel:
    """The model of `checkpoint` (a checkpoint file, or for onnx an export folder) on `runtime` (None:
    default_runtime()) with `threads` intra-op threads. RuntimeSetupError for anything the user must fix."""
    log = log or (lambda msg: None)
    choice = runtime or default_runtime()
    if choice not in RUNTIMES:
        raise RuntimeSetupError(f"runtime {choice!r}: choose one of {', '.join(RUNTIMES)}")
    if choice == "torch":
        return _open_torch(Path(checkpoint), threads)
    return _open_onnx(Path(checkpoint), threads, log)


def _contract(config, metadata: dict, where: str):
    from rapnet.checkpoint import CheckpointError, InputContract

    try:
        return InputContract.of(config, metadata, where)
    except CheckpointError as err:
        raise RuntimeSetupError(str(err)) from None


def _open_torch(checkpoint: Path, threads: int) -> LoadedModel:
    if not installed("torch"):
        raise RuntimeSetupError("--runtime torch needs PyTorch, which this install lacks: use --runtime onnx (the "
                                "edge install's runtime), or install rapnet with its torch extra (pip install "
                                "'rapnet[torch]')")
    if checkpoint.is_dir():
        raise RuntimeSetupError(f"{checkpoint} is a folder: --runtime torch needs the checkpoint file (.pt)")
    import torch

    from rapnet.checkpoint import CheckpointError, load_model
    from rapnet.execution import TorchRuntime

    torch.set_num_threads(threads)
    try:
        model, metadata = load_model(checkpoint)
    except CheckpointError as err:
        raise RuntimeSetupError(str(err)) from None
    return LoadedModel(TorchRuntime(model, metadata["identity"], metadata), metadata,
                       _contract(model.config, metadata, str(checkpoint)), f"PyTorch on {checkpoint}")


def _open_onnx(checkpoint: Path, threads: int, log) -> LoadedModel:
    from rapnet.config import ModelConfig
    from rapnet.export import ExportError, cache_export_dir, export_command, export_dir_beside, find_export

    if not installed("onnxruntime"):
        raise RuntimeSetupError("--runtime onnx needs onnxruntime, which this install lacks: pip install "
                                "'rapnet[edge]', or use --runtime torch")
    if not checkpoint.exists():
        raise RuntimeSetupError(f"checkpoint {checkpoint} does not exist: pass --checkpoint with a file rapnet-train "
                                f"wrote, or the folder rapnet-export wrote")
    try:
        manifest = find_export(checkpoint)
        if manifest is None:
            if not (installed("torch") and installed("onnx")):
                raise RuntimeSetupError(
                    f"{checkpoint} has no exported ONNX graphs (looked in {export_dir_beside(checkpoint)} and the "
                    f"rapnet cache), and this install cannot export them (no torch and onnx): run "
                    f"`{export_command(checkpoint)}` where rapnet's export extra is installed (pip install "
                    f"'rapnet[export]'), copy the folder it writes beside the checkpoint here (or pass it as "
                    f"--checkpoint), or use --runtime torch")
            manifest = _export_on_the_fly(checkpoint, cache_export_dir(checkpoint), log)
    except ExportError as err:
        raise RuntimeSetupError(str(err)) from None
    from rapnet.execution import OnnxRuntime

    try:
        runtime = OnnxRuntime(manifest, threads)
    except Exception as err:  # noqa: BLE001 - onnxruntime's own errors (a damaged graph file, an unknown op)
        raise RuntimeSetupError(f"ONNX Runtime cannot load the graphs in {manifest.folder} ({err.__class__.__name__}: "
                                f"{str(err).splitlines()[0] if str(err) else ''}): export them again with "
                                f"`{export_command(checkpoint)}`") from None
    contract = _contract(ModelConfig.from_dict(manifest.config), manifest.metadata, str(manifest.folder))
    return LoadedModel(runtime, manifest.metadata, contract, f"ONNX Runtime on {manifest.folder}")


def _export_on_the_fly(checkpoint: Path, out: Path, log):
    """Export into the cache: in a child process, so that this process stays free of torch, unless torch is loaded
    here already (then the child would only import it a second time)."""
    from rapnet.export import DeviceManifest, ExportError, export_device_graphs

    log(f"exporting {checkpoint} to ONNX for ONNX Runtime, once per checkpoint, into {out} (`rapnet-export "
        f"{checkpoint}` writes the graphs beside it instead; --runtime torch skips this)")
    t0 = time.perf_counter()
    if "torch" in sys.modules:
        try:
            manifest = export_device_graphs(checkpoint, out)
        except ExportError as err:
            raise RuntimeSetupError(f"exporting {checkpoint} to ONNX failed: {err}") from None
    else:
        done = subprocess.run([sys.executable, "-m", "rapnet.export", str(checkpoint), "--out", str(out), "--quiet"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            raise RuntimeSetupError(f"exporting {checkpoint} to ONNX failed: {lines[-1] if lines else 'no message'} "
                                    f"(run `rapnet-export {checkpoint}` to see it all, or use --runtime torch)")
        manifest = DeviceManifest.load(out)
    log(f"exported in {time.perf_counter() - t0:.1f} s")
    return manifest
