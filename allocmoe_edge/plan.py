"""Activation budgets and plans: the contract between `allocate` and everything that runs a plan.

A plan gives, for one model, how many routed experts each MoE layer activates per token
(``counts``, in ``moe_layers`` order) under an activation budget, plus the Alloc-T bounds
per token. On disk it is versioned JSON::

    {"format": "allocmoe-plan", "version": 1, "method": "alloc-l+t",
     "model": {"architecture", "n_layer", "moe_layers", "n_expert", "k_orig"},
     "budget": {"fraction", "count", "full"}, "counts": [...],
     "token_k_min": 1, "token_k_max": 6,
     "calibration": {...}, "predicted": {...} | null, "measured": {...} | null}

``token_k_max`` 0 means Alloc-T is off: every token of layer l uses exactly its top-k_l.
No torch or llama_cpp here.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AllocMoeError
from .fsutil import atomic_write_json

PLAN_FORMAT = "allocmoe-plan"
PLAN_VERSION = 2  # 2: token_mode and token_thresholds (Alloc-T's decode rule); version 1 plans still load
TOKEN_MODES = ("batch", "decode", "both")  # which Alloc-T rule runs (see gguf_meta)
METHODS = ("uniform", "uniform+t", "alloc-l", "alloc-l+t", "refined", "custom")
BUDGET_TOLERANCE = 0.02  # a plan matches a budget fraction asked for (--budget, --budgets) within this


def read_json(path: str | os.PathLike[str], what: str) -> Any:
    """Parse the JSON file at ``path``; ``what`` names it in errors ("plan", "sensitivity file")."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise AllocMoeError(f"{what} {p} not found") from None
    except OSError as e:
        raise AllocMoeError(f"could not read {what} {p}: {e.strerror or e}") from e
    try:
        return json.loads(data)
    except ValueError as e:
        raise AllocMoeError(f"{what} {p} is not valid JSON ({e})") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _fields(d: Any, keys: tuple[str, ...], where: str) -> None:
    """Raise unless ``d`` is a JSON object holding every key in ``keys``."""
    if not isinstance(d, Mapping):
        raise AllocMoeError(f"{where}: expected a JSON object, got {type(d).__name__}")
    missing = [k for k in keys if k not in d]
    if missing:
        raise AllocMoeError(f"{where}: missing field(s) {', '.join(missing)}")


def _ints(values: Any, where: str) -> tuple[int, ...]:
    if not isinstance(values, (list, tuple)) or not all(_is_int(v) for v in values):
        raise AllocMoeError(f"{where}: expected a list of integers, got {values!r}")
    return tuple(int(v) for v in values)


def _thresholds(values: Any) -> tuple[float | None, ...] | None:
    if values is None:
        return None
    if not isinstance(values, list) or not all(v is None or (isinstance(v, numbers.Real) and not isinstance(v, bool))
                                               for v in values):
        raise AllocMoeError(f"plan.token_thresholds: expected a list of numbers or nulls, got {values!r}")
    return tuple(None if v is None else float(v) for v in values)


def fraction_problem(fraction: Any, given: Any = None) -> str | None:
    """Why ``fraction`` is not a budget fraction in (0, 1], or None when it is one; the message
    names ``given`` (the value as the user wrote it) when given."""
    if isinstance(fraction, numbers.Real) and not isinstance(fraction, bool) and math.isfinite(fraction) \
            and 0.0 < fraction <= 1.0:
        return None
    return f"budget {fraction if given is None else given!r} is not a fraction in (0, 1]"


def check_fraction(fraction: Any) -> float:
    """``fraction`` as a float; AllocMoeError unless it is a budget fraction in (0, 1]."""
    problem = fraction_problem(fraction)
    if problem is not None:
        raise AllocMoeError(problem)
    return float(fraction)


def count_problems(counts: Mapping[int, int], n_expert: int, k_min: int, k_max: int) -> list[str]:
    """What is wrong with per-block expert counts (block -> count) and Alloc-T's token bounds, by the
    patched loader's rules: 1 <= k_min <= n_expert; k_max 0 (Alloc-T off) or in [k_min, n_expert];
    every count in [k_min, k_max or n_expert]. Plans (`Plan.validate`) and GGUF stamps
    (`gguf_meta.check_stored_plan`) are checked by these rules."""
    out = []
    if not 1 <= k_min <= n_expert:
        out.append(f"token_k_min {k_min} must be in [1, n_expert={n_expert}]")
    if k_max != 0 and not k_min <= k_max <= n_expert:
        out.append(f"token_k_max {k_max} must be 0 (Alloc-T off) or in [token_k_min={k_min}, n_expert={n_expert}]")
    lo, hi = max(1, k_min), (k_max or n_expert)
    bad = [f"{block}:{count}" for block, count in counts.items() if not lo <= count <= hi]
    if bad:
        bound = "token_k_max" if k_max else "n_expert"
        out.append(f"counts outside [{lo}, {hi}] at block:count {', '.join(bad)} (from token_k_min to {bound})")
    return out


