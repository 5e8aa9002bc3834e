"""The torch reference of Alloc-T's token-level rules (what hf.alloc_t_routing applies and llama.cpp must match).

For one layer with budget k (activations per token on average) over a group of T tokens:
every token keeps its top-``k_min`` experts; the candidate ranks ``k_min+1..k_max`` of all
T tokens form one pool; the ``(k - k_min) x T`` pool entries with the largest routing
scores are kept. Each token ends with between ``k_min`` and ``k_max`` experts and the
group spends exactly ``k x T`` activations. With T = 1, or ``k_max == k``, it is plain top-k.

The decode rule (`select_above`, thresholds from `thresholds`) is the large-T limit of the same
rule applied to one token at a time: keep the top-``k_min`` and every further candidate whose
score exceeds the layer's threshold. Its budget controller (`select_above_controlled`, patch 0010)
moves the threshold after every token of a sequence by integral action on the count it kept, so the
running mean holds at k on any text (the law and why: ``llama_allocmoe_ctrl`` in llama-graph.h).

The field's per-token rules that patch 0011 runs instead of Alloc-T (`peers`), SER and top-p, cut each
token's top-k candidates: `select_peer`.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import AllocMoeError


def check_bounds(k: int, k_min: int, k_max: int, n_expert: int) -> None:
    """Raise AllocMoeError unless ``1 <= k_min <= k <= k_max <= n_expert``."""
    if not 1 <= k_min <= k <= k_max <= n_expert:
        raise AllocMoeError(
            f"Alloc-T needs 1 <= k_min <= k <= k_max <= n_expert, got k_min={k_min}, k={k}, "
            f"k_max={k_max}, n_expert={n_expert}"
        )


CONTROL_GAIN = 4.0  # the controller's gain times its window: the loop's time constant is about window / 4 tokens
CONTROL_BOUNDS = (-4.0, 20.0)  # the threshold offset's range, in units of the threshold's size


def select_above_controlled(ranked: torch.Tensor, tau: float, k: int, k_min: int, k_max: int,
                            window: int) -> torch.Tensor:
    """The decode rule with its budget controller over one sequence's tokens in order (``ranked``
    [T, k_max], scores best first): token t's threshold is ``tau + u_t * max(|tau|, 1e-3)``, with
    ``u_0 = 0`` and ``u_{t+1} = clamp(u_t + CONTROL_GAIN / window * (n_t - k) / k)``, n_t the count token
    t kept; no update when n_t is held at k_max (wanting more) or k_min (wanting fewer). float32, as
    llama.cpp computes it."""

    if not np.isfinite(tau):  # a layer at k_min or k_max: plain top-k, nothing to control
        return select_above(ranked, tau, k_min)
    f32 = np.float32
    lo, hi = f32(CONTROL_BOUNDS[0]), f32(CONTROL_BOUNDS[1])
    gain, base = f32(CONTROL_GAIN) / f32(window), f32(tau)
    scale = max(abs(base), f32(1e-3))
    keep = torch.zeros_like(ranked, dtype=torch.bool)
    u = f32(0)
    for t in range(ranked.shape[0]):
        thr = torch.tensor(base + u * scale, dtype=torch.float32)
        keep[t] = ranked[t].float() > thr
        keep[t, :k_min] = True
        n = int(keep[t].sum())
        e = (f32(n) - f32(k)) / f32(k)
        if not ((e < 0 and n >= k_max) or (e > 0 and n <= k_min)):
            u = min(max(u + gain * e, lo), hi)
    return keep


def select_peer(rule: str, ranked: torch.Tensor, totals: torch.Tensor, value: float, k_min: int) -> torch.Tensor:
    """SER (``rule`` "ser") or top-p ("top_p") on ``ranked`` [T, k] (routing weights, best first; ``totals`` [T]
    the sum of each token's weights over all experts): a bool mask keeping each token's first ``k_min`` slots
    and the slots with a positive margin, ``w_j - t w_1`` (SER) or ``p totals - sum_{i<j} w_i`` (top-p), in
    float32 as llama.cpp computes them."""
    ranked = ranked.float()
    if rule == "ser":
        margin = ranked - ranked[:, :1] * torch.tensor(value, dtype=torch.float32)
    elif rule == "top_p":
        before = ranked.cumsum(dim=1) - ranked
        margin = totals.float()[:, None] * torch.tensor(value, dtype=torch.float32) - before
    else:
        raise AllocMoeError(f"token rule {rule!r} is not one of ser, top_p")
    keep = margin > 0
    keep[:, :k_min] = True
    return keep


def select_ranked(ranked: torch.Tensor, k: int, k_min: int = 1) -> torch.Tensor:
    """Which candidate slots to keep, given each token's candidate scores best first.

    ``ranked`` is ``[T, k_max]``, sorted in descending order along the last dimension;
    the result is a bool ``[T, k_max]`` mask with exactly ``k x T`` entries set.
    """
    n_tokens, k_max = ranked.shape
    check_bounds(k, k_min, k_max, k_max)
    keep = torch.zeros_like(ranked, dtype=torch.bool)
    keep[:, :k_min] = True
    extra = (k - k_min) * n_tokens
    if extra:
        pool = ranked[:, k_min:].reshape(-1)
        chosen = pool.topk(extra, sorted=False).indices
        tail = torch.zeros(pool.shape, dtype=torch.bool, device=ranked.device)
        tail[chosen] = True
        keep[:, k_min:] = tail.view(n_tokens, k_max - k_min)
    return keep


def select_above(ranked: torch.Tensor, tau: float, k_min: int = 1) -> torch.Tensor:
    """The decode rule on ``ranked`` [T, k_max] (scores best first): a bool mask keeping each
    token's first ``k_min`` slots and every further slot whose score exceeds ``tau``."""
    keep = ranked > tau
    keep[:, :k_min] = True
    return keep


def select(
    scores: torch.Tensor, k: int, k_min: int = 1, k_max: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply Alloc-T to routing scores ``[T, n_expert]``.

    Returns ``(mask, counts)``: a bool ``[T, n_expert]`` mask of the selected experts and
    the number selected per token (``[T]``). ``k_max`` defaults to ``n_expert``.
    """
    n_expert = scores.shape[-1]
    k_max = n_expert if k_max is None else k_max
    check_bounds(k, k_min, k_max, n_expert)
    ranked, index = scores.topk(k_max, dim=-1, sorted=True)
    keep = select_ranked(ranked, k, k_min)
    mask = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, index, keep)
    return mask, mask.sum(dim=-1)
