"""Planner limiting cases and simulator-vs-offline-evaluation equality, on synthetic traces and tiny untrained
models (no checkpoints or dataset needed). One optional test replays the real cached traces when present."""
from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestration.calibration import leaf_layers, measure_payloads
from orchestration.model_traces import ModelTraces, load_traces, save_traces
from orchestration.planner import DEFAULT_PRICE, Conditions, LayerCounts, Planner
from orchestration.simulator import POLICIES, SimConfig, World, compare, fifo_waits
from rapnet.costs import CostTable, measure_costs
from rapnet.evaluate import capped_curve, point, priced_curve, sdn_curve
from rapnet.exit_rules import (capped_exits, confidence_exits, oracle_exits, predictor_exits, priced_exits,
                               relative_exit_costs)
from rapnet.exit_traces import Traces

torch.set_num_threads(1)


# --- a hand-made cost table (6 stages, 4 exits) ----------------------------------------------------------
def toy_costs() -> CostTable:
    return CostTable(
        stage_flops=(4_000_000, 4_000_000, 10_000_000, 30_000_000, 30_000_000, 40_000_000),
        exit_flops=(100_000, 200_000, 400_000, 10_000_000),
        exit_stages=(0, 2, 3, 5),
        predictor_flops=2_000_000,
        split_keys=((),) * 7, split_shapes=((),) * 7,
        split_fp32_bytes=(12288, 30000, 20000, 16000, 24000, 10000, 0),
    )


def toy_planner(**kw) -> Planner:
    costs = toy_costs()
    payload = {(0, "png"): 2400}
    for s, b in enumerate((None, 8000, 5000, 4000, 6000, 2600)):
        if b:
            payload[s, "int8+zstd"] = b
            payload[s, "fp32+zstd"] = 4 * b
    layers = LayerCounts((24, 16, 40, 38, 16, 24), (4, 4, 4, 5), 10)
    kw.setdefault("threshold", 0.8)  # the placement tests below use the threshold rule (SCORES -> exit 2)
    if kw["threshold"] is None:
        del kw["threshold"]
    return Planner(costs, payload, [0.6, 0.75, 0.85, 0.9], encodings=("png", "int8+zstd", "fp32+zstd"),
                   layers=layers, **kw)


SCORES = np.array([0.3, 0.5, 0.9, 0.95])  # predictor: exit 2 is the shallowest trusted at 0.8


def test_priced_rule_is_the_default():
    p = toy_planner(threshold=None)  # no rule named: the priced rule at DEFAULT_PRICE
    assert p.rule == "price" and p.price == DEFAULT_PRICE and p.threshold is None
    rel = relative_exit_costs(toy_costs())
    rng = np.random.default_rng(1)
    scores = rng.random((300, 4))
    c = Conditions(5, 20, 1.0)
    assert (p.plan_exits(scores, c) == priced_exits(scores, DEFAULT_PRICE, rel)).all()
    assert not (p.plan_exits(scores, c) == predictor_exits(scores, 0.5)).all()
    # price 0: the exit with the highest score, whatever it costs
    assert (toy_planner(threshold=None, price=0.0).plan_exits(scores, c) == scores.argmax(1)).all()
    assert toy_planner(threshold=None, price=0.0).plan(SCORES, c).exit_index == 3
    # a high price buys the cheapest exit
    assert (toy_planner(threshold=None, price=100.0).plan_exits(scores, c) == 0).all()
    # a threshold alone selects the threshold rule; both at once is an error; with_* switch rules
    assert toy_planner().rule == "threshold" and toy_planner().plan(SCORES, c).exit_index == 2
    assert p.with_threshold(0.8).plan(SCORES, c).exit_index == 2 and p.with_threshold(0.8).with_price(0.0).rule == "price"
    with pytest.raises(ValueError):
        toy_planner(price=0.1)


def test_infinite_bandwidth_slow_device_offloads_at_split_zero():
    plan = toy_planner().plan(SCORES, Conditions(bandwidth_mbps=1e12, rtt_ms=0, device_gflops=0.01, cloud_gflops=1000))
    assert plan.offload and plan.split == 0 and plan.encoding == "png"
    assert plan.exit_index == 2
    assert plan.expected_latency_ms < plan.breakdown["edge_ms"] + 1  # edge part is only the predictor


def test_zero_bandwidth_answers_locally():
    plan = toy_planner().plan(SCORES, Conditions(bandwidth_mbps=0, rtt_ms=10, device_gflops=0.5))
    assert not plan.offload and plan.encoding is None
    assert plan.split == toy_costs().exit_stages[plan.exit_index] + 1
    assert math.isfinite(plan.expected_latency_ms)


def test_very_fast_device_answers_locally():
    plan = toy_planner().plan(SCORES, Conditions(bandwidth_mbps=1000, rtt_ms=1, device_gflops=1e6, device_layer_us=0.0))
    assert not plan.offload


def test_expected_latency_never_rises_with_bandwidth_and_falls_back_to_local():
    p = toy_planner()
    lat = [p.plan(SCORES, Conditions(b, 20, 1.0)).expected_latency_ms for b in (0, 0.1, 1, 10, 100, 1e4)]
    assert all(a >= b - 1e-9 for a, b in zip(lat, lat[1:]))
    local = p.option_table(Conditions(0, 20, 1.0)).local_latency[2]
    assert lat[0] == pytest.approx(local)


def test_latency_breakdown_adds_up_and_loss_costs_time():
    p = toy_planner()
    c = Conditions(bandwidth_mbps=1e3, rtt_ms=30, device_gflops=0.2, jitter_ms=5, loss=0.0)
    plan = p.plan(SCORES, c)
    assert plan.offload
    parts = plan.breakdown
    assert plan.expected_latency_ms == pytest.approx(sum(v for k, v in parts.items() if k.endswith("_ms") and k != "total_ms"))
    lossy = p.plan(SCORES, Conditions(bandwidth_mbps=1e3, rtt_ms=30, device_gflops=0.2, jitter_ms=5, loss=0.2))
    assert lossy.expected_latency_ms > plan.expected_latency_ms


