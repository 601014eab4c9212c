"""Invariants of the multi-exit model (DESIGN.md section 2), for RAPNet, SDN and the static network, on both archs.

1. split execution == monolithic execution (also through a lossless byte round trip of the carry);
2. real early exit: only the stages up to exit k and exit k's head run, and the measured FLOPs equal the table;
3. mixed-exit batches are regrouped (the batch shrinks stage by stage), never padded to the deepest exit;
4. the cost table is monotone and the predictor is cheap;
5. edge/cloud edge cases raise ValueError with a message;
6. checkpoints round-trip, carry a content identity, and refuse damaged, foreign or code-carrying files.

Models are small (mobilenetv2 width 0.35, resnet width 0.25) and built once per module.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from rapnet.build import build_model
from rapnet.checkpoint import CheckpointError, load_model, model_identity, save_checkpoint
from rapnet.config import ModelConfig
from rapnet.costs import count_flops, measure_costs

ARCH_WIDTHS = [("mobilenetv2", 0.35), ("resnet", 0.25)]
KINDS = ["rapnet", "sdn", "static"]
CASES = [(arch, width, kind) for arch, width in ARCH_WIDTHS for kind in KINDS]
CASE_IDS = [f"{arch}-{kind}" for arch, _, kind in CASES]
MULTI_EXIT = [c for c in CASES if c[2] != "static"]
MULTI_EXIT_IDS = [f"{arch}-{kind}" for arch, _, kind in MULTI_EXIT]
TOL = 1e-5


def _randomize_bn(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so buffers matter for every check."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                m.weight.copy_(0.8 + 0.4 * torch.rand(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))


def _make(arch: str, width: float, kind: str, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(arch=arch, kind=kind, width=width))
    _randomize_bn(model, seed + 1)
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny batch-1..11 models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP
    threads spinning against other processes slow this module down by an order of magnitude."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models() -> dict:
    return {(arch, kind): _make(arch, width, kind) for arch, width, kind in CASES}


@pytest.fixture(scope="module")
def costs(models) -> dict:
    return {key: measure_costs(m) for key, m in models.items()}


def _image(batch: int = 1, size: int = 32, seed: int = 123) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g)


def _wire(carry: dict) -> dict:
    """Lossless byte round trip of every carry tensor, as a codec over the network would do."""
    out = {}
    for key, t in carry.items():
        assert t.dtype == torch.float32
        payload = t.contiguous().numpy().tobytes()
        shape = tuple(t.shape)
        out[key] = torch.from_numpy(np.frombuffer(payload, dtype=np.float32).reshape(shape).copy())
    return out


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


class _Recorder:
    """Forward hooks on every stage, exit head and the predictor: what ran, in order, with its batch size."""

    def __init__(self, model):
        self.calls: list[tuple[str, int, int]] = []
        self.handles = []
        for i, stage in enumerate(model.stages):
            self.handles.append(stage.register_forward_hook(self._hook("stage", i)))
        for i, head in enumerate(model.exits):
            self.handles.append(head.register_forward_hook(self._hook("exit", i)))
        if model.predictor is not None:
            self.handles.append(model.predictor.register_forward_hook(self._hook("predictor", 0)))

    def _hook(self, kind: str, index: int):
        def hook(module, args, output):
            self.calls.append((kind, index, int(output.shape[0])))

        return hook

    def ran(self, kind: str) -> list[int]:
        return [i for k, i, _ in self.calls if k == kind]

    def batch(self, kind: str) -> dict[int, int]:
        return {i: b for k, i, b in self.calls if k == kind}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


# --- 0. structure ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,width,kind", CASES, ids=CASE_IDS)
def test_structure_and_forward_matches_run_to_exit(models, arch, width, kind):
    model = models[(arch, kind)]
    assert model.num_stages == len(model.stages) >= 2
    assert model.num_exits == len(model.exits) == len(model.exit_stages)
    assert list(model.exit_stages) == sorted(set(model.exit_stages))
    assert model.exit_stages[-1] == model.num_stages - 1
    if kind == "static":
        assert model.num_exits == 1 and model.predictor is None
    else:
        assert model.num_exits >= 4
        assert (model.predictor is not None) == (kind == "rapnet")
    x = _image(2)
    with torch.inference_mode():
        outs = model(x)
        assert len(outs) == model.num_exits
        for k, out in enumerate(outs):
            assert out.shape == (2, model.config.num_classes)
            assert torch.isfinite(out).all()
            assert _maxdiff(out, model.run_to_exit(x, k)) <= TOL
    assert model.live_keys(0) == ("image",)
    assert model.live_keys(model.num_stages) == ()


# --- 1. split execution == monolithic execution --------------------------------------------------------------


@pytest.mark.parametrize("arch,width,kind", CASES, ids=CASE_IDS)
def test_split_execution_equals_monolithic(models, arch, width, kind):
    model = models[(arch, kind)]
    x = _image(2, seed=1)
    checked = 0
    with torch.inference_mode():
        reference = [model.run_to_exit(x, k) for k in range(model.num_exits)]
        for s in range(model.num_stages + 1):
            carry = model.edge_part(x, s)
            assert tuple(sorted(carry)) == model.live_keys(s)
            wired = _wire(carry)
            for k in range(model.num_exits):
                if model.exit_stages[k] < s:
                    continue
                direct = model.cloud_part(carry, s, k)
                over_wire = model.cloud_part(wired, s, k)
                assert _maxdiff(direct, reference[k]) <= TOL, (s, k)
                assert _maxdiff(over_wire, reference[k]) <= TOL, (s, k)
                assert torch.equal(direct, over_wire)  # the byte round trip is exactly lossless
                checked += 1
    # every (split, exit) pair with the exit at or beyond the split was checked
    assert checked == sum(1 for s in range(model.num_stages + 1) for e in model.exit_stages if e >= s)


@pytest.mark.parametrize("arch,width,kind", MULTI_EXIT, ids=MULTI_EXIT_IDS)
def test_split_carry_sizes_match_cost_table(models, costs, arch, width, kind):
    """What crosses the network is exactly what the cost table says (keys, shapes, fp32 bytes)."""
    model, table = models[(arch, kind)], costs[(arch, kind)]
    x = _image(1, seed=2)
    with torch.inference_mode():
        for s in range(model.num_stages + 1):
            carry = model.edge_part(x, s)
            assert table.split_keys[s] == tuple(sorted(carry))
            assert table.split_shapes[s] == tuple(tuple(carry[k].shape[1:]) for k in table.split_keys[s])
            assert table.split_fp32_bytes[s] == sum(len(t.numpy().tobytes()) for t in carry.values())


@pytest.mark.slow
@pytest.mark.parametrize("arch,width", ARCH_WIDTHS, ids=[a for a, _ in ARCH_WIDTHS])
def test_other_fusion_points_build_and_split(arch, width):
    """fusion_stride 4 (what a checkpoint without the field loads as) and 1 pass the same structure and split checks
    as the default 2, and the paths meet on the grid each names."""
    fused = lambda m: next(s for s in m.stages if s.reads[0] == "image" and len(s.reads) == 2)  # noqa: E731
    grid = {}
    for fusion_stride in (4, 2, 1):
        torch.manual_seed(0)
        model = build_model(ModelConfig(arch=arch, kind="rapnet", width=width, fusion_stride=fusion_stride))
        _randomize_bn(model, 1)
        models = {(arch, "rapnet"): model.eval()}
        test_structure_and_forward_matches_run_to_exit(models, arch, width, "rapnet")
        test_split_execution_equals_monolithic(models, arch, width, "rapnet")
        with torch.inference_mode():
            grid[fusion_stride] = fused(model).stem(_image(1)).shape[-1]
    assert ModelConfig().fusion_stride == 2
    assert grid == {4: 8, 2: 16, 1: 32}


# --- 2. real early exit ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,width,kind", CASES, ids=CASE_IDS)
def test_run_to_exit_runs_only_what_the_exit_needs(models, costs, arch, width, kind):
    model, table = models[(arch, kind)], costs[(arch, kind)]
    x = _image(1, seed=3)
    for k in range(model.num_exits):
        with _Recorder(model) as rec, torch.inference_mode():
            model.run_to_exit(x, k)
        assert rec.ran("stage") == list(range(model.exit_stages[k] + 1)), k
        assert rec.ran("exit") == [k]
        assert rec.ran("predictor") == []
        flops, _ = count_flops(lambda img: model.run_to_exit(img, k), x)
        assert flops == table.exit_cost(k), (k, flops, table.exit_cost(k))


@pytest.mark.parametrize("arch,width,kind", CASES, ids=CASE_IDS)
def test_cloud_part_runs_only_stages_after_split(models, costs, arch, width, kind):
    model, table = models[(arch, kind)], costs[(arch, kind)]
    x = _image(1, seed=4)
    for s in range(model.num_stages + 1):
        with _Recorder(model) as rec, torch.inference_mode():
            carry = model.edge_part(x, s)
        assert rec.ran("stage") == list(range(s)) and rec.ran("exit") == []
        assert count_flops(lambda img: model.edge_part(img, s), x)[0] == table.split_cost(s)
        for k in range(model.num_exits):
            if model.exit_stages[k] < s:
                continue
            with _Recorder(model) as rec, torch.inference_mode():
                model.cloud_part(carry, s, k)
            assert rec.ran("stage") == list(range(s, model.exit_stages[k] + 1))
            assert rec.ran("exit") == [k]
            with torch.no_grad():
                cloud_flops = count_flops(lambda c: model.cloud_part(c, s, k), carry)[0]
            assert table.split_cost(s) + cloud_flops == table.exit_cost(k)


@pytest.mark.parametrize("arch,width,kind", CASES, ids=CASE_IDS)
def test_full_forward_flops_are_sequential_cost(models, costs, arch, width, kind):
    """forward() evaluates every IC on the way: that is the table's SDN-style sequential cost."""
    model, table = models[(arch, kind)], costs[(arch, kind)]
    flops, _ = count_flops(model, _image(1))
    assert flops == table.sequential_exit_cost(model.num_exits - 1)


