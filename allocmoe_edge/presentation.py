"""Tables and the plot: the markdown tables of `allocmoe eval`, `allocmoe bench` and the demo report, and
the quality-vs-speed frontier (PNG). Everything here formats results that other modules measured."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .benchstats import format_mean_sd, format_speedup, speedup
from .errors import AllocMoeError
from .evaluate import BUDGET_TOLERANCE
from .fsutil import atomic_output


def table(head: Sequence[str], rows: Sequence[Sequence[str]], numbers_from: int | None = None) -> str:
    """A markdown table; columns from index ``numbers_from`` on are right-aligned (numbers)."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    align = ["---" if numbers_from is None or i < numbers_from else "---:" for i in range(len(head))]
    return "\n".join([line(head), "|" + "|".join(align) + "|", *map(line, rows)])


# ---------------------------------------------------------------- quality

def eval_table(result: dict[str, Any]) -> str:
    """`allocmoe eval`'s quality table of an evaluation result; PPL(Q)/PPL(base) is relative to the first (full-budget)
    row."""
    rows = result["results"]
    base = rows[0]["ppl"]

    def pm(value: float | None, se: float | None, digits: int) -> str:
        if value is None:
            return "-"
        return f"{value:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.3f}"

    def ratio(r: dict[str, Any]) -> str:
        if r.get("ppl_ratio") is None:
            return f"{r['ppl'] / base:.4f}"
        return pm(r["ppl_ratio"], r.get("ppl_ratio_se"), 4)

    # llama-perplexity --kl-divergence's statistics, by its names, so a row reads beside a quantization table
    head = ["config", "budget", "act/token", "PPL", "PPL(Q)/PPL(base)", "KLD mean", "KLD median", "KLD p99",
            "RMS Δp %", "same top p %"]
    # decode rows: the least and the most activations per token over any window of `evaluate.WINDOW` tokens
    window = next((r["window"] for r in rows if r.get("window")), None)
    if window:
        head.insert(3, f"{window}-token windows")

    def cells(r: dict[str, Any]) -> list[str]:
        out = [r["name"], f"{r['budget']:.3f}", f"{r['activations_per_token']:g}", pm(r["ppl"], r.get("ppl_se"), 4),
               ratio(r), pm(r.get("kld_mean"), r.get("kld_se"), 6), pm(r.get("kld_median"), None, 6),
               pm(r.get("kld_p99"), None, 6), pct(r.get("rms_dp")), pct(r.get("top1"))]
        if window:
            low, high = r.get("window_min"), r.get("window_max")
            out.insert(3, "-" if low is None else f"{low:.3g} .. {high:.3g}")
        return out

    return table(head, [cells(r) for r in rows], numbers_from=1)


def demo_quality_table(rows: list[dict[str, Any]]) -> str:
    """The demo report's quality table (`demo.quality_rows`: each row with its decode limit)."""
    head = ["config", "budget", "act/token", "PPL", "KLD mean", "KLD p99", "top-1 %", "decode limit"]
    return table(head, [[r["config"], f"{100 * r['budget']:g}% ({r['budget_count']})",
                         f"{r['activations_per_token']:g}", f"{r['ppl']:.3f}", f"{r['kld_mean']:.5f}",
                         f"{r['kld_p99']:.4f}", f"{100 * r['top1']:.2f}", f"{r['decode_limit']:.2f}x"] for r in rows],
                 numbers_from=1)


# ---------------------------------------------------------------- speed

def _config_cells(result: dict[str, Any], row: dict[str, Any]) -> list[str]:
    """The cells naming a row: model, budget, method, Alloc-T ("on, fixed": its decode rule without the budget
    controller)."""
    alloc_t = ("on" if row.get("decode_control") is not False else "on, fixed") if row["alloc_t"] else "off"
    return [Path(result["model"]).name, f"{row['budget']:.2f} ({row['budget_count']})", row["method"], alloc_t]


def speed_table(result: dict[str, Any]) -> str:
    """Tokens/s (mean ± sd) of every test, speedups over full budget ("(tie)" within the noise) and
    the decode limit that applies (all weights, or the CPU-resident experts in a hybrid set-up)."""
    tests, limit = result["tests"], result["placement"]["limit"]
    head = ["model", "budget", "method", "alloc-t", "act/token decoded", *(f"{t} t/s" for t in tests),
            *(f"speedup {t}" for t in tests),
            "decode limit (CPU experts)" if limit == "decode_limit_cpu_experts" else "decode limit"]
    rows = []
    for r in result["rows"]:
        measured = r["tests"] or {}
        speed = [format_mean_sd(measured[t]) if measured else "failed" for t in tests]
        act = r.get("decode_activations")
        rows.append([*_config_cells(result, r), "-" if act is None else f"{act['total']:.2f}", *speed,
                     *(format_speedup(measured.get(t, {}).get("speedup")) for t in tests), f"{r[limit]:.2f}x"])
    return table(head, rows)


