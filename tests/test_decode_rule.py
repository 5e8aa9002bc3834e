"""Alloc-T's decode rule: threshold calibration (thresholds.py), the torch reference (select_above,
hf.alloc_t_routing with thresholds) and llama.cpp one token per ubatch against it."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from allocmoe_edge.alloc_t_reference import select_above
from allocmoe_edge.errors import AllocMoeError
from allocmoe_edge.plan import decode_ruled, end_threshold
from allocmoe_edge.thresholds import (
    LayerRouting,
    calibrated_block_thresholds,
    expected_count,
    plan_thresholds,
    rank_quantiles,
    ruled_thresholds,
    solve_threshold,
)


def _ranked(n: int = 4000, n_expert: int = 16, seed: int = 0) -> np.ndarray:
    """Softmax routing scores of random logits, each row sorted best first."""
    logits = np.random.default_rng(seed).normal(size=(n, n_expert)) * 2
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return -np.sort(-p, axis=1)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_threshold_meets_the_mean_count_on_its_calibration_scores(k):
    ranked = _ranked()
    tau = solve_threshold(rank_quantiles(0, ranked), k, k_min=1, k_max=6)
    kept = 1 + (ranked[:, 1:6] > tau).sum(axis=1)  # the decode rule, counted directly
    assert abs(kept.mean() - k) < 0.02 * k, (kept.mean(), k)
    assert 1 <= kept.min() and kept.max() <= 6


def test_threshold_edges_monotony_and_bad_input():
    stats = rank_quantiles(3, _ranked())
    assert solve_threshold(stats, 1, 1, 6) == math.inf and solve_threshold(stats, 6, 1, 6) == -math.inf
    taus = [solve_threshold(stats, k, 1, 6) for k in (2, 3, 4, 5)]
    assert taus == sorted(taus, reverse=True)  # more experts, lower threshold
    assert expected_count(stats, taus[1], 1, 6) == pytest.approx(3, abs=1e-3)
    with pytest.raises(AllocMoeError, match="ranks 1..16"):
        solve_threshold(stats, 3, 1, 17)
    with pytest.raises(AllocMoeError, match="k_min <= k <= k_max"):
        solve_threshold(stats, 7, 1, 6)
    with pytest.raises(AllocMoeError, match="MoE layers \\[5\\]"):
        plan_thresholds([stats], [3, 5], [2, 2], 1, 4)
    assert np.allclose(LayerRouting.from_dict(stats.to_dict()).quantiles, stats.quantiles, rtol=1e-5)
    with pytest.raises(AllocMoeError, match="ascending"):
        LayerRouting.from_dict({**stats.to_dict(), "quantiles": [[1.0, 0.0]]})


def test_select_above_keeps_k_min_and_the_scores_above():
    ranked = torch.tensor([[0.6, 0.3, 0.1], [0.4, 0.35, 0.25], [0.9, 0.05, 0.05]])
    keep = select_above(ranked, 0.2, k_min=1)
    assert keep.tolist() == [[True, True, False], [True, True, True], [True, False, False]]
    assert select_above(ranked, 0.99, k_min=2).sum(dim=1).tolist() == [2, 2, 2]


# ---------------------------------------------------------------------------- llama.cpp vs torch

# arch -> (per-MoE-layer counts, k_max): every layer strictly between k_min and k_max runs the rule
CASES = {
    "mixtral": ([2, 2, 2], 3),
    "qwen2_moe": ([2, 2, 2], 3),
    "qwen3_moe": ([2, 3, 2], 4),
    "olmoe": ([2, 3, 2], 4),
    "deepseek_v3": ([2, 2, 2], 3),
}


def test_one_rule_for_which_layers_get_a_threshold():
    assert [decode_ruled(k, 1, 6) for k in (1, 2, 5, 6)] == [False, True, True, False]
    assert not decode_ruled(3, 1, 0)  # Alloc-T off: no layer runs the decode rule
    assert (end_threshold(1, 1), end_threshold(6, 1), end_threshold(2, 2)) == (math.inf, -math.inf, math.inf)
    stats = [rank_quantiles(3, _ranked())]  # the ends need no routing statistics
    tau = solve_threshold(stats[0], 3, 1, 6)
    assert ruled_thresholds(stats, [1, 2, 3], [1, 6, 3], 1, 6) == (None, None, tau)
    assert calibrated_block_thresholds(stats, [6, 1, 6, 3], [1, 2, 3], 1, 6) == (math.inf, math.inf, -math.inf, tau)


def _calibrated(hf_dir, tokens, counts, k_max):
    """Thresholds for ``counts`` from the full-budget model's routing on ``tokens`` (as a profile does)."""
    from transformers import AutoModelForCausalLM

    from allocmoe_edge import hf

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad(), hf.routing_scores(model, k_max) as scores:
        model(torch.tensor([list(tokens)]))
    layers = sorted(scores)
    stats = [rank_quantiles(b, torch.cat(scores[b]).numpy()) for b in layers]
    return layers, plan_thresholds(stats, layers, counts, 1, k_max)


