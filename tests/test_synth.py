"""Synthetic GGUFs: every shape truncated to 2 blocks has the real tensor shapes and MoE metadata,
valid finite quantized weights, the synthetic label; OLMoE and Qwen3-MoE run in the patched runtime."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from allocmoe_edge.cli import cli
from allocmoe_edge.errors import AllocMoeError
from allocmoe_edge.gguf_meta import read_header, read_info
from allocmoe_edge.synth import SHAPES, is_synthetic, synthesize

from .ggufs import write_fake_moe

# q4_0 files of 2 blocks: 0.5 GB (OLMoE) to 1.7 GB (Mixtral) each, so the big ones are slow
SHAPE_PARAMS = [pytest.param(name, marks=[] if name == "olmoe-1b-7b" else [pytest.mark.slow]) for name in SHAPES]


def _dims(path, name: str) -> tuple[int, ...]:
    return next(t.shape for t in read_header(path).tensors if t.name == name)


@pytest.fixture(scope="module")
def two_blocks(tmp_path_factory):
    """``two_blocks(shape) -> path``: the shape's q4_0 synth truncated to 2 blocks, made once per module."""
    folder = tmp_path_factory.mktemp("two-blocks")
    made = {}

    def make(name: str):
        if name not in made:
            made[name] = synthesize(name, "q4_0", folder / f"{name}.gguf", n_layer=2)
        return made[name]

    return make


@pytest.mark.parametrize("name", SHAPE_PARAMS)
def test_shape_and_metadata(two_blocks, name):
    s = SHAPES[name]
    path = two_blocks(name)
    info = read_info(path)
    assert (info.architecture, info.block_count) == (s.arch, 2)
    assert (info.expert_count, info.expert_used_count) == (s.n_expert, s.n_expert_used)
    assert info.moe_layers == list(range(s.n_dense_lead, 2))
    assert info.file_type == "MOSTLY_Q4_0" and is_synthetic(info)
    assert _dims(path, "token_embd.weight") == (s.n_embd, s.n_vocab)
    assert _dims(path, "blk.1.ffn_gate_exps.weight") == (s.n_embd, s.n_ff_exp, s.n_expert)
    assert _dims(path, "blk.1.ffn_down_exps.weight") == (s.n_ff_exp, s.n_embd, s.n_expert)
    assert read_header(path).fields["tokenizer.ggml.tokens"].value.count == s.n_vocab
    if s.n_ff_shexp:
        assert _dims(path, "blk.1.ffn_up_shexp.weight") == (s.n_embd, s.n_ff_shexp)
    if s.n_dense_lead:
        assert _dims(path, "blk.0.ffn_up.weight") == (s.n_embd, s.n_ff)
    if not s.mla:  # attention is n_head x head_dim wide, which is n_embd except for Qwen3
        q, kv = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
        assert _dims(path, "blk.1.attn_q.weight") == (s.n_embd, q)
        assert _dims(path, "blk.1.attn_k.weight") == _dims(path, "blk.1.attn_v.weight") == (s.n_embd, kv)
        assert _dims(path, "blk.1.attn_output.weight") == (q, s.n_embd)


@pytest.mark.slow
def test_qwen3_moe_attention_is_wider_than_the_embedding(two_blocks):
    path = two_blocks("qwen3-30b-a3b")
    assert _dims(path, "blk.0.attn_q.weight") == (2048, 32 * 128)
    assert _dims(path, "blk.0.attn_k.weight") == (2048, 4 * 128)
    assert _dims(path, "blk.0.attn_q_norm.weight") == _dims(path, "blk.0.attn_k_norm.weight") == (128,)
    assert _dims(path, "blk.1.ffn_up_exps.weight") == (2048, 768, 128)
    header = read_header(path)
    for key, value in (("attention.key_length", 128), ("attention.value_length", 128),
                       ("expert_feed_forward_length", 768), ("context_length", 40960), ("rope.freq_base", 1e6)):
        assert header.get(f"qwen3moe.{key}") == value, key


def test_olmoe_cli_weights_are_finite_and_scaled(olmoe_q8):
    reader = gguf.GGUFReader(olmoe_q8)
    t = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
    w = gguf.quants.dequantize(t.data, t.tensor_type)
    assert np.isfinite(w).all()
    # the scale targets sd = 1/sqrt(row length)
    assert w.std() == pytest.approx(1 / np.sqrt(2048), rel=0.05)
    router = next(t for t in reader.tensors if t.name == "blk.0.ffn_gate_inp.weight")
    assert router.tensor_type == gguf.GGMLQuantizationType.F32 and np.asarray(router.data).std() > 0.5


def test_not_synthetic_and_bad_layer_count(tmp_path):
    assert not is_synthetic(read_info(write_fake_moe(tmp_path / "f.gguf")))
    with pytest.raises(AllocMoeError, match="needs 2..27 layers"):
        synthesize("deepseek-v2-lite", "q4_0", tmp_path / "d.gguf", n_layer=1)
    with pytest.raises(AllocMoeError, match="unknown shape"):
        synthesize("gpt-5", "q4_0", tmp_path / "x.gguf")
    assert not (tmp_path / "d.gguf").exists()


@pytest.fixture(scope="module")
def olmoe_q8(tmp_path_factory):
    """OLMoE shape, 2 blocks, q8_0, made through the CLI."""
    path = tmp_path_factory.mktemp("synth") / "olmoe-q8.gguf"
    out = CliRunner().invoke(cli, ["synth", "--shape", "olmoe-1b-7b", "--type", "q8_0", "--layers", "2", "-o",
                                   str(path)])
    assert out.exit_code == 0, out.output
    assert "2 MoE layers x 64 experts (top-8)" in out.output
    return path


def _decodes_finite_logits(path, n_vocab: int, counts: list[int]) -> None:
    """Load ``path`` in the patched runtime, check its vocabulary and per-layer counts, decode 3 tokens."""
    from allocmoe_edge.runtime import layer_counts, load

    llm = load(path, n_ctx=64, logits_all=True)
    try:
        assert llm.n_vocab() == n_vocab and layer_counts(llm) == counts
        llm.eval([1, 300, 301, 302])
        generated = []
        for _ in range(3):
            logits = np.asarray(llm.scores[llm.n_tokens - 1])
            assert np.isfinite(logits).all() and logits.std() > 0
            generated.append(int(np.argmax(logits)))
            llm.eval(generated[-1:])
        assert llm.n_tokens == 7
    finally:
        llm.close()


@pytest.mark.runtime
def test_olmoe_loads_and_decodes(patched_runtime, olmoe_q8):
    _decodes_finite_logits(olmoe_q8, 50304, [8, 8])


@pytest.mark.slow
@pytest.mark.runtime
def test_qwen3_moe_loads_and_decodes(patched_runtime, two_blocks):
    # the loader checks every tensor's shape against the metadata: a wrong width is a load error
    _decodes_finite_logits(two_blocks("qwen3-30b-a3b"), 151936, [8, 8])
