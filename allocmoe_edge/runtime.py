"""Open a (budgeted) GGUF with the patched llama-cpp-python and pick its plan at load time.

Importable without torch. A file that carries a plan is refused on a stock library (which
would silently run it at full budget) unless ``allow_unpatched`` is set.
"""

from __future__ import annotations

import ctypes
import inspect
import os
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Any

from .errors import AllocMoeError
from .gguf_meta import TOKEN_MODES, ModelInfo, find_plan, open_reader, read_info


def llama_cpp_module() -> Any:
    """Import llama_cpp, with a clear error when it is missing."""
    try:
        import llama_cpp
    except ImportError as e:
        raise AllocMoeError("llama-cpp-python is not installed; run `allocmoe build-runtime`") from e
    except (OSError, RuntimeError) as e:  # the shared library failed to load
        raise AllocMoeError(f"llama-cpp-python is installed but its library does not load ({e}); "
                            "run `allocmoe build-runtime`") from e
    return llama_cpp


def patch_version() -> int | None:
    """The allocmoe patch-series version of the loaded libllama, or None for a stock build."""
    lib = llama_cpp_module().llama_cpp._lib
    fn = getattr(lib, "llama_allocmoe_version", None)
    if fn is None:
        return None
    fn.restype = ctypes.c_int32
    fn.argtypes = []
    return int(fn())


def doctor() -> dict[str, Any]:
    """What `allocmoe doctor` reports: which llama_cpp, patched or not, its backends."""
    try:
        llama_cpp = llama_cpp_module()
    except AllocMoeError as e:
        return {"installed": False, "patched": False, "error": str(e)}
    version = patch_version()
    lib_path = getattr(llama_cpp.llama_cpp._lib, "_name", None)
    return {
        "installed": True,
        "llama_cpp_python": getattr(llama_cpp, "__version__", "unknown"),
        "module": os.path.dirname(llama_cpp.__file__),
        "library": lib_path,
        "patched": version is not None,
        "allocmoe_patch_version": version,
        "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
    }


@dataclass(frozen=True)
class LoadChoice:
    """How a file is run: which stored plan, or full budget, or uniform top-k."""

    plan_index: int | None = None  # a stored plan (None: the file's default plan)
    full_budget: bool = False  # allocmoe.enabled = false
    uniform_k: int | None = None  # stock `<arch>.expert_used_count` override, plan disabled
    token_k_max: int | None = None  # override Alloc-T's k_max (0 turns Alloc-T off)
    token_mode: str | None = None  # override which Alloc-T rule runs: "batch", "decode" or "both" (gguf_meta)

    def kv_overrides(self, info: ModelInfo) -> dict[str, bool | int | float | str]:
        """The scalar kv_overrides that make llama.cpp run this choice."""
        kv: dict[str, bool | int | float | str] = {}
        if self.full_budget or self.uniform_k is not None:
            kv["allocmoe.enabled"] = False
        if self.uniform_k is not None:
            if not 1 <= self.uniform_k <= info.expert_count:
                raise AllocMoeError(f"uniform top-k {self.uniform_k} is outside [1, {info.expert_count}]")
            kv[f"{info.architecture}.expert_used_count"] = int(self.uniform_k)
        if self.plan_index is not None:
            if not 0 <= self.plan_index < len(info.plans):
                raise AllocMoeError(f"plan {self.plan_index} does not exist; {info.path} stores {len(info.plans)} plan(s)")
            kv["allocmoe.plan_index"] = int(self.plan_index)
        if self.token_k_max is not None:
            kv["allocmoe.token_k_max"] = int(self.token_k_max)
        if self.token_mode is not None:
            if self.token_mode not in TOKEN_MODES:
                raise AllocMoeError(f"token mode {self.token_mode!r} is not one of {', '.join(TOKEN_MODES)}")
            kv["allocmoe.token_mode"] = self.token_mode
        return kv


def choice_for_budget(info: ModelInfo, budget: float | None) -> LoadChoice:
    """Full budget for 1.0, the stored plan closest to ``budget`` otherwise, the default for None."""
    if budget is None:
        return LoadChoice()
    if not 0 < budget <= 1:
        raise AllocMoeError(f"budget {budget} must be a fraction in (0, 1]")
    if budget == 1:
        return LoadChoice(full_budget=True)
    return LoadChoice(plan_index=find_plan(info, budget))


