#!/usr/bin/env python3
"""Edit the patch series as git commits: lay out the patched tree as a branch, export it back.

    python scripts/patches.py checkout [DIR]   # pinned sdist + base commit + one commit per patch
    (edit, commit, `git rebase -i base`, ...: each commit becomes one patch)
    python scripts/patches.py export [DIR]     # git format-patch base..HEAD -> patches/, bindings/

DIR (default ``build/patched``) is the unpacked llama-cpp-python sdist with its vendored
llama.cpp, as a git repository whose first commit is tagged ``base``. llama.cpp patches are
applied under ``vendor/llama.cpp`` and exported relative to it; commits that touch only the
bindings (``llama_cpp/``) form the bindings series. A commit touching both is refused. Like
ollama's ``llama/patches``, the series is regenerated whole (``--zero-commit --no-signature``),
so editing patch 2 never means hand-editing the context of patch 5.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from allocmoe_edge.build_runtime import (  # noqa: E402
    BINDINGS_PATCH_DIR,
    PATCH_DIR,
    SDIST_VERSION,
    fetch_sdist,
    patch_files,
)

LLAMA = "vendor/llama.cpp"
IDENTITY = ["-c", "user.name=allocmoe-edge", "-c", "user.email=dev@allocmoe-edge"]


def git(tree: Path, *args: str, capture: bool = False) -> str:
    proc = subprocess.run(["git", *IDENTITY, *args], cwd=tree, check=True, text=True,
                          capture_output=capture)
    return proc.stdout if capture else ""


def checkout(tree: Path) -> None:
    """Unpack the pinned sdist into ``tree``, commit it as ``base`` and apply each patch as a commit."""
    if tree.exists():
        raise SystemExit(f"{tree} exists: export it first or remove it")
    with tempfile.TemporaryDirectory(dir=tree.parent if tree.parent.exists() else None) as tmp:
        subprocess.run(["tar", "xzf", str(fetch_sdist()), "-C", tmp], check=True)
        unpacked = Path(tmp) / f"llama_cpp_python-{SDIST_VERSION}"
        for inner in list(unpacked.rglob(".git")):  # the sdist ships its own repository's metadata
            shutil.rmtree(inner) if inner.is_dir() else inner.unlink()
        shutil.move(str(unpacked), tree)
    git(tree, "init", "-q", "-b", "allocmoe")
    git(tree, "add", "-A", "-f", ".")
    git(tree, "commit", "-q", "-m", f"base: llama-cpp-python {SDIST_VERSION} sdist (vendored llama.cpp)")
    git(tree, "tag", "base")
    for patch in patch_files():
        git(tree, "am", "-q", "--keep-cr", f"--directory={LLAMA}", str(patch))
    for patch in patch_files(BINDINGS_PATCH_DIR):
        git(tree, "am", "-q", "--keep-cr", str(patch))
    print(f"{tree}: branch allocmoe, {len(patch_files()) + len(patch_files(BINDINGS_PATCH_DIR))} commits on base")


def _series_of(tree: Path, sha: str) -> str:
    files = git(tree, "diff-tree", "--no-commit-id", "--name-only", "-r", sha, capture=True).split()
    inside = {f.startswith(LLAMA + "/") for f in files}
    if inside == {True}:
        return "llama"
    if inside == {False}:
        return "bindings"
    raise SystemExit(f"commit {sha[:10]} touches both {LLAMA} and the bindings: split it")


def export(tree: Path, out_dir: Path | None = None) -> None:
    """Write base..HEAD as the two numbered series, replacing the patch files in ``out_dir`` (default: the
    repository's ``patches/``) and its ``bindings/``."""
    shas = git(tree, "rev-list", "--reverse", "base..HEAD", capture=True).split()
    root = out_dir or PATCH_DIR
    out = {"llama": root, "bindings": root / BINDINGS_PATCH_DIR.relative_to(PATCH_DIR)}
    staged = {name: Path(tempfile.mkdtemp(prefix=f"patches-{name}-")) for name in out}
    counts = {name: 0 for name in out}
    for sha in shas:
        series = _series_of(tree, sha)
        counts[series] += 1
        relative = [f"--relative={LLAMA}"] if series == "llama" else []
        git(tree, "format-patch", "-q", "-1", sha, "--zero-commit", "--no-signature", "--no-numbered",
            f"--start-number={counts[series]}", *relative, "-o", str(staged[series]))
    for name, folder in out.items():
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("[0-9][0-9][0-9][0-9]-*.patch"):
            old.unlink()
        for new in sorted(staged[name].glob("*.patch")):
            shutil.move(str(new), folder / new.name)
        shutil.rmtree(staged[name])
    print(f"exported {counts['llama']} llama.cpp patches to {out['llama'].resolve()}, "
          f"{counts['bindings']} bindings patches to {out['bindings'].resolve()}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["checkout", "export"])
    ap.add_argument("tree", nargs="?", type=Path, default=ROOT / "build" / "patched")
    ap.add_argument("--out", type=Path, default=None, help="export into this folder instead of patches/")
    args = ap.parse_args()
    if args.command == "checkout":
        args.tree.parent.mkdir(parents=True, exist_ok=True)
        checkout(args.tree)
    else:
        export(args.tree, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
