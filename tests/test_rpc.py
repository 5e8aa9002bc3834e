"""llama.cpp's RPC backend with the patches: clear errors before ggml could abort, and two
ggml-rpc-servers on 127.0.0.1 holding the layers of a budgeted model, Alloc-T on, give the local
run's logits.

The two-server test runs only with ALLOCMOE_RPC=1: it needs the RPC wheel and the server
(`allocmoe build-runtime --rpc`), about 15 minutes on 2 cores from an empty cache (seconds once
cached). Its client runs in a child process importing that wheel's llama_cpp, so the installed
runtime is left alone.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from allocmoe_edge.build_runtime import BuildOptions, build_wheel
from allocmoe_edge.errors import AllocMoeError
from allocmoe_edge.rpc import _check_reachable
from allocmoe_edge.runtime import load

from .ggufs import write_fake_moe

needs_rpc_build = pytest.mark.skipif(
    os.environ.get("ALLOCMOE_RPC") != "1",
    reason="set ALLOCMOE_RPC=1: builds the RPC wheel and rpc-server (~15 min uncached)")

RPC = BuildOptions(rpc=True)
ROOT = Path(__file__).resolve().parent.parent
# the child: logits of the same tokens (one ubatch) locally, then with every layer on the rpc-servers
CLIENT = """
import json, sys
import numpy as np
from allocmoe_edge.runtime import LoadChoice, load

path, servers, tokens, out = sys.argv[1], sys.argv[2].split(","), json.loads(sys.argv[3]), sys.argv[4]

def logits(token_k_max=None, **kw):  # plan 1: Alloc-T's batch rule runs in the layers whose count exceeds k_min
    llm = load(path, LoadChoice(plan_index=1, token_k_max=token_k_max), logits_all=True, n_ctx=64, n_batch=64,
               n_threads=2, type_k=0, type_v=0, **kw)
    llm.eval(tokens)
    scores = np.array(llm.scores[:len(tokens)], dtype=np.float32)
    llm.close()
    return scores

local = logits()
remote = logits(n_gpu_layers=99, rpc_servers=servers, verbose=True)
remote_without_alloc_t = logits(token_k_max=0, n_gpu_layers=99, rpc_servers=servers)
np.savez(out, local=local, remote=remote, remote_without_alloc_t=remote_without_alloc_t)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_endpoints_are_checked_before_ggml_sees_them():
    with pytest.raises(AllocMoeError, match="'localhost' is not host:port"):
        _check_reachable("localhost", timeout=1)
    port = _free_port()  # nothing listens there
    with pytest.raises(AllocMoeError, match=rf"rpc-server 127.0.0.1:{port} does not answer .*-p {port}"):
        _check_reachable(f"127.0.0.1:{port}", timeout=1)


def test_rpc_servers_need_offloaded_layers(tmp_path):
    pytest.importorskip("llama_cpp")
    with pytest.raises(AllocMoeError, match="give n_gpu_layers"):
        load(write_fake_moe(tmp_path / "m.gguf"), rpc_servers=["127.0.0.1:50052"])


@pytest.fixture(scope="module")
def rpc_runtime(tmp_path_factory) -> tuple[Path, Path]:
    """(a folder holding the RPC wheel's llama_cpp package, ggml-rpc-server), built or from the cache."""
    from allocmoe_edge.build_lib import build_rpc_server

    site = tmp_path_factory.mktemp("rpc-site")
    with zipfile.ZipFile(build_wheel(RPC)) as wheel:
        wheel.extractall(site)
    return site, build_rpc_server(RPC)


def _wait_listening(port: int, server: subprocess.Popen, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"rpc-server on port {port} did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.2)


@pytest.fixture
def rpc_servers(rpc_runtime, tmp_path) -> Iterator[list[str]]:
    """Two ggml-rpc-servers on 127.0.0.1 (one thread each); their endpoints."""
    _, binary = rpc_runtime
    servers, endpoints = [], []
    try:
        for i in range(2):
            port, log = _free_port(), tmp_path / f"rpc-server-{i}.log"
            with open(log, "w") as lf:
                servers.append(subprocess.Popen([str(binary), "--host", "127.0.0.1", "-p", str(port), "-t", "1"],
                                                stdout=lf, stderr=subprocess.STDOUT))
            _wait_listening(port, servers[-1], log)
            endpoints.append(f"127.0.0.1:{port}")
        yield endpoints
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.runtime
@needs_rpc_build
def test_split_over_two_rpc_servers_gives_the_local_logits(rpc_runtime, rpc_servers, bundled_budget_gguf, tmp_path):
    site, _ = rpc_runtime
    tokens = np.random.default_rng(0).integers(1, 1000, size=24).tolist()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "ALLOCMOE_GPU_ALLOC_T": "1"}
    child = subprocess.run([sys.executable, "-c", CLIENT, str(bundled_budget_gguf), ",".join(rpc_servers),
                            json.dumps(tokens), str(tmp_path / "logits.npz")], env=env, capture_output=True, text=True)
    assert child.returncode == 0, child.stderr[-4000:]
    for endpoint in rpc_servers:  # each server holds layers (buffer type RPC<device>[endpoint])
        assert f"RPC0[{endpoint}] model buffer size" in child.stderr
    logits = np.load(tmp_path / "logits.npz")
    assert np.array_equal(logits["remote"], logits["local"])
    # Alloc-T changed the result, so the equality above covers it
    assert not np.allclose(logits["remote"], logits["remote_without_alloc_t"], rtol=1e-3, atol=1e-3)
