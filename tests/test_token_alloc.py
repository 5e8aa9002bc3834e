"""Alloc-T reference (allocmoe_edge.alloc_t_reference) on random routing scores."""

import pytest
import torch

from allocmoe_edge.alloc_t_reference import select
from allocmoe_edge.errors import AllocMoeError

CASES = [  # (T, n_expert, k, k_min, k_max)
    (16, 8, 2, 1, 4),
    (7, 64, 3, 1, 6),
    (32, 16, 4, 2, 8),
    (5, 6, 1, 1, 6),
    (9, 6, 6, 1, 6),
]


def _scores(t: int, e: int, seed: int) -> torch.Tensor:
    return torch.randn(t, e, generator=torch.Generator().manual_seed(seed)).softmax(dim=-1)


def _topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, scores.topk(k).indices, True)


@pytest.mark.parametrize("t,e,k,k_min,k_max", CASES)
def test_counts_bounded_and_budget_exact(t, e, k, k_min, k_max):
    scores = _scores(t, e, seed=t + e)
    mask, counts = select(scores, k, k_min, k_max)
    assert torch.equal(counts, mask.sum(-1))
    assert int(counts.min()) >= k_min and int(counts.max()) <= k_max
    assert int(counts.sum()) == t * k
    assert bool((mask & _topk_mask(scores, k_min)).eq(_topk_mask(scores, k_min)).all()), "top-k_min always kept"
    assert not bool((mask & ~_topk_mask(scores, k_max)).any()), "only top-k_max candidates"


@pytest.mark.parametrize("t,e,k,k_min,k_max", CASES)
def test_kept_pool_entries_are_globally_largest(t, e, k, k_min, k_max):
    scores = _scores(t, e, seed=3 * t + e)
    mask, _ = select(scores, k, k_min, k_max)
    pool = _topk_mask(scores, k_max) & ~_topk_mask(scores, k_min)
    kept, dropped = scores[pool & mask], scores[pool & ~mask]
    if kept.numel() and dropped.numel():
        assert float(kept.min()) >= float(dropped.max())


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_single_token_is_plain_topk(k):
    scores = _scores(1, 8, seed=k)
    mask, counts = select(scores, k, k_min=1, k_max=6)
    assert torch.equal(mask, _topk_mask(scores, k)) and counts.tolist() == [k]


@pytest.mark.parametrize("k", [1, 2, 4])
def test_k_max_equal_k_is_plain_topk(k):
    scores = _scores(12, 8, seed=10 + k)
    mask, _ = select(scores, k, k_min=1, k_max=k)
    assert torch.equal(mask, _topk_mask(scores, k))


def test_tokens_compete_for_the_pool():
    # token 0 is confident (one large score), token 1 is spread: the pool goes to token 1
    scores = torch.tensor([[0.97, 0.01, 0.01, 0.01], [0.3, 0.3, 0.2, 0.2]])
    _, counts = select(scores, k=2, k_min=1, k_max=4)
    assert counts.tolist() == [1, 3]


@pytest.mark.parametrize("k,k_min,k_max", [(0, 1, 4), (3, 1, 2), (2, 3, 4), (2, 1, 9)])
def test_bad_bounds_raise(k, k_min, k_max):
    with pytest.raises(AllocMoeError):
        select(_scores(4, 8, seed=0), k, k_min, k_max)