def _int(value: Any, where: str) -> int:
    if not _is_int(value):
        raise AllocMoeError(f"{where}: expected an integer, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class PlanModelShape:
    """The model shape a plan (and a sensitivity file) records, and must agree with: block layout and
    routing. Filled once per source: from a transformers model or checkpoint by `hf.plan_shape`
    (`hf.HfMoeShape.plan_shape`), from a GGUF by `gguf_meta.plan_shape`."""

    architecture: str
    n_layer: int
    moe_layers: tuple[int, ...]
    n_expert: int
    k_orig: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "moe_layers", tuple(self.moe_layers))

    @property
    def full_budget(self) -> int:
        """Activations per token at the model's own top-k: MoE layers x k_orig."""
        return len(self.moe_layers) * self.k_orig

    def problems(self) -> list[str]:
        """Inconsistencies in the shape itself (empty when it is well formed)."""
        out = []
        if not self.architecture:
            out.append("architecture is empty")
        if self.n_layer < 1:
            out.append(f"n_layer {self.n_layer} < 1")
        if not self.moe_layers:
            out.append("no MoE layers")
        elif list(self.moe_layers) != sorted(set(self.moe_layers)) or not (
            0 <= self.moe_layers[0] and self.moe_layers[-1] < self.n_layer
        ):
            out.append(f"moe_layers {list(self.moe_layers)} must be increasing block indices in [0, {self.n_layer})")
        if not 1 <= self.k_orig <= self.n_expert:
            out.append(f"k_orig {self.k_orig} must be in [1, n_expert={self.n_expert}]")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "n_layer": self.n_layer,
            "moe_layers": list(self.moe_layers),
            "n_expert": self.n_expert,
            "k_orig": self.k_orig,
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "model") -> PlanModelShape:
        _fields(d, ("architecture", "n_layer", "moe_layers", "n_expert", "k_orig"), where)
        if not isinstance(d["architecture"], str):
            raise AllocMoeError(f"{where}.architecture: expected a string, got {d['architecture']!r}")
        ident = cls(
            architecture=d["architecture"],
            n_layer=_int(d["n_layer"], f"{where}.n_layer"),
            moe_layers=_ints(d["moe_layers"], f"{where}.moe_layers"),
            n_expert=_int(d["n_expert"], f"{where}.n_expert"),
            k_orig=_int(d["k_orig"], f"{where}.k_orig"),
        )
        if ident.problems():
            raise AllocMoeError(f"{where}: " + "; ".join(ident.problems()))
        return ident


_COUNT_RE = re.compile(r"[+-]?\d+")


@dataclass(frozen=True)
class Budget:
    """An activation budget: routed-expert activations per token over all MoE layers.

    ``fraction`` is the share of the full budget that was asked for; ``count`` is the
    number of activations allowed. A fraction becomes ``floor(fraction x full)`` (with a
    1e-9 tolerance against binary rounding, so 0.29 x 100 gives 29), never more, so the
    budget is never exceeded. A count gives ``fraction = count / full``.
    """

    fraction: float
    count: int

    @classmethod
    def parse(cls, value: str | float | int, model: PlanModelShape | int, k_min: int = 1) -> Budget:
        """Read a budget given as a fraction (0.5, "0.5", "50%") or a count (78, "78").

        A value written without a decimal point is a count; anything else is a fraction in
        (0, 1]. ``model`` is the model's shape or its full budget; with a shape the
        budget must also leave every MoE layer at least ``k_min`` experts.
        """
        full = model.full_budget if isinstance(model, PlanModelShape) else int(model)
        if isinstance(model, PlanModelShape):
            floor_count = len(model.moe_layers) * k_min
            floor_why = f"{len(model.moe_layers)} MoE layers x k_min {k_min}"
        else:
            floor_count, floor_why = 1, "one activation"
        hint = "give a fraction such as 0.5 or 50%, or a count such as 78 (an integer, no decimal point)"

        count: int | None = None
        fraction: float | None = None
        if isinstance(value, bool):
            raise AllocMoeError(f"budget {value!r} is not a number; {hint}")
        if _is_int(value):
            count = int(value)
        elif isinstance(value, numbers.Real):
            fraction = float(value)
        elif isinstance(value, str):
            text = value.strip()
            try:
                if text.endswith("%"):
                    fraction = float(text[:-1]) / 100.0
                elif _COUNT_RE.fullmatch(text):
                    count = int(text)
                else:
                    fraction = float(text)
            except ValueError:
                raise AllocMoeError(f"budget {value!r} is not a number; {hint}") from None
        else:
            raise AllocMoeError(f"budget {value!r} is not a number; {hint}")

        if fraction is not None:
            problem = fraction_problem(fraction, value)
            if problem is not None:
                raise AllocMoeError(f"{problem}; {hint}")
            count = math.floor(fraction * full + 1e-9)
        else:
            assert count is not None
            if count <= 0:
                raise AllocMoeError(f"budget {value!r} must be positive; {hint}")
            if count > full:
                raise AllocMoeError(
                    f"budget {count} is above the full budget {full}; use at most {full} (or a fraction <= 1)"
                )
            fraction = count / full
        if count < floor_count:
            raise AllocMoeError(
                f"budget {value!r} allows {count} activations per token, below the minimum "
                f"{floor_count} ({floor_why}); raise the budget to at least {floor_count} "
                f"({math.ceil(100 * floor_count / full)}%) or lower k_min"
            )
        return cls(fraction=fraction, count=count)


