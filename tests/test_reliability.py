"""Reliability (issue 9): bad input to the CLI gives one clean error line; two budgets loaded at
once in one process give the results each gives alone; a 10,000-token Alloc-T soak keeps memory
flat and logits finite."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from allocmoe_edge.gguf_meta import Keys, copy_with_metadata, plan_for_counts, read_info, stamp
from allocmoe_edge.plan import Budget, Plan, PlanModelShape
from allocmoe_edge.runtime import LoadChoice

from .ggufs import write_fake_moe
from .llama_logits import tokens_for

T = gguf.GGUFValueType


def cli(*args: object, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "allocmoe_edge", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def assert_clean_error(proc: subprocess.CompletedProcess, *expect: str) -> None:
    """Exit status 2, no traceback, exactly one "Error:" line that says what is wrong
    (a click usage error also prints the usage lines above it)."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [ln for ln in lines if ln.startswith("Error:")]
    assert len(errors) == 1 and (len(lines) == 1 or lines[0].startswith("Usage:")), lines
    for text in expect:
        assert text in errors[0], (text, errors[0])


# ------------------------------------------------------------------------------------ bad input

def write_dense(path: Path) -> Path:
    """A small dense llama-arch GGUF: FFN tensors but no router (ffn_gate_inp)."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(2)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(32)
    w.add_head_count(2)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for i in range(2):
        w.add_tensor(f"blk.{i}.ffn_up.weight", np.zeros((32, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    """name -> a file that no command may accept as a MoE model (and a text for eval)."""
    d = tmp_path_factory.mktemp("bad")
    moe = write_fake_moe(d / "moe.gguf")
    data = moe.read_bytes()
    (d / "junk.gguf").write_text("this is not a GGUF file\n")
    (d / "header_cut.gguf").write_bytes(data[:200])  # inside the metadata
    (d / "data_cut.gguf").write_bytes(data[:-64])  # inside the tensor data
    (d / "text.txt").write_text("the cat sat on the mat. " * 8)
    return {"missing": d / "missing.gguf", "junk": d / "junk.gguf", "header_cut": d / "header_cut.gguf",
            "data_cut": d / "data_cut.gguf", "dense": write_dense(d / "dense.gguf"), "moe": moe, "text": d / "text.txt"}


COMMANDS = {  # command -> its arguments after MODEL
    "inspect": (),
    "stamp": ("--counts", "1,1", "-o", "{out}"),
    "run": ("-p", "hi", "-n", "1", "--budget", "0.5"),
    "eval": ("--text", "{text}"),
}
EXPECT = {"missing": "does not exist|no such file", "junk": "not a readable GGUF", "header_cut": "not a readable GGUF",
          "data_cut": "not a readable GGUF"}


@pytest.mark.parametrize("kind", sorted(EXPECT))
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_unreadable_model_is_one_clean_error(bad_files, tmp_path, command, kind):
    args = [a.format(out=tmp_path / "o.gguf", text=bad_files["text"]) for a in COMMANDS[command]]
    proc = cli(command, bad_files[kind], *args)
    assert_clean_error(proc)
    assert any(alt in proc.stderr for alt in EXPECT[kind].split("|")), proc.stderr
    assert not (tmp_path / "o.gguf").exists() and not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("command,expect", [
    ("stamp", "has no experts"), ("eval", "no MoE layers"), ("run", "stores no plans"),
])
def test_non_moe_model_is_one_clean_error(bad_files, tmp_path, command, expect):
    args = [a.format(out=tmp_path / "o.gguf", text=bad_files["text"]) for a in COMMANDS[command]]
    assert_clean_error(cli(command, bad_files["dense"], *args), expect)


def test_inspect_says_non_moe(bad_files):
    proc = cli("inspect", bad_files["dense"])
    assert proc.returncode == 0 and "no MoE layers" in proc.stdout, proc.stderr


def test_debug_shows_the_traceback(bad_files):
    proc = cli("--debug", "inspect", bad_files["junk"])
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "AllocMoeError" in proc.stderr


def test_stamp_plan_for_another_model(bad_files, tmp_path):
    other = PlanModelShape("Qwen2MoeForCausalLM", 4, (0, 1, 2, 3), 16, 2)  # 16 experts; the file has 8
    Plan(model=other, budget=Budget.parse("0.5", other), method="alloc-l", counts=(1, 1, 1, 1),
         token_k_max=0).save(tmp_path / "other.json")
    proc = cli("stamp", bad_files["moe"], "--plan", tmp_path / "other.json", "-o", tmp_path / "o.gguf")
    assert_clean_error(proc, "expert count")
    assert not (tmp_path / "o.gguf").exists()


def _sensitivity(n_layers: int = 3, k_orig: int = 4) -> dict:
    """A sensitivity file in allocate.py's documented format (deeper layers less sensitive)."""
    layers = [{"layer": b, "kld": [(k_orig - k) / (b + 1) for k in range(1, k_orig + 1)]} for b in range(n_layers)]
    for layer in layers:
        layer["ppl"] = [10.0 * math.exp(v) for v in layer["kld"]]
    return {"format": "allocmoe-sensitivity", "version": 1,
            "model": {"architecture": "toy", "n_layer": n_layers, "moe_layers": list(range(n_layers)),
                      "n_expert": 8, "k_orig": k_orig},
            "calibration": {"file": "calib.txt", "n_tokens": 64}, "mode": "isolated",
            "full": {"ppl": 10.0, "nll": math.log(10.0)}, "layers": layers}


