"""llama.cpp's own programs on a budgeted file: `allocmoe build-runtime --tools` builds them from the patched
sources, and `allocmoe eval` agrees with `llama-perplexity --kl-divergence` on the bundled model for every
configuration it measures (full budget, a plan with and without Alloc-T's batch rule, uniform top-k): PPL
within 0.1 %, mean KLD within 1 %, "same top p" equal to our top-1 within 0.2 points."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from allocmoe_edge.build_lib import TOOLS, build_tools, cached_tools
from allocmoe_edge.build_runtime import BuildOptions

pytestmark = [pytest.mark.slow, pytest.mark.runtime]

CTX, CHUNKS = 128, 4
_STAT = {"ppl": r"Mean PPL\(Q\)\s*:\s*(-?[\d.]+)", "kld_mean": r"Mean\s+KLD:\s*(-?[\d.]+)",
         "kld_median": r"Median\s+KLD:\s*(-?[\d.]+)", "kld_p99": r"99\.0%\s+KLD:\s*(-?[\d.]+)",
         "ppl_ratio": r"Mean PPL\(Q\)/PPL\(base\)\s*:\s*(-?[\d.]+)", "rms_dp": r"RMS Δp\s*:\s*(-?[\d.]+)",
         "top1": r"Same top p:\s*(-?[\d.]+)"}


@pytest.fixture(scope="module")
def tools() -> Path:
    folder = build_tools(BuildOptions(), log=lambda m: None)
    assert all((folder / t).is_file() for t in TOOLS)
    return folder


def override_flags(overrides: dict[str, bool | int | float | str]) -> list[str]:
    """llama.cpp's --override-kv flags for ``LoadChoice.kv_overrides``."""
    def typed(v: bool | int | float | str) -> str:
        if isinstance(v, bool):
            return f"bool:{str(v).lower()}"
        return f"int:{v}" if isinstance(v, int) else f"float:{v}" if isinstance(v, float) else f"str:{v}"

    return [flag for k, v in overrides.items() for flag in ("--override-kv", f"{k}={typed(v)}")]


def _perplexity(tools: Path, args: list[str], out: Path) -> str:
    """llama-perplexity's report (its log written to a file: through a pipe, its log thread may lose the tail)."""
    with out.open("w") as f:
        run = subprocess.run([str(tools / "llama-perplexity"), "-c", str(CTX), "-b", str(CTX), "-ub", str(CTX),
                              "--chunks", str(CHUNKS), "-t", "2", *args], stdout=f, stderr=subprocess.STDOUT,
                             timeout=600)
    log = out.read_text()
    assert run.returncode == 0, log[-3000:]
    return log


def test_tools_are_built_cached_and_found_by_doctor(tools):
    from click.testing import CliRunner

    from allocmoe_edge.cli import cli

    assert any(t["folder"] == str(tools) and t["backend"] == "cpu" for t in cached_tools())
    res = CliRunner().invoke(cli, ["doctor"])
    assert f"llama.cpp programs (cpu): {tools}" in res.output
    for tool in TOOLS:
        assert subprocess.run([str(tools / tool), "--help"], capture_output=True, timeout=60).returncode == 0, tool


def test_eval_agrees_with_llama_perplexity(tools, bundled_budget_gguf, tmp_path):
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
