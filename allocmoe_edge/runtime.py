"""Open a (budgeted) GGUF with the patched llama-cpp-python and pick its plan at load time or per context.

Importable without torch. A file that carries a plan is refused on a stock library (which
would silently run it at full budget) unless ``allow_unpatched`` is set. Where routed experts are
placed (``--cpu-moe``) is in `placement`, rpc-servers are in `rpc`.
"""

from __future__ import annotations

import ctypes
import inspect
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import AllocMoeError
from .gguf_meta import GgufModelInfo, Keys, find_plan, read_info
from .peers import check_value
from .placement import cpu_moe_overrides, expert_placement, placement_line
from .plan import TOKEN_MODES, check_fraction

# llama_allocmoe_version() of the patch series this package builds (patches/0004; 6: 0010; 7: 0011)
PATCH_SERIES_VERSION = 7


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


def require_patched(what: str) -> None:
    """Raise unless the loaded libllama carries the patch series (`PATCH_SERIES_VERSION` or later); the
    installed wheel is cached by the series' hash, so it has every patch. ``what`` starts the message."""
    version = patch_version()
    if version is None or version < PATCH_SERIES_VERSION:
        installed = "a stock build, which runs every plan at full budget" if version is None else f"series {version}"
        raise AllocMoeError(f"{what} needs the patched llama-cpp-python of series {PATCH_SERIES_VERSION} or later "
                            f"(installed: {installed}); run `allocmoe build-runtime`")


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
        "devices": devices(),
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
    }


_DEVICE_TYPES = ("CPU", "GPU", "IGPU", "ACCEL", "META")  # ggml's enum ggml_backend_dev_type


def devices() -> list[dict[str, str]]:
    """The ggml devices the installed runtime sees, as llama.cpp's --list-devices names them: each with its
    backend (CPU, CUDA, Vulkan, RPC, ...), name, description and type. A Vulkan build lists lavapipe (a CPU
    device) only when GGML_VK_VISIBLE_DEVICES names it."""
    lib = llama_cpp_module().llama_cpp._lib
    for name, restype, argtypes in (("ggml_backend_dev_count", ctypes.c_size_t, []),
                                    ("ggml_backend_dev_get", ctypes.c_void_p, [ctypes.c_size_t]),
                                    ("ggml_backend_dev_name", ctypes.c_char_p, [ctypes.c_void_p]),
                                    ("ggml_backend_dev_description", ctypes.c_char_p, [ctypes.c_void_p]),
                                    ("ggml_backend_dev_type", ctypes.c_int, [ctypes.c_void_p]),
                                    ("ggml_backend_dev_backend_reg", ctypes.c_void_p, [ctypes.c_void_p]),
                                    ("ggml_backend_reg_name", ctypes.c_char_p, [ctypes.c_void_p])):
        getattr(lib, name).restype, getattr(lib, name).argtypes = restype, argtypes
    out = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        kind = lib.ggml_backend_dev_type(dev)
        out.append({"backend": lib.ggml_backend_reg_name(lib.ggml_backend_dev_backend_reg(dev)).decode(),
                    "name": lib.ggml_backend_dev_name(dev).decode(),
                    "description": lib.ggml_backend_dev_description(dev).decode(errors="replace"),
                    "type": _DEVICE_TYPES[kind] if 0 <= kind < len(_DEVICE_TYPES) else str(kind)})
    return out


