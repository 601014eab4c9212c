"""Training step time on the CPU: fp32 against bf16 autocast, channels_last against contiguous memory.

rapnet-train trains in fp32 with channels_last tensors on the CPU. This script is the evidence for that choice:
for each network kind (RAPNet with its static teacher's forward pass, SDN, the static network) at one recipe's
input size and width, it times full training steps (augmentation, forward, multi-exit loss, backward, SGD step)
on random pixels in four variants, interleaved round by round (A B C D A B C D ...) so a shared machine's drifts
hit every variant alike, and reports median milliseconds per step and the ratio to fp32 + contiguous.

    python benchmarks/train_speed.py                      # imagenet layout, 128 px, width 0.5, batch 64
    python benchmarks/train_speed.py --image-size 32 --layout cifar --batch-size 128

Writes benchmarks/results/train_speed.json (or --output) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rapnet.build import build_model  # noqa: E402
from rapnet.config import ModelConfig  # noqa: E402
from rapnet.machine import machine_info  # noqa: E402
from rapnet.preprocess import augment, to_model_input  # noqa: E402
from rapnet.train import TrainConfig, multi_exit_loss  # noqa: E402

VARIANTS = {  # name: (channels_last, bf16 autocast)
    "fp32": (False, False),
    "fp32 + channels_last": (True, False),
    "bf16": (False, True),
    "bf16 + channels_last": (True, True),
}


def make_step(kind: str, args, channels_last: bool, bf16: bool):
    config = dict(width=args.width, image_size=args.image_size, layout=args.layout)
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind=kind, **config))
    teacher = build_model(ModelConfig(kind="static", **config)).eval() if kind != "static" else None
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    if teacher is not None:
        teacher = teacher.to(memory_format=fmt).requires_grad_(False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    pixels = torch.randint(0, 256, (args.batch_size, args.image_size, args.image_size, 3), dtype=torch.uint8)
    labels = torch.randint(0, 10, (args.batch_size,))
    generator = torch.Generator().manual_seed(0)
    cfg = TrainConfig()

    def step() -> None:
        x = augment(to_model_input(pixels), args.layout, generator).contiguous(memory_format=fmt)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                teacher_logits = teacher(x)[-1] if teacher is not None else None
            loss = multi_exit_loss(model(x), labels, cfg, teacher_logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layout", default="imagenet", choices=("cifar", "imagenet"))
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--kinds", default="rapnet,sdn,static")
    p.add_argument("--rounds", type=int, default=6, help="timed steps per variant (after one warm-up step each)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--note", default="", help="a word on the machine's load during the run")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "train_speed.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    for kind in args.kinds.split(","):
        steps = {name: make_step(kind, args, *flags) for name, flags in VARIANTS.items()}
        for step in steps.values():
            step()  # warm-up: first-call allocations and kernel selection
        times: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(args.rounds):
            for name, step in steps.items():
                started = time.perf_counter()
                step()
                times[name].append((time.perf_counter() - started) * 1e3)
        base = statistics.median(times["fp32"])
        results[kind] = {name: {"median_ms": statistics.median(t), "ratio_to_fp32": statistics.median(t) / base,
                                "samples_ms": [round(v, 1) for v in t]} for name, t in times.items()}
    report = {"config": {k: v for k, v in vars(args).items() if k != "output"}, "machine": machine_info(),
              "method": "full training steps on random pixels, variants interleaved per round, medians",
              "results": results}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1))
    print(f"| kind | {' | '.join(VARIANTS)} |\n|---|{'---|' * len(VARIANTS)}")
    for kind, row in results.items():
        print(f"| {kind} | " + " | ".join(f"{row[v]['median_ms']:.0f} ms ({row[v]['ratio_to_fp32']:.2f}x)" for v in VARIANTS) + " |")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