def latency_table(result: dict[str, Any]) -> str:
    """Time to first token per prompt size (mean ± sd, ms) and per-token decode latency percentiles (ms)."""
    prompts = result["options"]["prompts"]
    head = ["model", "budget", "method", "alloc-t", *(f"TTFT {n} ms" for n in prompts), "token p50 ms",
            "token p90 ms", "token p99 ms"]
    rows = []
    for r in result["rows"]:
        lat = r["latency"]
        if lat is None:
            cells = ["failed"] * (len(prompts) + 3)
        else:
            cells = [*(format_mean_sd(lat["ttft_ms"][str(n)], 1) for n in prompts),
                     *(f"{lat['token_ms'][p]:.2f}" for p in ("p50", "p90", "p99"))]
        rows.append([*_config_cells(result, r), *cells])
    return table(head, rows)


def bench_tables(result: dict[str, Any]) -> str:
    """`allocmoe bench`'s output: the speed table and, for a ``--latency`` run, the latency table."""
    tables = [speed_table(result)]
    if result["options"]["latency"]:
        tables.append(latency_table(result))
    return "\n\n".join(tables)


def alloc_t_cost(bench_result: dict[str, Any]) -> str:
    """A sentence per pp test on what Alloc-T costs: each Alloc-T row's speed over the same plan without
    it, ratio ± sd, "(tie)" within the noise; empty when no row pairs up."""
    rows = [r for r in bench_result["rows"] if r["tests"]]
    parts = []
    for row in (r for r in rows if r["alloc_t"]):
        base = next((r for r in rows if not r["alloc_t"] and r["method"] == row["method"].removesuffix("+t")
                     and r["counts"] == row["counts"]), None)
        if base is None:
            continue
        for name in (t for t in row["tests"] if t.startswith("pp")):
            ratio = speedup(row["tests"][name], base["tests"][name])
            sd = "" if ratio["sd"] is None else f" ± {ratio['sd']:.2f}"
            parts.append(f"{100 * row['budget']:g}%: {ratio['ratio']:.2f}x{sd}{' (tie)' if ratio['tie'] else ''}")
    if not parts:
        return ""
    return f"\nAlloc-T's prefill against the same plan without it (per-layer top-k): {', '.join(parts)}.\n"


# ---------------------------------------------------------------- frontier plot

