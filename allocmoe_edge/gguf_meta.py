"""The ``allocmoe.*`` GGUF metadata: read a model's MoE shape and plans, validate, stamp a copy.

Keys (format version 1). The standard ``<arch>.expert_used_count`` keeps the original
scalar, so a stock llama.cpp still runs a stamped file correctly at full budget.

* ``allocmoe.version`` u32, ``allocmoe.enabled`` bool (kv_override it to false for full budget)
* ``allocmoe.layer_expert_counts`` u32[block_count]: the default plan (non-MoE blocks carry K_orig)
* ``allocmoe.budget`` f32 (fraction), ``allocmoe.budget_count`` u32: the default plan's budget
* ``allocmoe.token_k_min`` / ``allocmoe.token_k_max`` u32: Alloc-T bounds (k_max 0 = Alloc-T off)
* ``allocmoe.plan_count`` u32, ``allocmoe.plan_default`` u32 and, per stored plan i,
  ``allocmoe.plan.<i>.{layer_expert_counts,budget,budget_count,method,name}``; the patched
  loader uses plan i when the scalar kv_override ``allocmoe.plan_index=int:i`` is given
* provenance strings: ``allocmoe.tool``, ``allocmoe.source``, ``allocmoe.calibration``

`Keys` names every key; `AllocmoeMeta` (``GgufModelInfo.meta``) is the typed view of a file's keys.

Format version 2 adds Alloc-T's decode rule: per plan ``allocmoe.plan.<i>.token_thresholds``
f32[block_count] (and ``allocmoe.token_thresholds`` for the default plan), one routing-score
threshold per block (ignored where a block's count is k_min or k_max, or it has no experts), and
``allocmoe.token_mode`` (string): "batch" (the batch rule for ubatches of T > 1 tokens, top-k_l
at T = 1), "decode" (the decode rule for every ubatch) or "both" (the decode rule at T = 1, the
batch rule above). Files without thresholds stay version 1.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .errors import AllocMoeError
from .fsutil import atomic_output
from .gguf_scan import ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GgufHeader, copy_with_fields, scan
from .plan import TOKEN_MODES, Plan, PlanModelShape, count_problems

FORMAT_VERSION = 1
FORMAT_VERSION_THRESHOLDS = 2


class Keys:
    """The ``allocmoe.*`` GGUF keys in one place, as gguf-py's ``gguf.Keys`` names the standard ones.

    The ``PLAN_*`` keys of stored plan i are templates: ``Keys.PLAN_BUDGET.format(index=i)``."""

    PREFIX = "allocmoe."
    VERSION = "allocmoe.version"
    ENABLED = "allocmoe.enabled"
    LAYER_EXPERT_COUNTS = "allocmoe.layer_expert_counts"  # the default plan
    BUDGET = "allocmoe.budget"
    BUDGET_COUNT = "allocmoe.budget_count"
    TOKEN_K_MIN = "allocmoe.token_k_min"
    TOKEN_K_MAX = "allocmoe.token_k_max"
    TOKEN_MODE = "allocmoe.token_mode"
    TOKEN_THRESHOLDS = "allocmoe.token_thresholds"
    PLAN_COUNT = "allocmoe.plan_count"
    PLAN_DEFAULT = "allocmoe.plan_default"
    PLAN_INDEX = "allocmoe.plan_index"  # only as a kv_override: the stored plan to run
    TOOL = "allocmoe.tool"
    SOURCE = "allocmoe.source"
    CALIBRATION = "allocmoe.calibration"
    OUTTYPE = "allocmoe.outtype"
    SYNTHETIC = "allocmoe.synthetic"  # set by `synth`: random weights
    PLAN_PREFIX = "allocmoe.plan."
    PLAN_LAYER_EXPERT_COUNTS = "allocmoe.plan.{index}.layer_expert_counts"
    PLAN_TOKEN_THRESHOLDS = "allocmoe.plan.{index}.token_thresholds"
    PLAN_BUDGET = "allocmoe.plan.{index}.budget"
    PLAN_BUDGET_COUNT = "allocmoe.plan.{index}.budget_count"
    PLAN_METHOD = "allocmoe.plan.{index}.method"
    PLAN_NAME = "allocmoe.plan.{index}.name"


PREFIX = Keys.PREFIX  # the namespace, as scripts and tests name it
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
                                  "outtype": str, "synthetic": bool}
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


def expand_counts(info: GgufModelInfo, counts: list[int]) -> list[int]:
    """Per-block counts from either one value per block or one value per MoE layer."""
    if len(counts) == info.block_count:
        return list(counts)
    if len(counts) == len(info.moe_layers):
        full = [info.expert_used_count] * info.block_count
        for layer, k in zip(info.moe_layers, counts):
            full[layer] = k
        return full
    raise AllocMoeError(
        f"{len(counts)} counts given; the model has {info.block_count} blocks of which "
        f"{len(info.moe_layers)} are MoE layers: give one count per block or per MoE layer")


def check_stored_plan(info: GgufModelInfo, plan: StoredPlan, k_min: int = 1, k_max: int = 0) -> None:
    """Check a plan to stamp against the GGUF as the patched loader does: one count per block, the
    counts and Alloc-T bounds by `plan.count_problems`, one decode threshold per block."""
    if info.expert_count == 0 or not info.moe_layers:
        raise AllocMoeError(f"{info.path} has no experts ({info.architecture}); a budget plan needs a MoE model")
    if len(plan.counts) != info.block_count:
        raise AllocMoeError(f"plan has {len(plan.counts)} counts, the model has {info.block_count} blocks")
    problems = count_problems(dict(enumerate(plan.counts)), info.expert_count, k_min, k_max)
    if plan.thresholds is not None and len(plan.thresholds) != info.block_count:
        problems.append(f"{len(plan.thresholds)} decode thresholds for {info.block_count} blocks")
    elif plan.thresholds is not None and any(math.isnan(t) for t in plan.thresholds):
        problems.append("a NaN decode threshold")
    if problems:
        raise AllocMoeError(f"invalid plan {plan.name or '(unnamed)'}: " + "; ".join(problems))


def plan_for_counts(info: GgufModelInfo, counts: list[int], method: str = "custom", name: str = "") -> StoredPlan:
    """A StoredPlan for per-block or per-MoE-layer counts, with its budget computed."""
    full = expand_counts(info, counts)
    spent = sum(full[layer] for layer in info.moe_layers)
    return StoredPlan(counts=tuple(full), budget=spent / max(info.full_budget, 1), budget_count=spent,
                      method=method, name=name or f"{method}-{spent}")


def plan_shape(info: GgufModelInfo, architecture: str | None = None) -> PlanModelShape:
    """The file's shape as a plan records it (``architecture`` lets a plan made on the HF name compare equal)."""
    return PlanModelShape(architecture=architecture or info.architecture, n_layer=info.block_count,
                         moe_layers=tuple(info.moe_layers), n_expert=info.expert_count, k_orig=info.expert_used_count)