# --- 3. mixed-exit batches -------------------------------------------------------------------------------------


def _mixed_exits(model, batch: int, seed: int, lowest: int = 0) -> torch.Tensor:
    """Every exit from `lowest` on appears, the deepest exactly once (so padding would show)."""
    g = torch.Generator().manual_seed(seed)
    n = model.num_exits
    deepest = n - 1
    exits = torch.randint(lowest, max(lowest + 1, deepest), (batch,), generator=g)
    exits[: deepest - lowest + 1] = torch.arange(lowest, deepest + 1)
    if deepest > lowest:
        exits[deepest - lowest + 1 :] = exits[deepest - lowest + 1 :].clamp(max=deepest - 1)
    return exits[torch.randperm(batch, generator=g)]


def _expected_batches(model, exits: torch.Tensor, start: int) -> dict[int, int]:
    need = torch.tensor([model.exit_stages[int(k)] for k in exits])
    return {s: int((need >= s).sum()) for s in range(start, int(need.max()) + 1)}


@pytest.mark.parametrize("arch,width,kind", CASES, ids=CASE_IDS)
def test_run_mixed_matches_per_sample_and_regroups(models, arch, width, kind):
    model = models[(arch, kind)]
    batch = 11
    x = _image(batch, seed=5)
    exits = _mixed_exits(model, batch, seed=6)
    with _Recorder(model) as rec, torch.inference_mode():
        out = model.run_mixed(x, exits)
    assert out.shape == (batch, model.config.num_classes)
    with torch.inference_mode():
        for i in range(batch):
            single = model.run_to_exit(x[i : i + 1], int(exits[i]))
            assert _maxdiff(out[i : i + 1], single) <= TOL, (i, int(exits[i]))
    # regrouped: each stage saw only the samples still active, the deepest only those that want it
    assert rec.batch("stage") == _expected_batches(model, exits, 0)
    assert rec.batch("stage")[model.num_stages - 1] == int((exits == model.num_exits - 1).sum())
    assert rec.batch("exit") == {k: int((exits == k).sum()) for k in range(model.num_exits) if (exits == k).any()}
    assert len(rec.ran("stage")) == len(set(rec.ran("stage")))  # every stage ran at most once


