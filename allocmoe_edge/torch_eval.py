"""Quality of expert-count plans with the torch backend: PPL, KL divergence, top-1 agreement.

Text is cut into windows of ``ctx`` tokens the way llama-perplexity does (the first token of
each window is BOS when the tokenizer has one) and, as there, only the second half of each
window is scored (``score_all`` scores every position, as ``profile`` does). Every plan is
compared with the full-budget model on the same windows. `evaluate_torch_plans` runs plan files
as `allocmoe eval --backend torch`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from . import __version__
from .errors import AllocMoeError
from .fsutil import read_text
from .plan import Plan


class PlanSpec(NamedTuple):
    """How a plan routes: counts per MoE layer, Alloc-T on (the batch rule over each window), and
    for Alloc-T's decode rule instead its threshold per MoE layer."""

    counts: Sequence[int]
    alloc_t: bool
    thresholds: Sequence[float] | None = None


def token_windows(tokenizer: Any, text: str, ctx: int, max_tokens: int | None = None) -> torch.Tensor:
    """``[n_windows, ctx]`` token ids: consecutive windows of ``text``, BOS first in each when the tokenizer has one."""
    if ctx < 4:
        raise AllocMoeError(f"context {ctx} is too short; use at least 4 tokens")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None:
        ids = [bos] + ids
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = len(ids) // ctx
    if n == 0:
        raise AllocMoeError(f"the text has {len(ids)} tokens, fewer than one window of {ctx}; use more text or "
                            "a smaller --ctx")
    windows = torch.tensor(ids[: n * ctx], dtype=torch.long).view(n, ctx)
    if bos is not None:
        windows[:, 0] = bos
    return windows


@dataclass
class Quality:
    """Accumulates token NLL and, against reference logits, KL divergence and top-1 agreement."""

    nll_sum: float = 0.0
    n_tokens: int = 0
    top1_same: int = 0
    kld: list[torch.Tensor] = field(default_factory=list)

    def add(self, logits: torch.Tensor, targets: torch.Tensor, reference: torch.Tensor | None = None) -> None:
        """Score ``logits [N, V]`` predicting ``targets [N]``; compare with ``reference [N, V]`` if given."""
        logp = logits.float().log_softmax(dim=-1)
        self.nll_sum -= float(logp.gather(-1, targets.unsqueeze(-1)).double().sum())
        self.n_tokens += targets.numel()
        if reference is not None:
            ref = reference.float().log_softmax(dim=-1)
            self.kld.append((ref.exp() * (ref - logp)).sum(dim=-1).clamp_min(0).cpu())
            self.top1_same += int((ref.argmax(dim=-1) == logp.argmax(dim=-1)).sum())

    def result(self) -> dict[str, float]:
        """``ppl`` and ``nll`` (mean per token), plus ``kld``, ``kld_p99`` and ``top1`` when compared."""
        nll = self.nll_sum / self.n_tokens
        out = {"ppl": math.exp(nll), "nll": nll}
        if self.kld:
            kld = torch.cat(self.kld).double()
            out.update(
                kld=float(kld.mean()),
                kld_p99=float(torch.quantile(kld, 0.99)),
                top1=self.top1_same / self.n_tokens,
            )
        return out


