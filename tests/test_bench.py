"""bench: uniform-split stamping, the decode limit against a hand computation, the frontier plot,
and (patched runtime) a tiny benchmark run whose JSON has every row and finite numbers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from allocmoe_edge.bench import WeightTraffic, configurations, plot_frontier, stamp_uniform_split
from allocmoe_edge.cli import cli
from allocmoe_edge.gguf_meta import read_info
from allocmoe_edge.synth import is_synthetic, synthesize

from .ggufs import write_fake_moe

GPU_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_gpu.sh"


@pytest.fixture(scope="module")
def olmoe_1layer(tmp_path_factory):
    """OLMoE shape with one block in q4_0 (0.35 GB)."""
    return synthesize("olmoe-1b-7b", "q4_0", tmp_path_factory.mktemp("bench") / "olmoe1.gguf", n_layer=1)


def test_uniform_split_plans(tmp_path):
    src = write_fake_moe(tmp_path / "f.gguf", n_layer=4, n_expert=8, k=4)  # full budget 16
    info = stamp_uniform_split(src, tmp_path / "s.gguf", (1.0, 0.75, 0.6, 0.3))
    assert [p.counts for p in info.plans] == [(3, 3, 3, 3), (3, 2, 2, 2), (1, 1, 1, 1)]
    assert [p.method for p in info.plans] == ["uniform-split"] * 3
    assert info.allocmoe["token_k_max"] == 4
    names = [c.name for c in configurations(info, None)]
    assert names[0] == "full" and "uniform-split+t (plan 1)" in names and "uniform-split (plan 2)" in names
    assert "uniform k=3" in names and "uniform k=1" in names
    # with budgets, plans are matched as `allocmoe eval` matches them (within 0.02)
    assert [c.name for c in configurations(info, (0.75,))] == [
        "full", "uniform-split+t (plan 0)", "uniform-split (plan 0)", "uniform k=3"]


def test_stamped_copy_stays_synthetic(tmp_path, olmoe_1layer):
    info = stamp_uniform_split(olmoe_1layer, tmp_path / "s.gguf", (0.5,))
    assert info.plans[0].counts == (4,) and info.allocmoe["synthetic"] is True and is_synthetic(info)


def test_decode_limit_matches_hand_computation(olmoe_1layer):
    info = read_info(olmoe_1layer)
    q4 = 18 / 32  # bytes per weight of q4_0
    e, ff, vocab = 2048, 1024, 50304
    # one row of token_embd, output, output_norm; attn_norm, q/k/v/o, q/k norms, ffn_norm, router (f32)
    fixed = e * q4 + vocab * e * q4 + 4 * e + 4 * e + 4 * e * e * q4 + 2 * 4 * e + 4 * e + 4 * e * 64
    expert = 3 * e * ff * q4
    traffic = WeightTraffic.of(olmoe_1layer, info)
    assert traffic.fixed == fixed and traffic.per_expert == {0: expert}
    assert traffic.per_token((8,)) / traffic.per_token((2,)) == pytest.approx((fixed + 8 * expert) / (fixed + 2 * expert))


def test_plot_tolerates_missing_rows(tmp_path):
    bench = {"model": "m.gguf", "rows": [
        {"method": "full", "alloc_t": False, "budget": 1.0, "speedup_tg": 1.0, "speedup_pp": 1.0},
        {"method": "alloc-l+t", "alloc_t": True, "budget": 0.5, "speedup_tg": 1.6, "speedup_pp": 1.3},
        {"method": "uniform", "alloc_t": False, "budget": 0.5, "speedup_tg": 1.7, "speedup_pp": 1.4}]}
    evals = {"results": [
        {"name": "full", "method": "full", "budget": 1.0, "alloc_t": False, "kld_mean": 0.0},
        {"name": "a", "method": "alloc-l+t", "budget": 0.5, "alloc_t": True, "kld_mean": 0.05},
        {"name": "u", "method": "uniform", "budget": 0.5, "alloc_t": False, "kld_mean": 0.2},
        {"name": "x", "method": "alloc-l", "budget": 0.25, "alloc_t": False, "kld_mean": 0.4}]}
    out = tmp_path / "frontier.png"
    assert plot_frontier(evals, bench, out) == (3, 4)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_frontier({"results": []}, bench, out, speed="pp") == (0, 0)


@pytest.mark.runtime
def test_tiny_bench_has_all_rows(patched_runtime, olmoe_1layer, tmp_path):
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(cli, ["bench", str(olmoe_1layer), "--budgets", "1,0.5", "--reps", "2", "-p", "16",
                                   "-n", "4", "-t", "2", "--json", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert result["plans_source"] == "uniform-split" and result["synthetic"] is True
    assert result["backend"] == "CPU" and result["patch_hash"] and result["allocmoe_patch_version"] >= 1
    assert [r["name"] for r in result["rows"]] == [
        "full", "uniform-split+t (plan 0)", "uniform-split (plan 0)", "uniform k=4"]
    for row in result["rows"]:
        for key in ("pp", "tg"):
            assert len(row[key]["samples"]) == 2 and all(math.isfinite(x) and x > 0 for x in row[key]["samples"])
        assert math.isfinite(row["speedup_pp"]) and math.isfinite(row["speedup_tg"])
    # one block: the output matrix dominates, so halving the experts saves ~15 % of the bytes
    assert result["rows"][0]["decode_limit"] == 1.0 and 1.1 < result["rows"][-1]["decode_limit"] < 1.3
    assert "| olmoe1.gguf | 0.50 (4) | uniform |" in res.output


def test_gpu_script_parses():
    assert subprocess.run(["bash", "-n", str(GPU_SCRIPT)]).returncode == 0


@pytest.mark.slow
def test_gpu_script_synth_step_on_cpu(tmp_path):
    env = {**os.environ, "STEPS": "synth", "LAYERS": "2", "PYTHON": sys.executable, "WORK": str(tmp_path / "work")}
    out = subprocess.run(["bash", str(GPU_SCRIPT), str(tmp_path / "out")], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    info = read_info(tmp_path / "work" / "dsv2lite-synth-q4_0-2l.uniform-split.gguf")
    assert info.architecture == "deepseek2" and [p.budget_count for p in info.plans] == [4, 3, 1]  # of 6


@pytest.mark.runtime
def test_failing_configuration_is_one_failed_row(patched_runtime, olmoe_1layer, tmp_path):
    """A configuration whose load fails in the child process gives an error row; the parent goes on."""
    from allocmoe_edge.bench import BenchOptions
    from allocmoe_edge.bench_worker import measure_isolated
    from allocmoe_edge.runtime import LoadChoice

    opts = BenchOptions(budgets=(1.0,), reps=1, n_prompt=8, n_gen=2, threads=2)
    info = read_info(olmoe_1layer)
    bad = measure_isolated(olmoe_1layer, LoadChoice(plan_index=7), opts, info, tmp_path)
    assert bad["pp"] is None and bad["tg"] is None
    assert bad["error"].startswith("exit status 1") and "plan" in bad["error"]
    good = measure_isolated(olmoe_1layer, LoadChoice(full_budget=True), opts, info, tmp_path)
    assert good["error"] is None and good["pp"]["mean"] > 0 and good["tg"]["mean"] > 0


def test_killed_child_is_reported(tmp_path, monkeypatch):
    """A child that dies by a signal (as llama.cpp's abort does) is described by the signal's name."""
    import signal as sig

    from allocmoe_edge import bench_worker
    from allocmoe_edge.bench import BenchOptions
    from allocmoe_edge.runtime import LoadChoice

    script = tmp_path / "fake_python"
    script.write_text("#!/bin/sh\necho 'ggml_abort: GGML_ASSERT(x) failed' >&2\nkill -ABRT $$\n")
    script.chmod(0o755)
    monkeypatch.setattr(bench_worker.sys, "executable", str(script))
    row = bench_worker.measure_isolated(tmp_path / "m.gguf", LoadChoice(full_budget=True), BenchOptions(), None,
                                        tmp_path)
    assert row["error"] == f"killed by {sig.SIGABRT.name}; ggml_abort: GGML_ASSERT(x) failed"
    assert row["pp"] is None and "ggml_abort: GGML_ASSERT(x) failed" in row["log"]


def test_scratch_dir_removes_stale_copies(tmp_path):
    from allocmoe_edge.fsutil import scratch_dir

    stale = tmp_path / ".bench-old"
    stale.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (stale / "owner.pid").write_text(str(dead.pid))
    live = tmp_path / ".bench-live"
    live.mkdir()
    (live / "owner.pid").write_text(str(os.getpid()))
    with scratch_dir(tmp_path, ".bench-") as scratch:
        assert scratch.is_dir() and not stale.exists() and live.exists()
        (scratch / "copy.gguf").write_bytes(b"x")
    assert not scratch.exists()
