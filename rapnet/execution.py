"""The network's execution API on numpy arrays, run by PyTorch or by ONNX Runtime: what the edge and the planner's
calibration call.

    run = OnnxRuntime(DeviceManifest.load("models/rapnet-cifar10-onnx"))    # graphs from rapnet-export, no torch
    run = TorchRuntime(model)                                                 # a MultiExitNetwork (as_runtime(model))
    scores = run.exit_scores(x)[0]                                            # x: rapnet.preprocess.to_model_array
    logits = run.run_to_exit(x, k); carry = run.edge_part(x, split); logits = run.cloud_part(carry, split, k)

The API mirrors rapnet.network.MultiExitNetwork (run_to_exit, edge_part, cloud_part, edge_part_capped,
run_until_confident, local_exit_logits, exit_scores), on numpy: the control flow (which stages and heads run, a
confident exit stopping early) lives once, in Runtime, on two primitives a runtime supplies: run one stage on the
carry, run one exit head. TorchRuntime runs the model's own modules; OnnxRuntime runs the exported graphs (one
InferenceSession per graph, batch 1: a batch runs sample by sample; run_to_exit in one image-to-exit graph). Both answer the same within
rapnet.export.EXPORT_TOLERANCE (tests/edge/test_onnx_runtime.py).

Besides the API a runtime tells the planner what it needs: the cost table, the wire contract, the model identity,
and its calls per stage, head and predictor (`layer_calls`: leaf layers for eager PyTorch, one per graph for ONNX
Runtime), the per-call term of the planner's device model.
"""
from __future__ import annotations

from functools import cached_property
from typing import Mapping

import numpy as np

from .codec.contract import IMAGE_KEY, ModelContract
from .config import ModelConfig
from .costs import CostTable

IMAGE = IMAGE_KEY  # the carry entry of the input image
Carry = dict[str, np.ndarray]


def leaf_layers(module) -> int:
    """Leaf modules a call of `module` executes (conv, BN, activation, ...): eager PyTorch's calls."""
    return sum(1 for m in module.modules() if not list(m.children()))