@pytest.mark.parametrize("arch,width,kind", MULTI_EXIT, ids=MULTI_EXIT_IDS)
def test_run_mixed_skips_unrequested_heads_and_stages(models, arch, width, kind):
    model = models[(arch, kind)]
    x = _image(4, seed=7)
    exits = torch.tensor([1, 2, 1, 2])
    with _Recorder(model) as rec, torch.inference_mode():
        out = model.run_mixed(x, exits)
    assert rec.ran("exit") == [1, 2]
    assert rec.ran("stage") == list(range(model.exit_stages[2] + 1))
    with torch.inference_mode():
        assert _maxdiff(out[[0, 2]], model.run_to_exit(x[[0, 2]], 1)) <= TOL
        assert _maxdiff(out[[1, 3]], model.run_to_exit(x[[1, 3]], 2)) <= TOL


@pytest.mark.parametrize("arch,width,kind", CASES, ids=CASE_IDS)
def test_continue_mixed_from_split(models, arch, width, kind):
    model = models[(arch, kind)]
    batch = 9
    x = _image(batch, seed=8)
    for s in range(1, model.num_stages):
        lowest = next(k for k, st in enumerate(model.exit_stages) if st >= s)
        exits = _mixed_exits(model, batch, seed=9 + s, lowest=lowest)
        with torch.inference_mode():
            carry = _wire(model.edge_part(x, s))
        with _Recorder(model) as rec, torch.inference_mode():
            out = model.continue_mixed(carry, s, exits)
        assert rec.batch("stage") == _expected_batches(model, exits, s)
        with torch.inference_mode():
            for i in range(batch):
                single = model.run_to_exit(x[i : i + 1], int(exits[i]))
                assert _maxdiff(out[i : i + 1], single) <= TOL, (s, i)