def stored_plan_from_file(info: GgufModelInfo, path: str | os.PathLike[str]) -> StoredPlan:
    """Load a plan.json and check it against the GGUF's shape."""
    return stored_plan(info, Plan.load(path))


def stored_plan(info: GgufModelInfo, plan: Plan) -> StoredPlan:
    """A Plan as stored in the GGUF, checked against its shape (GGUF and HF architecture names differ)."""
    plan.check_against(plan_shape(info, plan.model.architecture))
    thresholds = plan.block_thresholds()
    return StoredPlan(counts=tuple(plan.layer_expert_counts()), budget=plan.budget.fraction,
                      budget_count=plan.budget.count, method=plan.method,
                      name=f"{plan.method}@{plan.budget.fraction:g}",
                      thresholds=None if thresholds is None else tuple(thresholds))


def copy_with_metadata(src: str | os.PathLike[str], dst: str | os.PathLike[str],
                       set_fields: dict[str, tuple[Any, Any, Any]], drop: Callable[[str], bool],
                       progress: Callable[[int, int], None] | None = None, writer_cls: Any = None) -> None:
    """Copy a GGUF to ``dst`` (atomically) with keys removed by ``drop`` and ``set_fields`` added.

    ``set_fields`` maps key -> (value, GGUFValueType, sub_type or None), packed by gguf-py's writer
    (``writer_cls`` replaces it: the loader fuzzer writes values gguf-py refuses); arrays must name
    their sub_type (gguf-py would otherwise write a uint32 list as int32). Kept entries and tensor
    data are copied byte for byte (`gguf_scan.copy_with_fields`); the data is aligned as the copy's
    ``general.alignment`` says, as gguf-py's ``copy_with_new_metadata`` does: readers place it by
    that key.
    """
    import gguf

    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise AllocMoeError("the output must be a new file; refusing to overwrite the input")
    header = read_header(src)
    total = sum(t.n_bytes for t in header.tensors)
    free = _free_bytes(dst.parent)
    if free is not None and free < total + (64 << 20):
        raise AllocMoeError(f"not enough disk space in {dst.parent}: need ~{total >> 20} MiB, {free >> 20} MiB free")
    endian = gguf.GGUFEndian.BIG if header.byteorder == ">" else gguf.GGUFEndian.LITTLE
    packer = (writer_cls or gguf.GGUFWriter)(None, header.get(gguf.Keys.General.ARCHITECTURE), endianess=endian)
    added = [packer._pack_val(key, gguf.GGUFValueType.STRING, add_vtype=False)
             + packer._pack_val(value, vtype, add_vtype=True, sub_type=sub)
             for key, (value, vtype, sub) in set_fields.items()]
    with atomic_output(dst) as tmp, open(tmp, "wb") as out:
        copy_with_fields(header, out, keep=lambda key: not drop(key) and key not in set_fields, added=added,
                         alignment=_written_alignment(header, set_fields, drop), progress=progress)


