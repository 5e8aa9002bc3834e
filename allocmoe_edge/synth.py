"""Weightless GGUFs: real MoE shapes and metadata with random quantized weights, for speed tests.

A synthetic file has the tensor names, shapes and the metadata keys that llama.cpp's loader
reads for the architecture (as the pinned converter writes them), random weights (valid
q4_0/q8_0 blocks with a small fp16 scale, so every value is finite) and a minimal SPM
vocabulary (specials, 256 byte tokens, fillers). It says what it is: ``general.name``
starts with "synthetic" and ``allocmoe.synthetic`` is true; quality numbers on it are
meaningless (`is_synthetic`). Tensors are streamed in chunks, so memory stays small even
for Mixtral-8x7B.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .errors import AllocMoeError
from .fsutil import atomic_output
from .gguf_meta import GgufModelInfo, Keys, read_header

NAME_PREFIX = "synthetic"
QUANT_TYPES = ("q4_0", "q8_0")
_CHUNK_BYTES = 16 << 20


@dataclass(frozen=True)
class MLA:
    """DeepSeek-V2 multi-head latent attention (without a q low-rank projection)."""

    kv_lora_rank: int
    qk_nope: int
    qk_rope: int
    v_head: int


@dataclass(frozen=True)
class Shape:
    """The parts of a model's config that decide its tensor shapes and loader keys."""

    title: str
    arch: str  # llama.cpp architecture name
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_vocab: int
    n_ctx: int
    rope_theta: float
    rms_eps: float
    n_ff: int  # dense FFN width (leading dense layers; the converter writes it as feed_forward_length)
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    n_ff_shexp: int = 0  # shared-expert width (0: none)
    shexp_gate: bool = False  # Qwen2-MoE: a sigmoid gate on the shared expert
    n_dense_lead: int = 0  # leading dense blocks (DeepSeek)
    qkv_bias: bool = False
    qk_norm: str = ""  # RMS norms on q and k: "proj" over the whole projection (OLMoE), "head" per head (Qwen3)
    n_head_dim: int = 0  # attention head width when it is not n_embd / n_head (Qwen3: written as key/value_length)
    mla: MLA | None = None

    @property
    def head_dim(self) -> int:
        return self.n_head_dim or self.n_embd // self.n_head