def test_cloud_overhead_costs_every_offload_and_can_keep_work_local():
    p = toy_planner()
    c = Conditions(bandwidth_mbps=1e3, rtt_ms=5, device_gflops=0.5)
    plan = p.plan(SCORES, c)
    assert plan.offload and plan.breakdown["overhead_ms"] == 0
    slower = p.plan(SCORES, Conditions(bandwidth_mbps=1e3, rtt_ms=5, device_gflops=0.5, cloud_overhead_ms=7))
    assert slower.offload and slower.breakdown["overhead_ms"] == 7
    assert slower.expected_latency_ms == pytest.approx(plan.expected_latency_ms + 7)
    local = p.option_table(c).local_latency[plan.exit_index]
    assert not p.plan(SCORES, Conditions(bandwidth_mbps=1e3, rtt_ms=5, device_gflops=0.5, cloud_overhead_ms=local)).offload
    with pytest.raises(ValueError):
        Conditions(bandwidth_mbps=1, rtt_ms=1, device_gflops=1, cloud_overhead_ms=-1)


def test_objectives_accuracy_target_and_latency_budget():
    p = toy_planner()
    c = Conditions(bandwidth_mbps=0, rtt_ms=10, device_gflops=1.0)
    assert p.plan(SCORES, Conditions(0, 10, 1.0, accuracy_target=0.4)).exit_index == 1
    assert p.plan(SCORES, Conditions(0, 10, 1.0, accuracy_target=0.99)).exit_index == 3  # none reaches: last
    assert p.plan(None, Conditions(0, 10, 1.0, accuracy_target=0.8)).exit_index == 2  # population accuracy
    local = p.option_table(c).local_latency
    budget = (local[0] + local[1]) / 2  # only exit 0 fits
    plan = p.plan(SCORES, Conditions(0, 10, 1.0, latency_budget_ms=budget))
    assert plan.exit_index == 0 and plan.expected_latency_ms <= budget
    plan = p.plan(SCORES, Conditions(0, 10, 1.0, latency_budget_ms=local[0] / 10))  # nothing fits: fastest
    assert plan.exit_index == 0 and plan.breakdown["within_budget"] is False


def test_plan_agrees_with_vectorised_plan_exits():
    p = toy_planner()
    rng = np.random.default_rng(0)
    scores = rng.random((200, 4))
    for c in (Conditions(5, 20, 1.0), Conditions(5, 20, 1.0, accuracy_target=0.7), Conditions(0.5, 80, 0.5, latency_budget_ms=50)):
        exits = p.plan_exits(scores, c)
        assert [p.plan(s, c).exit_index for s in scores] == exits.tolist()
    assert (p.plan_exits(scores, Conditions(5, 20, 1.0)) == predictor_exits(scores, 0.8)).all()  # threshold rule
    priced = toy_planner(threshold=None, price=0.3)
    rel = relative_exit_costs(toy_costs())
    for c in (Conditions(5, 20, 1.0), Conditions(0.5, 80, 0.5, latency_budget_ms=50)):
        assert [priced.plan(s, c).exit_index for s in scores] == priced.plan_exits(scores, c).tolist()
    assert (priced.plan_exits(scores, Conditions(5, 20, 1.0)) == priced_exits(scores, 0.3, rel)).all()


def test_rule_settings_are_checked_in_one_place():
    """Price, threshold and stop confidence: a ValueError naming the value and the range, wherever they come in."""
    from rapnet.exit_rules import check_price, check_rule, check_stop_confidence, check_threshold

    assert check_price(0) == 0.0 and check_threshold(1) == 1.0 and check_stop_confidence(0.9) == 0.9
    for check, bad, range_text in ((check_price, -0.1, ">= 0"), (check_price, math.inf, ">= 0"),
                                   (check_price, math.nan, ">= 0"), (check_threshold, 1.5, "[0, 1]"),
                                   (check_stop_confidence, 0.0, "(0, 1]"), (check_stop_confidence, True, "(0, 1]")):
        with pytest.raises(ValueError, match=re.escape(range_text)) as err:
            check(bad)
        assert repr(bad) in str(err.value)
    with pytest.raises(ValueError, match="not both"):
        check_rule(price=0.1, threshold=0.5)
    with pytest.raises(ValueError, match="--stop-confidence .* --threshold"):
        check_rule(threshold=0.5, stop_confidence=0.9, names=("--price", "--threshold", "--stop-confidence"))
    with pytest.raises(ValueError, match="price must be a finite number >= 0, got -1"):
        toy_planner(threshold=None, price=-1)
    with pytest.raises(ValueError, match=r"threshold must lie in \[0, 1\], got 2"):
        toy_planner().with_threshold(2)


def test_sequential_costs_include_every_head():
    costs = toy_costs()
    seq = Planner(costs, {}, [0.5] * 4, sequential=True, predictor_on_edge=False)
    jump = Planner(costs, {}, [0.5] * 4, predictor_on_edge=False)
    assert seq.local_flops[3] == costs.sequential_exit_cost(3)
    assert jump.local_flops[3] == costs.exit_cost(3)


def test_static_and_progressive_helpers():
    p = toy_planner()
    fast_net = Conditions(1e4, 1, 0.05)
    assert p.plan_static(fast_net).offload
    assert not p.plan_static(Conditions(0, 1, 0.05)).offload
    split, enc, ms = p.plan_progressive(np.array([1.0, 0, 0, 0]), Conditions(1e4, 50, 5.0))  # all exit at 0: local
    assert enc is None and split == len(toy_costs().stage_flops)
    split, enc, ms = p.plan_progressive(np.array([0, 0, 0, 1.0]), fast_net)
    assert enc is not None and split <= 5


def test_fifo_waits():
    w = fifo_waits(np.array([0.0, 1.0, 2.0, 10.0]), np.array([5.0, 5.0, 5.0, 1.0]), workers=1)
    assert w.tolist() == [0.0, 4.0, 8.0, 5.0]
    w = fifo_waits(np.array([0.0, 1.0, 2.0]), np.array([5.0, 5.0, 5.0]), workers=2)
    assert w.tolist() == [0.0, 0.0, 3.0]


# --- synthetic traces over tiny untrained models (real cost tables and real request sizes) ---------------
N = 400


