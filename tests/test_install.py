"""A user's install outside the checkout: `pip install <repo>` into a fresh virtual environment, then
`allocmoe build-runtime` finds the patch series shipped in the package, reuses the cached wheel
when the build cache has it (after `make runtime`: seconds) and `allocmoe doctor` says patched."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from allocmoe_edge.build_runtime import BuildOptions, cache_dir, cache_key, patch_hash

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd: list[str | Path], cwd: Path) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


def _clone(dest: Path) -> Path:
    """The files a clone of this checkout would have (tracked and not ignored, symlinks kept): pip builds in
    the source tree, which must not leave build/ in the checkout or reuse a stale one."""
    listing = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], ROOT).stdout
    for name in filter(None, listing.split("\0")):
        src, dst = ROOT / name, dest / name
        if src.is_symlink() or src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst, follow_symlinks=False)
    return dest


def test_pip_install_then_build_runtime_in_a_fresh_venv(tmp_path):
    cached = any((cache_dir() / "wheels" / cache_key(BuildOptions())).glob("*.whl"))
    venv = tmp_path / "venv"
    python, allocmoe = venv / "bin" / "python", venv / "bin" / "allocmoe"
    _run([sys.executable, "-m", "venv", venv], tmp_path)
    _run([python, "-m", "pip", "install", "-q", _clone(tmp_path / "allocmoe-edge")], tmp_path)
    shipped = json.loads(_run([python, "-c", "import json, allocmoe_edge.build_runtime as b; "
                                             "print(json.dumps([str(b.PATCH_DIR), b.patch_hash()]))"], tmp_path).stdout)
    assert Path(shipped[0]).is_relative_to(venv) and not Path(shipped[0]).is_symlink()  # a copy, not the checkout
    assert shipped[1] == patch_hash()  # every patch of the series, byte for byte
    no_torch = "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"
    _run([python, "-c", no_torch], tmp_path)  # the base install pulls no torch
    built = _run([allocmoe, "build-runtime"], tmp_path)
    if cached:
        assert "using cached wheel" in built.stderr
    doctor = json.loads(_run([allocmoe, "doctor", "--json"], tmp_path).stdout)
    assert doctor["patched"] is True and Path(doctor["module"]).is_relative_to(venv)
