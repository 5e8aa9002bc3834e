#!/usr/bin/env python3
"""Held-out perplexity of the bundled checkpoints in transformers and in llama.cpp, as the model cards state.

Protocol (`CTX`, `CHUNKS`): the first 40 chunks of 256 tokens of ``assets/heldout.txt``, BOS
first in each, the second half of each chunk scored (llama-perplexity's protocol). transformers
runs the bf16 checkpoint's weights in float32; llama.cpp runs an f32 GGUF written by the pinned
converter (f16 KV cache). Writes ``assets/heldout_ppl.json``, which tests/test_bundled_models.py
checks the checkpoints against.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from allocmoe_edge import assets

CTX, CHUNKS = 256, 40
REFERENCE = assets.ASSETS / "heldout_ppl.json"


def torch_ppl(name: str) -> float:
    """transformers' perplexity of bundled model ``name`` (float32 copy of its weights)."""
    from allocmoe_edge.demo import float32_copy
    from allocmoe_edge.torch_eval import evaluate_torch

    with tempfile.TemporaryDirectory() as tmp:
        model = float32_copy(assets.model_dir(name), tmp)
        result = evaluate_torch(model, assets.heldout_text(), {}, ctx=CTX, max_tokens=CTX * CHUNKS)
    return result["full"]["ppl"]


def llama_ppl(name: str) -> float:
    """The patched llama.cpp's perplexity of bundled model ``name`` converted to an f32 GGUF."""
    from allocmoe_edge.convert import convert_hf
    from allocmoe_edge.evaluate import evaluate_llama

    with tempfile.TemporaryDirectory() as tmp:
        gguf = convert_hf(assets.model_dir(name), Path(tmp) / f"{name}-f32.gguf", "f32",
                          pre_tokenizer=assets.pre_tokenizer(name), log=lambda message: None)
        result = evaluate_llama(gguf, assets.heldout_text(), ctx=CTX, chunks=CHUNKS, budgets=[1.0])
    return result["results"][0]["ppl"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REFERENCE)
    args = ap.parse_args()
    models = {name: {"transformers_f32": round(torch_ppl(name), 3), "llama_cpp_f32": round(llama_ppl(name), 3)}
              for name in assets.MODELS}
    doc = {"ctx": CTX, "chunks": CHUNKS, "text": "heldout.txt", "models": models}
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(models, indent=1))


if __name__ == "__main__":
    main()
