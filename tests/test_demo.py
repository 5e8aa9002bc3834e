"""demo: the whole pipeline in quick mode on a tiny model with a SentencePiece vocabulary (as the
bundled model has), its report, reuse of the profile and the GGUF on a second run; clean errors for a
stock runtime and a missing bundled model."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
from rich.console import Console

from allocmoe_edge import assets
from allocmoe_edge.demo import BUDGETS, STEPS, run_demo
from allocmoe_edge.errors import AllocMoeError


def _tiny_spm_model(root: Path) -> Path:
    """A tiny random Mixtral (3 MoE layers, top-4 of 6: full budget 12, so 25 % is one expert per layer)
    with a 400-token SentencePiece BPE trained on the calibration text (small vocab: fast GGUF reads)."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    from .tiny_models import make_tiny_model

    tok_dir, hf = root / "tok", root / "hf"
    tok_dir.mkdir(parents=True)
    spm.SentencePieceTrainer.train(input=str(assets.calib_text()), model_prefix=str(tok_dir / "tokenizer"),
                                   vocab_size=400, model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, minloglevel=2)
    tok = LlamaTokenizer.from_pretrained(str(tok_dir), legacy=True, add_bos_token=True, add_eos_token=False)
    model = make_tiny_model("mixtral", vocab_size=len(tok), num_experts_per_tok=4, bos_token_id=1, eos_token_id=2)
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
    with pytest.raises(AllocMoeError, match="bundled asset missing: .*tiny-moe"):
        run_demo(tmp_path / "out")


@pytest.mark.slow
@pytest.mark.runtime
def test_demo_end_to_end_and_reuse(tmp_path, patched_runtime):
    hf = _tiny_spm_model(tmp_path)
    out = tmp_path / "demo"

    def run(log: io.StringIO):
        return run_demo(out, quick=True, model_dir=hf, calib=assets.calib_text(), heldout=assets.heldout_text(),
                        console=Console(file=log, width=200))

    first_log = io.StringIO()
    first = run(first_log)
    gguf = out / "hf-q8_0.gguf"
    plans = [out / f"plan-{round(100 * b)}.json" for b in BUDGETS]
    for path in [out / "sensitivity.json", *plans, gguf, out / "eval.json", out / "bench.json", out / "report.md",
                 out / "frontier.png", out / "manifest.json"]:
        assert path.is_file() and path.stat().st_size > 0, path
    assert all(f"[{i + 1}/{len(STEPS)}] {step}" in first_log.getvalue() for i, step in enumerate(STEPS))
    assert {k: v["status"] for k, v in first.steps.items()} == dict.fromkeys(STEPS, "made")

    eval_result = json.loads((out / "eval.json").read_text())
    bench_result = json.loads((out / "bench.json").read_text())
    assert {"results", "chunks", "ctx", "model", "runtime"} <= set(eval_result)
    assert {"rows", "options", "backend", "bytes_per_token_full"} <= set(bench_result)
    names = [r["name"] for r in eval_result["results"]]
    assert names == [r["name"] for r in bench_result["rows"]] == [r["config"] for r in first.rows]
    assert names[0] == "full" and len(names) == 1 + 2 * len(BUDGETS) + 3  # plans with Alloc-T on/off, uniform k=1..3

    budget_counts = [json.loads(p.read_text())["budget"]["count"] for p in plans]
    assert budget_counts == [3, 6, 9]
    for row in first.rows:
        for key in ("ppl", "kld_mean", "kld_p99", "top1", "pp_ts", "tg_ts", "speedup_pp", "speedup_tg",
                    "decode_limit"):
            assert _finite(row[key]), (row["config"], key)
        assert row["activations_per_token"] <= row["budget_count"]
        if "(plan " in row["config"]:
            assert row["budget_count"] in budget_counts
    full = first.rows[0]
    assert full["kld_mean"] == 0 and full["kld_p99"] == 0 and full["top1"] == 1
    assert full["activations_per_token"] == full["budget_count"] == 12
    report = (out / "report.md").read_text()
    assert first.table in report and "frontier.png" in report

    mtime = gguf.stat().st_mtime_ns
    second = run(io.StringIO())
    manifest = json.loads((out / "manifest.json").read_text())
    steps = manifest["last_run"]["steps"]
    assert steps["profile"]["status"] == steps["convert"]["status"] == "reused"
    assert second.steps == steps
    assert gguf.stat().st_mtime_ns == mtime
    assert all(entry["complete"] for entry in manifest["artefacts"].values())