@dataclass(frozen=True)
class LoadChoice:
    """How a file is run: which stored plan, or full budget, or uniform top-k."""

    plan_index: int | None = None  # a stored plan (None: the file's default plan)
    full_budget: bool = False  # allocmoe.enabled = false
    uniform_k: int | None = None  # stock `<arch>.expert_used_count` override, plan disabled
    token_k_max: int | None = None  # override Alloc-T's k_max (0 turns Alloc-T off)
    token_mode: str | None = None  # override which Alloc-T rule runs: "batch", "decode" or "both" (gguf_meta)
    decode_control: bool | None = None  # the decode rule's budget controller on / off (default: on)
    decode_window: int | None = None  # its window in tokens (default: 64)
    token_rule: str | None = None  # a per-token rule of the field instead of Alloc-T: "ser" or "top_p" (peers)
    token_rule_value: float | None = None  # its value: SER's t, top-p's p
    token_rule_k_min: int | None = None  # the experts it keeps at least (default: 1)

    def kv_overrides(self, info: GgufModelInfo) -> dict[str, bool | int | float | str]:
        """The scalar kv_overrides that make llama.cpp run this choice."""
        import gguf

        kv: dict[str, bool | int | float | str] = {}
        if self.full_budget or self.uniform_k is not None:
            kv[Keys.ENABLED] = False
        if self.uniform_k is not None:
            if not 1 <= self.uniform_k <= info.expert_count:
                raise AllocMoeError(f"uniform top-k {self.uniform_k} is outside [1, {info.expert_count}]")
            kv[gguf.Keys.LLM.EXPERT_USED_COUNT.format(arch=info.architecture)] = int(self.uniform_k)
        if self.plan_index is not None:
            if not 0 <= self.plan_index < len(info.plans):
                raise AllocMoeError(f"plan {self.plan_index} does not exist; {info.path} stores "
                                    f"{len(info.plans)} plan(s)")
            kv[Keys.PLAN_INDEX] = int(self.plan_index)
        if self.token_k_max is not None:
            kv[Keys.TOKEN_K_MAX] = int(self.token_k_max)
        if self.token_mode is not None:
            if self.token_mode not in TOKEN_MODES:
                raise AllocMoeError(f"token mode {self.token_mode!r} is not one of {', '.join(TOKEN_MODES)}")
            kv[Keys.TOKEN_MODE] = self.token_mode
        if self.decode_control is not None:
            kv[Keys.DECODE_CONTROL] = bool(self.decode_control)
        if self.decode_window is not None:
            if not 1 <= self.decode_window <= 65536:
                raise AllocMoeError(f"decode window {self.decode_window} is outside [1, 65536] tokens")
            kv[Keys.DECODE_WINDOW] = int(self.decode_window)
        if self.token_rule is not None:
            if self.token_rule_value is None:
                raise AllocMoeError(f"token rule {self.token_rule!r} needs its value")
            kv[Keys.TOKEN_RULE] = self.token_rule
            kv[Keys.TOKEN_RULE_VALUE] = check_value(self.token_rule, self.token_rule_value)
            if self.token_rule_k_min is not None:
                if not 1 <= self.token_rule_k_min <= info.expert_count:
                    raise AllocMoeError(f"token rule k_min {self.token_rule_k_min} is outside [1, {info.expert_count}]")
                kv[Keys.TOKEN_RULE_K_MIN] = int(self.token_rule_k_min)
        return kv


def choice_for_budget(info: GgufModelInfo, budget: float | None) -> LoadChoice:
    """Full budget for 1.0, the stored plan closest to ``budget`` otherwise, the default for None."""
    if budget is None:
        return LoadChoice()
    if check_fraction(budget) == 1:
        return LoadChoice(full_budget=True)
    return LoadChoice(plan_index=find_plan(info, budget))


