"""Layer sensitivity S[l, k]: quality with MoE layer l at top-k, measured end to end.

One full-budget pass per calibration window caches the input of every MoE block (forward
pre-hooks) and the final hidden state; profiling block b then re-runs only blocks b..L-1,
the final norm and the LM head. Modes: ``isolated`` (every other layer at its original
top-k, the paper's definition) and ``deeper-top1`` (blocks after b forced to top-1, the
variant from the paper's notes). Every position of each window is scored; metrics are
perplexity and mean KL divergence to the full-budget model.

The full-budget pass also records each MoE layer's routing statistics (the quantiles of every
token's r-th largest routing score, r up to twice the model's top-k; `thresholds`), from which
`allocate` calibrates Alloc-T's decode rule.

The sensitivity file (`sensitivity`) is rewritten after each layer with ``"complete": false``,
so an interrupted run keeps its layers and the same command resumes from them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import sensitivity
from .errors import AllocMoeError
from .fsutil import atomic_write_json

ROUTING_RANKS = 2  # routing statistics cover ranks 1 .. ROUTING_RANKS x top-k (the decode rule's k_max)


@dataclass
class WindowCache:
    """What one full-budget pass over a window leaves behind (hidden states kept on the CPU)."""

    inputs: dict[int, tuple[torch.Tensor, torch.device, dict[str, Any]]]  # block -> (hidden, its device, kwargs)
    final: tuple[torch.Tensor, torch.device]  # hidden states entering the final norm


def _final_norm(model: nn.Module, layers: nn.ModuleList) -> nn.Module:
    """The norm applied after the last decoder layer (a sibling of the layer list)."""
    for parent in model.modules():
        if any(child is layers for child in parent.children()):
            for name in ("norm", "final_layernorm", "ln_f"):
                if isinstance(getattr(parent, name, None), nn.Module):
                    return getattr(parent, name)
    raise AllocMoeError(f"could not find the final norm of {type(model).__name__}")


class CachedModel:
    """A causal LM whose MoE blocks can be re-run from cached inputs."""

    def __init__(self, model: nn.Module) -> None:
        from .hf import decoder_layers, input_device, moe_shape

        self.model = model
        self.info = moe_shape(model)
        self.layers = decoder_layers(model)
        self.norm = _final_norm(model, self.layers)
        self.lm_head = model.get_output_embeddings()
        self.device = input_device(model)

    def full_pass(self, ids: torch.Tensor) -> tuple[WindowCache, torch.Tensor]:
        """Run the full-budget model on ``ids [1, ctx]``; cache each MoE block's input; return the logits too."""
        blocks = sorted(layer.index for layer in self.info.layers)
        inputs: dict[int, tuple[torch.Tensor, torch.device, dict[str, Any]]] = {}
        final: list[tuple[torch.Tensor, torch.device]] = []

        def layer_hook(index: int):
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                hidden = args[0] if args else kwargs["hidden_states"]
                rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                inputs[index] = (hidden.detach().cpu(), hidden.device, rest)

            return hook

        handles = [self.layers[b].register_forward_pre_hook(layer_hook(b), with_kwargs=True) for b in blocks]
        handles.append(
            self.norm.register_forward_pre_hook(lambda m, args: final.append((args[0].detach().cpu(), args[0].device)))
        )
        try:
            logits = self.model(ids.to(self.device), use_cache=False).logits[0]
        finally:
            for handle in handles:
                handle.remove()
        return WindowCache(inputs=inputs, final=final[0]), logits

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[ctx, V]`` from the hidden states entering the final norm."""
        return self.lm_head(self.norm(hidden))[0]

    def reference(self, cache: WindowCache) -> torch.Tensor:
        """The full-budget logits of a cached window, recomputed (cheaper than keeping [ctx, V] per window)."""
        hidden, device = cache.final
        return self.head(hidden.to(device))

    def run_from(self, cache: WindowCache, block: int) -> torch.Tensor:
        """Logits ``[ctx, V]`` from re-running blocks ``block..L-1`` on the cached input of ``block``."""
        hidden, device, kwargs = cache.inputs[block]
        hidden = hidden.to(device)
        for layer in self.layers[block:]:
            out = layer(hidden, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return self.head(hidden)


def profile_layers(
    model: nn.Module,
    windows: torch.Tensor,
    mode: str = "isolated",
    skip: frozenset[int] = frozenset(),
    on_layer: Callable[[dict[str, Any], dict[str, float], dict[str, Any]], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]], dict[str, Any]]:
    """Measure S[l, k] for every MoE block not in ``skip``.

    Returns ``(full, layers, cost, routing)``: the full-budget ``{"ppl", "nll"}``, one
    ``{"layer", "ppl", "kld"}`` entry per profiled block, ``{"seconds", "layer_forwards"}`` and
    the routing statistics of the full-budget pass (one `thresholds.LayerRouting` per MoE block).
    ``on_layer(entry, full, cost)`` runs after each block; ``on_progress(n)`` after every n layer forwards.
    """
    from .hf import layer_topk, routing_scores
    from .thresholds import rank_quantiles
    from .torch_eval import Quality

    sensitivity.check_mode(mode)
    start = time.monotonic()
    cm = CachedModel(model)
    k_orig, n_layer = cm.info.k_orig, cm.info.n_layer
    blocks = [layer.index for layer in cm.info.layers]
    forwards = 0
    layers: list[dict[str, Any]] = []

    def cost() -> dict[str, Any]:
        return {"seconds": time.monotonic() - start, "layer_forwards": forwards}

    with torch.no_grad():
        caches = []
        full = Quality()
        with routing_scores(model, ROUTING_RANKS * k_orig) as scores:
            for window in windows:
                cache, logits = cm.full_pass(window.unsqueeze(0))
                caches.append(cache)
                full.add(logits[:-1], window[1:].to(logits.device))
                forwards += n_layer
                if on_progress:
                    on_progress(n_layer)
        routing = [rank_quantiles(b, torch.cat(scores[b]).numpy()) for b in blocks]
        full_result = full.result()
        for block in (b for b in blocks if b not in skip):
            deeper = {b: 1 for b in blocks if b > block} if mode == "deeper-top1" else {}
            ks = range(1, k_orig + (0 if mode == "isolated" else 1))  # isolated k_orig is the full model
            scores = {k: Quality() for k in ks}
            for window, cache in zip(windows, caches):
                reference = cm.reference(cache)[:-1]
                targets = window[1:].to(reference.device)
                for k in ks:
                    with layer_topk(model, {**deeper, block: k}):
                        logits = cm.run_from(cache, block)[:-1]
                    scores[k].add(logits, targets.to(logits.device), reference.to(logits.device))
                forwards += (n_layer - block) * len(ks)
                if on_progress:
                    on_progress((n_layer - block) * len(ks))
            results = [scores[k].result() for k in ks]
            if len(ks) < k_orig:
                results.append({"ppl": full_result["ppl"], "kld": 0.0})
            entry = {"layer": block, "ppl": [r["ppl"] for r in results], "kld": [r["kld"] for r in results]}
            layers.append(entry)
            if on_layer:
                on_layer(entry, full_result, cost())
    return full_result, layers, cost(), routing


def planned_forwards(n_layer: int, blocks: list[int], k_orig: int, n_windows: int, mode: str) -> int:
    """Layer forwards a profile run performs: one full pass plus blocks b..L-1 per (block, k)."""
    ks = k_orig - 1 if mode == "isolated" else k_orig
    return n_windows * (n_layer + sum((n_layer - b) * ks for b in blocks))


def _resumable(out: Path, header: dict[str, Any]) -> dict[str, Any] | None:
    """The partial sensitivity file at ``out`` if it belongs to this run, else None (nothing there).

    A complete file is overwritten; a partial one from another model, text or mode is an error.
    """
    if not out.exists():
        return None
    previous = sensitivity.read(out)
    if not isinstance(previous, dict) or previous.get("complete", True):
        return None
    same = all(previous.get(key) == header[key] for key in sensitivity.RESUME_KEYS)
    if not same:
        raise AllocMoeError(
            f"{out} holds a partial profile of another model, calibration text or mode; "
            "delete it or choose another output file"
        )
    return previous


def run_profile(
    model_dir: str | os.PathLike[str],
    calib: str | os.PathLike[str],
    out: str | os.PathLike[str],
    mode: str = "isolated",
    ctx: int = 256,
    max_tokens: int | None = None,
    max_memory: str | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Profile the model in ``model_dir`` on ``calib`` and write the sensitivity file ``out``.

    Resumes from a partial ``out`` of the same run. ``on_start(total)`` gets the number of
    layer forwards still to do. Returns the sensitivity document.
    """
    from .fsutil import read_text
    from .hf import load_model, moe_shape
    from .torch_eval import token_windows

    sensitivity.check_mode(mode)
    out = Path(out)
    text, described = read_text(calib)
    model, tokenizer = load_model(model_dir, max_memory, offload_folder)
    info = moe_shape(model)
    windows = token_windows(tokenizer, text, ctx, max_tokens)
    doc = sensitivity.new_document(info.plan_shape, {**described, "n_tokens": windows.numel(), "ctx": ctx}, mode)
    previous = _resumable(out, doc) or {}
    done = {entry["layer"]: entry for entry in previous.get("layers", [])}
    before = previous.get("cost", doc["cost"])
    todo = [layer.index for layer in info.layers if layer.index not in done]
    if on_start:
        on_start(planned_forwards(info.n_layer, todo, info.k_orig, len(windows), mode))

    def total(cost: dict[str, Any]) -> dict[str, Any]:
        return {key: before[key] + cost[key] for key in ("seconds", "layer_forwards")}

    def save(entry: dict[str, Any], full: dict[str, float], cost: dict[str, Any]) -> None:
        done[entry["layer"]] = entry
        doc.update(full=full, layers=[done[b] for b in sorted(done)], cost=total(cost))
        atomic_write_json(out, doc)

    full, _, cost, routing = profile_layers(
        model,
        windows,
        mode,
        skip=frozenset(done),
        on_layer=save,
        on_progress=on_progress,
    )
    doc.update(full=full, complete=True, layers=[done[b] for b in sorted(done)], cost=total(cost),
               routing={"score": info.routing.score, "layers": [r.to_dict() for r in routing]})
    atomic_write_json(out, doc)
    return doc
