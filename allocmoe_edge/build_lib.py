"""Build the patched llama.cpp shared libraries alone with CMake, for ``LLAMA_CPP_LIB_PATH``.

The wheel (`build_runtime`) is what users install. A machine that only needs the library, such
as the offline GPU machine of the device check, builds it here instead: from an already patched
tree (`scripts/device_carry.py` lays one out and stamps it with the patch hash) or from the pinned
sdist, with the same CMake flags as the wheel, and cached under a key made of the sdist, the patch
series and the options, so a second run with the same inputs skips the build.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from .build_runtime import (SDIST_SHA256, BuildOptions, _unpack, apply_patches, cache_dir, fetch_sdist, patch_files,
                            patch_hash)
from .errors import AllocMoeError

STAMP = ".allocmoe-patch-hash"  # in a patched tree: the patch_hash() it was patched with
_TARGET = "llama"
_PROGRESS = re.compile(r"^\[\s*(\d+)%\]")


def llama_patch_hash() -> str:
    """Hash of the llama.cpp patch series alone (the bindings series does not change the library)."""
    return patch_hash(patch_files())


def library_key(opts: BuildOptions) -> str:
    """Cache key of a library build: sdist, llama.cpp patches, options and machine (no Python version)."""
    parts = {"sdist": SDIST_SHA256, "patches": llama_patch_hash(), "options": asdict(opts),
             "machine": platform.machine()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def cmake_configure_args(opts: BuildOptions) -> list[str]:
    """The wheel's CMake flags plus what a bare libllama build needs (shared libraries, no tools)."""
    return ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON",
            "-DLLAMA_BUILD_COMMON=OFF", "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_SERVER=OFF", *opts.cmake_args()]


def stamp_tree(tree: Path) -> None:
    """Record in ``tree`` that it holds the pinned llama.cpp with the current patch series applied."""
    (tree / STAMP).write_text(llama_patch_hash() + "\n")


def _checked_tree(tree: Path) -> Path:
    stamp = tree / STAMP
    if not (tree / "CMakeLists.txt").is_file():
        raise AllocMoeError(f"{tree} is not a llama.cpp source tree (no CMakeLists.txt)")
    if not stamp.is_file():
        raise AllocMoeError(f"{tree} has no {STAMP}: not a tree patched by allocmoe (scripts/device_carry.py)")
    if stamp.read_text().strip() != llama_patch_hash():
        raise AllocMoeError(f"{tree} was patched with another patch series than patches/; lay it out again")
    return tree


def _run_cmake(cmd: list[str], logfile: Path, log: Callable[[str], None]) -> None:
    """Run one CMake step, reporting its percentage every 10 points; raise with the log's tail."""
    shown = -10
    with open(logfile, "a") as lf:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            lf.write(line)
            m = _PROGRESS.match(line)
            if m and int(m.group(1)) >= shown + 10:
                shown = int(m.group(1))
                log(f"  {shown:3d}% {line.split('] ', 1)[-1].strip()}")
        if proc.wait() != 0:
            tail = logfile.read_text(errors="replace")[-3000:]
            raise AllocMoeError(f"{' '.join(cmd[:3])} failed (full log: {logfile}):\n{tail}")


def build_library(opts: BuildOptions, source: Path | None = None, jobs: int | None = None,
                  build_dir: Path | None = None, log: Callable[[str], None] = print) -> Path:
    """Return the folder holding ``libllama.so`` and the ggml libraries for ``opts``, building it with
    CMake when the cache has none. ``source``: a stamped patched tree (default: the pinned sdist,
    patched in a scratch folder); ``build_dir``: a CMake build folder kept for incremental builds."""
    key = library_key(opts)
    dest = cache_dir() / "lib" / key / "bin"
    if (dest / f"lib{_TARGET}.so").is_file():
        log(f"using cached library build {dest} (key {key})")
        return dest
    dest.parent.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=dest.parent.parent))
    logfile = dest.parent.parent / f"build-{key}.log"
    logfile.write_text("")
    try:
        if source is None:
            tree = _unpack(fetch_sdist(log), work) / "vendor" / "llama.cpp"
            apply_patches(tree, log)
        else:
            tree = _checked_tree(Path(source).resolve())
        build = Path(build_dir).resolve() if build_dir else work / "build"
        jobs = jobs or os.cpu_count() or 1
        log(f"configuring the {opts.backend} build in {build} ({' '.join(opts.cmake_args())})")
        _run_cmake(["cmake", "-S", str(tree), "-B", str(build), *cmake_configure_args(opts)], logfile, log)
        log(f"building lib{_TARGET} with {jobs} jobs (minutes; log: {logfile})")
        _run_cmake(["cmake", "--build", str(build), "-j", str(jobs), "--target", _TARGET], logfile, log)
        staging = work / "lib"
        (staging / "bin").mkdir(parents=True)
        for lib in (build / "bin").glob("lib*.so*"):
            shutil.copy2(lib, staging / "bin" / lib.name, follow_symlinks=False)
        (staging / "build.json").write_text(json.dumps({"key": key, "patch_sha256": llama_patch_hash(),
                                                        "options": asdict(opts)}, indent=2) + "\n")
        shutil.rmtree(dest.parent, ignore_errors=True)
        os.replace(staging, dest.parent)
        log(f"cached the library build under {dest}")
        return dest
    finally:
        shutil.rmtree(work, ignore_errors=True)