def load(path: str | os.PathLike[str], choice: LoadChoice | None = None, *, budget: float | None = None,
         allow_unpatched: bool = False, verbose: bool = False, info: GgufModelInfo | None = None, cpu_moe: bool = False,
         n_cpu_moe: int = 0, rpc_servers: Sequence[str] = (), **llama_kwargs: Any) -> Any:
    """Load ``path`` as a ``llama_cpp.Llama`` running ``choice``; clean errors for bad files.

    ``budget`` (a fraction in (0, 1]) is the short form of ``choice_for_budget``: the stored plan
    closest to it, or full budget for 1.0. ``info`` is the file's metadata when the caller has
    already read it (evaluations load one file many times; gguf-py takes seconds over a large
    vocabulary). ``cpu_moe`` / ``n_cpu_moe`` keep routed experts in system memory as llama.cpp's
    ``--cpu-moe`` / ``--n-cpu-moe`` do (see `placement.cpu_moe_overrides`). ``rpc_servers`` ("host:port"
    of llama.cpp rpc-servers) offload the ``n_gpu_layers`` layers to them (see `rpc.add_rpc_servers`).
    Every other keyword goes to ``llama_cpp.Llama``.
    """
    info = info or read_info(path)
    if budget is not None:
        if choice is not None:
            raise AllocMoeError("give a LoadChoice or a budget, not both")
        choice = choice_for_budget(info, budget)
    choice = choice or LoadChoice()
    kv = choice.kv_overrides(info)
    llama_cpp = llama_cpp_module()
    if choice.token_rule is not None:
        require_patched(f"token rule {choice.token_rule}")
    if rpc_servers:
        from .rpc import add_rpc_servers  # rpc imports this module

        if not llama_kwargs.get("n_gpu_layers"):
            raise AllocMoeError("rpc_servers take the offloaded layers: give n_gpu_layers (-1 or 99 for all of them)")
        add_rpc_servers(rpc_servers)
    if info.meta.has_plan and patch_version() is None:
        if not allow_unpatched:
            raise AllocMoeError(
                f"{path} carries a budget plan but the installed llama-cpp-python is a stock build, which would "
                "run it at full budget; run `allocmoe build-runtime` (or pass --allow-unpatched)")
        warnings.warn("stock llama-cpp-python: running the file at full budget", stacklevel=2)
        kv = {k: v for k, v in kv.items() if not k.startswith(Keys.PREFIX)}
    unverified = _unverified_gpu_backends(info, kv, llama_kwargs.get("n_gpu_layers", 0))
    if unverified and not os.environ.get(GPU_ALLOC_T_ENV):
        warnings.warn(f"Alloc-T is off for layers offloaded to {'/'.join(unverified)}: it aborted with a CUDA error "
                      "on an H200 (repeated experts in mul_mat_id's ids), and the fix (patch 0005: distinct experts "
                      "per ids column) and the decode rule's skipped ids (patch 0002) have not run on such a GPU yet "
                      "(scripts/gpu_check.sh checks them; Vulkan is checked on every `make test`); per-layer counts "
                      f"still apply (set {GPU_ALLOC_T_ENV}=1 to run Alloc-T there)", stacklevel=2)
        kv[Keys.TOKEN_K_MAX] = 0
    llama_kwargs.update(_cpu_moe_kwargs(info, cpu_moe, n_cpu_moe))
    llama_kwargs.setdefault("n_ctx", 512)
    install_log()
    _LOG.loading = []
    try:
        return llama_cpp.Llama(model_path=str(path), kv_overrides=kv or None, verbose=verbose, **llama_kwargs)
    except ValueError as e:
        reason = _LOG.loading[0].removeprefix("llama_model_load: ") if _LOG.loading else str(e)
        raise AllocMoeError(f"llama.cpp could not load {path}: {reason}") from e
    finally:
        _LOG.loading = None


GPU_ALLOC_T_ENV = "ALLOCMOE_GPU_ALLOC_T"


def _cpu_moe_kwargs(info: GgufModelInfo, cpu_moe: bool, n_cpu_moe: int) -> dict[str, Any]:
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


# GPU backends whose Alloc-T runs are checked against the CPU by `make test` (tests/test_gpu.py on lavapipe)
VERIFIED_GPU_BACKENDS = ("Vulkan",)


def _unverified_gpu_backends(info: GgufModelInfo, kv: dict[str, bool | int | float | str],
                             n_gpu_layers: int) -> list[str]:
    """The backends outside `VERIFIED_GPU_BACKENDS` that would run Alloc-T on offloaded layers in this load."""
    if n_gpu_layers == 0 or kv.get(Keys.ENABLED) is False:
        return []
    if not kv.get(Keys.TOKEN_K_MAX, info.meta.token_k_max) or not llama_cpp_module().llama_supports_gpu_offload():
        return []
    return sorted({d["backend"] for d in devices()} - {"CPU", *VERIFIED_GPU_BACKENDS})


class _LogState:
    """llama.cpp's error lines: kept for the message while a model loads, printed otherwise."""

    def __init__(self) -> None:
        self.loading: list[str] | None = None
        self.callback: Any = None


