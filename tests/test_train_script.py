"""scripts/train_tiny_moe.py: the testbed configs match the bundled checkpoints, and a few training steps
of each architecture on a tiny corpus (tokenizer, token cache, training, checkpoint, export) in seconds."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from allocmoe_edge import assets

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "train_tiny_moe.py"
sys.path.insert(0, str(SCRIPT.parent))
import train_tiny_moe  # noqa: E402

# a few config fields that make each testbed tiny (the rest of its preset stays)
TINY = {"tiny-moe": ["hidden_size=32", "intermediate_size=16", "num_hidden_layers=2", "num_local_experts=4",
                     "num_experts_per_tok=2", "num_attention_heads=2", "num_key_value_heads=1"],
        "deep-moe": ["hidden_size=32", "intermediate_size=16", "num_hidden_layers=2", "num_experts=4",
                     "num_experts_per_tok=2", "num_attention_heads=2", "num_key_value_heads=2"]}


@pytest.mark.parametrize("arch", sorted(train_tiny_moe.ARCHS))
def test_presets_are_the_bundled_configs(arch):
    shipped = json.loads((assets.ASSETS / arch / "config.json").read_text())
    made = json.loads(train_tiny_moe.model_config(arch, shipped["vocab_size"]).to_json_string())
    # training turns the router loss on; saving adds the class name and dtype; transformers_version is the
    # installed release's, not the preset's
    made["output_router_logits"] = False
    ignored = {"architectures", "dtype", "transformers_version"}
    diff = {k for k in set(shipped) | set(made) if shipped.get(k) != made.get(k)} - ignored
    assert not diff, {k: (shipped.get(k), made.get(k)) for k in diff}


def test_override_values_are_json_or_text():
    assert train_tiny_moe.parse_override("num_hidden_layers=2") == ("num_hidden_layers", 2)
    assert train_tiny_moe.parse_override("norm_topk_prob=true") == ("norm_topk_prob", True)
    assert train_tiny_moe.parse_override("hidden_act=gelu") == ("hidden_act", "gelu")
    with pytest.raises(Exception, match="expected key=value"):
        train_tiny_moe.parse_override("num_hidden_layers")


def _tiny_corpus(root: Path) -> Path:
    """Train and held-out splits of every source, cut from the bundled calibration and held-out texts."""
    calib, heldout = assets.calib_text().read_text(), assets.heldout_text().read_text()
    root.mkdir()
    for i, source in enumerate(train_tiny_moe.SOURCES):
        (root / f"{source}.train.txt").write_text(calib[i * 6000:(i + 1) * 6000])
        (root / f"{source}.heldout.txt").write_text(heldout[i * 2000:(i + 1) * 2000])
    return root


@pytest.mark.slow
@pytest.mark.parametrize("arch, tokenizer_file", [("tiny-moe", "tokenizer.model"), ("deep-moe", "tokenizer.json")])
def test_a_few_steps_train_and_export(tmp_path, arch, tokenizer_file):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    corpus, work, out = _tiny_corpus(tmp_path / "corpus"), tmp_path / "work", tmp_path / "out"
    sets = [arg for item in TINY[arch] for arg in ("--set", item)]
    cmd = [sys.executable, str(SCRIPT), "--arch", arch, "--corpus", str(corpus), "--work", str(work), "--out",
           str(out), "--vocab", "320", "--steps", "3", "--batch", "2", "--seq", "32", "--warmup", "1",
           "--log-every", "1", "--eval-every", "3", "--eval-windows", "2", "--ckpt-every", "3", *sets]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)

    log = json.loads((work / "log.json").read_text())
    assert [r["step"] for r in log] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in log)
    assert "heldout_loss" in log[-1] and (work / "ckpt" / "train_state.pt").is_file()
    assert (out / tokenizer_file).is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == train_tiny_moe.ARCHS[arch].config["model_type"]
    assert config["num_hidden_layers"] == 2 and config["output_router_logits"] is False
    model = AutoModelForCausalLM.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.bfloat16
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.decode(tok("Blessed are the meek", add_special_tokens=False)["input_ids"]) == "Blessed are the meek"
