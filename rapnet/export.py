"""rapnet-export: static ONNX graphs of everything a device runs, and the manifest an edge without torch reads.

    rapnet-export models/rapnet-cifar10.pt                 # writes models/rapnet-cifar10-onnx/
    rapnet-export CHECKPOINT --out DIR

One graph per piece of the network's execution API (rapnet.network): the exit predictor (the image to the
predictor's per-exit probabilities), every stage (the carry entries it reads to the one it writes) and every exit
head (its stage's output to the logits). Every stage, so the device may split anywhere and continue a carry
locally when the cloud is out of reach. Besides, one graph per exit from the image straight to its logits (its
stages and head in one graph, MultiExitNetwork.run_to_exit): the device's most common call, which ONNX Runtime
then plans and fuses across the stage boundaries instead of running a chain of its pieces.
No graph holds control flow: which stages and heads run, and when a confident exit stops, stays in the caller's
loop (rapnet.execution). Batch size 1, static shapes.

The folder's manifest.json holds what the edge needs without torch: the model's identity, config and checkpoint
metadata (classes, normalisation, per-exit accuracy), the cost table (rapnet.costs), each graph's inputs and
outputs with the carry keys they stand for, the opset and the onnx and torch versions that wrote them, and the
sha256 of the checkpoint file they came from (so an edited checkpoint is never served by stale graphs).
Each graph is checked against PyTorch on export (max |difference| <= EXPORT_TOLERANCE on a sample input).

This module imports torch and onnx only in the functions that export; reading a manifest needs neither.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

FORMAT = "rapnet-onnx/2"
MANIFEST = "manifest.json"
OPSET = 17
EXPORT_TOLERANCE = 1e-4  # max |ONNX Runtime - PyTorch| on any output at export
EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


class ExportError(Exception):
    """Graphs that cannot be written or read; the message says why and what to run."""


# --- where graphs live ---------------------------------------------------------------------------------------
def export_dir_beside(checkpoint: str | os.PathLike) -> Path:
    """The folder rapnet-export writes by default: `<checkpoint stem>-onnx/` beside the checkpoint."""
    path = Path(checkpoint)
    return path.with_name(f"{path.stem}-onnx")


def cache_export_dir(checkpoint: str | os.PathLike) -> Path:
    """Where graphs exported on the fly go (the agent never writes beside a checkpoint it was only asked to read):
    the rapnet cache, keyed by the checkpoint file's content."""
    from .data import default_cache_dir

    path = Path(checkpoint)
    return default_cache_dir() / "onnx" / f"{path.stem}-{file_sha256(path)[:16]}"


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_command(checkpoint: str | os.PathLike) -> str:
    """The command that writes a checkpoint's graphs beside it (for messages)."""
    return f"rapnet-export {checkpoint}"


# --- the manifest --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GraphSpec:
    """One graph: its file and its inputs and outputs as (graph name, carry key or role, shape)."""

    file: str
    inputs: tuple[tuple[str, str, tuple[int, ...]], ...]
    outputs: tuple[tuple[str, str, tuple[int, ...]], ...]

    def to_dict(self) -> dict:
        def io(entries):
            return [{"name": n, "carry": k, "shape": list(s)} for n, k, s in entries]
        return {"file": self.file, "inputs": io(self.inputs), "outputs": io(self.outputs)}

    @classmethod
    def from_dict(cls, data: dict) -> "GraphSpec":
        def io(entries):
            return tuple((e["name"], e["carry"], tuple(e["shape"])) for e in entries)
        return cls(data["file"], io(data["inputs"]), io(data["outputs"]))


