"""Alloc-T on a CUDA build against the CPU backend on the same ubatch (skipped without a GPU).

A synthetic DeepSeek-V2-Lite (3 blocks: 1 dense + 2 MoE, 64 experts top-6, q4_0) with a 50 %
uniform-split plan and Alloc-T: every position's logits of one ubatch from the GPU (all layers
offloaded) against the CPU (ngl 0) of the same library; the ids of every Alloc-T layer hold
distinct experts per column on the GPU too; Alloc-T adds no graph split; decode (T = 1) runs
as CUDA graphs. Run by scripts/gpu_check.sh on the device machine.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from allocmoe_edge.runtime import LoadChoice, llama_cpp_module, load

pytestmark = [pytest.mark.slow, pytest.mark.runtime, pytest.mark.gpu]

TOP1_MIN = 0.99  # top-1 agreement of GPU and CPU logits over a ubatch's positions


@pytest.fixture(scope="module")
def gpu() -> None:
    if not llama_cpp_module().llama_supports_gpu_offload():
        pytest.skip("needs a llama.cpp build with GPU offload")


@pytest.fixture(scope="module")
def dsv2_tiny(tmp_path_factory):
    """The 3-block DeepSeek-V2-Lite synth with uniform-split plans at 75/50/25 % (Alloc-T enabled, with
    decode thresholds)."""
    from allocmoe_edge.allocate import stamp_uniform_split
    from allocmoe_edge.synth import synthesize

    folder = tmp_path_factory.mktemp("dsv2")
    src = synthesize("deepseek-v2-lite", "q4_0", folder / "dsv2-3.gguf", n_layer=3)
    info = stamp_uniform_split(src, folder / "dsv2-3.plans.gguf", (0.75, 0.5, 0.25), decode_rule=True)
    return info


def _probe(info, ngl: int, tokens: list[int], alloc_t: bool, token_mode: str | None = None, cpu_moe: bool = False):
    from allocmoe_edge.graph_probe import moe_activations

    choice = LoadChoice(plan_index=1, token_k_max=None if alloc_t else 0, token_mode=token_mode)  # plan 1: 50 %
    llm = load(info.path, choice, info=info, n_gpu_layers=ngl, n_ctx=len(tokens), n_batch=len(tokens),
               n_ubatch=len(tokens), cpu_moe=cpu_moe)
    try:
        return moe_activations(llm, tokens)
    finally:
        llm.close()


@pytest.mark.parametrize("T", [8, 64, 512, 2048])
def test_alloc_t_gpu_matches_cpu_on_the_same_ubatch(gpu, dsv2_tiny, monkeypatch, T):
    monkeypatch.setenv("ALLOCMOE_GPU_ALLOC_T", "1")
    tokens = np.random.default_rng(T).integers(3, 102400, T).tolist()
    acts_cpu, cpu = _probe(dsv2_tiny, 0, tokens, alloc_t=True)
    acts_gpu, got = _probe(dsv2_tiny, 99, tokens, alloc_t=True)
    assert np.isfinite(got).all()
    top1 = float(np.mean(got.argmax(axis=1) == cpu.argmax(axis=1)))
    nmse = float(((got - cpu) ** 2).sum() / (cpu ** 2).sum())
    assert top1 >= TOP1_MIN and nmse < 1e-2, f"T={T}: top-1 agreement {top1:.4f}, NMSE {nmse:.2e}"
    for layer, a in acts_gpu.items():
        assert a["per_token"] is not None and sum(a["per_token"]) == a["pairs"]  # Alloc-T ran on the GPU
        assert all(len(set(col.tolist())) == len(col) for col in a["ids"]), f"layer {layer}: repeated expert"
    assert sorted(acts_gpu) == sorted(acts_cpu)


@pytest.mark.parametrize("T", [1, 4, 64, 512])
def test_decode_rule_gpu_matches_cpu(gpu, dsv2_tiny, monkeypatch, T):
    """The decode rule on every ubatch: T = 1 and 4 take mmvq, 64 and 512 the batched mmq path, each
    skipping the ids marked -1; the logits and the experts run match the CPU's."""
    monkeypatch.setenv("ALLOCMOE_GPU_ALLOC_T", "1")
    tokens = np.random.default_rng(T).integers(3, 102400, T).tolist()
    acts_cpu, cpu = _probe(dsv2_tiny, 0, tokens, alloc_t=True, token_mode="decode")
    acts_gpu, got = _probe(dsv2_tiny, 99, tokens, alloc_t=True, token_mode="decode")
    assert np.isfinite(got).all()
    top1 = float(np.mean(got.argmax(axis=1) == cpu.argmax(axis=1)))
    nmse = float(((got - cpu) ** 2).sum() / (cpu ** 2).sum())
    assert top1 >= TOP1_MIN and nmse < 1e-2, f"T={T}: top-1 agreement {top1:.4f}, NMSE {nmse:.2e}"
    for layer, a in acts_gpu.items():
        assert (a["ids"] < 0).any() or T == 1  # candidates were dropped
        assert abs(a["active"] - acts_cpu[layer]["active"]) <= max(1, 0.01 * a["active"]), (layer, a, acts_cpu[layer])


