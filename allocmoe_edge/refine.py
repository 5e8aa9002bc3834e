"""Measure a plan end to end and refine it by bounded local search.

The DP assumes layer effects add up; here the plan is measured on calibration text (PPL,
KL divergence, top-1 agreement against the full budget) so its predicted and measured
degradation can be compared. The search then tries moving one activation from one MoE layer
to another (the budget stays the same) and keeps a move when the measured metric improves;
each try is one evaluation, at most ``steps`` of them, in a seeded random order. Every
position of each window is scored, as in ``profile``, so predictions and measurements match.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .errors import AllocMoeError
from .plan import Plan
from .sensitivity import check_metric


def _moves(counts: Sequence[int], lo: int, hi: int, rng: random.Random) -> list[tuple[int, int]]:
    """Every (from, to) pair of layer positions that keeps counts within [lo, hi], shuffled."""
    moves = [
        (i, j)
        for i in range(len(counts))
        for j in range(len(counts))
        if i != j and counts[i] > lo and counts[j] < hi
    ]
    rng.shuffle(moves)
    return moves


def _quality(result: dict[str, Any]) -> dict[str, Any]:
    """A measured plan's quality fields (without its counts and mode)."""
    return {key: value for key, value in result.items() if key not in ("counts", "alloc_t")}


def refine_plan(
    model: torch.nn.Module,
    windows: torch.Tensor,
    plan: Plan,
    steps: int = 20,
    metric: str = "kld",
    seed: int = 0,
    on_step: Callable[[list[int], float, bool], None] | None = None,
) -> Plan:
    """Measure ``plan`` on ``windows`` and search for a better one with the same budget.

    Returns a plan with method ``refined`` whose ``measured`` block holds the refined
    plan's quality, the initial plan's prediction and measurement, and the accepted moves.
    ``on_step(counts, value, accepted)`` runs after each evaluation.
    """
    from .hf import plan_shape
    from .torch_eval import measure

    check_metric(metric)
    if steps < 0:
        raise AllocMoeError(f"steps must be >= 0, got {steps}")
    plan.check_against(plan_shape(model))
    k_max = plan.token_k_max or None
    lo, hi = max(1, plan.token_k_min), min(k_max or plan.model.k_orig, plan.model.k_orig)

    def evaluate(counts: Sequence[int]) -> dict[str, Any]:
        plans = {"plan": (list(counts), plan.alloc_t)}
        return measure(model, windows, plans, plan.token_k_min, k_max, score_all=True)

    first = evaluate(plan.counts)
    full, initial = first["full"], first["plans"]["plan"]
    best, best_counts = initial, list(plan.counts)
    rng = random.Random(seed)
    accepted: list[dict[str, Any]] = []
    moves = _moves(best_counts, lo, hi, rng)
    tried = 0
    while tried < steps and moves:
        tried += 1
        i, j = moves.pop()
        counts = list(best_counts)
        counts[i] -= 1
        counts[j] += 1
        result = evaluate(counts)["plans"]["plan"]
        better = result[metric] < best[metric]
        if better:
            best, best_counts = result, counts
            blocks = plan.model.moe_layers
            accepted.append({"from": blocks[i], "to": blocks[j], metric: result[metric]})
            moves = [m for m in _moves(best_counts, lo, hi, rng) if m != (j, i)]
        if on_step:
            on_step(counts, result[metric], better)
    measured = {
        **_quality(best),
        "full": full,
        "metric": metric,
        "initial": {
            "method": plan.method,
            "counts": list(plan.counts),
            "predicted": plan.predicted,
            "measured": _quality(initial),
        },
        "moves": accepted,
        "evaluations": 1 + tried,
    }
    return dataclasses.replace(
        plan,
        method="refined",
        counts=tuple(best_counts),
        predicted=plan.predicted if best_counts == list(plan.counts) else None,
        measured=measured,
    )


def run_refine(
    model_dir: str | os.PathLike[str],
    plan_path: str | os.PathLike[str],
    calib: str | os.PathLike[str],
    out: str | os.PathLike[str],
    steps: int = 20,
    metric: str = "kld",
    ctx: int = 256,
    max_tokens: int | None = None,
    max_memory: str | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    on_step: Callable[[list[int], float, bool], None] | None = None,
) -> Plan:
    """Load the model and plan, refine the plan on ``calib`` and save it to ``out``."""
    from .fsutil import read_text
    from .hf import load_model
    from .torch_eval import token_windows

    plan = Plan.load(plan_path)
    check_metric(metric)
    text, described = read_text(calib)
    model, tokenizer = load_model(model_dir, max_memory, offload_folder)
    windows = token_windows(tokenizer, text, ctx, max_tokens)
    refined = refine_plan(model, windows, plan, steps, metric, on_step=on_step)
    refined.measured["text"] = {**described, "n_tokens": windows.numel(), "ctx": ctx}
    refined.save(out)
    return refined