def _synthetic(kind: str, seed: int) -> ModelTraces:
    from rapnet.build import build_model
    from rapnet.config import ModelConfig

    torch.manual_seed(seed)
    model = build_model(ModelConfig(kind=kind, width=0.25)).eval()
    costs = measure_costs(model)
    K = costs.num_exits
    rng = np.random.default_rng(seed)

    def draw(n):
        difficulty = rng.random(n)
        correct = difficulty[:, None] < np.linspace(0.55, 0.9, K)[None, :] + 0.05 * rng.standard_normal((n, K))
        confidence = np.clip(0.5 + 0.4 * correct + 0.15 * rng.standard_normal((n, K)), 0, 1).astype(np.float32)
        scores = np.clip(correct + 0.3 * rng.standard_normal((n, K)), 0, 1).astype(np.float32) if kind == "rapnet" else None
        return correct, confidence, scores

    c, f, s = draw(N)
    cc, cf, cs = draw(200)
    # the JPEG view: a tenth of the answers change; on the held-out part it costs ~7 points, so JPEG stays off the
    # menu unless a test says otherwise
    flip = rng.random(c.shape) < 0.1
    jc, jf = c ^ flip, np.clip(f + 0.1 * rng.standard_normal(f.shape), 0, 1).astype(np.float32)
    js = None if s is None else np.clip(s + 0.2 * rng.standard_normal(s.shape), 0, 1).astype(np.float32)
    held, held_f, held_s = draw(300)
    held_jpeg = held & (rng.random(held.shape) >= 0.1)
    held_jf = np.clip(held_f + 0.1 * rng.standard_normal(held_f.shape), 0, 1).astype(np.float32)
    held_js = None if held_s is None else np.clip(held_s + 0.2 * rng.standard_normal(held_s.shape), 0, 1).astype(np.float32)
    pixels = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    payload, enc, dec, agree = measure_payloads(model, pixels)
    # fixed codec times: measured ones follow the machine's load, and the tests below must not
    enc, dec = {k: 0.1 for k in enc}, {k: 0.1 for k in dec}
    return ModelTraces(kind, f"synthetic-{kind}", costs, tuple(leaf_layers(x) for x in model.stages),
                       tuple(leaf_layers(x) for x in model.exits),
                       leaf_layers(model.predictor) if model.predictor is not None else 0,
                       c, f, s, cc, cf, cs, payload, enc, dec, {k: 1.0 for k in agree},
                       jpeg_correct=jc, jpeg_confidence=jf, jpeg_scores=js, heldout_correct=held,
                       heldout_confidence=held_f, heldout_scores=held_s, heldout_jpeg_correct=held_jpeg,
                       heldout_jpeg_confidence=held_jf, heldout_jpeg_scores=held_js)


@pytest.fixture(scope="module")
def traces():
    return {name: _synthetic(name, i) for i, name in enumerate(("rapnet", "sdn", "static"))}


@pytest.fixture(scope="module")
def world(traces):
    return World(traces, SimConfig(devices=4, workers=1, fps=10.0, accuracy_target=0.7))


def _offline(t: ModelTraces) -> Traces:
    return Traces(t.correct, t.confidence, t.scores)


@pytest.mark.parametrize("cond", [Conditions(10, 20, 1.0), Conditions(0.5, 80, 0.5, jitter_ms=3, loss=0.01), Conditions(100, 5, 20.0)])
def test_simulated_accuracy_equals_offline_evaluation(traces, world, cond):
    results = world.run_all(cond)
    assert set(results) == set(POLICIES)
    assert world.config.rapnet_rule == "price"  # the default: RAPNet's priced rule, as rapnet-eval's priced_curve
    rap = next(p for p in priced_curve(_offline(traces["rapnet"]), traces["rapnet"].costs) if p["price"] == world.rapnet_price)
    sdn = next(p for p in sdn_curve(_offline(traces["sdn"]), traces["sdn"].costs) if p["threshold"] == world.sdn_threshold)
    flops = np.array([traces["rapnet"].costs.exit_cost(k) for k in range(traces["rapnet"].costs.num_exits)])
    oracle = point(_offline(traces["rapnet"]), oracle_exits(traces["rapnet"].correct), flops)
    static = traces["static"].correct[:, 0].mean()
    for name in ("rapnet_edge", "rapnet_split"):
        assert results[name].accuracy == pytest.approx(rap["accuracy"], abs=1e-12)
        assert results[name].exit_histogram == rap["exit_histogram"]
    for name in ("sdn_edge", "spinn"):
        assert results[name].accuracy == pytest.approx(sdn["accuracy"], abs=1e-12)
    q, t = world.capped_setting
    capped = next(p for p in capped_curve(_offline(traces["rapnet"]), traces["rapnet"].costs)
                  if (p["price"], p["threshold"]) == (q, t))
    for name in ("rapnet_capped", "rapnet_edge_capped"):
        assert results[name].accuracy == pytest.approx(capped["accuracy"], abs=1e-12)
        assert results[name].exit_histogram == capped["exit_histogram"]
    assert results["oracle"].accuracy == pytest.approx(oracle["accuracy"], abs=1e-12)
    for name in ("neurosurgeon", "cloud_png"):
        assert results[name].accuracy == pytest.approx(static, abs=1e-12)
    v = compare(results)
    assert v["oracle_ratio"] > 0 and v["fastest_baseline"] in results


def test_the_capped_rule_runs_at_a_given_setting_as_the_offline_rule_does(traces):
    """World.use_capped_setting (benchmarks/oracle_bound.py's hindsight reference): the capped rule then answers as
    rapnet.evaluate's capped_curve at that setting, and going back to the calibrated one restores every result."""
    w = World(traces, SimConfig(devices=4, workers=1, fps=10.0, accuracy_target=0.7))
    c = Conditions(10, 20, 1.0)
    calibrated = w.capped_setting
    before = {p: w.run_policy(p, c) for p in ("rapnet_capped", "rapnet_edge_capped")}
    other = next((q, t) for q, t in [(0.1, 0.9), (0.2, 0.8)] if (q, t) != calibrated)
    w.use_capped_setting(other)
    offline = next(p for p in capped_curve(_offline(traces["rapnet"]), traces["rapnet"].costs)
                   if (p["price"], p["threshold"]) == other)
    for name in before:
        result = w.run_policy(name, c)
        assert result.accuracy == pytest.approx(offline["accuracy"], abs=1e-12)
        assert result.exit_histogram == offline["exit_histogram"]
    w.use_capped_setting(calibrated)
    for name, result in before.items():
        again = w.run_policy(name, c)
        assert (again.accuracy, again.mean_ms, again.exit_histogram) == (result.accuracy, result.mean_ms, result.exit_histogram)


