"""Alloc-T in llama.cpp (patch 0005) against the torch reference (hf.alloc_t_routing) on the same
token group (one ubatch): logits, executed activations per layer, per-token counts."""

from __future__ import annotations

import re

import numpy as np
import pytest

from allocmoe_edge.gguf_meta import plan_for_counts, read_info, stamp
from allocmoe_edge.graph_probe import moe_activations
from allocmoe_edge.runtime import LoadChoice

from .llama_logits import RTOL, load_for_test, tokens_for, torch_logits

pytestmark = [pytest.mark.slow, pytest.mark.runtime]

# arch -> (per-MoE-layer counts, k_max); k_max may exceed the original top-k (bounded by n_expert)
CASES = {
    "mixtral": ([2, 1, 2], 3),
    "qwen2_moe": ([2, 1, 2], 3),
    "qwen3_moe": ([2, 1, 2], 4),
    "olmoe": ([1, 2, 2], 4),
    "deepseek_v3": ([2, 1, 2], 3),
}


def _mixtral_plan(tiny_gguf, tmp_path, counts: list[int], k_min: int, k_max: int):
    """The tiny Mixtral stamped with one plan and the given Alloc-T bounds."""
    _, path = tiny_gguf("mixtral")
    return stamp(path, tmp_path / "t.gguf", [plan_for_counts(read_info(path), counts)], k_min=k_min, k_max=k_max).path


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(1e-6, float(np.max(np.abs(b)))))


@pytest.mark.parametrize("arch", sorted(CASES))
def test_alloc_t_matches_torch_reference(patched_runtime, tiny_gguf, tmp_path, arch):
    hf_dir, path = tiny_gguf(arch)
    counts, k_max = CASES[arch]
    info = read_info(path)
    stamp(path, tmp_path / "t.gguf", [plan_for_counts(info, counts)], k_min=1, k_max=k_max)
    tokens = tokens_for(50000, n=32)
    acts, got = moe_activations(load_for_test(tmp_path / "t.gguf"), tokens)
    ref = torch_logits(hf_dir, tokens, counts, alloc_t={"k_min": 1, "k_max": k_max})
    assert _rel(got, ref) < RTOL, f"{arch}: llama.cpp Alloc-T vs torch reference {_rel(got, ref):.2e}"
    # Alloc-T really redistributes here: plain per-layer top-k gives different logits
    assert _rel(torch_logits(hf_dir, tokens, counts), ref) > 0.05 > 5 * RTOL
    T = len(tokens)
    assert sorted(acts) == info.moe_layers
    for (layer, a), k in zip(sorted(acts.items()), counts):
        assert a["pairs"] == T * k, (layer, a["pairs"], T * k)  # exactly T x k_l activations executed
        if k == 1:  # k_l == k_min: every token keeps its top-1, so the plain top-k graph runs
            assert a["per_token"] is None
            continue
        assert a["per_token"] is not None and sum(a["per_token"]) == T * k
        assert all(1 <= c <= k_max for c in a["per_token"]), a["per_token"]


# arch -> (two plans of per-MoE-layer counts, k_max) for the ids-packing check
PACKING = {
    "mixtral": (([2, 1, 2], [2, 2, 2]), 3),
    "qwen3_moe": (([2, 1, 2], [3, 2, 3]), 4),
    "deepseek_v3": (([2, 1, 2], [2, 2, 1]), 3),
}


