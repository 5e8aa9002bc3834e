"""Stored plans against a GGUF's shape: made from counts or a plan.json, checked as the patched
loader checks them, and picked by budget."""

from __future__ import annotations

import math
import os

from ..errors import AllocMoeError
from ..plan import BUDGET_TOLERANCE, Plan, PlanModelShape, count_problems
from .reader import GgufModelInfo, StoredPlan


def expand_counts(info: GgufModelInfo, counts: list[int]) -> list[int]:
    """Per-block counts from either one value per block or one value per MoE layer."""
    if len(counts) == info.block_count:
        return list(counts)
    if len(counts) == len(info.moe_layers):
        full = [info.expert_used_count] * info.block_count
        for layer, k in zip(info.moe_layers, counts):
            full[layer] = k
        return full
    raise AllocMoeError(
        f"{len(counts)} counts given; the model has {info.block_count} blocks of which "
        f"{len(info.moe_layers)} are MoE layers: give one count per block or per MoE layer")


def check_stored_plan(info: GgufModelInfo, plan: StoredPlan, k_min: int = 1, k_max: int = 0) -> None:
    """Check a plan to stamp against the GGUF as the patched loader does: one count per block, the
    counts and Alloc-T bounds by `plan.count_problems`, one decode threshold per block."""
    if info.expert_count == 0 or not info.moe_layers:
        raise AllocMoeError(f"{info.path} has no experts ({info.architecture}); a budget plan needs a MoE model")
    if len(plan.counts) != info.block_count:
        raise AllocMoeError(f"plan has {len(plan.counts)} counts, the model has {info.block_count} blocks")
    problems = count_problems(dict(enumerate(plan.counts)), info.expert_count, k_min, k_max)
    if plan.thresholds is not None and len(plan.thresholds) != info.block_count:
        problems.append(f"{len(plan.thresholds)} decode thresholds for {info.block_count} blocks")
    elif plan.thresholds is not None and any(math.isnan(t) for t in plan.thresholds):
        problems.append("a NaN decode threshold")
    if problems:
        raise AllocMoeError(f"invalid plan {plan.name or '(unnamed)'}: " + "; ".join(problems))


def plan_for_counts(info: GgufModelInfo, counts: list[int], method: str = "custom", name: str = "") -> StoredPlan:
    """A StoredPlan for per-block or per-MoE-layer counts, with its budget computed."""
    full = expand_counts(info, counts)
    spent = sum(full[layer] for layer in info.moe_layers)
    return StoredPlan(counts=tuple(full), budget=spent / max(info.full_budget, 1), budget_count=spent,
                      method=method, name=name or f"{method}-{spent}")


def plan_shape(info: GgufModelInfo, architecture: str | None = None) -> PlanModelShape:
    """The file's shape as a plan records it (``architecture`` lets a plan made on the HF name compare equal)."""
    return PlanModelShape(architecture=architecture or info.architecture, n_layer=info.block_count,
                          moe_layers=tuple(info.moe_layers), n_expert=info.expert_count, k_orig=info.expert_used_count)


def stored_plan_from_file(info: GgufModelInfo, path: str | os.PathLike[str]) -> StoredPlan:
    """Load a plan.json and check it against the GGUF's shape."""
    return stored_plan(info, Plan.load(path))


def stored_plan(info: GgufModelInfo, plan: Plan) -> StoredPlan:
    """A Plan as stored in the GGUF, checked against its shape (GGUF and HF architecture names differ)."""
    plan.check_against(plan_shape(info, plan.model.architecture))
    thresholds = plan.block_thresholds()
    return StoredPlan(counts=tuple(plan.layer_expert_counts()), budget=plan.budget.fraction,
                      budget_count=plan.budget.count, method=plan.method,
                      name=f"{plan.method}@{plan.budget.fraction:g}",
                      thresholds=None if thresholds is None else tuple(thresholds))


def find_plan(info: GgufModelInfo, budget: float) -> int:
    """Index of the stored plan whose budget fraction is closest to ``budget`` (within `plan.BUDGET_TOLERANCE`)."""
    plans = info.plans
    if not plans:
        raise AllocMoeError(f"{info.path} stores no plans; stamp or convert it with plans first")
    best = min(range(len(plans)), key=lambda i: abs(plans[i].budget - budget))
    if abs(plans[best].budget - budget) > BUDGET_TOLERANCE:
        have = ", ".join(f"{p.budget:.2f}" for p in plans)
        raise AllocMoeError(f"no stored plan has budget {budget:.2f}; the file has {have}")
    return best
