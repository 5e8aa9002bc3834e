#!/usr/bin/env python3
"""Refresh ``requirements.lock``: the exact version of every Python package that ``make`` installs.

Resolves today's releases into a scratch virtual environment exactly as the Makefile would without a
lock (pip, ``torch==2.13.0``, the project with its ``torch,plot,test,server`` extras, the patched
llama-cpp-python's own dependencies and its sdist's build requirements), freezes it, writes the lock
and prints the diff against the previous one for review. The Makefile hands the lock to every pip it
runs (``PIP_CONSTRAINT`` and ``PIP_BUILD_CONSTRAINT``), so a fresh machine installs what was tested.

Usage: ``make lock`` (or ``python3 scripts/lock.py [--python python3.11] [--out requirements.lock]``).
Standard library only: it runs before any virtual environment exists.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from allocmoe_edge.build_runtime import BINDINGS_BUILD_REQUIRES, BINDINGS_DEPENDENCIES  # noqa: E402

EXTRAS = "torch,plot,test,server"
TORCH = "torch==2.13.0"  # the CPU build on the project's machines; an unpinned torch is a multi-GB CUDA build
HEADER = """\
# Exact versions of every Python package `make` installs (pip constraints), resolved together and tested.
# Refresh: `make lock` (scripts/lock.py), review the diff it prints, run `make test`, commit.
"""
_LOCAL_VERSION = re.compile(r"^([A-Za-z0-9_.-]+==[^+\s]+)\+\S+$")  # torch==2.13.0+cpu -> torch==2.13.0


def _pip(venv: Path, *args: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PIP_CONSTRAINT", "PIP_BUILD_CONSTRAINT")}
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *args], check=True, env=env)


def resolve(python: str) -> list[str]:
    """Install today's releases into a scratch venv and return its frozen ``name==version`` lines."""
    with tempfile.TemporaryDirectory(prefix="allocmoe-lock-") as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
        print("resolving: pip", file=sys.stderr)
        _pip(venv, "--upgrade", "pip")
        print(f"resolving: {TORCH}", file=sys.stderr)
        _pip(venv, TORCH)
        print(f"resolving: .[{EXTRAS}], llama-cpp-python's dependencies and build requirements", file=sys.stderr)
        _pip(venv, f"{ROOT}[{EXTRAS}]", *BINDINGS_DEPENDENCIES, *BINDINGS_BUILD_REQUIRES)
        frozen = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "freeze", "--all"],
                                check=True, capture_output=True, text=True).stdout
    lines = []
    for line in frozen.splitlines():
        if not line or line.startswith(("#", "-e ")) or line.lower().startswith("allocmoe-edge"):
            continue
        m = _LOCAL_VERSION.match(line)
        lines.append(m.group(1) if m else line)
    return sorted(lines, key=str.lower)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", default=sys.executable, help="interpreter of the scratch venv")
    ap.add_argument("--out", type=Path, default=ROOT / "requirements.lock")
    args = ap.parse_args()
    new = HEADER + "\n".join(resolve(args.python)) + "\n"
    old = args.out.read_text() if args.out.exists() else ""
    diff = list(difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                     f"{args.out.name} (before)", f"{args.out.name} (now)"))
    args.out.write_text(new)
    sys.stdout.writelines(diff or [f"{args.out.name}: no change\n"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
