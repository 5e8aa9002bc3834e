"""Helpers for tests that run llama.cpp's own programs: --override-kv flags and a llama-server process."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest


def override_flags(overrides: dict[str, bool | int | float | str], flag: str = "--override-kv") -> list[str]:
    """llama.cpp's --override-kv flags for ``LoadChoice.kv_overrides``."""
    return [part for k, v in overrides.items() for part in (flag, f"{k}={typed_value(v)}")]


def typed_value(v: bool | int | float | str) -> str:
    """``type:value`` as llama.cpp's --override-kv reads it."""
    if isinstance(v, bool):
        return f"bool:{str(v).lower()}"
    return f"int:{v}" if isinstance(v, int) else f"float:{v}" if isinstance(v, float) else f"str:{v}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, body: dict[str, Any] | None = None, timeout: float = 120) -> tuple[int, str]:
    """GET (or POST ``body`` as JSON): the status and the text of the answer, error statuses included."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@contextmanager
def llama_server(cmd: Sequence[str], log: Path, port: int, timeout: float = 120,
                 cwd: Path | None = None) -> Iterator[str]:
    """Run llama-server ``cmd`` (which listens on ``port``) until the block ends; yields its base URL once
    /health answers 200. Fails with the server's log if it exits or never gets ready."""
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as lf:
        server = subprocess.Popen(list(cmd), stdout=lf, stderr=subprocess.STDOUT, cwd=cwd)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if server.poll() is not None:
                pytest.fail(f"llama-server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if http(f"{url}/health", timeout=5)[0] == 200:
                    break
            except (ConnectionError, urllib.error.URLError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama-server not ready within {timeout} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