@pytest.mark.parametrize("T", [64, 512])
def test_cpu_moe_decode_rule_matches_cpu(gpu, dsv2_tiny, monkeypatch, T):
    """Routed experts in system memory (--cpu-moe) and the decode rule on a T-token ubatch: the GPU runs
    mul_mat_id on experts the scheduler copies from host memory, only the used ones, reading the ids on the
    host; it must skip the -1 ids (it asserted on them) and still match the CPU."""
    monkeypatch.setenv("ALLOCMOE_GPU_ALLOC_T", "1")
    tokens = np.random.default_rng(T + 1).integers(3, 102400, T).tolist()
    _, cpu = _probe(dsv2_tiny, 0, tokens, alloc_t=True, token_mode="decode")
    acts, got = _probe(dsv2_tiny, 99, tokens, alloc_t=True, token_mode="decode", cpu_moe=True)
    assert np.isfinite(got).all()
    assert any((a["ids"] < 0).any() for a in acts.values())  # the scheduler saw skipped ids
    top1 = float(np.mean(got.argmax(axis=1) == cpu.argmax(axis=1)))
    nmse = float(((got - cpu) ** 2).sum() / (cpu ** 2).sum())
    assert top1 >= TOP1_MIN and nmse < 1e-2, f"T={T}: top-1 agreement {top1:.4f}, NMSE {nmse:.2e}"


def _graph_log(capfd, info, alloc_t: bool) -> str:
    """llama.cpp's log of one load and a few decoded tokens (pp graph reserve and tg runs)."""
    choice = LoadChoice(plan_index=1, token_k_max=None if alloc_t else 0)
    capfd.readouterr()
    llm = load(info.path, choice, info=info, verbose=True, n_gpu_layers=99, n_ctx=640, n_batch=512, n_ubatch=512)
    try:
        llm.eval(list(range(10, 30)))  # one 20-token ubatch, then single tokens
        for t in range(30, 36):
            llm.eval([t])
    finally:
        llm.close()
    return capfd.readouterr().err


def test_alloc_t_adds_no_graph_split_and_decode_uses_cuda_graphs(gpu, dsv2_tiny, monkeypatch, capfd):
    monkeypatch.setenv("ALLOCMOE_GPU_ALLOC_T", "1")
    splits = {}
    for alloc_t in (False, True):
        log = _graph_log(capfd, dsv2_tiny, alloc_t)
        found = re.findall(r"splits = (\d+)(?: / (\d+))?", log)
        assert found, log[-2000:]
        splits[alloc_t] = found[-1]
        assert "CUDA graph warmup complete" in log or "CUDA Graph id" in log, "decode did not run as a CUDA graph"
        assert "disabling CUDA graphs" not in log
    assert splits[True] == splits[False], f"graph splits with Alloc-T {splits[True]} vs without {splits[False]}"


def _model_buffers(log: str) -> dict[str, float]:
    """MiB per buffer type from llama.cpp's "<type> model buffer size = X MiB" lines."""
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"(\S+) model buffer size = +([\d.]+) MiB", log)}


def test_cpu_moe_keeps_the_experts_in_system_memory(gpu, tmp_path, capfd):
    """--cpu-moe on a GPU build: the routed experts leave the GPU's buffer for a CPU one, the
    logits stay those of the fully offloaded model, and the runtime says where the experts are."""
    from allocmoe_edge.gguf_meta import read_info
    from allocmoe_edge.graph_probe import moe_activations
    from allocmoe_edge.placement import expert_placement
    from allocmoe_edge.synth import synthesize

    info = read_info(synthesize("qwen3-30b-a3b", "q4_0", tmp_path / "qwen3-2.gguf", n_layer=2))
    tokens = np.random.default_rng(1).integers(3, 151936, 64).tolist()
    logits, buffers = {}, {}
    for cpu_moe in (False, True):
        capfd.readouterr()
        llm = load(info.path, None, info=info, verbose=True, cpu_moe=cpu_moe, n_gpu_layers=99, n_ctx=64,
                   n_batch=64, n_ubatch=64)
        _, logits[cpu_moe] = moe_activations(llm, tokens)
        llm.close()
        log = capfd.readouterr().err
        buffers[cpu_moe] = _model_buffers(log)
    placement = expert_placement(info, cpu_moe=True)
    assert "stay in system memory" in log and placement["cpu_blocks"] == [0, 1]
    on_gpu = {k: sum(v for name, v in b.items() if name.startswith("CUDA")) for k, b in buffers.items()}
    expert_mib = placement["cpu_expert_bytes"] / 2**20
    assert abs((on_gpu[False] - on_gpu[True]) - expert_mib) < 0.05 * expert_mib, (buffers, placement)
    top1 = float(np.mean(logits[True].argmax(axis=1) == logits[False].argmax(axis=1)))
    assert top1 >= TOP1_MIN, f"--cpu-moe vs full offload: top-1 agreement {top1:.4f}"
