"""The sensitivity file: written by `allocmoe profile` (`profile`), read by `allocate` and `refine`.

JSON of this shape::

    {"format": "allocmoe-sensitivity", "version": 2, "complete": true,
     "model": {"architecture", "n_layer", "moe_layers", "n_expert", "k_orig"},
     "calibration": {...},                  # description of the calibration text
     "mode": "isolated" | "deeper-top1",    # how S[l, k] was measured (`profile`; below)
     "full": {"ppl": float, "nll": float},  # the full-budget model
     "layers": [{"layer": int, "ppl": [S at k=1..K], "kld": [...]}, ...],
     "cost": {"seconds": float, "layer_forwards": int},
     "routing": {"score": ..., "layers": [{"layer", "n_tokens", "quantiles"}, ...]}}  # version 2

with one entry per MoE block (``layer`` is the block index) and K = k_orig values per
metric. ``mode``: ``isolated`` measures layer l at top-k with every other layer at its original
top-k (the paper's definition); ``deeper-top1`` with the layers after l at top-1. The routing
statistics (`thresholds.LayerRouting`) calibrate Alloc-T's decode rule; version 1 files have none,
so plans made from them run the batch rule only. A profile rewrites the file after each layer with
``"complete": false``, so it can resume.
No torch here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import AllocMoeError
from .plan import PlanModelShape, read_json
from .thresholds import LayerRouting

FORMAT = "allocmoe-sensitivity"
VERSION = 2  # the version written; 2: routing statistics
VERSIONS = (1, 2)  # the versions read (version 1 files cannot calibrate decode thresholds)
MODES = ("isolated", "deeper-top1")  # how S[l, k] is measured (`profile`)
METRICS = ("kld", "ppl")  # what S[l, k] holds, and what allocate and refine minimise
RESUME_KEYS = ("format", "version", "model", "calibration", "mode")  # what a resumed profile must share


def check_mode(mode: str) -> None:
    """Raise unless ``mode`` is one of MODES."""
    if mode not in MODES:
        raise AllocMoeError(f"profile mode {mode!r} is not one of {', '.join(MODES)}")


def check_metric(metric: str) -> None:
    """Raise unless ``metric`` is one of METRICS."""
    if metric not in METRICS:
        raise AllocMoeError(f"metric {metric!r} is not one of {', '.join(METRICS)}")


def new_document(model: PlanModelShape, calibration: dict[str, Any], mode: str) -> dict[str, Any]:
    """The header of a profile that has measured nothing yet (``"complete": false``)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "complete": False,
        "model": model.to_dict(),
        "calibration": calibration,
        "mode": mode,
        "full": None,
        "layers": [],
        "cost": {"seconds": 0.0, "layer_forwards": 0},
    }


def read(path: str | os.PathLike[str]) -> Any:
    """The parsed sensitivity file at ``path`` (validated by `model_shape` and the readers below)."""
    return read_json(path, "sensitivity file")


def model_shape(sens: Any) -> PlanModelShape:
    """The model a sensitivity document was measured on, after checking its header."""
    if not isinstance(sens, Mapping) or sens.get("format") != FORMAT:
        raise AllocMoeError(f"not an allocmoe sensitivity file (expected \"format\": \"{FORMAT}\")")
    version = sens.get("version")
    if version not in VERSIONS:
        raise AllocMoeError(f"sensitivity version {version!r} is not supported (this allocmoe-edge reads {VERSIONS})")
    missing = [k for k in ("model", "mode", "full", "layers") if k not in sens]
    if missing:
        raise AllocMoeError(f"sensitivity file: missing field(s) {', '.join(missing)}")
    if sens["mode"] not in MODES:
        raise AllocMoeError(f"sensitivity mode {sens['mode']!r} is not one of {', '.join(MODES)}")
    return PlanModelShape.from_dict(sens["model"], "sensitivity.model")


def layer_entries(sens: Mapping[str, Any], model: PlanModelShape) -> list[Mapping[str, Any]]:
    """The sensitivity entries in moe_layers order; each MoE block exactly once."""
    layers = sens["layers"]
    if not isinstance(layers, list) or not all(isinstance(e, Mapping) and "layer" in e for e in layers):
        raise AllocMoeError('sensitivity.layers: expected a list of objects with a "layer" field')
    blocks = [e["layer"] for e in layers]
    if sorted(blocks) != list(model.moe_layers):
        raise AllocMoeError(
            f"sensitivity.layers covers blocks {sorted(blocks)}, expected each MoE block {list(model.moe_layers)} once"
        )
    by_block = {e["layer"]: e for e in layers}
    return [by_block[b] for b in model.moe_layers]


def metric_table(entries: list[Mapping[str, Any]], model: PlanModelShape, metric: str) -> np.ndarray | None:
    """S[l, k-1] for ``metric``, or None when some layer lacks it."""
    if not all(metric in e for e in entries):
        return None
    for block, entry in zip(model.moe_layers, entries):
        row = entry[metric]
        ok = isinstance(row, list) and len(row) == model.k_orig
        ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in row)
        if not ok or (metric == "ppl" and min(row) <= 0):
            raise AllocMoeError(
                f"sensitivity layer {block}: {metric} must be {model.k_orig} finite numbers"
                f"{' > 0' if metric == 'ppl' else ''} (k=1..{model.k_orig}), got {row!r}"
            )
    return np.asarray([e[metric] for e in entries], dtype=np.float64)


def full_ppl(sens: Mapping[str, Any]) -> float:
    """The full-budget model's perplexity on the calibration text."""
    full = sens["full"]
    ppl = full.get("ppl") if isinstance(full, Mapping) else None
    if isinstance(ppl, bool) or not isinstance(ppl, (int, float)) or not math.isfinite(ppl) or ppl <= 0:
        raise AllocMoeError(f"sensitivity.full.ppl must be a positive number, got {ppl!r}")
    return float(ppl)


def routing_stats(sens: Mapping[str, Any]) -> list[LayerRouting] | None:
    """The sensitivity file's routing statistics (None for a version 1 file)."""
    routing = sens.get("routing")
    if routing is None:
        return None
    if not isinstance(routing, Mapping) or not isinstance(routing.get("layers"), list):
        raise AllocMoeError('sensitivity.routing: expected {"layers": [...]}')
    return [LayerRouting.from_dict(d) for d in routing["layers"]]
