"""llama.cpp's own programs on a budgeted file, built by `allocmoe build-runtime --tools` from the patched sources:

* every command of the README's "With llama.cpp's programs" section runs as written on the bundled model;
* llama-server serves a plan per request: 4 concurrent clients, two plans, ``--parallel 4``, a per-token rule
  (Alloc-T off); each greedy answer equals the answer of a server started with that plan alone;
* `allocmoe eval` agrees with `llama-perplexity --kl-divergence` for every configuration it measures (full
  budget, a plan with and without Alloc-T's batch rule, uniform top-k): PPL within 0.1 %, mean KLD within 1 %,
  "same top p" equal to our top-1 within 0.2 points;
* `allocmoe bench` agrees with `llama-bench -okv` on the same configurations: every speedup over full budget
  within the measured noise of both.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from allocmoe_edge.build_lib import TOOLS, cached_tools

from .conftest import BUNDLED_PLANS
from .llama_programs import free_port, http, llama_server, override_flags, typed_value

pytestmark = [pytest.mark.slow, pytest.mark.runtime]

CTX, CHUNKS = 128, 4
_STAT = {"ppl": r"Mean PPL\(Q\)\s*:\s*(-?[\d.]+)", "kld_mean": r"Mean\s+KLD:\s*(-?[\d.]+)",
         "kld_median": r"Median\s+KLD:\s*(-?[\d.]+)", "kld_p99": r"99\.0%\s+KLD:\s*(-?[\d.]+)",
         "ppl_ratio": r"Mean PPL\(Q\)/PPL\(base\)\s*:\s*(-?[\d.]+)", "rms_dp": r"RMS Δp\s*:\s*(-?[\d.]+)",
         "top1": r"Same top p:\s*(-?[\d.]+)"}


def _perplexity(tools: Path, args: list[str], out: Path) -> str:
    """llama-perplexity's report (its log written to a file: through a pipe, its log thread may lose the tail)."""
    with out.open("w") as f:
        run = subprocess.run([str(tools / "llama-perplexity"), "-c", str(CTX), "-b", str(CTX), "-ub", str(CTX),
                              "--chunks", str(CHUNKS), "-t", "2", *args], stdout=f, stderr=subprocess.STDOUT,
                             timeout=600)
    log = out.read_text()
    assert run.returncode == 0, log[-3000:]
    return log


def test_tools_are_built_cached_and_found_by_doctor(llama_tools):
    tools = llama_tools
    from click.testing import CliRunner

    from allocmoe_edge.cli import cli

    assert any(t["folder"] == str(tools) and t["backend"] == "cpu" for t in cached_tools())
    res = CliRunner().invoke(cli, ["doctor"])
    assert f"llama.cpp programs (cpu): {tools}" in res.output
    for tool in TOOLS:
        assert subprocess.run([str(tools / tool), "--help"], capture_output=True, timeout=60).returncode == 0, tool


def test_eval_agrees_with_llama_perplexity(llama_tools, bundled_budget_gguf, tmp_path):
    tools = llama_tools
    from allocmoe_edge.assets import ASSETS
    from allocmoe_edge.evaluate import evaluate_llama, gguf_configurations
    from allocmoe_edge.gguf_meta import read_info

    text = tmp_path / "text.txt"
    text.write_text((ASSETS / "heldout.txt").read_text()[:40000])
    info = read_info(bundled_budget_gguf)
    ours = {r["name"]: r for r in evaluate_llama(bundled_budget_gguf, text, ctx=CTX, chunks=CHUNKS,
                                                  budgets=[0.5])["results"]}
    configs = gguf_configurations(info, [0.5])
    assert [c.name for c in configs] == list(ours) and len(configs) == 4  # full, plan +/- Alloc-T, uniform
    base = tmp_path / "base.kld"
    model = ["-m", str(bundled_budget_gguf)]
    _perplexity(tools, [*model, "-f", str(text), "--kl-divergence-base", str(base),
                        *override_flags(configs[0].choice().kv_overrides(info))], tmp_path / "base.log")
    for i, config in enumerate(configs):
        log = _perplexity(tools, [*model, "--kl-divergence-base", str(base), "--kl-divergence",
                                  *override_flags(config.choice().kv_overrides(info))], tmp_path / f"{i}.log")
        theirs = {k: float(m.group(1)) for k, p in _STAT.items() if (m := re.search(p, log))}
        assert theirs.keys() == _STAT.keys(), log[-3000:]
        row = ours[config.name]
        assert abs(row["ppl"] / theirs["ppl"] - 1) < 1e-3, (config.name, row["ppl"], theirs["ppl"])
        # + 1e-5: at full budget both are 0 up to rounding (llama-perplexity prints -0.000001)
        assert abs(row["kld_mean"] - theirs["kld_mean"]) <= 0.01 * abs(theirs["kld_mean"]) + 1e-5, (config.name, row,
                                                                                                     theirs)
        assert abs(100 * row["top1"] - theirs["top1"]) <= 0.2, (config.name, row["top1"], theirs["top1"])


