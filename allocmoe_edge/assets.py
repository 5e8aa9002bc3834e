"""Paths of the bundled assets: the trained MoE testbeds and their evaluation texts."""
from __future__ import annotations

from pathlib import Path

from .errors import AllocMoeError

ASSETS = Path(__file__).resolve().parent / "assets"
# Bundled checkpoints (cards: assets/MODEL_CARD.md and assets/DEEP_MODEL_CARD.md), mapped to the llama.cpp
# pre-tokenizer name their conversion needs: None for a SentencePiece vocabulary; a trained byte-level BPE
# has a hash llama.cpp's converter cannot know, and splits text with GPT-2's regex ("gpt-2").
MODELS: dict[str, str | None] = {"tiny-moe": None, "deep-moe": "gpt-2"}
DEMO_MODEL = "deep-moe"


def _existing(path: Path) -> Path:
    if not path.exists():
        raise AllocMoeError(
            f"bundled asset missing: {path} (reinstall allocmoe-edge, or rebuild it with "
            "scripts/build_corpus.py and scripts/train_tiny_moe.py)")
    return path


def model_dir(name: str = DEMO_MODEL) -> Path:
    """A bundled MoE checkpoint (Hugging Face format, bf16, with tokenizer): one of `MODELS`."""
    if name not in MODELS:
        raise AllocMoeError(f"no bundled model {name!r}; choose one of {', '.join(MODELS)}")
    d = _existing(ASSETS / name)
    _existing(d / "config.json")
    _existing(d / "model.safetensors")
    return d


def pre_tokenizer(name: str) -> str | None:
    """The ``--pre-tokenizer`` that `allocmoe convert` needs for bundled model ``name`` (None: none)."""
    return MODELS[name]


def heldout_text() -> Path:
    """Held-out evaluation text (excerpts of every corpus source's last 3%)."""
    return _existing(ASSETS / "heldout.txt")


def calib_text() -> Path:
    """Calibration text (excerpts of every corpus source's 2% calibration slice)."""
    return _existing(ASSETS / "calib.txt")