def _written_alignment(header: GgufHeader, set_fields: dict[str, tuple[Any, Any, Any]],
                       drop: Callable[[str], bool]) -> int:
    """The data alignment of a copy: its ``general.alignment``, or GGUF's default without one."""
    key = ALIGNMENT_KEY
    if key in set_fields:
        return int(set_fields[key][0])
    return header.alignment if key in header.fields and not drop(key) else DEFAULT_ALIGNMENT


def _free_bytes(folder: Path) -> int | None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        st = os.statvfs(folder)
        return st.f_bavail * st.f_frsize
    except OSError:
        return None


def token_mode_for(plans: list[StoredPlan], token_mode: str | None) -> str:
    """The file's ``allocmoe.token_mode``: as given, else "both" when every plan has decode thresholds,
    else "batch"; a mode with the decode rule needs thresholds in every plan."""
    with_thresholds = [p.thresholds is not None for p in plans]
    mode = token_mode or ("both" if all(with_thresholds) else "batch")
    if mode not in TOKEN_MODES:
        raise AllocMoeError(f"token mode {mode!r} is not one of {', '.join(TOKEN_MODES)}")
    if mode != "batch" and not all(with_thresholds):
        raise AllocMoeError(f"token mode {mode} runs the decode rule, but {with_thresholds.count(False)} plan(s) "
                            "have no decode thresholds")
    return mode


