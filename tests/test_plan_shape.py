"""`plan.PlanModelShape` from each source: a transformers model, its checkpoint directory, a GGUF."""

from __future__ import annotations

import pytest

from allocmoe_edge import gguf_meta, hf
from allocmoe_edge.errors import AllocMoeError
from allocmoe_edge.plan import PlanModelShape

from .ggufs import write_fake_moe
from .tiny_models import make_tiny_model


def test_a_checkpoint_directory_has_its_models_shape(tmp_path):
    model = make_tiny_model("qwen2_moe")
    model.config.save_pretrained(tmp_path)  # config.json alone: no weights are read
    assert hf.plan_shape(tmp_path) == hf.plan_shape(model) == PlanModelShape("qwen2_moe", 3, (0, 1, 2), 8, 3)


def test_a_directory_without_a_config_is_a_clean_error(tmp_path):
    with pytest.raises(AllocMoeError, match="could not read the config"):
        hf.plan_shape(tmp_path)


def test_a_gguf_shape_takes_the_plans_architecture_name(tmp_path):
    info = gguf_meta.read_info(write_fake_moe(tmp_path / "m.gguf", n_layer=4, n_expert=8, k=2, dense_first=True))
    assert gguf_meta.plan_shape(info) == PlanModelShape("qwen2moe", 4, (1, 2, 3), 8, 2)
    assert gguf_meta.plan_shape(info, "qwen2_moe") == PlanModelShape("qwen2_moe", 4, (1, 2, 3), 8, 2)