def test_cloud_jpeg_pays_for_encoding_even_when_the_planner_may_not_pick_jpeg(traces):
    from dataclasses import replace as dc_replace

    from orchestration.planner import REF_GFLOPS

    static = traces["static"]
    lossy = dc_replace(static, agreement={**static.agreement, (0, "jpeg"): 1.0})  # every answer kept, but
    assert static.jpeg_accuracy_drop() > 0.005  # it costs calibration accuracy: JPEG stays off the planner's menu
    w = World({**traces, "static": lossy}, SimConfig(devices=4, workers=1, fps=10.0, accuracy_target=0.7))
    c = Conditions(100, 5, 0.5, jitter_ms=0.0, loss=0.0)
    assert all(option[1] != "jpeg" for options in w.planners["static"].options for option in options)
    assert w.planners["static"].codec_scaled(0, "jpeg", c)[0] == pytest.approx(0.1 * REF_GFLOPS / 0.5)
    png, jpeg = w.run_policy("cloud_png", c), w.run_policy("cloud_jpeg", c)
    # same encode and decode times in these traces: JPEG is faster by its smaller transfer only
    assert 0 < png.mean_ms - jpeg.mean_ms < 1.0


def _jpeg_admitted(t: ModelTraces, jpeg_share_of_png: float = 0.3) -> ModelTraces:
    """t with JPEG changing nothing on the held-out split, JPEG images a fraction of the PNG request's size and slower
    to encode than the lossless ones (as on the real machine)."""
    from dataclasses import replace as dc_replace

    payload = {**t.payload, (0, "jpeg"): (t.payload[0, "png"] * jpeg_share_of_png).astype(np.int32)}
    return dc_replace(t, heldout_jpeg_correct=t.heldout_correct.copy(), heldout_jpeg_confidence=t.heldout_confidence,
                      heldout_jpeg_scores=t.heldout_scores, payload=payload, encode_ms={**t.encode_ms, (0, "jpeg"): 0.12})


def test_jpeg_goes_on_the_menu_by_held_out_accuracy_not_agreement(traces):
    t = traces["rapnet"]
    menu, agreement = t.menu(0.995, 0.005)
    assert t.jpeg_accuracy_drop() > 0.05
    assert (0, "jpeg") not in menu and (0, "png") in menu
    ok = _jpeg_admitted(t)
    low_agreement = {**ok.agreement, (0, "jpeg"): 0.5, (1, "int8+zstd"): 0.9}
    from dataclasses import replace as dc_replace
    menu, agreement = dc_replace(ok, agreement=low_agreement).menu(0.995, 0.005)
    assert (0, "jpeg") in menu and agreement[0, "jpeg"] == 1.0  # no accuracy lost: its agreement does not matter
    assert (1, "int8+zstd") not in menu  # a feature encoding still needs its answers kept
    worse = dc_replace(ok, heldout_jpeg_correct=ok.heldout_correct & (np.arange(len(ok.heldout_correct)) % 50 != 0)[:, None])
    assert worse.jpeg_accuracy_drop() > 0.005 and (0, "jpeg") not in worse.menu(0.995, 0.005)[0]
    assert (0, "jpeg") in worse.menu(0.995, 0.05)[0]


@pytest.mark.parametrize("cloud_exit", [True, False])
def test_frames_sent_as_jpeg_are_answered_from_the_jpeg_view(traces, cloud_exit):
    """On a slow uplink the small JPEG wins; every policy that sends it is scored on the JPEG answers (exits from
    the cloud-side predictor and confidences where the cloud runs them), the rest on the lossless ones."""
    jt = {name: _jpeg_admitted(t) for name, t in traces.items()}
    # a device whose every leaf layer costs a call (eager PyTorch): at 0.01 GFLOP/s no exit is worth answering on it
    w = World(jt, SimConfig(devices=1, fps=1.0, accuracy_target=0.7, cloud_exit=cloud_exit, device_runtime="torch"))
    c = Conditions(bandwidth_mbps=0.1, rtt_ms=5, device_gflops=0.01, jitter_ms=0.0, loss=0.0)
    results = w.run_all(c)
    r, rows = jt["rapnet"], np.arange(N)
    relative = w.planners["rapnet"].relative_costs
    split = results["rapnet_split"]
    assert split.detail["encodings"] == ["jpeg"] and split.detail["jpeg_share"] == 1.0
    assert split.detail["cloud_exit"] == cloud_exit
    exits = priced_exits(r.jpeg_scores if cloud_exit else r.scores, w.rapnet_price, relative)
    assert split.accuracy == pytest.approx(r.jpeg_correct[rows, exits].mean(), abs=1e-12)
    assert split.accuracy != pytest.approx(r.correct[rows, exits].mean(), abs=1e-6)  # the views differ
    capped = results["rapnet_capped"]
    assert capped.detail["jpeg_share"] == 1.0
    assert w.capped_jpeg_stop == w.capped_setting[1]  # JPEG changes nothing on the held-out split: the same stop
    exits = capped_exits(r.jpeg_scores if cloud_exit else r.scores, r.jpeg_confidence, *w.capped_setting, relative)
    assert capped.accuracy == pytest.approx(r.jpeg_correct[rows, exits].mean(), abs=1e-12)
    assert results["oracle"].accuracy == pytest.approx(r.jpeg_correct.any(1).mean(), abs=1e-12)
    assert results["neurosurgeon"].accuracy == pytest.approx(jt["static"].jpeg_correct[:, 0].mean(), abs=1e-12)
    assert results["neurosurgeon"].accuracy == pytest.approx(results["cloud_jpeg"].accuracy, abs=1e-12)
    assert results["spinn"].detail["encoding"] == "jpeg"
    assert w.sdn_jpeg_threshold == w.sdn_threshold
    exits = confidence_exits(jt["sdn"].jpeg_confidence, w.sdn_threshold)
    assert results["spinn"].accuracy == pytest.approx(jt["sdn"].jpeg_correct[rows, exits].mean(), abs=1e-12)
    # a fast uplink sends lossless pixels again
    fast = w.run_policy("rapnet_split", replace(c, bandwidth_mbps=10_000))
    assert "jpeg" not in fast.detail["encodings"] and fast.detail["jpeg_share"] == 0.0