@pytest.mark.slow
@pytest.mark.runtime
@pytest.mark.parametrize("arch", sorted(CASES))
def test_decode_rule_one_token_per_ubatch_matches_torch(patched_runtime, tiny_gguf, tmp_path, arch):
    from allocmoe_edge.gguf_meta import plan_for_counts, read_info, stamp
    from allocmoe_edge.graph_probe import moe_activations
    from allocmoe_edge.runtime import LoadChoice

    from .llama_logits import RTOL, load_for_test, tokens_for, torch_logits

    hf_dir, path = tiny_gguf(arch)
    counts, k_max = CASES[arch]
    info = read_info(path)
    tokens = tokens_for(50000, n=24)
    layers, taus = _calibrated(hf_dir, tokens, counts, k_max)
    per_block = [0.0] * info.block_count
    for b, tau in zip(layers, taus):
        per_block[b] = tau
    plan = dataclasses.replace(plan_for_counts(info, counts), thresholds=tuple(per_block))
    stamped = stamp(path, tmp_path / "d.gguf", [plan], k_min=1, k_max=k_max, token_mode="both")
    assert stamped.allocmoe["version"] == 2 and stamped.plans[0].thresholds == pytest.approx(per_block)

    def decoded(choice: LoadChoice) -> np.ndarray:
        llm = load_for_test(stamped.path, choice, logits_all=True, n_ctx=64, n_batch=1, n_ubatch=1, n_threads=2,
                            type_k=0, type_v=0)  # one token per ubatch, f32 KV cache
        llm.eval(tokens)
        out = np.array(llm.scores[: len(tokens)], dtype=np.float32)
        llm.close()
        return out

    def rel(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))

    # the calibrated thresholds alone (budget controller off), then with the controller (on by default; a
    # short window so that it moves within these 24 tokens), each against its torch reference
    alloc_t = {"k_min": 1, "k_max": k_max, "thresholds": taus}
    ref = torch_logits(hf_dir, tokens, counts, alloc_t=alloc_t)
    assert rel(decoded(LoadChoice(decode_control=False)), ref) < RTOL, f"{arch}: decode rule vs torch"
    controlled = torch_logits(hf_dir, tokens, counts, alloc_t={**alloc_t, "decode_window": 4})
    assert rel(decoded(LoadChoice(decode_window=4)), controlled) < RTOL, f"{arch}: controlled decode rule vs torch"
    assert rel(controlled, ref) > 0.01  # the controller moved thresholds across candidates' scores
    per_layer = torch_logits(hf_dir, tokens, counts)
    assert rel(per_layer, ref) > 0.05  # the rule changes the result

    # "decode" mode runs the rule on every ubatch: in one ubatch of all tokens each token sees the thresholds its
    # sequence started the ubatch with (the calibrated ones here), and the ids mark dropped candidates -1, so
    # each layer executes what the reference routes
    acts, batch = moe_activations(load_for_test(stamped.path, LoadChoice(token_mode="decode")), tokens)
    assert rel(batch, ref) < RTOL
    from transformers import AutoModelForCausalLM

    from allocmoe_edge import hf

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad(), hf.alloc_t_routing(model, counts, **alloc_t) as counter:
        model(torch.tensor([tokens]))
    for b in layers:
        assert acts[b]["active"] == counter.activations[b], (b, acts[b]["active"], counter.activations[b])
        assert all(1 <= c <= k_max for c in acts[b]["per_token"])
    assert any(len(set(acts[b]["per_token"])) > 1 for b in layers)  # tokens really differ in expert count


@pytest.mark.slow
@pytest.mark.runtime
def test_decode_mode_needs_thresholds_and_batch_files_are_unchanged(patched_runtime, tiny_gguf, tmp_path):
    from allocmoe_edge.gguf_meta import plan_for_counts, read_info, stamp
    from allocmoe_edge.runtime import LoadChoice

    from .llama_logits import llama_logits, tokens_for

    _, path = tiny_gguf("mixtral")
    info = read_info(path)
    with pytest.raises(AllocMoeError, match="no decode thresholds"):
        stamp(path, tmp_path / "x.gguf", [plan_for_counts(info, [2, 1, 2])], k_max=3, token_mode="both")
    plain = stamp(path, tmp_path / "b.gguf", [plan_for_counts(info, [2, 1, 2])], k_max=3)
    assert plain.allocmoe["version"] == 1 and "token_mode" not in plain.allocmoe
    with pytest.raises(AllocMoeError, match="the decode rule, which needs the plan's thresholds"):
        llama_logits(plain.path, tokens_for(50000, n=8), LoadChoice(token_mode="decode"))


