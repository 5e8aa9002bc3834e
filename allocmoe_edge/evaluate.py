"""Quality of a budgeted GGUF with llama.cpp: perplexity, KL divergence to full budget, top-1 agreement.

The protocol and the metrics are llama-perplexity's (`quality`): the text is tokenized with the
model's tokenizer and cut into chunks of ``ctx`` tokens, BOS first in each when the vocabulary
adds BOS; only the second half of each chunk is scored. Each chunk is decoded as one batch and
one ubatch (Alloc-T redistributes within a ubatch), or one token per ubatch in the decode
protocol (``decode``: as generation runs, where Alloc-T's decode rule applies). Differences from
llama.cpp: the KL divergence sums over the whole vocabulary from float32 log-probs (llama.cpp
keeps uint16-quantised base log-probs and skips p < e^-16), and one chunk of text is enough
(llama.cpp asks for two).

Every configuration is compared with the full-budget log-probs of the same positions, which
are computed once and kept in a temporary file. In the JSON, ``top1`` and ``rms_dp`` are
fractions (as in ``torch_eval``); the markdown table (`presentation.eval_table`) shows them in %.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from . import __version__
from .errors import AllocMoeError
from .fsutil import read_text
from .gguf_meta import GgufModelInfo, read_info
from .peers import LABELS, PEER_K_MIN, TOKEN_RULES, calibrate
from .plan import BUDGET_TOLERANCE, check_fraction
from .quality import Scores, chunk_tokens, log_probs, scored, scored_count
from .runtime import LoadChoice

WINDOW = 64  # tokens: decode rows report the least and the most activations per token over any such window
PEER_CALIBRATION_TOKENS = 8192  # SER and top-p calibrate on as many tokens as the profile does (`profile`)

DEFAULT_BUDGETS = (0.25, 0.5, 0.75)

Progress = Callable[[str, int, int], None]  # (configuration name, done, total) over (config, chunk)


# ---------------------------------------------------------------- configurations

@dataclass(frozen=True)
class EvalConfig:
    """One way of running the model: a row of the quality table."""

    name: str
    method: str
    alloc_t: bool = False
    plan: int | None = None  # index of a stored plan
    k: int | None = None  # uniform top-k
    decode_control: bool | None = None  # the decode rule's budget controller (None: the file's, on by default)
    token_rule: str | None = None  # a per-token rule of the field at full budget: "ser" or "top_p" (`peers`)
    token_rule_value: float | None = None  # its value, calibrated to a budget ...
    budget: float | None = None  # ... this one (a fraction of the full budget)

    def choice(self) -> LoadChoice:
        """How llama.cpp runs this configuration (Alloc-T off is token_k_max = 0)."""
        if self.token_rule is not None:
            return LoadChoice(full_budget=True, token_rule=self.token_rule, token_rule_value=self.token_rule_value,
                              token_rule_k_min=PEER_K_MIN)
        if self.plan is not None:
            return LoadChoice(plan_index=self.plan, token_k_max=None if self.alloc_t else 0,
                              decode_control=self.decode_control)
        if self.k is not None:
            return LoadChoice(uniform_k=self.k)
        return LoadChoice(full_budget=True)


def uniform_k(k_orig: int, budget: float) -> int:
    """Uniform top-k nearest to ``budget`` (a fraction of ``k_orig``, halves rounded up), at least 1."""
    return max(1, min(k_orig, math.floor(budget * k_orig + 0.5)))


def configurations(plans: Sequence[tuple[str, float]], k_orig: int, alloc_t: bool,
                   budgets: Sequence[float] | None = None) -> list[EvalConfig]:
    """Full budget first; each plan ``(method, budget fraction)`` with Alloc-T on (when ``alloc_t``) and
    off; uniform top-k at the same budgets.

    ``budgets`` restricts the plans (within BUDGET_TOLERANCE) and sets the uniform budgets; by
    default every plan is run, with uniform top-k at the plans' budgets (DEFAULT_BUDGETS when
    there are no plans). Uniform top-k equal to ``k_orig`` is the full-budget row and is dropped.
    """
    for b in budgets or ():
        check_fraction(b)
    chosen = [(i, method, budget) for i, (method, budget) in enumerate(plans)
              if not budgets or any(abs(budget - b) <= BUDGET_TOLERANCE for b in budgets)]
    configs = [EvalConfig("full", "full")]
    for i, method, _ in chosen:
        base = method.removesuffix("+t")
        if alloc_t:
            configs.append(EvalConfig(f"{base}+t (plan {i})", f"{base}+t", True, plan=i))
        configs.append(EvalConfig(f"{base} (plan {i})", base, False, plan=i))
    ks = sorted({uniform_k(k_orig, b) for b in row_budgets(plans, budgets)} - {k_orig})
    return configs + [EvalConfig(f"uniform k={k}", "uniform", k=k) for k in ks]


def row_budgets(plans: Sequence[tuple[str, float]], budgets: Sequence[float] | None) -> list[float]:
    """The budgets of the rows beside the plans (uniform top-k, SER, top-p): ``budgets``, else the plans', else
    DEFAULT_BUDGETS."""
    return list(budgets or sorted({budget for _, budget in plans}) or DEFAULT_BUDGETS)


def peer_configurations(model: str | os.PathLike[str], info: GgufModelInfo, calibration_file: str | os.PathLike[str],
                        budgets: Sequence[float], ctx: int, n_threads: int | None = None,
                        **load_kwargs: Any) -> tuple[list[EvalConfig], dict[str, Any]]:
    """SER and top-p rows, one per budget, each value calibrated (`peers.calibrate`) so that the mean activations
    per token on the first PEER_CALIBRATION_TOKENS tokens of ``calibration_file`` equal the budget's, from the
    full-budget routing llama.cpp computes there (in ubatches of ``ctx`` tokens, each from position 0, as the
    profile's chunks). Also what the calibration read, for the JSON."""
    from .graph_probe import routing_weights
    from .runtime import load

    text, meta = read_text(calibration_file)
    llm = load(model, LoadChoice(full_budget=True), info=info, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx,
               n_threads=n_threads, n_threads_batch=n_threads, **load_kwargs)
    try:
        tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)[:PEER_CALIBRATION_TOKENS]
        layers = routing_weights(llm, tokens, info.expert_used_count, ubatch=ctx)
    finally:
        llm.close()
    configs = []
    for budget in budgets:
        for rule in TOKEN_RULES:
            value = calibrate(rule, layers, check_fraction(budget) * info.full_budget, PEER_K_MIN)
            name, symbol = LABELS[rule]
            configs.append(EvalConfig(f"{name} {symbol}={value:.4g}", rule, token_rule=rule, token_rule_value=value,
                                      budget=budget))
    return configs, {**meta, "n_tokens": len(tokens), "k_min": PEER_K_MIN}


