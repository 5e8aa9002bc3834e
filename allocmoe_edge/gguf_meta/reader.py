"""Read a GGUF's MoE shape and ``allocmoe.*`` metadata: `read_info` gives a `GgufModelInfo`; its
``meta`` (`AllocmoeMeta`) is the typed view of the keys, its ``plans`` the `StoredPlan` list the file carries."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AllocMoeError
from ..gguf_scan import GgufHeader, scan
from ..plan import TOKEN_MODES
from .keys import Keys

_PLAN_COUNTS_KEY = re.compile(re.escape(Keys.PLAN_LAYER_EXPERT_COUNTS).replace(re.escape("{index}"), r"(\d+)"))


@dataclass(frozen=True)
class StoredPlan:
    """One budget plan as stored in a GGUF: a count for every block."""

    counts: tuple[int, ...]
    budget: float
    budget_count: int
    method: str = "custom"
    name: str = ""
    thresholds: tuple[float, ...] | None = None  # the decode rule's threshold per block (None: no decode rule)


# the Python type of each allocmoe.* value in AllocmoeMeta (arrays: of their items)
_SCALAR_TYPES: dict[str, type] = {"version": int, "enabled": bool, "budget": float, "budget_count": int,
                                  "token_k_min": int, "token_k_max": int, "token_mode": str, "plan_count": int,
                                  "plan_default": int, "tool": str, "source": str, "calibration": str,
                                  "outtype": str, "synthetic": bool, "decode_control": bool, "decode_window": int}
_ARRAY_TYPES: dict[str, type] = {"layer_expert_counts": int, "token_thresholds": float}


def _typed(value: Any, kind: type) -> bool:
    """Whether a GGUF value as `read_info` decodes it is of the Python type ``kind`` (an int is a float,
    a bool is no int)."""
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    return isinstance(value, (int, float) if kind is float else kind)


@dataclass(frozen=True)
class AllocmoeMeta:
    """Typed view of a GGUF's ``allocmoe.*`` metadata (`Keys`, without the prefix); an absent key has
    the patched loader's default.

    ``keys`` names the keys the file has; ``malformed`` those whose value has the wrong type (or an
    unknown token mode), which keep their default here (the patched loader refuses a file where a
    key it reads is malformed).
    """

    version: int | None = None
    enabled: bool = True
    layer_expert_counts: tuple[int, ...] | None = None  # the default plan, per block (None: no plan)
    budget: float | None = None
    budget_count: int | None = None
    token_k_min: int = 1
    token_k_max: int = 0  # 0: Alloc-T off
    token_mode: str = "batch"
    token_thresholds: tuple[float, ...] | None = None
    decode_control: bool = True  # the decode rule's budget controller
    decode_window: int = 64  # its window, in tokens
    plan_count: int = 0
    plan_default: int = 0
    tool: str | None = None
    source: str | None = None
    calibration: str | None = None
    outtype: str | None = None
    synthetic: bool = False
    plans: tuple[StoredPlan, ...] = ()
    keys: frozenset[str] = frozenset()
    malformed: tuple[str, ...] = ()

    @property
    def has_plan(self) -> bool:
        """Whether the file carries a plan (``allocmoe.layer_expert_counts``, well formed or not)."""
        return "layer_expert_counts" in self.keys

    def check(self, path: str | os.PathLike[str]) -> None:
        """Raise AllocMoeError naming the malformed keys, if any."""
        if self.malformed:
            names = ", ".join(Keys.PREFIX + k for k in self.malformed)
            raise AllocMoeError(f"{path}: {names} has a value of the wrong type; the file's allocmoe metadata is "
                                "malformed (`allocmoe inspect --json` shows the values)")

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> AllocmoeMeta:
        """The view of `read_info`'s summary: keys without the prefix, stored plans under ``plans``."""
        values: dict[str, Any] = {}
        malformed = []
        for name, value in summary.items():
            if name in _SCALAR_TYPES:
                kind = _SCALAR_TYPES[name]
                ok = _typed(value, kind) and (name != "token_mode" or value in TOKEN_MODES)
                converted = float(value) if ok and kind is float else value
            elif name in _ARRAY_TYPES:
                ok = isinstance(value, list) and all(_typed(v, _ARRAY_TYPES[name]) for v in value)
                converted = tuple(value) if ok else None
            else:
                continue
            if ok:
                values[name] = converted
            else:
                malformed.append(name)
        return cls(**values, plans=tuple(StoredPlan(**p) for p in summary.get("plans", [])),
                   keys=frozenset(summary) - {"plans"}, malformed=tuple(malformed))


@dataclass
class GgufModelInfo:
    """A GGUF's MoE shape (llama.cpp's names) and allocmoe metadata: what `allocmoe inspect` shows."""

    path: str
    architecture: str
    block_count: int
    expert_count: int
    expert_used_count: int
    moe_layers: list[int]
    file_type: str
    n_bytes: int
    allocmoe: dict[str, Any] = field(default_factory=dict)  # allocmoe.* as read, without the prefix (see `meta`)

    @property
    def full_budget(self) -> int:
        """Routed-expert activations per token over all MoE layers at the original top-k."""
        return len(self.moe_layers) * self.expert_used_count

    @property
    def meta(self) -> AllocmoeMeta:
        """The allocmoe metadata, typed (``allocmoe`` holds it as read, for JSON)."""
        return AllocmoeMeta.from_summary(self.allocmoe)

    @property
    def plans(self) -> list[StoredPlan]:
        """The stored plans (empty when the file has none)."""
        return list(self.meta.plans)

    def to_json(self) -> dict[str, Any]:
        """JSON view, as printed by ``allocmoe inspect --json`` (infinite thresholds as "inf" / "-inf")."""
        return {
            "path": self.path, "architecture": self.architecture, "block_count": self.block_count,
            "expert_count": self.expert_count, "expert_used_count": self.expert_used_count,
            "moe_layers": self.moe_layers, "full_budget": self.full_budget,
            "file_type": self.file_type, "n_bytes": self.n_bytes, "allocmoe": _finite_json(self.allocmoe),
        }


