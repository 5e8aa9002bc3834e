"""Write ``allocmoe.*`` metadata: the key/values of a set of plans (`plan_fields`), packed as GGUF
entries by `pack_entry` into an atomic copy of the file (`copy_with_metadata`); `stamp` does all three."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import AllocMoeError
from ..fsutil import atomic_output
from ..gguf_scan import (
    ALIGNMENT_KEY,
    ARRAY,
    DEFAULT_ALIGNMENT,
    STRING,
    VALUE_FORMATS,
    GgufHeader,
    copy_with_fields,
    stored_data_bytes,
)
from ..plan import TOKEN_MODES
from .keys import FORMAT_VERSION, FORMAT_VERSION_THRESHOLDS, Keys
from .plans import check_stored_plan
from .reader import GgufModelInfo, StoredPlan, read_header, read_info


def pack_entry(key: str, value: Any, vtype: int, sub_type: int | None = None, byteorder: str = "<") -> bytes:
    """One GGUF key/value entry as a file stores it in ``byteorder`` ("<" or ">"): the key, the value's
    type (a ``gguf.GGUFValueType``) and the value, as gguf-py writes it. An array holds items of type
    ``sub_type`` (numbers, bools or strings) and may be empty, which gguf-py refuses to write."""
    head = _pack_string(key, byteorder) + struct.pack(byteorder + "I", vtype)
    return head + _pack_value(value, vtype, sub_type, byteorder)


def _pack_value(value: Any, vtype: int, sub_type: int | None, order: str) -> bytes:
    if vtype in VALUE_FORMATS:
        return struct.pack(order + VALUE_FORMATS[vtype], value)
    if vtype == STRING:
        return _pack_string(value, order)
    if vtype == ARRAY and sub_type in VALUE_FORMATS:
        return struct.pack(f"{order}IQ{len(value)}{VALUE_FORMATS[sub_type]}", sub_type, len(value), *value)
    if vtype == ARRAY and sub_type == STRING:
        return struct.pack(f"{order}IQ", sub_type, len(value)) + b"".join(_pack_string(s, order) for s in value)
    raise ValueError(f"cannot pack a GGUF value of type {vtype} (array items: {sub_type})")


def _pack_string(text: str, order: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack(order + "Q", len(data)) + data


def copy_with_metadata(src: str | os.PathLike[str], dst: str | os.PathLike[str],
                       set_fields: dict[str, tuple[Any, Any, Any]], drop: Callable[[str], bool],
                       progress: Callable[[int, int], None] | None = None) -> None:
    """Copy a GGUF to ``dst`` (atomically) with keys removed by ``drop`` and ``set_fields`` added.

    ``set_fields`` maps key -> (value, GGUFValueType, sub_type or None), packed by `pack_entry` in the
    file's byte order; arrays must name their sub_type. Kept entries and tensor data are copied byte
    for byte (`gguf_scan.copy_with_fields`); the data is aligned as the copy's ``general.alignment``
    says, as gguf-py's ``copy_with_new_metadata`` does: readers place it by that key.
    """
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise AllocMoeError("the output must be a new file; refusing to overwrite the input")
    header = read_header(src)
    total = stored_data_bytes(header)  # holes of a sparse input stay holes in the copy
    free = _free_bytes(dst.parent)
    if free is not None and free < total + (64 << 20):
        raise AllocMoeError(f"not enough disk space in {dst.parent}: need ~{total >> 20} MiB, {free >> 20} MiB free")
    added = [pack_entry(key, value, vtype, sub, header.byteorder) for key, (value, vtype, sub) in set_fields.items()]
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
                token_mode: str | None = None, decode_control: bool | None = None,
                decode_window: int | None = None) -> dict[str, tuple[Any, Any, Any]]:
    """The allocmoe.* key/values for ``plans`` (validated against ``info``); ``token_mode`` as in
    `token_mode_for`; ``decode_control`` / ``decode_window`` set the decode rule's budget controller (absent:
    on, 64 tokens)."""
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
    if decode_window is not None and not 1 <= decode_window <= 65536:
        raise AllocMoeError(f"decode window {decode_window} is outside [1, 65536] tokens")
    if decode_control is not None:
        fields[Keys.DECODE_CONTROL] = (bool(decode_control), T.BOOL, None)
    if decode_window is not None:
        fields[Keys.DECODE_WINDOW] = (int(decode_window), T.UINT32, None)
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
          progress: Callable[[int, int], None] | None = None, token_mode: str | None = None,
          decode_control: bool | None = None, decode_window: int | None = None) -> GgufModelInfo:
    """Write a copy of ``src`` carrying ``plans`` (any earlier allocmoe keys are replaced)."""
    info = read_info(src)
    fields = plan_fields(info, plans, default, k_min, k_max, {"source": Path(src).name, **(provenance or {})},
                         token_mode=token_mode, decode_control=decode_control, decode_window=decode_window)
    copy_with_metadata(src, dst, fields, drop=lambda k: k.startswith(Keys.PREFIX), progress=progress)
    return read_info(dst)
