"""demo: the whole pipeline in quick mode on a tiny model with a SentencePiece vocabulary, its report
(quality with decode limits, speed on the synthetic shape with ties), reuse of the profile, the GGUF
and the synthetic file on a second run; budgets below one expert per layer left out; clean errors for
a stock runtime and a missing bundled model."""

from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path

import pytest
from rich.console import Console

from allocmoe_edge import assets
from allocmoe_edge.demo import BUDGETS, QUICK, SPEED_SHAPE, STEPS, DemoPipeline, run_demo
from allocmoe_edge.errors import AllocMoeError


def _tiny_spm_model(root: Path, experts: int = 10, top_k: int = 8) -> Path:
    """A tiny random Mixtral (3 MoE layers, top-8 of 10 by default: full budget 24, so 12.5 % is one
    expert per layer) with a 400-token SentencePiece BPE trained on the calibration text (small vocab:
    fast GGUF reads)."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    from .tiny_models import make_tiny_model

    tok_dir, hf = root / "tok", root / "hf"
    tok_dir.mkdir(parents=True)
    spm.SentencePieceTrainer.train(input=str(assets.calib_text()), model_prefix=str(tok_dir / "tokenizer"),
                                   vocab_size=400, model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, minloglevel=2)
    tok = LlamaTokenizer.from_pretrained(str(tok_dir), legacy=True, add_bos_token=True, add_eos_token=False)
    model = make_tiny_model("mixtral", vocab_size=len(tok), num_local_experts=experts, num_experts_per_tok=top_k,
                            bos_token_id=1, eos_token_id=2)
    model.save_pretrained(hf)
    tok.save_pretrained(hf)
    return hf


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def test_demo_refuses_a_stock_runtime_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr("allocmoe_edge.runtime.patch_version", lambda: None)
    with pytest.raises(AllocMoeError, match="stock build.*allocmoe build-runtime"):
        run_demo(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_demo_names_a_missing_bundled_model(tmp_path, monkeypatch):
    monkeypatch.setattr("allocmoe_edge.runtime.patch_version", lambda: 2)
    monkeypatch.setattr(assets, "ASSETS", tmp_path / "assets")
    with pytest.raises(AllocMoeError, match="bundled asset missing: .*deep-moe"):
        run_demo(tmp_path / "out")
    with pytest.raises(AllocMoeError, match="no bundled model 'huge-moe'; choose one of"):
        run_demo(tmp_path / "out", model="huge-moe")


def test_demo_leaves_out_budgets_below_one_expert_per_layer(tmp_path):
    from allocmoe_edge.profile import run_profile

    hf = _tiny_spm_model(tmp_path, experts=6, top_k=4)  # full budget 12: 12.5 % would be 1 activation
    out = tmp_path / "demo"
    out.mkdir()
    log = io.StringIO()
    run = DemoPipeline(out, QUICK, hf, None, assets.calib_text(), assets.heldout_text(), Console(file=log, width=300))
    run_profile(hf, assets.calib_text(), run.sensitivity, ctx=QUICK.ctx, max_tokens=256)
    run.allocate()
    assert run.budgets == (0.25, 0.5, 0.75)
    assert [p.name for p in run.plans] == ["plan-25.json", "plan-50.json", "plan-75.json"]
    assert all(p.is_file() for p in run.plans)
    assert "left out 12.5% (budget 0.125 allows 1 activations per token, below the minimum 3" in log.getvalue()


@pytest.mark.slow
@pytest.mark.runtime
def test_demo_end_to_end_and_reuse(tmp_path, patched_runtime):
    hf = _tiny_spm_model(tmp_path)
    out = tmp_path / "demo"

    def run(log: io.StringIO):  # quick settings with fewer calibration tokens: profiling is the slow part here
        return run_demo(out, model_dir=hf, calib=assets.calib_text(), heldout=assets.heldout_text(),
                        console=Console(file=log, width=200), settings=dataclasses.replace(QUICK, calib_tokens=256))

    first_log = io.StringIO()
    first = run(first_log)
    gguf = out / "hf-q8_0.gguf"
    synthetic = out / f"synthetic-{SPEED_SHAPE}-1l-q4_0.gguf"
    plans = [out / f"plan-{100 * b:g}.json" for b in BUDGETS]
    for path in [out / "sensitivity.json", *plans, gguf, synthetic, out / "eval.json", out / "bench.json",
                 out / "report.md", out / "frontier.png", out / "manifest.json"]:
        assert path.is_file() and path.stat().st_size > 0, path
    assert all(f"[{i + 1}/{len(STEPS)}] {step}" in first_log.getvalue() for i, step in enumerate(STEPS))
    assert {k: v["status"] for k, v in first.steps.items()} == dict.fromkeys(STEPS, "made")

    eval_result = json.loads((out / "eval.json").read_text())
    names = [r["name"] for r in eval_result["results"]]
    assert names == [r["config"] for r in first.rows]
    assert names[0] == "full" and len(names) == 1 + 2 * len(BUDGETS) + 4  # plans with Alloc-T on/off, uniform k=1,2,4,6
    budget_counts = [json.loads(p.read_text())["budget"]["count"] for p in plans]
    assert budget_counts == [3, 6, 12, 18]
    for row in first.rows:
        for key in ("ppl", "kld_mean", "kld_p99", "top1", "decode_limit"):
            assert _finite(row[key]), (row["config"], key)
        assert row["activations_per_token"] <= row["budget_count"]
        if "(plan " in row["config"]:
            assert row["budget_count"] in budget_counts
    full, top1 = first.rows[0], next(r for r in first.rows if r["config"] == "uniform k=1")
    assert full["kld_mean"] == 0 and full["kld_p99"] == 0 and full["top1"] == 1 and full["decode_limit"] == 1
    assert full["activations_per_token"] == full["budget_count"] == 24
    assert top1["decode_limit"] > 1

    # the tiny model is far too small for its speed to mean anything: speed comes from the synthetic shape,
    # with bench's uniform-split plans at the demo's budgets, 2 interleaved repetitions, ties marked
    bench_result = json.loads((out / "bench.json").read_text())
    assert bench_result["synthetic"] and bench_result["plans_source"] == "uniform-split"
    assert bench_result["model"] == str(synthetic) and bench_result["options"]["reps"] == 2
    assert sorted({round(r["budget"], 3) for r in bench_result["rows"]}) == [0.125, 0.25, 0.5, 0.75, 1.0]
    for row in bench_result["rows"][1:]:
        for test in row["tests"].values():
            assert len(test["samples"]) == 2 and test["speedup"]["tie"] in (True, False)
    report = (out / "report.md").read_text()
    assert all(table in report for table in first.table.split("\n\n")) and "frontier.png" in report
    assert "Speed is not measured on hf-q8_0.gguf" in report and "uniform-split plans" in report
    ties = sum(t["speedup"]["tie"] for r in bench_result["rows"][1:] for t in r["tests"].values())
    assert report.count("(tie)") >= ties

    mtime, synth_mtime = gguf.stat().st_mtime_ns, synthetic.stat().st_mtime_ns
    second_log = io.StringIO()
    second = run(second_log)
    manifest = json.loads((out / "manifest.json").read_text())
    steps = manifest["last_run"]["steps"]
    assert steps["profile"]["status"] == steps["convert"]["status"] == "reused"
    assert f"reused {synthetic.name}" in second_log.getvalue()
    assert second.steps == steps
    assert gguf.stat().st_mtime_ns == mtime and synthetic.stat().st_mtime_ns == synth_mtime
    assert all(entry["complete"] for entry in manifest["artefacts"].values())
