"""Speed in llama-bench's style, per budget and method: pp / tg tokens/s, latency, the physical limit.

Protocol. Every configuration runs in its own child process (`bench_worker`): it loads the
model once with the configuration's scalar kv_overrides, warms up (one run of every prompt
size and one generated token), then answers one request per timed repetition. The
repetitions are **interleaved**: repetition 1 of every configuration, then repetition 2 of
every configuration, and so on (``reps`` rounds, 5 by default), so drift on a noisy machine
hits every row alike. A repetition runs every test once:

* ``pp<n>`` for each prompt size n (``-p 512,2048``): n random tokens in one llama_decode
  from an empty KV cache, one ubatch (one context per configuration with n_batch = n_ubatch =
  the largest size, so each prompt is one ubatch of exactly its size), up to llama_synchronize;
* ``tg<n>``: n tokens decoded one at a time from an empty cache, each followed by
  llama_synchronize (as llama-bench does).

Rows report mean ± sd over the repetitions. Speedups are over the full-budget row of the
same run: ratio of means with sd(ratio) = ratio x sqrt(cv_row² + cv_full²); a speedup whose
difference from 1.00x is within that sd is a tie (``tie`` in the JSON, "(tie)" in the table).

An abort inside llama.cpp, an error or a ``timeout`` (seconds per configuration over the
whole run) costs that configuration's row only (``error`` set, no numbers); the others go on.
Each loaded configuration holds its own copy of what is not shared through the page cache
(GPU-offloaded weights, CPU-repacked weights, KV cache); a configuration that does not fit
in system memory beside the others, or beyond ``max_loaded``, is reloaded and warmed up for
each repetition instead (``resident`` false).

Latency (``latency``): time to first token for each prompt size, the wall time of the
prompt's llama_decode + llama_synchronize + the greedy choice from the last position's
logits (mean ± sd over repetitions, ms), and per-token decode latency, each generated
token's llama_decode + llama_synchronize timed on its own: p50 / p90 / p99 over the tokens
of all repetitions pooled (reps x n samples, linear interpolation), ms.

The rows are those of `allocmoe eval` (`evaluate.gguf_configurations`), so quality and
speed tables line up:

* ``full``: full budget (allocmoe.enabled = false), the baseline of every speedup;
* each stored plan near a requested budget, with Alloc-T as stored (method ``<m>+t``, when
  the file enables it) and with Alloc-T off (``token_k_max = 0``);
* ``uniform``: llama.cpp's own ``<arch>.expert_used_count`` override with top-k =
  round-half-up(budget x K_orig) in every MoE layer; rows report the activation count they
  really run (it equals the budget only when budget x K_orig is an integer).

A file without plans is benchmarked through a temporary copy holding "uniform-split"
plans (`allocate.stamp_uniform_split`, Alloc-T enabled with decode thresholds): the exact
budget count spread evenly over the MoE layers, since a synthetic file has no sensitivity profile.

Decode limits (T = 1, where Alloc-T is exactly top-k_l), ratios of bytes read per generated
token, full budget / row; KV-cache traffic is not counted:

* ``decode_limit``: all weights: every tensor except routed experts, of which each MoE
  layer reads k_l of n_expert, and one row of token_embd (all of it when it doubles as the
  output matrix);
* ``decode_limit_cpu_experts`` (with ``cpu_moe`` / ``n_cpu_moe``): only the routed-expert
  tensors kept in system memory. With GPU layers this is the one that applies: decode is
  then bound by reading those experts, and the table shows it.

The tables and the frontier plot are in `presentation`.
"""

from __future__ import annotations

import datetime
import itertools
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .allocate import stamp_uniform_split
from .bench_worker import Worker, interleave
from .benchstats import BASELINE, percentiles, speedup, summary
from .errors import AllocMoeError
from .evaluate import (
    EvalConfig,
    Progress,
    gguf_configurations,
    peer_configurations,
    uniform_k,
    with_fixed_thresholds,
)
from .fsutil import scratch_dir
from .gguf_meta import GgufModelInfo, read_header, read_info
from .placement import cpu_expert_blocks, expert_block
from .plan import fraction_problem

