#!/usr/bin/env python3
"""Held-out quality of the bundled tiny MoE under per-layer top-k plans.

Tokenizes the held-out text, cuts it into non-overlapping windows of ``--window`` tokens,
and records each window's mean next-token loss (float32, transformers) for every plan.
Reports perplexity per plan and paired differences (mean and standard error over
windows) against the full top-k and between plan pairs with equal totals.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "allocmoe_edge" / "assets"


def set_plan(model, plan: list[int]) -> None:
    """Set each MoE layer's router top-k (transformers 5.x Mixtral: ``mlp.gate.top_k``)."""
    layers = model.model.layers
    if len(plan) != len(layers):
        raise ValueError(f"plan has {len(plan)} entries for {len(layers)} layers")
    for layer, k in zip(layers, plan):
        layer.mlp.gate.top_k = k
        layer.mlp.top_k = k


@torch.no_grad()
def window_losses(model, windows: torch.Tensor, batch: int = 8) -> np.ndarray:
    """Mean next-token cross-entropy of each window."""
    out = []
    for i in range(0, len(windows), batch):
        x = windows[i:i + batch]
        logits = model(input_ids=x).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                reduction="none").view(len(x), -1)
        out.append(nll.mean(dim=1))
    return torch.cat(out).numpy()


def paired(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Mean loss difference b - a over windows and its standard error."""
    d = b - a
    return {"mean": float(d.mean()), "se": float(d.std(ddof=1) / math.sqrt(len(d)))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ASSETS / "tiny-moe")
    ap.add_argument("--text", type=Path, default=ASSETS / "heldout.txt")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--max-windows", type=int, default=0, help="0: all")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ASSETS / "QUALITY.json")
    args = ap.parse_args()

    from transformers import AutoTokenizer, MixtralForCausalLM

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(str(args.model))
    model = MixtralForCausalLM.from_pretrained(str(args.model), dtype=torch.float32).eval()
    model.config.output_router_logits = False
    n_layers, k_orig = model.config.num_hidden_layers, model.config.num_experts_per_tok
    ids = tok(args.text.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    n = len(ids) // args.window
    if args.max_windows:
        n = min(n, args.max_windows)
    windows = torch.tensor(ids[:n * args.window]).view(n, args.window)

    half, rest = n_layers // 2, n_layers - n_layers // 2
    plans = {f"top-{k}": [k] * n_layers for k in range(k_orig, 0, -1)}
    # equal-total plans that move activations between outer and inner / early and late layers
    for plan in ([k_orig, *[1] * (n_layers - 2), k_orig], [1, *[k_orig] * (n_layers - 2), 1],
                 [k_orig] * half + [1] * rest, [1] * half + [k_orig] * rest):
        plans[str(plan)] = plan
    # one layer at top-1, the others at full top-k: the per-layer sensitivity profile
    for layer in range(n_layers):
        plans[f"layer {layer} at 1"] = [1 if i == layer else k_orig for i in range(n_layers)]
    losses = {}
    for name, plan in plans.items():
        set_plan(model, plan)
        losses[name] = window_losses(model, windows)
        print(f"{name:16s} total {sum(plan):3d}  ppl {math.exp(losses[name].mean()):8.3f}", flush=True)
    full = losses[f"top-{k_orig}"]
    result = {
        "model": str(args.model.relative_to(REPO) if args.model.is_relative_to(REPO) else args.model),
        "text": str(args.text.relative_to(REPO) if args.text.is_relative_to(REPO) else args.text),
        "window": args.window, "windows": n, "tokens_scored": n * (args.window - 1),
        "plans": {name: {"plan": plan, "total": sum(plan), "mean_loss": float(losses[name].mean()),
                         "ppl": math.exp(losses[name].mean()), "vs_full": paired(full, losses[name])}
                  for name, plan in plans.items()},
        "pairs": {},
    }
    names = list(plans)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if sum(plans[a]) == sum(plans[b]) and plans[a] != plans[b]:
                result["pairs"][f"{b} - {a}"] = paired(losses[a], losses[b])
    for pair, d in result["pairs"].items():
        print(f"{pair}: loss diff {d['mean']:+.4f} +- {d['se']:.4f}")
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
