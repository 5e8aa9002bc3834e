"""Statistics of speed measurements: mean ± sd, speedups with their sd and the tie rule, percentiles.

Pure Python and numpy, so the rules are unit-tested without a model.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

PERCENTILES = (50, 90, 99)


def summary(samples: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (None below two samples: the noise is unknown) and the samples."""
    values = [float(x) for x in samples]
    if not values:
        raise ValueError("no samples")
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "samples": values}


def speedup(row: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """``row``'s mean over ``base``'s (two `summary` dicts of tokens/s) with its propagated sd.

    sd(ratio) = ratio x sqrt((sd_row / mean_row)² + (sd_base / mean_base)²), first-order error
    propagation for independent rows. ``tie`` is True when |ratio - 1| <= sd(ratio): the
    difference is within the measured noise. Without an sd (one repetition) ``sd`` and ``tie``
    are None.
    """
    ratio = row["mean"] / base["mean"]
    if row["sd"] is None or base["sd"] is None:
        return {"ratio": ratio, "sd": None, "tie": None}
    sd = ratio * math.hypot(row["sd"] / row["mean"], base["sd"] / base["mean"])
    return {"ratio": ratio, "sd": sd, "tie": abs(ratio - 1) <= sd}


BASELINE = {"ratio": 1.0, "sd": 0.0, "tie": False}  # the baseline row against itself: the same samples


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    """p50 / p90 / p99 (linear interpolation between order statistics, numpy's default), mean and count."""
    import numpy as np

    values = np.asarray(samples, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no samples")
    points = np.percentile(values, PERCENTILES)
    return {**{f"p{q}": float(v) for q, v in zip(PERCENTILES, points)}, "mean": float(values.mean()),
            "n": int(values.size)}


def format_speedup(value: dict[str, Any] | None) -> str:
    """``1.23x``, or ``1.02x (tie)`` when the difference from 1.00x is within the noise; ``-`` when missing."""
    if value is None:
        return "-"
    return f"{value['ratio']:.2f}x" + (" (tie)" if value["tie"] else "")


def format_mean_sd(stats: dict[str, Any] | None, digits: int = 2) -> str:
    """``mean ± sd`` (llama-bench's t/s column), the mean alone without an sd, ``-`` when missing."""
    if stats is None:
        return "-"
    mean = f"{stats['mean']:.{digits}f}"
    return mean if stats["sd"] is None else f"{mean} ± {stats['sd']:.{digits}f}"
