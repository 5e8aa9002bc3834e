"""Sensitivity profiling, torch evaluation and plan refinement on tiny random models."""

import json
import math
from functools import cache
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from allocmoe_edge.cli import cli
from allocmoe_edge.errors import AllocMoeError
from allocmoe_edge.hf import alloc_t_routing, layer_topk, load_model, moe_shape, plan_shape
from allocmoe_edge.plan import Budget, Plan
from allocmoe_edge.profile import planned_forwards, profile_layers, run_profile
from allocmoe_edge.refine import refine_plan
from allocmoe_edge.torch_eval import Quality, evaluate_torch

from .tiny_models import make_tiny_model, save_tiny_model

WORDS = "the quick brown fox jumps over a lazy dog while experts route every token under a budget".split()


@cache
def model(arch: str) -> torch.nn.Module:
    return make_tiny_model(arch, seed=0)


def windows(n: int = 2, ctx: int = 16) -> torch.Tensor:
    return torch.randint(0, 320, (n, ctx), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, Path]:
    """A saved tiny DeepSeek-V3 (sigmoid, groups, dense first layer) and a calibration text."""
    root = tmp_path_factory.mktemp("profile")
    calib = root / "calib.txt"
    calib.write_text(" ".join(WORDS[(i * 7) % len(WORDS)] for i in range(300)), encoding="utf-8")
    return save_tiny_model("deepseek_v3", root / "model", seed=0), calib


def _check_cached_path(m: torch.nn.Module, w: torch.Tensor, mode: str) -> None:
    """profile_layers (cached block inputs) gives the numbers of full forwards with the same counts."""
    info = moe_shape(m)
    full, layers, cost, routing = profile_layers(m, w, mode)
    blocks = [layer.index for layer in info.layers]
    assert [e["layer"] for e in layers] == blocks
    # routing statistics of the full-budget pass: every token's top-2k scores, best first, per block
    assert [r.layer for r in routing] == blocks
    assert all(r.n_tokens == w.numel() and r.ranks == min(2 * info.k_orig, info.n_expert) for r in routing)
    assert all(r.quantiles[0][q] >= r.quantiles[-1][q] for r in routing for q in (0, 128, 256))  # rank 1 >= rank 2k
    assert cost["layer_forwards"] == planned_forwards(info.n_layer, blocks, info.k_orig, len(w), mode)
    with torch.no_grad():
        w = w.to(m.device)
        reference = [m(x[None], use_cache=False).logits[0, :-1] for x in w]
        base = Quality()
        for x, ref in zip(w, reference):
            base.add(ref, x[1:])
        assert full["ppl"] == pytest.approx(base.result()["ppl"], rel=1e-6)
        for entry in layers:
            b = entry["layer"]
            for k in range(1, info.k_orig + 1):
                deeper = {d: 1 for d in blocks if d > b} if mode == "deeper-top1" else {}
                q = Quality()
                with layer_topk(m, {**deeper, b: k}):
                    for x, ref in zip(w, reference):
                        q.add(m(x[None], use_cache=False).logits[0, :-1], x[1:], ref)
                got = q.result()
                assert entry["ppl"][k - 1] == pytest.approx(got["ppl"], rel=1e-5), (b, k)
                assert entry["kld"][k - 1] == pytest.approx(got["kld"], rel=1e-4, abs=1e-9), (b, k)
    if mode == "isolated":
        assert all(e["kld"][-1] == 0.0 for e in layers)


@pytest.mark.parametrize("arch,mode", [("mixtral", "isolated"), ("deepseek_v2", "deeper-top1"),
                                       ("qwen2_moe", "isolated")])
def test_cached_path_matches_full_forwards(arch, mode):
    _check_cached_path(model(arch), windows(), mode)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cached_path_on_cuda():
    _check_cached_path(make_tiny_model("deepseek_v3", seed=0).cuda(), windows(), "isolated")


def test_profile_writes_resumes_and_reports_cost(saved, tmp_path):
    model_dir, calib = saved
    out = tmp_path / "sens.json"
    fresh = run_profile(model_dir, calib, tmp_path / "fresh.json", ctx=32, max_tokens=128)
    assert fresh["complete"] and fresh["format"] == "allocmoe-sensitivity" and fresh["version"] == 2
    assert [r["layer"] for r in fresh["routing"]["layers"]] == [e["layer"] for e in fresh["layers"]]
    assert set(fresh) >= {"model", "calibration", "mode", "full", "layers", "cost"}
    assert fresh["calibration"]["n_tokens"] == 128 and fresh["calibration"]["ctx"] == 32
    assert [len(e["ppl"]) for e in fresh["layers"]] == [3, 3, 3]
    # per window of the 4: one full pass (4 blocks), then k=1..2 (k=3 is the full model) re-runs
    # blocks b..3 for MoE blocks b = 1, 2, 3
    full_pass, block1 = 4, 2 * 3
    assert fresh["cost"]["layer_forwards"] == 4 * (full_pass + 2 * (3 + 2 + 1))
    assert fresh["cost"]["seconds"] > 0

    seen = []

    def interrupt_after_first_layer(n: int) -> None:
        seen.append(n)
        if sum(seen) > 4 * (full_pass + block1):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_profile(model_dir, calib, out, ctx=32, max_tokens=128, on_progress=interrupt_after_first_layer)
    partial = json.loads(out.read_text())
    assert partial["complete"] is False and [e["layer"] for e in partial["layers"]] == [1]

    remaining = []
    resumed = run_profile(model_dir, calib, out, ctx=32, max_tokens=128, on_start=remaining.append)
    assert remaining == [4 * (full_pass + 2 * (2 + 1))]
    assert resumed["complete"] and resumed["layers"] == fresh["layers"] and resumed["full"] == fresh["full"]
    assert resumed["cost"]["layer_forwards"] > fresh["cost"]["layer_forwards"]  # the interrupted work counts

    partial["complete"] = False
    partial["mode"] = "deeper-top1"
    out.write_text(json.dumps(partial))
    with pytest.raises(AllocMoeError, match="partial profile of another"):
        run_profile(model_dir, calib, out, ctx=32, max_tokens=128)