def decode_ruled(k: int, k_min: int, k_max: int) -> bool:
    """Whether a layer running ``k`` experts gets a calibrated decode-rule threshold: k_min < k < k_max.
    At the ends it has none (None in a plan.json; `end_threshold` in a GGUF)."""
    return k_min < k < k_max


def end_threshold(k: int, k_min: int) -> float:
    """The threshold a GGUF stores for a layer at an end: inf where it keeps k_min experts, -inf where
    it keeps k_max."""
    return math.inf if k <= k_min else -math.inf


@dataclass(frozen=True)
class Plan:
    """Per-layer expert counts for one model under one budget; validated on construction.

    ``token_k_max`` defaults to the model's k_orig; 0 turns Alloc-T off.
    """

    model: PlanModelShape
    budget: Budget
    method: str
    counts: tuple[int, ...]
    token_k_min: int = 1
    token_k_max: int | None = None
    token_mode: str = "batch"
    token_thresholds: tuple[float | None, ...] | None = None  # per MoE layer; None where k is k_min or k_max
    calibration: dict[str, Any] = field(default_factory=dict)
    predicted: dict[str, Any] | None = None
    measured: dict[str, Any] | None = None
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "counts", tuple(self.counts))
        if self.token_thresholds is not None:
            object.__setattr__(self, "token_thresholds", tuple(self.token_thresholds))
        if self.token_k_max is None:
            object.__setattr__(self, "token_k_max", self.model.k_orig)
        self.validate()

    @property
    def alloc_t(self) -> bool:
        """Whether Alloc-T (token-level reallocation within each layer) is on."""
        return self.token_k_max != 0

    def validate(self) -> None:
        """Raise AllocMoeError listing every inconsistency in the plan."""
        m = self.model
        out = [f"model {p}" for p in m.problems()]
        if self.method not in METHODS:
            out.append(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        if not 1 <= self.version <= PLAN_VERSION:
            out.append(f"version {self.version} is not in 1..{PLAN_VERSION}")
        if len(self.counts) != len(m.moe_layers):
            out.append(f"{len(self.counts)} counts for {len(m.moe_layers)} MoE layers")
        out += count_problems(dict(zip(m.moe_layers, self.counts)), m.n_expert, self.token_k_min, self.token_k_max)
        if (problem := fraction_problem(self.budget.fraction)) is not None:
            out.append(problem)
        if not 1 <= self.budget.count <= m.full_budget:
            out.append(f"budget count {self.budget.count} is outside [1, full budget {m.full_budget}]")
        if sum(self.counts) > self.budget.count:
            out.append(f"counts sum to {sum(self.counts)}, above the budget {self.budget.count}")
        out += self._token_rule_problems()
        if out:
            raise AllocMoeError("invalid plan: " + "; ".join(out))

    def _token_rule_problems(self) -> list[str]:
        """What is wrong with ``token_mode`` and ``token_thresholds``."""
        if self.token_mode not in TOKEN_MODES:
            return [f"token_mode {self.token_mode!r} is not one of {', '.join(TOKEN_MODES)}"]
        taus = self.token_thresholds
        if taus is None:
            return [] if self.token_mode == "batch" else [f"token_mode {self.token_mode} needs token_thresholds"]
        if len(taus) != len(self.counts):
            return [f"{len(taus)} token_thresholds for {len(self.counts)} MoE layers"]
        out = []
        for block, k, tau in zip(self.model.moe_layers, self.counts, taus):
            ruled = decode_ruled(k, self.token_k_min, self.token_k_max)
            if (tau is not None) != ruled or (tau is not None and not math.isfinite(tau)):
                out.append(f"token_thresholds at block {block}: expected "
                           f"{'a finite number' if ruled else 'null (k is k_min or k_max)'}, got {tau!r}")
        return out

    def block_thresholds(self) -> list[float] | None:
        """The decode rule's threshold per block, as stored in a GGUF (inf: keep k_min, -inf: keep k_max)."""
        if self.token_thresholds is None:
            return None
        out = [math.inf] * self.model.n_layer
        for block, k, tau in zip(self.model.moe_layers, self.counts, self.token_thresholds):
            out[block] = end_threshold(k, self.token_k_min) if tau is None else tau
        return out

    def check_against(self, shape: PlanModelShape) -> None:
        """Raise AllocMoeError naming every way this plan's model differs from ``shape``."""
        names = {
            "architecture": "architecture",
            "n_layer": "layer count",
            "moe_layers": "MoE layers",
            "n_expert": "expert count",
            "k_orig": "top-k",
        }
        mine, theirs = self.model.to_dict(), shape.to_dict()
        diffs = [f"{label} (plan {mine[key]}, model {theirs[key]})" for key, label in names.items()
                 if mine[key] != theirs[key]]
        if diffs:
            raise AllocMoeError(
                "plan was made for a different model: " + "; ".join(diffs) + "; run `allocmoe allocate` for this model"
            )

    def layer_expert_counts(self) -> list[int]:
        """One count per block 0..n_layer-1; blocks without routed experts keep k_orig."""
        out = [self.model.k_orig] * self.model.n_layer
        for block, count in zip(self.model.moe_layers, self.counts):
            out[block] = count
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": self.version,
            "method": self.method,
            "model": self.model.to_dict(),
            "budget": {"fraction": self.budget.fraction, "count": self.budget.count, "full": self.model.full_budget},
            "counts": list(self.counts),
            "token_k_min": self.token_k_min,
            "token_k_max": self.token_k_max,
            "token_mode": self.token_mode,
            "token_thresholds": None if self.token_thresholds is None else list(self.token_thresholds),
            "calibration": self.calibration,
            "predicted": self.predicted,
            "measured": self.measured,
        }

    @classmethod
    def from_dict(cls, d: Any) -> Plan:
        """Build and validate a plan from its JSON form."""
        _fields(d, ("format", "version"), "plan")
        if d["format"] != PLAN_FORMAT:
            raise AllocMoeError(f"not an allocmoe plan (format {d['format']!r}, expected {PLAN_FORMAT!r})")
        version = _int(d["version"], "plan.version")
        if version > PLAN_VERSION:
            raise AllocMoeError(
                f"plan version {version} is newer than this allocmoe-edge supports ({PLAN_VERSION}); "
                "upgrade allocmoe-edge"
            )
        if version < 1:
            raise AllocMoeError(f"unknown plan version {version}")
        _fields(d, ("method", "model", "budget", "counts", "token_k_min", "token_k_max"), "plan")
        model = PlanModelShape.from_dict(d["model"], "plan.model")
        _fields(d["budget"], ("fraction", "count"), "plan.budget")
        fraction = d["budget"]["fraction"]
        if not isinstance(fraction, numbers.Real) or isinstance(fraction, bool):
            raise AllocMoeError(f"plan.budget.fraction: expected a number, got {fraction!r}")
        full = d["budget"].get("full", model.full_budget)
        if full != model.full_budget:
            raise AllocMoeError(f"plan.budget.full {full!r} does not match the model's full budget {model.full_budget}")
        for key in ("calibration", "predicted", "measured"):
            if d.get(key) is not None and not isinstance(d[key], Mapping):
                raise AllocMoeError(f"plan.{key}: expected a JSON object or null")
        if not isinstance(d["method"], str):
            raise AllocMoeError(f"plan.method: expected a string, got {d['method']!r}")
        return cls(
            model=model,
            budget=Budget(fraction=float(fraction), count=_int(d["budget"]["count"], "plan.budget.count")),
            method=d["method"],
            counts=_ints(d["counts"], "plan.counts"),
            token_k_min=_int(d["token_k_min"], "plan.token_k_min"),
            token_k_max=_int(d["token_k_max"], "plan.token_k_max"),
            token_mode=d.get("token_mode", "batch"),
            token_thresholds=_thresholds(d.get("token_thresholds")),
            calibration=dict(d.get("calibration") or {}),
            predicted=d.get("predicted"),
            measured=d.get("measured"),
            version=version,
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the plan as indented JSON, atomically."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        """Read and validate a plan file; errors name the file."""
        data = read_json(path, "plan")
        try:
            return cls.from_dict(data)
        except AllocMoeError as e:
            raise AllocMoeError(f"{path}: {e}") from None
