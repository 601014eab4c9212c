"""The multi-exit network and its execution API, shared by training, the edge, the cloud and the simulator.

A network is a chain of stages. Each stage reads named tensors from a *carry* (a dict of tensors) and writes
one. Exits (internal classifiers) sit after some stages. Running to exit k executes exactly the stages up to
k's stage and k's head. Splitting at boundary s means: the edge runs stages [0, s) and hands over the live
part of the carry (what later stages still read), the cloud runs stages [s, ...] from it.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.nn import functional as F

from .blocks import ConvBNAct, make_divisible
from .config import ModelConfig
from .execution import check_exit, check_split

Carry = dict[str, torch.Tensor]
IMAGE = "image"


class Stage(nn.Module):
    """A run of layers between two boundaries; `reads` and `writes` name carry entries."""

    reads: tuple[str, ...]
    writes: str

    def forward(self, carry: Carry) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class ChainStage(Stage):
    def __init__(self, layers: Iterable[nn.Module], source: str, target: str, downsample: int = 1):
        super().__init__()
        self.layers = nn.Sequential(*layers)
        self.reads, self.writes, self.downsample = (source,), target, downsample

    def forward(self, carry: Carry) -> torch.Tensor:
        x = carry[self.reads[0]]
        if self.downsample > 1:
            x = F.avg_pool2d(x, self.downsample)
        return self.layers(x)


class FusionStage(Stage):
    """Starts the high-resolution path: thin stem on the full image, fused with the low-res features."""

    def __init__(self, stem: nn.Module, fusion: nn.Module, layers: Iterable[nn.Module], lr_key: str, target: str):
        super().__init__()
        self.stem, self.fusion, self.layers = stem, fusion, nn.Sequential(*layers)
        self.reads, self.writes = (IMAGE, lr_key), target

    def forward(self, carry: Carry) -> torch.Tensor:
        return self.layers(self.fusion(self.stem(carry[IMAGE]), carry[self.reads[1]]))


class MultiExitNetwork(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        stages: list[Stage],
        exits: list[nn.Module],
        exit_stages: list[int],
        predictor: nn.Module | None = None,
    ):
        super().__init__()
        if len(exits) != len(exit_stages) or exit_stages != sorted(set(exit_stages)):
            raise ValueError("need one strictly increasing stage index per exit")
        if exit_stages[-1] != len(stages) - 1:
            raise ValueError("the last stage must end in an exit")
        self.config = config
        self.stages = nn.ModuleList(stages)
        self.exits = nn.ModuleList(exits)
        self.exit_stages = tuple(exit_stages)
        self.predictor = predictor
        self._live = self._liveness()

    # --- structure -------------------------------------------------------------------------------------
    @property
    def num_exits(self) -> int:
        return len(self.exits)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def _liveness(self) -> list[tuple[str, ...]]:
        """live[s]: carry entries that stages s.. still read, i.e. exactly what crosses a split at s."""
        live: set[str] = set()
        result = [()] * (self.num_stages + 1)
        for s in range(self.num_stages - 1, -1, -1):
            live = (live - {self.stages[s].writes}) | set(self.stages[s].reads)
            result[s] = tuple(sorted(live))
        return result

    def live_keys(self, split: int) -> tuple[str, ...]:
        check_split(self.num_stages, split)
        return self._live[split]

    # --- execution -------------------------------------------------------------------------------------
    def _run_stages(self, carry: Carry, start: int, stop: int) -> Carry:
        carry = dict(carry)
        for s in range(start, stop):
            carry[self.stages[s].writes] = self.stages[s](carry)
        return carry

    def _exit_logits(self, carry: Carry, exit_index: int) -> torch.Tensor:
        return self.exits[exit_index](carry[self.stages[self.exit_stages[exit_index]].writes])

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        """All exits' logits, shallowest first (training and offline evaluation)."""
        carry: Carry = {IMAGE: image}
        outputs, done = [], 0
        for k, stage_index in enumerate(self.exit_stages):
            carry = self._run_stages(carry, done, stage_index + 1)
            done = stage_index + 1
            outputs.append(self._exit_logits(carry, k))
        return outputs

    def run_to_exit(self, image: torch.Tensor, exit_index: int) -> torch.Tensor:
        """Monolithic run to one exit: only its stages and its head execute."""
        check_exit(self.num_exits, exit_index)
        carry = self._run_stages({IMAGE: image}, 0, self.exit_stages[exit_index] + 1)
        return self._exit_logits(carry, exit_index)

    def edge_part(self, image: torch.Tensor, split: int) -> Carry:
        """Run stages [0, split) and return exactly the carry entries that must cross the network."""
        check_split(self.num_stages, split)
        carry = self._run_stages({IMAGE: image}, 0, split)
        return {key: carry[key] for key in self._live[split]}

    def cloud_part(self, carry: Carry, split: int, exit_index: int) -> torch.Tensor:
        """Continue from a carry handed over at `split` and answer at `exit_index` (which must lie beyond it)."""
        check_split(self.num_stages, split)
        check_exit(self.num_exits, exit_index)
        if self.exit_stages[exit_index] < split:
            raise ValueError(f"exit {exit_index} sits before split point {split}: the edge answers it locally")
        missing = set(self._live[split]) - set(carry)
        if missing:
            raise ValueError(f"carry at split {split} lacks {sorted(missing)}")
        carry = self._run_stages(carry, split, self.exit_stages[exit_index] + 1)
        return self._exit_logits(carry, exit_index)

    def edge_part_capped(self, image: torch.Tensor, split: int,
                         stop_confidence: float) -> tuple[Carry | None, tuple[torch.Tensor, int] | None]:
        """The edge's side of the capped rule at a split, for one image: run stages [0, split) checking the
        heads of the exits before the split; the first whose top softmax probability reaches
        `stop_confidence` answers here. Returns (None, (logits, exit)) then, else (the carry to send, None)."""
        check_split(self.num_stages, split)
        before = [k for k, s in enumerate(self.exit_stages) if s < split]
        carry, done, answer = self._first_confident(image, before, stop_confidence, last_answers=False)
        if answer is not None:
            return None, answer
        carry = self._run_stages(carry, done, split)
        return {key: carry[key] for key in self._live[split]}, None

    def deepest_local_exit(self, split: int) -> int | None:
        """The deepest exit whose stage the edge has run when it splits at `split` (its fallback answer)."""
        local = [k for k, s in enumerate(self.exit_stages) if s < split]
        return local[-1] if local else None

    def local_exit_logits(self, carry: Carry, split: int) -> torch.Tensor:
        """Fallback: logits of the deepest local exit, from the carry the edge already holds."""
        k = self.deepest_local_exit(split)
        if k is None:
            raise ValueError(f"no exit is computed before split point {split}")
        if self.stages[self.exit_stages[k]].writes not in carry:
            raise ValueError(f"the carry at split {split} no longer holds exit {k}'s features")
        return self._exit_logits(carry, k)

    def run_mixed(self, image: torch.Tensor, exits: torch.Tensor) -> torch.Tensor:
        """Per-sample exits in one batch. Samples leave the batch at their exit (regrouped, never padded)."""
        return self.continue_mixed({IMAGE: image}, 0, exits)

    def continue_mixed(self, carry: Carry, split: int, exits: torch.Tensor) -> torch.Tensor:
        """Run a batch that starts at `split` to per-sample exits; the batch shrinks as samples leave."""
        return self.continue_capped(carry, split, exits)[0]

    def continue_capped(self, carry: Carry, split: int, caps: torch.Tensor,
                        stop_confidence: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run a batch that starts at `split`, each sample at most to its exit in `caps`. A sample with a stop
        confidence > 0 also leaves at the first exit from the split on whose top softmax probability reaches
        it (RAPNet's capped rule, rapnet.exit_rules.capped_exits); its heads on the way run. Samples leave the
        batch at their exit (regrouped, never padded). Returns (logits, exit each sample answered at)."""
        caps = torch.as_tensor(caps, dtype=torch.long).reshape(-1)
        batch = caps.numel()
        if batch == 0:
            raise ValueError("empty batch")
        if int(caps.min()) < 0 or int(caps.max()) >= self.num_exits:
            raise ValueError(f"exits must lie in 0..{self.num_exits - 1}")
        if any(self.exit_stages[int(k)] < split for k in caps.unique()):
            raise ValueError(f"some exits sit before split point {split}")
        stop = torch.zeros(batch) if stop_confidence is None else torch.as_tensor(stop_confidence, dtype=torch.float32).reshape(-1)
        if stop.numel() != batch:
            raise ValueError(f"{stop.numel()} stop confidences for a batch of {batch}")
        checking = stop > 0
        stop = torch.where(checking, stop, 2.0)  # no stop confidence: no softmax probability reaches 2
        used = caps.clone()
        active = torch.arange(batch)
        logits: torch.Tensor | None = None
        stage = split
        first = next(k for k, s in enumerate(self.exit_stages) if s >= split)
        for k in range(first, int(caps.max()) + 1):
            cap = caps[active]
            heads = (cap == k) | (checking[active] & (cap > k))  # who needs exit k's head
            if not heads.any():
                continue
            carry = self._run_stages(carry, stage, self.exit_stages[k] + 1)
            stage = self.exit_stages[k] + 1
            out = self.exits[k](carry[self.stages[self.exit_stages[k]].writes][heads])
            done = cap[heads] == k
            if checking.any():
                done |= torch.softmax(out, 1).amax(1) >= stop[active][heads]
            if not done.any():
                continue
            if logits is None:
                logits = out.new_empty((batch, out.shape[1]))
            leaving = torch.zeros(active.numel(), dtype=torch.bool)
            leaving[heads.nonzero().squeeze(1)[done]] = True
            logits[active[leaving]] = out[done]
            used[active[leaving]] = k
            staying = ~leaving
            active = active[staying]
            carry = {key: value[staying] for key, value in carry.items()}
            if active.numel() == 0:
                break
        assert logits is not None
        return logits, used

    def run_until_confident(self, image: torch.Tensor, threshold: float, last_exit: int | None = None) -> tuple[torch.Tensor, int]:
        """SDN-style inference for one image: evaluate exits one after another and stop at the first whose
        top softmax probability reaches `threshold`; `last_exit` (default: the last) always answers.
        RAPNet's capped rule passes the priced rule's exit as `last_exit` (rapnet.exit_rules.capped_exits)."""
        last_exit = self.num_exits - 1 if last_exit is None else last_exit
        check_exit(self.num_exits, last_exit)
        return self._first_confident(image, range(last_exit + 1), threshold, last_answers=True)[2]

    def _first_confident(self, image: torch.Tensor, exits, threshold: float,
                         last_answers: bool) -> tuple[Carry, int, tuple[torch.Tensor, int] | None]:
        """Run one image through `exits` (consecutive, from 0) in order; the first whose top softmax probability
        reaches `threshold` answers (the last one anyway if `last_answers`). Returns (carry, stages run,
        (logits, exit) or None)."""
        if image.shape[0] != 1:
            raise ValueError("confidence-based early exit decides per image: pass a batch of one")
        carry: Carry = {IMAGE: image}
        done = 0
        for k in exits:
            carry = self._run_stages(carry, done, self.exit_stages[k] + 1)
            done = self.exit_stages[k] + 1
            logits = self._exit_logits(carry, k)
            if (last_answers and k == exits[-1]) or float(torch.softmax(logits, 1).max()) >= threshold:
                return carry, done, (logits, k)
        return carry, done, None

    # --- exit predictor --------------------------------------------------------------------------------
    def exit_scores(self, image: torch.Tensor) -> torch.Tensor:
        """The predictor's estimate, per exit, that the exit answers this image correctly (probabilities)."""
        if self.predictor is None:
            raise ValueError(f"a {self.config.kind} model has no exit predictor")
        return torch.sigmoid(self.predictor(image))


# The exit predictor's extra pooling of the low-resolution image and its first conv's stride, per layout (ours).
# In the ImageNet layout the backbone's grids are 4x coarser than in the CIFAR layout (total stride 32, not 8), and
# so are the predictor's: that keeps it near 2% of RAPNet's cost in both layouts and at every input size.
PREDICTOR_SCHEDULE = {"cifar": (1, 1), "imagenet": (2, 2)}


class ExitPredictor(nn.Module):
    """Small CNN on the low-resolution image that scores every exit (ours: sizes in ModelConfig)."""

    def __init__(self, config: ModelConfig, num_exits: int):
        super().__init__()
        pool, first_stride = PREDICTOR_SCHEDULE[config.layout]
        layers: list[nn.Module] = []
        in_ch = 3
        for i, base in enumerate(config.predictor_channels):
            ch = make_divisible(base * config.width, 4)
            layers.append(ConvBNAct(in_ch, ch, 3, stride=first_stride if i == 0 else 2))
            in_ch = ch
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(in_ch, num_exits)
        self.downsample = config.lowres_factor * pool

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(image, self.downsample) if self.downsample > 1 else image
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))

