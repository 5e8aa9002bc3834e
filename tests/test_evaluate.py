"""`allocmoe eval`: configurations, the chunking protocol with a fake runtime, and (with the patched
runtime) a tiny model end to end; the metrics and windows themselves are in test_quality.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from types import SimpleNamespace

import gguf
import numpy as np
import pytest

from allocmoe_edge import evaluate
from allocmoe_edge.errors import AllocMoeError
from allocmoe_edge.evaluate import evaluate_llama, gguf_configurations, uniform_k
from allocmoe_edge.gguf_meta import Keys, copy_with_metadata, plan_for_counts, read_info, stamp
from allocmoe_edge.presentation import eval_table
from allocmoe_edge.runtime import LoadChoice

from .ggufs import write_fake_moe


def test_configurations_cover_methods_and_dedupe(tmp_path):
    src = write_fake_moe(tmp_path / "m.gguf", n_layer=4, n_expert=8, k=4)
    info = read_info(src)
    plans = [plan_for_counts(info, [1, 2, 3, 2], method="alloc-l"), plan_for_counts(info, [4, 4, 2, 2])]
    stamped = stamp(src, tmp_path / "s.gguf", plans, k_min=1, k_max=4)
    configs = gguf_configurations(stamped)
    assert [c.name for c in configs] == ["full", "alloc-l+t (plan 0)", "alloc-l (plan 0)", "custom+t (plan 1)",
                                        "custom (plan 1)", "uniform k=2", "uniform k=3"]
    assert configs[0].choice() == LoadChoice(full_budget=True)
    assert configs[1].choice() == LoadChoice(plan_index=0) and configs[1].alloc_t
    assert configs[2].choice() == LoadChoice(plan_index=0, token_k_max=0) and not configs[2].alloc_t
    assert configs[-1].choice() == LoadChoice(uniform_k=3)
    only_half = gguf_configurations(stamped, [0.5, 1.0])
    assert [c.name for c in only_half] == ["full", "alloc-l+t (plan 0)", "alloc-l (plan 0)", "uniform k=2"]
    no_t = stamp(src, tmp_path / "n.gguf", plans[:1], k_max=0)
    assert [c.method for c in gguf_configurations(no_t)] == ["full", "alloc-l", "uniform"]
    assert [c.name for c in gguf_configurations(info)] == ["full", "uniform k=1", "uniform k=2", "uniform k=3"]
    assert uniform_k(4, 0.125) == 1 and uniform_k(4, 0.01) == 1 and uniform_k(3, 0.5) == 2
    with pytest.raises(AllocMoeError, match="fraction"):
        gguf_configurations(info, [1.5])


def _synthetic_copy(src, dst):
    copy_with_metadata(src, dst, {Keys.SYNTHETIC: (True, gguf.GGUFValueType.BOOL, None)}, drop=lambda k: False)
    return dst


def test_synthetic_file_refused(tmp_path):
    path = _synthetic_copy(write_fake_moe(tmp_path / "m.gguf"), tmp_path / "syn.gguf")
    text = tmp_path / "t.txt"
    text.write_text("hello " * 100)
    with pytest.raises(AllocMoeError, match="synthetic"):
        evaluate_llama(path, text)


def test_eval_table_names_llama_perplexity_statistics():
    row = {"name": "full", "budget": 1.0, "activations_per_token": 6, "ppl": 10.0, "ppl_se": 0.1, "ppl_ratio": 1.0,
           "ppl_ratio_se": 0.0, "kld_mean": 0.0, "kld_se": 0.0, "kld_median": 0.0, "kld_p99": 0.0, "top1": 1.0,
           "rms_dp": 0.0}
    other = {**row, "name": "uniform k=1", "ppl": 11.0, "ppl_ratio": 1.1, "ppl_ratio_se": 0.01, "kld_median": 0.02,
             "top1": 0.9}
    table = eval_table({"results": [row, other]})
    lines = table.splitlines()
    assert len(lines) == 4
    assert "| PPL(Q)/PPL(base) | KLD mean | KLD median | KLD p99 | RMS Δp % | same top p % |" in lines[0]
    assert "| 10.0000 ± 0.1000 | 1.0000 ± 0.0000 |" in lines[2]
    assert "| 1.1000 ± 0.0100 |" in lines[3] and "| 0.020000 |" in lines[3] and lines[3].endswith("| 90.000 |")
    del other["ppl_ratio"]  # rows without the ratio (older JSON) show PPL / base PPL
    assert "| 1.1000 |" in eval_table({"results": [row, other]}).splitlines()[3]


class FakeLlama:
    """Stands in for llama_cpp.Llama: logits depend on the tokens and, off full budget, on the choice."""

    V = 16

    def __init__(self, choice: LoadChoice, calls: list, n_ctx: int, **kw) -> None:
        assert kw["n_batch"] == kw["n_ubatch"] == n_ctx and kw["logits_all"]
        self.choice, self.calls = choice, calls
        self.scores = np.zeros((n_ctx, self.V), dtype=np.float32)
        self._model = SimpleNamespace(add_bos_token=lambda: True)

    def tokenize(self, text: bytes, add_bos: bool, special: bool) -> list[int]:
        return [1] * add_bos + [2 + b % (self.V - 2) for b in text]

    def token_bos(self) -> int:
        return 1

    def n_vocab(self) -> int:
        return self.V

    def reset(self) -> None:
        pass

    def eval(self, tokens: list[int]) -> None:
        self.calls.append((self.choice, list(tokens)))
        shift = 0.0 if self.choice.full_budget else 0.3 + (self.choice.uniform_k or 0) + (self.choice.token_k_max or 0)
        self.scores[: len(tokens)] = np.sin(np.outer(tokens, np.arange(self.V)) * 0.7 + shift)

    def close(self) -> None:
        pass


def test_evaluate_llama_protocol_with_fake_runtime(tmp_path, monkeypatch):
    from allocmoe_edge import runtime

    src = write_fake_moe(tmp_path / "m.gguf", n_layer=3, n_expert=4, k=2)
    path = stamp(src, tmp_path / "s.gguf", [plan_for_counts(read_info(src), [1, 2, 1], method="alloc-l")],
                 k_max=2).path
    calls: list = []
    placements: list = []

    def fake_load(path, choice, cpu_moe, n_cpu_moe, **kw):
        placements.append((cpu_moe, n_cpu_moe))
        return FakeLlama(choice, calls, **kw)

    monkeypatch.setattr(runtime, "load", fake_load)
    monkeypatch.setattr(evaluate, "scored_half_logits",
                        lambda llm, tokens, first: llm.eval(tokens) or llm.scores[first:])
    monkeypatch.setattr(runtime, "layer_counts", lambda llm: [2, 2, 2] if llm.choice.plan_index is None else [1, 2, 1])
    monkeypatch.setattr(runtime, "doctor", lambda: {"patched": True})
    text = tmp_path / "t.txt"
    text.write_text("abcdefghij" * 5)  # 50 bytes -> 51 tokens with BOS: 3 chunks of 16
    result = evaluate_llama(path, text, ctx=16, budgets=[0.67], n_cpu_moe=2)
    assert placements == [(False, 2)] * 4 and result["runtime"]["n_cpu_moe"] == 2
    assert [r["name"] for r in result["results"]] == ["full", "alloc-l+t (plan 0)", "alloc-l (plan 0)", "uniform k=1"]
    assert len(calls) == 4 * 3 and all(len(tokens) == 16 and tokens[0] == 1 for _, tokens in calls)
    assert [tokens[1] for _, tokens in calls[:3]] == [2 + ord(c) % 14 for c in "agc"]  # text[0], text[16], text[32]
    full, plan = result["results"][0], result["results"][2]
    assert (full["kld_mean"], full["kld_p99"], full["top1"], full["rms_dp"]) == (0.0, 0.0, 1.0, 0.0)
    assert full["budget"] == 1.0 and plan["budget"] == pytest.approx(4 / 6) and plan["counts"] == [1, 2, 1]
    assert plan["kld_mean"] > 0 and plan["n_tokens"] == 3 * 7
    assert result["text"]["n_tokens"] == 51 and result["chunks"] == 3 and result["scored_per_chunk"] == 7
    json.dumps(result)
    with pytest.raises(AllocMoeError, match="needs at least 64"):
        evaluate_llama(path, text, ctx=64)


# ---------------------------------------------------------------- with the patched runtime

CTX = 32


@pytest.fixture(scope="module")
def eval_model(tiny_gguf, tmp_path_factory):
    """The tiny Mixtral with two plans (Alloc-T on) and a text of 3 chunks."""
    _, path = tiny_gguf("mixtral")
    info = read_info(path)
    root = tmp_path_factory.mktemp("eval")
    stamped = root / "plans.gguf"
    stamp(path, stamped, [plan_for_counts(info, [1, 2, 1], method="alloc-l"), plan_for_counts(info, [2, 2, 2])],
          k_min=1, k_max=info.expert_used_count)
    text = root / "text.txt"
    words = np.random.default_rng(0).choice(["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran"], 400)
    text.write_text(" ".join(words))
    return stamped, text


@pytest.mark.slow
@pytest.mark.runtime
def test_evaluate_llama_rows(patched_runtime, eval_model):
    path, text = eval_model
    result = evaluate_llama(path, text, ctx=CTX, chunks=3, n_threads=2)
    rows = {r["name"]: r for r in result["results"]}
    full = result["results"][0]
    assert full["name"] == "full" and full["kld_mean"] == 0.0 and full["kld_p99"] == 0.0 and full["top1"] == 1.0
    assert full["rms_dp"] == 0.0 and full["activations_per_token"] == 9 and full["budget"] == 1.0
    assert set(rows) >= {"alloc-l+t (plan 0)", "alloc-l (plan 0)", "custom+t (plan 1)", "custom (plan 1)"}
    plan = rows["alloc-l (plan 0)"]
    assert plan["kld_mean"] > 0 and plan["activations_per_token"] == 4 and plan["counts"] == [1, 2, 1]
    assert all(math.isfinite(r["ppl"]) and r["ppl_se"] > 0 and r["n_tokens"] == 3 * (CTX // 2 - 1)
               for r in result["results"])
    # a uniform plan [2, 2, 2] equals the stock override k=2 (uniform k=2 is among the configurations)
    assert rows["custom (plan 1)"]["ppl"] == rows["uniform k=2"]["ppl"]
    assert result["chunks"] == 3 and result["ctx"] == CTX and result["text"]["n_tokens"] >= 3 * CTX
    assert result["runtime"]["patched"] is True


@pytest.mark.slow
@pytest.mark.runtime
def test_eval_cli_json_and_errors(patched_runtime, eval_model, tmp_path):
    path, text = eval_model
    def run(*a):
        return subprocess.run([sys.executable, "-m", "allocmoe_edge", "eval", *map(str, a)],
                              capture_output=True, text=True, timeout=600)

    out = run(path, "--text", text, "--ctx", CTX, "--chunks", 2, "--budgets", "0.67", "-t", 2,
              "--json", tmp_path / "q.json")
    assert out.returncode == 0, out.stderr
    assert "| config |" in out.stdout and "| full |" in out.stdout
    doc = json.loads((tmp_path / "q.json").read_text())
    assert set(doc) >= {"model", "text", "ctx", "chunks", "results", "runtime"}
    assert set(doc["text"]) >= {"path", "sha256", "n_tokens"}
    assert [r["name"] for r in doc["results"]] == ["full", "custom+t (plan 1)", "custom (plan 1)", "uniform k=2"]
    assert set(doc["results"][0]) >= {"name", "method", "budget", "alloc_t", "activations_per_token", "ppl",
                                      "ppl_se", "kld_mean", "kld_se", "kld_p99", "top1", "rms_dp"}
    short = tmp_path / "short.txt"
    short.write_text("the cat sat")
    out = run(path, "--text", short, "--ctx", CTX)
    assert out.returncode == 2 and f"needs at least {CTX}" in out.stderr and "Traceback" not in out.stderr
    out = run(_synthetic_copy(path, tmp_path / "syn.gguf"), "--text", text, "--ctx", CTX)
    assert out.returncode == 2 and "synthetic" in out.stderr


# ---------------------------------------------------------------- torch backend

@pytest.mark.slow
def test_evaluate_torch_plans_rows(tmp_path):
    pytest.importorskip("torch")
    from allocmoe_edge.hf import plan_shape
    from allocmoe_edge.plan import Budget, Plan
    from allocmoe_edge.torch_eval import evaluate_torch_plans

    from .tiny_models import make_tiny_model, save_tiny_model

    model_dir = save_tiny_model("mixtral", tmp_path / "hf", seed=0)
    ident = plan_shape(make_tiny_model("mixtral", seed=0))
    counts = [1] + [ident.k_orig] * (len(ident.moe_layers) - 1)
    plan = Plan(model=ident, budget=Budget.parse(sum(counts), ident), method="alloc-l", counts=tuple(counts))
    plan.save(tmp_path / "plan.json")
    text = tmp_path / "t.txt"
    text.write_text(" ".join(["the cat sat on a mat"] * 40))
    result = evaluate_torch_plans(model_dir, text, [tmp_path / "plan.json"], ctx=16, chunks=2)
    json.dumps(result)
    names = [r["name"] for r in result["results"]]
    assert names[:3] == ["full", "alloc-l+t (plan 0)", "alloc-l (plan 0)"] and names[3].startswith("uniform k=")
    full, plan_row = result["results"][0], result["results"][2]
    assert full["kld_mean"] == 0.0 and full["top1"] == 1.0 and full["activations_per_token"] == ident.full_budget
    assert plan_row["activations_per_token"] == sum(counts) and plan_row["kld_mean"] > 0
    # the llama.cpp backend's row, from the same metric code: standard errors and Δp included
    assert plan_row["ppl_se"] > 0 and plan_row["rms_dp"] > 0 and plan_row["n_tokens"] == 2 * 7
    assert full["kld_se"] == full["rms_dp"] == 0.0
    assert result["chunks"] == 2 and "| full |" in eval_table(result)
