"""Paths of the bundled assets: the tiny trained MoE and its evaluation texts."""
from __future__ import annotations

from pathlib import Path

from .errors import AllocMoeError

ASSETS = Path(__file__).resolve().parent / "assets"


def _existing(path: Path) -> Path:
    if not path.exists():
        raise AllocMoeError(
            f"bundled asset missing: {path} (reinstall allocmoe-edge, or rebuild it with "
            "scripts/build_corpus.py and scripts/train_tiny_moe.py)")
    return path


def model_dir() -> Path:
    """The tiny Mixtral-style MoE checkpoint (Hugging Face format, bf16, with tokenizer)."""
    d = _existing(ASSETS / "tiny-moe")
    _existing(d / "config.json")
    _existing(d / "model.safetensors")
    return d


def heldout_text() -> Path:
    """Held-out evaluation text (excerpts of every corpus source's last 3%)."""
    return _existing(ASSETS / "heldout.txt")


def calib_text() -> Path:
    """Calibration text (excerpts of every corpus source's 2% calibration slice)."""
    return _existing(ASSETS / "calib.txt")