def load(path: str | os.PathLike[str], choice: LoadChoice | None = None, *, allow_unpatched: bool = False,
         verbose: bool = False, info: ModelInfo | None = None, cpu_moe: bool = False, n_cpu_moe: int = 0,
         **llama_kwargs: Any) -> Any:
    """Load ``path`` as a ``llama_cpp.Llama`` running ``choice``; clean errors for bad files.

    ``info`` is the file's metadata when the caller has already read it (evaluations load one
    file many times; gguf-py takes seconds over a large vocabulary). ``cpu_moe`` /
    ``n_cpu_moe`` keep routed experts in system memory as llama.cpp's ``--cpu-moe`` /
    ``--n-cpu-moe`` do (see `cpu_moe_overrides`).
    """
    info = info or read_info(path)
    choice = choice or LoadChoice()
    kv = choice.kv_overrides(info)
    llama_cpp = llama_cpp_module()
    if info.allocmoe.get("layer_expert_counts") is not None and patch_version() is None:
        if not allow_unpatched:
            raise AllocMoeError(
                f"{path} carries a budget plan but the installed llama-cpp-python is a stock build, which would "
                "run it at full budget; run `allocmoe build-runtime` (or pass --allow-unpatched)")
        warnings.warn("stock llama-cpp-python: running the file at full budget", stacklevel=2)
        kv = {k: v for k, v in kv.items() if not k.startswith("allocmoe.")}
    if _alloc_t_on_gpu(info, kv, llama_kwargs.get("n_gpu_layers", 0)) and not os.environ.get(GPU_ALLOC_T_ENV):
        warnings.warn(f"Alloc-T is off for GPU-offloaded layers: it aborted with a CUDA error on an H200 (repeated "
                      "experts in mul_mat_id's ids), and the fix (patch 0002: distinct experts per ids column) and the "
                      "decode rule's skipped ids (patch 0004) have not run on a GPU yet (scripts/gpu_check.sh checks "
                      f"them); per-layer counts still apply (set {GPU_ALLOC_T_ENV}=1 to run Alloc-T there)",
                      stacklevel=2)
        kv["allocmoe.token_k_max"] = 0
    llama_kwargs.update(_cpu_moe_kwargs(info, cpu_moe, n_cpu_moe))
    llama_kwargs.setdefault("n_ctx", 512)
    _install_log()
    _LOG.loading = []
    try:
        return llama_cpp.Llama(model_path=str(path), kv_overrides=kv or None, verbose=verbose, **llama_kwargs)
    except ValueError as e:
        reason = _LOG.loading[0].removeprefix("llama_model_load: ") if _LOG.loading else str(e)
        raise AllocMoeError(f"llama.cpp could not load {path}: {reason}") from e
    finally:
        _LOG.loading = None


GPU_ALLOC_T_ENV = "ALLOCMOE_GPU_ALLOC_T"


def cpu_expert_blocks(info: ModelInfo, cpu_moe: bool = False, n_cpu_moe: int = 0) -> list[int]:
    """MoE blocks whose routed experts stay in system memory, as llama.cpp's ``--cpu-moe`` (all of
    them) and ``--n-cpu-moe N`` (those among the first N blocks) place them."""
    if n_cpu_moe < 0:
        raise AllocMoeError(f"--n-cpu-moe {n_cpu_moe} must be >= 0")
    return [b for b in info.moe_layers if cpu_moe or b < n_cpu_moe]


# llama.cpp's LLM_FFN_EXPS_REGEX (common/common.h): the routed-expert tensors of a block
EXPERT_TENSOR_REGEX = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"


def cpu_moe_overrides(info: ModelInfo, cpu_moe: bool = False, n_cpu_moe: int = 0) -> list[tuple[str, str]]:
    """The ``tensor_buft_overrides`` (regex, "CPU") that llama.cpp's ``--cpu-moe`` (one pattern for
    every block) and ``--n-cpu-moe N`` (one per MoE block below N) build; empty when neither is set."""
    if cpu_moe:
        return [(EXPERT_TENSOR_REGEX, "CPU")]
    return [(rf"blk\.{b}{EXPERT_TENSOR_REGEX}", "CPU") for b in cpu_expert_blocks(info, n_cpu_moe=n_cpu_moe)]


