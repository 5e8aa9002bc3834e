"""bench: uniform-split stamping, decode limits (all weights and CPU-resident experts) against hand
computations, the statistics (ties, percentiles), the interleaved child protocol with fake children
(order, crash, timeout, reloads), the command line, the frontier plot, and (patched runtime) real
benchmark runs whose JSON has every row and field."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from allocmoe_edge import hwinfo
from allocmoe_edge.allocate import stamp_uniform_split
from allocmoe_edge.bench import (
    BenchOptions,
    WeightTraffic,
    add_speedups,
    configurations,
    decode_limits,
    measurements,
    placement,
)
from allocmoe_edge.bench_worker import Worker, interleave
from allocmoe_edge.benchstats import BASELINE, format_speedup, percentiles, speedup, summary
from allocmoe_edge.cli import cli, main
from allocmoe_edge.errors import AllocMoeError
from allocmoe_edge.gguf_meta import read_info
from allocmoe_edge.presentation import bench_tables, plot_frontier
from allocmoe_edge.synth import is_synthetic, synthesize

from .ggufs import write_fake_moe


@pytest.fixture(scope="module")
def olmoe_2layer(tmp_path_factory):
    """OLMoE shape with two blocks in q4_0 (0.6 GB)."""
    return synthesize("olmoe-1b-7b", "q4_0", tmp_path_factory.mktemp("bench") / "olmoe2.gguf", n_layer=2)


# ---------------------------------------------------------------- plans and limits

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
    # --fixed-thresholds: each Alloc-T row's twin runs the decode rule without its budget controller
    fixed = configurations(info, (0.75,), fixed_thresholds=True)
    assert [c.name for c in fixed] == ["full", "uniform-split+t (plan 0)", "uniform-split+t (plan 0) fixed",
                                       "uniform-split (plan 0)", "uniform k=3"]
    assert fixed[1].choice().decode_control is None and fixed[2].choice().decode_control is False
    assert fixed[2].choice().kv_overrides(info)["allocmoe.decode_control"] is False


def test_stamped_copy_stays_synthetic(tmp_path, olmoe_2layer):
    info = stamp_uniform_split(olmoe_2layer, tmp_path / "s.gguf", (0.5,))
    assert info.plans[0].counts == (4, 4) and info.allocmoe["synthetic"] is True and is_synthetic(info)


def test_decode_limit_matches_hand_computation(olmoe_2layer):
    info = read_info(olmoe_2layer)
    q4 = 18 / 32  # bytes per weight of q4_0
    e, ff, vocab = 2048, 1024, 50304
    # one row of token_embd, output, output_norm; per block attn_norm, q/k/v/o, q/k norms, ffn_norm, router (f32)
    fixed = e * q4 + vocab * e * q4 + 4 * e + 2 * (4 * e + 4 * e * e * q4 + 2 * 4 * e + 4 * e + 4 * e * 64)
    expert = 3 * e * ff * q4
    traffic = WeightTraffic.of(olmoe_2layer, info)
    assert traffic.fixed == fixed and traffic.per_expert == {0: expert, 1: expert}
    limits = decode_limits(traffic, (8, 8), (2, 4), cpu_blocks=[])
    assert limits["bytes_per_token"] == fixed + 6 * expert
    assert limits["decode_limit"] == pytest.approx((fixed + 16 * expert) / (fixed + 6 * expert))
    assert limits["decode_limit_cpu_experts"] is None and limits["cpu_expert_bytes_per_token"] is None


def _experts_gguf(path: Path, n_layer: int = 3, n_expert: int = 4, k: int = 2) -> Path:
    """A qwen2moe-shaped GGUF of f32 tensors with known sizes: per block a router of 4 x 8 floats
    (128 bytes) and gate/up/down expert tensors of 4 x 16 x 8 floats (512 bytes per expert each)."""
    w = gguf.GGUFWriter(path, "qwen2moe")
    w.add_block_count(n_layer)
    w.add_expert_count(n_expert)
    w.add_expert_used_count(k)
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.ffn_gate_inp.weight", np.zeros((n_expert, 8), dtype=np.float32))
        for part in ("gate", "up", "down"):
            w.add_tensor(f"blk.{i}.ffn_{part}_exps.weight", np.zeros((n_expert, 16, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_hybrid_decode_limit_counts_cpu_resident_experts(tmp_path):
    path = _experts_gguf(tmp_path / "experts.gguf")
    info = read_info(path)
    traffic = WeightTraffic.of(path, info)
    assert traffic.fixed == 3 * 128 and traffic.per_expert == {0: 1536, 1: 1536, 2: 1536}

    hybrid = placement(info, traffic, BenchOptions(n_gpu_layers=99, n_cpu_moe=2))
    assert hybrid["cpu_expert_blocks"] == [0, 1] and hybrid["cpu_expert_bytes"] == 2 * 4 * 1536
    assert hybrid["limit"] == "decode_limit_cpu_experts" and hybrid["n_gpu_layers"] == 99
    limits = decode_limits(traffic, (2, 2, 2), (1, 2, 1), hybrid["cpu_expert_blocks"])
    assert limits["cpu_expert_bytes_per_token"] == 3 * 1536  # blocks 0 and 1 only: k = 1 + 2
    assert limits["decode_limit_cpu_experts"] == pytest.approx(4 / 3)
    assert limits["decode_limit"] == pytest.approx((384 + 6 * 1536) / (384 + 4 * 1536))

    everything = placement(info, traffic, BenchOptions(n_gpu_layers=99, cpu_moe=True))
    assert everything["cpu_expert_blocks"] == [0, 1, 2] and everything["cpu_expert_bytes"] == 3 * 4 * 1536
    # without GPU layers everything is in system memory: the all-weights limit applies
    assert placement(info, traffic, BenchOptions(n_cpu_moe=2))["limit"] == "decode_limit"
    assert placement(info, traffic, BenchOptions(n_gpu_layers=99))["cpu_expert_blocks"] == []


def test_jobs_are_plain_json_and_pass_placement_only_when_set(tmp_path):
    from allocmoe_edge.bench import job
    from allocmoe_edge.evaluate import EvalConfig

    config = EvalConfig("alloc-l (plan 1)", "alloc-l", plan=1)
    plain = job(tmp_path / "m.gguf", config, BenchOptions(prompts=(512, 2048), n_gen=128, threads=2))
    assert json.loads(json.dumps(plain)) == plain
    assert plain["choice"] == {"plan_index": 1, "full_budget": False, "uniform_k": None, "token_k_max": 0,
                               "token_mode": None, "decode_control": None, "decode_window": None,
                               "token_rule": None, "token_rule_value": None, "token_rule_k_min": None}
    assert plain["llama"] == {"n_ctx": 2176, "n_batch": 2048, "n_ubatch": 2048, "n_gpu_layers": 0,
                              "flash_attn": False, "n_threads": 2, "n_threads_batch": 2}
    hybrid = job(tmp_path / "m.gguf", config, BenchOptions(n_gpu_layers=99, cpu_moe=True, n_cpu_moe=3))
    assert hybrid["llama"]["cpu_moe"] is True and hybrid["llama"]["n_cpu_moe"] == 3


# ---------------------------------------------------------------- statistics

def test_percentiles_on_known_samples():
    p = percentiles(list(range(100, 0, -1)))  # 1..100, unsorted
    assert p == {"p50": pytest.approx(50.5), "p90": pytest.approx(90.1), "p99": pytest.approx(99.01),
                 "mean": pytest.approx(50.5), "n": 100}
    assert percentiles([7.0]) == {"p50": 7.0, "p90": 7.0, "p99": 7.0, "mean": 7.0, "n": 1}


def test_backend_and_device_name_what_ran_the_offloaded_layers():
    lavapipe = {"backend": "Vulkan", "name": "Vulkan0", "description": "llvmpipe (LLVM 15.0.6, 256 bits)"}
    cpu = {"backend": "CPU", "name": "CPU", "description": "a CPU"}
    report = {"gpu_offload": True, "devices": [cpu, lavapipe], "system_info": "CPU : AVX2 = 1 |"}
    assert hwinfo.backend(report) == "Vulkan"
    assert hwinfo.device(report, 99) == lavapipe["description"] and hwinfo.device(report, 0) == hwinfo.cpu_model()
    assert hwinfo.backend({**report, "devices": [cpu], "system_info": "CUDA : ARCHS = 900"}) == "CUDA"
    assert hwinfo.backend({"gpu_offload": False, "devices": [cpu]}) == "CPU"


def test_tie_rule():
    close = speedup(summary([100, 104]), summary([99, 101]))  # 102 ± 2.83 over 100 ± 1.41
    assert close["ratio"] == pytest.approx(1.02) and close["tie"] is True
    assert close["sd"] == pytest.approx(1.02 * math.hypot(2 * 2 ** 0.5 / 102, 2 ** 0.5 / 100))  # 0.032
    assert format_speedup(close) == "1.02x (tie)"
    clear = speedup(summary([150, 151]), summary([100, 101]))
    assert clear["tie"] is False and format_speedup(clear) == "1.50x"
    slower = speedup(summary([80, 81]), summary([100, 101]))
    assert slower["tie"] is False and format_speedup(slower) == "0.80x"
    one_rep = speedup(summary([150]), summary([100]))
    assert one_rep == {"ratio": 1.5, "sd": None, "tie": None} and format_speedup(one_rep) == "1.50x"


def _replies(decode_s: list[float], token_s: list[list[float]]) -> list[dict]:
    """Replies of a child measuring pp16 and tg4, one per repetition."""
    return [{"rep": i, "prompt": {"16": {"decode_s": d, "first_token_s": d + 0.001}},
             "gen": {"total_s": sum(t) + 0.004, "token_s": t}} for i, (d, t) in enumerate(zip(decode_s, token_s))]


def test_measurements_pool_token_latencies_over_repetitions():
    opts = BenchOptions(prompts=(16,), n_gen=4, latency=True)
    row = measurements(_replies([0.5, 0.25], [[0.001, 0.002, 0.003, 0.004], [0.005, 0.006, 0.007, 0.008]]), opts)
    assert row["tests"]["pp16"]["samples"] == [32.0, 64.0] and row["tests"]["pp16"]["n_prompt"] == 16
    assert row["tests"]["tg4"]["samples"] == [pytest.approx(4 / 0.014), pytest.approx(4 / 0.03)]
    assert row["latency"]["ttft_ms"]["16"]["samples"] == [pytest.approx(501), pytest.approx(251)]
    # 8 pooled samples 1..8 ms: linear interpolation between order statistics
    assert row["latency"]["token_ms"] == {"p50": pytest.approx(4.5), "p90": pytest.approx(7.3),
                                          "p99": pytest.approx(7.93), "mean": pytest.approx(4.5), "n": 8}
    assert measurements(_replies([0.5], [[0.001] * 4]), BenchOptions(prompts=(16,), n_gen=4))["latency"] is None


def test_speedups_and_table_mark_ties_and_failures():
    opts = BenchOptions(prompts=(16,), n_gen=4, reps=2)
    base = measurements(_replies([0.5, 0.52], [[0.01] * 4, [0.011] * 4]), opts)
    tie = measurements(_replies([0.49, 0.53], [[0.005] * 4, [0.0051] * 4]), opts)
    rows = [{"name": n, "method": m, "alloc_t": False, "budget": b, "budget_count": c, "decode_limit": lim,
             "decode_limit_cpu_experts": None, **meas, "latency": None, "error": err}
            for n, m, b, c, lim, meas, err in [
                ("full", "full", 1.0, 16, 1.0, base, None), ("p", "plan", 0.5, 8, 1.3, tie, None),
                ("u", "uniform", 0.5, 8, 1.3, {"tests": None}, "killed by SIGABRT")]]
    rows[1]["decode_activations"] = {"total": 7.625, "per_layer": {"1": 7.625}, "tokens": 32}  # measured, decode rule
    add_speedups(rows)
    assert rows[0]["tests"]["pp16"]["speedup"] == BASELINE and rows[2]["tests"] is None
    assert rows[1]["tests"]["pp16"]["speedup"]["tie"] is True and rows[1]["tests"]["tg4"]["speedup"]["tie"] is False
    result = {"model": "/x/m.gguf", "tests": opts.test_names(), "options": {"latency": False},
              "placement": {"limit": "decode_limit"}, "rows": rows}
    lines = bench_tables(result).splitlines()
    assert lines[0] == ("| model | budget | method | alloc-t | act/token decoded | pp16 t/s | tg4 t/s | speedup pp16 "
                        "| speedup tg4 | decode limit |")
    # 16 / 0.5 and 16 / 0.52 tokens/s; 4 / 0.044 and 4 / 0.048
    assert lines[2] == "| m.gguf | 1.00 (16) | full | off | - | 31.38 ± 0.87 | 87.12 ± 5.36 | 1.00x | 1.00x | 1.00x |"
    assert lines[3].startswith("| m.gguf | 0.50 (8) | plan | off | 7.62 |")
    assert lines[3].endswith("| 1.00x (tie) | 1.90x | 1.30x |")  # pp 31.42 vs 31.38; tg 165.3 vs 87.1
    assert lines[4] == "| m.gguf | 0.50 (8) | uniform | off | - | failed | failed | - | - | 1.30x |"


def test_options_reject_bad_input():
    for opts, message in [(BenchOptions(reps=0), "--reps 0"), (BenchOptions(prompts=(0, 512)), "distinct and >= 1"),
                          (BenchOptions(prompts=(512, 512)), "distinct"),
                          (BenchOptions(prompts=(), n_gen=0), "cannot both be 0"),
                          (BenchOptions(prompts=(), latency=True), "--latency needs"),
                          (BenchOptions(n_gen=0, latency=True), "--latency needs"),
                          (BenchOptions(max_loaded=0), "--max-loaded"), (BenchOptions(budgets=(1.5,)), "budgets")]:
        with pytest.raises(AllocMoeError, match=message):
            opts.check()


# ---------------------------------------------------------------- child processes (fake children)

FAKE_CHILD = r'''
import json, os, signal, sys, time
job = json.loads(sys.stdin.readline())
fake = job["fake"]
def note(text):
    with open(fake["order"], "a") as f:
        f.write(text + "\n")
note("start " + job["name"])
print("llama_allocmoe_load_plan: plan of " + job["name"], file=sys.stderr, flush=True)
print(json.dumps({"ready": True, "threads": 1, "threads_batch": 1}), flush=True)
for line in sys.stdin:
    rep = json.loads(line)["rep"]
    note(job["name"] + " " + str(rep))
    if rep == fake.get("abort_at"):
        print("ggml_abort: GGML_ASSERT(x) failed", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGABRT)
    if rep == fake.get("hang_at"):
        time.sleep(60)
    print(json.dumps({"rep": rep, "prompt": {"16": {"decode_s": 0.5, "first_token_s": 0.6}},
                      "gen": {"total_s": 1.0, "token_s": [0.25] * 4}}), flush=True)
'''


def _fake_workers(tmp_path: Path, names: str, timeout: float | None = None, **fake: dict) -> list[Worker]:
    """One Worker per letter of ``names`` running FAKE_CHILD; ``fake[name]`` adds abort_at / hang_at."""
    script = tmp_path / "fake_child.py"
    script.write_text(FAKE_CHILD)
    return [Worker({"name": n, "fake": {"order": str(tmp_path / "order.txt"), **fake.get(n, {})}},
                   tmp_path / f"{n}.log", timeout, argv=(sys.executable, str(script))) for n in names]


def _order(tmp_path: Path) -> list[str]:
    return (tmp_path / "order.txt").read_text().splitlines()


def test_repetitions_are_interleaved(tmp_path):
    workers = _fake_workers(tmp_path, "abc")
    steps = []
    interleave(workers, 3, log=lambda msg: None, on_step=lambda w, rep: steps.append((w.name, rep)))
    runs = [line for line in _order(tmp_path) if not line.startswith("start")]
    assert runs == [f"{n} {rep}" for rep in range(3) for n in "abc"]  # round-robin, not one block per row
    assert [f"start {n}" for n in "abc"] == [line for line in _order(tmp_path) if line.startswith("start")]
    assert steps == [(n, rep) for rep in range(3) for n in "abc"]
    for w in workers:
        assert w.error is None and len(w.replies) == 3 and w.resident and not w.running
        assert w.log_lines() == ([f"llama_allocmoe_load_plan: plan of {w.name}"], None)


def test_aborting_configuration_fails_only_its_row(tmp_path):
    workers = _fake_workers(tmp_path, "abc", b={"abort_at": 1})
    messages = []
    interleave(workers, 3, log=messages.append)
    a, b, c = workers
    assert len(a.replies) == len(c.replies) == 3 and a.error is None and c.error is None
    assert len(b.replies) == 1 and b.error == "killed by SIGABRT"
    log, error = b.log_lines()
    assert error == "killed by SIGABRT; ggml_abort: GGML_ASSERT(x) failed"
    assert "ggml_abort: GGML_ASSERT(x) failed" in log
    assert [line for line in _order(tmp_path) if line.startswith("b ")] == ["b 0", "b 1"]  # not asked again
    assert any(m.startswith("  b failed: killed by SIGABRT") for m in messages)


def test_configuration_past_its_timeout_fails(tmp_path):
    workers = _fake_workers(tmp_path, "ab", timeout=1.0, a={"hang_at": 0})
    interleave(workers, 2, log=lambda msg: None)
    assert workers[0].error == "timed out after 1 s" and workers[0].replies == []
    assert workers[1].error is None and len(workers[1].replies) == 2


def test_max_loaded_reloads_the_rest_for_every_repetition(tmp_path):
    workers = _fake_workers(tmp_path, "abc")
    interleave(workers, 3, max_loaded=2, log=lambda msg: None)
    order = _order(tmp_path)
    assert [w.resident for w in workers] == [True, False, False]
    assert [order.count(f"start {n}") for n in "abc"] == [1, 3, 3]
    assert [line for line in order if not line.startswith("start")] == [f"{n} {rep}" for rep in range(3) for n in "abc"]
    assert all(len(w.replies) == 3 for w in workers)


def test_worker_module_is_a_leaf():
    code = "import sys, allocmoe_edge.bench_worker; assert 'allocmoe_edge.bench' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---------------------------------------------------------------- command line and plot

def test_flags_reach_the_bench_and_a_failed_row_fails_the_command(tmp_path, monkeypatch):
    """Every flag lands in BenchOptions (-p 0: no pp test), --json is written after each round and at
    the end, and failed configurations give exit status 1 naming them."""
    import allocmoe_edge.bench
    import allocmoe_edge.presentation

    calls, rounds = [], []

    def fake_bench(model, opts, log, on_round=None):
        calls.append(opts)
        if on_round:
            on_round({"complete": False, "failed": []})
            rounds.append(json.loads(out.read_text()))
        return {"backend": "CPU", "device": "a CPU", "threads": 2, "plans_source": "stored", "commit": None,
                "complete": True, "failed": ["uniform k=2"]}

    monkeypatch.setattr(allocmoe_edge.bench, "bench", fake_bench)
    monkeypatch.setattr(allocmoe_edge.presentation, "bench_tables", lambda result: "| table |")
    model, out = write_fake_moe(tmp_path / "m.gguf"), tmp_path / "bench.json"
    res = CliRunner().invoke(cli, ["bench", str(model), "--budgets", "1,0.5", "--reps", "3", "-p", "512,2048",
                                   "-n", "0", "--latency", "-t", "2", "-ngl", "99", "--cpu-moe", "--n-cpu-moe", "2",
                                   "-fa", "--timeout", "30", "--max-loaded", "1", "--json", str(out)])
    assert calls == [BenchOptions(budgets=(1.0, 0.5), reps=3, prompts=(512, 2048), n_gen=0, latency=True, threads=2,
                                  n_gpu_layers=99, cpu_moe=True, n_cpu_moe=2, flash_attn=True, timeout=30.0,
                                  max_loaded=1)]
    assert rounds == [{"complete": False, "failed": []}] and json.loads(out.read_text())["complete"] is True
    assert res.exit_code == 1 and "| table |" in res.output
    assert "1 configuration(s) failed: uniform k=2" in res.output
    res = CliRunner().invoke(cli, ["bench", str(model), "-p", "0"])
    assert calls[-1] == BenchOptions(prompts=()) and rounds == [rounds[0]]  # the defaults; no --json, no rounds


@pytest.mark.parametrize("args, message", [
    (["--reps", "0"], "Invalid value for '--reps'"),
    (["-p", "512,x"], "comma-separated token counts"),
    (["-p", "0", "--latency"], "--latency needs prompt sizes"),
])
def test_bad_arguments_give_one_line_errors(tmp_path, capsys, args, message):
    model = write_fake_moe(tmp_path / "m.gguf")
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", str(model), *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_plot_tolerates_missing_rows(tmp_path):
    def row(method, alloc_t, budget, tg, pp):
        tests = {"pp512": {"mean": 1.0, "speedup": {"ratio": pp}}, "tg128": {"mean": 1.0, "speedup": {"ratio": tg}}}
        return {"method": method, "alloc_t": alloc_t, "budget": budget, "tests": tests}

    bench = {"model": "m.gguf", "rows": [
        row("full", False, 1.0, 1.0, 1.0), row("alloc-l+t", True, 0.5, 1.6, 1.3), row("uniform", False, 0.5, 1.7, 1.4),
        {"method": "alloc-l", "alloc_t": False, "budget": 0.25, "tests": None}]}  # a failed row
    evals = {"results": [
        {"name": "full", "method": "full", "budget": 1.0, "alloc_t": False, "kld_mean": 0.0},
        {"name": "a", "method": "alloc-l+t", "budget": 0.5, "alloc_t": True, "kld_mean": 0.05},
        {"name": "u", "method": "uniform", "budget": 0.5, "alloc_t": False, "kld_mean": 0.2},
        {"name": "x", "method": "alloc-l", "budget": 0.25, "alloc_t": False, "kld_mean": 0.4}]}
    out = tmp_path / "frontier.png"
    assert plot_frontier(evals, bench, out) == (3, 4)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_frontier(evals, bench, out, speed="pp") == (3, 4)
    assert plot_frontier({"results": []}, bench, out, speed="pp") == (0, 0)


# ---------------------------------------------------------------- real runs (patched runtime)

@pytest.mark.slow
@pytest.mark.runtime
def test_latency_bench_has_every_row_and_field(patched_runtime, olmoe_2layer, tmp_path):
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(cli, ["bench", str(olmoe_2layer), "--budgets", "1,0.5", "--latency", "-p", "16,32",
                                   "-n", "4", "--reps", "2", "-t", "2", "--json", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert result["version"] == 2 and result["plans_source"] == "uniform-split" and result["synthetic"] is True
    assert result["backend"] == "CPU" and result["patch_hash"] and result["allocmoe_patch_version"] >= 1
    assert result["device"] == hwinfo.cpu_model() and result["devices"][0]["backend"] == "CPU"
    assert result["commit"] and result["n_gpu_layers"] == 0 and result["tests"] == ["pp16", "pp32", "tg4"]
    assert result["flags"]["n_batch"] == result["flags"]["n_ubatch"] == 32 and result["flags"]["order"] == "interleaved"
    assert result["placement"] == {"n_gpu_layers": 0, "cpu_moe": False, "n_cpu_moe": 0, "cpu_expert_blocks": [],
                                   "cpu_expert_bytes": 0, "limit": "decode_limit"}
    assert result["failed"] == [] and result["threads"] == 2
    assert [r["name"] for r in result["rows"]] == [
        "full", "uniform-split+t (plan 0)", "uniform-split (plan 0)", "uniform k=4"]
    for row in result["rows"]:
        assert row["error"] is None and row["resident"] is True and row["threads"] == 2
        assert set(row["tests"]) == {"pp16", "pp32", "tg4"}
        for test in row["tests"].values():
            assert len(test["samples"]) == 2 and all(math.isfinite(x) and x > 0 for x in test["samples"])
            assert test["sd"] >= 0 and math.isfinite(test["speedup"]["ratio"]) and test["speedup"]["sd"] >= 0
            assert isinstance(test["speedup"]["tie"], bool)
        ttft = row["latency"]["ttft_ms"]
        assert set(ttft) == {"16", "32"} and all(len(t["samples"]) == 2 and t["mean"] > 0 for t in ttft.values())
        tokens = row["latency"]["token_ms"]
        assert tokens["n"] == 8 and 0 < tokens["p50"] <= tokens["p90"] <= tokens["p99"]
        assert row["decode_limit_cpu_experts"] is None and row["cpu_expert_bytes_per_token"] is None
    assert result["rows"][0]["tests"]["tg4"]["speedup"] == BASELINE
    # two blocks: the output matrix dominates, so halving the experts saves ~20 % of the bytes
    assert result["rows"][0]["decode_limit"] == 1.0 and 1.2 < result["rows"][-1]["decode_limit"] < 1.35
    assert "| olmoe2.gguf | 0.50 (8) | uniform | off |" in res.output
    assert "| TTFT 16 ms | TTFT 32 ms | token p50 ms |" in res.output


@pytest.mark.slow
@pytest.mark.runtime
def test_hybrid_bench_shows_the_cpu_expert_limit(patched_runtime, olmoe_2layer, tmp_path):
    import inspect

    import llama_cpp

    if "tensor_buft_overrides" not in inspect.signature(llama_cpp.Llama.__init__).parameters:
        pytest.skip("the installed bindings lack tensor buffer overrides (--cpu-moe)")
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(cli, ["bench", str(olmoe_2layer), "--budgets", "1,0.5", "-p", "8", "-n", "2", "--reps",
                                   "2", "-t", "2", "-ngl", "99", "--n-cpu-moe", "1", "--json", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert result["placement"]["cpu_expert_blocks"] == [0]
    assert result["placement"]["limit"] == "decode_limit_cpu_experts"
    assert result["placement"]["cpu_expert_bytes"] == 64 * 3 * 2048 * 1024 * 18 // 32
    assert [r["decode_limit_cpu_experts"] for r in result["rows"]] == [1.0, 2.0, 2.0, 2.0]  # block 0: 8 -> 4 experts
    table = [line for line in res.output.splitlines() if line.startswith("| olmoe2.gguf |")]
    assert "| decode limit (CPU experts) |" in res.output
    assert [line.rsplit("|", 2)[1].strip() for line in table] == ["1.00x", "2.00x", "2.00x", "2.00x"]


@pytest.mark.runtime
def test_failing_configuration_is_one_failed_row(patched_runtime, olmoe_2layer, tmp_path):
    """A configuration whose load fails in its child gives an error row; the other is still measured."""
    from allocmoe_edge.bench import job
    from allocmoe_edge.evaluate import EvalConfig

    opts = BenchOptions(reps=2, prompts=(8,), n_gen=2, threads=2)
    bad, good = (Worker(job(olmoe_2layer, config, opts), tmp_path / f"{i}.log")
                 for i, config in enumerate([EvalConfig("bad", "plan", plan=7), EvalConfig("full", "full")]))
    interleave([bad, good], opts.reps, log=lambda msg: None)
    _, error = bad.log_lines()
    assert bad.replies == [] and error.startswith("exit status 1") and "plan 7 does not exist" in error
    assert good.error is None and len(good.replies) == 2
    assert measurements(good.replies, opts)["tests"]["pp8"]["mean"] > 0


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
