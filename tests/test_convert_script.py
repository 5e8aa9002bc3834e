"""The top-level converter script `convert/convert_hf_to_budgeted_gguf.py`: a thin command line over
`convert.build_budgeted_gguf` that runs from any directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from allocmoe_edge.gguf_meta import read_info

from .test_convert import _plan

SCRIPT = Path(__file__).resolve().parent.parent / "convert" / "convert_hf_to_budgeted_gguf.py"


def _run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd, capture_output=True, text=True)


def test_help_explains_the_script(tmp_path):
    out = _run("--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for text in ("--plan PLAN_JSON", "--outfile", "--outtype", "q4_k_m", "allocmoe.plan_index=int:N", "Example:"):
        assert text in out.stdout


def test_errors_are_one_line(tmp_path):
    (tmp_path / "exists.gguf").write_bytes(b"")
    out = _run(tmp_path, "--plan", "p.json", "--outfile", tmp_path / "exists.gguf", cwd=tmp_path)
    assert out.returncode == 1
    assert out.stderr == f"error: {tmp_path / 'exists.gguf'} exists; pass --force to overwrite it\n"
    out = _run(tmp_path, "--plan", tmp_path / "absent.json", "--outfile", tmp_path / "m.gguf", cwd=tmp_path)
    assert out.returncode == 1 and out.stderr.startswith("error: plan ") and "Traceback" not in out.stderr
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.slow
def test_converts_a_checkpoint_with_two_plans(tiny_gguf, tmp_path):
    hf_dir, _ = tiny_gguf("mixtral")
    plans = [_plan(hf_dir, counts, tmp_path, f"p{i}.json") for i, counts in enumerate([(1, 1, 1), (2, 1, 3)])]
    out = _run(hf_dir, "--plan", plans[0], "--plan", plans[1], "--default-plan", "1", "--outtype", "f16",
               "--outfile", "m.gguf", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "wrote m.gguf\n"
    info = read_info(tmp_path / "m.gguf")
    assert [p.counts for p in info.plans] == [(1, 1, 1), (2, 1, 3)] and info.allocmoe["plan_default"] == 1
    assert info.file_type == "MOSTLY_F16"
