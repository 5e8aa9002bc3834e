"""One table of the per-token rules side by side from scripts/peers_table.sh's `eval --decode --peers` JSON files.

usage: python scripts/peers_summary.py OUT   (reads OUT/<model>-<text>.json; prints markdown)

First the KLD (mean over scored tokens) and the measured activations per token of every rule per model, text and
budget, the lowest KLD in bold (SER and top-p calibrated on Python source, from OUT/<model>-code-codecal.json, in
the last two columns of the Python source rows); then every row in full (PPL, top-1, the 64-token window extremes).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

BUDGETS = (0.25, 0.5, 0.75)
RULES = ("uniform top-k", "SER", "top-p", "per-layer top-k", "decode rule, fixed", "decode rule, controlled",
         "SER, code-calibrated", "top-p, code-calibrated")
TEXTS = {"prose": "held-out prose (in-domain)", "code": "Python source (off-domain)"}


def rule_of(row: dict, code_calibrated: bool) -> str | None:
    """Which rule a result row ran (None: the full-budget row, and every row of a code-calibrated run but its
    SER and top-p ones, which repeat the first run's)."""
    method = row["method"]
    if code_calibrated:
        return {"ser": "SER, code-calibrated", "top_p": "top-p, code-calibrated"}.get(method)
    if method == "full":
        return None
    if method.endswith("+t"):
        return "decode rule, fixed" if row["name"].endswith(" fixed") else "decode rule, controlled"
    return {"uniform": "uniform top-k", "ser": "SER", "top_p": "top-p"}.get(method, "per-layer top-k")


def nominal(budget: float) -> float:
    """The budget a row was calibrated or planned to (its measured budget is within a few % of it)."""
    return min(BUDGETS, key=lambda b: abs(b - budget))


def main(out: Path) -> None:
    summary, full = [], []
    cells: dict[tuple[str, str, float], dict[str, dict]] = {}
    for path in sorted(p for text in ("prose", "code") for p in out.glob(f"*-{text}.json")):
        model, text = path.stem.rsplit("-", 1)
        codecal = out / f"{model}-code-codecal.json"
        runs = [(path, False)] + ([(codecal, True)] if text == "code" and codecal.exists() else [])
        for run, code_calibrated in runs:
            for row in json.loads(run.read_text())["results"]:
                rule = rule_of(row, code_calibrated)
                if rule is None:
                    continue
                cells.setdefault((model, text, nominal(row["budget"])), {})[rule] = row
                windows = f"{row['window_min']:.3g} .. {row['window_max']:.3g}"
                full.append(f"| {model} | {text} | {nominal(row['budget']):.0%} | {rule} | {row['name']} | "
                            f"{row['activations_per_token']:.3f} | {windows} | {row['kld_mean']:.5f} ± "
                            f"{row['kld_se']:.5f} | {row['ppl']:.3f} | {100 * row['top1']:.2f} |")
    for (model, text, budget), rows in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1] != "prose", kv[0][2])):
        best = min(r["kld_mean"] for r in rows.values())
        line = [model, TEXTS[text], f"{budget:.0%}"]
        for rule in RULES:
            r = rows.get(rule)
            kld = "-" if r is None else f"{r['kld_mean']:.4f}"
            if r is not None and r["kld_mean"] == best:
                kld = f"**{kld}**"
            line.append("-" if r is None else f"{kld} ({r['activations_per_token']:.2f})")
        summary.append("| " + " | ".join(line) + " |")
    print("KLD to full budget (measured activations per token), one token per ubatch:\n")
    print("| model | text | budget | " + " | ".join(RULES) + " |")
    print("|---|---|---:|" + "---:|" * len(RULES))
    print("\n".join(summary))
    print("\nEvery row:\n")
    print("| model | text | budget | rule | config | act/token | 64-token windows | KLD mean | PPL | top-1 % |")
    print("|---|---|---:|---|---|---:|---:|---:|---:|---:|")
    print("\n".join(full))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
