"""The field's per-token rules beside Alloc-T (patch 0011, `peers`): SER and top-p. Their calibration against
brute force, the torch reference against the numpy counts, llama.cpp against the torch reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from allocmoe_edge.alloc_t_reference import select_peer
from allocmoe_edge.errors import AllocMoeError
from allocmoe_edge.peers import calibrate, check_value, kept, mean_activations


def _routing(n: int = 3000, n_expert: int = 16, k: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Softmax gate values of random logits: each token's top-k best first, and their sum over all experts."""
    logits = np.random.default_rng(seed).normal(size=(n, n_expert)) * 1.5
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return -np.sort(-p, axis=1)[:, :k], p.sum(axis=1)


def test_rules_by_hand():
    ranked = np.array([[0.5, 0.3, 0.1, 0.05], [0.9, 0.04, 0.03, 0.02]])
    totals = np.ones(2)
    assert kept("ser", ranked, totals, 0.5, 1).tolist() == [[True, True, False, False], [True, False, False, False]]
    assert kept("ser", ranked, totals, 0.5, 3).sum(axis=1).tolist() == [3, 3]
    # top-p keeps a candidate while the mass before it is below p: 0.5 | 0.8 | 0.9 for the first token
    assert kept("top_p", ranked, totals, 0.85, 1).sum(axis=1).tolist() == [3, 1]
    assert kept("top_p", ranked, totals, 1.0, 1).sum(axis=1).tolist() == [4, 4]
    # totals normalise: the same weights as half of a token's mass need twice the p
    assert kept("top_p", ranked / 2, totals, 0.425, 1).sum(axis=1).tolist() == [3, 1]


@pytest.mark.parametrize("rule,value", [("ser", 0.3), ("ser", 0.05), ("top_p", 0.6), ("top_p", 0.9)])
def test_torch_reference_keeps_what_the_numpy_rule_counts(rule, value):
    ranked, totals = _routing()
    ref = select_peer(rule, torch.from_numpy(ranked).float(), torch.from_numpy(totals).float(), value, 1).numpy()
    mine = kept(rule, ranked.astype(np.float32), totals.astype(np.float32), value, 1)
    assert (ref != mine).mean() < 1e-3  # float32 vs float64 margins at the cut only
    assert 1 < ref.sum(axis=1).mean() < 4 and len(set(ref.sum(axis=1))) > 1


@pytest.mark.parametrize("rule", ["ser", "top_p"])
@pytest.mark.parametrize("target", [5.0, 8.0, 12.0])
def test_calibration_meets_the_target_as_brute_force_finds_it(rule, target):
    layers = {b: _routing(seed=b) for b in range(4)}  # 4 layers of top-4: 4 .. 16 activations per token
    value = calibrate(rule, layers, target)
    got = mean_activations(rule, layers, value, 1)
    grid = np.linspace(0, 1, 2001)[1:]
    best = min(abs(mean_activations(rule, layers, v, 1) - target) for v in grid)
    assert abs(got - target) <= best + 1e-9 and abs(got - target) < 0.01, (got, target, best)
    counts = [mean_activations(rule, layers, v, 1) for v in (0.2, 0.5, 0.8)]
    assert counts == sorted(counts, reverse=rule == "ser")  # SER's t cuts more as it rises, top-p's p less


def test_values_out_of_range_are_errors():
    assert check_value("ser", 0.0) == 0.0 and check_value("top_p", 1.0) == 1.0
    for rule, value in (("ser", -0.1), ("ser", 1.5), ("top_p", 0.0), ("top_p", 1.01)):
        with pytest.raises(AllocMoeError, match="outside"):
            check_value(rule, value)
    with pytest.raises(AllocMoeError, match="not one of"):
        check_value("min_p", 0.5)
    with pytest.raises(AllocMoeError, match="no routing weights"):
        calibrate("ser", {}, 4.0)


# ---------------------------------------------------------------------------- llama.cpp vs torch

ARCHS = ["deepseek_v3", "mixtral", "olmoe", "qwen2_moe", "qwen3_moe"]


@pytest.mark.slow
@pytest.mark.runtime
@pytest.mark.parametrize("arch", ARCHS)
def test_llama_cpp_runs_ser_and_top_p_as_torch_does(patched_runtime, tiny_gguf, arch):
    """On a file without a plan (as users run them on stock files), in one ubatch of all tokens: the logits match
    transformers with `hf.peer_routing`, each layer runs the experts the reference counts, and the counts vary
    per token."""
    from transformers import AutoModelForCausalLM

    from allocmoe_edge import hf
    from allocmoe_edge.graph_probe import moe_activations
    from allocmoe_edge.runtime import LoadChoice

    from .llama_logits import RTOL, load_for_test, tokens_for

    hf_dir, path = tiny_gguf(arch)
    tokens = tokens_for(50000, n=24)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        full = model(torch.tensor([tokens])).logits[0].numpy()
    for rule, value in (("ser", 0.6), ("top_p", 0.5)):
        with torch.no_grad(), hf.peer_routing(model, rule, value) as counter:
            ref = model(torch.tensor([tokens])).logits[0].numpy()
        choice = LoadChoice(token_rule=rule, token_rule_value=value)
        llm = load_for_test(path, choice, logits_all=True, n_ctx=64, n_batch=64, n_ubatch=64, n_threads=2,
                            type_k=0, type_v=0)
        acts, logits = moe_activations(llm, tokens)
        llm.close()
        scale = np.max(np.abs(ref))
        assert np.max(np.abs(logits - ref)) / scale < RTOL, f"{arch} {rule}: llama.cpp vs torch"
        assert np.max(np.abs(full - ref)) / scale > 0.01, f"{arch} {rule}: the rule changed nothing"
        for b, entry in acts.items():
            assert entry["active"] == counter.activations[b], (arch, rule, b, entry["active"], counter.activations[b])
        assert any(len(set(entry["per_token"])) > 1 for entry in acts.values()), f"{arch} {rule}: counts never vary"


