"""The bundled checkpoints load, are what their cards say (architecture, MoE shape, size), and their
held-out perplexity matches the cards (assets/heldout_ppl.json, written by scripts/heldout_ppl.py)
in transformers and, with the patched runtime, in llama.cpp."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from allocmoe_edge import assets

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import heldout_ppl  # noqa: E402

REFERENCE = json.loads(heldout_ppl.REFERENCE.read_text())
# (model_type, MoE layers, experts, top-k) as the cards describe them
SHAPES = {"tiny-moe": ("mixtral", 4, 16, 4), "deep-moe": ("olmoe", 8, 32, 8)}
REL_TOL = 2e-3  # float32 on another CPU or thread count moves the last digits only


@pytest.mark.parametrize("name", sorted(assets.MODELS))
def test_bundled_model_is_what_its_card_says(name):
    from allocmoe_edge.hf import load_model, moe_shape

    model, tokenizer = load_model(assets.model_dir(name))
    info = moe_shape(model)
    assert (model.config.model_type, len(info.layers), info.n_expert, info.k_orig) == SHAPES[name]
    assert (assets.model_dir(name) / "model.safetensors").stat().st_size < 36 << 20
    assert tokenizer.bos_token_id is not None


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(assets.MODELS))
def test_transformers_perplexity_matches_the_card(name):
    assert heldout_ppl.torch_ppl(name) == pytest.approx(REFERENCE["models"][name]["transformers_f32"], rel=REL_TOL)


@pytest.mark.slow
@pytest.mark.runtime
@pytest.mark.parametrize("name", sorted(assets.MODELS))
def test_llama_cpp_perplexity_matches_the_card(name, patched_runtime):
    assert heldout_ppl.llama_ppl(name) == pytest.approx(REFERENCE["models"][name]["llama_cpp_f32"], rel=REL_TOL)