def _speedup_of(row: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The speedup dict (ratio, sd, tie) of a row's first ``kind`` ("pp" or "tg") test; None when missing."""
    test = next((t for name, t in (row.get("tests") or {}).items() if name.startswith(kind)), None)
    return test.get("speedup") if test else None


def _matching_bench_row(eval_row: dict[str, Any], bench_rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The bench row with the eval row's method and Alloc-T and a budget within BUDGET_TOLERANCE."""
    return next((b for b in bench_rows
                 if b["method"] == eval_row.get("method") and bool(b["alloc_t"]) == bool(eval_row.get("alloc_t"))
                 and abs(b["budget"] - float(eval_row.get("budget", -1))) <= BUDGET_TOLERANCE), None)


def _by_method(points: list[tuple[str, float, Any]]) -> dict[str, list[tuple[float, Any]]]:
    """``(method, budget, payload)`` points grouped by method in budget order, largest first; the
    full-budget point (method "full") starts every other method's line."""
    full = [(budget, payload) for method, budget, payload in points if method == "full"][:1]
    series: dict[str, list[tuple[float, Any]]] = {}
    for method, budget, payload in sorted(points, key=lambda p: -p[1]):
        if method != "full":
            series.setdefault(method, list(full)).append((budget, payload))
    return series


def plot_frontier(eval_result: dict[str, Any], bench_result: dict[str, Any], output: str | Path,
                  speed: str = "tg", decode_limits: dict[str, float] | None = None) -> tuple[int, int]:
    """Two panels, one line per method with its points in budget order; returns (matched, eval rows).

    Left: mean KLD of each eval row against its decode limit (weight bytes read per token, full /
    row: deterministic), taken from ``decode_limits`` (eval row name -> limit) when given, else from
    the bench row with the same method, Alloc-T and budget (within 0.02). Right: every bench row's
    measured ``speed`` ("tg" or "pp") speedup over full budget against its budget, with ± sd error
    bars; a hollow marker is a tie (within the noise), and for tg the dotted lines are the decode
    limits. ``matched`` counts the eval rows that have a bench row with a measured speed; the bench
    may be of another file (a synthetic shape), whose rows are drawn all the same.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if speed not in ("tg", "pp"):
        raise AllocMoeError(f"speed {speed!r}: use tg or pp")
    eval_rows, bench_rows = eval_result.get("results", []), bench_result.get("rows", [])
    quality, matched = [], 0
    for e in eval_rows:
        match = _matching_bench_row(e, bench_rows)
        matched += bool(match and _speedup_of(match, speed))
        limit = (decode_limits or {}).get(e["name"]) if decode_limits is not None else (match or {}).get("decode_limit")
        if limit is not None and e.get("kld_mean") is not None:
            quality.append((str(e["method"]), float(e["budget"]), (float(limit), float(e["kld_mean"]))))
    measured = [(str(b["method"]), float(b["budget"]), (b, _speedup_of(b, speed))) for b in bench_rows]

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    for method, points in _by_method(quality).items():
        xs, ys = [p[0] for _, p in points], [p[1] for _, p in points]
        left.plot(xs, ys, marker="o", label=method)
        for (budget, _), x, y in zip(points, xs, ys):
            if budget < 1:
                left.annotate(f"{100 * budget:g}%", (x, y), textcoords="offset points", xytext=(4, 4),
                              fontsize=7)
    left.set_xlabel("decode limit: weight bytes per token, full / budget")
    left.set_ylabel("mean KL divergence to full budget")
    left.set_title(f"quality: {Path(str(eval_result.get('model', {}).get('path', ''))).name or 'eval'}", fontsize=10)
    limits: dict[float, float] = {}
    for method, points in _by_method([m for m in measured if m[2][1] is not None]).items():
        budgets = [100 * b for b, _ in points]
        ratios = [s["ratio"] for _, (_, s) in points]
        line = right.errorbar(budgets, ratios, yerr=[s.get("sd") or 0.0 for _, (_, s) in points], capsize=3,
                              label=method)[0]
        for x, y, (_, (_, s)) in zip(budgets, ratios, points):
            right.plot(x, y, "o", color=line.get_color(), markerfacecolor="none" if s.get("tie") else line.get_color())
        limits.update((x, row["decode_limit"]) for x, (_, (row, _)) in zip(budgets, points) if "decode_limit" in row)
    if speed == "tg" and limits:
        right.plot(sorted(limits), [limits[x] for x in sorted(limits)], ":", color="black", label="decode limit")
    right.axhline(1.0, color="grey", lw=0.8)
    right.set_xlabel("budget (% of full activations)")
    right.set_ylabel(f"{speed} speedup over full budget (mean ± sd)")
    synthetic = " (synthetic weights)" if bench_result.get("synthetic") else ""
    right.set_title(f"speed: {Path(str(bench_result.get('model', ''))).name}{synthetic}; hollow = tie", fontsize=10)
    for ax, empty in ((left, not quality), (right, not any(m[2][1] for m in measured))):
        if empty:
            ax.text(0.5, 0.5, "nothing to draw", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_output(output) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return matched, len(eval_rows)


# ---------------------------------------------------------------- demo report

def demo_report(model: str, run: dict[str, Any], rows: list[dict[str, Any]], eval_result: dict[str, Any],
                bench_result: dict[str, Any], speed_note: str, *, method: str, profile_mode: str, gguf: str,
                heldout: str, files: Sequence[str]) -> str:
    """The demo's ``report.md``: quality rows (`demo.quality_rows`), the speed table with ``speed_note`` on
    which file was measured, the frontier plot and the steps of ``run`` (the manifest's ``last_run``).
    ``method`` and ``profile_mode`` made the plans stored in ``gguf``; ``files`` are the artefacts made."""
    settings = run["settings"]
    steps = table(["step", "status", "seconds", "CPU seconds"],
                  [[k, v["status"], f"{v['seconds']:.1f}", f"{v['cpu_seconds']:.1f}"] for k, v in run["steps"].items()],
                  numbers_from=2)
    return f"""# allocmoe demo: {model}

{run['date']}, {run['tool']}, {settings['name']} settings, commit {bench_result['commit'] or 'unknown'}.
Plans: {method} (DP on the mean KL divergence of {profile_mode} layer profiles), stored together in {gguf}.

## Quality

{demo_quality_table(rows)}

{eval_result['chunks']} chunks of {eval_result['ctx']} tokens of {heldout} \
({eval_result['chunks'] * eval_result['scored_per_chunk']} scored tokens, llama-perplexity's protocol), \
llama.cpp; KLD and top-1 agreement are against the full-budget model. Decode limit: full-budget weight bytes \
read per generated token divided by the row's (deterministic, from the file's tensor sizes).

## Speed

{speed_note}

{speed_table(bench_result)}

Backend {bench_result['backend']}, threads {bench_result['threads']}/{bench_result['threads_batch']}, \
{settings['reps']} repetitions interleaved across configurations, mean ± sd. Speedups are over full budget in the \
same run; "(tie)" marks one within the measured noise (|ratio - 1| <= its sd): no faster than full budget.
{alloc_t_cost(bench_result)}
![quality vs decode limit, measured speed](frontier.png)

{steps}

Total {run['seconds']:.1f} s. Files: {', '.join(files)}, eval.json, bench.json, frontier.png, manifest.json.
"""