@pytest.mark.parametrize("T", [8, 64, 512])
@pytest.mark.parametrize("arch", sorted(PACKING))
def test_alloc_t_ids_columns_hold_distinct_experts(patched_runtime, tiny_gguf, tmp_path, arch, T):
    """CUDA's batched mul_mat_id assumes no ids column names an expert twice; Alloc-T packs its
    kept pairs of many tokens into each column, so it must keep every column's experts distinct."""
    _, path = tiny_gguf(arch)
    info = read_info(path)
    plans, k_max = PACKING[arch]
    stamped = stamp(path, tmp_path / "t.gguf", [plan_for_counts(info, c) for c in plans], k_min=1, k_max=k_max)
    tokens = tokens_for(50000, n=T, seed=T)
    for index, counts in enumerate(plans):
        acts, _ = moe_activations(load_for_test(tmp_path / "t.gguf", LoadChoice(plan_index=index), n_ctx=T), tokens)
        alloc_t_layers = [a for a in acts.values() if a["per_token"] is not None]
        assert len(alloc_t_layers) == sum(k > 1 for k in counts)  # every layer above k_min runs Alloc-T
        for layer, a in acts.items():
            ids = a["ids"]
            assert ids.shape == (T, stamped.plans[index].counts[layer]), (layer, ids.shape)
            repeats = [c.tolist() for c in ids if len(set(c.tolist())) < len(c)]
            assert not repeats, f"{arch} T={T} plan {counts} layer {layer}: {len(repeats)} columns repeat an expert"


def test_alloc_t_fits_its_node_budget(patched_runtime, tiny_gguf, tmp_path, capfd):
    """Patch 0002 raises llama.cpp's graph node budget for files with Alloc-T; the nodes Alloc-T adds
    to the pp graph (llama.cpp's own count at context creation) must fit in what it adds."""
    path = _mixtral_plan(tiny_gguf, tmp_path, [2, 2, 2], k_min=1, k_max=3)  # Alloc-T in all 3 layers
    counted = {}
    for k_max in (None, 0):
        capfd.readouterr()
        load_for_test(path, LoadChoice(token_k_max=k_max), verbose=True, n_ctx=64, n_batch=64, n_ubatch=64).close()
        log = capfd.readouterr().err
        nodes, budget = re.search(r"nodes = (\d+)", log), re.search(r"max_nodes = (\d+)", log)
        assert nodes and budget, log[-2000:]
        counted[k_max] = (int(nodes.group(1)), int(budget.group(1)))
    added_nodes = counted[None][0] - counted[0][0]
    added_budget = counted[None][1] - counted[0][1]
    assert 0 < added_nodes <= added_budget, (counted, added_nodes / 3)


def test_k_max_equal_to_counts_is_plain_top_k_bitwise(patched_runtime, tiny_gguf, tmp_path):
    path = _mixtral_plan(tiny_gguf, tmp_path, [2, 2, 2], k_min=1, k_max=2)
    tokens = tokens_for(50000, n=16)
    acts_t, with_t = moe_activations(load_for_test(path), tokens)
    acts_0, without = moe_activations(load_for_test(path, LoadChoice(token_k_max=0)), tokens)
    assert np.array_equal(with_t, without)
    assert all(a["per_token"] is None for a in acts_t.values())  # no Alloc-T nodes in the graph


def test_alloc_t_off_override_and_single_token(patched_runtime, tiny_gguf, tmp_path):
    path = _mixtral_plan(tiny_gguf, tmp_path, [2, 1, 2], k_min=1, k_max=3)
    tokens = tokens_for(50000, n=16)
    # token_k_max=0 turns Alloc-T off: plain per-layer top-k
    acts, _ = moe_activations(load_for_test(path, LoadChoice(token_k_max=0)), tokens)
    assert [a["per_token"] for a in acts.values()] == [None] * 3
    # T = 1 (single-stream decode) is exactly top-k_l, with no extra nodes
    acts1, _ = moe_activations(load_for_test(path), tokens[:1])
    assert [(a["pairs"], a["per_token"]) for a in acts1.values()] == [(2, None), (1, None), (2, None)]


def test_k_min_protects_each_tokens_best(patched_runtime, tiny_gguf, tmp_path):
    path = _mixtral_plan(tiny_gguf, tmp_path, [3, 2, 3], k_min=2, k_max=4)
    tokens = tokens_for(50000, n=20)
    acts, _ = moe_activations(load_for_test(path), tokens)
    for a, k in zip(acts.values(), [3, 2, 3]):
        assert a["pairs"] == 20 * k
        if k > 2:
            assert min(a["per_token"]) >= 2 and max(a["per_token"]) <= 4