@pytest.mark.runtime
def test_token_rule_choice_errors(patched_runtime, tiny_gguf):
    from allocmoe_edge.gguf_meta import Keys, read_info
    from allocmoe_edge.runtime import LoadChoice, context_plan

    from .llama_logits import load_for_test

    _, path = tiny_gguf("mixtral")
    info = read_info(path)
    kv = LoadChoice(token_rule="top_p", token_rule_value=0.7, token_rule_k_min=2).kv_overrides(info)
    assert kv == {Keys.TOKEN_RULE: "top_p", Keys.TOKEN_RULE_VALUE: 0.7, Keys.TOKEN_RULE_K_MIN: 2}
    with pytest.raises(AllocMoeError, match="needs its value"):
        LoadChoice(token_rule="ser").kv_overrides(info)
    with pytest.raises(AllocMoeError, match="outside"):
        LoadChoice(token_rule="ser", token_rule_value=2.0).kv_overrides(info)
    with pytest.raises(AllocMoeError, match="k_min 0"):
        LoadChoice(token_rule="ser", token_rule_value=0.5, token_rule_k_min=0).kv_overrides(info)
    with pytest.raises(AllocMoeError, match="chosen when the model is loaded"):
        context_plan(LoadChoice(token_rule="ser", token_rule_value=0.5))

    # what the loader itself refuses (kv_overrides past LoadChoice's checks)
    import llama_cpp

    for kv, message in (({Keys.TOKEN_RULE: "min_p", Keys.TOKEN_RULE_VALUE: 0.5}, "not one of"),
                        ({Keys.TOKEN_RULE: "ser"}, "needs allocmoe.token_rule_value"),
                        ({Keys.TOKEN_RULE: "top_p", Keys.TOKEN_RULE_VALUE: 0.0}, "outside"),
                        ({Keys.TOKEN_RULE: "ser", Keys.TOKEN_RULE_VALUE: 0.5, Keys.TOKEN_RULE_K_MIN: 99}, "outside")):
        with pytest.raises(Exception, match="Failed to load|" + message):
            llama_cpp.Llama(str(path), kv_overrides=kv, n_ctx=32, verbose=False)
    assert load_for_test(path, LoadChoice(token_rule="ser", token_rule_value=0.0), n_ctx=32) is not None


@pytest.mark.slow
@pytest.mark.runtime
@pytest.mark.parametrize("decode", [False, True])
def test_eval_peers_rows_meet_their_budget_on_the_calibration_text(patched_runtime, bundled_budget_gguf, decode):
    """`eval --peers` on the bundled tiny-moe, scored on the calibration text itself: SER's and top-p's values
    calibrated to 50 % and 75 % measure those budgets (within 3 %: the chunks differ from the calibration's
    ubatches, BOS and all), both protocols count what the tokens ran, and the rules differ from each other."""
    from allocmoe_edge import assets
    from allocmoe_edge.evaluate import evaluate_llama

    calib = assets.calib_text()
    result = evaluate_llama(bundled_budget_gguf, calib, ctx=128, chunks=8, budgets=[0.5, 0.75], peers=calib,
                            n_threads=2, decode=decode)
    peers = [r for r in result["results"] if r.get("token_rule")]
    assert [r["method"] for r in peers] == ["ser", "top_p"] * 2
    assert result["peer_calibration"]["n_tokens"] == 8192 and result["peer_calibration"]["k_min"] == 1
    for row, budget in zip(peers, (0.5, 0.5, 0.75, 0.75)):
        assert abs(row["budget"] - budget) < 0.03 * budget, (row["name"], row["budget"], budget)
        assert 0 < row["token_rule_value"] < 1 and all(1 <= c <= 4 for c in row["counts"])
        assert row["kld_mean"] > 0
    assert peers[0]["kld_mean"] != peers[1]["kld_mean"]


def test_eval_and_bench_rows_of_a_peer(tiny_gguf):
    """A SER row runs the file at full budget with the rule on, and bench names it by the budget it was
    calibrated to (its counts vary per token; bench measures them while decoding)."""
    from allocmoe_edge.bench import executed_counts
    from allocmoe_edge.evaluate import EvalConfig, result_row
    from allocmoe_edge.gguf_meta import read_info

    info = read_info(tiny_gguf("mixtral")[1])  # top-3
    config = EvalConfig("SER t=0.3", "ser", token_rule="ser", token_rule_value=0.3, budget=2 / 3)
    choice = config.choice()
    assert choice.full_budget
    assert (choice.token_rule, choice.token_rule_value, choice.token_rule_k_min) == ("ser", 0.3, 1)
    assert executed_counts(info, config) == (2,) * len(info.moe_layers)
    row = result_row(config, 6.5, [2.0, 2.5, 2.0], info.full_budget, {})
    assert (row["token_rule"], row["token_rule_value"], row["activations_per_token"]) == ("ser", 0.3, 6.5)


def test_calibration_refuses_a_budget_that_peaked_routing_cannot_reach():
    """A random router's one-hot routing (as the synth files have): every value keeps one expert or all of them."""
    ranked = np.zeros((500, 4))
    ranked[:, 0] = 1.0
    ranked[:, 1:] = 1e-30
    layers = {0: (ranked, np.ones(500))}
    for rule in ("ser", "top_p"):
        with pytest.raises(AllocMoeError, match="cannot be calibrated to 2 activations"):
            calibrate(rule, layers, 2.0)
