#!/usr/bin/env python3
"""Summary of a scripts/torch_table.sh folder: methods side by side per budget, and the DP's additivity.

Reads ``eval.json`` (torch backend), ``eval-llama.json`` (llama backend), ``refined-<b>.json``
and ``additivity-<b>.json``; prints markdown: one table per backend whose cells are mean KL
divergence to full budget / perplexity, then the additivity table (the DP's predicted calibration
KLD, a sum of isolated per-layer costs, against the plan's measured calibration KLD).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from allocmoe_edge.presentation import table

# column -> (eval row method, whether the row runs Alloc-T)
COLUMNS = {"uniform": ("uniform", False), "Alloc-T": ("uniform+t", True), "Alloc-L": ("alloc-l", False),
           "Alloc-L+T": ("alloc-l+t", True), "refine (+T)": ("refined+t", True)}


def plan_rows(result: dict[str, Any]) -> dict[tuple[str, float], dict[str, Any]]:
    """Stored-plan rows of an eval result by (method, budget); the full-budget row under ("full", 1.0)."""
    rows = {(r["method"], round(r["budget"], 6)): r for r in result["results"] if "(plan " in r["name"]}
    rows[("full", 1.0)] = result["results"][0]
    return rows


def method_table(result: dict[str, Any]) -> str:
    """Budgets (largest first) x methods; cells ``KLD / PPL``; the best KLD of a row in bold."""
    rows = plan_rows(result)
    budgets = sorted({b for (_, b) in rows}, reverse=True)
    full_budget = result["results"][0]["activations_per_token"]
    lines = []
    for b in budgets:
        cells = [rows.get(("full", 1.0) if b == 1.0 else (method, b)) for method, _ in COLUMNS.values()]
        best = min(c["kld_mean"] for c in cells if c)
        text = [("-" if c is None else (f"**{c['kld_mean']:.4f}**" if c["kld_mean"] == best and b < 1
                                         else f"{c['kld_mean']:.4f}") + f" / {c['ppl']:.2f}") for c in cells]
        lines.append([f"{100 * b:g} % ({round(b * full_budget)})", *text])
    return table(["budget", *COLUMNS], lines, numbers_from=1)


def verdict(result: dict[str, Any]) -> str:
    """Alloc-L+T against uniform at every budget below 100 %: relative KLD change, or a tie."""
    rows = plan_rows(result)
    parts = []
    for (method, b), row in sorted(rows.items(), key=lambda kv: kv[0][1]):
        if method == "alloc-l+t":
            uniform = rows[("uniform", b)]["kld_mean"]
            change = "tie (identical plans)" if row["kld_mean"] == uniform else \
                f"{100 * (row['kld_mean'] / uniform - 1):+.0f} %"
            parts.append(f"{100 * b:g} %: {change}")
    return "Alloc-L+T against uniform in mean KLD: " + ", ".join(parts) + "."


def additivity_table(folder: Path) -> str:
    """Per budget: the Alloc-L plan, its predicted and measured calibration KLD (Alloc-T off), the
    Alloc-L+T plan measured on the same text, and what refine kept."""
    head = ["budget", "Alloc-L counts", "predicted KLD", "measured KLD", "measured / predicted", "Alloc-L+T measured",
            "refine kept / tried"]
    lines = []
    for path in sorted(folder.glob("additivity-*.json"), key=lambda p: -float(p.stem.split("-")[1])):
        plan = json.loads(path.read_text())
        refined = json.loads((folder / path.name.replace("additivity", "refined")).read_text())["measured"]
        predicted, measured = plan["predicted"]["kld"], plan["measured"]["kld"]
        lines.append([f"{100 * plan['budget']['fraction']:g} % ({plan['budget']['count']})", str(plan["counts"]),
                      f"{predicted:.4f}", f"{measured:.4f}", f"{measured / predicted:.2f}",
                      f"{refined['initial']['measured']['kld']:.4f}",
                      f"{len(refined['moves'])} / {refined['evaluations'] - 1}"])
    return table(head, lines, numbers_from=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="output folder of scripts/torch_table.sh")
    args = ap.parse_args()
    for name, title in (("eval.json", "torch backend (bf16 weights)"), ("eval-llama.json", "llama backend (f32 GGUF)")):
        result = json.loads((args.folder / name).read_text())
        print(f"### {title}: {result['chunks']} held-out chunks of {result['ctx']} tokens; mean KLD / PPL\n")
        print(method_table(result) + "\n\n" + verdict(result) + "\n")
    print("### Additivity (calibration text, all positions scored, as the profile)\n")
    print(additivity_table(args.folder))


if __name__ == "__main__":
    main()
