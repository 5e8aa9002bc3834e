"""Speed in llama-bench's style: pp / tg tokens/s per budget and method, with the physical limit.

Every configuration runs in its own child process (`bench_worker`), so an abort inside
llama.cpp costs that row only (marked with its error). The model is loaded once with the
configuration's scalar kv_overrides, then: one
warm-up prompt and one warm-up generated token, ``reps`` timed prompt runs (KV cache
cleared, ``n_prompt`` random tokens in one llama_decode, n_batch = n_ubatch = n_prompt)
and ``reps`` timed generation runs (KV cache cleared, ``n_gen`` tokens decoded one at a
time); each run ends with llama_synchronize. The rows are those of `allocmoe eval`
(`evaluate.gguf_configurations`), so quality and speed tables line up:

* ``full``: full budget (allocmoe.enabled = false), the baseline of every speedup;
* each stored plan near a requested budget, with Alloc-T as stored (method ``<m>+t``, when
  the file enables it) and with Alloc-T off (``token_k_max = 0``);
* ``uniform``: llama.cpp's own ``<arch>.expert_used_count`` override with top-k =
  round-half-up(budget x K_orig) in every MoE layer; rows report the activation count they
  really run (it equals the budget only when budget x K_orig is an integer).

A file without plans is benchmarked through a temporary copy holding "uniform-split"
plans (Alloc-T enabled): the exact budget count spread evenly over the MoE layers, since a
synthetic file has no sensitivity profile.

The decode limit is the ratio of weight bytes read per generated token (full / row):
all tensors except routed experts, of which each MoE layer reads k_l of n_expert (at
T = 1 Alloc-T is exactly top-k_l), and one row of token_embd (all of it when it doubles
as the output matrix). KV-cache traffic is not counted.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from .bench_worker import llama_kwargs, measure_isolated
from .errors import AllocMoeError
from .evaluate import BUDGET_TOLERANCE
from .fsutil import scratch_dir
from .gguf_meta import PREFIX, ModelInfo, copy_with_metadata, open_reader, plan_fields, plan_for_counts, read_info

FORMAT = "allocmoe-bench"
VERSION = 1
_EXPERT_TENSOR = re.compile(r"blk\.(\d+)\.ffn_(?:gate|up|down|gate_up)_exps\.")


@dataclass(frozen=True)
class BenchOptions:
    """What a bench run measures; saved with its results."""

    budgets: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)
    reps: int = 3
    n_prompt: int = 512  # pp test: tokens in one llama_decode
    n_gen: int = 128  # tg test: tokens decoded one at a time
    threads: int | None = None  # None: llama-cpp-python's defaults
    n_gpu_layers: int = 0
    flash_attn: bool = False
    seed: int = 0  # of the random prompt tokens
    timeout: float | None = None  # seconds per configuration (load and all its tests)

    def check(self) -> None:
        if not self.budgets or not all(0 < b <= 1 for b in self.budgets):
            raise AllocMoeError(f"budgets {list(self.budgets)} must be fractions in (0, 1]")
        if self.reps < 1:
            raise AllocMoeError("--reps must be at least 1")
        if self.n_prompt < 0 or self.n_gen < 0 or self.n_prompt + self.n_gen == 0:
            raise AllocMoeError("-p and -n must be >= 0 and not both 0")


def configurations(info: ModelInfo, budgets: tuple[float, ...] | None) -> list[Any]:
    """The rows `allocmoe eval` makes for this file (`evaluate.gguf_configurations`), so the tables match;
    ``budgets`` None runs every stored plan."""
    from .evaluate import gguf_configurations

    return gguf_configurations(info, None if budgets is None else list(budgets))


def executed_counts(info: ModelInfo, config: Any) -> tuple[int, ...]:
    """Experts per MoE layer that ``config`` (an `evaluate.EvalConfig`) runs for a single token."""
    if config.plan is not None:
        return tuple(info.plans[config.plan].counts[layer] for layer in info.moe_layers)
    return (config.k or info.expert_used_count,) * len(info.moe_layers)


def uniform_split_counts(info: ModelInfo, budget: float) -> list[int]:
    """The budget's activation count spread evenly over the MoE layers (earlier layers get the remainder)."""
    from .gguf_meta import identity
    from .plan import Budget

    total = Budget.parse(budget, identity(info)).count
    base, extra = divmod(total, len(info.moe_layers))
    return [base + 1] * extra + [base] * (len(info.moe_layers) - extra)


