"""Quality of expert-count plans with the torch backend: PPL, KL divergence, top-1 agreement.

The windows and the metrics are `quality`'s, as in the llama.cpp backend (`evaluate`): windows
of ``ctx`` tokens, BOS first in each when the tokenizer has one, and only the second half of each
scored (``score_all`` scores every position, as ``profile`` does). Every plan is compared with
the full-budget model on the same windows. `evaluate_torch_plans` runs plan files as
`allocmoe eval --backend torch`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from . import __version__
from .errors import AllocMoeError
from .fsutil import read_text
from .plan import Plan
from .quality import Scores, chunk_tokens, log_probs, scored, scored_count


class PlanSpec(NamedTuple):
    """How a plan routes: counts per MoE layer, Alloc-T on (the batch rule over each window), and
    for Alloc-T's decode rule instead its threshold per MoE layer."""

    counts: Sequence[int]
    alloc_t: bool
    thresholds: Sequence[float] | None = None


def token_windows(tokenizer: Any, text: str, ctx: int, max_tokens: int | None = None) -> torch.Tensor:
    """``[n_windows, ctx]`` token ids of the first ``max_tokens`` tokens of ``text`` (BOS first when the
    tokenizer has one), cut by `quality.chunk_tokens`."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None:
        ids = [bos] + ids
    return torch.from_numpy(chunk_tokens(ids[:max_tokens], ctx, bos=bos))


def torch_names(summary: dict[str, float]) -> dict[str, float]:
    """A `quality.summarize` row in the names of `measure`, `profile` and `refine`: ``ppl``, ``nll`` and,
    when compared with the full-budget model, ``kld`` (the mean), ``kld_p99`` and ``top1``."""
    out = {"ppl": summary["ppl"], "nll": summary["nll"]}
    if "kld_mean" in summary:
        out.update(kld=summary["kld_mean"], kld_p99=summary["kld_p99"], top1=summary["top1"])
    return out


def _log_probs(logits: torch.Tensor) -> np.ndarray:
    return log_probs(logits.detach().float().cpu().numpy())


@dataclass
class Quality:
    """`quality.Scores` of torch logits, window by window."""

    scores: Scores = field(default_factory=Scores)

    def add(self, logits: torch.Tensor, targets: torch.Tensor, reference: torch.Tensor | None = None) -> None:
        """Score ``logits [N, V]`` predicting ``targets [N]``; compare with ``reference [N, V]`` if given."""
        ref = None if reference is None else _log_probs(reference)
        self.scores.add(_log_probs(logits), targets.cpu().numpy(), ref)

    def result(self) -> dict[str, float]:
        """`torch_names` of the scores so far."""
        return torch_names(self.scores.summary())


def _score(model: torch.nn.Module, windows: torch.Tensor, plans: Mapping[str, PlanSpec | tuple[Any, ...]],
           k_min: int, k_max: int | None, rows: slice, compare_full: bool,
           on_window: Callable[[], None] | None) -> tuple[Scores, dict[str, Scores], dict[str, float]]:
    """Scores of the full-budget model (against itself with ``compare_full``) and of every plan at
    ``rows`` of each window, and each plan's routed activations per token, summed over MoE layers."""
    from .hf import budget_routing, input_device

    device = input_device(model)
    full = Scores()
    scores = {name: Scores() for name in plans}
    spent: dict[str, list[float]] = {name: [] for name in plans}
    with torch.no_grad():
        for window in windows:
            ids = window.unsqueeze(0).to(device)
            targets = window[rows.start + 1:rows.stop + 1].cpu().numpy()
            ref = _log_probs(model(ids, use_cache=False).logits[0, rows])
            full.add(ref, targets, ref if compare_full else None)
            for name, spec in plans.items():
                counts, alloc_t, thresholds = PlanSpec(*spec)
                with budget_routing(model, counts, alloc_t, k_min, k_max, thresholds) as counter:
                    logits = model(ids, use_cache=False).logits[0, rows]
                scores[name].add(_log_probs(logits), targets, ref)
                spent[name].append(counter.total_per_token())
            if on_window is not None:
                on_window()
    return full, scores, {name: sum(s) / len(s) for name, s in spent.items()}


def measure(
    model: torch.nn.Module,
    windows: torch.Tensor,
    plans: Mapping[str, PlanSpec | tuple[Any, ...]],
    k_min: int = 1,
    k_max: int | None = None,
    score_all: bool = False,
    on_window: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Quality (`torch_names`) of the full-budget model (``"full"``) and of every plan on ``windows``.

    Each plan's entry also has ``activations_per_token``: routed activations actually
    executed per token, summed over MoE layers.
    """
    ctx = windows.shape[1]
    rows = slice(0, ctx - 1) if score_all else scored(ctx)
    full, scores, spent = _score(model, windows, plans, k_min, k_max, rows, False, on_window)
    return {
        "full": torch_names(full.summary()),
        "plans": {
            name: {
                "counts": list(PlanSpec(*spec).counts),
                "alloc_t": PlanSpec(*spec).alloc_t,
                **torch_names(scores[name].summary()),
                "activations_per_token": spent[name],
            }
            for name, spec in plans.items()
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
    """`evaluate.evaluate_llama`'s configurations and rows for a Hugging Face model.

    The plans come from plan JSON files (they give the model's shape); the result has
    evaluate_llama's layout.
    With ``decode`` the Alloc-T rows run the plans' decode rule (its thresholds), which routes
    every token by itself: a whole window in one pass equals decoding it one token at a time.
    """
    from .evaluate import configurations, result_row
    from .hf import load_model, plan_shape

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
    text, described = read_text(text_file)
    hf_model, tokenizer = load_model(model_dir)
    windows = token_windows(tokenizer, text, ctx, chunks * ctx if chunks else None)
    full, scores, spent = _score(hf_model, windows, specs, bounds[0], bounds[1] or None, scored(ctx), True, on_window)
    results = [result_row(c, spent.get(c.name, model.full_budget), counts[c.name], model.full_budget,
                          scores.get(c.name, full).summary()) for c in configs]
    return {
        "backend": "torch", "model": plan_shape(hf_model).to_dict(),
        "text": {"path": described["path"], "sha256": described["sha256"], "n_tokens": windows.numel()},
        "ctx": ctx, "chunks": len(windows), "scored_per_chunk": scored_count(ctx), "decode": decode,
        "results": results, "runtime": {"torch": torch.__version__}, "tool": f"allocmoe-edge {__version__}",
    }


def _decode_thresholds(plan: Plan) -> list[float]:
    """A plan's decode-rule thresholds per MoE layer as they run (`Plan.block_thresholds`)."""
    if plan.token_thresholds is None:
        raise AllocMoeError(f"the {plan.method} plan at budget {plan.budget.fraction:g} has no decode thresholds; "
                            "make it with `allocmoe allocate --alloc-t both` from a current profile")
    blocks = plan.block_thresholds()
    return [blocks[b] for b in plan.model.moe_layers]