def test_jpeg_images_get_the_cheapest_no_looser_setting_that_loses_nothing_on_the_held_out_split(jpeg_heldout_views):
    from orchestration.calibration import calibrate_for_jpeg, capped_jpeg_stop

    t = jpeg_heldout_views()
    relative = np.linspace(0.25, 1.0, 4)
    cost = np.arange(1.0, 5.0)
    assert capped_jpeg_stop(t, (0.0, 0.3), relative, cost) == pytest.approx(0.505)  # the grid's first above 0.5
    assert capped_jpeg_stop(t, (0.0, 0.7), relative, cost) == 0.7  # already strict enough: unchanged
    # never looser than the lossless setting, even where a looser one would reach the same accuracy
    same = jpeg_heldout_views()
    same.heldout_jpeg_confidence = same.heldout_confidence
    assert capped_jpeg_stop(same, (0.0, 0.3), relative, cost) == 0.3
    confidence_rule = lambda sc, cf, th: confidence_exits(cf, th)  # noqa: E731
    assert calibrate_for_jpeg(t, 0.2, [0.2, 0.5, 0.6, 0.9], confidence_rule, cost) == 0.6
    # none reaches the lossless accuracy: the most accurate one
    assert calibrate_for_jpeg(t, 0.2, [0.2, 0.4], confidence_rule, cost) == 0.2
    # traces without the held-out views (a cache built without them): the lossless setting
    bare = jpeg_heldout_views()
    bare.heldout_jpeg_confidence = None
    assert capped_jpeg_stop(bare, (0.0, 0.3), relative, cost) == 0.3


def test_the_cloud_picks_the_exit_when_that_is_faster_on_average_over_the_rules_exits(world):
    """With an exit prior, cloud-side picking needs to win in expectation, not for every exit: a device that would
    answer a rare shallow exit itself does not, for that alone, run the predictor on every frame."""
    base = world.planners["rapnet"]
    K = base.costs.num_exits
    strict, deep = base.with_exit_prior(None), base.with_exit_prior(np.eye(K)[K - 1])
    assert world.config.calibration_priors and base.exit_prior is not None  # the simulator weighs by calibration exits
    differ = 0
    for gflops in (0.05, 0.2, 0.5, 1, 2, 5, 20):
        c = Conditions(bandwidth_mbps=1000, rtt_ms=1, device_gflops=gflops)
        table = strict.option_table(c)
        remote, remote_deep = strict.cloud_exit_parts(c), deep.cloud_exit_parts(c)
        if remote is not None:  # faster for every exit is faster on average
            assert all(p["total_ms"] <= lat for p, lat in zip(remote, table.latency)) and remote_deep is not None
        if remote_deep is not None:
            assert remote_deep[K - 1]["total_ms"] <= table.latency[K - 1]
            assert remote_deep[K - 1]["edge_ms"] < table.parts[K - 1]["edge_ms"]  # no predictor on the edge
        differ += remote is None and remote_deep is not None
    assert differ, "no device speed where only the prior sends the image at once"
    with pytest.raises(ValueError, match="non-negative"):
        base.with_exit_prior(np.zeros(K))
    assert base.with_price(0.123).exit_prior is None  # a prior belongs to one setting of the rule


def test_capped_frames_are_planned_at_the_cost_of_where_they_stop(world, traces):
    """The capped rule's planner costs a local cap at where its frames stop (calibration counts), so a cap whose
    frames mostly stop at the first exit stays on the edge where running to the cap would have been sent away."""
    planner = world.capped_planner
    K = planner.costs.num_exits
    assert planner.early_stops is not None and np.allclose(planner.early_stops.sum(1), 1)
    assert np.allclose(np.triu(planner.early_stops, 1), 0)
    r = traces["rapnet"]
    relative = relative_exit_costs(r.costs)
    caps = priced_exits(r.cal_scores, world.capped_setting[0], relative)
    stops = capped_exits(r.cal_scores, r.cal_confidence, *world.capped_setting, relative)
    for cap in set(caps.tolist()):
        np.testing.assert_allclose(planner.early_stops[cap], np.bincount(stops[caps == cap], minlength=K) / (caps == cap).sum())
    plain = planner.with_early_stops(None)
    first = np.zeros((K, K))
    first[:, 0] = 1
    at_first = plain.with_early_stops(first)
    flipped = 0
    for gflops in (0.05, 0.2, 0.5, 1, 2, 5):
        c = Conditions(bandwidth_mbps=1000, rtt_ms=1, device_gflops=gflops)
        answer, a, b = plain.answer_ms(c), plain.option_table(c), at_first.option_table(c)
        np.testing.assert_allclose(a.local_latency, answer)
        np.testing.assert_allclose(b.local_latency, np.full(K, answer[0]))
        flipped += bool(a.offload[K - 1] and not b.offload[K - 1])
    assert flipped, "no device speed where early stops keep the last cap on the edge"
    with pytest.raises(ValueError, match="lower-triangular"):
        plain.with_early_stops(np.ones((K, K)))
    assert plain.with_price(planner.price + 1).early_stops is None and at_first.with_price(at_first.price).early_stops is not None


def test_verdict_counts_accuracy_ties_separately():
    from orchestration.simulator import PolicyResult

    def result(name, accuracy, ms):
        return PolicyResult(name, accuracy, ms, ms, ms, 0.0, 0.0, 0.0, [])

    results = {"rapnet_split": result("rapnet_split", 0.8440, 10.0), "spinn": result("spinn", 0.8390, 12.0),
               "rapnet_edge": result("rapnet_edge", 0.8447, 11.0)}
    v = compare(results, baselines=("spinn", "rapnet_edge"))
    assert v["fastest_overall"] and not v["wins_strict"] and v["wins_within_tie"]  # 0.07 point behind: a tie
    results["rapnet_edge"] = result("rapnet_edge", 0.8460, 11.0)
    assert not compare(results, baselines=("spinn", "rapnet_edge"))["wins_within_tie"]  # 0.2 point behind
    results["spinn"] = result("spinn", 0.8300, 9.0)
    assert not compare(results, baselines=("spinn",))["wins_within_tie"]  # slower


def test_accuracy_target_can_be_the_static_networks(traces):
    from orchestration import cli

    w = World(traces, SimConfig(devices=4, fps=10.0, accuracy_target="static"))
    assert w.accuracy_target == pytest.approx(traces["static"].cal_correct[:, 0].mean())
    rows = np.arange(len(traces["rapnet"].cal_correct))
    reached = traces["rapnet"].cal_correct[rows, priced_exits(traces["rapnet"].cal_scores, w.rapnet_price,
                                                              w.planners["rapnet"].relative_costs)].mean()
    assert reached == pytest.approx(w.rapnet_cal_acc)
    assert cli._accuracy_target("static") == "static" and cli._accuracy_target("0.84") == 0.84
    for bad in ("84", "high", "0"):
        with pytest.raises(Exception, match="outside 0..1|neither a number"):
            cli._accuracy_target(bad)