def gguf_configurations(info: GgufModelInfo, budgets: Sequence[float] | None = None) -> list[EvalConfig]:
    """The configurations of a GGUF's stored plans (Alloc-T rows when the file's token_k_max is set)."""
    alloc_t = info.meta.token_k_max != 0
    return configurations([(p.method, p.budget) for p in info.plans], info.expert_used_count, alloc_t, budgets)


def with_fixed_thresholds(configs: Sequence[EvalConfig]) -> list[EvalConfig]:
    """Each Alloc-T row followed by its twin with the decode rule's budget controller off (``<name> fixed``: the
    calibrated thresholds alone), for files whose decode rule runs one token per ubatch."""
    return [twin for c in configs for twin in
            ([c, replace(c, name=f"{c.name} fixed", decode_control=False)] if c.alloc_t else [c])]


# ---------------------------------------------------------------- llama.cpp backend

def _reference_store(folder: str, shape: tuple[int, int, int]) -> np.ndarray:
    """A float32 array on disk for the full-budget log-probs; a clear error when the disk is too small."""
    need = int(np.prod(shape)) * 4
    free = shutil.disk_usage(folder).free
    if need > free - (256 << 20):
        raise AllocMoeError(f"the full-budget log-probs need {need / 2**30:.2f} GiB in {folder} but "
                            f"{free / 2**30:.2f} GiB are free; use fewer --chunks or set TMPDIR to a larger disk")
    return np.lib.format.open_memmap(os.path.join(folder, "reference.npy"), mode="w+", dtype=np.float32, shape=shape)