# ---------------------------------------------------------------------------- GGUF-side calibration, eval, bench

@pytest.mark.slow
@pytest.mark.runtime
def test_random_token_calibration_meets_the_budget_when_decoding(patched_runtime, tmp_path):
    """bench's uniform-split plans on a synthetic file: thresholds from llama.cpp's own routing of
    random tokens; decoding other random tokens one at a time spends close to each plan's count."""
    from allocmoe_edge.allocate import stamp_uniform_split
    from allocmoe_edge.graph_probe import DecodeCounter
    from allocmoe_edge.runtime import LoadChoice, load
    from allocmoe_edge.synth import synthesize

    src = synthesize("olmoe-1b-7b", "q4_0", tmp_path / "olmoe2.gguf", n_layer=2)
    info = stamp_uniform_split(src, tmp_path / "olmoe2.plans.gguf", (0.75, 0.5, 0.25), decode_rule=True)
    assert info.allocmoe["token_mode"] == "both" and all(p.thresholds is not None for p in info.plans)
    tokens = np.random.default_rng(7).integers(3, 50000, 96).tolist()
    for i, plan in enumerate(info.plans):
        llm = load(info.path, LoadChoice(plan_index=i), info=info, n_ctx=128)
        counter = DecodeCounter(llm, len(tokens))
        for t in tokens:
            counter.step(t)
        counter.close()
        llm.close()
        spent, budget = sum(counter.per_token().values()), plan.budget_count
        assert abs(spent - budget) < 0.15 * budget, (plan.name, spent, budget)


@pytest.mark.slow
@pytest.mark.runtime
def test_eval_decode_protocol_measures_what_each_token_runs(patched_runtime, tiny_gguf, tmp_path):
    from allocmoe_edge import assets
    from allocmoe_edge.evaluate import evaluate_llama
    from allocmoe_edge.gguf_meta import plan_for_counts, read_info, stamp

    from .llama_logits import tokens_for

    hf_dir, path = tiny_gguf("olmoe")
    counts, k_max = [2, 3, 2], 4
    info = read_info(path)
    layers, taus = _calibrated(hf_dir, tokens_for(50000, n=256, seed=3), counts, k_max)
    per_block = [math.inf] * info.block_count
    for b, tau in zip(layers, taus):
        per_block[b] = tau
    plan = dataclasses.replace(plan_for_counts(info, counts), thresholds=tuple(per_block))
    stamped = stamp(path, tmp_path / "e.gguf", [plan], k_min=1, k_max=k_max)  # token mode "both"
    result = evaluate_llama(stamped.path, assets.heldout_text(), ctx=32, chunks=3, decode=True, n_threads=2)
    rows = {r["name"]: r for r in result["results"]}
    assert result["decode"] and result["token_mode"] == "both"
    assert rows["full"]["activations_per_token"] == info.full_budget and rows["full"]["kld_mean"] == 0
    assert rows["custom (plan 0)"]["activations_per_token"] == sum(counts)  # per-layer top-k: exactly the counts
    decoded = rows["custom+t (plan 0)"]
    assert 3 <= decoded["activations_per_token"] <= 3 * k_max and decoded["activations_per_token"] != sum(counts)
    assert all(isinstance(c, float) for c in decoded["counts"])  # measured means, not the plan's integers
    assert decoded["kld_mean"] > 0 and decoded["kld_mean"] != rows["custom (plan 0)"]["kld_mean"]


# ---------------------------------------------------------------------------- the budget controller (patch 0010)

def test_controller_reference_holds_the_mean_where_fixed_thresholds_drift():
    """The torch reference of the controlled rule on scores unlike its calibration's: every token's scores
    shifted up, so the calibrated threshold keeps far more than k; the controller brings the mean back."""
    from allocmoe_edge.alloc_t_reference import select_above_controlled

    ranked = torch.tensor(_ranked(n=2000, n_expert=16, seed=1)[:, :8], dtype=torch.float32)
    tau = solve_threshold(rank_quantiles(0, ranked.numpy()), 3, k_min=1, k_max=8)
    drifted = ranked * 1.6  # the same ranking, larger scores
    fixed = select_above(drifted, tau, 1).sum(dim=1).float()
    held = select_above_controlled(drifted, tau, 3, 1, 8, window=64).sum(dim=1).float()
    assert fixed.mean() > 3 * 1.2  # the calibrated threshold alone overspends by more than 20 %
    assert abs(held.mean() - 3) < 0.03 * 3, held.mean()
    windows = held.unfold(0, 64, 1).mean(dim=1)
    assert abs(windows[64:] - 3).max() < 0.1 * 3  # after the first window, every 64-token window within 10 %
    assert torch.equal(select_above_controlled(ranked, math.inf, 1, 1, 8, 64), select_above(ranked, math.inf, 1))


