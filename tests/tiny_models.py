"""Tiny seeded random MoE models from transformers configs, for tests (no network).

``make_tiny_model(arch, seed)`` builds one in memory; ``save_tiny_model(arch, path, seed)``
writes it as a Hugging Face directory (config, safetensors, tokenizer). The default
tokenizer is a small byte-level BPE trained here; llama.cpp's converter only accepts BPE
tokenizers whose pre-tokenizer hash it knows, so for GGUF conversion pass ``vocab_gguf``
(llama.cpp's ``models/ggml-vocab-gpt-2.gguf``) to get the exact GPT-2 tokenizer instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")

_COMMON: dict[str, Any] = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=None,
)
_DEEPSEEK: dict[str, Any] = dict(
    num_hidden_layers=4,
    num_key_value_heads=4,  # multi-head latent attention: one KV head per head
    intermediate_size=96,
    moe_intermediate_size=32,
    n_routed_experts=8,
    num_experts_per_tok=3,
    n_shared_experts=1,
    first_k_dense_replace=1,
    kv_lora_rank=16,
    q_lora_rank=32,  # llama.cpp takes only 26/27-layer DeepSeek-V2 models for Lite (no q_lora)
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
)
_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", dict(num_hidden_layers=3, intermediate_size=32, num_local_experts=6,
                                      num_experts_per_tok=3)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_hidden_layers=3, intermediate_size=64, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=3,
                                         norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_hidden_layers=3, head_dim=16, intermediate_size=64,
                                         moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                                         norm_topk_prob=True)),
    # llama.cpp's OLMoE graph normalises K over all heads, so no GQA here (as in the real model)
    "olmoe": ("OlmoeConfig", dict(num_hidden_layers=3, num_key_value_heads=4, intermediate_size=32, num_experts=8,
                                  num_experts_per_tok=2, norm_topk_prob=False)),
    # greedy softmax routing, scaled, not renormalised (the routing of DeepSeek-V2-Lite)
    "deepseek_v2": ("DeepseekV2Config", dict(_DEEPSEEK, topk_method="greedy", n_group=1,
                                             topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.5)),
    # sigmoid scores with selection bias, group-limited (top-2 sum), renormalised and scaled; the
    # scoring_func / topk_method keys of the real config.json tell llama.cpp's converter "sigmoid"
    "deepseek_v3": ("DeepseekV3Config", dict(_DEEPSEEK, n_group=2, topk_group=1, norm_topk_prob=True,
                                             routed_scaling_factor=2.5, scoring_func="sigmoid",
                                             topk_method="noaux_tc")),
}

DEFAULT_VOCAB = 320
_TRAIN_TEXT = (
    "The quick brown fox jumps over the lazy dog. A mixture of experts routes every token to a few "
    "of its experts; a budget decides how many. Sphinx of black quartz, judge my vow! 0123456789 "
) * 4


def make_tiny_model(arch: str, seed: int = 0, vocab_size: int = DEFAULT_VOCAB, **overrides: Any) -> torch.nn.Module:
    """A seeded random causal LM of architecture ``arch`` (one of ``ARCHS``), float32, in eval mode.

    ``overrides`` replace entries of the tiny config (e.g. ``topk_method="group_limited_greedy"``).
    Router weights are drawn with a larger scale than the default init (and DeepSeek-V3's
    selection bias is random) so that routing is decisive and free of ties.
    """
    import transformers

    if arch not in _CONFIGS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {', '.join(ARCHS)}")
    config_cls, kwargs = _CONFIGS[arch]
    config = getattr(transformers, config_cls)(vocab_size=vocab_size, **{**_COMMON, **kwargs, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
            elif "experts" in name or "shared_expert" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=gen) * 0.1)
    return model.eval()


def _train_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE of ``vocab_size`` entries trained on a fixed sentence, as a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TRAIN_TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def _gpt2_tokenizer(vocab_gguf: Path) -> Any:
    """The GPT-2 tokenizer rebuilt from a llama.cpp vocab-only GGUF (tokens and merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from allocmoe_edge.gguf_scan import scan

    header = scan(vocab_gguf)
    tokens = header.contents("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ")) for m in header.contents("tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def save_tiny_model(arch: str, path: str | Path, seed: int = 0, vocab_gguf: str | Path | None = None) -> Path:
    """Write a tiny random ``arch`` model with its tokenizer to ``path``; return ``path``."""
    path = Path(path)
    tokenizer = _gpt2_tokenizer(Path(vocab_gguf)) if vocab_gguf else _train_tokenizer(DEFAULT_VOCAB)
    model = make_tiny_model(arch, seed, vocab_size=len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