@dataclass(frozen=True)
class DeviceManifest:
    """What an export folder holds (manifest.json), read without torch."""

    folder: Path
    identity: str
    config: dict  # rapnet.config.ModelConfig.to_dict()
    metadata: dict  # the checkpoint's metadata as rapnet.checkpoint.load_model returns it (classes, ...)
    costs: dict  # rapnet.costs.CostTable.to_dict()
    leaf_layers: dict  # leaf modules per stage, head and predictor of the PyTorch model (its eager call counts)
    predictor: GraphSpec | None
    stages: tuple[GraphSpec, ...]
    exits: tuple[GraphSpec, ...]
    to_exit: tuple[GraphSpec, ...]  # per exit: the image to its logits in one graph
    checkpoint_sha256: str
    opset: int
    versions: dict

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "DeviceManifest":
        folder = Path(folder)
        path = folder / MANIFEST
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ExportError(f"{folder} holds no {MANIFEST}: not a rapnet-export folder") from None
        except (OSError, ValueError) as err:
            raise ExportError(f"cannot read {path} ({err}): export the checkpoint again with rapnet-export") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ExportError(f"{path} is not a {FORMAT} manifest (format {data.get('format') if isinstance(data, dict) else None!r}): "
                              "export the checkpoint again with this version's rapnet-export")
        try:
            graphs = data["graphs"]
            manifest = cls(folder, data["identity"], data["config"], data["metadata"], data["costs"],
                           data["leaf_layers"],
                           GraphSpec.from_dict(graphs["predictor"]) if graphs.get("predictor") else None,
                           tuple(GraphSpec.from_dict(g) for g in graphs["stages"]),
                           tuple(GraphSpec.from_dict(g) for g in graphs["exits"]),
                           tuple(GraphSpec.from_dict(g) for g in graphs["to_exit"]),
                           data["checkpoint"]["sha256"], int(data["opset"]), data["versions"])
        except (KeyError, TypeError, ValueError) as err:
            raise ExportError(f"{path} lacks or garbles {err}: export the checkpoint again with rapnet-export") from None
        missing = [g.file for g in manifest.graphs() if not (folder / g.file).is_file()]
        if missing:
            raise ExportError(f"{folder} lacks {', '.join(missing)}: copy the whole folder, or export again")
        return manifest

    def graphs(self) -> list[GraphSpec]:
        return ([self.predictor] if self.predictor else []) + list(self.stages) + list(self.exits) + list(self.to_exit)

    def image_size(self) -> int:
        return int(self.config["image_size"])


def find_export(checkpoint: str | os.PathLike) -> DeviceManifest | None:
    """The exported graphs of `checkpoint`: the checkpoint itself when it names an export folder (or its
    manifest; ExportError when that is unusable), else the folder beside it or in the cache whose manifest records
    this checkpoint file's sha256; None when there is none (a folder there from another checkpoint, another
    version or half copied counts as none: exporting again replaces it)."""
    path = Path(checkpoint)
    if path.is_dir() or path.name == MANIFEST:
        return DeviceManifest.load(path if path.is_dir() else path.parent)
    if not path.is_file():
        return None
    sha = file_sha256(path)
    for folder in (export_dir_beside(path), cache_export_dir(path)):
        try:
            manifest = DeviceManifest.load(folder) if (folder / MANIFEST).is_file() else None
        except ExportError:
            continue
        if manifest is not None and manifest.checkpoint_sha256 == sha:
            return manifest
    return None


# --- exporting (torch and onnx) ------------------------------------------------------------------------------
def _graph_modules(model):
    """nn.Modules that take the graphs' inputs positionally, one per graph."""
    import torch
    from torch import nn

    class StageGraph(nn.Module):
        def __init__(self, stage):
            super().__init__()
            self.stage = stage

        def forward(self, *inputs):
            return self.stage(dict(zip(self.stage.reads, inputs)))

    class ScoresGraph(nn.Module):  # MultiExitNetwork.exit_scores
        def __init__(self, predictor):
            super().__init__()
            self.predictor = predictor

        def forward(self, image):
            return torch.sigmoid(self.predictor(image))

    class ToExitGraph(nn.Module):  # MultiExitNetwork.run_to_exit
        def __init__(self, network, exit_index):
            super().__init__()
            self.network, self.exit_index = network, exit_index

        def forward(self, image):
            return self.network.run_to_exit(image, self.exit_index)

    return StageGraph, ScoresGraph, ToExitGraph