def measure(
    model: torch.nn.Module,
    windows: torch.Tensor,
    plans: Mapping[str, PlanSpec | tuple[Any, ...]],
    k_min: int = 1,
    k_max: int | None = None,
    score_all: bool = False,
    on_window: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Quality of the full-budget model (``"full"``) and of every plan on ``windows``.

    Each plan's entry also has ``activations_per_token``: routed activations actually
    executed per token, summed over MoE layers.
    """
    from .hf import expert_counts, input_device

    device = input_device(model)
    first = 0 if score_all else windows.shape[1] // 2
    full = Quality()
    scores = {name: Quality() for name in plans}
    spent: dict[str, list[float]] = {name: [] for name in plans}
    with torch.no_grad():
        for window in windows:
            ids = window.unsqueeze(0).to(device)
            targets = window[first + 1 :].to(device)
            reference = model(ids, use_cache=False).logits[0, first:-1]
            full.add(reference, targets.to(reference.device))
            for name, spec in plans.items():
                counts, alloc_t, thresholds = PlanSpec(*spec)
                with expert_counts(model, counts, alloc_t, k_min, k_max, thresholds) as counter:
                    logits = model(ids, use_cache=False).logits[0, first:-1]
                scores[name].add(logits, targets.to(logits.device), reference.to(logits.device))
                spent[name].append(counter.total_per_token())
            if on_window is not None:
                on_window()
    return {
        "full": full.result(),
        "plans": {
            name: {
                "counts": list(PlanSpec(*plans[name]).counts),
                "alloc_t": PlanSpec(*plans[name]).alloc_t,
                **scores[name].result(),
                "activations_per_token": sum(spent[name]) / len(spent[name]),
            }
            for name in plans
        },
    }


def evaluate_torch(
    model_dir: str | os.PathLike[str],
    text_file: str | os.PathLike[str],
    plans: Mapping[str, PlanSpec | tuple[Any, ...]],
    ctx: int = 512,
    max_tokens: int | None = None,
    k_min: int = 1,
    k_max: int | None = None,
    max_memory: str | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    on_window: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Load the model in ``model_dir`` and measure every plan on ``text_file`` (JSON-able result).

    ``plans`` maps a name to ``(counts per MoE layer, alloc_t)``; Alloc-T plans use
    ``k_min`` / ``k_max`` (default: the model's top-k).
    """
    from .hf import load_model, plan_shape

    text, described = read_text(text_file)
    model, tokenizer = load_model(model_dir, max_memory, offload_folder)
    windows = token_windows(tokenizer, text, ctx, max_tokens)
    result = measure(model, windows, plans, k_min, k_max, on_window=on_window)
    return {
        "backend": "torch",
        "model": plan_shape(model).to_dict(),
        "text": {**described, "n_tokens": windows.numel(), "ctx": ctx},
        **result,
    }


def evaluate_torch_plans(model_dir: str | os.PathLike[str], text_file: str | os.PathLike[str],
                         plan_files: Sequence[str | os.PathLike[str]], ctx: int = 256, chunks: int | None = None,
                         budgets: Sequence[float] | None = None, decode: bool = False,
                         on_window: Callable[[], None] | None = None) -> dict[str, Any]:
    """`evaluate.evaluate_llama`'s configurations for a Hugging Face model, through `evaluate_torch`.

    The plans come from plan JSON files (they give the model's shape); the result has
    evaluate_llama's layout, without standard errors and Δp, which torch_eval does not compute.
    With ``decode`` the Alloc-T rows run the plans' decode rule (its thresholds), which routes
    every token by itself: a whole window in one pass equals decoding it one token at a time.
    """
    from .evaluate import configurations, result_row, scored_count

    if not plan_files:
        raise AllocMoeError("the torch backend evaluates plan files: give at least one --plan")
    plans = [Plan.load(p) for p in plan_files]
    model, bounds = plans[0].model, (plans[0].token_k_min, plans[0].token_k_max)
    for path, p in zip(plan_files, plans):
        if p.model != model or (p.token_k_min, p.token_k_max) != bounds:
            raise AllocMoeError(f"{path} is for another model shape or other Alloc-T bounds than {plan_files[0]}; "
                                "evaluate it in a separate run")
    configs = configurations([(p.method, p.budget.fraction) for p in plans], model.k_orig, bool(bounds[1]), budgets)
    n_moe = len(model.moe_layers)
    counts = {c.name: list(plans[c.plan].counts) if c.plan is not None else [c.k or model.k_orig] * n_moe
              for c in configs}
    specs = {c.name: (counts[c.name], c.alloc_t, _decode_thresholds(plans[c.plan]) if decode and c.alloc_t else None)
             for c in configs[1:]}
    raw = evaluate_torch(model_dir, text_file, specs,
                         ctx=ctx, max_tokens=chunks * ctx if chunks else None, k_min=bounds[0],
                         k_max=bounds[1] or None, on_window=on_window)
    results = []
    for c in configs:
        r = raw["plans"].get(c.name, {**raw["full"], "activations_per_token": model.full_budget})
        quality = {"ppl": r["ppl"], "ppl_se": None, "kld_mean": r.get("kld", 0.0), "kld_se": None,
                   "kld_p99": r.get("kld_p99", 0.0), "top1": r.get("top1", 1.0), "rms_dp": None, "nll": r["nll"]}
        results.append(result_row(c, r["activations_per_token"], counts[c.name], model.full_budget, quality))
    return {
        "backend": "torch", "model": raw["model"],
        "text": {"path": raw["text"]["path"], "sha256": raw["text"]["sha256"], "n_tokens": raw["text"]["n_tokens"]},
        "ctx": ctx, "chunks": raw["text"]["n_tokens"] // ctx, "scored_per_chunk": scored_count(ctx), "decode": decode,
        "results": results, "runtime": {"torch": torch.__version__}, "tool": f"allocmoe-edge {__version__}",
    }


def _decode_thresholds(plan: Plan) -> list[float]:
    """A plan's decode-rule thresholds per MoE layer, inf / -inf where it keeps k_min / k_max experts."""
    if plan.token_thresholds is None:
        raise AllocMoeError(f"the {plan.method} plan at budget {plan.budget.fraction:g} has no decode thresholds; "
                            "make it with `allocmoe allocate --alloc-t both` from a current profile")
    blocks = plan.block_thresholds()
    return [blocks[b] for b in plan.model.moe_layers]