# --- 4. cost table ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,width,kind", CASES, ids=CASE_IDS)
def test_cost_table_monotone(models, costs, arch, width, kind):
    model, table = models[(arch, kind)], costs[(arch, kind)]
    assert len(table.stage_flops) == model.num_stages
    assert all(f > 0 for f in table.stage_flops)
    assert all(f > 0 for f in table.exit_flops)
    exit_costs = [table.exit_cost(k) for k in range(table.num_exits)]
    assert all(a < b for a, b in zip(exit_costs, exit_costs[1:])), exit_costs
    seq = [table.sequential_exit_cost(k) for k in range(table.num_exits)]
    assert all(a < b for a, b in zip(seq, seq[1:]))
    assert all(s >= e for s, e in zip(seq, exit_costs))
    assert table.full_cost == exit_costs[-1]
    splits = [table.split_cost(s) for s in range(model.num_stages + 1)]
    assert splits[0] == 0 and all(a < b for a, b in zip(splits, splits[1:]))
    assert table.split_fp32_bytes[-1] == 0 and table.split_fp32_bytes[0] == 3 * 32 * 32 * 4
    assert (table.predictor_flops > 0) == (kind == "rapnet")


def test_rapnet_cheaper_than_static_backbone(costs):
    for arch, _ in ARCH_WIDTHS:
        assert costs[(arch, "rapnet")].full_cost < costs[(arch, "static")].full_cost