def readme_commands() -> list[str]:
    """The shell commands of the README's "With llama.cpp's programs" section, continuation lines joined and
    comments dropped, after its first block (the build and ``T=``)."""
    from .test_python_api import readme_blocks

    blocks = readme_blocks("With llama.cpp's programs", "bash")
    joined = "\n".join(block.replace("\\\n", " ") for block in blocks[1:])
    lines = (re.sub(r"\s+#.*$", "", line).strip() for line in joined.splitlines())
    return [line for line in lines if line]


_CURL = re.compile(r"curl -s localhost:8080(/\S*)(?: -d '(.*?)')?(?: \| (jq|grep) (\S+))?$")


def _curl(url: str, command: str) -> str:
    """A README curl command against ``url``: GET or POST its JSON, then its jq path or grep, in Python."""
    path, body, tool, arg = _CURL.fullmatch(command).groups()
    status, text = http(url + path, None if body is None else json.loads(body))
    assert status == 200, (command, text)
    if tool == "jq":
        value = json.loads(text)
        for key in arg.strip(".").split("."):
            value = value[key]
        return json.dumps(value)
    return "\n".join(line for line in text.splitlines() if arg in line) if tool == "grep" else text


def test_readme_commands_run(llama_tools, bundled_budget_gguf, tmp_path):
    """Every command of the section, as written, in a folder holding model.budget.gguf and heldout.txt; the
    server's curl commands are sent from Python (no curl or jq needed)."""
    from contextlib import ExitStack

    from allocmoe_edge.assets import ASSETS

    (tmp_path / "model.budget.gguf").symlink_to(bundled_budget_gguf)
    (tmp_path / "heldout.txt").write_text((ASSETS / "heldout.txt").read_text()[:40000])
    commands = readme_commands()
    out: dict[str, str] = {}
    port = free_port()
    with ExitStack() as stack:
        url = None
        for i, command in enumerate(commands):
            if command.startswith("$T/llama-server"):
                args = shlex.split(command.replace("$T", str(llama_tools)).replace("8080", str(port)))
                url = stack.enter_context(llama_server(args, tmp_path / "server.log", port, cwd=tmp_path))
                out[command] = ""
            elif command.startswith("curl"):
                assert url is not None, f"{command}: no server started before it in the README"
                out[command] = _curl(url, command)
            else:
                log = tmp_path / f"command-{i}.log"
                with log.open("w") as f:
                    run = subprocess.run(["bash", "-c", command], cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT,
                                         env={**os.environ, "T": str(llama_tools)}, stdin=subprocess.DEVNULL,
                                         timeout=600)
                out[command] = log.read_text()
                assert run.returncode == 0, (command, out[command][-3000:])
    programs = [c.split()[0].removeprefix("$T/") for c in commands]
    assert {"llama-server", "curl", "llama-cli", "llama-bench", "llama-perplexity"} <= set(programs), programs

    def output(program: str, *words: str) -> str:
        return next(v for c, v in out.items() if c.split()[0].endswith(program) and all(w in c for w in words))

    plans = json.loads(output("curl", "/props"))
    assert [p["layer_expert_counts"] for p in plans["plans"][1:]] == [list(c) for c in BUNDLED_PLANS]
    assert output("curl", "/completion")
    assert re.search(r"^llamacpp:allocmoe_plan_switches_total \d", output("curl", "/metrics"), re.M)
    counts = ",".join(map(str, BUNDLED_PLANS[2]))
    assert "> Once upon a time" in output("llama-cli", "-n 32")
    assert f"allocmoe plan 2 active: layer expert counts [{counts}]" in output("llama-cli", "grep")
    table = output("llama-bench")
    for group in ("allocmoe.enabled=bool:false", "none", "allocmoe.plan_index=int:2"):
        assert len(re.findall(rf"\| {re.escape(group)} +\| +(?:pp64|tg32) ", table)) == 2, (group, table)
    assert re.search(r"Mean\s+KLD:\s*\d", output("llama-perplexity", "--kl-divergence ")), "no KLD report"