def test_sweep_outputs_go_into_the_out_folder():
    from orchestration.cli import output_paths

    assert output_paths("runs/sim-0.84")["md"] == Path("runs/sim-0.84/sweep.md")
    assert output_paths("runs/sim")["csv"] == Path("runs/sim/sweep.csv")


def test_the_oracle_runs_no_predictor(traces, world):
    predictor = traces["rapnet"].costs.predictor_flops
    assert predictor > 0
    np.testing.assert_allclose(world.oracle_planner.local_flops, world.planners["rapnet"].local_flops - predictor)


def test_thresholds_come_from_calibration_not_test(traces, world):
    t = traces["rapnet"]
    rows = np.arange(len(t.cal_correct))
    acc = t.cal_correct[rows, priced_exits(t.cal_scores, world.rapnet_price, relative_exit_costs(t.costs))].mean()
    assert acc == pytest.approx(world.rapnet_cal_acc) and world.rapnet_cal_acc == world.rapnet_price_cal_acc
    assert (world.rapnet_exits == priced_exits(t.scores, world.rapnet_price, relative_exit_costs(t.costs))).all()
    acc = t.cal_correct[rows, predictor_exits(t.cal_scores, world.rapnet_threshold)].mean()
    assert acc == pytest.approx(world.rapnet_threshold_cal_acc)
    t = traces["sdn"]
    acc = t.cal_correct[np.arange(len(t.cal_correct)), confidence_exits(t.cal_confidence, world.sdn_threshold)].mean()
    assert acc == pytest.approx(world.sdn_cal_acc)
    t = traces["rapnet"]
    acc = t.cal_correct[rows, capped_exits(t.cal_scores, t.cal_confidence, *world.capped_setting,
                                           relative_exit_costs(t.costs))].mean()
    assert acc == pytest.approx(world.capped_cal_acc)


def test_capped_policy_answers_early_exits_on_the_edge_and_the_rest_where_its_cap_is_planned(world):
    """A local cap costs the edge time up to where the frame stopped; with a free network and a slow device
    every cap is planned to the cloud from the image, so no frame stops on the edge."""
    c = Conditions(bandwidth_mbps=0, rtt_ms=10, device_gflops=2.0)
    res = world.run_policy("rapnet_capped", c)
    planner = world.capped_planner
    local = np.array([planner.device_ms(planner.local_flops[k], planner.local_layers[k], c) for k in range(len(planner.local_flops))])
    assert res.offload_share == 0 and res.mean_ms == pytest.approx(local[world.capped_exits].mean())
    ablation = world.run_policy("rapnet_edge_capped", Conditions(bandwidth_mbps=100, rtt_ms=10, device_gflops=2.0))
    assert ablation.offload_share == 0 and ablation.mean_ms == pytest.approx(res.mean_ms)  # its edge-only twin
    res = world.run_policy("rapnet_capped", Conditions(bandwidth_mbps=10_000, rtt_ms=1, device_gflops=0.001))
    assert res.offload_share == 1 and all(split == 0 for split, _ in res.detail["split_per_cap"])


def test_simulated_latency_matches_planner_without_noise(traces, world):
    c = Conditions(bandwidth_mbps=0, rtt_ms=10, device_gflops=2.0)  # no network: everything local, no noise
    res = world.run_policy("rapnet_split", c)
    table = world.planners["rapnet"].option_table(c)
    assert res.offload_share == 0
    assert res.mean_ms == pytest.approx(table.latency[world.rapnet_exits].mean())
    # with a network and a lightly loaded cloud, simulated latency ~ planner expectation (+ real byte spread)
    lone = World(traces, SimConfig(devices=1, fps=1.0, accuracy_target=0.7, cloud_exit=False, device_runtime="torch"))
    c = Conditions(bandwidth_mbps=1000, rtt_ms=10, device_gflops=0.05)
    res = lone.run_policy("rapnet_split", c)
    table = lone.planners["rapnet"].option_table(c)
    assert res.offload_share > 0.5
    assert res.mean_ms == pytest.approx(table.latency[lone.rapnet_exits].mean(), rel=0.02)
    # the fixed per-request overhead lands on every offloaded frame, in the planner and the simulation alike
    c9 = Conditions(bandwidth_mbps=1000, rtt_ms=10, device_gflops=0.05, cloud_overhead_ms=9)
    res9 = lone.run_policy("rapnet_split", c9)
    assert res9.offload_share == res.offload_share
    assert res9.mean_ms == pytest.approx(res.mean_ms + 9 * res.offload_share)
    assert res9.mean_ms == pytest.approx(lone.planners["rapnet"].option_table(c9).latency[lone.rapnet_exits].mean(), rel=0.02)



def test_cloud_picks_the_exit_when_every_exit_sends_the_image(traces):
    torch_device = dict(devices=1, fps=1.0, accuracy_target=0.7, device_runtime="torch")  # every layer a call
    edge_pred = World(traces, SimConfig(cloud_exit=False, **torch_device))
    remote = World(traces, SimConfig(**torch_device))
    planner = remote.planners["rapnet"]
    slow = Conditions(bandwidth_mbps=1000, rtt_ms=10, device_gflops=0.05)
    parts = planner.cloud_exit_parts(slow)
    assert parts is not None and all(p["edge_ms"] == 0 for p in parts)  # the predictor runs in the cloud
    table = planner.option_table(slow)
    assert all(p["total_ms"] < lat for p, lat in zip(parts, table.latency))
    a, b = edge_pred.run_policy("rapnet_split", slow), remote.run_policy("rapnet_split", slow)
    assert b.detail["cloud_exit"] and not a.detail["cloud_exit"]
    assert b.accuracy == a.accuracy and b.exit_histogram == a.exit_histogram  # same rule on the same scores
    assert b.mean_ms < a.mean_ms
    assert b.mean_ms == pytest.approx(np.mean([parts[k]["total_ms"] for k in remote.rapnet_exits]), rel=0.02)
    plan = planner.cloud_exit_plan(slow)
    assert plan.offload and plan.split == 0 and plan.exit_index == len(parts) - 1 and plan.breakdown["cloud_exit"]
    # a device fast enough to answer some exit itself needs the predictor's verdict first
    fast = Conditions(bandwidth_mbps=1000, rtt_ms=10, device_gflops=50)
    assert not planner.option_table(fast).offload.all() and planner.cloud_exit_parts(fast) is None
    assert remote.run_policy("rapnet_split", fast).detail["cloud_exit"] is False
    # the threshold rule and the objectives that need the scores keep the predictor on the edge
    assert planner.with_threshold(0.8).cloud_exit_parts(slow) is None
    assert planner.cloud_exit_parts(Conditions(bandwidth_mbps=1000, rtt_ms=10, device_gflops=0.05,
                                               latency_budget_ms=500)) is None


