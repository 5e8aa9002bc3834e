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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import __version__
from .errors import AllocMoeError
from .fsutil import atomic_output

FORMAT_VERSION = 1
FORMAT_VERSION_THRESHOLDS = 2
PREFIX = "allocmoe."
TOKEN_MODES = ("batch", "decode", "both")


@dataclass(frozen=True)
class StoredPlan:
    """One budget plan as stored in a GGUF: a count for every block."""

    counts: tuple[int, ...]
    budget: float
    budget_count: int
    method: str = "custom"
    name: str = ""
    thresholds: tuple[float, ...] | None = None  # the decode rule's threshold per block (None: no decode rule)


@dataclass
class ModelInfo:
    """What `allocmoe inspect` shows: the model's MoE shape and its allocmoe metadata."""

    path: str
    architecture: str
    block_count: int
    expert_count: int
    expert_used_count: int
    moe_layers: list[int]
    file_type: str
    n_bytes: int
    allocmoe: dict[str, Any] = field(default_factory=dict)

    @property
    def full_budget(self) -> int:
        """Routed-expert activations per token over all MoE layers at the original top-k."""
        return len(self.moe_layers) * self.expert_used_count

    @property
    def plans(self) -> list[StoredPlan]:
        """The stored plans (empty when the file has none)."""
        return [StoredPlan(**p) for p in self.allocmoe.get("plans", [])]

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


def open_reader(path: str | os.PathLike[str]) -> Any:
    """Open a GGUF with gguf-py; a missing, truncated or corrupted file is a clean error."""
    import gguf

    p = Path(path)
    if not p.is_file():
        raise AllocMoeError(f"{p}: no such file")
    try:
        return gguf.GGUFReader(p, "r")
    except Exception as e:  # gguf-py raises ValueError, IndexError, struct errors... on bad files
        raise AllocMoeError(f"{p} is not a readable GGUF file ({type(e).__name__}: {e})") from e


