"""The patched llama.cpp runs per-layer expert counts: logits against transformers, full-budget
paths bit for bit, hostile plans rejected cleanly (loads run in subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys

import gguf
import numpy as np
import pytest

from allocmoe_edge.gguf_meta import AllocmoeMeta, Keys, copy_with_metadata, plan_for_counts, read_info, stamp
from allocmoe_edge.runtime import LoadChoice

from .llama_logits import RTOL, llama_logits, tokens_for, torch_logits

pytestmark = [pytest.mark.slow, pytest.mark.runtime]


# per-MoE-layer counts that differ from layer 0's value in every case
COUNTS = {"mixtral": [1, 3, 2], "qwen2_moe": [2, 1, 3], "olmoe": [1, 2, 1], "qwen3_moe": [2, 1, 1]}


def _close(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(1e-6, float(np.max(np.abs(b)))))


def test_doctor_says_patched(patched_runtime):
    out = subprocess.run([sys.executable, "-m", "allocmoe_edge", "doctor", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["patched"] is True and report["allocmoe_patch_version"] >= 1


@pytest.mark.parametrize("arch", sorted(COUNTS))
def test_per_layer_counts_match_transformers(patched_runtime, tiny_gguf, tmp_path, arch):
    hf_dir, path = tiny_gguf(arch)
    info = read_info(path)
    counts = COUNTS[arch]
    stamped = tmp_path / "plan.gguf"
    stamp(path, stamped, [plan_for_counts(info, counts)])
    tokens = tokens_for(50000)
    ref = torch_logits(hf_dir, tokens, counts)
    got = llama_logits(stamped, tokens)
    full = torch_logits(hf_dir, tokens)
    assert _close(got, ref) < RTOL, f"{arch}: llama.cpp vs transformers at {counts}: {_close(got, ref):.2e}"
    # the plan really changes the result (so the comparison above could fail)
    assert _close(full, ref) > 0.05 > 5 * RTOL


def test_full_budget_paths_are_bitwise_identical(patched_runtime, tiny_gguf, tmp_path):
    _, path = tiny_gguf("mixtral")
    info = read_info(path)
    k = info.expert_used_count
    tokens = tokens_for(50000)
    stamp(path, tmp_path / "a.gguf", [plan_for_counts(info, [1, 2, 1]), plan_for_counts(info, [k] * 3)])
    plain = llama_logits(path, tokens)
    assert np.array_equal(plain, llama_logits(tmp_path / "a.gguf", tokens, LoadChoice(full_budget=True)))
    assert np.array_equal(plain, llama_logits(tmp_path / "a.gguf", tokens, LoadChoice(plan_index=1)))
    # a uniform plan equals the stock expert_used_count override users rely on today
    stamp(path, tmp_path / "u.gguf", [plan_for_counts(info, [2, 2, 2])])
    assert np.array_equal(llama_logits(tmp_path / "u.gguf", tokens),
                          llama_logits(path, tokens, LoadChoice(uniform_k=2)))


def test_plan_selected_per_load(patched_runtime, tiny_gguf, tmp_path):
    from allocmoe_edge.runtime import layer_counts, load

    _, path = tiny_gguf("mixtral")
    info = read_info(path)
    stamp(path, tmp_path / "p.gguf", [plan_for_counts(info, [1, 2, 1]), plan_for_counts(info, [3, 1, 2])], default=1)
    assert layer_counts(load(tmp_path / "p.gguf")) == [3, 1, 2]
    assert layer_counts(load(tmp_path / "p.gguf", LoadChoice(plan_index=0))) == [1, 2, 1]
    assert layer_counts(load(tmp_path / "p.gguf", LoadChoice(full_budget=True))) == [3, 3, 3]


def _hostile(path, out, fields=None, drop_extra=()):
    """Stamp a valid plan, then overwrite or drop keys with hostile values."""
    T = gguf.GGUFValueType
    base = {Keys.VERSION: (1, T.UINT32, None), Keys.LAYER_EXPERT_COUNTS: ([1, 2, 1], T.ARRAY, T.UINT32)}
    base.update(fields or {})
    base = {k: v for k, v in base.items() if v is not None}
    copy_with_metadata(path, out, base, drop=lambda k: k.startswith(Keys.PREFIX) or k in drop_extra)
    return out


T = gguf.GGUFValueType
HOSTILE = {
    "short": {Keys.LAYER_EXPERT_COUNTS: ([1, 2], T.ARRAY, T.UINT32)},
    "long": {Keys.LAYER_EXPERT_COUNTS: ([1, 2, 1, 1], T.ARRAY, T.UINT32)},
    "zero": {Keys.LAYER_EXPERT_COUNTS: ([1, 0, 1], T.ARRAY, T.UINT32)},
    "above_n_expert": {Keys.LAYER_EXPERT_COUNTS: ([1, 7, 1], T.ARRAY, T.UINT32)},
    "huge": {Keys.LAYER_EXPERT_COUNTS: ([1, 2**32 - 1, 1], T.ARRAY, T.UINT32)},
    "negative_int32": {Keys.LAYER_EXPERT_COUNTS: ([1, -2, 1], T.ARRAY, T.INT32)},
    "float_array": {Keys.LAYER_EXPERT_COUNTS: ([1.0, 2.0, 1.0], T.ARRAY, T.FLOAT32)},
    "string_not_array": {Keys.LAYER_EXPERT_COUNTS: ("1,2,1", T.STRING, None)},
    "k_min_above_count": {Keys.TOKEN_K_MIN: (2, T.UINT32, None)},
    "k_max_above_experts": {Keys.TOKEN_K_MAX: (9, T.UINT32, None)},
    "k_max_below_count": {Keys.TOKEN_K_MAX: (1, T.UINT32, None),
                          Keys.LAYER_EXPERT_COUNTS: ([1, 2, 1], T.ARRAY, T.UINT32)},
    "k_min_string": {Keys.TOKEN_K_MIN: ("one", T.STRING, None)},
    "future_version": {Keys.VERSION: (99, T.UINT32, None)},
    "plan_index_without_plans": {Keys.PLAN_INDEX: (0, T.INT32, None)},
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_plan_fails_cleanly(patched_runtime, tiny_gguf, tmp_path, case):
    _, path = tiny_gguf("mixtral")
    bad = _hostile(path, tmp_path / f"{case}.gguf", HOSTILE[case])
    proc = subprocess.run([sys.executable, "-m", "allocmoe_edge", "run", str(bad), "-p", "hi", "-n", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])  # clean error, not a signal
    assert "allocmoe" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_stamp_inspect_run_cli(patched_runtime, tiny_gguf, tmp_path):
    _, path = tiny_gguf("mixtral")
    def run(*a):
        return subprocess.run([sys.executable, "-m", "allocmoe_edge", *a], capture_output=True, text=True)

    out = run("stamp", str(path), "--counts", "1,2,1", "--counts", "2,2,2", "-o", str(tmp_path / "s.gguf"))
    assert out.returncode == 0, out.stderr
    info = json.loads(run("inspect", str(tmp_path / "s.gguf"), "--json").stdout)
    assert info["allocmoe"]["layer_expert_counts"] == [1, 2, 1]
    assert info["expert_used_count"] == 3 and info["block_count"] == 3
    res = json.loads(run("run", str(tmp_path / "s.gguf"), "-p", "hello", "-n", "4", "--budget", "0.6667",
                         "--json").stdout)
    assert res["layer_counts"] == [2, 2, 2]


def test_alloc_t_is_off_on_unverified_gpu_layers_unless_asked(monkeypatch):
    """Alloc-T aborted on CUDA: loads with layers on a GPU backend other than Vulkan (checked on lavapipe by
    `make test`) turn it off (token_k_max = 0) unless opted in."""
    import types

    from allocmoe_edge import runtime

    gpu = types.SimpleNamespace(llama_supports_gpu_offload=lambda: True)
    monkeypatch.setattr(runtime, "llama_cpp_module", lambda: gpu)
    on = lambda *names: [{"backend": n} for n in ("CPU", *names)]  # noqa: E731
    monkeypatch.setattr(runtime, "devices", lambda: on("CUDA"))
    info = types.SimpleNamespace(meta=AllocmoeMeta(token_k_max=4))
    assert runtime._unverified_gpu_backends(info, {}, n_gpu_layers=99) == ["CUDA"]
    assert runtime._unverified_gpu_backends(info, {}, n_gpu_layers=-1) == ["CUDA"]
    assert not runtime._unverified_gpu_backends(info, {}, n_gpu_layers=0)
    assert not runtime._unverified_gpu_backends(info, {Keys.TOKEN_K_MAX: 0}, n_gpu_layers=99)
    assert not runtime._unverified_gpu_backends(info, {Keys.ENABLED: False}, n_gpu_layers=99)
    assert not runtime._unverified_gpu_backends(types.SimpleNamespace(meta=AllocmoeMeta()), {}, n_gpu_layers=99)
    monkeypatch.setattr(runtime, "devices", lambda: on("Vulkan"))
    assert not runtime._unverified_gpu_backends(info, {}, n_gpu_layers=99)
    monkeypatch.setattr(runtime, "devices", lambda: on("Vulkan", "RPC"))
    assert runtime._unverified_gpu_backends(info, {}, n_gpu_layers=99) == ["RPC"]
    cpu = types.SimpleNamespace(llama_supports_gpu_offload=lambda: False)
    monkeypatch.setattr(runtime, "llama_cpp_module", lambda: cpu)
    assert not runtime._unverified_gpu_backends(info, {}, n_gpu_layers=99)


@pytest.mark.runtime
def test_error_lines_reach_stderr_outside_loads(patched_runtime, capfd):
    """llama-cpp-python hides ggml ERROR lines (as DEBUG); a CUDA error's text must still show."""
    from allocmoe_edge import runtime

    runtime.install_log()
    runtime._LOG.callback(4, b"CUDA error: an illegal memory access\n", None)
    assert "CUDA error: an illegal memory access" in capfd.readouterr().err
    runtime._LOG.loading = []
    try:
        runtime._LOG.callback(4, b"llama_model_load: bad plan\n", None)
        assert runtime._LOG.loading == ["llama_model_load: bad plan"] and "bad plan" not in capfd.readouterr().err
    finally:
        runtime._LOG.loading = None
