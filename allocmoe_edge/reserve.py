"""What a context reserves before it runs: compute buffers and graph size, as llama.cpp reports them.

llama.cpp sizes every backend's compute buffer for the worst-case (one full ubatch) graph when a
context is created. `measure` creates one on a metadata-only load (llama.cpp's ``no_alloc``, the
mode behind its ``--fit``): no weight is read, so a weightless (sparse) synthetic file of a 30B
model measures in seconds. It reads llama.cpp's own lines: "<buffer type> compute buffer size",
"max_nodes" and the reserved graph's nodes and splits.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .errors import AllocMoeError

_BUFFER = re.compile(r"(\S+) compute buffer size (?:=|is) *([0-9.]+) MiB")
_MAX_NODES = re.compile(r"max_nodes = (\d+)")
_GRAPH = re.compile(r"graph[^:]*: nodes = (\d+)(?: / (\d+))?, splits = (\d+)")


@dataclass(frozen=True)
class Reservation:
    """One context's reservation: compute buffer MiB per buffer type, and its graphs."""

    compute_mib: dict[str, float]
    graph_nodes: int  # nodes of the ubatch (prompt) graph
    graph_nodes_token: int  # nodes of the one-token graph
    max_nodes: int  # graph size llama.cpp allocated (llama_context::graph_max_nodes)
    graph_splits: int

    @property
    def total_mib(self) -> float:
        return sum(self.compute_mib.values())


@contextlib.contextmanager
def _metadata_only(llama_cpp: Any) -> Iterator[None]:
    """Make ``llama_cpp.Llama`` load models with ``no_alloc`` (its constructor has no such option)."""
    lowlevel = llama_cpp.llama_cpp
    default = lowlevel.llama_model_default_params

    def params() -> Any:
        p = default()
        p.no_alloc = True
        return p

    lowlevel.llama_model_default_params = params
    try:
        yield
    finally:
        lowlevel.llama_model_default_params = default


def measure(path: str | os.PathLike[str], choice: Any = None, n_ubatch: int = 512, n_ctx: int | None = None,
            **load_kwargs: Any) -> Reservation:
    """Create a context for ``path`` under ``choice`` (a `runtime.LoadChoice`) without loading weights and
    return what it reserved. ``load_kwargs`` go to `runtime.load` (n_gpu_layers, cpu_moe, ...)."""
    from . import runtime

    llama_cpp = runtime.llama_cpp_module()
    runtime.install_log()
    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def capture(level: int, text: bytes, user_data: Any) -> None:
        lines.append(text.decode("utf-8", errors="replace"))
        runtime.forward_log(level, text, user_data)

    llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
    try:
        with _metadata_only(llama_cpp):
            llm = runtime.load(path, choice, n_ctx=n_ctx or max(512, n_ubatch), n_batch=n_ubatch, n_ubatch=n_ubatch,
                               use_mmap=False, **load_kwargs)
        llm.close()
    finally:
        runtime.install_log(force=True)
    return _parse("".join(lines))


def _parse(log: str) -> Reservation:
    buffers = {m.group(1): float(m.group(2)) for m in _BUFFER.finditer(log)}
    graph, max_nodes = _GRAPH.search(log), _MAX_NODES.search(log)
    if not buffers or graph is None or max_nodes is None:
        raise AllocMoeError("llama.cpp did not report its compute buffers and graph (log format changed?)")
    nodes = int(graph.group(1))
    return Reservation(compute_mib=buffers, graph_nodes=nodes, graph_nodes_token=int(graph.group(2) or nodes),
                       max_nodes=int(max_nodes.group(1)), graph_splits=int(graph.group(3)))