SHAPES: dict[str, Shape] = {
    "olmoe-1b-7b": Shape("OLMoE-1B-7B", "olmoe", n_layer=16, n_embd=2048, n_head=16, n_head_kv=16, n_vocab=50304,
                         n_ctx=4096, rope_theta=10000.0, rms_eps=1e-5, n_ff=1024, n_expert=64, n_expert_used=8,
                         n_ff_exp=1024, qk_norm="proj"),
    "qwen1.5-moe-a2.7b": Shape("Qwen1.5-MoE-A2.7B", "qwen2moe", n_layer=24, n_embd=2048, n_head=16, n_head_kv=16,
                               n_vocab=151936, n_ctx=8192, rope_theta=1e6, rms_eps=1e-6, n_ff=5632, n_expert=60,
                               n_expert_used=4, n_ff_exp=1408, n_ff_shexp=5632, shexp_gate=True, qkv_bias=True),
    "deepseek-v2-lite": Shape("DeepSeek-V2-Lite", "deepseek2", n_layer=27, n_embd=2048, n_head=16, n_head_kv=1,
                              n_vocab=102400, n_ctx=163840, rope_theta=10000.0, rms_eps=1e-6, n_ff=10944,
                              n_expert=64, n_expert_used=6, n_ff_exp=1408, n_ff_shexp=2 * 1408, n_dense_lead=1,
                              mla=MLA(kv_lora_rank=512, qk_nope=128, qk_rope=64, v_head=128)),
    "qwen3-30b-a3b": Shape("Qwen3-30B-A3B", "qwen3moe", n_layer=48, n_embd=2048, n_head=32, n_head_kv=4,
                           n_vocab=151936, n_ctx=40960, rope_theta=1e6, rms_eps=1e-6, n_ff=6144, n_expert=128,
                           n_expert_used=8, n_ff_exp=768, qk_norm="head", n_head_dim=128),
    "mixtral-8x7b": Shape("Mixtral-8x7B", "llama", n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_vocab=32000,
                          n_ctx=32768, rope_theta=1e6, rms_eps=1e-5, n_ff=14336, n_expert=8, n_expert_used=2,
                          n_ff_exp=14336),
}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor: GGUF name, dims in ggml order (ne0 = row length first), and how to fill it.

    kind: "weight" (quantized, random), "router" / "bias" (f32, random), "norm" (f32, ones).
    """

    name: str
    dims: tuple[int, ...]
    kind: str = "weight"


def tensor_specs(shape: Shape, n_layer: int) -> list[TensorSpec]:
    """Every tensor of ``shape`` truncated to ``n_layer`` blocks, as llama.cpp's loader expects them."""
    s, e = shape, shape.n_embd
    specs = [TensorSpec("token_embd.weight", (e, s.n_vocab)), TensorSpec("output_norm.weight", (e,), "norm"),
             TensorSpec("output.weight", (e, s.n_vocab))]
    for i in range(n_layer):
        b = f"blk.{i}."
        specs.append(TensorSpec(b + "attn_norm.weight", (e,), "norm"))
        if s.mla:
            m = s.mla
            specs += [TensorSpec(b + "attn_q.weight", (e, s.n_head * (m.qk_nope + m.qk_rope))),
                      TensorSpec(b + "attn_kv_a_mqa.weight", (e, m.kv_lora_rank + m.qk_rope)),
                      TensorSpec(b + "attn_kv_a_norm.weight", (m.kv_lora_rank,), "norm"),
                      TensorSpec(b + "attn_k_b.weight", (m.qk_nope, m.kv_lora_rank, s.n_head)),
                      TensorSpec(b + "attn_v_b.weight", (m.kv_lora_rank, m.v_head, s.n_head)),
                      TensorSpec(b + "attn_output.weight", (s.n_head * m.v_head, e))]
        else:
            q, kv = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
            for name, width in (("attn_q", q), ("attn_k", kv), ("attn_v", kv)):
                specs.append(TensorSpec(f"{b}{name}.weight", (e, width)))
                if s.qkv_bias:
                    specs.append(TensorSpec(f"{b}{name}.bias", (width,), "bias"))
            specs.append(TensorSpec(b + "attn_output.weight", (q, e)))
            if s.qk_norm:
                q_norm, k_norm = (s.head_dim, s.head_dim) if s.qk_norm == "head" else (q, kv)
                specs += [TensorSpec(b + "attn_q_norm.weight", (q_norm,), "norm"),
                          TensorSpec(b + "attn_k_norm.weight", (k_norm,), "norm")]
        specs.append(TensorSpec(b + "ffn_norm.weight", (e,), "norm"))
        if i < s.n_dense_lead:
            specs += _ffn(b, "", e, s.n_ff)
            continue
        specs.append(TensorSpec(b + "ffn_gate_inp.weight", (e, s.n_expert), "router"))
        specs += _ffn(b, "_exps", e, s.n_ff_exp, s.n_expert)
        if s.n_ff_shexp:
            specs += _ffn(b, "_shexp", e, s.n_ff_shexp)
        if s.shexp_gate:
            specs.append(TensorSpec(b + "ffn_gate_inp_shexp.weight", (e,), "router"))
    return specs


def _ffn(prefix: str, suffix: str, n_embd: int, n_ff: int, *n_expert: int) -> list[TensorSpec]:
    return [TensorSpec(f"{prefix}ffn_gate{suffix}.weight", (n_embd, n_ff, *n_expert)),
            TensorSpec(f"{prefix}ffn_down{suffix}.weight", (n_ff, n_embd, *n_expert)),
            TensorSpec(f"{prefix}ffn_up{suffix}.weight", (n_embd, n_ff, *n_expert))]