def test_predictor_cost_default_config():
    torch.manual_seed(0)
    model = build_model(ModelConfig()).eval()
    assert model.config.arch == "mobilenetv2" and model.config.width == 1.0 and model.config.kind == "rapnet"
    table = measure_costs(model)
    assert 0 < table.predictor_flops <= 0.03 * table.full_cost, (table.predictor_flops, table.full_cost)
    x = _image(1, seed=10)
    with torch.inference_mode():
        assert count_flops(model.predictor, x)[0] == table.predictor_flops
        assert count_flops(model.exit_scores, x)[0] == table.predictor_flops
        scores = model.exit_scores(x)
    assert scores.shape == (1, model.num_exits) and ((scores > 0) & (scores < 1)).all()


def test_exit_scores_refused_without_predictor(models):
    with pytest.raises(ValueError, match="no exit predictor"):
        models[("mobilenetv2", "sdn")].exit_scores(_image(1))


# --- 5. edge / cloud edge cases --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,width,kind", CASES, ids=CASE_IDS)
def test_cloud_part_refuses_exit_before_split(models, arch, width, kind):
    model = models[(arch, kind)]
    x = _image(1, seed=11)
    found = 0
    with torch.inference_mode():
        for s in range(1, model.num_stages + 1):
            carry = model.edge_part(x, s)
            for k in range(model.num_exits):
                if model.exit_stages[k] < s:
                    with pytest.raises(ValueError, match="before split"):
                        model.cloud_part(carry, s, k)
                    found += 1
    assert found > 0


@pytest.mark.parametrize("arch,width,kind", CASES, ids=CASE_IDS)
def test_cloud_part_refuses_missing_carry_key(models, arch, width, kind):
    model = models[(arch, kind)]
    x = _image(1, seed=12)
    with torch.inference_mode():
        for s in range(model.num_stages):
            carry = model.edge_part(x, s)
            for key in carry:
                partial = {k: v for k, v in carry.items() if k != key}
                with pytest.raises(ValueError, match="lacks"):
                    model.cloud_part(partial, s, model.num_exits - 1)


@pytest.mark.parametrize("arch,width,kind", CASES, ids=CASE_IDS)
def test_bad_split_and_exit_indices(models, arch, width, kind):
    model = models[(arch, kind)]
    x = _image(2, seed=13)
    n_s, n_e = model.num_stages, model.num_exits
    with torch.inference_mode():
        carry = model.edge_part(x, 0)
        for bad_split in (-1, n_s + 1):
            with pytest.raises(ValueError, match="split point"):
                model.edge_part(x, bad_split)
            with pytest.raises(ValueError, match="split point"):
                model.cloud_part(carry, bad_split, n_e - 1)
            with pytest.raises(ValueError, match="split point"):
                model.live_keys(bad_split)
        for bad_exit in (-1, n_e):
            with pytest.raises(ValueError, match="exit"):
                model.run_to_exit(x, bad_exit)
            with pytest.raises(ValueError, match="exit"):
                model.cloud_part(carry, 0, bad_exit)
            with pytest.raises(ValueError, match="exits must lie"):
                model.run_mixed(x, torch.tensor([0, bad_exit]))
        with pytest.raises(ValueError, match="empty batch"):
            model.run_mixed(x[:0], torch.tensor([], dtype=torch.long))
        if n_s > 1:
            # an exit before the split point in a mixed batch
            carry = model.edge_part(x, n_s)
            with pytest.raises(ValueError, match="before split"):
                model.continue_mixed(carry, n_s, torch.tensor([n_e - 1, n_e - 1]))