def test_the_device_runtime_sets_the_devices_calls_and_the_cloud_runs_leaf_layers(traces):
    """On ONNX Runtime the device makes one call per graph (a stage, a head, the predictor); in eager PyTorch one per
    leaf layer. The cloud runs eager PyTorch either way, so its part of a split costs the same."""
    onnx, eager = (World(traces, SimConfig(accuracy_target=0.7, device_runtime=rt)) for rt in ("onnx", "torch"))
    r = traces["rapnet"]
    a, b = onnx.planners["rapnet"], eager.planners["rapnet"]
    last = r.costs.num_exits - 1
    stages = r.costs.exit_stages[last] + 1
    assert a.local_layers[last] == stages + 1 + 1  # stages, the head, the predictor
    assert b.local_layers[last] == sum(r.stage_layers[:stages]) + r.exit_layers[last] + r.predictor_layers
    assert a.local_flops.tolist() == b.local_flops.tolist()
    for k in range(r.costs.num_exits):
        assert [o[4:] for o in a.options[k]] == [o[4:] for o in b.options[k]]  # cloud FLOPs, calls and bytes
    c = Conditions(bandwidth_mbps=10, rtt_ms=10, device_gflops=2.0)
    assert (a.answer_ms(c) < b.answer_ms(c)).all()
    with pytest.raises(ValueError, match="unknown device runtime 'tpu'"):
        World(traces, SimConfig(accuracy_target=0.7, device_runtime="tpu"))


def test_offload_when_network_is_free_and_device_is_slow(world):
    res = world.run_all(Conditions(bandwidth_mbps=1e6, rtt_ms=0.1, device_gflops=0.05, cloud_gflops=1000))
    assert res["rapnet_split"].offload_share == 1.0
    assert res["rapnet_split"].mean_ms < res["rapnet_edge"].mean_ms
    res = world.run_all(Conditions(bandwidth_mbps=0.01, rtt_ms=200, device_gflops=50))
    assert res["rapnet_split"].offload_share == 0.0
    assert res["rapnet_split"].mean_ms == pytest.approx(res["rapnet_edge"].mean_ms)


def test_trace_cache_roundtrip(traces, tmp_path):
    path = tmp_path / "t.npz"
    save_traces(traces, path, {"key": "k"})
    loaded, meta = load_traces(path)
    assert meta == {"key": "k"}
    for name, t in traces.items():
        u = loaded[name]
        assert u.costs == t.costs and u.stage_layers == t.stage_layers
        assert (u.correct == t.correct).all() and (u.confidence == t.confidence).all()
        assert set(u.payload) == set(t.payload) and all((u.payload[k] == t.payload[k]).all() for k in t.payload)
        assert u.encode_ms == t.encode_ms


def test_payloads_are_real_serialized_sizes(traces):
    t = traces["rapnet"]
    assert set(k for k in t.payload if k[0] == 0) == {(0, "png"), (0, "raw+zstd"), (0, "jpeg")}
    assert all((v > 0).all() for v in t.payload.values())
    assert t.agreement[0, "raw+zstd"] == 1.0  # the pixels themselves: lossless
    # fp32 features are bigger than fp16 and int8 at the same split
    for s in range(1, len(t.costs.stage_flops)):
        assert t.payload[s, "fp32+zstd"].mean() > t.payload[s, "fp16+zstd"].mean() > t.payload[s, "int8+zstd"].mean()


def test_shaper_serialises_the_uplink_and_delays_both_ways():
    """rapnet-sim live's transport shaping: a 25 KB upload at 2 Mbit/s takes 100 ms on the wire, plus RTT/2
    each way before the echo comes back (loopback echo server, 127.0.0.1 only)."""
    import socket
    import threading
    import time

    from orchestration.live import Shaper

    server = socket.create_server(("127.0.0.1", 0))

    def echo():
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    echoing = threading.Thread(target=echo, daemon=True)
    echoing.start()
    shaper = Shaper(server.getsockname(), bandwidth_mbps=2.0, rtt_ms=40.0)
    try:
        payload = b"x" * 25_000
        with socket.create_connection(("127.0.0.1", shaper.port)) as client:
            started = time.perf_counter()
            client.sendall(payload)
            received = b""
            while len(received) < len(payload):
                received += client.recv(65536)
            elapsed_ms = (time.perf_counter() - started) * 1e3
        assert received == payload
        assert 100 + 40 - 5 <= elapsed_ms <= 100 + 40 + 150, elapsed_ms
    finally:
        shaper.close()
        server.close()
        echoing.join(5)
    assert not shaper.thread.is_alive() and not echoing.is_alive()


def test_cli_help(capsys):
    from orchestration.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "sweep" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["live", "--help"])
    assert e.value.code == 0
    assert "--frames" in capsys.readouterr().out


@pytest.mark.slow
def test_sweep_writes_only_under_out(world, tmp_path, monkeypatch):
    """Results and heatmaps all go into --out; nothing lands in the current folder or the source tree."""
    from orchestration import cli, simulator

    monkeypatch.setattr(simulator, "load_world", lambda *a, **k: (world, {"key": "synthetic"}))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    tree = Path(cli.__file__).resolve().parents[1]
    before = {p: p.stat().st_mtime_ns for p in (tree / "benchmarks" / "results").glob("*")}
    before.update({p: p.stat().st_mtime_ns for p in (tree / "docs").glob("*")})
    out = tmp_path / "out"
    cli.main(["sweep", "--bandwidth-mbps", "1 100", "--device-gflops", "0.5 20", "--rtt-ms", "10", "--out", str(out),
              "--no-progress"])
    written = sorted(p.name for p in out.iterdir())
    assert {"sweep.csv", "sweep.json", "sweep.md", "sim_latency_ratio.png"} <= set(written)
    assert all((out / name).stat().st_size > 0 for name in written)
    assert list(cwd.iterdir()) == []
    after = {p: p.stat().st_mtime_ns for p in before}
    assert after == before