def _metadata(w: Any, shape: Shape, n_layer: int, qtype: str) -> None:
    """The keys the pinned converter writes for this architecture (only those the loader reads)."""
    import gguf

    s = shape
    w.add_name(f"{NAME_PREFIX} {s.title} (random weights, {n_layer} layers)")
    w.add_bool(Keys.SYNTHETIC, True)
    w.add_block_count(n_layer)
    w.add_context_length(s.n_ctx)
    w.add_embedding_length(s.n_embd)
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_head_kv)
    w.add_rope_freq_base(s.rope_theta)
    w.add_layer_norm_rms_eps(s.rms_eps)
    w.add_expert_count(s.n_expert)
    w.add_expert_used_count(s.n_expert_used)
    if s.arch in ("qwen2moe", "qwen3moe", "deepseek2"):
        w.add_expert_feed_forward_length(s.n_ff_exp)
    if s.n_head_dim:
        w.add_key_length(s.n_head_dim)
        w.add_value_length(s.n_head_dim)
    if s.arch == "qwen2moe":
        w.add_expert_shared_feed_forward_length(s.n_ff_shexp)
    if s.arch in ("llama", "deepseek2"):
        w.add_vocab_size(s.n_vocab)
    if s.arch == "llama":
        w.add_rope_dimension_count(s.head_dim)
    if s.mla:
        m = s.mla
        w.add_leading_dense_block_count(min(s.n_dense_lead, n_layer))
        # llama.cpp reads q_lora_rank unless the layer count is a known "Lite" one (27 or 26);
        # 0 (no q projection) keeps a truncated Lite file loadable and changes nothing else
        w.add_q_lora_rank(0)
        w.add_kv_lora_rank(m.kv_lora_rank)
        w.add_key_length(m.kv_lora_rank + m.qk_rope)
        w.add_value_length(m.kv_lora_rank)
        w.add_key_length_mla(m.qk_nope + m.qk_rope)
        w.add_value_length_mla(m.v_head)
        w.add_expert_shared_count(s.n_ff_shexp // s.n_ff_exp)
        w.add_expert_weights_scale(1.0)
        w.add_rope_dimension_count(m.qk_rope)
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(40.0)
        w.add_rope_scaling_orig_ctx_len(4096)
        w.add_rope_scaling_yarn_beta_fast(32.0)
        w.add_rope_scaling_yarn_beta_slow(1.0)
        w.add_rope_scaling_yarn_log_mul(0.1 * 0.707)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0 if qtype == "q4_0" else gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _vocab(w, s.n_vocab)


def _vocab(w: Any, n_vocab: int) -> None:
    """A minimal SPM vocabulary of ``n_vocab`` tokens: <unk> <s> </s>, 256 byte tokens, fillers."""
    import gguf

    T = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL] + [T.BYTE] * 256
    if n_vocab < len(tokens):
        raise AllocMoeError(f"vocabulary of {n_vocab} tokens is too small for the byte tokens")
    n_fill = n_vocab - len(tokens)
    tokens += [f"<synth{i}>" for i in range(n_fill)]
    types += [T.UNUSED] * n_fill
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 3 + [-float(i) for i in range(n_vocab - 3)])
    w.add_token_types([int(t) for t in types])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)


