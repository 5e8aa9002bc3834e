"""llama.cpp's RPC backend: rpc-servers on other machines as ggml devices for the offloaded layers."""

from __future__ import annotations

import ctypes
import socket
from collections.abc import Sequence
from typing import Any

from .errors import AllocMoeError
from .runtime import llama_cpp_module

_RPC_SERVERS: set[str] = set()  # endpoints registered in this process


def add_rpc_servers(endpoints: Sequence[str], timeout: float = 5.0) -> None:
    """Register llama.cpp rpc-servers ("host:port") as ggml devices, as llama.cpp's ``--rpc`` does.

    Registration is per process and permanent: every later load with ``n_gpu_layers`` > 0 splits
    its offloaded layers over all registered servers (and local GPUs), RPC devices first, in
    proportion to their free memory (``tensor_split`` sets other proportions). Each endpoint is
    reached once first, because ggml aborts the process when a server does not answer.
    """
    llama_cpp = llama_cpp_module()
    if not llama_cpp.llama_supports_rpc():
        raise AllocMoeError("the installed llama-cpp-python was built without RPC; run `allocmoe build-runtime --rpc`")
    lib = llama_cpp.llama_cpp._lib
    add_server = _rpc_add_server(lib)
    lib.ggml_backend_register.argtypes = [ctypes.c_void_p]
    for endpoint in endpoints:
        if endpoint in _RPC_SERVERS:
            continue
        _check_reachable(endpoint, timeout)
        reg = add_server(endpoint.encode())
        if not reg:
            raise AllocMoeError(f"rpc-server {endpoint} offers no device")
        lib.ggml_backend_register(reg)
        _RPC_SERVERS.add(endpoint)


def _rpc_add_server(lib: Any) -> Any:
    """ggml's ``ggml_backend_rpc_add_server(endpoint) -> backend registry``, found as llama.cpp's
    common/arg.cpp finds it: through the RPC registry's proc address."""
    lib.ggml_backend_reg_by_name.restype = ctypes.c_void_p
    lib.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
    lib.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    lib.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    rpc = lib.ggml_backend_reg_by_name(b"RPC")
    address = lib.ggml_backend_reg_get_proc_address(rpc, b"ggml_backend_rpc_add_server")
    return ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(address)


def _check_reachable(endpoint: str, timeout: float) -> None:
    """Raise a clear error unless a TCP connection to ``endpoint`` ("host:port") opens."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise AllocMoeError(f"rpc-server {endpoint!r} is not host:port")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise AllocMoeError(f"rpc-server {endpoint} does not answer ({e}); start it there with "
                            f"`ggml-rpc-server --host 0.0.0.0 -p {port}`") from e