FORMAT = "allocmoe-bench"
VERSION = 2


@dataclass(frozen=True)
class BenchOptions:
    """What a bench run measures; saved with its results."""

    budgets: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)
    reps: int = 5  # timed repetitions of every test, interleaved across configurations
    prompts: tuple[int, ...] = (512,)  # pp tests: tokens in one llama_decode each (empty: no pp test)
    n_gen: int = 128  # tg test: tokens decoded one at a time (0: no tg test)
    latency: bool = False  # report time to first token and per-token latency percentiles
    threads: int | None = None  # None: llama-cpp-python's defaults
    n_gpu_layers: int = 0
    cpu_moe: bool = False  # routed experts of every MoE block in system memory
    n_cpu_moe: int = 0  # routed experts of the MoE blocks below this index in system memory
    flash_attn: bool = False
    seed: int = 0  # of the random prompt tokens
    timeout: float | None = None  # seconds per configuration (its loads and all its tests)
    max_loaded: int | None = None  # configurations loaded at once (None: as many as system memory holds)
    fixed_thresholds: bool = False  # also each Alloc-T row with the decode rule's budget controller off
    peers: str | None = None  # a calibration text: also SER and top-p at each budget below 1 (`peer_configurations`)

    def check(self) -> None:
        """Raise AllocMoeError for options that cannot be measured."""
        if not self.budgets:
            raise AllocMoeError("--budgets: none given; give fractions in (0, 1] such as 1,0.5")
        for b in self.budgets:
            if (problem := fraction_problem(b)) is not None:
                raise AllocMoeError(f"--budgets: {problem}")
        if self.reps < 1:
            raise AllocMoeError(f"--reps {self.reps}: at least 1 repetition is needed (5 or more for a useful sd)")
        if any(n < 1 for n in self.prompts) or len(set(self.prompts)) < len(self.prompts):
            raise AllocMoeError(f"-p {','.join(map(str, self.prompts))}: prompt sizes must be distinct and >= 1 "
                                "(-p 0 alone skips the prompt tests)")
        if self.n_gen < 0 or not (self.prompts or self.n_gen):
            raise AllocMoeError("-n must be >= 0, and -p and -n cannot both be 0")
        if self.latency and not (self.prompts and self.n_gen):
            raise AllocMoeError("--latency needs prompt sizes (-p, for the time to first token) and -n > 0 "
                                "(for the per-token latency)")
        if self.n_cpu_moe < 0:
            raise AllocMoeError(f"--n-cpu-moe {self.n_cpu_moe} must be >= 0")
        if self.max_loaded is not None and self.max_loaded < 1:
            raise AllocMoeError(f"--max-loaded {self.max_loaded} must be at least 1")
        if self.timeout is not None and self.timeout <= 0:
            raise AllocMoeError(f"--timeout {self.timeout} must be positive")

    def test_names(self) -> list[str]:
        """llama-bench's names of the tests, in the order they run: ``pp512``, ..., ``tg128``."""
        return [f"pp{n}" for n in self.prompts] + ([f"tg{self.n_gen}"] if self.n_gen else [])


def llama_kwargs(opts: BenchOptions) -> dict[str, Any]:
    """`runtime.load` kwargs of every configuration: one context whose batch and ubatch hold the largest prompt.

    ``cpu_moe`` / ``n_cpu_moe`` are passed only when set."""
    n_batch = max(opts.prompts, default=1)
    kw: dict[str, Any] = {"n_ctx": max(opts.prompts, default=0) + opts.n_gen, "n_batch": n_batch,
                          "n_ubatch": n_batch, "n_gpu_layers": opts.n_gpu_layers, "flash_attn": opts.flash_attn}
    if opts.threads:
        kw["n_threads"] = kw["n_threads_batch"] = opts.threads
    if opts.cpu_moe:
        kw["cpu_moe"] = True
    if opts.n_cpu_moe:
        kw["n_cpu_moe"] = opts.n_cpu_moe
    return kw