class _RandomQuant:
    """Random quantized blocks with one fp16 scale per tensor, written in chunks.

    Duck-types the ndarray that ``GGUFWriter.write_tensor_data`` expects (``nbytes``,
    ``tofile``), so a multi-GB expert tensor never sits in memory. The scale gives every
    weight a standard deviation of about 1/sqrt(row length), so activations stay finite.
    """

    def __init__(self, dims: tuple[int, ...], qtype: Any, rng: np.random.Generator) -> None:
        import gguf

        block, self.block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        if dims[0] % block:
            raise AllocMoeError(f"row length {dims[0]} is not a multiple of the {qtype.name} block ({block})")
        self.n_blocks = int(np.prod(dims)) // block
        self.nbytes = self.n_blocks * self.block_bytes
        q_sd = 4.61 if qtype == gguf.GGMLQuantizationType.Q4_0 else 73.9  # sd of uniform nibbles / int8
        self.scale = np.array([1.0 / (np.sqrt(dims[0]) * q_sd)], dtype=np.float16).view(np.uint8)
        self.rng = rng

    def tofile(self, f: BinaryIO) -> None:
        per_chunk = max(1, _CHUNK_BYTES // self.block_bytes)
        for start in range(0, self.n_blocks, per_chunk):
            n = min(per_chunk, self.n_blocks - start)
            blocks = self.rng.integers(0, 256, size=(n, self.block_bytes), dtype=np.uint8)
            blocks[:, :2] = self.scale
            blocks.tofile(f)


class _Hole:
    """A tensor's bytes left unwritten: the writer seeks past them, so the file holds a hole (sparse on
    disk, zeros when read). For llama.cpp's metadata-only loads (`reserve.measure`), which read no weight."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes

    def tofile(self, f: BinaryIO) -> None:
        if self.nbytes:
            f.seek(self.nbytes - 1, os.SEEK_CUR)
            f.write(b"\0")  # the file's length reaches the tensor's end even when it is the last one


def _f32(spec: TensorSpec, rng: np.random.Generator) -> np.ndarray:
    shape = tuple(reversed(spec.dims))
    if spec.kind == "norm":
        return np.ones(shape, dtype=np.float32)
    scale = 1.0 if spec.kind == "router" else 0.02
    return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)


def synthesize(shape_name: str, qtype: str, output: str | os.PathLike[str], n_layer: int | None = None,
               seed: int = 0, progress: Callable[[int, int], None] | None = None, weights: bool = True) -> Path:
    """Write a synthetic GGUF of ``shape_name`` with ``qtype`` weights to ``output`` (atomically).

    ``weights=False`` leaves the quantized weights unwritten (a sparse file of the full size whose weights
    read as zeros): enough for metadata-only loads, not for running the model."""
    import gguf

    if shape_name not in SHAPES:
        raise AllocMoeError(f"unknown shape {shape_name!r}; choose one of {', '.join(SHAPES)}")
    if qtype not in QUANT_TYPES:
        raise AllocMoeError(f"unknown type {qtype!r}; choose q4_0 or q8_0")
    shape = SHAPES[shape_name]
    n_layer = shape.n_layer if n_layer is None else n_layer
    if not shape.n_dense_lead < n_layer <= shape.n_layer:
        raise AllocMoeError(f"--layers {n_layer}: {shape.title} needs {shape.n_dense_lead + 1}..{shape.n_layer} layers")
    gtype = gguf.GGMLQuantizationType.Q4_0 if qtype == "q4_0" else gguf.GGMLQuantizationType.Q8_0
    rng = np.random.default_rng(seed)
    specs = tensor_specs(shape, n_layer)
    data: list[Any] = [_f32(s, rng) if s.kind != "weight" else _RandomQuant(s.dims, gtype, rng) for s in specs]
    if not weights:
        data = [_Hole(d.nbytes) if isinstance(d, _RandomQuant) else d for d in data]
    total = sum(int(d.nbytes) for d in data)
    out = Path(output)
    with atomic_output(out) as tmp:
        w = gguf.GGUFWriter(tmp, shape.arch)
        _metadata(w, shape, n_layer, qtype)
        for spec, d in zip(specs, data):
            raw = gtype if spec.kind == "weight" else None
            w.add_tensor_info(spec.name, tuple(reversed(spec.dims)), np.dtype(np.float32), int(d.nbytes), raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        done = 0
        for d in data:
            w.write_tensor_data(d)
            done += int(d.nbytes)
            if progress:
                progress(done, total)
        w.close()
    return out


def is_synthetic(info: GgufModelInfo) -> bool:
    """True for a file made by `synthesize` (random weights: no quality numbers on it).

    Checks ``allocmoe.synthetic`` and, because stamping a copy may drop allocmoe.* keys,
    also whether ``general.name`` starts with "synthetic".
    """
    if info.meta.synthetic:
        return True
    import gguf

    return str(read_header(info.path).get(gguf.Keys.General.NAME, "")).lower().startswith(NAME_PREFIX)
