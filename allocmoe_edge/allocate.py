"""Alloc-L: choose per-layer expert counts under an activation budget from layer sensitivities.

The sensitivity file (`sensitivity`, written by ``allocmoe profile``) holds S[l, k] per MoE
layer and k = 1..k_orig for one or both metrics, and (version 2) the routing statistics that
calibrate Alloc-T's decode rule.

Costs fed to the dynamic program are, per layer and k:

* ``kld``: the mean KL divergence to the full-budget model, as measured;
* ``ppl``: ``ln ppl(l, k) - ln ppl_full``, the increase in mean token NLL. Log-perplexity
  is the quantity that adds up over independent per-token losses, so summing log-ratios
  is the additive model the DP assumes; raw perplexity differences compound
  multiplicatively and overweight layers profiled on an already-degraded baseline.

The plan's ``predicted`` block holds the summed cost and, from the same additive model,
the predicted KLD (sum of per-layer KLDs) and perplexity (``ppl_full x exp(sum of
log-ratios)``) for whichever metrics the file has.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from . import sensitivity
from .errors import AllocMoeError
from .gguf_meta import GgufModelInfo, Keys, copy_with_metadata, plan_fields, plan_for_counts, plan_shape, read_info
from .plan import TOKEN_MODES, Budget, Plan, PlanModelShape
from .sensitivity import METRICS
from .thresholds import calibrated_block_thresholds, ruled_thresholds

# method -> whether Alloc-T is on in the resulting plan
ALLOCATE_METHODS = {"alloc-l+t": True, "alloc-l": False, "uniform+t": True, "uniform": False}


def _cost_table(costs: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Check ``costs`` (L rows of K finite numbers) and return it as a float64 array."""
    if not isinstance(costs, np.ndarray):
        rows = list(costs)
        if rows and len({len(r) for r in rows}) != 1:
            raise AllocMoeError(f"cost table is ragged: row lengths {[len(r) for r in rows]}")
        costs = rows
    try:
        table = np.asarray(costs, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise AllocMoeError(f"cost table holds a non-number ({e})") from None
    if table.ndim != 2 or table.size == 0:
        raise AllocMoeError(f"cost table must be a non-empty layers x K table, got shape {table.shape}")
    bad = np.argwhere(~np.isfinite(table))
    if len(bad):
        row, col = bad[0]
        raise AllocMoeError(f"cost for layer row {row}, k={col + 1} is {table[row, col]}; every cost must be finite")
    return table


def _check_bounds(n_layers: int, budget: int, k_min: int, k_max: int, k_top: int) -> None:
    """Raise unless 1 <= k_min <= k_max <= k_top and the budget covers k_min everywhere."""
    for name, v in (("budget", budget), ("k_min", k_min), ("k_max", k_max)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise AllocMoeError(f"{name} must be an integer, got {v!r}")
    if not 1 <= k_min <= k_max <= k_top:
        raise AllocMoeError(f"need 1 <= k_min ({k_min}) <= k_max ({k_max}) <= {k_top} (the largest k with a cost)")
    if budget < n_layers * k_min:
        raise AllocMoeError(
            f"budget {budget} is infeasible: {n_layers} layers x k_min {k_min} need at least {n_layers * k_min}"
        )


def allocate_layers(
    costs: Sequence[Sequence[float]] | np.ndarray, budget: int, k_min: int = 1, k_max: int | None = None
) -> list[int]:
    """Exact multiple-choice knapsack: per-layer counts minimising the summed cost.

    ``costs[l][k-1]`` is the cost of layer l at top-k, k = 1..K. Returns ``k_l`` with
    ``k_min <= k_l <= k_max`` (default K) and ``sum(k_l) <= budget`` minimising
    ``sum(costs[l][k_l-1])``; O(L x B x K). Ties (exact float equality of the sums, each
    accumulated from the last layer to the first) go to the solution with the fewest total
    activations, then to the lexicographically smallest counts (fewer experts in earlier
    layers).
    """
    table = _cost_table(costs)
    n_layers, k_top = table.shape
    k_max = k_top if k_max is None else k_max
    _check_bounds(n_layers, budget, k_min, k_max, k_top)
    cap = min(int(budget), n_layers * k_max)
    # best[l, r]: least cost of layers l..L-1 spending exactly r activations (inf: impossible)
    best = np.full((n_layers + 1, cap + 1), np.inf)
    best[n_layers, 0] = 0.0
    for layer in range(n_layers - 1, -1, -1):
        for k in range(k_min, min(k_max, cap) + 1):
            np.minimum(best[layer, k:], table[layer, k - 1] + best[layer + 1, : cap + 1 - k], out=best[layer, k:])
    remaining = int(np.argmin(best[0]))  # first minimum: fewest total activations
    counts = []
    for layer in range(n_layers):
        # smallest k that attains the optimum (same float expression as above, so == is exact)
        k = next(
            k
            for k in range(k_min, min(k_max, remaining) + 1)
            if table[layer, k - 1] + best[layer + 1, remaining - k] == best[layer, remaining]
        )
        counts.append(k)
        remaining -= k
    return counts


def uniform_counts(n_layers: int, budget: int, k_min: int, k_max: int) -> list[int]:
    """The same k in every layer: ``budget // n_layers`` capped to [k_min, k_max].

    When the budget does not divide evenly, the remainder goes one activation each to the
    first (shallowest) layers, which are usually the most sensitive.
    """
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise AllocMoeError(f"n_layers must be a positive integer, got {n_layers!r}")
    _check_bounds(n_layers, budget, k_min, k_max, k_max)
    if budget >= n_layers * k_max:
        return [k_max] * n_layers
    base, extra = divmod(int(budget), n_layers)
    return [base + 1] * extra + [base] * (n_layers - extra)


def _token_thresholds(sens: Mapping[str, Any], model: PlanModelShape, counts: Sequence[int], k_min: int,
                      k_max: int) -> tuple[float | None, ...]:
    """The decode rule's threshold per MoE layer (`thresholds.ruled_thresholds`)."""
    stats = sensitivity.routing_stats(sens)
    if stats is None:
        raise AllocMoeError("the sensitivity file has no routing statistics (profiled by an older allocmoe-edge): "
                            "profile again, or use --alloc-t batch")
    return ruled_thresholds(stats, model.moe_layers, counts, k_min, k_max)


def plan_from_sensitivity(
    sens: Mapping[str, Any],
    budget: Budget | str | float | int,
    method: str = "alloc-l+t",
    k_min: int = 1,
    k_max: int | None = None,
    metric: str = "kld",
    token_mode: str | None = None,
) -> Plan:
    """Build a plan from a sensitivity file's contents (see the module docstring).

    ``method``: "alloc-l+t" (DP, Alloc-T on with token bounds [k_min, k_max]), "alloc-l"
    (DP, Alloc-T off), "uniform+t" (same k everywhere, Alloc-T on: Alloc-T alone) or "uniform"
    (same k everywhere, Alloc-T off). ``k_min``/``k_max``
    bound every layer's count (k_max defaults to k_orig) and, with Alloc-T, every token's.
    ``token_mode`` (Alloc-T methods): "batch", "decode" or "both" (`plan.TOKEN_MODES`); the
    default is "both" when the file has routing statistics to calibrate the decode rule, else "batch".
    """
    if method not in ALLOCATE_METHODS:
        raise AllocMoeError(f"method {method!r} is not one of {', '.join(ALLOCATE_METHODS)}")
    sensitivity.check_metric(metric)
    model = sensitivity.model_shape(sens)
    k_max = model.k_orig if k_max is None else k_max
    if not isinstance(budget, Budget):
        budget = Budget.parse(budget, model, k_min)
    if k_max > model.k_orig:
        raise AllocMoeError(f"k_max {k_max} is above the profiled range k=1..{model.k_orig}")
    if not isinstance(sens.get("calibration", {}), Mapping):
        raise AllocMoeError("sensitivity.calibration: expected a JSON object")
    entries = sensitivity.layer_entries(sens, model)
    raw = {m: sensitivity.metric_table(entries, model, m) for m in METRICS}
    if raw[metric] is None:
        other = "ppl" if metric == "kld" else "kld"
        raise AllocMoeError(f"sensitivity file lacks {metric!r} for some layer; try the {other!r} metric")
    full_ppl = sensitivity.full_ppl(sens) if raw["ppl"] is not None else None
    tables = {"kld": raw["kld"], "ppl": None if raw["ppl"] is None else np.log(raw["ppl"]) - math.log(full_ppl)}
    costs = tables[metric]
    n = len(model.moe_layers)
    if method.startswith("uniform"):
        counts = uniform_counts(n, budget.count, k_min, k_max)
    else:
        counts = allocate_layers(costs, budget.count, k_min, k_max)
    per_layer = [float(costs[i, k - 1]) for i, k in enumerate(counts)]
    predicted: dict[str, Any] = {"metric": metric, "cost": math.fsum(per_layer), "per_layer": per_layer}
    if tables["kld"] is not None:
        predicted["kld"] = math.fsum(float(tables["kld"][i, k - 1]) for i, k in enumerate(counts))
    if tables["ppl"] is not None:
        predicted["ppl"] = full_ppl * math.exp(math.fsum(float(tables["ppl"][i, k - 1]) for i, k in enumerate(counts)))
    calibration = dict(sens.get("calibration") or {})
    calibration["profile_mode"] = sens["mode"]
    alloc_t = ALLOCATE_METHODS[method]
    mode = (token_mode or ("both" if sensitivity.routing_stats(sens) is not None else "batch")) if alloc_t else "batch"
    if mode not in TOKEN_MODES:
        raise AllocMoeError(f"token mode {mode!r} is not one of {', '.join(TOKEN_MODES)}")
    return Plan(
        model=model,
        budget=budget,
        method=method,
        counts=tuple(counts),
        token_k_min=k_min,
        token_k_max=k_max if alloc_t else 0,
        token_mode=mode,
        token_thresholds=None if mode == "batch" else _token_thresholds(sens, model, counts, k_min, k_max),
        calibration=calibration,
        predicted=predicted,
    )


def uniform_split_counts(info: GgufModelInfo, budget: float) -> list[int]:
    """The budget's activation count spread evenly over the MoE layers of a GGUF (`uniform_counts`:
    earlier layers get the remainder)."""
    total = Budget.parse(budget, plan_shape(info)).count
    return uniform_counts(len(info.moe_layers), total, 1, info.expert_used_count)


def stamp_uniform_split(src: str | Path, dst: str | Path, budgets: tuple[float, ...],
                        decode_rule: bool = False) -> GgufModelInfo:
    """Copy ``src`` to ``dst`` with a "uniform-split" plan per budget below 1 and Alloc-T enabled
    (a synthetic file has no sensitivity profile to allocate from).

    With ``decode_rule`` every plan also gets decode thresholds, calibrated on the file's own
    routing of 512 random tokens (`graph_probe.routing_stats`: a synthetic file has no calibration
    text), and the file runs the decode rule one token at a time (token mode "both")."""
    info = read_info(src)
    plans = [plan_for_counts(info, uniform_split_counts(info, b), "uniform-split", f"uniform-split@{b:g}")
             for b in sorted({b for b in budgets if b < 1}, reverse=True)]
    k_max = info.expert_used_count
    calibration = "none (uniform split)"
    if decode_rule:
        routing = _random_token_routing(src, info, k_max)
        plans = [replace(p, thresholds=calibrated_block_thresholds(routing, p.counts, info.moe_layers, 1, k_max))
                 for p in plans]
        calibration = "decode thresholds from 512 random tokens"
    fields = plan_fields(info, plans, k_min=1, k_max=k_max,
                         provenance={"source": Path(src).name, "calibration": calibration})
    copy_with_metadata(src, dst, fields, drop=lambda k: k.startswith(Keys.PREFIX) and k != Keys.SYNTHETIC)
    return read_info(dst)


def _random_token_routing(path: str | Path, info: GgufModelInfo, ranks: int) -> list[Any]:
    """The full-budget model's routing statistics over 512 random tokens (`graph_probe.routing_stats`)."""
    from .graph_probe import routing_stats
    from .runtime import LoadChoice, load

    llm = load(path, LoadChoice(full_budget=True), info=info, n_ctx=512, n_batch=512, n_ubatch=512)
    try:
        tokens = np.random.default_rng(0).integers(3, llm.n_vocab(), 512).tolist()
        return routing_stats(llm, tokens, ranks)
    finally:
        llm.close()