def job(path: str | Path, config: EvalConfig, opts: BenchOptions) -> dict[str, Any]:
    """The plain-JSON job a `bench_worker` child runs for ``config``."""
    return {"name": config.name, "path": str(path), "choice": asdict(config.choice()), "llama": llama_kwargs(opts),
            "prompts": list(opts.prompts), "n_gen": opts.n_gen, "seed": opts.seed}


def configurations(info: GgufModelInfo, budgets: tuple[float, ...] | None,
                   fixed_thresholds: bool = False) -> list[EvalConfig]:
    """The rows `allocmoe eval` makes for this file (`evaluate.gguf_configurations`), so the tables match;
    ``budgets`` None runs every stored plan. ``fixed_thresholds`` adds each Alloc-T row's twin without the decode
    rule's budget controller, as `eval --decode` does."""
    configs = gguf_configurations(info, None if budgets is None else list(budgets))
    return with_fixed_thresholds(configs) if fixed_thresholds else configs


def executed_counts(info: GgufModelInfo, config: EvalConfig) -> tuple[int, ...]:
    """Experts per MoE layer that ``config`` runs for a single token (a per-token rule's calibrated budget, spread
    evenly: its counts vary per token and layer)."""
    if config.budget is not None:
        return tuple(uniform_k(info.expert_used_count, config.budget) for _ in info.moe_layers)
    if config.plan is not None:
        return tuple(info.plans[config.plan].counts[layer] for layer in info.moe_layers)
    return (config.k or info.expert_used_count,) * len(info.moe_layers)


@dataclass(frozen=True)
class WeightTraffic:
    """Weight bytes one generated token reads: a fixed part plus, per MoE block, k x one expert's bytes."""

    fixed: int
    per_expert: dict[int, int]  # MoE block -> bytes of one routed expert (all its tensors)

    @classmethod
    def of(cls, path: str | Path, info: GgufModelInfo) -> WeightTraffic:
        """Read the tensor sizes of ``path``: routed experts apart, one row of token_embd when
        output.weight exists (a lookup), everything else whole."""
        tensors = read_header(path).tensors
        has_output = any(t.name == "output.weight" for t in tensors)
        fixed, per_expert = 0, dict.fromkeys(info.moe_layers, 0)
        for t in tensors:
            block = expert_block(t.name)
            if block is not None:
                per_expert[block] += int(t.n_bytes) // info.expert_count
            elif t.name == "token_embd.weight" and has_output:
                fixed += int(t.n_bytes) // int(t.shape[-1])
            else:
                fixed += int(t.n_bytes)
        return cls(fixed, per_expert)

    def experts(self, counts: tuple[int, ...], blocks: Collection[int] | None = None) -> int:
        """Routed-expert bytes per token when the MoE blocks (in order) use ``counts`` experts,
        counting only ``blocks`` when given (such as those whose experts are in system memory)."""
        return sum(k * size for (block, size), k in zip(self.per_expert.items(), counts)
                   if blocks is None or block in blocks)

    def per_token(self, counts: tuple[int, ...]) -> int:
        """All weight bytes per token when the MoE blocks (in order) use ``counts`` experts."""
        return self.fixed + self.experts(counts)


def decode_limits(traffic: WeightTraffic, full: tuple[int, ...], counts: tuple[int, ...],
                  cpu_blocks: Collection[int]) -> dict[str, Any]:
    """Bytes per token at ``counts`` and the decode limits against ``full`` (see the module docstring);
    the CPU-expert fields are None when no block keeps its experts in system memory."""
    used = traffic.per_token(counts)
    limits: dict[str, Any] = {"bytes_per_token": used, "decode_limit": traffic.per_token(full) / used,
                              "cpu_expert_bytes_per_token": None, "decode_limit_cpu_experts": None}
    if cpu_blocks:
        cpu_used = traffic.experts(counts, cpu_blocks)
        limits.update(cpu_expert_bytes_per_token=cpu_used,
                      decode_limit_cpu_experts=traffic.experts(full, cpu_blocks) / cpu_used)
    return limits