def test_bench_agrees_with_llama_bench(llama_tools, bundled_budget_gguf):
    """The configurations of `bench --budgets 0.5`, measured in one interleaved run: 7 rounds, each three
    repetitions of every configuration by `allocmoe bench` and three by llama-bench (one run over all of them
    through -okv), on one thread (the steadiest numbers on a small machine), so drift hits both tools alike.
    Every speedup over full budget agrees within twice the two tools' sds combined, and llama-bench reads no
    tie (the plans run fewer experts: a llama-bench that ignored -okv would read 1.00x)."""
    from allocmoe_edge.bench import BenchOptions, bench, configurations
    from allocmoe_edge.benchstats import speedup, summary
    from allocmoe_edge.gguf_meta import read_info

    opts = BenchOptions(budgets=(0.5,), reps=3, prompts=(512,), n_gen=128, threads=1)
    info = read_info(bundled_budget_gguf)
    configs = configurations(info, opts.budgets)
    groups = [";".join(f"{k}={typed_value(v)}" for k, v in c.choice().kv_overrides(info).items()) or "none"
              for c in configs]
    tests = opts.test_names()
    ours: dict[str, dict[str, list[float]]] = {g: {t: [] for t in tests} for g in groups}
    theirs: dict[str, dict[str, list[float]]] = {g: {t: [] for t in tests} for g in groups}
    for _ in range(7):
        rows = bench(bundled_budget_gguf, opts, log=lambda m: None)["rows"]
        assert [r["name"] for r in rows] == [c.name for c in configs] and len(configs) == 4
        for row, group in zip(rows, groups):
            for t in tests:
                ours[group][t] += row["tests"][t]["samples"]
        # -fa 0: bench's contexts run without flash attention (llama-bench's default, auto, turns it on)
        run = subprocess.run([str(llama_tools / "llama-bench"), "-m", str(bundled_budget_gguf), "-r", "3", "-t", "1",
                              "-p", "512", "-n", "128", "-fa", "0", "-o", "json", "-okv", ",".join(groups)],
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        for test in json.loads(run.stdout):
            name = f"pp{test['n_prompt']}" if test["n_prompt"] else f"tg{test['n_gen']}"
            theirs[test["kv_overrides"]][name] += test["samples_ts"]
    lines = []
    for config, group in zip(configs[1:], groups[1:]):
        for t in tests:
            mine = speedup(summary(ours[group][t]), summary(ours[groups[0]][t]))
            other = speedup(summary(theirs[group][t]), summary(theirs[groups[0]][t]))
            lines.append(f"{config.name:>16} {t}: bench {mine['ratio']:.3f} ± {mine['sd']:.3f}, "
                         f"llama-bench {other['ratio']:.3f} ± {other['sd']:.3f}")
            assert abs(mine["ratio"] - other["ratio"]) <= 2 * math.hypot(mine["sd"], other["sd"]), "\n".join(lines)
            assert not other["tie"], "\n".join(lines)
    print("\n".join(lines))
