"""Evaluation windows and quality metrics, one implementation for both backends (llama.cpp in
`evaluate`, torch in `torch_eval`, `profile` and `refine`). numpy only.

The protocol is llama-perplexity's (``perplexity`` and ``kl_divergence`` in llama.cpp's
tools/perplexity/perplexity.cpp): the tokens are cut into chunks of ``ctx``, the first token of
each chunk becomes BOS when there is one, and only the second half is scored (logits at positions
ctx/2 .. ctx-2, each predicting the next token). Per position: NLL of the next token, KL divergence
to the full-budget model (summed over the whole vocabulary from float32 log-probs in float64, not
clamped at 0, as llama.cpp), Δp of the next token and whether the top token is the same. Standard
errors are perplexity.cpp's: sqrt((E[x²] - E[x]²) / (n - 1)), and PPL ± PPL x se(NLL).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import AllocMoeError

_BLOCK_ROWS = 16  # positions per block in the KLD sum: bounds temporaries for large vocabularies


# ---------------------------------------------------------------- windows

def chunk_tokens(tokens: Sequence[int], ctx: int, chunks: int | None = None, bos: int | None = None) -> np.ndarray:
    """``[n_chunks, ctx]`` consecutive chunks of ``tokens`` (at most ``chunks``); the first of each is ``bos``
    when given."""
    if ctx < 4:
        raise AllocMoeError(f"--ctx {ctx} is too short; use at least 4 tokens")
    n = len(tokens) // ctx
    if n == 0:
        raise AllocMoeError(f"the text has {len(tokens)} tokens; one chunk of --ctx {ctx} needs at least {ctx}: "
                            "use a longer text or a smaller --ctx")
    if chunks is not None:
        n = min(n, chunks)
    out = np.array(tokens[: n * ctx], dtype=np.int64).reshape(n, ctx)
    if bos is not None:
        out[:, 0] = bos
    return out


def scored(ctx: int) -> slice:
    """Rows of a chunk's logits that are scored: the second half, each predicting the token after it."""
    return slice(ctx // 2, ctx - 1)


def scored_count(ctx: int) -> int:
    """Scored positions per chunk."""
    return ctx - 1 - ctx // 2


# ---------------------------------------------------------------- metrics

def log_probs(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of ``[N, V]`` logits in float32 (the exponential sums in float64)."""
    x = np.asarray(logits, dtype=np.float32)
    shifted = x - x.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(shifted).sum(axis=-1, keepdims=True, dtype=np.float64))
    return shifted - lse.astype(np.float32)


def score_positions(logp: np.ndarray, targets: np.ndarray, ref: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per position: ``nll`` of ``targets`` under ``logp`` and, given the full-budget ``ref``, ``nll_ref`` (the
    reference's), ``kld`` (KL(ref || logp)), ``p_diff`` (Δp of the target) and ``same_top``.

    ``logp`` and ``ref`` are ``[N, V]`` log-probs, ``targets`` ``[N]``.
    """
    rows = np.arange(len(targets))
    nll = -logp[rows, targets].astype(np.float64)
    if ref is None:
        return {"nll": nll}
    ref_target = np.asarray(ref[rows, targets], dtype=np.float64)
    kld = np.empty(len(targets))
    for s in range(0, len(targets), _BLOCK_ROWS):
        r = np.asarray(ref[s:s + _BLOCK_ROWS])
        kld[s:s + _BLOCK_ROWS] = (np.exp(r) * (r - logp[s:s + _BLOCK_ROWS])).sum(axis=-1, dtype=np.float64)
    return {
        "nll": nll,
        "nll_ref": -ref_target,
        "kld": kld,
        "p_diff": np.exp(-nll) - np.exp(ref_target),
        "same_top": np.argmax(logp, axis=-1) == np.argmax(ref, axis=-1),
    }


def mean_se(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error as perplexity.cpp computes them (0 when undefined)."""
    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    var = float((x * x).mean()) - mean * mean
    return mean, math.sqrt(var / (x.size - 1)) if x.size > 1 and var > 0 else 0.0


def perplexity(nll: np.ndarray) -> tuple[float, float]:
    """PPL = exp(mean NLL) and its standard error PPL x se(NLL), as llama-perplexity reports them."""
    mean, se = mean_se(nll)
    ppl = math.exp(mean)
    return ppl, ppl * se


def percentile(values: np.ndarray, fraction: float) -> float:
    """Linear interpolation between order statistics (llama.cpp's ``percentile``)."""
    return float(np.quantile(np.asarray(values, dtype=np.float64), fraction))


def summarize(scores: dict[str, np.ndarray]) -> dict[str, float]:
    """The quality row of one configuration from its per-position ``scores`` (see score_positions);
    the comparisons with the full-budget model only when ``scores`` has them, with the statistics
    llama-perplexity's ``--kl-divergence`` prints: mean, median and 99th-percentile KLD, RMS Δp, same
    top p (``top1``) and mean PPL(Q)/PPL(base) (``ppl_ratio``: exp of the mean log-ratio, with its se)."""
    ppl, ppl_se = perplexity(scores["nll"])
    out = {"ppl": ppl, "ppl_se": ppl_se}
    if "kld" in scores:
        kld_mean, kld_se = mean_se(scores["kld"])
        out.update(kld_mean=kld_mean, kld_se=kld_se, kld_p99=percentile(scores["kld"], 0.99),
                   top1=float(np.mean(scores["same_top"])),
                   kld_median=percentile(scores["kld"], 0.5),
                   rms_dp=math.sqrt(float(np.mean(np.square(scores["p_diff"])))))
        log_ratio, log_ratio_se = mean_se(scores["nll"] - scores["nll_ref"])
        out.update(ppl_ratio=math.exp(log_ratio), ppl_ratio_se=math.exp(log_ratio) * log_ratio_se)
    return {**out, "nll": float(np.mean(scores["nll"])), "n_tokens": int(scores["nll"].size)}


@dataclass
class Scores:
    """The per-position scores of one configuration, gathered chunk by chunk."""

    parts: list[dict[str, np.ndarray]] = field(default_factory=list)

    def add(self, logp: np.ndarray, targets: np.ndarray, ref: np.ndarray | None = None) -> None:
        """Score one chunk (see score_positions)."""
        self.parts.append(score_positions(logp, targets, ref))

    def summary(self) -> dict[str, float]:
        """`summarize` over every chunk added."""
        return summarize({k: np.concatenate([p[k] for p in self.parts]) for k in self.parts[0]})