def placement(info: GgufModelInfo, traffic: WeightTraffic, opts: BenchOptions) -> dict[str, Any]:
    """Where the weights are: GPU layers, the MoE blocks whose routed experts stay in system memory
    and their bytes, and which decode limit applies (``limit``: the JSON field the table shows)."""
    blocks = cpu_expert_blocks(info, opts.cpu_moe, opts.n_cpu_moe)
    hybrid = bool(blocks) and opts.n_gpu_layers > 0
    return {"n_gpu_layers": opts.n_gpu_layers, "cpu_moe": opts.cpu_moe, "n_cpu_moe": opts.n_cpu_moe,
            "cpu_expert_blocks": blocks, "cpu_expert_bytes": sum(traffic.per_expert[b] * info.expert_count
                                                                 for b in blocks),
            "limit": "decode_limit_cpu_experts" if hybrid else "decode_limit"}


def measurements(replies: list[dict[str, Any]], opts: BenchOptions) -> dict[str, Any]:
    """A row's ``tests`` (tokens/s per repetition, mean ± sd) and ``latency`` (None without
    ``opts.latency``) from its child's replies, one per repetition."""
    tests = {f"pp{n}": {"n_prompt": n, "n_gen": 0, **summary([n / r["prompt"][str(n)]["decode_s"] for r in replies])}
             for n in opts.prompts}
    if opts.n_gen:
        tests[f"tg{opts.n_gen}"] = {"n_prompt": 0, "n_gen": opts.n_gen,
                                    **summary([opts.n_gen / r["gen"]["total_s"] for r in replies])}
    latency = None
    if opts.latency:
        latency = {"ttft_ms": {str(n): summary([1000 * r["prompt"][str(n)]["first_token_s"] for r in replies])
                               for n in opts.prompts},
                   "token_ms": percentiles([1000 * s for r in replies for s in r["gen"]["token_s"]])}
    return {"tests": tests, "latency": latency}


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """Set every test's ``speedup`` against the first row (full budget) of the same run; None
    where either row failed."""
    base = rows[0]["tests"]
    for row in rows:
        for name, test in (row["tests"] or {}).items():
            test["speedup"] = None if base is None else dict(BASELINE) if row is rows[0] else speedup(test, base[name])


def environment(opts: BenchOptions) -> dict[str, Any]:
    """Commit, patch hash, runtime, hardware and flags: what a speed number must carry."""
    from . import hwinfo
    from .build_runtime import patch_hash
    from .runtime import doctor

    report = doctor()
    return {
        "commit": hwinfo.git_commit(), "patch_hash": patch_hash(),
        "allocmoe_patch_version": report.get("allocmoe_patch_version"),
        "llama_cpp_python": report.get("llama_cpp_python"), "library": report.get("library"),
        "backend": hwinfo.backend(report), "device": hwinfo.device(report, opts.n_gpu_layers),
        "devices": report.get("devices"), "system_info": report.get("system_info"),
        "cpu": hwinfo.cpu_model(), "gpus": hwinfo.gpu_names(),
        "n_gpu_layers": opts.n_gpu_layers,
        "flags": {**llama_kwargs(opts), "prompts": list(opts.prompts), "n_gen": opts.n_gen, "reps": opts.reps,
                  "latency": opts.latency, "seed": opts.seed, "order": "interleaved"},
    }


def _row(info: GgufModelInfo, config: EvalConfig, counts: tuple[int, ...], limits: dict[str, Any], worker: Worker,
         opts: BenchOptions) -> dict[str, Any]:
    """One configuration's JSON row: what it runs, its decode ``limits`` and what its child measured
    (speedups are added once every row is known)."""
    log, error = worker.log_lines()
    ready = worker.ready or {}
    return {"name": config.name, "method": config.method, "alloc_t": config.alloc_t,
            "decode_control": config.decode_control is not False if config.alloc_t else None,
            "budget": sum(counts) / info.full_budget, "budget_count": sum(counts), "counts": list(counts),
            "kv_overrides": config.choice().kv_overrides(info), **limits,
            **(measurements(worker.replies, opts) if error is None else {"tests": None, "latency": None}),
            "threads": ready.get("threads"), "threads_batch": ready.get("threads_batch"),
            "decode_activations": ready.get("decode_activations"),
            "resident": worker.resident, "error": error, "log": log}


