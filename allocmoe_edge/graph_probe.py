"""Read the executed MoE graph through llama.cpp's eval callback.

For one decode of a token group (one ubatch) this reports, per MoE layer, the ids tensor that
``mul_mat_id`` consumes (``ffn_moe_topk-<il>``, I32 [k, columns]; its non-negative entries are
the (token, expert) activations the expert matmuls ran), under Alloc-T how many experts each token
kept (from the 0/1 mask ``ffn_moe_alloct_mask-<il>``) and, when asked, the layer's output (the
weighted sum of its experts, ``ffn_moe_out-<il>``).
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .runtime import llama_cpp_module, set_context_plan

_NAME = re.compile(r"^(ffn_moe_topk|ffn_moe_candidates|ffn_moe_alloct_mask|ffn_moe_out)-(\d+)$")


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


def _read_2d(ggml: Any, t: int, head: _TensorHead, dtype: type = np.int32) -> np.ndarray:
    """A (possibly strided) 2-D I32 or F32 tensor as [ne1, ne0] (one row per ids column, or per token)."""
    raw = np.empty(ggml.ggml_nbytes(t), dtype=np.uint8)
    ggml.ggml_backend_tensor_get(t, raw.ctypes.data, 0, raw.nbytes)
    shape, strides = (int(head.ne[1]), int(head.ne[0])), (int(head.nb[1]), int(head.nb[0]))
    return np.lib.stride_tricks.as_strided(raw.view(dtype), shape=shape, strides=strides).copy()


def _layer_entry(seen: dict[int, dict[str, Any]], layer: int) -> dict[str, Any]:
    return seen.setdefault(layer, {"pairs": None, "ids": None, "active": None, "per_token": None, "out": None,
                                   "experts": None})


def moe_activations(llm: Any, tokens: Sequence[int], *, choice: Any = None, op_offload: bool = True,
                    outputs: bool = False) -> tuple[dict[int, dict[str, Any]], np.ndarray]:
    """Decode ``tokens`` as one ubatch (logits for every position) in a fresh context on ``llm``'s
    model, running ``choice`` (a `runtime.LoadChoice`; default: the load's plan) with ``op_offload``
    as `ProbeContext` takes it. Returns, per MoE layer, ``{"pairs": slots of the ids tensor, "ids": the
    mul_mat_id ids as [columns, k] int32, "active": executed activations (ids >= 0: the decode rule marks dropped
    slots -1), "per_token": experts kept per token under Alloc-T, else None, "out": with ``outputs`` the
    layer's output [n_tokens, n_embd], else None, "experts": with ``outputs`` each token's executed
    experts (a frozenset per token), else None}``, and the logits [n_tokens, n_vocab]."""
    ggml = _ggml_base()
    seen: dict[int, dict[str, Any]] = {}
    candidates: dict[int, np.ndarray] = {}  # Alloc-T's candidates [T, k_max] and kept mask per layer
    masks: dict[int, np.ndarray] = {}

    def callback(t: int, ask: bool, _: Any) -> bool:
        m = _NAME.match((ggml.ggml_get_name(t) or b"").decode())
        if m is None or (m.group(1) in ("ffn_moe_out", "ffn_moe_candidates") and not outputs):
            return False
        if ask:
            return True
        il = int(m.group(2))
        layer = _layer_entry(seen, il)
        head = _TensorHead.from_address(t)
        if m.group(1) == "ffn_moe_topk":
            layer["pairs"] = int(head.ne[0] * head.ne[1] * head.ne[2] * head.ne[3])
            layer["ids"] = _read_2d(ggml, t, head)
            layer["active"] = int((layer["ids"] >= 0).sum())
        elif m.group(1) == "ffn_moe_out":
            layer["out"] = _read_2d(ggml, t, head, np.float32)
        elif m.group(1) == "ffn_moe_candidates":
            candidates[il] = _read_2d(ggml, t, head)
        else:
            buf = np.empty(ggml.ggml_nbytes(t) // 4, dtype=np.float32)
            ggml.ggml_backend_tensor_get(t, buf.ctypes.data, 0, buf.nbytes)
            masks[il] = buf.reshape(int(head.ne[2]), int(head.ne[1])) > 0
            layer["per_token"] = masks[il].sum(axis=1).astype(int).tolist()
        return True

    with ProbeContext(llm, len(tokens), callback, op_offload=op_offload) as probe:
        if choice is not None:
            set_context_plan(probe.ctx, choice)
        probe.decode(tokens, 0)
        logits = probe.logits(len(tokens))
    for il, layer in seen.items() if outputs else ():
        # the batch rule's ids hold compacted pairs: its tokens' experts are its kept candidates
        rows = [c[k] for c, k in zip(candidates[il], masks[il])] if il in masks else layer["ids"]
        layer["experts"] = [frozenset(int(e) for e in r if e >= 0) for r in rows]
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

    with ProbeContext(llm, len(tokens), callback) as probe:
        probe.decode(tokens, 0)
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


_PROBS = re.compile(r"^ffn_moe_probs(_biased)?-(\d+)$")


def _ranked_probs(llm: Any, tokens: Sequence[int], ranks: int,
                  ubatch: int) -> dict[int, dict[bool, list[tuple[np.ndarray, np.ndarray]]]]:
    """Per MoE layer and kind (True: with the router's selection bias), one ``(top, total)`` per ubatch: every
    token's ``ranks`` largest gate values best first and the sum of all of them, decoded in ubatches of up to
    ``ubatch`` tokens, each from position 0."""
    ggml = _ggml_base()
    seen: dict[int, dict[bool, list[tuple[np.ndarray, np.ndarray]]]] = {}

    def callback(t: int, ask: bool, _: Any) -> bool:
        m = _PROBS.match((ggml.ggml_get_name(t) or b"").decode())
        if ask or not m:
            return m is not None
        head = _TensorHead.from_address(t)
        probs = np.empty(ggml.ggml_nbytes(t) // 4, dtype=np.float32)
        ggml.ggml_backend_tensor_get(t, probs.ctypes.data, 0, probs.nbytes)
        probs = probs.reshape(-1, int(head.ne[0]))
        top = -np.sort(-probs, axis=1)[:, :ranks]
        seen.setdefault(int(m.group(2)), {}).setdefault(m.group(1) is not None, []).append((top, probs.sum(axis=1)))
        return True

    with ProbeContext(llm, min(ubatch, len(tokens)), callback) as probe:
        for start in range(0, len(tokens), ubatch):
            probe.clear()
            probe.decode(tokens[start:start + ubatch], 0)  # every token an output: the last layer routes all
    return seen


def routing_stats(llm: Any, tokens: Sequence[int], ranks: int, ubatch: int = 512) -> list[Any]:
    """Routing statistics (`thresholds.LayerRouting` per MoE layer) of ``llm`` over ``tokens``: every
    token's ``ranks`` largest selection scores as llama.cpp computes them (with the router's
    selection bias where it has one), decoded in ubatches of up to ``ubatch`` tokens. Calibrates
    the decode rule for a GGUF without a torch profile (a synthetic file, say)."""
    from .thresholds import rank_quantiles

    return [rank_quantiles(layer, np.concatenate([top for top, _ in by_kind.get(True) or by_kind[False]]))
            for layer, by_kind in sorted(_ranked_probs(llm, tokens, ranks, ubatch).items())]


def routing_weights(llm: Any, tokens: Sequence[int], ranks: int, ubatch: int = 512) -> dict[int, Any]:
    """Per MoE layer, ``(ranked, totals)`` over ``tokens`` (`peers.RankedWeights`): every token's ``ranks``
    largest routing weights best first (the gate's values, without a selection bias) and the sum of all of
    them, as llama.cpp computes them, in ubatches of up to ``ubatch`` tokens. Calibrates SER and top-p."""
    return {layer: (np.concatenate([top for top, _ in by_kind[False]]), np.concatenate([s for _, s in by_kind[False]]))
            for layer, by_kind in sorted(_ranked_probs(llm, tokens, ranks, ubatch).items())}


class DecodeCounter:
    """Decode one token per ubatch, as generation does, in a context of its own on a loaded model,
    counting the experts each MoE layer runs per token (non-negative ids: under Alloc-T's decode
    rule a token's count varies). Every token asks for its logits, as generation does, so every layer routes
    every token. Positions continue until `reset`, which starts a new sequence: each keeps the experts every
    token ran over all MoE layers (``sequences``)."""

    def __init__(self, llm: Any, n_ctx: int) -> None:
        self._ggml = _ggml_base()
        self.tokens = 0
        self.activations: dict[int, int] = {}
        self.sequences: list[list[int]] = [[]]  # per sequence, each token's activations summed over the MoE layers
        self._step = 0
        self._probe = ProbeContext(llm, n_ctx, self._callback, n_ubatch=1)
        self._pos = 0

    def _callback(self, t: int, ask: bool, _: Any) -> bool:
        m = _NAME.match((self._ggml.ggml_get_name(t) or b"").decode())
        if ask or not m or m.group(1) != "ffn_moe_topk":
            return m is not None and m.group(1) == "ffn_moe_topk"
        layer = int(m.group(2))
        ids = _read_2d(self._ggml, t, _TensorHead.from_address(t))
        kept = int((ids >= 0).sum())
        self.activations[layer] = self.activations.get(layer, 0) + kept
        self._step += kept
        return True

    def step(self, token: int) -> np.ndarray:
        """Decode ``token`` at the next position; its logits [n_vocab]."""
        self._step = 0
        self._probe.decode([token], self._pos)
        self.sequences[-1].append(self._step)
        self._pos += 1
        self.tokens += 1
        return self._probe.logits(1)[0]

    def reset(self) -> None:
        """Empty the KV cache: the next token is at position 0, a new sequence (the counts are kept)."""
        self._probe.clear()
        self._pos = 0
        if self.sequences[-1]:
            self.sequences.append([])

    def windows(self, width: int) -> tuple[float | None, float | None]:
        """The smallest and largest mean activations per token over any ``width`` consecutive tokens of one
        sequence (None, None when no sequence is that long)."""
        means = [m for seq in self.sequences if len(seq) >= width
                 for m in (np.convolve(seq, np.ones(width), "valid") / width)]
        return (float(min(means)), float(max(means))) if means else (None, None)

    def per_token(self) -> dict[int, float]:
        """Mean experts per token in each MoE layer."""
        return {layer: n / self.tokens for layer, n in sorted(self.activations.items())}

    def close(self) -> None:
        self._probe.close()


def decode_batch(ctx: Any, tokens: Sequence[int], pos: int, outputs: Sequence[bool]) -> None:
    """One llama_decode of ``tokens`` at positions ``pos..`` in sequence 0 of the llama.cpp context
    ``ctx``; ``outputs`` marks the positions whose logits are computed (llama.cpp's last layer runs
    only those tokens)."""
    lib, n = llama_cpp_module(), len(tokens)
    batch = lib.llama_batch_init(n, 0, 1)
    try:
        for i, (tok, out) in enumerate(zip(tokens, outputs, strict=True)):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos + i, 1, out
            batch.seq_id[i][0] = 0
        batch.n_tokens = n
        rc = lib.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
    finally:
        lib.llama_batch_free(batch)


class ProbeContext:
    """A llama.cpp context on ``llm``'s model whose scheduler calls ``callback`` (ggml's eval
    callback: asked for every graph node, called with the data of those it asked for); f32 KV
    cache and no flash attention, as verification runs compare against f32 references. Without
    ``op_offload`` a GPU build leaves the ops of layers kept in system memory on the CPU (llama.cpp
    otherwise runs large ubatches' matmuls on the GPU): a CPU reference on a GPU build."""

    def __init__(self, llm: Any, n_ctx: int, callback: Callable[[int, bool, Any], bool],
                 n_ubatch: int | None = None, op_offload: bool = True) -> None:
        llama_cpp = llama_cpp_module()
        self._lib, self._llm = llama_cpp, llm
        self._cb = llama_cpp.ggml_backend_sched_eval_callback(callback)  # kept alive with the context
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = max(n_ctx, 64)
        params.n_batch = params.n_ubatch = n_ubatch or max(n_ctx, 1)
        params.type_k = params.type_v = 0
        params.flash_attn_type = 0
        params.op_offload = op_offload
        params.cb_eval = self._cb
        params.cb_eval_user_data = None
        self.ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
        if not self.ctx:
            raise RuntimeError("llama_init_from_model failed")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(llm._model.model))

    def decode(self, tokens: Sequence[int], pos: int) -> None:
        """Decode ``tokens`` at positions ``pos..`` (one llama_decode), every position an output (its logits
        computed, so llama.cpp's last layer routes every token)."""
        decode_batch(self.ctx, tokens, pos, [True] * len(tokens))

    def logits(self, n: int) -> np.ndarray:
        """A copy of the logits of the last decode's ``n`` outputs [n, n_vocab]."""
        return np.ctypeslib.as_array(self._lib.llama_get_logits(self.ctx), shape=(n, self.n_vocab)).copy()

    def clear(self) -> None:
        """Empty the KV cache."""
        self._lib.llama_memory_clear(self._lib.llama_get_memory(self.ctx), True)

    def close(self) -> None:
        if self.ctx:
            self._lib.llama_free(self.ctx)
            self.ctx = None

    def __enter__(self) -> ProbeContext:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
