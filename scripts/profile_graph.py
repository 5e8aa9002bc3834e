#!/usr/bin/env python3
"""Where a prefill ubatch spends its time, per graph node, for several load choices of one file.

Every node is computed on its own (the eval callback asks for each), so the time between
two callbacks is that node's compute time plus a small constant; totals are grouped by the
node's name (layer suffix removed) and op. Meant for comparing Alloc-T against per-layer
top-k at the same plan: the extra nodes and the nodes that got dearer show up side by side.

usage: scripts/profile_graph.py MODEL.gguf [--plan I] [-n 512] [-t 2] [--reps 3] [--json OUT]
(MODEL must store plans with Alloc-T, e.g. the temporary copy `allocmoe bench` makes, or a
file stamped with `allocmoe stamp`).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import time
from collections import defaultdict
from typing import Any

import numpy as np

from allocmoe_edge.graph_probe import _ggml_base
from allocmoe_edge.runtime import LoadChoice, llama_cpp_module, load

_LAYER = re.compile(r"-\d+$")


def profile(path: str, choice: LoadChoice, n_tokens: int, threads: int, reps: int) -> dict[str, float]:
    """Mean seconds per (name, op) over ``reps`` decodes of ``n_tokens`` random tokens."""
    llama_cpp = llama_cpp_module()
    ggml = _ggml_base()
    ggml.ggml_op_desc.restype = ctypes.c_char_p
    ggml.ggml_op_desc.argtypes = [ctypes.c_void_p]
    totals: dict[str, float] = defaultdict(float)
    last = [0.0]

    def callback(t: int, ask: bool, _: Any) -> bool:
        if ask:
            return True
        now = time.perf_counter()
        name = _LAYER.sub("", (ggml.ggml_get_name(t) or b"").decode())
        name = "(unnamed)" if name.startswith("node_") else name
        totals[f"{name} [{ggml.ggml_op_desc(t).decode()}]"] += now - last[0]
        last[0] = now
        return True

    # the model with the choice's overrides; its own context stays minimal, the profiled one is below
    llm = load(path, choice, n_ctx=8, n_batch=8, n_ubatch=8)
    cb = llama_cpp.ggml_backend_sched_eval_callback(callback)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = n_tokens
    params.n_threads = params.n_threads_batch = threads
    params.cb_eval = cb
    ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
    batch = llama_cpp.llama_batch_init(n_tokens, 0, 1)
    tokens = np.random.default_rng(0).integers(0, llm.n_vocab(), n_tokens)
    try:
        for rep in range(reps + 1):  # the first decode warms up and is not counted
            if rep == 1:
                totals.clear()
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
            for i, tok in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = int(tok), i, 1, i == n_tokens - 1
                batch.seq_id[i][0] = 0
            batch.n_tokens = n_tokens
            last[0] = time.perf_counter()
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llm.close()
    return {k: v / reps for k, v in totals.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--plan", type=int, default=0)
    ap.add_argument("-n", type=int, default=512)
    ap.add_argument("-t", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args()
    runs = {"alloc-t": LoadChoice(plan_index=a.plan), "top-k": LoadChoice(plan_index=a.plan, token_k_max=0)}
    result = {name: profile(a.model, choice, a.n, a.t, a.reps) for name, choice in runs.items()}
    keys = sorted(set(result["alloc-t"]) | set(result["top-k"]),
                  key=lambda k: -abs(result["alloc-t"].get(k, 0) - result["top-k"].get(k, 0)))
    total = {name: sum(r.values()) for name, r in result.items()}
    print(f"total ms: alloc-t {1e3 * total['alloc-t']:.1f}, top-k {1e3 * total['top-k']:.1f} "
          f"({100 * (total['alloc-t'] / total['top-k'] - 1):+.1f} %)")
    print(f"{'node [op]':<48} {'alloc-t ms':>10} {'top-k ms':>10} {'diff':>8}")
    for k in keys[:30]:
        x, y = 1e3 * result["alloc-t"].get(k, 0), 1e3 * result["top-k"].get(k, 0)
        print(f"{k:<48} {x:10.2f} {y:10.2f} {x - y:+8.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "total_s": total, "nodes_s": result}, f, indent=1)


if __name__ == "__main__":
    main()
