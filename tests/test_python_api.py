"""The README's Python API examples, run as written on the bundled model with three plans, and
llama-cpp-python's OpenAI-compatible server serving a chosen plan."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from allocmoe_edge.errors import AllocMoeError
from allocmoe_edge.runtime import LoadChoice, load

from .conftest import BUNDLED_PLANS
from .ggufs import write_fake_moe
from .llama_programs import free_port

README = Path(__file__).resolve().parent.parent / "README.md"
# the modules of the `server` extra (llama-cpp-python's own server extra)
SERVER_MODULES = ("uvicorn", "fastapi", "pydantic_settings", "sse_starlette", "starlette_context", "yaml")
PROMPT = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "repeat_penalty": 1.0}


def readme_blocks(section: str, language: str = "python") -> list[str]:
    """The fenced ``language`` code blocks of the README section titled ``section``."""
    body = README.read_text().split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", body, flags=re.S)


def _run_block(code: str, name: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {}
    exec(compile(code, name, "exec"), namespace)
    return namespace


def test_a_budget_or_a_choice_not_both(tmp_path):
    with pytest.raises(AllocMoeError, match="a LoadChoice or a budget, not both"):
        load(write_fake_moe(tmp_path / "m.gguf"), LoadChoice(plan_index=0), budget=0.5)


@pytest.mark.slow
@pytest.mark.runtime
def test_readme_python_api_examples_run(patched_runtime, bundled_budget_gguf, tmp_path, monkeypatch):
    from allocmoe_edge.runtime import layer_counts

    first, second, third = readme_blocks("Python API")
    (tmp_path / "model.budget.gguf").symlink_to(bundled_budget_gguf)
    monkeypatch.chdir(tmp_path)
    basics = _run_block(first, "README.md: Python API, first example")
    assert layer_counts(basics["llm"]) == BUNDLED_PLANS[1]  # budget=0.5
    assert basics["out"]["usage"]["completion_tokens"] > 0 and basics["out"]["choices"][0]["text"]
    assert basics["reply"]["choices"][0]["message"]["role"] == "assistant"
    choices = _run_block(second, "README.md: Python API, second example")
    assert layer_counts(choices["llm"]) == BUNDLED_PLANS[2]
    assert layer_counts(choices["full"]) == [4, 4, 4, 4] and layer_counts(choices["uniform"]) == [2, 2, 2, 2]
    assert layer_counts(choices["hybrid"]) == BUNDLED_PLANS[1]
    per_context = _run_block(third, "README.md: Python API, third example")
    for name, choice in (("plan 2", LoadChoice(plan_index=2)), ("full", LoadChoice(full_budget=True))):
        alone = load(bundled_budget_gguf, choice, n_ctx=1024)
        expected = alone.create_completion("Once upon a time", max_tokens=8, temperature=0)["choices"][0]["text"]
        assert per_context["texts"][name] == expected, name
        alone.close()


def _post_when_up(url: str, body: dict[str, Any], server: subprocess.Popen, log: Path,
                  timeout: float) -> dict[str, Any]:
    """POST ``body`` as JSON once the server answers; fail with its log if it exits or never answers."""
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    while True:
        if server.poll() is not None:
            pytest.fail(f"the server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.load(response)
        except urllib.error.HTTPError:
            raise  # the server answered, with an error status
        except (ConnectionError, urllib.error.URLError):
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not answer within {timeout} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.runtime
def test_openai_server_serves_a_chosen_plan(patched_runtime, bundled_budget_gguf, tmp_path):
    """Loaded at plan 1; requests without ``allocmoe_plan`` run it, others run plan 2 and full budget
    on the same loaded model, each giving the text of that plan loaded in this process."""
    missing = [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"the server's dependencies are not installed ({', '.join(missing)}): pip install -e '.[server]'")
    port = free_port()
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(bundled_budget_gguf),
           "--kv_overrides", "allocmoe.plan_index=int:1", "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "256"]
    url = f"http://127.0.0.1:{port}/v1/completions"
    with open(log, "w") as lf:
        server = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT)
    try:
        served = {None: _post_when_up(url, PROMPT, server, log, timeout=120)}
        for plan in (2, -1, None):  # None last: back to the plan chosen at load
            served[plan] = _post_when_up(url, {**PROMPT, "allocmoe_plan": plan}, server, log, timeout=10)
        with pytest.raises(urllib.error.HTTPError, match="400"):
            _post_when_up(url, {**PROMPT, "allocmoe_plan": len(BUNDLED_PLANS)}, server, log, timeout=10)
    finally:
        server.terminate()
        server.wait(timeout=30)
    counts = ",".join(map(str, BUNDLED_PLANS[1]))
    assert f"allocmoe plan 1 active: layer expert counts [{counts}]" in log.read_text()
    # greedy decoding: the text of each plan loaded in this process
    texts = {plan: load(bundled_budget_gguf, choice).create_completion(**PROMPT)["choices"][0]["text"]
             for plan, choice in ((None, LoadChoice(plan_index=1)), (2, LoadChoice(plan_index=2)),
                                  (-1, LoadChoice(full_budget=True)))}
    assert len(set(texts.values())) > 1 and all(texts.values())  # the plans really differ here
    assert {plan: r["choices"][0]["text"] for plan, r in served.items()} == texts