def _plans_to_run(model: str | Path, info: GgufModelInfo, opts: BenchOptions, scratch: Path,
                  log: Callable[[str], None]) -> tuple[Path, GgufModelInfo, tuple[float, ...] | None, str]:
    """The file to run, its metadata, the budgets to pick plans by (None: every plan) and where the
    plans come from; a file without plans gets uniform-split plans in a copy in ``scratch``."""
    if info.plans or all(b == 1 for b in opts.budgets):
        return Path(model), info, opts.budgets, "file" if info.plans else "none"
    log("no stored plans: stamping uniform-split plans into a temporary copy (decode thresholds calibrated on "
        "random tokens)")
    path = scratch / Path(model).name
    # every plan just stamped runs, even where its count rounds away from the fraction
    return path, stamp_uniform_split(model, path, opts.budgets, decode_rule=True), None, "uniform-split"


def bench(model: str | Path, opts: BenchOptions, log: Callable[[str], None] = print,
          progress: Progress | None = None,
          on_round: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Benchmark every configuration of ``model`` at ``opts.budgets`` in one run; returns the JSON result.

    ``progress(configuration, done, total)`` follows each of the configurations x reps repetitions;
    ``on_round(result)`` gets the result so far (``"complete": false``) after every round of
    repetitions, so a run stopped from outside still leaves its measured rounds behind."""
    from .runtime import require_patched
    from .synth import is_synthetic

    opts.check()
    info = read_info(model)
    if not info.moe_layers:
        raise AllocMoeError(f"{model} has no MoE layers; nothing to budget")
    require_patched("bench")
    result: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "model": str(model), "architecture": info.architecture,
        "synthetic": is_synthetic(info), "full_budget": info.full_budget, "options": asdict(opts),
        "tests": opts.test_names(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **environment(opts),
    }
    with scratch_dir(Path(model).parent, ".bench-") as scratch:
        path, info, budgets, result["plans_source"] = _plans_to_run(model, info, opts, scratch, log)
        traffic = WeightTraffic.of(path, info)
        result["placement"] = placement(info, traffic, opts)
        cpu_blocks = result["placement"]["cpu_expert_blocks"]
        full = (info.expert_used_count,) * len(info.moe_layers)
        result["bytes_per_token_full"] = traffic.per_token(full)
        result["cpu_expert_bytes_per_token_full"] = traffic.experts(full, cpu_blocks) if cpu_blocks else None
        configs = configurations(info, budgets, opts.fixed_thresholds)
        if opts.peers:
            peer_budgets = [b for b in opts.budgets if b < 1]
            configs += peer_configurations(path, info, opts.peers, peer_budgets, 256, opts.threads,
                                           n_gpu_layers=opts.n_gpu_layers, cpu_moe=opts.cpu_moe,
                                           n_cpu_moe=opts.n_cpu_moe)[0]
        workers = [Worker(job(path, c, opts), scratch / f"config-{i}.log", opts.timeout) for i, c in enumerate(configs)]
        done, total = itertools.count(1), len(workers) * opts.reps

        def tabulate(complete: bool) -> dict[str, Any]:
            rows = []
            for config, worker in zip(configs, workers):
                counts = executed_counts(info, config)
                rows.append(_row(info, config, counts, decode_limits(traffic, full, counts, cpu_blocks), worker, opts))
            add_speedups(rows)
            ready = next((w.ready for w in workers if w.ready), {})
            result["threads"], result["threads_batch"] = ready.get("threads"), ready.get("threads_batch")
            result["failed"] = [r["name"] for r in rows if r["error"]]
            result.update(rows=rows, complete=complete)
            return result

        def step(worker: Worker, rep: int) -> None:
            if progress is not None:
                progress(worker.name, next(done), total)
            if on_round is not None and worker is workers[-1] and rep < opts.reps - 1:
                on_round(tabulate(complete=False))

        interleave(workers, opts.reps, max_loaded=opts.max_loaded, log=log, on_step=step)
        return tabulate(complete=True)