def scored_half_logits(llm: Any, tokens: Sequence[int], first: int) -> np.ndarray:
    """Logits [len(tokens) - first, n_vocab] of positions ``first..`` of ``tokens``, decoded from an empty
    cache as one batch whose only outputs are those positions, as llama-perplexity asks: llama.cpp's last
    layer then runs those tokens alone, which the batch rule's redistribution there sees."""
    from .graph_probe import decode_batch
    from .runtime import llama_cpp_module

    llm.reset()
    llm._ctx.kv_cache_clear()
    decode_batch(llm._ctx.ctx, tokens, 0, [i >= first for i in range(len(tokens))])
    logits = llama_cpp_module().llama_get_logits(llm._ctx.ctx)
    return np.ctypeslib.as_array(logits, shape=(len(tokens) - first, llm.n_vocab())).copy()


def _chunk_log_probs(llm: Any, chunk: np.ndarray) -> np.ndarray:
    """Log-probs at the scored positions of ``chunk`` (llama-perplexity's protocol, `scored_half_logits`)."""
    rows = scored(len(chunk))
    return log_probs(scored_half_logits(llm, chunk.tolist(), rows.start)[:rows.stop - rows.start])


def _chunk_log_probs_decoded(counter: Any, chunk: np.ndarray) -> np.ndarray:
    """Log-probs at the scored positions of ``chunk``, decoded one token per ubatch from an empty
    cache by a `graph_probe.DecodeCounter` (which counts the experts each token runs). As generation
    does, every token asks for its logits, so every MoE layer routes every token."""
    rows = scored(len(chunk))
    counter.reset()
    logits = [counter.step(int(t)) for t in chunk]
    return log_probs(np.stack(logits[rows]))


def _routed_per_token(llm: Any, windows: Sequence[np.ndarray], layers: Sequence[int]) -> list[float]:
    """Mean experts per token that each MoE layer runs over ``windows``, each decoded as one ubatch (a per-token
    rule's count varies with the token, so the plan's count does not say it)."""
    from .graph_probe import moe_activations

    active = dict.fromkeys(layers, 0)
    for window in windows:
        acts, _ = moe_activations(llm, window.tolist())
        for layer in layers:
            active[layer] += acts[layer]["active"]
    n_tokens = sum(len(w) for w in windows)
    return [active[layer] / n_tokens for layer in layers]


