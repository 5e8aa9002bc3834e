"""llama-server on a budgeted file (patch 0008): the plans it lists, a plan per request, and under concurrent
load (4 clients, two plans, ``--parallel 4``, Alloc-T off so each token's experts are its own) every greedy
answer equal to the answer of a server started with that plan, serving one request at a time."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest

from .conftest import BUNDLED_PLANS
from .llama_programs import free_port, http, llama_server

pytestmark = [pytest.mark.slow, pytest.mark.runtime]

PROMPTS = ("Once upon a time", "The little dog", "She opened the door and", "One day, a girl named Lily")
N_PREDICT = 32
PLANS = (0, 2)  # counts [1, 1, 1, 1] and [4, 2, 3, 3]
ALLOC_T_OFF = ("--override-kv", "allocmoe.token_k_max=int:0")


def _cmd(tools: Path, model: Path, port: int, *extra: str) -> list[str]:
    return [str(tools / "llama-server"), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-t", "2",
            "--metrics", *ALLOC_T_OFF, *extra]


def _complete(url: str, prompt: str, plan: int | None) -> str:
    body = {"prompt": prompt, "n_predict": N_PREDICT, "temperature": 0}
    if plan is not None:
        body["allocmoe_plan"] = plan
    status, text = http(f"{url}/completion", body)
    assert status == 200, text
    return json.loads(text)["content"]


def _alone(tools: Path, model: Path, plan: int, log: Path) -> dict[str, str]:
    """Each prompt's greedy answer from a server started with ``plan``, one slot, one request at a time."""
    port = free_port()
    with llama_server(_cmd(tools, model, port, "--parallel", "1", "-c", "512",
                           "--override-kv", f"allocmoe.plan_index=int:{plan}"), log, port) as url:
        return {prompt: _complete(url, prompt, None) for prompt in PROMPTS}


def test_server_lists_the_plans_and_refuses_one_it_cannot_run(llama_tools, bundled_budget_gguf, tmp_path):
    port = free_port()
    with llama_server(_cmd(llama_tools, bundled_budget_gguf, port, "--override-kv", "allocmoe.plan_index=int:1"),
                      tmp_path / "server.log", port) as url:
        props = json.loads(http(f"{url}/props")[1])["allocmoe"]
        models = json.loads(http(f"{url}/v1/models")[1])["data"][0]["meta"]["allocmoe"]
        refused = {plan: http(f"{url}/completion", {"prompt": "Once", "n_predict": 1, "allocmoe_plan": plan})
                   for plan in (len(BUNDLED_PLANS), -2)}
    assert props == models
    assert props["plan_at_start"] == 1 and props["request_field"] == "allocmoe_plan"
    assert [p["index"] for p in props["plans"]] == [-1, *range(len(BUNDLED_PLANS))]
    assert all(p["runnable"] for p in props["plans"])
    assert [p["layer_expert_counts"] for p in props["plans"]] == [[4, 4, 4, 4], *map(list, BUNDLED_PLANS)]
    assert all(status == 400 and "allocmoe_plan" in text for status, text in refused.values()), refused


def test_concurrent_requests_with_two_plans_each_get_their_plan_alone(llama_tools, bundled_budget_gguf, tmp_path):
    alone = {plan: _alone(llama_tools, bundled_budget_gguf, plan, tmp_path / f"alone-{plan}.log") for plan in PLANS}
    # the plans' answers differ, so an answer computed under the other plan would show
    assert all(alone[PLANS[0]][p] != alone[PLANS[1]][p] for p in PROMPTS), alone

    served: dict[tuple[str, int], str] = {}
    spans: list[tuple[float, float]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(len(PROMPTS))

    def client(i: int, url: str) -> None:
        try:
            start.wait(timeout=60)
            # each client asks twice, switching plan: its slot's cache of the first plan must not serve the second
            for j, plan in enumerate((PLANS[i % 2], PLANS[(i + 1) % 2])):
                t0 = time.monotonic()
                served[PROMPTS[i], plan] = _complete(url, PROMPTS[i], plan)
                if j == 0:
                    spans.append((t0, time.monotonic()))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    port = free_port()
    log = tmp_path / "server.log"
    with llama_server(_cmd(llama_tools, bundled_budget_gguf, port, "--parallel", str(len(PROMPTS)), "-c", "2048"),
                      log, port) as url:
        threads = [threading.Thread(target=client, args=(i, url)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        metrics = http(f"{url}/metrics")[1]
    assert not errors, errors
    assert max(a for a, _ in spans) < min(b for _, b in spans), "the first requests did not overlap"
    switches = float(re.search(r"^llamacpp:allocmoe_plan_switches_total (\S+)$", metrics, re.M).group(1))
    assert switches >= 2, (switches, log.read_text()[-3000:])
    assert served == {(p, plan): alone[plan][p] for p in PROMPTS for plan in PLANS}
