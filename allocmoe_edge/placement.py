"""Where routed experts live: llama.cpp's ``--cpu-moe`` / ``--n-cpu-moe`` overrides and the bytes they move.

Importable without llama_cpp: everything here reads the GGUF's metadata and tensor table only.
"""

from __future__ import annotations

import os
import re
from typing import Any

from .errors import AllocMoeError
from .gguf_meta import GgufModelInfo, read_header

# llama.cpp's LLM_FFN_EXPS_REGEX (common/common.h), searched in tensor names as its loader does:
# the routed-expert tensors of a block, incl. GroveMoE's chunk experts (chexps)
EXPERT_TENSOR_REGEX = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"
_BLOCK = re.compile(r"blk\.(\d+)\.")


def expert_block(tensor_name: str) -> int | None:
    """The block of a routed-expert tensor (``EXPERT_TENSOR_REGEX``), None for any other tensor."""
    m = _BLOCK.match(tensor_name)
    return int(m.group(1)) if m and re.search(EXPERT_TENSOR_REGEX, tensor_name) else None


def cpu_expert_blocks(info: GgufModelInfo, cpu_moe: bool = False, n_cpu_moe: int = 0) -> list[int]:
    """MoE blocks whose routed experts stay in system memory, as llama.cpp's ``--cpu-moe`` (all of
    them) and ``--n-cpu-moe N`` (those among the first N blocks) place them."""
    if n_cpu_moe < 0:
        raise AllocMoeError(f"--n-cpu-moe {n_cpu_moe} must be >= 0")
    return [b for b in info.moe_layers if cpu_moe or b < n_cpu_moe]


def cpu_moe_overrides(info: GgufModelInfo, cpu_moe: bool = False, n_cpu_moe: int = 0) -> list[tuple[str, str]]:
    """The ``tensor_buft_overrides`` (regex, "CPU") that llama.cpp's ``--cpu-moe`` (one pattern for
    every block) and ``--n-cpu-moe N`` (one per MoE block below N) build; empty when neither is set."""
    if cpu_moe:
        return [(EXPERT_TENSOR_REGEX, "CPU")]
    return [(rf"blk\.{b}{EXPERT_TENSOR_REGEX}", "CPU") for b in cpu_expert_blocks(info, n_cpu_moe=n_cpu_moe)]


def expert_tensor_bytes(path: str | os.PathLike[str]) -> dict[int, int]:
    """Bytes of the routed-expert tensors of each block of a GGUF, from its tensor table."""
    sizes: dict[int, int] = {}
    for t in read_header(path).tensors:
        block = expert_block(t.name)
        if block is not None:
            sizes[block] = sizes.get(block, 0) + int(t.n_bytes)
    return sizes


def expert_placement(info: GgufModelInfo, cpu_moe: bool = False, n_cpu_moe: int = 0) -> dict[str, Any]:
    """Where ``--cpu-moe`` / ``--n-cpu-moe`` put the routed experts, as JSON for inspect and bench:
    the flags, the MoE blocks whose experts stay in system memory (``cpu_blocks``, out of
    ``moe_blocks``), the bytes of their expert tensors (``cpu_expert_bytes``) and of all blocks'
    expert tensors (``expert_bytes``)."""
    blocks = cpu_expert_blocks(info, cpu_moe, n_cpu_moe)
    sizes = expert_tensor_bytes(info.path)
    return {"cpu_moe": cpu_moe, "n_cpu_moe": n_cpu_moe, "cpu_blocks": blocks, "moe_blocks": len(info.moe_layers),
            "cpu_expert_bytes": sum(sizes.get(b, 0) for b in blocks), "expert_bytes": sum(sizes.values())}


def placement_line(placement: dict[str, Any]) -> str:
    """One line saying which blocks' routed experts are in system memory and how many MiB."""
    blocks = placement["cpu_blocks"]
    if not blocks:
        return "routed experts: none in system memory"
    mib = placement["cpu_expert_bytes"] / 2**20, placement["expert_bytes"] / 2**20
    return (f"routed experts of {len(blocks)} of {placement['moe_blocks']} MoE blocks ({_ranges(blocks)}) stay in "
            f"system memory: {mib[0]:.1f} of {mib[1]:.1f} MiB")


def _ranges(values: list[int]) -> str:
    """Sorted integers as compact ranges: [0, 1, 2, 5] -> "0-2,5"."""
    runs: list[list[int]] = []
    for v in values:
        if runs and runs[-1][1] == v - 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
