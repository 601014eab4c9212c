"""rapnet-train: train RAPNet (exits jointly, then the exit predictor), the SDN baseline and the static network
with one recipe, so the comparison is fair.

Recipe (ours): SGD + Nesterov, one-cycle cosine schedule, augmentation by input size (rapnet.preprocess.augment:
pad-and-crop and flip for the CIFAR layout at up to 64 px, random-resized-crop and flip above), weighted multi-exit loss
with self-distillation from the last exit to the earlier ones. The exit predictor is then trained on the
validation split only, with labels (per-sample, per-exit correctness) computed by the frozen network on
augmented views of those validation images.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from .build import build_model
from .checkpoint import CheckpointError, InputContract, check_classes, load_model, save_checkpoint
from .config import FUSION_STRIDES, LAYOUTS, ModelConfig
from .data import (
    RANDOM_PREDICTOR_SPLIT, DatasetError, MixedSizesError, load_dataset, locate_dataset, predictor_calibration_split,
    sha256_of_file, train_val_split,
)
from .help_format import DefaultsHelpFormatter
from .machine import git_state
from .network import MultiExitNetwork
from .preprocess import augment, to_model_input


IN_RUN_TEACHER = "static"  # --teacher value: distil from this run's own static network


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1  # peak learning rate at batch 128; scaled linearly with the batch size
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.05
    distill_weight: float = 0.5  # share of the early exits' loss that comes from the last exit's soft labels
    distill_temperature: float = 3.0
    # Share of the early exits' gradient that reaches the shared trunk (their heads always learn at full rate).
    # 1.0 is plain joint training; lower keeps the early exits from pulling the trunk away from the last exit.
    early_exit_trunk_grad: float = 1.0
    predictor_epochs: int = 60
    predictor_lr: float = 0.01
    val_size: int = 5000  # held out from the training set; thresholds and the predictor live on it
    predictor_fit_share: float = 0.8  # of the validation split: the rest calibrates thresholds
    seed: int = 0
    limit_train: int = 0  # smoke runs: use only this many training images (0 = all)
    teacher: str = ""  # checkpoint whose last exit supplies every exit's soft labels ("": the last exit's own)


def exit_weights(num_exits: int) -> list[float]:
    """Deeper exits weigh more (SDN's intuition); the last exit always weighs 1."""
    if num_exits == 1:
        return [1.0]
    return [0.3 + 0.7 * k / (num_exits - 1) for k in range(num_exits)]


def multi_exit_loss(outputs: list[torch.Tensor], labels: torch.Tensor, cfg: TrainConfig,
                    teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted cross-entropy over the exits, mixed with distillation: from the last exit into the earlier ones,
    or, given a teacher's logits, from the teacher into every exit (the last one included)."""
    weights = exit_weights(len(outputs))
    t = cfg.distill_temperature
    source = outputs[-1] if teacher_logits is None else teacher_logits
    soft_target = F.softmax(source.detach().float() / t, dim=1)
    students = outputs[:-1] if teacher_logits is None else outputs
    loss = F.cross_entropy(outputs[-1], labels) if teacher_logits is None else 0.0
    for w, logits in zip(weights, students):
        ce = F.cross_entropy(logits, labels)
        kd = F.kl_div(F.log_softmax(logits.float() / t, dim=1), soft_target, reduction="batchmean") * t * t
        loss = loss + w * ((1 - cfg.distill_weight) * ce + cfg.distill_weight * kd)
    return loss


def _scale_trunk_gradient(model: MultiExitNetwork, share: float) -> list:
    """Hooks that hand each early exit head its features unchanged in the forward pass but pass only `share`
    of its gradient back into the trunk; remove them with `handle.remove()`."""
    def hook(_module, args):
        features = args[0]
        return (features * share + features.detach() * (1.0 - share),)
    return [head.register_forward_pre_hook(hook) for head in list(model.exits)[:-1]] if share != 1.0 else []


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _one_cycle(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def peak_rss_mib() -> int:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


@dataclass
class Split:
    """Some rows of a dataset's uint8 NHWC image array. The array stays where it is (memory-mapped from the decode
    cache), so a batch reads only its own images and training memory does not grow with the dataset."""
    images: np.ndarray | torch.Tensor  # the whole source array
    labels: torch.Tensor  # the split's labels, on the training device
    rows: np.ndarray | None = None  # the split's rows of `images` (None: all of them)

    def __len__(self) -> int:
        return len(self.labels)

    def pixels(self, positions: torch.Tensor | slice, device: torch.device) -> torch.Tensor:
        """uint8 NHWC images at these positions of the split, on `device`."""
        if isinstance(positions, torch.Tensor):
            positions = positions.cpu().numpy()
        rows = np.arange(len(self))[positions] if self.rows is None else self.rows[positions]
        batch = self.images[rows]
        return (batch if isinstance(batch, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(batch))).to(device)


def _to_split(images: np.ndarray, labels: np.ndarray, rows: np.ndarray, device: torch.device) -> Split:
    return Split(images, torch.from_numpy(labels[rows]).long().to(device), np.asarray(rows))


def _batches(n: int, batch_size: int, generator: torch.Generator | None, drop_last: bool):
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for i in range(0, stop, batch_size):
        yield order[i : i + batch_size]


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def exit_logits(model: MultiExitNetwork, split: Split, device: torch.device, batch_size: int = 250) -> torch.Tensor:
    """(N, exits, classes) logits of every exit on a split's images, no augmentation."""
    model.eval()
    out = []
    for i in range(0, len(split), batch_size):
        x = to_model_input(split.pixels(slice(i, i + batch_size), device)).contiguous(memory_format=torch.channels_last)
        with _autocast(device):
            out.append(torch.stack(model(x), dim=1).float().cpu())
    return torch.cat(out)


def train_network(
    model: MultiExitNetwork, train: Split, val: Split, cfg: TrainConfig, device: torch.device, state_path: Path, log: list,
    teacher: MultiExitNetwork | None = None, classes: list[str] | None = None,
) -> None:
    """Joint multi-exit training with resumable per-epoch state. A teacher (frozen, eval mode) sees the same
    augmented batch as the student, so its soft labels match the view being learned. `classes` (the dataset's
    ordered class names) go into the state, and a resumed state trained on other classes is refused."""
    model.to(device).to(memory_format=torch.channels_last)
    steps_per_epoch = len(train) // cfg.batch_size if len(train) >= cfg.batch_size else 1
    total_steps = cfg.epochs * steps_per_epoch
    peak_lr = cfg.lr * cfg.batch_size / 128
    optimizer = torch.optim.SGD(_param_groups(model, cfg.weight_decay), lr=peak_lr, momentum=0.9, nesterov=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _one_cycle(step, total_steps, max(1, int(cfg.warmup_fraction * total_steps)))
    )
    start_epoch = 0
    if state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=True)
        if classes is not None and "classes" in state:
            check_classes(json.loads(state["classes"]), classes, model=f"the interrupted run in {state_path}",
                          data="this run's dataset")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"])
        log.extend(json.loads(state["log"]))
        print(f"resuming {state_path.name} at epoch {start_epoch}/{cfg.epochs}")
    hooks = _scale_trunk_gradient(model, cfg.early_exit_trunk_grad)
    if teacher is not None:
        teacher.to(device).to(memory_format=torch.channels_last).eval().requires_grad_(False)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        generator = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        aug_gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + epoch)
        started = time.time()
        seen, correct, loss_sum = 0, 0, 0.0
        bar = tqdm(
            _batches(len(train), cfg.batch_size, generator, drop_last=True),
            total=steps_per_epoch, desc=f"{model.config.kind} epoch {epoch + 1}/{cfg.epochs}", leave=False,
            mininterval=2.0, disable=None,
        )
        for idx in bar:
            x = augment(to_model_input(train.pixels(idx, device)), model.config.layout, aug_gen).contiguous(memory_format=torch.channels_last)
            y = train.labels[idx.to(device)]
            with _autocast(device):
                with torch.no_grad():
                    teacher_logits = teacher(x)[-1] if teacher is not None else None
                outputs = model(x)
                loss = multi_exit_loss(outputs, y, cfg, teacher_logits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            seen += len(y)
            loss_sum += float(loss.detach()) * len(y) if device.type == "cpu" else 0.0
            correct += int((outputs[-1].argmax(1) == y).sum()) if device.type == "cpu" else 0
            if device.type == "cpu":
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        val_acc = (exit_logits(model, val, device).argmax(2) == val.labels.cpu()[:, None]).float().mean(0)
        entry = {
            "model": model.config.kind, "epoch": epoch + 1, "seconds": round(time.time() - started, 2),
            "lr": optimizer.param_groups[0]["lr"], "val_acc_per_exit": [round(float(a), 4) for a in val_acc],
            "peak_rss_mib": peak_rss_mib(),
        }
        log.append(entry)
        print(json.dumps(entry), flush=True)
        torch.save(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "epoch": epoch + 1, "log": json.dumps(log), **({"classes": json.dumps(classes)} if classes is not None else {})},
            state_path.with_suffix(".tmp"),
        )
        os.replace(state_path.with_suffix(".tmp"), state_path)
    for handle in hooks:
        handle.remove()


def correctness_matrix(model: MultiExitNetwork, split: Split, device: torch.device) -> torch.Tensor:
    """(N, exits) bool: does exit k classify sample i correctly (the predictor's labels, EENet-style)."""
    return exit_logits(model, split, device).argmax(2) == split.labels.cpu()[:, None]


def train_predictor(model: MultiExitNetwork, fit: Split, cfg: TrainConfig, device: torch.device, log: list) -> None:
    """Fit the exit predictor on validation images only; the backbone stays frozen and labels each augmented
    view itself, so the predictor sees many more (image, correctness) pairs than there are images."""
    assert model.predictor is not None
    model.to(device).eval()
    predictor = model.predictor.train()
    optimizer = torch.optim.AdamW(predictor.parameters(), lr=cfg.predictor_lr, weight_decay=1e-4)
    batch = min(256, len(fit.labels))
    steps = cfg.predictor_epochs * max(1, len(fit.labels) // batch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _one_cycle(s, steps, max(1, steps // 20)))
    generator = torch.Generator().manual_seed(cfg.seed + 17)
    aug_gen = torch.Generator(device=device).manual_seed(cfg.seed + 17)
    bar = tqdm(range(cfg.predictor_epochs), desc="predictor", leave=False, mininterval=2.0, disable=None)
    for epoch in bar:
        loss_sum, seen = 0.0, 0
        for idx in _batches(len(fit.labels), batch, generator, drop_last=True):
            x = augment(to_model_input(fit.pixels(idx, device)), model.config.layout, aug_gen).contiguous(memory_format=torch.channels_last)
            with torch.no_grad(), _autocast(device):
                targets = (torch.stack([o.argmax(1) for o in model(x)], 1) == fit.labels[idx.to(device)][:, None]).float()
            with _autocast(device):
                loss = F.binary_cross_entropy_with_logits(predictor(x).float(), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss.detach()) * len(idx)
            seen += len(idx)
        bar.set_postfix(bce=f"{loss_sum / max(1, seen):.4f}")
        if (epoch + 1) % 10 == 0 or epoch + 1 == cfg.predictor_epochs:
            entry = {"model": "predictor", "epoch": epoch + 1, "bce": round(loss_sum / max(1, seen), 4)}
            log.append(entry)
            print(json.dumps(entry), flush=True)
    model.eval()


def dataset_parts(dataset, cfg: TrainConfig):
    """The recipe's view of the training archive: (dataset, cut to --limit-train images plus the validation
    split when asked; train, validation and predictor-fit indices). The one place these parts are drawn."""
    if cfg.limit_train:
        keep = np.random.default_rng(cfg.seed).permutation(len(dataset))[: cfg.limit_train + cfg.val_size]
        dataset = dataset.subset(np.sort(keep))
    train_idx, val_idx = train_val_split(len(dataset), cfg.val_size, seed=cfg.seed)
    fit_idx, _ = predictor_calibration_split(val_idx, int(len(val_idx) * cfg.predictor_fit_share), seed=cfg.seed)
    return dataset, train_idx, val_idx, fit_idx


def _load_teacher(path: str, cfg: TrainConfig) -> tuple[MultiExitNetwork, str, tuple[str, ...]]:
    """A teacher must have been trained on this run's training part only: had it seen the validation images,
    its soft labels would leak into the exits and the calibration accuracies would read high."""
    teacher, metadata = load_model(path)
    trained = (metadata.get("seed"), metadata.get("split", {}).get("val"), metadata.get("train_config", {}).get("limit_train", 0))
    if trained != (cfg.seed, cfg.val_size, cfg.limit_train):
        raise SystemExit(f"rapnet-train: teacher {path} was trained with (seed, validation size, limit) {trained}, this run "
                         f"uses {(cfg.seed, cfg.val_size, cfg.limit_train)}; its training part must be this run's, so "
                         "train the teacher with the same --seed, --val-size and --limit-train")
    return teacher, metadata["identity"], InputContract.of(teacher.config, metadata, path).class_names


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch sees no CUDA device: use --device cpu")
    if not 0.0 <= args.early_exit_trunk_grad <= 1.0:
        raise SystemExit(f"--early-exit-trunk-grad {args.early_exit_trunk_grad} is outside 0..1 (1: plain joint training)")
    cfg = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, predictor_epochs=args.predictor_epochs,
        val_size=args.val_size, seed=args.seed, limit_train=args.limit_train,
        early_exit_trunk_grad=args.early_exit_trunk_grad, teacher=args.teacher or "",
    )
    if args.image_size is not None:
        _model_config(args, "static", 10, args.image_size)  # refuse a size the layout cannot take before loading data
    # --teacher static: this run's own static network teaches the others, so it trains first
    static_teaches = args.teacher == IN_RUN_TEACHER
    kinds = sorted(args.models, key=lambda kind: kind != "static") if static_teaches else list(args.models)
    teacher_path = str(Path(args.out) / "static.pt") if static_teaches else args.teacher
    if static_teaches and "static" not in kinds and not Path(teacher_path).exists():
        raise SystemExit(f"rapnet-train: --teacher static distils from this run's static network, but --models has no "
                         f"static and {teacher_path} does not exist: add static to --models")
    loads_teacher = bool(args.teacher) and not (static_teaches and "static" in kinds)
    teacher, teacher_identity, teacher_classes = _load_teacher(teacher_path, cfg) if loads_teacher else (None, None, None)
    data_path = locate_dataset(args.data, args.dataset)
    dataset = load_dataset(data_path, "train", image_size=args.image_size, cache_dir=args.cache_dir, progress=True)
    dataset, train_idx, val_idx, fit_idx = dataset_parts(dataset, cfg)
    n_fit = len(fit_idx)
    train = _to_split(dataset.images, dataset.labels, train_idx, device)
    val = _to_split(dataset.images, dataset.labels, val_idx, device)
    fit = _to_split(dataset.images, dataset.labels, fit_idx, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    image_size = int(dataset.images.shape[1])
    if teacher is not None and teacher.config.image_size != image_size:
        raise SystemExit(f"rapnet-train: teacher {teacher_path} takes {teacher.config.image_size} px images, this run "
                         f"trains at {image_size} px: pass --image-size {teacher.config.image_size} or another teacher")
    if teacher is not None:
        check_classes(teacher_classes, dataset.classes, model=f"teacher {teacher_path}", data=str(data_path))
    metadata_common = {
        "command": " ".join(["rapnet-train", *sys.argv[1:]]), "git_commit": git_state().get("git_commit", "unknown"), "seed": args.seed,
        "data": str(data_path), "data_sha256": sha256_of_file(data_path) if data_path.is_file() else "directory",
        "train_config": asdict(cfg), "device": str(device),
        "split": {"train": len(train_idx), "val": len(val_idx), "predictor_fit": n_fit, "calibration": len(val_idx) - n_fit,
                  "predictor_split": RANDOM_PREDICTOR_SPLIT},
    }
    results = {}
    for kind in kinds:
        config = _model_config(args, kind, len(dataset.classes), image_size)
        torch.manual_seed(args.seed)
        model = build_model(config)
        log: list = []
        started = time.time()
        own_teacher = None if static_teaches and kind == "static" else teacher
        train_network(model, train, val, cfg, device, out / f"{kind}.state.pt", log, own_teacher, list(dataset.classes))
        if kind == "rapnet" and cfg.predictor_epochs > 0:
            train_predictor(model, fit, cfg, device, log)
        model.cpu().to(memory_format=torch.contiguous_format)
        val_correct = correctness_matrix(model, _to_split(dataset.images, dataset.labels, val_idx, torch.device("cpu")), torch.device("cpu"))
        metadata = {**metadata_common, "teacher_identity": teacher_identity if own_teacher is not None else None,
                    "classes": dataset.classes, "train_seconds": round(time.time() - started, 1),
                    "val_acc_per_exit": [round(float(a), 4) for a in val_correct.float().mean(0)], "log": log}
        identity = save_checkpoint(out / f"{kind}.pt", model, metadata)
        results[kind] = {"checkpoint": str(out / f"{kind}.pt"), "identity": identity, "val_acc_per_exit": metadata["val_acc_per_exit"]}
        print(json.dumps({"done": kind, **results[kind]}), flush=True)
        if static_teaches and kind == "static":
            teacher, teacher_identity = model, identity
    return results


def _model_config(args: argparse.Namespace, kind: str, num_classes: int, image_size: int) -> ModelConfig:
    try:
        return ModelConfig(arch=args.arch, kind=kind, width=args.width, num_classes=num_classes, image_size=image_size,
                           fusion_stride=args.fusion_stride, layout=args.layout)
    except ValueError as err:
        raise SystemExit(f"rapnet-train: {err}") from None


def refit_predictor(args: argparse.Namespace) -> dict:
    """Fit a trained RAPNet checkpoint's exit predictor again from scratch; backbone and exits stay as they are.

    The split (train / validation / the predictor's part) is rebuilt from the checkpoint's own seed and sizes, so
    the backbone's held-out images stay held out.
    """
    path = Path(args.predictor_only)
    model, meta = load_model(path)
    if model.predictor is None:
        raise CheckpointError(f"{path} holds a {model.config.kind} model: only a RAPNet checkpoint has an exit predictor")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    trained = {k: v for k, v in meta.get("train_config", {}).items() if k in TrainConfig.__dataclass_fields__}
    cfg = TrainConfig(**{**trained, "predictor_epochs": args.predictor_epochs})
    data_path = locate_dataset(args.data, args.dataset)
    digest = sha256_of_file(data_path) if data_path.is_file() else "directory"
    if meta.get("data_sha256") not in (None, digest):
        raise DatasetError(f"{data_path} is not the archive {path} was trained on (sha256 {digest[:12]}, the checkpoint "
                           f"says {meta['data_sha256'][:12]}): pass --data with the training archive")
    contract = InputContract.of(model.config, meta, str(path))
    if args.image_size is not None and args.image_size != contract.image_size:
        raise DatasetError(f"{path} takes {contract.image_size} px images, not the --image-size {args.image_size} "
                           f"asked for: leave --image-size out, the images are fitted to the checkpoint's size")
    dataset = load_dataset(data_path, "train", image_size=contract.image_size, cache_dir=args.cache_dir, progress=True)
    contract.check_classes(dataset.classes, data=str(data_path), model=str(path))
    dataset, _, val_idx, fit_idx = dataset_parts(dataset, cfg)
    n_fit = len(fit_idx)
    torch.manual_seed(cfg.seed)
    model.predictor.load_state_dict(build_model(model.config).predictor.state_dict())  # a fresh start, same init
    log: list = []
    started = time.time()
    train_predictor(model, _to_split(dataset.images, dataset.labels, fit_idx, device), cfg, device, log)
    model.cpu().to(memory_format=torch.contiguous_format)
    metadata = {k: v for k, v in meta.items() if k != "identity"}
    metadata["split"] = {**meta.get("split", {}), "predictor_fit": n_fit, "calibration": len(val_idx) - n_fit,
                         "predictor_split": RANDOM_PREDICTOR_SPLIT}
    metadata["predictor_refit"] = {
        "command": " ".join(["rapnet-train", *sys.argv[1:]]), "git_commit": git_state().get("git_commit", "unknown"), "device": str(device),
        "predictor_epochs": cfg.predictor_epochs, "seconds": round(time.time() - started, 1), "log": log,
        "previous_identity": meta["identity"],
    }
    out = Path(args.out)
    identity = save_checkpoint(out / "rapnet.pt", model, metadata)
    result = {"checkpoint": str(out / "rapnet.pt"), "identity": identity, "seconds": metadata["predictor_refit"]["seconds"]}
    print(json.dumps({"done": "predictor", **result}), flush=True)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rapnet-train",
        description="Train RAPNet (exits + exit predictor), the SDN baseline and the static network with one recipe.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--data", help="dataset archive or folder (default: $RAPNET_DATA, else rapnet.data's search: "
                                  "../shared/datasets, ~/.cache/rapnet/datasets, ./data)")
    p.add_argument("--dataset", default="cifar10", help="dataset name used by the default search")
    p.add_argument("--cache-dir", default=None, help="decoded-image cache (default: $RAPNET_CACHE, else ~/.cache/rapnet)")
    p.add_argument("--out", default="runs/cifar10", help="folder for checkpoints, resumable state and logs (relative to the current folder)")
    p.add_argument("--models", type=lambda s: s.split(","), default="rapnet,sdn,static",
                   help="comma-separated kinds to train: rapnet,sdn,static")
    p.add_argument("--arch", default="mobilenetv2", choices=["mobilenetv2", "resnet"], help="backbone")
    p.add_argument("--width", type=float, default=0.5, help="channel width multiplier")
    p.add_argument("--fusion-stride", type=int, default=ModelConfig.fusion_stride, choices=FUSION_STRIDES,
                   help="RAPNet: where the low- and high-resolution paths meet, as the backbone's stride there in the "
                        "cifar layout (the imagenet layout meets after the same stage, on a 4x coarser grid)")
    p.add_argument("--layout", default=ModelConfig.layout, choices=LAYOUTS,
                   help="backbone stride schedule: cifar (stride-1 stem and 24-channel stage, for 32-64 px images) or "
                        "imagenet (the standard MobileNetV2 / ResNet-18 schedule, for 128-320 px camera frames)")
    p.add_argument("--image-size", type=int, default=None, metavar="N",
                   help="resize (shorter side, then centre crop) the training images to N x N px (default: the dataset's "
                        "own size; with --predictor-only, the checkpoint's size, the only one it takes)")
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs, help="training epochs per model")
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size, help="training batch size")
    p.add_argument("--lr", type=float, default=TrainConfig.lr, help="peak LR at batch 128 (scaled with batch size)")
    p.add_argument("--early-exit-trunk-grad", type=float, default=TrainConfig.early_exit_trunk_grad,
                   help="share of the early exits' gradient that reaches the shared trunk (1.0: plain joint training)")
    p.add_argument("--predictor-epochs", type=int, default=TrainConfig.predictor_epochs,
                   help="epochs fitting RAPNet's exit predictor (on its part of the validation split)")
    p.add_argument("--val-size", type=int, default=TrainConfig.val_size,
                   help="training images held out as the validation split (predictor fit and calibration)")
    p.add_argument("--limit-train", type=int, default=0, help="smoke runs: train on this many images only (0: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the initialisation and the data order")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default, all cores)")
    p.add_argument("--jobs", type=int, default=1,
                   help="train the models in parallel processes, one per kind (with --teacher static the static "
                        "network first, alone); on a 2-core CPU pair --jobs 2 with --threads 1")
    p.add_argument("--teacher", metavar="CHECKPOINT",
                   help="distil every exit from this trained network's last exit (same seed and split as this run); "
                        "'static': from this run's static network, trained first (OUT/static.pt when --models has no "
                        "static) (default: none, the earlier exits distil from the model's own last exit)")
    p.add_argument("--predictor-only", metavar="CHECKPOINT",
                   help="refit only the exit predictor of this trained RAPNet checkpoint; writes OUT/rapnet.pt (default: off, "
                        "train the models)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    unknown = set(args.models) - {"rapnet", "sdn", "static"}
    if unknown:
        raise SystemExit(f"unknown model kinds {sorted(unknown)}: use rapnet, sdn and/or static")
    if args.jobs > 1 and len(args.models) > 1:
        _run_parallel(argv if argv is not None else sys.argv[1:], args)
        return
    try:
        refit_predictor(args) if args.predictor_only else run(args)
    except MixedSizesError as err:
        raise SystemExit(f"rapnet-train: {err.hint('--image-size N')}") from None
    except (DatasetError, CheckpointError) as err:
        raise SystemExit(f"rapnet-train: {err}") from None
    except KeyboardInterrupt:
        raise SystemExit("rapnet-train: interrupted; rerun the same command to resume from the last epoch") from None


def _run_parallel(argv: list[str], args: argparse.Namespace) -> None:
    """One process per model kind (a small network leaves most of a GPU idle); with --teacher static the static
    network trains first, alone, since the others learn from it."""
    def train_in_parallel(kinds: list[str]) -> None:
        procs = [subprocess.Popen([sys.executable, "-m", "rapnet.train", *argv, "--models", kind, "--jobs", "1"])
                 for kind in kinds]
        codes = [p.wait() for p in procs]
        if any(codes):
            raise SystemExit(f"rapnet-train: a training process failed (exit codes {codes})")

    kinds = list(args.models)
    if args.teacher == IN_RUN_TEACHER and "static" in kinds:
        train_in_parallel(["static"])
        kinds.remove("static")
    train_in_parallel(kinds)


if __name__ == "__main__":
    main()