def _finite_json(value: Any) -> Any:
    """``value`` with infinite floats written as the strings "inf" / "-inf" (JSON has no infinity)."""
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value


def read_header(path: str | os.PathLike[str]) -> GgufHeader:
    """A GGUF's metadata and tensor table (`gguf_scan`: fast, unlike gguf-py's reader over a large
    vocabulary), every ``allocmoe.*`` value decoded; a damaged file is a clean error."""
    return scan(path, decode_strings=lambda key: key.startswith(Keys.PREFIX))


def read_info(path: str | os.PathLike[str]) -> GgufModelInfo:
    """Read the MoE shape and the allocmoe metadata of a GGUF."""
    import gguf

    header = read_header(path)
    arch = header.get(gguf.Keys.General.ARCHITECTURE)
    if not isinstance(arch, str):
        raise AllocMoeError(f"{path}: {gguf.Keys.General.ARCHITECTURE} is missing; not a llama.cpp model file")
    block_count = header.get(gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch))
    if not isinstance(block_count, int) or isinstance(block_count, bool):
        raise AllocMoeError(f"{path}: {gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch)} is missing")
    used = header.get(gguf.Keys.LLM.EXPERT_USED_COUNT.format(arch=arch), 0)
    if isinstance(used, list):  # some files store per-layer counts; report the maximum
        used = max(used) if used else 0
    names = {t.name for t in header.tensors}
    moe_layers = [i for i in range(block_count) if f"blk.{i}.ffn_gate_inp.weight" in names]
    ftype = header.get(gguf.Keys.General.FILE_TYPE)
    fields = {k: header.get(k) for k in header.fields if k.startswith(Keys.PREFIX)}
    plans = [_stored_plan_entry(path, fields, i) for i in _plan_indices(path, fields)]
    summary = {k.removeprefix(Keys.PREFIX): v for k, v in fields.items() if not k.startswith(Keys.PLAN_PREFIX)}
    if plans:
        summary["plans"] = plans
    try:
        ftype_name = gguf.LlamaFileType(ftype).name if ftype is not None else "unknown"
    except ValueError:
        ftype_name = str(ftype)
    return GgufModelInfo(
        path=str(path), architecture=arch, block_count=block_count,
        expert_count=int(header.get(gguf.Keys.LLM.EXPERT_COUNT.format(arch=arch), 0) or 0),
        expert_used_count=int(used or 0), moe_layers=moe_layers, file_type=ftype_name,
        n_bytes=Path(path).stat().st_size, allocmoe=summary,
    )


def _plan_indices(path: str | os.PathLike[str], fields: dict[str, Any]) -> list[int]:
    """Indices below plan_count that have stored counts (found from the keys: plan_count may be huge)."""
    count = fields.get(Keys.PLAN_COUNT, 0)
    if not isinstance(count, int) or isinstance(count, bool):
        raise AllocMoeError(f"{path}: {Keys.PLAN_COUNT} is not an integer; the file's plan metadata is malformed")
    found = (_PLAN_COUNTS_KEY.fullmatch(k) for k in fields)
    return sorted(i for i in (int(m.group(1)) for m in found if m) if i < count)


def _stored_plan_entry(path: str | os.PathLike[str], fields: dict[str, Any], i: int) -> dict[str, Any]:
    """Stored plan ``i`` as StoredPlan fields; values of the wrong type are a clean error."""
    counts = fields[Keys.PLAN_LAYER_EXPERT_COUNTS.format(index=i)]
    budget = fields.get(Keys.PLAN_BUDGET.format(index=i), 0.0)
    budget_count = fields.get(Keys.PLAN_BUDGET_COUNT.format(index=i), 0)
    if not (isinstance(counts, list) and all(isinstance(k, int) for k in counts)
            and isinstance(budget, (int, float)) and isinstance(budget_count, int)):
        raise AllocMoeError(f"{path}: {Keys.PLAN_PREFIX}{i}.* has values of the wrong type; the file's plan "
                            "metadata is malformed")
    thresholds = fields.get(Keys.PLAN_TOKEN_THRESHOLDS.format(index=i))
    if thresholds is not None and not (isinstance(thresholds, list) and all(isinstance(t, float) for t in thresholds)):
        raise AllocMoeError(f"{path}: {Keys.PLAN_TOKEN_THRESHOLDS.format(index=i)} is not a float array; the "
                            "file's plan metadata is malformed")
    return {"counts": tuple(counts), "budget": float(budget), "budget_count": int(budget_count),
            "method": str(fields.get(Keys.PLAN_METHOD.format(index=i), "custom")),
            "name": str(fields.get(Keys.PLAN_NAME.format(index=i), "")),
            "thresholds": None if thresholds is None else tuple(thresholds)}