def _value(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.get_field(key)
    if f is None:
        return default
    v = f.contents()
    return v.tolist() if isinstance(v, np.ndarray) else v


def read_info(path: str | os.PathLike[str]) -> ModelInfo:
    """Read the MoE shape and the allocmoe metadata of a GGUF."""
    import gguf

    reader = open_reader(path)
    arch = _value(reader, "general.architecture")
    if not isinstance(arch, str):
        raise AllocMoeError(f"{path}: general.architecture is missing; not a llama.cpp model file")
    block_count = _value(reader, f"{arch}.block_count")
    if not isinstance(block_count, int):
        raise AllocMoeError(f"{path}: {arch}.block_count is missing")
    used = _value(reader, f"{arch}.expert_used_count", 0)
    if isinstance(used, list):  # some files store per-layer counts; report the maximum
        used = max(used) if used else 0
    names = {t.name for t in reader.tensors}
    moe_layers = [i for i in range(block_count) if f"blk.{i}.ffn_gate_inp.weight" in names]
    ftype = _value(reader, "general.file_type")
    allocmoe = {k[len(PREFIX):]: _value(reader, k) for k in reader.fields if k.startswith(PREFIX)}
    plans = [_stored_plan_entry(path, allocmoe, i) for i in _plan_indices(path, allocmoe)]
    summary = {k: v for k, v in allocmoe.items() if not k.startswith("plan.")}
    if plans:
        summary["plans"] = plans
    try:
        ftype_name = gguf.LlamaFileType(ftype).name if ftype is not None else "unknown"
    except ValueError:
        ftype_name = str(ftype)
    return ModelInfo(
        path=str(path), architecture=arch, block_count=block_count,
        expert_count=int(_value(reader, f"{arch}.expert_count", 0) or 0),
        expert_used_count=int(used or 0), moe_layers=moe_layers, file_type=ftype_name,
        n_bytes=Path(path).stat().st_size, allocmoe=summary,
    )


def _plan_indices(path: str | os.PathLike[str], allocmoe: dict[str, Any]) -> list[int]:
    """Indices below plan_count that have stored counts (found from the keys: plan_count may be huge)."""
    count = allocmoe.get("plan_count", 0)
    if not isinstance(count, int) or isinstance(count, bool):
        raise AllocMoeError(f"{path}: allocmoe.plan_count is not an integer; the file's plan metadata is malformed")
    found = (re.fullmatch(r"plan\.(\d+)\.layer_expert_counts", k) for k in allocmoe)
    return sorted(i for i in (int(m.group(1)) for m in found if m) if i < count)


def _stored_plan_entry(path: str | os.PathLike[str], allocmoe: dict[str, Any], i: int) -> dict[str, Any]:
    """Stored plan ``i`` as StoredPlan fields; values of the wrong type are a clean error."""
    p = f"plan.{i}."
    counts = allocmoe[p + "layer_expert_counts"]
    budget, budget_count = allocmoe.get(p + "budget", 0.0), allocmoe.get(p + "budget_count", 0)
    if not (isinstance(counts, list) and all(isinstance(k, int) for k in counts)
            and isinstance(budget, (int, float)) and isinstance(budget_count, int)):
        raise AllocMoeError(f"{path}: allocmoe.plan.{i}.* has values of the wrong type; the file's plan metadata is malformed")
    thresholds = allocmoe.get(p + "token_thresholds")
    if thresholds is not None and not (isinstance(thresholds, list) and all(isinstance(t, float) for t in thresholds)):
        raise AllocMoeError(f"{path}: allocmoe.plan.{i}.token_thresholds is not a float array; the file's plan metadata is malformed")
    return {"counts": tuple(counts), "budget": float(budget), "budget_count": int(budget_count),
            "method": str(allocmoe.get(p + "method", "custom")), "name": str(allocmoe.get(p + "name", "")),
            "thresholds": None if thresholds is None else tuple(thresholds)}


def expand_counts(info: ModelInfo, counts: list[int]) -> list[int]:
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


def validate_plan(info: ModelInfo, plan: StoredPlan, k_min: int = 1, k_max: int = 0) -> None:
    """Check a plan against the model exactly as the patched loader does."""
    if info.expert_count == 0 or not info.moe_layers:
        raise AllocMoeError(f"{info.path} has no experts ({info.architecture}); a budget plan needs a MoE model")
    if len(plan.counts) != info.block_count:
        raise AllocMoeError(f"plan has {len(plan.counts)} counts, the model has {info.block_count} blocks")
    if not 1 <= k_min <= info.expert_count:
        raise AllocMoeError(f"token_k_min = {k_min} is outside [1, {info.expert_count}]")
    if k_max and not k_min <= k_max <= info.expert_count:
        raise AllocMoeError(f"token_k_max = {k_max} must be 0 (Alloc-T off) or in [{k_min}, {info.expert_count}]")
    for layer, k in enumerate(plan.counts):
        if not 1 <= k <= info.expert_count:
            raise AllocMoeError(f"layer {layer}: count {k} is outside [1, {info.expert_count}] (the expert count)")
        if k < k_min or (k_max and k > k_max):
            raise AllocMoeError(f"layer {layer}: count {k} is outside [token_k_min, token_k_max] = [{k_min}, {k_max}]")
    if plan.thresholds is not None:
        if len(plan.thresholds) != info.block_count:
            raise AllocMoeError(f"plan has {len(plan.thresholds)} thresholds, the model has {info.block_count} blocks")
        if any(math.isnan(t) for t in plan.thresholds):
            raise AllocMoeError("plan has a NaN decode threshold")


def plan_for_counts(info: ModelInfo, counts: list[int], method: str = "custom", name: str = "") -> StoredPlan:
    """A StoredPlan for per-block or per-MoE-layer counts, with its budget computed."""
    full = expand_counts(info, counts)
    spent = sum(full[layer] for layer in info.moe_layers)
    return StoredPlan(counts=tuple(full), budget=spent / max(info.full_budget, 1), budget_count=spent,
                      method=method, name=name or f"{method}-{spent}")


def identity(info: ModelInfo, architecture: str | None = None) -> Any:
    """The file's ModelIdentity (``architecture`` lets a plan made on the HF name compare equal)."""
    from .plan import ModelIdentity

    return ModelIdentity(architecture=architecture or info.architecture, n_layer=info.block_count,
                         moe_layers=tuple(info.moe_layers), n_expert=info.expert_count, k_orig=info.expert_used_count)


def stored_plan_from_file(info: ModelInfo, path: str | os.PathLike[str]) -> StoredPlan:
    """Load a plan.json and check it against the GGUF's shape."""
    from .plan import Plan

    return stored_plan(info, Plan.load(path))


def stored_plan(info: ModelInfo, plan: Any) -> StoredPlan:
    """A Plan as stored in the GGUF, checked against its shape (GGUF and HF architecture names differ)."""
    plan.check_against(identity(info, plan.model.architecture))
    thresholds = plan.block_thresholds()
    return StoredPlan(counts=tuple(plan.layer_expert_counts()), budget=plan.budget.fraction,
                      budget_count=plan.budget.count, method=plan.method, name=f"{plan.method}@{plan.budget.fraction:g}",
                      thresholds=None if thresholds is None else tuple(thresholds))


def copy_with_metadata(src: str | os.PathLike[str], dst: str | os.PathLike[str],
                       set_fields: dict[str, tuple[Any, Any, Any]], drop: Callable[[str], bool],
                       progress: Callable[[int, int], None] | None = None, writer_cls: Any = None) -> None:
    """Copy a GGUF to ``dst`` (atomically) with keys removed by ``drop`` and ``set_fields`` added.

    ``set_fields`` maps key -> (value, GGUFValueType, sub_type or None); arrays must name their
    sub_type (gguf-py would otherwise write a uint32 list as int32). ``writer_cls`` replaces
    gguf-py's GGUFWriter (the loader fuzzer writes values gguf-py refuses).
    """
    import gguf

    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise AllocMoeError("the output must be a new file; refusing to overwrite the input")
    reader = open_reader(src)
    total = sum(int(t.n_bytes) for t in reader.tensors)
    free = _free_bytes(dst.parent)
    if free is not None and free < total + (64 << 20):
        raise AllocMoeError(f"not enough disk space in {dst.parent}: need ~{total >> 20} MiB, {free >> 20} MiB free")
    arch = _value(reader, "general.architecture")
    with atomic_output(dst) as tmp:
        writer = (writer_cls or gguf.GGUFWriter)(tmp, arch, endianess=reader.endianess)
        for f in reader.fields.values():
            if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF.") or drop(f.name) or f.name in set_fields:
                continue
            vtype = f.types[0]
            sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
        for key, (value, vtype, sub) in set_fields.items():
            writer.add_key_value(key, value, vtype, sub_type=sub)
        for t in reader.tensors:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        done = 0
        for t in reader.tensors:
            writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
            done += int(t.n_bytes)
            if progress:
                progress(done, total)
        writer.close()


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


def plan_fields(info: ModelInfo, plans: list[StoredPlan], default: int = 0, k_min: int = 1, k_max: int = 0,
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
        validate_plan(info, p, k_min, k_max)
    mode = token_mode_for(plans, token_mode)
    thresholds = any(p.thresholds is not None for p in plans)
    d = plans[default]
    fields: dict[str, tuple[Any, Any, Any]] = {
        PREFIX + "version": (FORMAT_VERSION_THRESHOLDS if thresholds else FORMAT_VERSION, T.UINT32, None),
        PREFIX + "enabled": (enabled, T.BOOL, None),
        PREFIX + "layer_expert_counts": (list(d.counts), T.ARRAY, T.UINT32),
        PREFIX + "budget": (float(d.budget), T.FLOAT32, None),
        PREFIX + "budget_count": (int(d.budget_count), T.UINT32, None),
        PREFIX + "token_k_min": (int(k_min), T.UINT32, None),
        PREFIX + "token_k_max": (int(k_max), T.UINT32, None),
        PREFIX + "plan_count": (len(plans), T.UINT32, None),
        PREFIX + "plan_default": (int(default), T.UINT32, None),
        PREFIX + "tool": (f"allocmoe-edge {__version__}", T.STRING, None),
    }
    if thresholds:
        fields[PREFIX + "token_mode"] = (mode, T.STRING, None)
        if d.thresholds is not None:
            fields[PREFIX + "token_thresholds"] = (list(d.thresholds), T.ARRAY, T.FLOAT32)
    for i, p in enumerate(plans):
        q = f"{PREFIX}plan.{i}."
        fields[q + "layer_expert_counts"] = (list(p.counts), T.ARRAY, T.UINT32)
        if p.thresholds is not None:
            fields[q + "token_thresholds"] = (list(p.thresholds), T.ARRAY, T.FLOAT32)
        fields[q + "budget"] = (float(p.budget), T.FLOAT32, None)
        fields[q + "budget_count"] = (int(p.budget_count), T.UINT32, None)
        fields[q + "method"] = (p.method, T.STRING, None)
        fields[q + "name"] = (p.name or f"plan-{i}", T.STRING, None)
    for key, text in (provenance or {}).items():
        fields[PREFIX + key] = (str(text), T.STRING, None)
    return fields


def stamp(src: str | os.PathLike[str], dst: str | os.PathLike[str], plans: list[StoredPlan], default: int = 0,
          k_min: int = 1, k_max: int = 0, provenance: dict[str, str] | None = None,
          progress: Callable[[int, int], None] | None = None, token_mode: str | None = None) -> ModelInfo:
    """Write a copy of ``src`` carrying ``plans`` (any earlier allocmoe keys are replaced)."""
    info = read_info(src)
    fields = plan_fields(info, plans, default, k_min, k_max, {"source": Path(src).name, **(provenance or {})},
                         token_mode=token_mode)
    copy_with_metadata(src, dst, fields, drop=lambda k: k.startswith(PREFIX), progress=progress)
    return read_info(dst)


def find_plan(info: ModelInfo, budget: float) -> int:
    """Index of the stored plan whose budget fraction is closest to ``budget`` (within 0.02)."""
    plans = info.plans
    if not plans:
        raise AllocMoeError(f"{info.path} stores no plans; stamp or convert it with plans first")
    best = min(range(len(plans)), key=lambda i: abs(plans[i].budget - budget))
    if abs(plans[best].budget - budget) > 0.02:
        have = ", ".join(f"{p.budget:.2f}" for p in plans)
        raise AllocMoeError(f"no stored plan has budget {budget:.2f}; the file has {have}")
    return best
