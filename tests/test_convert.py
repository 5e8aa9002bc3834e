"""HF checkpoint -> budgeted GGUF (`convert.build_budgeted_gguf`): plans checked first, llama.cpp's
converter and quantizer, plans stamped; f32 logits against transformers, q8_0 top-1 agreement."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from allocmoe_edge.convert import build_budgeted_gguf, convert_hf
from allocmoe_edge.errors import AllocMoeError
from allocmoe_edge.gguf_meta import read_info
from allocmoe_edge.hf import plan_shape
from allocmoe_edge.plan import Budget, Plan
from allocmoe_edge.runtime import LoadChoice

from .llama_logits import RTOL, llama_logits, tokens_for, torch_logits
from .tiny_models import save_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.runtime]

# per-MoE-layer counts below the original top-k, different from layer to layer
COUNTS = {"mixtral": (1, 3, 2), "qwen2_moe": (2, 1, 3), "qwen3_moe": (2, 1, 1), "olmoe": (1, 2, 1),
          "deepseek_v2": (2, 1, 3), "deepseek_v3": (3, 1, 2)}


def _plan(hf_dir, counts, tmp_path, name="plan.json", method="alloc-l") -> str:
    ident = plan_shape(hf_dir)
    plan = Plan(model=ident, budget=Budget.parse(sum(counts), ident), method=method, counts=tuple(counts),
                token_k_max=0)
    plan.save(tmp_path / name)
    return str(tmp_path / name)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(1e-6, float(np.max(np.abs(b)))))


@pytest.mark.parametrize("arch", sorted(COUNTS))
def test_convert_with_plan_matches_transformers(patched_runtime, tiny_gguf, tmp_path, arch):
    hf_dir, plain = tiny_gguf(arch)
    counts = COUNTS[arch]
    out = build_budgeted_gguf(hf_dir, [_plan(hf_dir, counts, tmp_path)], tmp_path / "b.gguf", "f32", log=lambda m: None)
    info = read_info(out)
    assert [info.plans[0].counts[i] for i in info.moe_layers] == list(counts)
    assert info.expert_used_count == read_info(plain).expert_used_count  # the standard key is untouched
    tokens = tokens_for(50000)
    got = llama_logits(out, tokens)
    ref = torch_logits(hf_dir, tokens, list(counts))
    assert _rel(got, ref) < RTOL, f"{arch}: {_rel(got, ref):.2e}"
    assert _rel(torch_logits(hf_dir, tokens), ref) > 0.05  # the plan matters, so the check above could fail
    # full budget through the stock code path (plan disabled) equals the file converted without plans
    assert np.array_equal(llama_logits(out, tokens, LoadChoice(full_budget=True)), llama_logits(plain, tokens))


def test_q8_0_top1_agreement(patched_runtime, tiny_gguf, tmp_path):
    hf_dir, _ = tiny_gguf("mixtral")
    counts = (2, 1, 2)
    out = build_budgeted_gguf(hf_dir, [_plan(hf_dir, counts, tmp_path)], tmp_path / "q.gguf", "q8_0",
                              log=lambda m: None)
    assert read_info(out).file_type == "MOSTLY_Q8_0"
    tokens = tokens_for(50000, n=64)
    agree = float(np.mean(llama_logits(out, tokens).argmax(1) == torch_logits(hf_dir, tokens, list(counts)).argmax(1)))
    # random tiny models have many near-ties at the top; q8_0 still keeps nearly every top-1 token
    assert agree >= 0.9, f"q8_0 top-1 agreement {agree:.1%}"


def test_several_plans_one_file(patched_runtime, tiny_gguf, tmp_path):
    from allocmoe_edge.runtime import choice_for_budget, layer_counts, load

    hf_dir, _ = tiny_gguf("qwen2_moe")
    plans = [_plan(hf_dir, c, tmp_path, f"p{i}.json") for i, c in enumerate([(1, 1, 1), (2, 1, 3), (2, 3, 3)])]
    out = build_budgeted_gguf(hf_dir, plans, tmp_path / "m.gguf", "f32", default=1, log=lambda m: None)
    info = read_info(out)
    assert len(info.plans) == 3 and info.allocmoe["plan_default"] == 1
    assert layer_counts(load(out)) == [2, 1, 3]
    assert layer_counts(load(out, choice_for_budget(info, 1 / 3))) == [1, 1, 1]
    assert layer_counts(load(out, choice_for_budget(info, 1.0))) == [3, 3, 3]
    listing = subprocess.run([sys.executable, "-m", "allocmoe_edge", "inspect", str(out)], capture_output=True,
                             text=True)
    assert listing.stdout.count("plan ") == 3, listing.stdout


def test_plan_for_another_model_fails_before_converting(tiny_gguf, tmp_path):
    hf_dir, _ = tiny_gguf("mixtral")
    other, _ = tiny_gguf("olmoe")
    with pytest.raises(AllocMoeError, match="different model"):
        build_budgeted_gguf(hf_dir, [_plan(other, (1, 1, 1), tmp_path)], tmp_path / "x.gguf", "f32")
    assert not (tmp_path / "x.gguf").exists()
    assert not any(p.name.startswith(".allocmoe-") for p in tmp_path.iterdir())


def test_unknown_bpe_pre_tokenizer(tmp_path):
    hf_dir = save_tiny_model("mixtral", tmp_path / "hf")  # a freshly trained BPE: its hash is unknown
    with pytest.raises(AllocMoeError, match="--pre-tokenizer"):
        convert_hf(hf_dir, tmp_path / "a.gguf", "f32")
    assert not (tmp_path / "a.gguf").exists()
    out = convert_hf(hf_dir, tmp_path / "b.gguf", "f32", pre_tokenizer="gpt-2")
    import gguf

    assert gguf.GGUFReader(out).get_field("tokenizer.ggml.pre").contents() == "gpt-2"


def test_published_calibration_names_the_file_not_its_path():
    from allocmoe_edge.convert import calibration_provenance

    stored = json.loads(calibration_provenance({"path": "/home/someone/data/calib.txt", "sha256": "ab" * 32,
                                                "n_tokens": 8192, "profile_mode": "isolated"}))
    assert stored == {"file": "calib.txt", "sha256": "ab" * 32, "n_tokens": 8192, "profile_mode": "isolated"}
    assert "/home" not in json.dumps(stored)
