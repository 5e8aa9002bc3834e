"""The per-token expert rules of the field, run beside Alloc-T for comparison (patch 0011): SER and top-p.

Each cuts a token's top-k candidates (best first, as the router ranks them) to at least ``k_min`` of them:

* **SER**, ik_llama.cpp's smart expert reduction (``-ser k_min,t``): keep the experts whose routing weight
  is above ``t`` times the top one's.
* **top-p** routing (Huang et al. 2024, "Harder tasks need more experts: dynamic routing in MoE models"):
  keep the smallest best-first set whose routing probabilities (the gate's values over all experts,
  normalised to sum to 1) reach ``p``: a candidate is kept while the mass of the better ones is below ``p``.

Each is one value for the whole model, as users set it. `calibrate` chooses it so that the mean activations
per token over all MoE layers on calibration text equal a budget. The full-budget routing of every token of
that text (per layer: its top-k weights best first and the sum of all its weights, from
`graph_probe.routing_weights`) gives the count each token keeps at any value exactly, so the bisection needs
no further pass over the text. numpy only; the torch reference is `alloc_t_reference.select_peer`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .errors import AllocMoeError

TOKEN_RULES = ("ser", "top_p")  # allocmoe.token_rule values besides "alloc_t" (Alloc-T's own rules)
PEER_K_MIN = 1  # the experts a token keeps at least, as ik_llama.cpp's -ser 1,t and plain top-p
LABELS = {"ser": ("SER", "t"), "top_p": ("top-p", "p")}  # how tables name a rule and its value

RankedWeights = tuple[np.ndarray, np.ndarray]  # ([tokens, k] weights best first, [tokens] sum over all experts)


def check_value(rule: str, value: float) -> float:
    """``value`` if it is valid for ``rule`` (SER's t in [0, 1], top-p's p in (0, 1]), else AllocMoeError."""
    if rule not in TOKEN_RULES:
        raise AllocMoeError(f"token rule {rule!r} is not one of {', '.join(TOKEN_RULES)}")
    low_ok = value >= 0 if rule == "ser" else value > 0
    if not (low_ok and value <= 1):
        raise AllocMoeError(f"{LABELS[rule][0]}'s {LABELS[rule][1]} = {value} is outside "
                            f"{'[0, 1]' if rule == 'ser' else '(0, 1]'}")
    return float(value)


def kept(rule: str, ranked: np.ndarray, totals: np.ndarray, value: float, k_min: int) -> np.ndarray:
    """Which of each token's candidates ``rule`` keeps: a bool [tokens, k] mask over ``ranked`` (weights best
    first; ``totals`` the sum of all of a token's weights, used by top-p)."""
    ranked = np.asarray(ranked, dtype=np.float64)
    if rule == "ser":
        keep = ranked > value * ranked[:, :1]
    else:
        before = np.cumsum(ranked, axis=1) - ranked
        keep = before < value * np.asarray(totals, dtype=np.float64)[:, None]
    keep[:, :k_min] = True
    return keep


def mean_activations(rule: str, layers: Mapping[int, RankedWeights], value: float, k_min: int) -> float:
    """Mean experts per token summed over the MoE layers, under ``rule`` at ``value``."""
    return float(sum(kept(rule, r, s, value, k_min).sum(axis=1).mean() for r, s in layers.values()))


CALIBRATION_TOLERANCE = 0.02  # the calibrated mean activations may miss the target by this fraction at most


def calibrate(rule: str, layers: Mapping[int, RankedWeights], target: float, k_min: int = 1) -> float:
    """The value of ``rule`` whose mean activations per token (summed over ``layers``) on their tokens is
    ``target``: SER's t falls and top-p's p rises with the count, so bisection finds it (to within one
    token's experts over all tokens). AllocMoeError where no value comes within CALIBRATION_TOLERANCE of the
    target: routing so peaked (a random router: each token's top weight about 1) that the count jumps past it."""
    check_value(rule, 1.0)
    if not layers:
        raise AllocMoeError("no routing weights to calibrate on")
    lo, hi = 0.0, 1.0  # SER: count(lo) >= count(hi); top-p: count(lo) <= count(hi)
    rising = rule == "top_p"
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        above = mean_activations(rule, layers, mid, k_min) > target
        if above == rising:
            hi = mid
        else:
            lo = mid
    value = hi if rising else lo  # the side of the crossing with the larger count
    got = mean_activations(rule, layers, value, k_min)
    if abs(got - target) > CALIBRATION_TOLERANCE * target:
        raise AllocMoeError(f"{LABELS[rule][0]} cannot be calibrated to {target:g} activations per token on this "
                            f"text: its count jumps past it (the nearest value, {LABELS[rule][1]} = {value:.3g}, gives "
                            f"{got:.3g}); the model's routing is too peaked for one value to reach that budget")
    return value
