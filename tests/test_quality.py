"""`quality`, the windows and metrics both backends share: metrics against hand computations,
llama-perplexity's chunking, and the torch backend's adapters on the same numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from allocmoe_edge.errors import AllocMoeError
from allocmoe_edge.quality import (
    Scores,
    chunk_tokens,
    log_probs,
    mean_se,
    percentile,
    perplexity,
    score_positions,
    scored,
    summarize,
)


def test_log_probs_normalised_and_shift_invariant():
    logits = np.array([[0.0, 1.0, 2.0], [1000.0, 1000.0, 1000.0]], dtype=np.float32)
    lp = log_probs(logits)
    assert lp.dtype == np.float32
    np.testing.assert_allclose(np.exp(lp).sum(axis=-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(lp[1], np.log(1 / 3), rtol=1e-6)
    np.testing.assert_allclose(lp[0], np.array([0.0, 1.0, 2.0]) - np.log(1 + np.e + np.e**2), rtol=1e-6)


def test_perplexity_of_uniform_distribution_is_vocab_size():
    lp = log_probs(np.zeros((20, 8), dtype=np.float32))
    scores = score_positions(lp, np.arange(20) % 8, lp)
    ppl, se = perplexity(scores["nll"])
    assert ppl == pytest.approx(8.0, rel=1e-6) and se == 0.0


def test_mean_se_and_ppl_se_as_perplexity_cpp():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    # E[x^2] - E[x]^2 = 7.5 - 6.25 = 1.25; se = sqrt(1.25 / 3)
    assert mean_se(x) == pytest.approx((2.5, math.sqrt(1.25 / 3)))
    ppl, se = perplexity(x)
    assert ppl == pytest.approx(math.exp(2.5)) and se == pytest.approx(math.exp(2.5) * math.sqrt(1.25 / 3))
    assert mean_se(np.array([5.0])) == (5.0, 0.0)


def test_kld_identical_is_exactly_zero_and_known_pair():
    rng = np.random.default_rng(0)
    lp = log_probs(rng.normal(size=(40, 50)).astype(np.float32))  # more rows than one block
    same = score_positions(lp, np.zeros(40, dtype=int), lp)
    assert np.all(same["kld"] == 0) and np.all(same["p_diff"] == 0) and same["same_top"].all()
    p, q = np.array([[0.5, 0.5]]), np.array([[0.9, 0.1]])
    got = score_positions(np.log(q).astype(np.float32), np.array([1]), np.log(p).astype(np.float32))
    assert got["kld"][0] == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1), rel=1e-6)
    assert got["nll"][0] == pytest.approx(-math.log(0.1), rel=1e-6)
    assert got["p_diff"][0] == pytest.approx(0.1 - 0.5, rel=1e-6)


def test_top1_p99_rms_summary():
    ref = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.5, 0.3, 0.2]])).astype(np.float32)
    cur = np.log(np.array([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.2, 0.2, 0.6], [0.1, 0.8, 0.1]])).astype(np.float32)
    targets = np.array([0, 1, 2, 0])
    s = summarize(score_positions(cur, targets, ref))
    assert s["top1"] == pytest.approx(0.5)
    assert s["rms_dp"] == pytest.approx(math.sqrt(np.mean(np.square([0.6 - 0.7, 0.4 - 0.8, 0.0, 0.1 - 0.5]))), rel=1e-5)
    assert s["n_tokens"] == 4
    assert percentile(np.arange(101.0), 0.99) == pytest.approx(99.0)
    assert percentile(np.array([0.0, 1.0]), 0.99) == pytest.approx(0.99)  # interpolated, as llama.cpp


def test_chunks_bos_and_second_half_scored():
    tokens = list(range(100, 125))  # 25 tokens: 3 chunks of 8, one left over
    chunks = chunk_tokens(tokens, 8, bos=1)
    assert chunks.shape == (3, 8)
    assert chunks[:, 0].tolist() == [1, 1, 1] and chunks[1, 1:].tolist() == list(range(109, 116))
    assert chunk_tokens(tokens, 8).tolist()[2] == list(range(116, 124))
    assert chunk_tokens(tokens, 8, chunks=2).shape == (2, 8)
    rows = scored(8)
    assert (rows.start, rows.stop) == (4, 7)  # logits at positions 4..6 predict tokens 5..7
    assert chunks[0, rows.start + 1:].tolist() == [105, 106, 107]
    with pytest.raises(AllocMoeError, match="needs at least 8"):
        chunk_tokens(tokens[:7], 8)


def test_kld_is_not_clamped_and_scores_without_reference_have_nll_only():
    # float32 log-probs that do not quite normalise make a tiny negative KLD; it stays (as llama.cpp)
    ref = np.log(np.array([[0.5, 0.5]], dtype=np.float32))
    cur = ref + np.float32(1e-6)
    assert score_positions(cur, np.array([0]), ref)["kld"][0] < 0
    scores = Scores()
    scores.add(log_probs(np.zeros((3, 4), dtype=np.float32)), np.array([0, 1, 2]))
    assert set(scores.parts[0]) == {"nll"}
    assert list(scores.summary()) == ["ppl", "ppl_se", "nll", "n_tokens"]


def test_scores_over_chunks_equal_one_summary():
    rng = np.random.default_rng(1)
    ref, cur = (log_probs(rng.normal(size=(10, 7)).astype(np.float32)) for _ in range(2))
    targets = rng.integers(0, 7, 10)
    scores = Scores()
    scores.add(cur[:4], targets[:4], ref[:4])
    scores.add(cur[4:], targets[4:], ref[4:])
    assert scores.summary() == summarize(score_positions(cur, targets, ref))
    assert list(scores.summary()) == ["ppl", "ppl_se", "kld_mean", "kld_se", "kld_p99", "top1", "kld_median",
                                      "rms_dp", "ppl_ratio", "ppl_ratio_se", "nll", "n_tokens"]


def test_llama_perplexity_statistics():
    """Median KLD and mean PPL(Q)/PPL(base), as llama-perplexity --kl-divergence names them."""
    rng = np.random.default_rng(2)
    ref, cur = (log_probs(rng.normal(size=(50, 9)).astype(np.float32)) for _ in range(2))
    targets = rng.integers(0, 9, 50)
    scores = score_positions(cur, targets, ref)
    row = summarize(scores)
    assert row["kld_median"] == pytest.approx(float(np.median(scores["kld"])))
    base_ppl = float(np.exp(np.mean(-ref[np.arange(50), targets].astype(np.float64))))
    assert row["ppl_ratio"] == pytest.approx(row["ppl"] / base_ppl)
    assert row["ppl_ratio_se"] > 0


def test_torch_backend_uses_the_same_windows_and_metrics():
    torch = pytest.importorskip("torch")
    from allocmoe_edge.torch_eval import Quality, token_windows

    class Tokenizer:
        bos_token_id = 1

        def __call__(self, text: str, add_special_tokens: bool) -> dict[str, list[int]]:
            assert not add_special_tokens
            return {"input_ids": [100 + i for i in range(len(text.split()))]}

    text = " ".join(["w"] * 30)  # 31 tokens with BOS
    windows = token_windows(Tokenizer(), text, 8)
    assert windows.dtype == torch.long
    assert windows.tolist() == chunk_tokens([1] + list(range(100, 130)), 8, bos=1).tolist()
    assert token_windows(Tokenizer(), text, 8, max_tokens=20).shape == (2, 8)
    with pytest.raises(AllocMoeError, match="needs at least 8"):
        token_windows(Tokenizer(), text, 8, max_tokens=7)

    rng = np.random.default_rng(2)
    ref, cur = rng.normal(size=(2, 6, 9)).astype(np.float32)
    targets = rng.integers(0, 9, 6)
    q = Quality()
    q.add(torch.from_numpy(cur), torch.from_numpy(targets), torch.from_numpy(ref))
    s = summarize(score_positions(log_probs(cur), targets, log_probs(ref)))
    assert q.result() == {"ppl": s["ppl"], "nll": s["nll"], "kld": s["kld_mean"], "kld_p99": s["kld_p99"],
                          "top1": s["top1"]}