_LOG = _LogState()
_GGML_LOG_LEVEL_ERROR = 4


def forward_log(level: int, text: bytes, user_data: Any) -> None:
    """Route one llama.cpp log line through llama-cpp-python's logger, except error lines.

    llama-cpp-python maps ggml's ERROR level to DEBUG, so without ``verbose`` it hides
    the reason of a failed load and the text of a CUDA error before an abort. Error lines
    are kept for the load error's message while loading, and written to stderr otherwise.
    """
    import logging

    from llama_cpp import _logger

    error = level == _GGML_LOG_LEVEL_ERROR
    if error and _LOG.loading is not None:
        _LOG.loading.append(text.decode("utf-8", errors="replace").strip())
    if not error or _logger.logger.isEnabledFor(logging.DEBUG):
        _logger.llama_log_callback(level, text, user_data)
    elif _LOG.loading is None:
        print(text.decode("utf-8", errors="replace"), end="", flush=True, file=sys.stderr)


def install_log(force: bool = False) -> None:
    """Make `forward_log` llama.cpp's log callback (once; again with ``force``, after another was set)."""
    llama_cpp = llama_cpp_module()
    if _LOG.callback is None:
        _LOG.callback = llama_cpp.llama_log_callback(forward_log)  # ctypes callbacks must outlive their registration
    elif not force:
        return
    llama_cpp.llama_log_set(_LOG.callback, ctypes.c_void_p(0))


def layer_counts(llm: Any) -> list[int]:
    """Routed experts per token that ``llm``'s context executes at each block (patched library): the plan
    it runs now, which `use_plan` may have changed since the load."""
    lib = llama_cpp_module().llama_cpp._lib
    fn = lib.llama_allocmoe_layer_count
    fn.restype = ctypes.c_int32
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int32]
    n_layer = llama_cpp_module().llama_model_n_layer(llm._model.model)
    return [int(fn(llm._ctx.ctx, i)) for i in range(n_layer)]


def context_plan(choice: LoadChoice) -> int:
    """The plan argument of llama_allocmoe_set_plan for ``choice`` (a stored plan, full budget or the
    plan chosen at load); uniform top-k and the Alloc-T overrides are chosen at load only."""
    if any(x is not None for x in (choice.uniform_k, choice.token_k_max, choice.token_mode, choice.token_rule)):
        raise AllocMoeError("uniform top-k, token_k_max, token_mode and token_rule are chosen when the model is "
                            "loaded; a context chooses a stored plan or full budget")
    llama_cpp = llama_cpp_module()
    if choice.full_budget:
        return llama_cpp.LLAMA_ALLOCMOE_PLAN_FULL
    return llama_cpp.LLAMA_ALLOCMOE_PLAN_MODEL if choice.plan_index is None else choice.plan_index


def set_context_plan(ctx: Any, choice: LoadChoice) -> None:
    """Run ``choice`` in the llama.cpp context ``ctx`` from its next decode, without reloading the
    weights: every context of one loaded model may run another stored plan (its graph is rebuilt
    for the plan). Tokens already in the context's KV cache were computed under the previous plan.
    Calls the function as the patched bindings declare it (patches/bindings/0002)."""
    require_patched("choosing a plan per context")
    llama_cpp = llama_cpp_module()
    install_log()
    _LOG.loading = []
    try:
        if llama_cpp.llama_allocmoe_set_plan(ctx, context_plan(choice)) != 0:
            reason = _LOG.loading[0] if _LOG.loading else "see llama.cpp's log"
            raise AllocMoeError(f"llama.cpp cannot run this plan: {reason.split('allocmoe: ', 1)[-1]}")
    finally:
        _LOG.loading = None


def use_plan(llm: Any, choice: LoadChoice) -> None:
    """`set_context_plan` on a ``llama_cpp.Llama``'s own context, emptying its KV cache (and
    llama-cpp-python's record of it) so no token computed under another plan is reused: one loaded
    model serves every stored budget, one request after another."""
    set_context_plan(llm._ctx.ctx, choice)
    llm.reset()
    llm._ctx.kv_cache_clear()
