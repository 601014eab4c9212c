"""One cost table: FLOPs of every stage, exit head and the predictor, measured by torch's flop counter.

The planner, the simulator and the reports all read this table; nothing hand-types a FLOP count. Measuring
needs torch; the table itself does not: an edge on ONNX Runtime reads it from the export manifest
(CostTable.from_dict, rapnet.export).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields


def count_flops(module, *inputs) -> tuple[int, object]:
    """FLOPs (torch's convention: 2 per multiply-add) of one call, and the call's output."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        output = module(*inputs)
    return int(counter.get_total_flops()), output


@dataclass(frozen=True)
class CostTable:
    stage_flops: tuple[int, ...]
    exit_flops: tuple[int, ...]
    exit_stages: tuple[int, ...]
    predictor_flops: int
    # What crosses the network at each split point s (0 = the raw image, num_stages = nothing):
    # carry entry names, their shapes at batch 1, and their fp32 size in bytes.
    split_keys: tuple[tuple[str, ...], ...]
    split_shapes: tuple[tuple[tuple[int, ...], ...], ...]
    split_fp32_bytes: tuple[int, ...]

    @property
    def num_exits(self) -> int:
        return len(self.exit_flops)

    def stages_to_exit(self, exit_index: int) -> int:
        return sum(self.stage_flops[: self.exit_stages[exit_index] + 1])

    def exit_cost(self, exit_index: int) -> int:
        """Running straight to one exit (RAPNet's jump; the predictor is added by the policy)."""
        return self.stages_to_exit(exit_index) + self.exit_flops[exit_index]

    def sequential_exit_cost(self, exit_index: int) -> int:
        """SDN-style: every IC up to and including this exit is evaluated on the way."""
        return self.stages_to_exit(exit_index) + sum(self.exit_flops[: exit_index + 1])

    @property
    def full_cost(self) -> int:
        return self.exit_cost(self.num_exits - 1)

    def split_cost(self, split: int) -> int:
        """Edge FLOPs to produce the carry at a split point."""
        return sum(self.stage_flops[:split])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CostTable":
        """The inverse of to_dict, also after a JSON round trip (lists back to tuples)."""
        def tuples(value):
            return tuple(tuples(v) for v in value) if isinstance(value, (list, tuple)) else value

        names = {f.name for f in fields(cls)}
        if set(data) != names:
            raise ValueError(f"a cost table holds exactly {sorted(names)}, got {sorted(data)}")
        return cls(**{name: tuples(value) for name, value in data.items()})


def measure_costs(model, image_size: int | None = None) -> CostTable:
    """Measure every stage, exit and the predictor on a batch-1 input, running the real modules."""
    import torch

    size = image_size or model.config.image_size
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            carry = {"image": torch.zeros(1, 3, size, size)}
            stage_flops, exit_flops, split_keys, split_shapes, split_bytes = [], [], [], [], []
            for s in range(model.num_stages + 1):
                live = model.live_keys(s)
                split_keys.append(live)
                split_shapes.append(tuple(tuple(carry[key].shape[1:]) for key in live))
                split_bytes.append(sum(carry[key][0].numel() * 4 for key in live))
                if s < model.num_stages:
                    flops, out = count_flops(model.stages[s], carry)
                    carry = {**carry, model.stages[s].writes: out}
                    stage_flops.append(flops)
                    if s in model.exit_stages:
                        exit_flops.append(count_flops(model.exits[model.exit_stages.index(s)], out)[0])
            predictor_flops = count_flops(model.predictor, carry["image"])[0] if model.predictor is not None else 0
    finally:
        model.train(was_training)
    return CostTable(
        tuple(stage_flops), tuple(exit_flops), tuple(model.exit_stages), predictor_flops,
        tuple(split_keys), tuple(split_shapes), tuple(split_bytes),
    )
