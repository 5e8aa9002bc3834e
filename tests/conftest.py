"""Shared fixtures: the patched runtime (skip, or fail under ALLOCMOE_REQUIRE_RUNTIME=1) and
tiny models converted to GGUF once per session.

Tiers (markers in pyproject.toml): `make test-fast` runs ``-m "not slow"`` (no builds, no trainings,
nothing over ~10 s); `make test` runs everything with ALLOCMOE_REQUIRE_RUNTIME=1. A test marked
``runtime`` skips without the patched runtime (fails in CI), whether or not it asks for the
``patched_runtime`` fixture; ``gpu`` tests skip through their own fixtures or skipif without CUDA."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest


def _require_runtime() -> None:
    from allocmoe_edge.errors import AllocMoeError
    from allocmoe_edge.runtime import patch_version

    try:
        version = patch_version()
    except AllocMoeError as e:
        version, why = None, str(e)
    else:
        why = "the installed llama-cpp-python is a stock build"
    if version is None:
        if os.environ.get("ALLOCMOE_REQUIRE_RUNTIME") == "1":
            pytest.fail(f"patched runtime required: {why}; run `allocmoe build-runtime`")
        pytest.skip(f"needs the patched runtime ({why})")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """The ``runtime`` marker alone skips a test (or fails it in CI) without the patched runtime."""
    if item.get_closest_marker("runtime") is not None:
        _require_runtime()


@pytest.fixture(scope="session")
def patched_runtime() -> None:
    """Skip (or fail in CI) unless the patched llama-cpp-python is installed."""
    _require_runtime()


@pytest.fixture(scope="session")
def llama_tools() -> Path:
    """The folder of llama.cpp's programs built from the patched sources (`allocmoe build-runtime --tools`)."""
    from allocmoe_edge.build_lib import TOOLS, build_tools
    from allocmoe_edge.build_runtime import BuildOptions

    folder = build_tools(BuildOptions(), log=lambda m: None)
    assert all((folder / t).is_file() for t in TOOLS)
    return folder


@pytest.fixture(scope="session")
def gpt2_vocab() -> Path:
    """llama.cpp's GPT-2 vocab GGUF from the pinned sdist (a BPE the converter knows)."""
    from allocmoe_edge.build_runtime import vendor_dir

    return vendor_dir() / "models" / "ggml-vocab-gpt-2.gguf"


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, gpt2_vocab):
    """``tiny_gguf(arch) -> (hf_dir, gguf_path)``: a tiny random model and its f32 GGUF, made once."""
    from allocmoe_edge.convert import convert_hf

    from .tiny_models import save_tiny_model

    made: dict[str, tuple[Path, Path]] = {}

    def make(arch: str) -> tuple[Path, Path]:
        if arch not in made:
            root = tmp_path_factory.mktemp(arch)
            hf_dir = save_tiny_model(arch, root / "hf", seed=0, vocab_gguf=gpt2_vocab)
            made[arch] = (hf_dir, convert_hf(hf_dir, root / "model-f32.gguf", "f32"))
        return made[arch]

    return make


# per-MoE-layer counts of the bundled tiny-moe (4 MoE layers, top-4 of 16 experts) at 25, 50 and 75 %
BUNDLED_PLANS = ([1, 1, 1, 1], [3, 1, 2, 2], [4, 2, 3, 3])


@pytest.fixture(scope="session")
def bundled_budget_gguf(tmp_path_factory) -> Path:
    """The bundled tiny-moe in f16 with `BUNDLED_PLANS` (plan 0 the default) and Alloc-T's batch rule
    (k_min 1, k_max 4), made once: a budgeted file that generates real text in seconds."""
    from allocmoe_edge.assets import model_dir
    from allocmoe_edge.convert import convert_hf
    from allocmoe_edge.gguf_meta import plan_for_counts, read_info, stamp

    root = tmp_path_factory.mktemp("bundled")
    plain = convert_hf(model_dir("tiny-moe"), root / "tiny-moe-f16.gguf", "f16", log=lambda m: None)
    info = read_info(plain)
    plans = [plan_for_counts(info, counts) for counts in BUNDLED_PLANS]
    stamp(plain, root / "tiny-moe.budget.gguf", plans, k_min=1, k_max=info.expert_used_count)
    return root / "tiny-moe.budget.gguf"


def pytest_terminal_summary(terminalreporter) -> None:
    """The GPU tests' agreement rows (tests/test_gpu.py), when they ran."""
    gpu = sys.modules.get("tests.test_gpu")
    lines = gpu.report_lines() if gpu else []
    if lines:
        terminalreporter.section("GPU backend against the CPU")
        for line in lines:
            terminalreporter.write_line(line)
