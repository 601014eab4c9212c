"""The exit rules: per sample, which exit answers. One home for the rules, their settings' grids and the
validation of those settings; the evaluation, the planner, the cloud and the simulator all call these.

    relative = relative_exit_costs(costs)                          # cost_k / full cost
    exits = priced_exits(scores, price, relative)                  # RAPNet's rule
    exits = capped_exits(scores, confidence, price, stop, relative)  # priced cap + confidence stop
    check_rule(price=0.03, stop_confidence=0.9)                    # ValueError naming the value and the range

Pure numpy: `scores` are the predictor's per-exit probabilities and `confidence` every exit's top softmax
probability, both (N, K).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the rules themselves need numpy only
    from .costs import CostTable

# Confidences just under 1 (1 - 10^-k): a softmax saturates, so an even grid's last step (0.995 to 1) would skip
# the operating points where a confidence rule keeps its last exit's accuracy.
NEAR_ONE = 1.0 - 10.0 ** -np.arange(3, 7)
# The single-knob rules' grids (threshold rule, confidence rule, priced rule).
THRESHOLDS = np.unique(np.concatenate([np.round(np.linspace(0.0, 1.0, 201), 4), NEAR_ONE]))
PRICES = np.round(np.linspace(0.0, 4.0, 401), 4)
# The capped rule's grid (price x stop confidence); coarser than the single-knob grids to keep reports small.
CAPPED_GRID = [(float(q), float(t)) for q in np.round(np.linspace(0.0, 1.0, 41), 4)
               for t in np.unique(np.concatenate([np.round(np.linspace(0.5, 1.0, 51), 4), NEAR_ONE]))]


# --- the settings ------------------------------------------------------------------------------------------
def check_price(price: float, name: str = "price") -> float:
    """The priced rule's price: a finite number >= 0 (0 asks for the most accurate exit)."""
    if isinstance(price, bool) or not isinstance(price, (int, float, np.floating, np.integer)) \
            or not 0.0 <= price < math.inf:  # NaN fails too
        raise ValueError(f"{name} must be a finite number >= 0, got {price!r}")
    return float(price)


def check_threshold(threshold: float, name: str = "threshold") -> float:
    """The threshold rule's (or the confidence rule's) threshold: a probability in [0, 1]."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating, np.integer)) \
            or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {threshold!r}")
    return float(threshold)


def check_stop_confidence(value: float, name: str = "stop confidence") -> float:
    """The capped rule's stop confidence: a top softmax probability in (0, 1] (0 would stop at the first exit
    on the way, whatever it answers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must lie in (0, 1], got {value!r}")
    return float(value)


def check_rule(price: float | None = None, threshold: float | None = None, stop_confidence: float | None = None,
               names: tuple[str, str, str] = ("price", "threshold", "stop confidence")) -> None:
    """One exit rule's settings, each value and the combination: a price (priced rule) or a threshold (threshold
    rule), not both; a stop confidence (capped rule) caps the priced rule's exit, so not with a threshold.
    `names`: how the caller calls the three (e.g. its command-line flags), for the messages."""
    price_name, threshold_name, stop_name = names
    if price is not None and threshold is not None:
        raise ValueError(f"give {price_name} (priced rule) or {threshold_name} (threshold rule), not both")
    if stop_confidence is not None and threshold is not None:
        raise ValueError(f"{stop_name} caps the priced rule's exit: it does not go with {threshold_name}")
    if price is not None:
        check_price(price, price_name)
    if threshold is not None:
        check_threshold(threshold, threshold_name)
    if stop_confidence is not None:
        check_stop_confidence(stop_confidence, stop_name)


# --- the rules ---------------------------------------------------------------------------------------------
def relative_exit_costs(costs: CostTable) -> np.ndarray:
    """cost_k / full cost per exit: the prices the priced rule charges."""
    return np.array([costs.exit_cost(k) for k in range(costs.num_exits)]) / costs.full_cost


def priced_exits(scores: np.ndarray, price: float, relative_costs: np.ndarray) -> np.ndarray:
    """RAPNet's rule: the exit with the best predicted chance of being right net of its compute,
    argmax_k score_k - price * cost_k / full cost. Price 0 asks for the most accurate exit; raising it trades
    accuracy for FLOPs. Unlike a first-exit-above-threshold rule, it weighs every exit's score against what
    that exit costs, so a deep exit is chosen only when the predictor expects it to pay off."""
    return np.argmax(scores - price * np.asarray(relative_costs)[None, :], axis=1)


def capped_exits(scores: np.ndarray, confidence: np.ndarray, price: float, threshold: float,
                 relative_costs: np.ndarray) -> np.ndarray:
    """RAPNet's capped rule: the priced rule picks the deepest exit worth running (the cap); on the way there,
    the first exit whose top softmax probability reaches `threshold` (the stop confidence) answers. The
    predictor keeps hopeless images from running deep; an exit's own confidence stops the easy ones early.
    Every head up to the answering exit runs (FLOPs: CostTable.sequential_exit_cost)."""
    cap = priced_exits(scores, price, relative_costs)
    confident = (confidence >= threshold) & (np.arange(confidence.shape[1])[None, :] <= cap[:, None])
    return np.where(confident.any(1), confident.argmax(1), cap)


def predictor_exits(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Threshold rule: jump to the shallowest exit the predictor trusts at `threshold`, else the last.
    (`priced_exits` is more accurate at equal FLOPs: docs/results.md compares them.)"""
    trusted = scores >= threshold
    return np.where(trusted.any(1), trusted.argmax(1), scores.shape[1] - 1)


def confidence_exits(confidence: np.ndarray, threshold: float) -> np.ndarray:
    """SDN's rule: the first exit whose top softmax probability reaches `threshold`, else the last."""
    confident = confidence >= threshold
    return np.where(confident.any(1), confident.argmax(1), confidence.shape[1] - 1)


def oracle_exits(correct: np.ndarray) -> np.ndarray:
    """Earliest correct exit (the last one when none is right)."""
    return np.where(correct.any(1), correct.argmax(1), correct.shape[1] - 1)