@pytest.mark.parametrize("budget", ["1.5", "0", "-3", "13", "2", "0.1"])
def test_allocate_budget_out_of_range_or_infeasible(tmp_path, budget):
    """3 MoE layers x K 4 = 12 activations: above 12, zero, negative and below 3 x k_min cannot be planned."""
    sens = tmp_path / "sens.json"
    sens.write_text(json.dumps(_sensitivity()))
    assert_clean_error(cli("allocate", sens, "-b", budget, "--json"), "budget")
    ok = cli("allocate", sens, "-b", "6", "--json")  # the same file with a feasible budget works
    assert ok.returncode == 0 and json.loads(ok.stdout)["counts"], ok.stderr


@pytest.mark.slow
@pytest.mark.runtime
def test_run_names_the_loaders_reason(patched_runtime, tiny_gguf, tmp_path):
    """A hostile plan stops `run` with llama.cpp's own reason in the one error line."""
    _, path = tiny_gguf("mixtral")
    bad = tmp_path / "zero.gguf"
    copy_with_metadata(path, bad, {Keys.LAYER_EXPERT_COUNTS: ([1, 0, 1], T.ARRAY, T.UINT32)},
                       drop=lambda k: k.startswith(Keys.PREFIX))
    proc = cli("run", bad, "-p", "hi", "-n", "1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "layer_expert_counts[1] = 0 is outside [1, 6]" in proc.stderr, proc.stderr[-2000:]


# ------------------------------------------------------------------ two budgets at once, soak

def _llama_kwargs() -> dict:
    # f32 KV cache, fixed threads: the same arithmetic in every context compared below
    return dict(logits_all=True, n_ctx=64, n_batch=64, n_ubatch=64, n_threads=2, type_k=0, type_v=0)


@pytest.mark.slow
@pytest.mark.runtime
def test_two_budgets_in_one_process_match_each_alone(patched_runtime, tiny_gguf, tmp_path):
    """Plans 0 and 1 of one file (Alloc-T on), loaded at the same time with interleaved calls,
    give bit for bit the logits and executed activations that each gives loaded alone."""
    from allocmoe_edge.graph_probe import moe_activations
    from allocmoe_edge.runtime import layer_counts, load

    _, path = tiny_gguf("mixtral")
    info = read_info(path)
    counts = ([1, 2, 1], [2, 1, 3])
    f = tmp_path / "two.gguf"
    stamp(path, f, [plan_for_counts(info, c) for c in counts], k_min=1, k_max=3)
    tokens = tokens_for(50000, n=32)

    def run(llm) -> tuple[dict, np.ndarray, np.ndarray]:
        acts, probe = moe_activations(llm, tokens)  # a fresh context of its own on llm's model
        llm.reset()
        llm.eval(tokens)  # the Llama's own context
        return acts, probe, np.array(llm.scores[: len(tokens)])

    alone = []
    for i in (0, 1):
        llm = load(f, LoadChoice(plan_index=i), **_llama_kwargs())
        assert layer_counts(llm) == counts[i]
        alone.append(run(llm))
        llm.close()
    assert not np.array_equal(alone[0][1], alone[1][1])  # the budgets really differ
    for (acts, probe, own), c in zip(alone, counts):
        assert np.array_equal(probe, own) and np.isfinite(own).all()
        for a, k in zip(acts.values(), c):
            assert a["pairs"] == len(tokens) * k
            if 1 < k < 3:  # Alloc-T redistributed this layer's activations (k = k_max leaves nothing to move)
                assert a["per_token"] is not None and len(set(a["per_token"])) > 1

    both = [load(f, LoadChoice(plan_index=i), **_llama_kwargs()) for i in (0, 1)]
    for _ in range(2):
        for llm, (acts, probe, own) in zip(both, alone):
            got_acts, got_probe, got_own = run(llm)
            assert _same_activations(got_acts, acts)
            assert np.array_equal(got_probe, probe) and np.array_equal(got_own, own)
    for llm in both:
        llm.close()


def _same_activations(a: dict, b: dict) -> bool:
    """Two ``moe_activations`` results are equal, the ids arrays compared element by element."""
    def rest(layer: dict) -> dict:
        return {k: v for k, v in layer.items() if k != "ids"}

    return a.keys() == b.keys() and all(
        np.array_equal(a[i]["ids"], b[i]["ids"]) and rest(a[i]) == rest(b[i]) for i in a)


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


SOAK_TOKENS = 10_000
SOAK_GROWTH_MB = 8  # RSS growth allowed after the first 1,000 tokens (measured: 0.0)


@pytest.mark.slow
@pytest.mark.runtime
def test_soak_alloc_t_memory_flat_and_finite(patched_runtime, tiny_gguf, tmp_path):
    """10,000 tokens at a tight budget with Alloc-T on: 64-token ubatches (Alloc-T runs, T = 64)
    and single-token greedy generation (T = 1), the context reused after a reset: every logit
    finite, RSS flat after the first 1,000 tokens."""
    from allocmoe_edge.graph_probe import moe_activations
    from allocmoe_edge.runtime import layer_counts, load

    _, path = tiny_gguf("mixtral")
    info = read_info(path)
    f = tmp_path / "tight.gguf"
    stamp(path, f, [plan_for_counts(info, [1, 2, 1])], k_min=1, k_max=info.expert_used_count)
    llm = load(f, **dict(_llama_kwargs(), n_ctx=256))
    assert layer_counts(llm) == [1, 2, 1]
    acts, _ = moe_activations(llm, tokens_for(50000, n=64))
    assert acts[1]["per_token"] is not None  # Alloc-T is in the graph of a 64-token ubatch
    rng = np.random.default_rng(0)
    done, baseline, peak = 0, None, 0.0
    while done < SOAK_TOKENS:
        llm.reset()
        llm.eval(rng.integers(1, 50000, size=192).tolist())  # three ubatches of 64
        for _ in range(8):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        assert np.isfinite(llm.scores[: llm.n_tokens]).all(), f"non-finite logits after {done} tokens"
        done += llm.n_tokens
        if baseline is None and done >= 1000:
            baseline = _rss_mb()
        peak = max(peak, _rss_mb())
    llm.close()
    growth = peak - baseline
    print(f"soak: {done} tokens, RSS {baseline:.1f} MB after 1,000 tokens, peak {peak:.1f} MB (+{growth:.2f} MB)")
    assert growth < SOAK_GROWTH_MB, f"RSS grew {growth:.1f} MB over {done} tokens"
