"""Read the executed MoE graph through llama.cpp's eval callback.

For one decode of a token group (one ubatch) this reports, per MoE layer, the ids tensor that
``mul_mat_id`` consumes (``ffn_moe_topk-<il>``, I32 [k, columns]: its size is the number of
(token, expert) activations the expert matmuls ran) and, under Alloc-T, how many experts each
token kept (from the 0/1 mask ``ffn_moe_alloct_mask-<il>``).
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .runtime import llama_cpp_module

_NAME = re.compile(r"^(ffn_moe_topk|ffn_moe_alloct_mask)-(\d+)$")


class _TensorHead(ctypes.Structure):
    """The leading fields of ``struct ggml_tensor`` (type, buffer, ne, nb)."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p),
                ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4)]


def _ggml_base() -> Any:
    llama_cpp = llama_cpp_module()
    lib = ctypes.CDLL(str(Path(llama_cpp.llama_cpp._lib._name).parent / "libggml-base.so"))
    lib.ggml_get_name.restype = ctypes.c_char_p
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    lib.ggml_nbytes.restype = ctypes.c_size_t
    lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_tensor_get.restype = None
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    return lib


def _read_i32_2d(ggml: Any, t: int, head: _TensorHead) -> np.ndarray:
    """A (possibly strided) 2-D I32 tensor as [ne1, ne0] (one row per ids column)."""
    raw = np.empty(ggml.ggml_nbytes(t), dtype=np.uint8)
    ggml.ggml_backend_tensor_get(t, raw.ctypes.data, 0, raw.nbytes)
    shape, strides = (int(head.ne[1]), int(head.ne[0])), (int(head.nb[1]), int(head.nb[0]))
    return np.lib.stride_tricks.as_strided(raw.view(np.int32), shape=shape, strides=strides).copy()


def moe_activations(llm: Any, tokens: Sequence[int]) -> tuple[dict[int, dict[str, Any]], np.ndarray]:
    """Decode ``tokens`` as one ubatch (logits for every position) in a fresh context on ``llm``'s
    model. Returns, per MoE layer, ``{"pairs": executed activations, "ids": the mul_mat_id ids as
    [columns, k] int32, "per_token": experts kept per token under Alloc-T, else None}``, and the
    logits [n_tokens, n_vocab]."""
    ggml = _ggml_base()
    seen: dict[int, dict[str, Any]] = {}

    def callback(t: int, ask: bool, _: Any) -> bool:
        name = (ggml.ggml_get_name(t) or b"").decode()
        m = _NAME.match(name)
        if ask:
            return m is not None
        if m:
            layer = seen.setdefault(int(m.group(2)), {"pairs": None, "ids": None, "per_token": None})
            head = _TensorHead.from_address(t)
            if m.group(1) == "ffn_moe_topk":
                layer["pairs"] = int(head.ne[0] * head.ne[1] * head.ne[2] * head.ne[3])
                layer["ids"] = _read_i32_2d(ggml, t, head)
            else:
                buf = np.empty(ggml.ggml_nbytes(t) // 4, dtype=np.float32)
                ggml.ggml_backend_tensor_get(t, buf.ctypes.data, 0, buf.nbytes)
                layer["per_token"] = buf.reshape(int(head.ne[2]), int(head.ne[1])).sum(axis=1).astype(int).tolist()
        return True

    logits = _decode(llm, tokens, callback)
    return dict(sorted(seen.items())), logits


# ops that only re-describe memory: no kernel runs for them on a GPU
_VIEW_OPS = {"NONE", "VIEW", "RESHAPE", "PERMUTE", "TRANSPOSE"}


def kernel_nodes(llm: Any, tokens: Sequence[int]) -> dict[str, int]:
    """Graph nodes that compute something (views left out) in one decode of ``tokens``, by op:
    an upper bound on the kernels a GPU launches for it before fusion."""
    ggml = _ggml_base()
    ggml.ggml_op_desc.restype = ctypes.c_char_p
    ggml.ggml_op_desc.argtypes = [ctypes.c_void_p]
    counts: dict[str, int] = {}

    def callback(t: int, ask: bool, _: Any) -> bool:
        if ask:
            op = ggml.ggml_op_desc(t).decode()
            if op not in _VIEW_OPS:
                counts[op] = counts.get(op, 0) + 1
        return False

    _decode(llm, tokens, callback)
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def _decode(llm: Any, tokens: Sequence[int], callback: Callable[[int, bool, Any], bool]) -> np.ndarray:
    """Decode ``tokens`` as one ubatch in a fresh context on ``llm``'s model with ``callback`` as the
    scheduler's eval callback; return the logits of every position [n_tokens, n_vocab]."""
    llama_cpp = llama_cpp_module()
    cb = llama_cpp.ggml_backend_sched_eval_callback(callback)
    n = len(tokens)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = max(n, 64)
    params.n_batch = params.n_ubatch = max(n, 1)
    params.type_k = params.type_v = 0  # f32 KV cache and no flash attention (which rounds Q to f16):
    params.flash_attn_type = 0  # verification runs compare against f32 references
    params.cb_eval = cb
    params.cb_eval_user_data = None
    ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
    if not ctx:
        raise RuntimeError("llama_init_from_model failed")
    batch = llama_cpp.llama_batch_init(n, 0, 1)
    try:
        for i, tok in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, i, 1, True
            batch.seq_id[i][0] = 0
        batch.n_tokens = n
        rc = llama_cpp.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(llm._model.model))
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(n, n_vocab)).copy()
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
    return logits