def stamp_uniform_split(src: str | Path, dst: str | Path, budgets: tuple[float, ...]) -> ModelInfo:
    """Copy ``src`` to ``dst`` with a "uniform-split" plan per budget below 1 and Alloc-T enabled."""
    from .synth import SYNTHETIC_KEY

    info = read_info(src)
    plans = [plan_for_counts(info, uniform_split_counts(info, b), "uniform-split", f"uniform-split@{b:g}")
             for b in sorted({b for b in budgets if b < 1}, reverse=True)]
    fields = plan_fields(info, plans, k_min=1, k_max=info.expert_used_count,
                         provenance={"source": Path(src).name, "calibration": "none (uniform split)"})
    copy_with_metadata(src, dst, fields, drop=lambda k: k.startswith(PREFIX) and k != SYNTHETIC_KEY)
    return read_info(dst)


@dataclass(frozen=True)
class WeightTraffic:
    """Weight bytes one generated token reads: a fixed part plus, per MoE block, k x one expert's bytes."""

    fixed: int
    per_expert: dict[int, int]  # MoE block -> bytes of one routed expert (all its tensors)

    @classmethod
    def of(cls, path: str | Path, info: ModelInfo) -> WeightTraffic:
        """Read the tensor sizes of ``path``: routed experts apart, one row of token_embd when
        output.weight exists (a lookup), everything else whole."""
        tensors = open_reader(path).tensors
        has_output = any(t.name == "output.weight" for t in tensors)
        fixed, per_expert = 0, dict.fromkeys(info.moe_layers, 0)
        for t in tensors:
            m = _EXPERT_TENSOR.match(t.name)
            if m:
                per_expert[int(m.group(1))] += int(t.n_bytes) // info.expert_count
            elif t.name == "token_embd.weight" and has_output:
                fixed += int(t.n_bytes) // int(t.shape[-1])
            else:
                fixed += int(t.n_bytes)
        return cls(fixed, per_expert)

    def per_token(self, counts: tuple[int, ...]) -> int:
        """Bytes per token when the MoE blocks (in order) use ``counts`` experts."""
        return self.fixed + sum(k * b for k, b in zip(counts, self.per_expert.values()))


def _ratio(row: dict[str, Any], base: dict[str, Any], key: str) -> float | None:
    if row[key] is None or base[key] is None:
        return None
    return row[key]["mean"] / base[key]["mean"]


def environment(opts: BenchOptions) -> dict[str, Any]:
    """Commit, patch hash, runtime and hardware: what a speed number must carry."""
    from . import hwinfo
    from .build_runtime import patch_hash
    from .runtime import doctor

    report = doctor()
    return {
        "commit": hwinfo.git_commit(), "patch_hash": patch_hash(),
        "allocmoe_patch_version": report.get("allocmoe_patch_version"),
        "llama_cpp_python": report.get("llama_cpp_python"), "library": report.get("library"),
        "backend": hwinfo.backend(report), "system_info": report.get("system_info"),
        "cpu": hwinfo.cpu_model(), "gpus": hwinfo.gpu_names(),
        "n_gpu_layers": opts.n_gpu_layers,
        "flags": {"n_prompt": opts.n_prompt, "n_gen": opts.n_gen, "reps": opts.reps, "flash_attn": opts.flash_attn,
                  **{k: v for k, v in llama_kwargs(opts).items() if k.startswith("n_")}, "seed": opts.seed},
    }


