"""rapnet-train and rapnet-eval end to end on a small generated ImageFolder dataset (a smoke run)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from rapnet import evaluate, exit_rules, exit_traces, train
from rapnet.checkpoint import CheckpointError, load_model
from rapnet.data import load_dataset, train_val_split

CLASSES = ("red", "green", "blue")


def _write_split(root: Path, split: str, per_class: int, rng: np.random.Generator) -> None:
    for c, name in enumerate(CLASSES):
        folder = root / split / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            image = rng.integers(0, 120, (32, 32, 3), dtype=np.uint8)  # every image unique
            image[..., 2 - c] += 120  # OpenCV writes BGR: class c is bright in RGB channel c
            cv2.imwrite(str(folder / f"{i:03d}.png"), image)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> dict:
    """One smoke training of all three kinds (seconds of CPU): the tests that use it are marked slow."""
    root = tmp_path_factory.mktemp("smoke")
    rng = np.random.default_rng(0)
    data = root / "data"
    _write_split(data, "train", 100, rng)
    _write_split(data, "test", 20, rng)
    argv = ["--data", str(data), "--cache-dir", str(root / "cache"), "--out", str(root / "run"), "--width", "0.25",
            "--epochs", "1", "--predictor-epochs", "2", "--batch-size", "64", "--val-size", "90", "--threads", "1"]
    fitted: list[np.ndarray] = []
    real_train_predictor = train.train_predictor

    def recording_train_predictor(model, fit, cfg, device, log):
        fitted.append(fit.pixels(slice(None), torch.device("cpu")).numpy().copy())
        return real_train_predictor(model, fit, cfg, device, log)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "train_predictor", recording_train_predictor)
        started = time.perf_counter()
        train.main(argv)
        seconds = time.perf_counter() - started
    return {"root": root, "data": data, "run": root / "run", "argv": argv, "seconds": seconds, "fitted": fitted}


@pytest.mark.slow
def test_smoke_training_is_quick_and_loads(smoke_run) -> None:
    assert smoke_run["seconds"] < 60, f"smoke training took {smoke_run['seconds']:.0f} s"
    for kind in ("rapnet", "sdn", "static"):
        model, meta = load_model(smoke_run["run"] / f"{kind}.pt")
        assert model.config.kind == kind and model.config.num_classes == len(CLASSES)
        assert meta["split"]["predictor_split"] == "random" and meta["split"]["val"] == 90
        assert (model.predictor is not None) == (kind == "rapnet")


@pytest.mark.slow
def test_predictor_fitted_on_validation_images_only(smoke_run) -> None:
    dataset = load_dataset(smoke_run["data"], "train", cache_dir=smoke_run["root"] / "cache")
    train_idx, val_idx = train_val_split(len(dataset), 90, seed=0)
    as_bytes = lambda images: {image.tobytes() for image in images}  # noqa: E731
    (fit_images,) = smoke_run["fitted"]
    fit = as_bytes(fit_images)
    assert len(fit) == 72  # 80% of the validation split
    assert fit <= as_bytes(dataset.images[val_idx])
    assert not fit & as_bytes(dataset.images[train_idx])
    cal_idx = exit_traces.calibration_indices(len(dataset), load_model(smoke_run["run"] / "rapnet.pt")[1], has_predictor=True)
    assert len(cal_idx) == 18 and not as_bytes(dataset.images[cal_idx]) & fit
    assert len(set(dataset.labels[cal_idx])) == len(CLASSES)  # calibration sees every class


@pytest.mark.slow
def test_smoke_checkpoint_evaluates(smoke_run, tmp_path: Path) -> None:
    evaluate.main(["--checkpoint", str(smoke_run["run"] / "rapnet.pt"), "--data", str(smoke_run["data"]),
                   "--cache-dir", str(smoke_run["root"] / "cache"), "--out", str(tmp_path), "--latency-images", "2",
                   "--latency-repeats", "1", "--threads", "1"])
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["dataset"]["test_images"] == 60 and report["dataset"]["calibration_images"] == 18
    assert {"rapnet", "rapnet_capped", "sdn", "static", "oracle"} <= set(report["curves"])
    capped = report["latency_batch1"]["operating_settings"].get("rapnet_capped")
    assert capped is None or set(capped) == {"price", "threshold"}
    assert (tmp_path / "eval.png").stat().st_size > 0 and (tmp_path / "eval.md").exists()
    claim = report["sdn_claim"]
    assert claim["holds"] == (claim["compute_saved"] > 0.5)
    assert claim["accuracy"] >= claim["last_exit_accuracy"] - claim["tolerance"]
    assert len(report["exit_flops_fraction"]["sdn"]) == len(report["per_exit_test_accuracy"]["sdn"])
    assert report["peak_rss_mib"] > 0


@pytest.mark.slow
def test_predictor_refit_keeps_the_backbone(smoke_run, tmp_path: Path) -> None:
    before, old_meta = load_model(smoke_run["run"] / "rapnet.pt")
    train.main(["--predictor-only", str(smoke_run["run"] / "rapnet.pt"), "--out", str(tmp_path), "--data",
                str(smoke_run["data"]), "--cache-dir", str(smoke_run["root"] / "cache"), "--predictor-epochs", "1",
                "--threads", "1"])
    after, meta = load_model(tmp_path / "rapnet.pt")
    assert meta["identity"] != old_meta["identity"]
    assert meta["predictor_refit"]["previous_identity"] == old_meta["identity"]
    assert meta["split"]["predictor_split"] == "random" and meta["train_config"] == old_meta["train_config"]
    old_state, new_state = before.state_dict(), after.state_dict()
    backbone = [k for k in old_state if not k.startswith("predictor.")]
    assert backbone and all(torch.equal(old_state[k], new_state[k]) for k in backbone)
    assert any(not torch.equal(old_state[k], new_state[k]) for k in old_state if k.startswith("predictor."))


@pytest.mark.slow
def test_refit_refuses_a_network_without_predictor(smoke_run, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="only a RAPNet checkpoint"):
        train.main(["--predictor-only", str(smoke_run["run"] / "sdn.pt"), "--out", str(tmp_path),
                    "--data", str(smoke_run["data"]), "--cache-dir", str(smoke_run["root"] / "cache")])


@pytest.mark.slow
def test_teacher_distils_every_exit_and_is_recorded(smoke_run, tmp_path: Path) -> None:
    teacher = smoke_run["run"] / "static.pt"
    argv = list(smoke_run["argv"])
    argv[argv.index("--out") + 1] = str(tmp_path)
    train.main([*argv, "--models", "rapnet", "--predictor-epochs", "0", "--teacher", str(teacher)])
    _, meta = load_model(tmp_path / "rapnet.pt")
    assert meta["teacher_identity"] == load_model(teacher)[1]["identity"]
    assert meta["train_config"]["teacher"] == str(teacher)


@pytest.mark.slow
def test_a_teacher_from_another_split_is_refused(smoke_run, tmp_path: Path) -> None:
    argv = list(smoke_run["argv"])
    argv[argv.index("--out") + 1] = str(tmp_path)
    argv[argv.index("--val-size") + 1] = "60"  # other validation images: the teacher may have trained on them
    with pytest.raises(SystemExit, match="training part must be this run's"):
        train.main([*argv, "--models", "rapnet", "--teacher", str(smoke_run["run"] / "static.pt")])


def test_teacher_loss_pulls_the_last_exit_towards_the_teacher() -> None:
    cfg = train.TrainConfig()
    labels = torch.tensor([0, 1])
    outputs = [torch.tensor([[2.0, 0.0], [0.0, 2.0]]) for _ in range(3)]
    self_distilled = train.multi_exit_loss(outputs, labels, cfg)
    agreeing = train.multi_exit_loss(outputs, labels, cfg, teacher_logits=outputs[-1].clone())
    disagreeing = train.multi_exit_loss(outputs, labels, cfg, teacher_logits=-outputs[-1])
    # a teacher equal to the last exit gives the early exits the same targets; the last exit's own term is then
    # its cross-entropy at the distillation mix's share (its distillation term is zero)
    last_ce = torch.nn.functional.cross_entropy(outputs[-1], labels)
    assert torch.isclose(agreeing, self_distilled - cfg.distill_weight * last_ce)
    last = outputs[-1].clone().requires_grad_(True)
    train.multi_exit_loss([*outputs[:-1], last], labels, cfg, teacher_logits=-outputs[-1]).backward()
    assert disagreeing > agreeing and last.grad[0, 1] < 0  # the last exit is pushed towards the teacher's class


def test_a_predictor_fitted_on_a_class_sorted_slice_is_refused() -> None:
    sliced = {"seed": 0, "split": {"val": 90, "predictor_fit": 72}}  # no "predictor_split": "random" in the metadata
    with pytest.raises(CheckpointError, match="--predictor-only"):
        exit_traces.calibration_indices(300, sliced, has_predictor=True)
    assert len(exit_traces.calibration_indices(300, sliced, has_predictor=False)) == 18  # SDN / static: any part is unseen


def test_early_exit_trunk_gradient_is_scaled_and_the_forward_pass_is_not() -> None:
    from rapnet.build import build_model
    from rapnet.config import ModelConfig

    torch.manual_seed(0)
    model = build_model(ModelConfig(width=0.25)).eval()
    image = torch.randn(2, 3, 32, 32)

    def early_exit_gradients(share: float):
        model.zero_grad()
        hooks = train._scale_trunk_gradient(model, share)
        outputs = model(image)
        sum(o.sum() for o in outputs[:-1]).backward()  # only the early exits' losses
        for handle in hooks:
            handle.remove()
        trunk = next(model.stages[0].parameters()).grad.norm().item()
        head = next(model.exits[0].parameters()).grad.norm().item()
        return [o.detach() for o in outputs], trunk, head

    plain, trunk_plain, head_plain = early_exit_gradients(1.0)
    scaled, trunk_scaled, head_scaled = early_exit_gradients(0.25)
    assert all(torch.equal(a, b) for a, b in zip(plain, scaled))
    assert trunk_scaled == pytest.approx(0.25 * trunk_plain, rel=1e-4)
    assert head_scaled == pytest.approx(head_plain, rel=1e-6)
    assert not model.exits[0]._forward_pre_hooks  # training leaves no hooks behind


def test_capped_rule_stops_early_only_up_to_the_priced_exit() -> None:
    scores = np.array([[0.9, 0.9, 0.95], [0.1, 0.2, 0.9], [0.1, 0.2, 0.9]])
    confidence = np.array([[0.2, 0.99, 0.99], [0.2, 0.99, 0.99], [0.2, 0.3, 0.4]])
    relative = np.array([0.1, 0.5, 1.0])
    caps = exit_rules.priced_exits(scores, 0.5, relative)
    assert caps.tolist() == [0, 2, 2]
    exits = exit_rules.capped_exits(scores, confidence, 0.5, 0.95, relative)
    # sample 0: capped at exit 0 though exit 1 would be confident; 1: stops early at 1; 2: nothing confident
    assert exits.tolist() == [0, 1, 2]
    assert (exit_rules.capped_exits(scores, confidence, 0.5, 1.01, relative) == caps).all()


@pytest.mark.slow
def test_teacher_static_trains_the_static_network_first_and_distils_from_it(tmp_path) -> None:
    rng = np.random.default_rng(1)
    data = tmp_path / "data"
    _write_split(data, "train", 40, rng)
    argv = ["--data", str(data), "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run"), "--width", "0.25",
            "--epochs", "1", "--predictor-epochs", "1", "--batch-size", "32", "--val-size", "30", "--threads", "1",
            "--models", "sdn,static", "--teacher", "static"]
    train.main(argv)
    _, static_meta = load_model(tmp_path / "run" / "static.pt")
    _, sdn_meta = load_model(tmp_path / "run" / "sdn.pt")
    assert static_meta["teacher_identity"] is None
    assert sdn_meta["teacher_identity"] == static_meta["identity"]
    # a later run without static in --models takes the run's static.pt as its teacher
    train.main([*argv[:-4], "--models", "rapnet", "--teacher", "static"])
    _, rapnet_meta = load_model(tmp_path / "run" / "rapnet.pt")
    assert rapnet_meta["teacher_identity"] == static_meta["identity"]


def test_teacher_static_without_a_static_network_says_how_to_get_one(tmp_path) -> None:
    data = tmp_path / "data"
    _write_split(data, "train", 4, np.random.default_rng(2))
    with pytest.raises(SystemExit, match="add static to --models"):
        train.main(["--data", str(data), "--out", str(tmp_path / "run"), "--models", "rapnet", "--teacher", "static"])


def test_a_split_reads_its_rows_from_the_memory_mapped_cache(tmp_path) -> None:
    rng = np.random.default_rng(3)
    data = tmp_path / "data"
    _write_split(data, "train", 4, rng)
    dataset = load_dataset(data, "train", cache_dir=tmp_path / "cache")
    assert isinstance(dataset.images, np.memmap)
    rows = np.array([5, 0, 7])
    split = train._to_split(dataset.images, dataset.labels, rows, torch.device("cpu"))
    assert split.images is dataset.images  # nothing copied up front
    np.testing.assert_array_equal(split.pixels(torch.tensor([2, 0]), torch.device("cpu")).numpy(), dataset.images[[7, 5]])
    assert split.labels.tolist() == dataset.labels[rows].tolist()


def test_every_confidence_grid_reaches_close_to_one() -> None:
    """Softmax confidences saturate: the grids step through 1 - 10^-k before 1, so a confidence rule can keep
    its last exit's accuracy short of always running it."""
    stops = sorted({t for _, t in exit_rules.CAPPED_GRID})
    for grid in (exit_rules.THRESHOLDS.tolist(), stops):
        assert grid == sorted(grid) and grid[-1] == 1.0
        for k in range(3, 7):
            assert any(abs(t - (1 - 10.0 ** -k)) < 1e-12 for t in grid), (k, grid[-6:])


def test_sdn_claim_takes_the_cheapest_point_within_the_tolerance_of_the_last_exit() -> None:
    correct = np.array([[True, True], [False, True], [True, True], [True, False]])  # last exit: 75%
    traces = exit_traces.Traces(scores=np.zeros((4, 2)), confidence=np.zeros((4, 2)), correct=correct)
    curve = [{"threshold": 0.5, "accuracy": 0.70, "mean_flops": 30.0},  # too far below the last exit
             {"threshold": 0.9, "accuracy": 0.748, "mean_flops": 45.0},
             {"threshold": 1.0, "accuracy": 0.75, "mean_flops": 100.0}]
    claim = evaluate.sdn_claim(curve, traces, full_cost=100.0)
    assert claim["threshold"] == 0.9 and abs(claim["compute_saved"] - 0.55) < 1e-9 and claim["holds"]
    assert not evaluate.sdn_claim(curve[1:2] + curve[2:], traces, full_cost=80.0)["holds"]