def _cpu_moe_kwargs(info: ModelInfo, cpu_moe: bool, n_cpu_moe: int) -> dict[str, Any]:
    """``Llama`` kwargs for the flags (none when unused, so stock bindings still load); on a build
    with GPU offload, say on stderr which experts stay in system memory."""
    overrides = cpu_moe_overrides(info, cpu_moe, n_cpu_moe)
    if not overrides:
        return {}
    llama_cpp = llama_cpp_module()
    if "tensor_buft_overrides" not in inspect.signature(llama_cpp.Llama.__init__).parameters:
        raise AllocMoeError("--cpu-moe / --n-cpu-moe need tensor buffer overrides, which the installed "
                            "llama-cpp-python lacks; run `allocmoe build-runtime`")
    if llama_cpp.llama_supports_gpu_offload():
        print(f"allocmoe: {placement_line(expert_placement(info, cpu_moe, n_cpu_moe))}", file=sys.stderr)
    return {"tensor_buft_overrides": overrides}


def expert_tensor_bytes(path: str | os.PathLike[str]) -> dict[int, int]:
    """Bytes of the routed-expert tensors of each block of a GGUF, from its tensor table."""
    sizes: dict[int, int] = {}
    for t in open_reader(path).tensors:
        m = re.match(r"blk\.(\d+)\.", t.name)
        if m and re.search(EXPERT_TENSOR_REGEX, t.name):
            sizes[int(m.group(1))] = sizes.get(int(m.group(1)), 0) + int(t.n_bytes)
    return sizes


def expert_placement(info: ModelInfo, cpu_moe: bool = False, n_cpu_moe: int = 0) -> dict[str, Any]:
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


def _alloc_t_on_gpu(info: ModelInfo, kv: dict[str, bool | int | float | str], n_gpu_layers: int) -> bool:
    """Whether this load would run Alloc-T with layers on a GPU backend."""
    if n_gpu_layers == 0 or kv.get("allocmoe.enabled") is False:
        return False
    k_max = kv.get("allocmoe.token_k_max", info.allocmoe.get("token_k_max", 0))
    return bool(k_max) and bool(llama_cpp_module().llama_supports_gpu_offload())


class _LogState:
    """llama.cpp's error lines: kept for the message while a model loads, printed otherwise."""

    def __init__(self) -> None:
        self.loading: list[str] | None = None
        self.callback: Any = None


_LOG = _LogState()
_GGML_LOG_LEVEL_ERROR = 4


def _install_log() -> None:
    """Route llama.cpp's log through llama-cpp-python's logger, except error lines.

    llama-cpp-python maps ggml's ERROR level to DEBUG, so without ``verbose`` it hides
    the reason of a failed load and the text of a CUDA error before an abort. Error lines
    are kept for the load error's message while loading, and written to stderr otherwise.
    """
    if _LOG.callback is not None:
        return
    import logging
    import sys

    llama_cpp = llama_cpp_module()
    from llama_cpp import _logger

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data: Any) -> None:
        error = level == _GGML_LOG_LEVEL_ERROR
        if error and _LOG.loading is not None:
            _LOG.loading.append(text.decode("utf-8", errors="replace").strip())
        if not error or _logger.logger.isEnabledFor(logging.DEBUG):
            _logger.llama_log_callback(level, text, user_data)
        elif _LOG.loading is None:
            print(text.decode("utf-8", errors="replace"), end="", flush=True, file=sys.stderr)

    _LOG.callback = callback  # ctypes callbacks must outlive their registration
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


def layer_counts(llm: Any) -> list[int]:
    """Routed experts per token that the loaded model executes at each block (patched library)."""
    lib = llama_cpp_module().llama_cpp._lib
    fn = lib.llama_model_allocmoe_layer_count
    fn.restype = ctypes.c_int32
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int32]
    model = llm._model.model
    n_layer = llama_cpp_module().llama_model_n_layer(model)
    return [int(fn(model, i)) for i in range(n_layer)]