def bench(model: str | Path, opts: BenchOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Benchmark every configuration of ``model`` at ``opts.budgets`` in one run; returns the JSON result."""
    from .runtime import patch_version
    from .synth import is_synthetic

    opts.check()
    info = read_info(model)
    if not info.moe_layers:
        raise AllocMoeError(f"{model} has no MoE layers; nothing to budget")
    if patch_version() is None:
        raise AllocMoeError("bench needs the patched llama-cpp-python (budget plans would run at full budget); "
                            "run `allocmoe build-runtime`")
    result: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "model": str(model), "architecture": info.architecture,
        "synthetic": is_synthetic(info), "full_budget": info.full_budget, "options": asdict(opts),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **environment(opts),
    }
    path = Path(model)
    with scratch_dir(path.parent, ".bench-") as scratch:
        budgets: tuple[float, ...] | None = opts.budgets
        if info.plans or all(b == 1 for b in opts.budgets):
            result["plans_source"] = "file" if info.plans else "none"
        else:
            log("no stored plans: stamping uniform-split plans into a temporary copy")
            path = scratch / path.name
            info = stamp_uniform_split(model, path, opts.budgets)
            result["plans_source"] = "uniform-split"
            budgets = None  # run every plan just stamped, even where the count rounds away from the fraction
        traffic = WeightTraffic.of(path, info)
        full_bytes = traffic.per_token((info.expert_used_count,) * len(info.moe_layers))
        result["bytes_per_token_full"] = full_bytes
        rows: list[dict[str, Any]] = []
        for config in configurations(info, budgets):
            log(f"measuring {config.name}")
            counts = executed_counts(info, config)
            used = traffic.per_token(counts)
            choice = config.choice()
            row = {"name": config.name, "method": config.method, "alloc_t": config.alloc_t,
                   "budget": sum(counts) / info.full_budget, "budget_count": sum(counts), "counts": list(counts),
                   "kv_overrides": choice.kv_overrides(info), "bytes_per_token": used,
                   "decode_limit": full_bytes / used,
                   **measure_isolated(path, choice, opts, info, scratch, timeout=opts.timeout)}
            if row["error"]:
                log(f"  failed: {row['error']}")
            rows.append(row)
        for row in rows:
            row["speedup_pp"] = _ratio(row, rows[0], "pp")
            row["speedup_tg"] = _ratio(row, rows[0], "tg")
    result["threads"], result["threads_batch"] = rows[0]["threads"], rows[0]["threads_batch"]
    result["failed"] = [r["name"] for r in rows if r["error"]]
    result["rows"] = rows
    return result


def _ts(stats: dict[str, Any] | None) -> str:
    return "-" if stats is None else f"{stats['mean']:.2f} ± {stats['sd']:.2f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def markdown(result: dict[str, Any]) -> str:
    """The result as a markdown table, one row per configuration (llama-bench's t/s ± sd)."""
    p, n = result["options"]["n_prompt"], result["options"]["n_gen"]
    model = Path(result["model"]).name
    head = ["model", "budget", "method", "alloc-t", f"pp{p} t/s", f"tg{n} t/s", "speedup pp", "speedup tg",
            "decode limit"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in result["rows"]:
        speed = [_ts(r["pp"]), _ts(r["tg"])] if not r.get("error") else ["failed", "failed"]
        cells = [model, f"{r['budget']:.2f} ({r['budget_count']})", r["method"], "on" if r["alloc_t"] else "off",
                 *speed, _x(r["speedup_pp"]), _x(r["speedup_tg"]), _x(r["decode_limit"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_frontier(eval_result: dict[str, Any], bench_result: dict[str, Any], output: str | Path,
                  speed: str = "tg") -> tuple[int, int]:
    """Draw mean KLD against ``speed`` ("tg" or "pp") speedup per method; returns (matched, eval rows).

    Eval rows are matched to bench rows on (method, alloc_t) and a budget within 0.02;
    rows without a match are left out.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .fsutil import atomic_output

    if speed not in ("tg", "pp"):
        raise AllocMoeError(f"speed {speed!r}: use tg or pp")
    eval_rows = eval_result.get("results", [])
    series: dict[str, list[tuple[float, float, float]]] = {}
    for e in eval_rows:
        match = next((b for b in bench_result.get("rows", [])
                      if b["method"] == e.get("method") and bool(b["alloc_t"]) == bool(e.get("alloc_t"))
                      and abs(b["budget"] - float(e.get("budget", -1))) <= BUDGET_TOLERANCE), None)
        x = match and match.get(f"speedup_{speed}")
        if x is None or e.get("kld_mean") is None:
            continue
        series.setdefault(str(e["method"]), []).append((x, float(e["kld_mean"]), float(e["budget"])))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        for x, y, b in points:
            ax.annotate(f"{b:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(f"{speed} speedup over full budget")
    ax.set_ylabel("mean KL divergence to full budget")
    ax.set_title(Path(str(bench_result.get("model", ""))).name or "quality vs speed")
    if series:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no eval row matches a bench row", ha="center", va="center", transform=ax.transAxes)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_output(output) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return sum(len(p) for p in series.values()), len(eval_rows)
