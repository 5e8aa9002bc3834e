"""Routed experts in system memory (llama.cpp's --cpu-moe / --n-cpu-moe): the overrides and the
placement report, the CLI flags, the bindings patch's tensor_buft_overrides, and bit-identical
logits on a CPU-only build."""

from __future__ import annotations

import json
import re
import types
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from allocmoe_edge import runtime
from allocmoe_edge.cli import cli
from allocmoe_edge.errors import AllocMoeError
from allocmoe_edge.gguf_meta import read_info
from allocmoe_edge.placement import EXPERT_TENSOR_REGEX, cpu_moe_overrides, expert_placement
from allocmoe_edge.runtime import load

from .llama_logits import llama_logits, tokens_for

EXPERT_BYTES = 3 * 4 * 8 * 16 * 4  # gate, up, down: 4 experts of 8 x 16 f32 values in every MoE block


def _write_moe_with_experts(path: Path) -> Path:
    """Block 0 dense, blocks 1-3 MoE with routed experts (f32) and a shared expert that must not count."""
    w = gguf.GGUFWriter(path, "qwen2moe")
    w.add_block_count(4)
    w.add_expert_count(4)
    w.add_expert_used_count(2)
    w.add_tensor("blk.0.ffn_up.weight", np.zeros((16, 8), dtype=np.float32))
    for i in range(1, 4):
        w.add_tensor(f"blk.{i}.ffn_gate_inp.weight", np.zeros((4, 8), dtype=np.float32))
        for part in ("gate", "up", "down"):
            w.add_tensor(f"blk.{i}.ffn_{part}_exps.weight", np.zeros((4, 8, 16), dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_up_shexp.weight", np.zeros((8, 16), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def moe_file(tmp_path):
    return _write_moe_with_experts(tmp_path / "moe.gguf")


def test_overrides_are_llama_cpps_patterns(moe_file):
    info = read_info(moe_file)
    assert cpu_moe_overrides(info) == []
    assert cpu_moe_overrides(info, cpu_moe=True) == [(EXPERT_TENSOR_REGEX, "CPU")]
    overrides = cpu_moe_overrides(info, n_cpu_moe=3)  # block 0 has no experts
    assert [p for p, _ in overrides] == [rf"blk\.1{EXPERT_TENSOR_REGEX}", rf"blk\.2{EXPERT_TENSOR_REGEX}"]
    block1 = re.compile(overrides[0][0])
    for name in ("blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_exps.weight", "blk.1.ffn_down_exps.weight",
                 "blk.1.ffn_gate_up_exps.weight", "blk.1.ffn_down_chexps.weight"):
        assert block1.search(name), name
    for name in ("blk.10.ffn_up_exps.weight", "blk.1.ffn_up_shexp.weight", "blk.1.ffn_gate_inp.weight",
                 "blk.1.ffn_up.weight", "blk.2.ffn_up_exps.weight"):
        assert not block1.search(name), name
    with pytest.raises(AllocMoeError, match="--n-cpu-moe -1 must be >= 0"):
        cpu_moe_overrides(info, n_cpu_moe=-1)


def test_placement_counts_routed_expert_bytes_only(moe_file):
    info = read_info(moe_file)
    some = expert_placement(info, n_cpu_moe=3)
    assert some == {"cpu_moe": False, "n_cpu_moe": 3, "cpu_blocks": [1, 2], "moe_blocks": 3,
                    "cpu_expert_bytes": 2 * EXPERT_BYTES, "expert_bytes": 3 * EXPERT_BYTES}
    assert json.loads(json.dumps(some)) == some
    assert expert_placement(info, cpu_moe=True)["cpu_expert_bytes"] == 3 * EXPERT_BYTES
    assert expert_placement(info)["cpu_blocks"] == []


def test_inspect_shows_the_placement(moe_file):
    out = CliRunner().invoke(cli, ["inspect", str(moe_file), "--n-cpu-moe", "3"])
    assert out.exit_code == 0, out.output
    assert "routed experts of 2 of 3 MoE blocks (1-2) stay in system memory: 0.0 of 0.0 MiB" in out.output
    out = CliRunner().invoke(cli, ["inspect", str(moe_file), "--cpu-moe", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["expert_placement"]["cpu_blocks"] == [1, 2, 3]
    out = CliRunner().invoke(cli, ["inspect", str(moe_file), "--json"])
    assert "expert_placement" not in json.loads(out.output)
    out = CliRunner().invoke(cli, ["inspect", str(moe_file), "--n-cpu-moe", "-1"])
    assert out.exit_code == 2 and "-1 is not in the range x>=0" in out.output


class _Loaded(Exception):
    """Raised by a stand-in load once it has seen its arguments."""


@pytest.mark.parametrize("command", ["run", "eval"])
def test_run_and_eval_hand_the_flags_to_the_load(moe_file, tmp_path, monkeypatch, command):
    """-ngl, --cpu-moe and --n-cpu-moe reach `runtime.load` (run) and `evaluate_llama` (eval) unchanged;
    without them nothing stays back in system memory."""
    import allocmoe_edge.evaluate

    seen = []

    def fake_load(*args, **kwargs):
        seen.append((kwargs["n_gpu_layers"], kwargs["cpu_moe"], kwargs["n_cpu_moe"]))
        raise _Loaded

    monkeypatch.setattr(runtime, "load", fake_load)
    monkeypatch.setattr(allocmoe_edge.evaluate, "evaluate_llama", fake_load)
    text = tmp_path / "heldout.txt"
    text.write_text("Blessed are the meek.")
    args = {"run": ["-p", "hi"], "eval": ["--text", str(text)]}[command]
    for flags in (["-ngl", "99", "--cpu-moe"], ["-ngl", "99", "--n-cpu-moe", "2"], []):
        out = CliRunner().invoke(cli, [command, str(moe_file), *args, *flags])
        assert isinstance(out.exception, _Loaded), out.output
    assert seen == [(99, True, 0), (99, False, 2), (0, False, 0)]


def test_torch_eval_refuses_the_flags(tmp_path):
    text = tmp_path / "heldout.txt"
    text.write_text("Blessed are the meek.")
    for flags in (["--cpu-moe"], ["--n-cpu-moe", "1"]):
        out = CliRunner().invoke(cli, ["eval", str(tmp_path), "--text", str(text), "--backend", "torch", *flags])
        assert isinstance(out.exception, AllocMoeError), out.output
        assert str(out.exception) == "--cpu-moe, --n-cpu-moe and --peers are for the llama backend"


class _StockLlama:
    """Stands in for an unpatched ``llama_cpp.Llama`` (no tensor_buft_overrides keyword)."""

    def __init__(self, model_path: str, *, kv_overrides=None, verbose: bool = True, n_ctx: int = 512,
                 **kwargs) -> None:
        self.kwargs = kwargs


def _stock_bindings(monkeypatch) -> None:
    stock = types.SimpleNamespace(Llama=_StockLlama, llama_supports_gpu_offload=lambda: False)
    monkeypatch.setattr(runtime, "llama_cpp_module", lambda: stock)
    monkeypatch.setattr(runtime, "install_log", lambda force=False: None)


def test_stock_bindings_load_without_the_flags_and_refuse_them(moe_file, monkeypatch):
    _stock_bindings(monkeypatch)
    assert load(moe_file).kwargs == {}  # nothing new is passed when the flags are unused
    with pytest.raises(AllocMoeError, match=r"lacks; run `allocmoe build-runtime`"):
        load(moe_file, cpu_moe=True)


@pytest.mark.runtime
def test_cpu_maps_to_the_cpu_buffer_type_and_unknown_names_fail(patched_runtime, moe_file):
    llama_cpp = runtime.llama_cpp_module()
    cpu = llama_cpp.llama_cpp._lib.ggml_backend_cpu_buffer_type
    cpu.restype = llama_cpp.llama_cpp.ctypes.c_void_p
    # llama.cpp compares an override's buffer type with this pointer to keep CPU repacking
    assert llama_cpp.llama_cpp.ggml_backend_buffer_types()["CPU"] == cpu()
    with pytest.raises(ValueError, match=r"Unknown buffer type 'VRAM' for tensor pattern 'x'; available: .*CPU"):
        llama_cpp.Llama(str(moe_file), tensor_buft_overrides=[("x", "VRAM")], verbose=False)


@pytest.mark.slow
@pytest.mark.runtime
def test_cpu_moe_is_a_no_op_on_a_cpu_build(patched_runtime, tiny_gguf, capfd):
    if runtime.llama_cpp_module().llama_supports_gpu_offload():
        pytest.skip("a build with GPU offload places experts differently with the flags")
    _, path = tiny_gguf("qwen3_moe")  # 3 MoE blocks
    tokens = tokens_for(50000)
    plain = llama_logits(path, tokens)
    capfd.readouterr()
    for flags, moved in (({"cpu_moe": True}, 9), ({"n_cpu_moe": 2}, 6)):
        assert np.array_equal(plain, llama_logits(path, tokens, verbose=True, **flags)), flags
        # the overrides reached llama.cpp's loader: one line per matched expert tensor
        log = capfd.readouterr().err
        assert len(re.findall(r"ffn_(gate|up|down)_exps\.weight .* buffer type overridden to CPU", log)) == moved, flags