def test_memory_capped_loading_offloads_to_disk(saved, tmp_path):
    model_dir, _ = saved
    plain, _ = load_model(model_dir)
    capped, _ = load_model(model_dir, max_memory="cpu=700KB", offload_folder=tmp_path / "offload")
    assert set(capped.hf_device_map.values()) == {"cpu", "disk"}  # the ~1.1 MB model is split
    assert any((tmp_path / "offload").iterdir())
    w = windows(1, 12)
    assert profile_layers(capped, w)[:2] == profile_layers(plain, w)[:2]
    with torch.no_grad():
        with alloc_t_routing(plain, [2, 1, 2]):
            expected = plain(w).logits
        with alloc_t_routing(capped, [2, 1, 2]) as counter:
            assert torch.equal(capped(w).logits, expected)
    assert counter.total_per_token() == 5


def test_evaluate_torch(saved):
    model_dir, calib = saved
    k = 3
    plans = {"full": ([k] * 3, False), "uniform-2": ([2] * 3, False), "mixed-t": ([2, 1, 2], True)}
    result = evaluate_torch(model_dir, calib, plans, ctx=32, max_tokens=96)
    json.dumps(result)
    assert result["backend"] == "torch" and result["text"]["n_tokens"] == 96
    assert result["model"] == plan_shape(model("deepseek_v3")).to_dict()
    full = result["plans"]["full"]
    assert full["kld"] == 0.0 and full["top1"] == 1.0 and full["ppl"] == pytest.approx(result["full"]["ppl"])
    for name, (counts, _) in plans.items():
        r = result["plans"][name]
        assert r["activations_per_token"] == sum(counts)
        assert r["kld_p99"] >= 0 and 0 <= r["top1"] <= 1 and math.isfinite(r["ppl"])
    assert result["plans"]["uniform-2"]["kld"] > 0


def _plan(counts, alloc_t=False) -> Plan:
    ident = plan_shape(model("deepseek_v3"))
    budget = Budget.parse(sum(counts), ident)
    return Plan(model=ident, budget=budget, method="alloc-l", counts=tuple(counts), token_k_max=None if alloc_t else 0,
                predicted={"kld": 0.01, "ppl": 330.0})


@pytest.mark.parametrize("alloc_t", [False, True])
def test_refine_keeps_budget_and_never_gets_worse(alloc_t):
    m = model("deepseek_v3")
    plan = _plan([1, 3, 1], alloc_t=alloc_t)
    steps = []
    refined = refine_plan(m, windows(2, 16), plan, steps=4, on_step=lambda c, v, ok: steps.append((c, v, ok)))
    meas = refined.measured
    assert refined.method == "refined" and sum(refined.counts) == sum(plan.counts)
    assert refined.alloc_t == alloc_t and refined.budget == plan.budget
    assert len(steps) == 4 and meas["evaluations"] == 5
    assert meas["kld"] <= meas["initial"]["measured"]["kld"]
    assert meas["initial"]["predicted"] == plan.predicted and meas["initial"]["counts"] == [1, 3, 1]
    assert len(meas["moves"]) == sum(ok for _, _, ok in steps)
    for counts, _, _ in steps:
        assert sum(counts) == 5 and all(1 <= c <= 3 for c in counts)
    if meas["moves"]:
        assert refined.predicted is None and list(refined.counts) != [1, 3, 1]


def test_cli_profile_then_refine(saved, tmp_path):
    model_dir, calib = saved
    sens = tmp_path / "sens.json"
    runner = CliRunner()
    r = runner.invoke(cli, ["profile", str(model_dir), "--calib", str(calib), "-o", str(sens), "--ctx", "32",
                            "--max-tokens", "64", "--mode", "deeper-top1"])
    assert r.exit_code == 0, r.output
    assert json.loads(sens.read_text())["mode"] == "deeper-top1"
    plan_file, refined_file = tmp_path / "plan.json", tmp_path / "refined.json"
    _plan([2, 2, 1]).save(plan_file)
    r = runner.invoke(cli, ["refine", str(model_dir), "--plan", str(plan_file), "--calib", str(calib),
                            "-o", str(refined_file), "--ctx", "32", "--max-tokens", "64", "--steps", "2"])
    assert r.exit_code == 0, r.output
    assert "pred KLD" in r.output and "refined" in r.output
    refined = Plan.load(refined_file)
    assert refined.method == "refined" and refined.measured["text"]["n_tokens"] == 64
