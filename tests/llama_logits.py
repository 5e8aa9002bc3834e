"""Logits from llama.cpp (patched runtime) and from transformers for the same tokens."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# ALLOCMOE_TEST_NGL=99 runs the llama.cpp side on the GPU (the device check does this).
NGL = int(os.environ.get("ALLOCMOE_TEST_NGL", "0"))
# Relative tolerance of llama.cpp logits against transformers' f32 logits. On the CPU: f32
# weights, f32 KV cache, no flash attention; the residual is summation order, ~1e-6 of the
# largest logit. CUDA's f32 matmuls may use TF32 tensor cores (10-bit mantissa), ~1e-3.
# Either bound is far below what one wrongly chosen expert does here (~1e-1, checked per test).
RTOL = 1e-4 if NGL == 0 else 1e-2


def load_for_test(path: Path, choice=None, **kw):
    """``runtime.load`` on the CPU, or fully offloaded when ALLOCMOE_TEST_NGL is set."""
    from allocmoe_edge.runtime import load

    return load(path, choice, n_gpu_layers=NGL, **kw)


def tokens_for(vocab: int, n: int = 24, seed: int = 0) -> list[int]:
    """A fixed random token sequence."""
    return np.random.default_rng(seed).integers(1, vocab, size=n).tolist()


def llama_logits(path: Path, tokens: Sequence[int], choice=None, **kw) -> np.ndarray:
    """All-position logits from llama.cpp for ``tokens`` evaluated as one ubatch."""
    llm = load_for_test(path, choice, logits_all=True, n_ctx=max(64, len(tokens)), n_batch=512, n_threads=2,
               type_k=0, type_v=0, **kw)  # f32 KV cache, as transformers computes attention in f32
    llm.eval(list(tokens))
    out = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    llm.close()
    return out


def torch_logits(hf_dir: Path, tokens: Sequence[int], counts: Sequence[int] | None = None,
                 alloc_t: dict | None = None) -> np.ndarray:
    """transformers logits (float32) with per-MoE-layer top-k ``counts`` or an Alloc-T plan."""
    import contextlib

    import torch
    from transformers import AutoModelForCausalLM

    from allocmoe_edge import hf

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ctx = contextlib.nullcontext()
    if alloc_t is not None:
        ctx = hf.alloc_t_routing(model, counts, **alloc_t)
    elif counts is not None:
        ctx = hf.layer_topk(model, counts)
    with torch.no_grad(), ctx:
        return model(torch.tensor([list(tokens)])).logits[0].float().numpy()