def evaluate_llama(model: str | os.PathLike[str], text_file: str | os.PathLike[str], ctx: int = 256,
                   chunks: int | None = None, budgets: Sequence[float] | None = None,
                   n_threads: int | None = None, n_gpu_layers: int = 0, cpu_moe: bool = False,
                   n_cpu_moe: int = 0, decode: bool = False, peers: str | os.PathLike[str] | None = None,
                   progress: Progress | None = None) -> dict[str, Any]:
    """Measure every configuration of ``model`` (see configurations) on ``text_file``; a JSON-able result.

    ``cpu_moe`` / ``n_cpu_moe`` keep routed experts in system memory (`runtime.load`). With
    ``decode`` every chunk is decoded one token per ubatch, as generation runs (Alloc-T's decode
    rule, where the file has it, instead of its batch rule), and each row reports the experts per
    token measured while decoding (the decode rule varies them per token) instead of the plan's. ``peers``, a
    calibration text, adds SER and top-p rows at the uniform rows' budgets (`peer_configurations`)."""
    from .graph_probe import DecodeCounter
    from .runtime import doctor, layer_counts, load
    from .synth import is_synthetic

    info = read_info(model)
    if is_synthetic(info):
        raise AllocMoeError(f"{model} is synthetic (allocmoe.synthetic or its name): its weights are random, so "
                            "perplexity and KL divergence mean nothing; use it for speed measurements only")
    if not info.moe_layers:
        raise AllocMoeError(f"{model} has no MoE layers; there is no expert budget to evaluate")
    if chunks is not None and chunks < 1:
        raise AllocMoeError(f"--chunks {chunks} must be at least 1")
    configs = gguf_configurations(info, budgets)
    token_mode = info.meta.token_mode
    if decode and token_mode == "batch":  # one token per ubatch, the batch rule is plain per-layer top-k
        configs = [c for c in configs if not c.alloc_t]
    elif decode:
        configs = with_fixed_thresholds(configs)
    peer_calibration = None
    if peers is not None:
        peer_configs, peer_calibration = peer_configurations(
            model, info, peers, row_budgets([(p.method, p.budget) for p in info.plans], budgets), ctx, n_threads,
            n_gpu_layers=n_gpu_layers, cpu_moe=cpu_moe, n_cpu_moe=n_cpu_moe)
        configs += peer_configs
    text, text_meta = read_text(text_file)
    rows = scored(ctx)
    n_ubatch = 1 if decode else ctx
    llama_kwargs = dict(n_ctx=ctx, n_batch=n_ubatch, n_ubatch=n_ubatch, logits_all=True, n_threads=n_threads,
                        n_threads_batch=n_threads, n_gpu_layers=n_gpu_layers, cpu_moe=cpu_moe, n_cpu_moe=n_cpu_moe)
    results = []
    with tempfile.TemporaryDirectory(prefix="allocmoe-eval-") as tmp:
        for config in configs:
            llm = load(model, config.choice(), info=info, **llama_kwargs)
            try:
                if config is configs[0]:  # full budget: tokenize, then keep its log-probs as the reference
                    tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
                    bos = llm.token_bos() if llm._model.add_bos_token() else None
                    windows = chunk_tokens(tokens, ctx, chunks, bos)
                    ref = _reference_store(tmp, (len(windows), scored_count(ctx), llm.n_vocab()))
                counter = DecodeCounter(llm, ctx) if decode else None
                scores = Scores()
                try:
                    for c, window in enumerate(windows):
                        logp = _chunk_log_probs_decoded(counter, window) if counter else _chunk_log_probs(llm, window)
                        if config is configs[0]:
                            ref[c] = logp
                        scores.add(logp, window[rows.start + 1:], ref[c])
                        if progress is not None:
                            progress(config.name, len(results) * len(windows) + c + 1, len(configs) * len(windows))
                finally:
                    if counter:
                        counter.close()
                extra: dict[str, Any] = {}
                if counter:
                    measured = counter.per_token()
                    counts = [measured.get(layer, 0.0) for layer in info.moe_layers]
                    low, high = counter.windows(WINDOW)
                    extra = {"window": WINDOW, "window_min": low, "window_max": high}
                elif config.token_rule is not None:
                    counts = _routed_per_token(llm, windows, info.moe_layers)
                else:
                    counts = [layer_counts(llm)[layer] for layer in info.moe_layers]
            finally:
                llm.close()
            results.append({**result_row(config, sum(counts), counts, info.full_budget, scores.summary()), **extra})
    meta = info.meta
    return {
        "backend": "llama",
        "model": {"path": str(model), **{k: v for k, v in info.to_json().items() if k not in ("path", "allocmoe")},
                  "token_k_min": meta.token_k_min if meta.has_plan else None,
                  "token_k_max": meta.token_k_max if meta.has_plan else None},
        "text": {**text_meta, "n_tokens": len(tokens)},
        "ctx": ctx, "chunks": len(windows), "scored_per_chunk": scored_count(ctx),
        "results": results,
        "decode": decode, "token_mode": token_mode, "peer_calibration": peer_calibration,
        "runtime": {**doctor(), "n_batch": n_ubatch, "n_ubatch": n_ubatch, "n_threads": n_threads,
                    "n_gpu_layers": n_gpu_layers, "cpu_moe": cpu_moe, "n_cpu_moe": n_cpu_moe},
        "tool": f"allocmoe-edge {__version__}",
    }


def result_row(config: EvalConfig, activations: float, counts: list[int], full_budget: int,
         quality: dict[str, Any]) -> dict[str, Any]:
    """One JSON result row: the configuration, its measured activations and its quality."""
    rule = {"token_rule": config.token_rule, "token_rule_value": config.token_rule_value} if config.token_rule else {}
    return {"name": config.name, "method": config.method, "budget": activations / full_budget,
            "alloc_t": config.alloc_t, "activations_per_token": activations, **quality, "counts": counts, **rule}
