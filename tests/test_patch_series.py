"""The committed patch series is what scripts/patches.py exports: laid out as a git branch on the pinned
sdist and exported back, it is byte for byte the same (so nobody edits a patch by hand), and it is
ordered as patches/README.md says: ggml first, then llama, one subject each."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from allocmoe_edge.build_runtime import BINDINGS_PATCH_DIR, PATCH_DIR, patch_files

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "patches.py"

pytestmark = pytest.mark.slow


def test_checkout_then_export_gives_the_series_back(tmp_path):
    tree, out = tmp_path / "patched", tmp_path / "out"
    for command in (["checkout", str(tree)], ["export", str(tree), "--out", str(out)]):
        proc = subprocess.run([sys.executable, str(SCRIPT), *command], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
    for committed, exported in ((PATCH_DIR, out), (BINDINGS_PATCH_DIR, out / "bindings")):
        names = [p.name for p in patch_files(committed)]
        assert [p.name for p in patch_files(exported)] == names
        for name in names:
            assert (exported / name).read_bytes() == (committed / name).read_bytes(), name
    log = subprocess.run(["git", "log", "--format=%s", "base..HEAD"], cwd=tree, capture_output=True, text=True)
    assert len(log.stdout.splitlines()) == len(patch_files()) + len(patch_files(BINDINGS_PATCH_DIR))


def test_ggml_patches_come_first_and_subjects_are_single():
    subjects = []
    for patch in patch_files():
        head = patch.read_text().split("\n---\n", 1)[0]
        subject = re.search(r"^Subject: \[PATCH\] (.+(?:\n .+)*)", head, re.M)
        assert subject, f"{patch.name}: no single-patch subject"
        subjects.append(subject.group(1))
        touched = re.findall(r"^diff --git a/(\S+)", patch.read_text(), re.M)
        assert touched and all(not t.startswith("vendor/") for t in touched)  # relative to vendor/llama.cpp
    kinds = ["ggml" if s.startswith("ggml") else "llama" for s in subjects]
    assert kinds == sorted(kinds), subjects  # "ggml" < "llama"
    assert (PATCH_DIR / "README.md").is_file()