def plan_fields(info: GgufModelInfo, plans: list[StoredPlan], default: int = 0, k_min: int = 1, k_max: int = 0,
                provenance: dict[str, str] | None = None, enabled: bool = True,
                token_mode: str | None = None) -> dict[str, tuple[Any, Any, Any]]:
    """The allocmoe.* key/values for ``plans`` (validated against ``info``); ``token_mode`` as in
    `token_mode_for`."""
    import gguf

    T = gguf.GGUFValueType
    if not plans:
        raise AllocMoeError("no plan to stamp")
    if not 0 <= default < len(plans):
        raise AllocMoeError(f"default plan index {default} is outside [0, {len(plans) - 1}]")
    for p in plans:
        check_stored_plan(info, p, k_min, k_max)
    mode = token_mode_for(plans, token_mode)
    thresholds = any(p.thresholds is not None for p in plans)
    d = plans[default]
    fields: dict[str, tuple[Any, Any, Any]] = {
        Keys.VERSION: (FORMAT_VERSION_THRESHOLDS if thresholds else FORMAT_VERSION, T.UINT32, None),
        Keys.ENABLED: (enabled, T.BOOL, None),
        Keys.LAYER_EXPERT_COUNTS: (list(d.counts), T.ARRAY, T.UINT32),
        Keys.BUDGET: (float(d.budget), T.FLOAT32, None),
        Keys.BUDGET_COUNT: (int(d.budget_count), T.UINT32, None),
        Keys.TOKEN_K_MIN: (int(k_min), T.UINT32, None),
        Keys.TOKEN_K_MAX: (int(k_max), T.UINT32, None),
        Keys.PLAN_COUNT: (len(plans), T.UINT32, None),
        Keys.PLAN_DEFAULT: (int(default), T.UINT32, None),
        Keys.TOOL: (f"allocmoe-edge {__version__}", T.STRING, None),
    }
    if thresholds:
        fields[Keys.TOKEN_MODE] = (mode, T.STRING, None)
        if d.thresholds is not None:
            fields[Keys.TOKEN_THRESHOLDS] = (list(d.thresholds), T.ARRAY, T.FLOAT32)
    for i, p in enumerate(plans):
        fields[Keys.PLAN_LAYER_EXPERT_COUNTS.format(index=i)] = (list(p.counts), T.ARRAY, T.UINT32)
        if p.thresholds is not None:
            fields[Keys.PLAN_TOKEN_THRESHOLDS.format(index=i)] = (list(p.thresholds), T.ARRAY, T.FLOAT32)
        fields[Keys.PLAN_BUDGET.format(index=i)] = (float(p.budget), T.FLOAT32, None)
        fields[Keys.PLAN_BUDGET_COUNT.format(index=i)] = (int(p.budget_count), T.UINT32, None)
        fields[Keys.PLAN_METHOD.format(index=i)] = (p.method, T.STRING, None)
        fields[Keys.PLAN_NAME.format(index=i)] = (p.name or f"plan-{i}", T.STRING, None)
    for name, text in (provenance or {}).items():  # source, calibration, outtype, ...
        fields[Keys.PREFIX + name] = (str(text), T.STRING, None)
    return fields


def stamp(src: str | os.PathLike[str], dst: str | os.PathLike[str], plans: list[StoredPlan], default: int = 0,
          k_min: int = 1, k_max: int = 0, provenance: dict[str, str] | None = None,
          progress: Callable[[int, int], None] | None = None, token_mode: str | None = None) -> GgufModelInfo:
    """Write a copy of ``src`` carrying ``plans`` (any earlier allocmoe keys are replaced)."""
    info = read_info(src)
    fields = plan_fields(info, plans, default, k_min, k_max, {"source": Path(src).name, **(provenance or {})},
                         token_mode=token_mode)
    copy_with_metadata(src, dst, fields, drop=lambda k: k.startswith(Keys.PREFIX), progress=progress)
    return read_info(dst)


def find_plan(info: GgufModelInfo, budget: float) -> int:
    """Index of the stored plan whose budget fraction is closest to ``budget`` (within 0.02)."""
    plans = info.plans
    if not plans:
        raise AllocMoeError(f"{info.path} stores no plans; stamp or convert it with plans first")
    best = min(range(len(plans)), key=lambda i: abs(plans[i].budget - budget))
    if abs(plans[best].budget - budget) > 0.02:
        have = ", ".join(f"{p.budget:.2f}" for p in plans)
        raise AllocMoeError(f"no stored plan has budget {budget:.2f}; the file has {have}")
    return best
