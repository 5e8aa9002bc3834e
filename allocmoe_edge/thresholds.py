"""Alloc-T's decode rule: per-layer routing-score thresholds calibrated to a plan's counts.

Keeping a ubatch's best T x k_l (token, expert) pairs by routing score (the batch rule) keeps
every pair whose score clears the batch's P-th largest score; as T grows that cut-off converges
to one threshold per layer. The decode rule applies it to one token at a time: a token keeps its
top-``k_min`` experts plus every further candidate (ranks ``k_min+1..k_max``) whose score
exceeds the layer's threshold tau_l, chosen so that on calibration text the mean number of
experts per token equals the plan's k_l:

    k_min + sum_{r = k_min+1 .. k_max} P(score_r > tau_l) = k_l

where score_r is a token's r-th largest routing score. The routing statistics are the quantiles
of score_r per layer and rank (`rank_quantiles`), measured on the calibration text by the profile
(torch) or by llama.cpp (`gguf_routing_stats`). numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import AllocMoeError
from .plan import decode_ruled, end_threshold

QUANTILES = 257  # probabilities 0, 1/256, ..., 1
_LEVELS = np.linspace(0.0, 1.0, QUANTILES)


@dataclass(frozen=True)
class LayerRouting:
    """Quantiles of one MoE layer's r-th largest routing score, r = 1..ranks."""

    layer: int
    n_tokens: int
    quantiles: tuple[tuple[float, ...], ...]  # [rank][QUANTILES], ascending

    @property
    def ranks(self) -> int:
        return len(self.quantiles)

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "n_tokens": self.n_tokens,
                "quantiles": [[float(f"{v:.6g}") for v in q] for q in self.quantiles]}

    @classmethod
    def from_dict(cls, d: Any) -> LayerRouting:
        try:
            quantiles = tuple(tuple(float(v) for v in q) for q in d["quantiles"])
            layer, n_tokens = int(d["layer"]), int(d["n_tokens"])
        except (KeyError, TypeError, ValueError) as e:
            raise AllocMoeError(f"routing statistics: malformed layer entry ({e})") from None
        if not quantiles or any(len(q) != QUANTILES or list(q) != sorted(q) for q in quantiles):
            raise AllocMoeError(f"routing statistics of layer {layer}: expected ascending {QUANTILES}-point "
                                "quantiles per rank")
        return cls(layer=layer, n_tokens=n_tokens, quantiles=quantiles)


def rank_quantiles(layer: int, ranked: np.ndarray) -> LayerRouting:
    """Statistics of ``ranked`` [n_tokens, R]: each token's R largest routing scores, best first."""
    ranked = np.asarray(ranked, dtype=np.float64)
    if ranked.ndim != 2 or not len(ranked):
        raise AllocMoeError(f"layer {layer}: no routing scores to calibrate on")
    q = np.quantile(ranked, _LEVELS, axis=0).T  # [R, QUANTILES]
    return LayerRouting(layer=layer, n_tokens=len(ranked), quantiles=tuple(tuple(float(v) for v in row) for row in q))


def expected_count(stats: LayerRouting, tau: float, k_min: int, k_max: int) -> float:
    """Mean experts per token that the decode rule keeps with threshold ``tau``."""
    _check_ranks(stats, k_max)
    kept = sum(1.0 - float(np.interp(tau, stats.quantiles[r], _LEVELS)) for r in range(k_min, k_max))
    return k_min + kept


def solve_threshold(stats: LayerRouting, k: int, k_min: int, k_max: int) -> float:
    """The threshold whose expected experts per token is ``k`` (`plan.end_threshold` for k = k_min or k_max)."""
    if not 1 <= k_min <= k <= k_max:
        raise AllocMoeError(f"decode thresholds need 1 <= k_min <= k <= k_max, got {k_min}, {k}, {k_max}")
    _check_ranks(stats, k_max)
    if not decode_ruled(k, k_min, k_max):
        return end_threshold(k, k_min)
    lo = min(stats.quantiles[r][0] for r in range(k_min, k_max))
    hi = max(stats.quantiles[r][-1] for r in range(k_min, k_max))
    for _ in range(100):  # expected_count falls as tau rises
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if expected_count(stats, mid, k_min, k_max) > k else (lo, mid)
    return 0.5 * (lo + hi)


def plan_thresholds(routing: Sequence[LayerRouting], layers: Sequence[int], counts: Sequence[int], k_min: int,
                    k_max: int) -> tuple[float, ...]:
    """One threshold per MoE layer (in ``layers`` order) for per-layer ``counts``."""
    by_layer = {r.layer: r for r in routing}
    missing = [b for b in layers if b not in by_layer]
    if missing:
        raise AllocMoeError(f"no routing statistics for MoE layers {missing}; profile again")
    return tuple(solve_threshold(by_layer[b], k, k_min, k_max) for b, k in zip(layers, counts))


def ruled_thresholds(routing: Sequence[LayerRouting], layers: Sequence[int], counts: Sequence[int], k_min: int,
                     k_max: int) -> tuple[float | None, ...]:
    """One threshold per MoE layer (in ``layers`` order) as a plan.json holds them: calibrated where the
    decode rule runs (`plan.decode_ruled`), None at the ends (which need no routing statistics)."""
    inner = [(b, k) for b, k in zip(layers, counts) if decode_ruled(k, k_min, k_max)]
    taus = plan_thresholds(routing, [b for b, _ in inner], [k for _, k in inner], k_min, k_max)
    return tuple(dict(zip((b for b, _ in inner), taus)).get(b) for b in layers)


def calibrated_block_thresholds(routing: Sequence[LayerRouting], counts: Sequence[int], moe_layers: Sequence[int],
                                k_min: int, k_max: int) -> tuple[float, ...]:
    """Thresholds per block for per-block ``counts``, as a GGUF stores them: `ruled_thresholds`,
    `plan.end_threshold` at the ends and inf for blocks without routed experts."""
    ruled = ruled_thresholds(routing, moe_layers, [counts[b] for b in moe_layers], k_min, k_max)
    taus = {b: end_threshold(counts[b], k_min) if tau is None else tau for b, tau in zip(moe_layers, ruled)}
    return tuple(taus.get(b, math.inf) for b in range(len(counts)))


def _check_ranks(stats: LayerRouting, k_max: int) -> None:
    if k_max > stats.ranks:
        raise AllocMoeError(f"layer {stats.layer}: routing statistics cover ranks 1..{stats.ranks}, "
                            f"token_k_max {k_max} needs more; profile with more ranks or lower k_max")