@pytest.mark.parametrize("arch,width,kind", CASES, ids=CASE_IDS)
def test_local_exit_fallback(models, arch, width, kind):
    model = models[(arch, kind)]
    x = _image(2, seed=14)
    assert model.deepest_local_exit(0) is None
    with torch.inference_mode():
        with pytest.raises(ValueError, match="no exit"):
            model.local_exit_logits(model.edge_part(x, 0), 0)
        # Splits 1..num_stages-1 hand something to the cloud; the edge's fallback answer is its deepest exit.
        for s in range(1, model.num_stages):
            k = model.deepest_local_exit(s)
            expected_k = max((i for i, st in enumerate(model.exit_stages) if st < s), default=None)
            assert k == expected_k
            carry = model.edge_part(x, s)
            if k is None:  # static network: no exit before the last stage
                with pytest.raises(ValueError, match="no exit"):
                    model.local_exit_logits(carry, s)
                continue
            local = model.local_exit_logits(carry, s)
            assert _maxdiff(local, model.run_to_exit(x, k)) <= TOL
            # and over the wire, too (the edge keeps the very carry it sends)
            assert _maxdiff(model.local_exit_logits(_wire(carry), s), local) == 0.0
        # At split == num_stages nothing crosses the network (the carry is empty), so there is no fallback
        # to compute from it: the edge ran everything and answers with run_to_exit instead.
        assert model.deepest_local_exit(model.num_stages) == model.num_exits - 1
        with pytest.raises(ValueError, match="no longer holds"):
            model.local_exit_logits(model.edge_part(x, model.num_stages), model.num_stages)


# --- 6. checkpoints and identity -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt_model():
    return _make("mobilenetv2", 0.35, "rapnet", seed=42)


def test_checkpoint_round_trip(tmp_path, ckpt_model):
    path = tmp_path / "m.pt"
    identity = save_checkpoint(path, ckpt_model, metadata={"epoch": 3})
    assert identity == model_identity(ckpt_model)
    assert not list(tmp_path.glob("*.tmp"))
    loaded, meta = load_model(path)
    assert not loaded.training
    assert meta["identity"] == identity == model_identity(loaded)
    assert meta["epoch"] == 3
    assert loaded.config == ckpt_model.config
    x = _image(3, seed=15)
    with torch.inference_mode():
        for a, b in zip(ckpt_model(x), loaded(x)):
            assert torch.equal(a, b)
        assert torch.equal(ckpt_model.exit_scores(x), loaded.exit_scores(x))
    # the expected-config check
    load_model(path, expected=ckpt_model.config)
    with pytest.raises(CheckpointError):
        load_model(path, expected=ckpt_model.config.replace(width=0.5))