def top_probability(logits: np.ndarray) -> np.ndarray:
    """Each row's top softmax probability, (N, C) logits -> (N,)."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z.max(axis=1) / z.sum(axis=1)



def check_split(num_stages: int, split: int) -> None:
    """A split point lies in 0..num_stages (0: the edge sends the image; num_stages: it runs everything)."""
    if not 0 <= split <= num_stages:
        raise ValueError(f"split point {split} is outside 0..{num_stages}")


def check_exit(num_exits: int, exit_index: int) -> None:
    if not 0 <= exit_index < num_exits:
        raise ValueError(f"exit {exit_index} is outside 0..{num_exits - 1}")

class Runtime:
    """The execution API over two primitives (run_stage, run_head) and a predictor call (predict)."""

    name = "runtime"
    identity: str  # the model identity (rapnet.checkpoint.model_identity)
    costs: CostTable

    def __init__(self, config: ModelConfig, stage_io, exit_stages, split_keys, has_predictor: bool,
                 layer_calls: tuple[tuple[int, ...], tuple[int, ...], int], metadata: dict | None = None):
        self.config = config
        self.stage_io = tuple((tuple(reads), writes) for reads, writes in stage_io)  # per stage: (reads, writes)
        self.exit_stages = tuple(exit_stages)
        self.split_keys = tuple(tuple(keys) for keys in split_keys)  # per split point: the carry that crosses
        self.has_predictor = has_predictor
        self.layer_calls = layer_calls  # (per stage, per exit head, predictor)
        self.metadata = metadata or {}

    @cached_property
    def contract(self) -> ModelContract:
        """The wire contract requests built from this runtime's carry must match."""
        return ModelContract.from_costs(self.identity, self.costs, self.has_predictor)

    # --- primitives (batched numpy in and out) -----------------------------------------------------------
    def run_stage(self, s: int, carry: Mapping[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def run_head(self, k: int, features: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    # --- structure ---------------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def num_exits(self) -> int:
        return len(self.exit_stages)

    @property
    def num_stages(self) -> int:
        return len(self.stage_io)

    def live_keys(self, split: int) -> tuple[str, ...]:
        check_split(self.num_stages, split)
        return self.split_keys[split]

    def deepest_local_exit(self, split: int) -> int | None:
        """The deepest exit whose stage the edge has run when it splits at `split` (its fallback answer)."""
        local = [k for k, s in enumerate(self.exit_stages) if s < split]
        return local[-1] if local else None

    # --- execution ---------------------------------------------------------------------------------------
    def _run_stages(self, carry: Carry, start: int, stop: int) -> Carry:
        carry = dict(carry)
        for s in range(start, stop):
            carry[self.stage_io[s][1]] = self.run_stage(s, carry)
        return carry

    def _exit_logits(self, carry: Carry, k: int) -> np.ndarray:
        return self.run_head(k, carry[self.stage_io[self.exit_stages[k]][1]])

    def exit_scores(self, x: np.ndarray) -> np.ndarray:
        """The predictor's estimate, per exit, that the exit answers the image correctly (N, K)."""
        if not self.has_predictor:
            raise ValueError(f"a {self.kind} model has no exit predictor")
        return self.predict(x)

    def all_exits(self, x: np.ndarray) -> list[np.ndarray]:
        """Every exit's logits, shallowest first (MultiExitNetwork.forward)."""
        carry, outputs, done = {IMAGE: x}, [], 0
        for k, stage in enumerate(self.exit_stages):
            carry = self._run_stages(carry, done, stage + 1)
            done = stage + 1
            outputs.append(self._exit_logits(carry, k))
        return outputs

    def run_to_exit(self, x: np.ndarray, exit_index: int) -> np.ndarray:
        """Only exit k's stages and its head run."""
        check_exit(self.num_exits, exit_index)
        return self._exit_logits(self._run_stages({IMAGE: x}, 0, self.exit_stages[exit_index] + 1), exit_index)

    def edge_part(self, x: np.ndarray, split: int) -> Carry:
        """Stages [0, split); exactly the carry entries that cross the network."""
        check_split(self.num_stages, split)
        carry = self._run_stages({IMAGE: x}, 0, split)
        return {key: carry[key] for key in self.live_keys(split)}

    def cloud_part(self, carry: Mapping[str, np.ndarray], split: int, exit_index: int) -> np.ndarray:
        """Continue a carry handed over at `split` to `exit_index` (the edge's fallback runs this too)."""
        check_split(self.num_stages, split)
        check_exit(self.num_exits, exit_index)
        if self.exit_stages[exit_index] < split:
            raise ValueError(f"exit {exit_index} sits before split point {split}: the edge answers it locally")
        missing = set(self.live_keys(split)) - set(carry)
        if missing:
            raise ValueError(f"carry at split {split} lacks {sorted(missing)}")
        carry = self._run_stages(dict(carry), split, self.exit_stages[exit_index] + 1)
        return self._exit_logits(carry, exit_index)

    def local_exit_logits(self, carry: Mapping[str, np.ndarray], split: int) -> np.ndarray:
        """Fallback: logits of the deepest local exit, from the carry the edge already holds."""
        k = self.deepest_local_exit(split)
        if k is None:
            raise ValueError(f"no exit is computed before split point {split}")
        features = self.stage_io[self.exit_stages[k]][1]
        if features not in carry:
            raise ValueError(f"the carry at split {split} no longer holds exit {k}'s features")
        return self.run_head(k, carry[features])

    def run_until_confident(self, x: np.ndarray, threshold: float,
                            last_exit: int | None = None) -> tuple[np.ndarray, int]:
        """For one image: exits in turn, the first whose top softmax probability reaches `threshold` answers
        (`last_exit`, default the last, anyway)."""
        last_exit = self.num_exits - 1 if last_exit is None else last_exit
        check_exit(self.num_exits, last_exit)
        return self._first_confident(x, range(last_exit + 1), threshold, last_answers=True)[2]

    def edge_part_capped(self, x: np.ndarray, split: int, stop_confidence: float
                         ) -> tuple[Carry | None, tuple[np.ndarray, int] | None]:
        """The capped rule's edge side at a split, for one image: the heads before the split are checked; the first
        this confident answers here: (None, (logits, exit)); else (the carry to send, None)."""
        check_split(self.num_stages, split)
        before = [k for k, s in enumerate(self.exit_stages) if s < split]
        carry, done, answer = self._first_confident(x, before, stop_confidence, last_answers=False)
        if answer is not None:
            return None, answer
        carry = self._run_stages(carry, done, split)
        return {key: carry[key] for key in self.live_keys(split)}, None

    def _first_confident(self, x: np.ndarray, exits, threshold: float, last_answers: bool):
        if x.shape[0] != 1:
            raise ValueError("confidence-based early exit decides per image: pass a batch of one")
        carry, done = {IMAGE: x}, 0
        for k in exits:
            carry = self._run_stages(carry, done, self.exit_stages[k] + 1)
            done = self.exit_stages[k] + 1
            logits = self._exit_logits(carry, k)
            if (last_answers and k == exits[-1]) or float(top_probability(logits)[0]) >= threshold:
                return carry, done, (logits, k)
        return carry, done, None


class TorchRuntime(Runtime):
    """A MultiExitNetwork's own modules (eager PyTorch, no autograd)."""

    name = "torch"

    def __init__(self, model, identity: str | None = None, metadata: dict | None = None):
        import torch

        self.model, self._torch = model, torch
        if identity is not None:
            self.identity = identity
        layer_calls = (tuple(leaf_layers(s) for s in model.stages), tuple(leaf_layers(e) for e in model.exits),
                       leaf_layers(model.predictor) if model.predictor is not None else 0)
        super().__init__(model.config, [(s.reads, s.writes) for s in model.stages], model.exit_stages,
                         [model.live_keys(s) for s in range(model.num_stages + 1)], model.predictor is not None,
                         layer_calls, metadata)

    @cached_property
    def identity(self) -> str:  # computed when asked for: hashing every weight takes a while
        from .checkpoint import model_identity

        return model_identity(self.model)

    @cached_property
    def costs(self) -> CostTable:  # measured when asked for (torch's flop counter, a fraction of a second)
        from .costs import measure_costs

        return measure_costs(self.model)

    def run_stage(self, s, carry):
        torch = self._torch
        stage = self.model.stages[s]
        with torch.no_grad():
            return stage({k: torch.from_numpy(np.ascontiguousarray(carry[k])) for k in stage.reads}).numpy()

    def run_head(self, k, features):
        torch = self._torch
        with torch.no_grad():
            return self.model.exits[k](torch.from_numpy(np.ascontiguousarray(features))).numpy()

    def predict(self, x):
        torch = self._torch
        with torch.no_grad():
            return self.model.exit_scores(torch.from_numpy(np.ascontiguousarray(x))).numpy()


class OnnxRuntime(Runtime):
    """The graphs rapnet-export wrote (rapnet.export.DeviceManifest), on ONNX Runtime's CPU provider."""

    name = "onnx"

    def __init__(self, manifest, threads: int = 1):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL

        def session(spec):
            return (ort.InferenceSession(str(manifest.folder / spec.file), options, providers=["CPUExecutionProvider"]),
                    spec)

        self.manifest, self.threads = manifest, threads
        self._predictor = session(manifest.predictor) if manifest.predictor is not None else None
        self._stages = [session(g) for g in manifest.stages]
        self._exits = [session(g) for g in manifest.exits]
        self._to_exit = [session(g) for g in manifest.to_exit]
        stage_io = [(tuple(key for _, key, _ in g.inputs), g.outputs[0][1]) for g in manifest.stages]
        graphs = (1,) * len(manifest.stages), (1,) * len(manifest.exits), int(manifest.predictor is not None)
        self.identity, self.costs = manifest.identity, CostTable.from_dict(manifest.costs)
        super().__init__(ModelConfig.from_dict(manifest.config), stage_io, self.costs.exit_stages,
                         self.costs.split_keys, manifest.predictor is not None, graphs, manifest.metadata)

    @staticmethod
    def _run(graph, arrays: list[np.ndarray]) -> np.ndarray:
        """One graph on a batch, sample by sample (the graphs are batch 1)."""
        sess, spec = graph
        names, output = [name for name, _, _ in spec.inputs], [spec.outputs[0][0]]
        batch = arrays[0].shape[0]
        if batch == 1:
            return sess.run(output, {n: np.ascontiguousarray(a, dtype=np.float32) for n, a in zip(names, arrays)})[0]
        return np.concatenate([sess.run(output, {n: np.ascontiguousarray(a[i:i + 1], dtype=np.float32)
                                                 for n, a in zip(names, arrays)})[0] for i in range(batch)])

    def run_to_exit(self, x, exit_index):
        """One graph from the image to the exit (rapnet.export), not a chain of stage graphs."""
        check_exit(self.num_exits, exit_index)
        return self._run(self._to_exit[exit_index], [x])

    def run_stage(self, s, carry):
        graph = self._stages[s]
        return self._run(graph, [carry[key] for _, key, _ in graph[1].inputs])

    def run_head(self, k, features):
        return self._run(self._exits[k], [features])

    def predict(self, x):
        return self._run(self._predictor, [x])


def as_runtime(model, identity: str | None = None, metadata: dict | None = None) -> Runtime:
    """A Runtime as it is, or a MultiExitNetwork wrapped in a TorchRuntime."""
    return model if isinstance(model, Runtime) else TorchRuntime(model, identity, metadata)