def export_device_graphs(checkpoint: str | os.PathLike, out: str | os.PathLike | None = None,
                         log=None) -> DeviceManifest:
    """Export the checkpoint's predictor, stages and heads to ONNX in `out` (default: beside the checkpoint) with
    their manifest; each graph checked against PyTorch. Replaces the folder's previous contents atomically."""
    import warnings

    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    from .checkpoint import CheckpointError, load_model
    from .costs import measure_costs
    from .execution import leaf_layers
    from .network import IMAGE

    log = log or (lambda msg: None)
    checkpoint = Path(checkpoint)
    try:
        model, metadata = load_model(checkpoint)
    except CheckpointError as err:
        raise ExportError(str(err)) from None
    out = Path(out) if out is not None else export_dir_beside(checkpoint)
    StageGraph, ScoresGraph, ToExitGraph = _graph_modules(model)
    size = model.config.image_size
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, size, size, generator=generator) * 4 - 2  # the range of normalised pixels
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the graphs are for whoever runs the agent
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1

    def export(module, inputs: dict, outputs: dict, file: str, roles: dict | None = None) -> GraphSpec:
        """inputs/outputs: graph name -> tensor (outputs: PyTorch's, the reference); roles: graph name -> the carry
        key it stands for, where the two differ."""
        roles = roles or {}
        module.eval()  # the exporter puts a wrapper back in the mode it found it in: train, for a fresh one
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notice
            torch.onnx.export(module, tuple(inputs.values()), str(tmp / file), input_names=list(inputs),
                              output_names=list(outputs), opset_version=OPSET, dynamo=False,
                              do_constant_folding=True)
        onnx.checker.check_model(str(tmp / file))
        session = ort.InferenceSession(str(tmp / file), options, providers=["CPUExecutionProvider"])
        got = session.run(list(outputs), {k: v.numpy() for k, v in inputs.items()})
        for (name, want), have in zip(outputs.items(), got):
            diff = float(np.abs(have - want.numpy()).max())
            if not diff <= EXPORT_TOLERANCE:
                raise ExportError(f"{file}: output {name} differs from PyTorch by {diff:.3g} (> {EXPORT_TOLERANCE})")
        return GraphSpec(file, tuple((n, roles.get(n, n), tuple(v.shape)) for n, v in inputs.items()),
                         tuple((n, roles.get(n, n), tuple(v.shape)) for n, v in outputs.items()))

    try:
        with torch.no_grad():
            t0 = time.perf_counter()
            predictor = None
            if model.predictor is not None:
                predictor = export(ScoresGraph(model.predictor), {IMAGE: image}, {"scores": model.exit_scores(image)},
                                   "predictor.onnx")
            stages, exits = [], []
            carry = {IMAGE: image}
            for s, stage in enumerate(model.stages):
                written = stage(carry)
                # graph names: inputs are the carry keys, the output "<key>_out" (a stage may rewrite a key it reads)
                out_name = f"{stage.writes}_out"
                stages.append(export(StageGraph(stage), {k: carry[k] for k in stage.reads}, {out_name: written},
                                     f"stage{s}.onnx", {out_name: stage.writes}))
                carry = {**carry, stage.writes: written}
                log(f"  stage {s}: reads {', '.join(stage.reads)}, writes {stage.writes} {tuple(written.shape[1:])}")
                if s in model.exit_stages:  # its head reads this stage's output (a later stage may rewrite the key)
                    k, head = model.exit_stages.index(s), model.exits[model.exit_stages.index(s)]
                    exits.append(export(head, {"features": written}, {"logits": head(written)}, f"exit{k}.onnx"))
            to_exit = [export(ToExitGraph(model, k), {IMAGE: image}, {"logits": model.run_to_exit(image, k)},
                              f"to_exit{k}.onnx") for k in range(model.num_exits)]
            log(f"  {len(stages)} stages, {len(exits)} exit heads, {len(to_exit)} image-to-exit graphs"
                f"{', the predictor' if predictor else ''} exported and checked in {time.perf_counter() - t0:.1f} s")
        costs = measure_costs(model)
        layers = {"stage_layers": [leaf_layers(s) for s in model.stages],
                  "exit_layers": [leaf_layers(e) for e in model.exits],
                  "predictor_layers": leaf_layers(model.predictor) if model.predictor is not None else 0}
        manifest = {
            "format": FORMAT,
            "identity": metadata["identity"],
            "checkpoint": {"name": checkpoint.name, "sha256": file_sha256(checkpoint)},
            "config": model.config.to_dict(),
            "metadata": metadata,
            "input": {"name": IMAGE, "shape": [1, 3, size, size], "dtype": "float32"},
            "costs": costs.to_dict(),
            "leaf_layers": layers,
            "graphs": {"predictor": predictor.to_dict() if predictor else None,
                       "stages": [g.to_dict() for g in stages], "exits": [g.to_dict() for g in exits],
                       "to_exit": [g.to_dict() for g in to_exit]},
            "opset": OPSET,
            "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return DeviceManifest.load(out)


# --- the command ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from .help_format import DefaultsHelpFormatter
    from .shipped import default_checkpoint

    p = argparse.ArgumentParser(prog="rapnet-export", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("checkpoint", nargs="?", default=str(default_checkpoint("rapnet")),
                   help="checkpoint to export (default: the shipped CIFAR-10 RAPNet, %(default)s)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="folder to write (default: <checkpoint stem>-onnx/ beside the checkpoint); its previous "
                        "contents are replaced")
    p.add_argument("--cache", action="store_true",
                   help="write into the rapnet cache (~/.cache/rapnet/onnx/, $RAPNET_CACHE), where edge-agent finds "
                        "graphs it exported itself, instead of beside the checkpoint")
    p.add_argument("--quiet", action="store_true", help="print only the folder written")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.out and args.cache:
        print("rapnet-export: error: give --out or --cache, not both", file=sys.stderr)
        return EXIT_USAGE
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        print(f"rapnet-export: error: checkpoint {checkpoint} does not exist: pass a file rapnet-train wrote",
              file=sys.stderr)
        return EXIT_USAGE
    out = cache_export_dir(checkpoint) if args.cache else args.out
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    log(f"exporting {checkpoint} to ONNX (opset {OPSET})")
    try:
        manifest = export_device_graphs(checkpoint, out, log)
    except ExportError as err:
        print(f"rapnet-export: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("rapnet-export: interrupted, nothing written", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(manifest.folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