def test_controller_choice_and_metadata(tmp_path):
    from allocmoe_edge.gguf_meta import plan_for_counts, read_info, stamp
    from allocmoe_edge.runtime import LoadChoice

    from .ggufs import write_fake_moe

    src = write_fake_moe(tmp_path / "f.gguf", n_layer=2, n_expert=8, k=4)
    info = read_info(src)
    plan = dataclasses.replace(plan_for_counts(info, [2, 3]), thresholds=(0.1, 0.1))
    stamped = stamp(src, tmp_path / "s.gguf", [plan], k_max=4, decode_control=False, decode_window=16)
    assert (stamped.meta.decode_control, stamped.meta.decode_window) == (False, 16) and not stamped.meta.malformed
    default = stamp(src, tmp_path / "d.gguf", [plan], k_max=4)
    assert (default.meta.decode_control, default.meta.decode_window) == (True, 64)
    assert "allocmoe.decode_control" not in default.allocmoe
    kv = LoadChoice(decode_control=True, decode_window=32).kv_overrides(info)
    assert kv == {"allocmoe.decode_control": True, "allocmoe.decode_window": 32}
    with pytest.raises(AllocMoeError, match="decode window 0"):
        LoadChoice(decode_window=0).kv_overrides(info)
    with pytest.raises(AllocMoeError, match="decode window 70000"):
        stamp(src, tmp_path / "x.gguf", [plan], k_max=4, decode_window=70000)


@pytest.mark.slow
@pytest.mark.runtime
def test_controller_holds_the_budget_off_its_calibration_text(patched_runtime, tmp_path):
    """The bundled tiny-moe with thresholds calibrated on held-out prose, decoding random token ids one at a time
    (routing unlike the calibration's): the calibrated thresholds alone drift off the budget; with the controller
    (the default) the mean is back within 3 % of it, every 64-token window after the first within 10 %; and the
    patched loader refuses a window of 0."""
    from transformers import AutoTokenizer

    from allocmoe_edge import assets
    from allocmoe_edge.convert import convert_hf
    from allocmoe_edge.gguf_meta import plan_for_counts, read_info, stamp
    from allocmoe_edge.graph_probe import DecodeCounter
    from allocmoe_edge.runtime import LoadChoice, load

    hf_dir = assets.model_dir("tiny-moe")
    plain = convert_hf(hf_dir, tmp_path / "tiny-f16.gguf", "f16", log=lambda m: None)
    info = read_info(plain)
    counts, k_max = [2] * len(info.moe_layers), info.expert_used_count
    prose = AutoTokenizer.from_pretrained(hf_dir)(assets.heldout_text().read_text()[:20000])["input_ids"][:1024]
    layers, taus = _calibrated(hf_dir, prose, counts, k_max)
    per_block = [0.0] * info.block_count
    for b, tau in zip(layers, taus):
        per_block[b] = tau
    plan = dataclasses.replace(plan_for_counts(info, counts), thresholds=tuple(per_block))
    stamped = stamp(plain, tmp_path / "tiny.gguf", [plan], k_min=1, k_max=k_max)
    tokens = np.random.default_rng(5).integers(3, 8000, 320).tolist()  # tiny-moe has 8000 tokens
    spent, counters = {}, {}
    for control in (False, True):
        llm = load(stamped.path, LoadChoice(decode_control=control), info=stamped, n_ctx=512)
        counters[control] = counter = DecodeCounter(llm, len(tokens) + 8)
        for t in tokens:
            counter.step(t)
        counter.close()
        llm.close()
        spent[control] = sum(counter.per_token().values())
    budget = sum(counts)
    assert abs(spent[False] - budget) > 0.05 * budget, spent  # the text really is off the calibration
    assert abs(spent[True] - budget) < 0.03 * budget, spent
    per_token = np.array(counters[True].sequences[0], dtype=float)
    windows = np.convolve(per_token, np.ones(64), "valid") / 64
    assert np.abs(windows[64:] - budget).max() < 0.1 * budget, (windows.min(), windows.max())

    import llama_cpp  # past LoadChoice's own check: the patched loader refuses the window too

    with pytest.raises(ValueError):
        llama_cpp.Llama(model_path=str(stamped.path), kv_overrides={"allocmoe.decode_window": 0}, verbose=False)