def test_identity_is_deterministic_and_content_sensitive(ckpt_model):
    identity = model_identity(ckpt_model)
    assert identity == model_identity(ckpt_model)
    assert identity == model_identity(copy.deepcopy(ckpt_model))
    changed = copy.deepcopy(ckpt_model)
    with torch.no_grad():
        p = next(iter(changed.parameters()))
        p.view(-1)[0] += 1e-3
    assert model_identity(changed) != identity
    # a buffer (BN statistics) counts too
    changed = copy.deepcopy(ckpt_model)
    bn = next(m for m in changed.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with torch.no_grad():
        bn.running_var[0] += 1e-3
    assert model_identity(changed) != identity
    # same seed, different architecture: different identity
    other = _make("mobilenetv2", 0.35, "sdn", seed=42)
    assert model_identity(other) != identity


def test_truncated_checkpoint_refused(tmp_path, ckpt_model):
    path = tmp_path / "m.pt"
    save_checkpoint(path, ckpt_model)
    data = path.read_bytes()
    for cut in (len(data) // 2, 100, 0):
        bad = tmp_path / f"cut{cut}.pt"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError):
            load_model(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "missing.pt")


@pytest.mark.parametrize("change", [{"width": 0.5}, {"arch": "resnet", "width": 0.25}, {"kind": "sdn"}, {"fusion_stride": 4}])
def test_checkpoint_from_other_architecture_refused(tmp_path, ckpt_model, change):
    path = tmp_path / "m.pt"
    save_checkpoint(path, ckpt_model)
    payload = torch.load(path, weights_only=True)
    payload["config"] = {**payload["config"], **change}
    forged = tmp_path / "forged.pt"
    torch.save(payload, forged)
    with pytest.raises(CheckpointError):
        load_model(forged)


def test_checkpoint_without_fusion_stride_loads_as_stride_4_with_its_identity(tmp_path):
    """A checkpoint whose config has no fusion_stride key loads as fusion stride 4, and the identity hash leaves the
    field out at that value, so its identity (edge and cloud compare it) is the one it was saved with."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(width=0.35, fusion_stride=4)).eval()
    path = tmp_path / "m.pt"
    identity = save_checkpoint(path, model)
    payload = torch.load(path, weights_only=True)
    assert payload["config"].pop("fusion_stride") == 4
    bare = tmp_path / "bare.pt"
    torch.save(payload, bare)
    loaded, meta = load_model(bare)
    assert loaded.config.fusion_stride == 4 and meta["identity"] == identity
    assert "fusion_stride" not in model.config.identity_dict()
    assert ModelConfig(width=0.35).identity_dict()["fusion_stride"] == 2
    with pytest.raises(ValueError, match="fusion_stride 3"):
        ModelConfig(fusion_stride=3)


def test_edited_weights_refused(tmp_path, ckpt_model):
    path = tmp_path / "m.pt"
    save_checkpoint(path, ckpt_model)
    payload = torch.load(path, weights_only=True)
    name = next(k for k, v in payload["state_dict"].items() if v.dtype == torch.float32)
    payload["state_dict"][name] = payload["state_dict"][name].clone()
    payload["state_dict"][name].view(-1)[0] += 1.0
    edited = tmp_path / "edited.pt"
    torch.save(payload, edited)
    with pytest.raises(CheckpointError, match="hash mismatch"):
        load_model(edited)


_DAMAGES = {
    "no-config": lambda p: p.pop("config"),
    "config-not-dict": lambda p: p.__setitem__("config", None),
    "no-state-dict": lambda p: p.pop("state_dict"),
    "state-dict-list": lambda p: p.__setitem__("state_dict", [1, 2]),
    "metadata-not-json": lambda p: p.__setitem__("metadata", "{not json"),
    "metadata-not-object": lambda p: p.__setitem__("metadata", "[1]"),
    "no-identity": lambda p: p.pop("identity"),
}


@pytest.mark.parametrize("damage", list(_DAMAGES), ids=list(_DAMAGES))
def test_malformed_checkpoint_payload_refused(tmp_path, ckpt_model, damage):
    path = tmp_path / "m.pt"
    save_checkpoint(path, ckpt_model)
    payload = torch.load(path, weights_only=True)
    _DAMAGES[damage](payload)
    bad = tmp_path / "bad.pt"
    torch.save(payload, bad)
    with pytest.raises(CheckpointError):
        load_model(bad)


def test_not_a_checkpoint_refused(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="not a RAPNet checkpoint"):
        load_model(path)
    # non-torch files: the weights-only unpickler raises KeyError / struct.error / ... on these
    for i, junk in enumerate([b"hello", b"M", b"\x80\x02garbage", bytes(range(256)), b"PK\x03\x04junk"]):
        f = tmp_path / f"junk{i}.pt"
        f.write_bytes(junk)
        with pytest.raises(CheckpointError):
            load_model(f)


class _Evil:
    """Pickles to a call of os.system: loading it with plain pickle would run the command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


def test_checkpoint_with_code_refused_and_not_executed(tmp_path, ckpt_model):
    marker = tmp_path / "pwned"
    path = tmp_path / "m.pt"
    save_checkpoint(path, ckpt_model)
    payload = torch.load(path, weights_only=True)
    payload["metadata"] = _Evil(marker)
    evil = tmp_path / "evil.pt"
    torch.save(payload, evil)
    assert not marker.exists()  # saving does not run it
    with pytest.raises(CheckpointError, match="refused"):
        load_model(evil)
    assert not marker.exists()


@pytest.mark.parametrize("arch,width,kind", MULTI_EXIT, ids=MULTI_EXIT_IDS)
def test_confident_run_stops_at_its_last_exit_or_earlier(models, arch, width, kind):
    """RAPNet's capped rule: exits are tried in order up to `last_exit`, which answers when none is confident."""
    model = models[(arch, kind)]
    x = _image(1, seed=11)
    with torch.inference_mode():
        logits, k = model.run_until_confident(x, threshold=1.1, last_exit=2)  # nothing is ever that confident
        assert k == 2 and _maxdiff(logits, model.run_to_exit(x, 2)) <= TOL
        with _Recorder(model) as rec:
            _, k = model.run_until_confident(x, threshold=0.0, last_exit=2)  # the first exit always is
        assert k == 0 and rec.ran("stage") == list(range(model.exit_stages[0] + 1))
        with pytest.raises(ValueError, match="outside"):
            model.run_until_confident(x, 0.5, last_exit=model.num_exits)


@pytest.mark.parametrize("arch,width,kind", MULTI_EXIT, ids=MULTI_EXIT_IDS)
def test_batched_capped_run_matches_the_per_image_one(models, arch, width, kind):
    """The cloud's batch (continue_capped) answers each sample where run_until_confident would, from any split."""
    model = models[(arch, kind)]
    batch = 10
    x = _image(batch, seed=12)
    caps = _mixed_exits(model, batch, seed=13)
    with torch.inference_mode():
        probs = torch.stack([torch.softmax(z, 1) for z in model(x)], 1).amax(2)  # (B, K) confidence per exit
    stop = torch.full((batch,), float(probs.median()))  # about half the exits on the way are confident
    stop[::3] = 0.0  # no stop confidence: these run to their cap
    for split in (0, model.exit_stages[0] + 1):
        capped = torch.clamp(caps, min=next(k for k, s in enumerate(model.exit_stages) if s >= split))
        with torch.inference_mode():
            carry = model.edge_part(x, split)
            logits, used = model.continue_capped(carry, split, capped, stop)
            for i in range(batch):
                first = next(k for k, s in enumerate(model.exit_stages) if s >= split)
                if stop[i] > 0:
                    confident = [k for k in range(first, int(capped[i]) + 1) if probs[i, k] >= stop[i]]
                    expected = confident[0] if confident else int(capped[i])
                else:
                    expected = int(capped[i])
                assert int(used[i]) == expected, (split, i)
                assert _maxdiff(logits[i : i + 1], model.run_to_exit(x[i : i + 1], expected)) <= TOL
    assert (used != capped).any() and (used == capped).any()


@pytest.mark.parametrize("arch,width,kind", MULTI_EXIT, ids=MULTI_EXIT_IDS)
def test_edge_part_capped_answers_before_the_split_or_hands_over_the_carry(models, arch, width, kind):
    model = models[(arch, kind)]
    split = model.exit_stages[1] + 1  # exits 0 and 1 lie before the split
    x = _image(1, seed=14)
    with torch.inference_mode():
        first = float(torch.softmax(model.run_to_exit(x, 0), 1).max())
        carry, answer = model.edge_part_capped(x, split, stop_confidence=first)  # exit 0 is exactly that confident
        assert carry is None and answer[1] == 0 and _maxdiff(answer[0], model.run_to_exit(x, 0)) <= TOL
        carry, answer = model.edge_part_capped(x, split, stop_confidence=1.1)  # never confident: send
        assert answer is None and set(carry) == set(model.edge_part(x, split))
        for key, value in model.edge_part(x, split).items():
            assert _maxdiff(carry[key], value) <= TOL