# --- optional: the real cached traces --------------------------------------------------------------------
def _real_traces() -> Path | None:
    """A trace cache rapnet-sim built in the default cache folder, if any."""
    from rapnet.data import default_cache_dir

    return next(iter(sorted((default_cache_dir() / "sim-traces").glob("traces-*.npz"))), None)


REAL = _real_traces()


@pytest.mark.skipif(REAL is None, reason="no cached real traces (run rapnet-sim traces)")
def test_real_traces_accuracy_equals_offline_evaluation():
    traces, _ = load_traces(REAL)
    lossless = tuple(e for e in SimConfig.encodings if e != "jpeg")  # frames sent as JPEG answer from the JPEG view
    world = World(traces, SimConfig(encodings=lossless))
    results = world.run_all(Conditions(10, 20, 2.0))
    rap = next(p for p in priced_curve(_offline(traces["rapnet"]), traces["rapnet"].costs) if p["price"] == world.rapnet_price)
    sdn = next(p for p in sdn_curve(_offline(traces["sdn"]), traces["sdn"].costs) if p["threshold"] == world.sdn_threshold)
    assert results["rapnet_split"].accuracy == pytest.approx(rap["accuracy"], abs=1e-12)
    assert results["rapnet_split"].exit_histogram == rap["exit_histogram"]
    assert results["sdn_edge"].accuracy == pytest.approx(sdn["accuracy"], abs=1e-12)
    assert results["neurosurgeon"].accuracy == pytest.approx(traces["static"].correct.mean(), abs=1e-12)


def test_a_request_pays_for_its_framing_on_the_wire(traces):
    """The planner and the simulator charge gRPC and HTTP/2 framing on top of the serialized request: transfer time
    and the packet count that loss draws from."""
    from orchestration.planner import REQUEST_FRAMING_BYTES

    c = Conditions(bandwidth_mbps=8, rtt_ms=10, device_gflops=1.0, loss=0.5)
    net = Planner.network_ms(1000, c)
    assert net["transfer_ms"] == pytest.approx((1000 + REQUEST_FRAMING_BYTES) * 8 / 8000)
    assert net["retransmit_ms"] == pytest.approx((1 - 0.5 ** 2) * 200.0)  # one request packet + the answer
    # the simulator draws each request's own size and adds the same framing: on a quiet network (no jitter, loss or
    # queue) its mean latency is the planner's expectation (framing left out, they would differ by ~1.1 ms)
    w = World(traces, SimConfig(devices=1, fps=1.0, accuracy_target=0.7))
    quiet = Conditions(bandwidth_mbps=1, rtt_ms=5, device_gflops=1.0)
    t = w.static
    option = (0, "png", 0.0, 0.0, float(sum(t.costs.stage_flops) + t.costs.exit_flops[0]),
              float(sum(t.stage_layers) + t.exit_layers[0]), float(t.payload[0, "png"].mean()))
    expected = w.planners["static"].offload_parts(option, quiet)["total_ms"]
    assert w.run_policy("cloud_png", quiet).mean_ms == pytest.approx(expected, abs=0.05)


def test_raw_pixels_travel_when_encoding_time_outweighs_bytes():
    """raw+zstd: more bytes than PNG but cheap to encode, so it wins on a slow device with a fast link only."""
    costs = toy_costs()
    codec_ms = {(0, "png"): (0.11, 0.1), (0, "raw+zstd"): (0.017, 0.02)}
    planner = Planner(costs, {(0, "png"): 2100, (0, "raw+zstd"): 2700}, [0.6, 0.75, 0.85, 0.9], threshold=0.8,
                      encodings=("png", "raw+zstd"), codec_ms=codec_ms)
    slow_device = dict(rtt_ms=5, device_gflops=0.5, cloud_gflops=1000)
    assert planner.plan(SCORES, Conditions(bandwidth_mbps=100, **slow_device)).encoding == "raw+zstd"
    assert planner.plan(SCORES, Conditions(bandwidth_mbps=0.3, **slow_device)).encoding == "png"


def test_planner_for_model_from_sample_frames():
    from orchestration.calibration import planner_for_model
    from rapnet.build import build_model
    from rapnet.config import ModelConfig

    torch.manual_seed(0)
    model = build_model(ModelConfig(width=0.25)).eval()
    pixels = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    planner = planner_for_model(model, pixels, threshold=0.5)
    with torch.no_grad():
        scores = model.exit_scores(torch.zeros(1, 3, 32, 32)).numpy()[0]
    # the deepest exit on a very slow device, free network: offload
    slow = planner.plan(scores, Conditions(bandwidth_mbps=1e9, rtt_ms=0.0, device_gflops=0.01, accuracy_target=2.0))
    assert slow.exit_index == planner.costs.num_exits - 1
    assert slow.offload and slow.expected_latency_ms < planner.option_table(
        Conditions(bandwidth_mbps=1e9, rtt_ms=0.0, device_gflops=0.01)).local_latency[-1]
    assert not planner.plan(scores, Conditions(bandwidth_mbps=0.0, rtt_ms=10.0, device_gflops=1.0)).offload


def test_no_plan_sends_a_request_over_the_links_limit():
    """A (split, encoding) whose largest measured request is over the message limit is off the menu."""
    from orchestration.calibration import measure_payloads, planner_for_model
    from rapnet.build import build_model
    from rapnet.config import ModelConfig

    torch.manual_seed(0)
    model = build_model(ModelConfig(width=0.25)).eval()
    pixels = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    sizes, _, _, _ = measure_payloads(model, pixels)
    unlimited = planner_for_model(model, pixels, threshold=0.5)
    largest = max(option[-1] for options in unlimited.options for option in options)
    limit = int(sorted(int(v.max()) for v in sizes.values())[len(sizes) // 2])  # about half the menu fits
    limited = planner_for_model(model, pixels, threshold=0.5, max_request_bytes=limit)
    kept = {(o[0], o[1]) for options in limited.options for o in options}
    assert kept and largest > limit
    assert all(int(sizes[key].max()) <= limit for key in kept)
    assert {(o[0], o[1]) for options in unlimited.options for o in options} - kept  # something was left off
