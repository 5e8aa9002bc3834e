"""MoE discovery, per-layer top-k and the Alloc-T routing hook on tiny random models."""

from functools import cache

import pytest
import torch

from allocmoe_edge.alloc_t_reference import select
from allocmoe_edge.errors import AllocMoeError
from allocmoe_edge.hf import alloc_t_routing, layer_topk, moe_shape, parse_max_memory, plan_shape

from .tiny_models import ARCHS, make_tiny_model

# tiny models under test: name -> (architecture, config overrides)
VARIANTS = {arch: (arch, {}) for arch in ARCHS}
VARIANTS["deepseek_v2_grouped"] = ("deepseek_v2",
                                   {"topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1})

# name -> (n_layer, moe_layers, n_expert, k_orig, score, renormalise, scaling, groups, shared experts)
EXPECTED = {
    "mixtral": (3, (0, 1, 2), 6, 3, "softmax", True, 1.0, None, False),
    "qwen2_moe": (3, (0, 1, 2), 8, 3, "softmax", False, 1.0, None, True),
    "qwen3_moe": (3, (0, 1, 2), 8, 2, "softmax", True, 1.0, None, False),
    "olmoe": (3, (0, 1, 2), 8, 2, "softmax", False, 1.0, None, False),
    "deepseek_v2": (4, (1, 2, 3), 8, 3, "softmax", False, 1.5, None, True),
    "deepseek_v2_grouped": (4, (1, 2, 3), 8, 3, "softmax", False, 1.5, (2, 1), True),
    "deepseek_v3": (4, (1, 2, 3), 8, 3, "sigmoid", True, 2.5, (2, 1), True),
}


@cache
def model(name: str) -> torch.nn.Module:
    arch, overrides = VARIANTS[name]
    return make_tiny_model(arch, seed=0, **overrides)


def ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 320, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m(x, use_cache=False).logits


@pytest.mark.parametrize("arch", VARIANTS)
def test_identity_and_routing(arch):
    n_layer, moe_layers, n_expert, k_orig, score, renorm, scaling, groups, shared = EXPECTED[arch]
    info = moe_shape(model(arch))
    assert plan_shape(model(arch)).to_dict() == {
        "architecture": VARIANTS[arch][0], "n_layer": n_layer, "moe_layers": list(moe_layers), "n_expert": n_expert,
        "k_orig": k_orig,
    }
    r = info.routing
    assert (r.score, r.renormalise, r.scaling, info.shared_experts) == (score, renorm, scaling, shared)
    assert (None if r.n_group is None else (r.n_group, r.topk_group)) == groups


@pytest.mark.parametrize("arch", VARIANTS)
def test_full_counts_give_identical_logits(arch):
    m, x = model(arch), ids(2, 10)
    info = moe_shape(m)
    full = [info.k_orig] * len(info.layers)
    ref = logits(m, x)
    for mode in (layer_topk, alloc_t_routing):
        with mode(m, full) as counter:
            assert torch.equal(logits(m, x), ref), mode.__name__
        assert counter.per_token() == {b: float(info.k_orig) for b in EXPECTED[arch][1]}


@pytest.mark.parametrize("arch", VARIANTS)
def test_single_token_alloc_t_is_topk_and_counts_spent(arch):
    m = model(arch)
    info = moe_shape(m)
    counts = [max(1, info.k_orig - 1), 1, info.k_orig][: len(info.layers)]
    x = ids(2, 9, seed=1)
    with layer_topk(m, counts):
        topk_single = logits(m, x[:1, :1])
    with alloc_t_routing(m, counts) as counter:
        single = logits(m, x[:1, :1])  # T = 1: Alloc-T is plain top-k_l
        logits(m, x)
    torch.testing.assert_close(single, topk_single, rtol=1e-5, atol=1e-5)
    assert counter.per_token() == {b: float(k) for b, k in zip(EXPECTED[arch][1], counts)}


@pytest.mark.parametrize("arch", VARIANTS)
def test_k_max_equal_counts_is_layer_topk(arch):
    m = model(arch)
    k = max(1, moe_shape(m).k_orig - 1)
    n = len(moe_shape(m).layers)
    x = ids(2, 9, seed=2)
    with layer_topk(m, [k] * n):
        topk = logits(m, x)
    with alloc_t_routing(m, [k] * n, k_max=k):
        assert torch.equal(logits(m, x), topk)


def _selection_scores(arch: str, router: torch.nn.Module, router_logits: torch.Tensor) -> torch.Tensor:
    if arch == "deepseek_v3":
        return router_logits.float().sigmoid() + router.e_score_correction_bias
    return router_logits.float().softmax(dim=-1)


@pytest.mark.parametrize("arch", VARIANTS)
def test_alloc_t_router_matches_reference(arch):
    m = model(arch)
    info = moe_shape(m)
    layer = info.layers[-1]
    n, k, k_min, k_max = len(info.layers), 2, 1, info.k_orig
    hidden = torch.randn(24, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with layer_topk(m, [k_max] * n):  # the model's own top-k_max candidates and weights
            router_logits, cand_w, cand = layer.router(hidden)
        with alloc_t_routing(m, [k] * n, k_min, k_max):
            _, weights, index = layer.router(hidden)
    # reference: Alloc-T over the candidates' selection scores
    scores = torch.full_like(router_logits, float("-inf"), dtype=torch.float32)
    scores.scatter_(1, cand, _selection_scores(arch, layer.router, router_logits).gather(1, cand))
    ref_mask, ref_counts = select(scores, k, k_min, k_max)
    kept = index < info.n_expert
    mask = torch.nn.functional.one_hot(index, info.n_expert + 1)[..., : info.n_expert].any(dim=1)
    assert torch.equal(mask, ref_mask)
    assert int(kept.sum()) == 24 * k and torch.equal(kept.sum(1), ref_counts)
    assert bool((weights[~kept] == 0).all())
    full_w = torch.zeros(24, info.n_expert).scatter(1, cand, cand_w.float())
    got_w = torch.zeros(24, info.n_expert).scatter_add(1, index.clamp(max=info.n_expert - 1), weights.float())
    if info.routing.renormalise:
        torch.testing.assert_close(got_w.sum(1), torch.full((24,), info.routing.scaling))
        ratio = got_w[ref_mask] / full_w[ref_mask]  # renormalisation rescales each token's kept weights
        token = torch.arange(24).unsqueeze(1).expand(-1, info.n_expert)[ref_mask]
        for t in range(24):
            torch.testing.assert_close(ratio[token == t], ratio[token == t][:1].expand(int((token == t).sum())))
    else:
        torch.testing.assert_close(got_w, full_w * ref_mask)


def test_topk_restored_after_error():
    m = model("olmoe")
    before = [layer.router.top_k for layer in moe_shape(m).layers]
    with pytest.raises(RuntimeError):
        with alloc_t_routing(m, [1, 1, 1]):
            raise RuntimeError("boom")
    assert [layer.router.top_k for layer in moe_shape(m).layers] == before
    assert all(not layer.router._forward_hooks for layer in moe_shape(m).layers)


def test_bad_counts_raise():
    m = model("mixtral")
    with pytest.raises(AllocMoeError, match="3 MoE layers"):
        with layer_topk(m, [1, 1]):
            pass
    with pytest.raises(AllocMoeError):
        with layer_topk(m, [0, 1, 1]):
            pass
    with pytest.raises(AllocMoeError):
        with alloc_t_routing(m, [3, 3, 3], k_max=2):
            pass
    with pytest.raises(AllocMoeError, match="not MoE layers"):
        with layer_topk(model("deepseek_v3"), {0: 1}):
            pass
    with pytest.raises(AllocMoeError, match="can select"):  # group limit: 1 of 2 groups of 4 experts
        with alloc_t_routing(model("deepseek_v3"), [3, 3, 3], k_max=5):
            pass


def test_dense_model_raises():
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(AllocMoeError, match="no mixture-of-experts"):
        moe_shape(AutoModelForCausalLM.from_config(config))


def test_parse_max_memory():
    assert parse_max_memory("0=20GiB, cpu=40GiB") == {0: "20GiB", "cpu": "40GiB"}
    assert parse_max_memory("2GiB")["cpu"] == "2GiB"
    with pytest.raises(AllocMoeError):
        parse_max_memory("gpu=1GiB")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch,dtype", [("mixtral", torch.float32), ("deepseek_v3", torch.bfloat16)])
def test_cuda_routing(arch, dtype):
    m = make_tiny_model(arch, seed=0).to("cuda", dtype)
    info = moe_shape(m)
    n, k = len(info.layers), info.k_orig
    x = ids(2, 9).cuda()
    ref = logits(m, x)
    with alloc_t_routing(m, [k] * n):
        assert torch.equal(logits(m, x), ref)
    with layer_topk(m, [1, 2, 1]):
        topk_single = logits(m, x[:1, :1])
    with alloc_t_routing(m, [1, 2, 1]) as counter:
        torch.testing.assert_close(logits(m, x[:1, :1]), topk_single)
        assert torch.isfinite(logits(m, x)).all()
    assert counter.per_token() == dict(zip(EXPECTED[arch][1], [1.0, 2.0, 1.0]))
