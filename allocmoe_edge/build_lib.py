"""Build the patched llama.cpp with CMake alone: the shared libraries for ``LLAMA_CPP_LIB_PATH``,
llama.cpp's ``ggml-rpc-server`` for RPC builds, and llama.cpp's own programs (`TOOLS`).

The wheel (`build_runtime`) is what users install. A machine that only needs the library, such
as the offline GPU machine of the device check, builds it here instead: from an already patched
tree (`scripts/device_carry.py` lays one out and stamps it with the patch hash) or from the pinned
sdist, with the same CMake flags as the wheel, and cached under a key made of the sdist, the patch
series and the options, so a second run with the same inputs skips the build. RPC builds
(``BuildOptions(rpc=True)``) add the server, which runs the patched ggml on another machine; the
wheel's ``--rpc`` builds it alone (`build_rpc_server`). `build_tools` builds llama-server, llama-cli,
llama-bench and llama-perplexity from the same patched sources, cached the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from .build_runtime import (
    SDIST_SHA256,
    BuildOptions,
    _unpack,
    apply_patches,
    cache_dir,
    fetch_sdist,
    patch_files,
    patch_hash,
    run_logged,
)
from .errors import AllocMoeError

STAMP = ".allocmoe-patch-hash"  # in a patched tree: the patch_hash() it was patched with
LIBRARY = "llama"
RPC_SERVER = "ggml-rpc-server"  # llama.cpp's tools/rpc: serves the ggml backends of its machine over TCP
TOOLS = ("llama-server", "llama-cli", "llama-bench", "llama-perplexity")  # llama.cpp's programs users run
_ARTIFACTS = {LIBRARY: f"lib{LIBRARY}.so", RPC_SERVER: RPC_SERVER, **{t: t for t in TOOLS}}  # left in bin/


def llama_patch_hash() -> str:
    """Hash of the llama.cpp patch series alone (the bindings series does not change the library)."""
    return patch_hash(patch_files())


def library_key(opts: BuildOptions) -> str:
    """Cache key of a library build: sdist, llama.cpp patches, options and machine (no Python version)."""
    parts = {"sdist": SDIST_SHA256, "patches": llama_patch_hash(), "options": asdict(opts),
             "machine": platform.machine()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def cmake_configure_args(opts: BuildOptions, programs: bool = False) -> list[str]:
    """The wheel's CMake flags plus what a bare libllama build needs (shared libraries; no tools, except
    for RPC builds: llama.cpp configures tools/rpc only with its tools and their common library), or with
    ``programs`` what `TOOLS` need: the server without its web UI (no download of prebuilt assets) and
    without OpenSSL (plain HTTP)."""
    tools = "ON" if opts.rpc or programs else "OFF"
    server = ["-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
              "-DLLAMA_OPENSSL=OFF"] if programs else ["-DLLAMA_BUILD_SERVER=OFF"]
    return ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON",
            f"-DLLAMA_BUILD_COMMON={tools}", f"-DLLAMA_BUILD_TOOLS={tools}", *server, *opts.cmake_args()]


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


def build_library(opts: BuildOptions, source: Path | None = None, jobs: int | None = None,
                  build_dir: Path | None = None, log: Callable[[str], None] = print) -> Path:
    """Return the folder holding ``libllama.so`` and the ggml libraries for ``opts`` (and ``ggml-rpc-server``
    when ``opts.rpc``), building it with CMake when the cache has none. ``source``: a stamped patched tree
    (default: the pinned sdist, patched in a scratch folder); ``build_dir``: a CMake build folder kept for
    incremental builds."""
    targets = (LIBRARY, RPC_SERVER) if opts.rpc else (LIBRARY,)
    return _cached_build(opts, "lib", targets, source, jobs, build_dir, log)


def build_rpc_server(opts: BuildOptions, jobs: int | None = None, log: Callable[[str], None] = print) -> Path:
    """Return the path of ``ggml-rpc-server`` built from the pinned sdist with the patches (next to the ggml
    libraries it loads), building it with CMake when the cache has none: the server of the wheel's ``--rpc``."""
    folder = _cached_build(replace(opts, rpc=True), "rpc-server", (RPC_SERVER,), None, jobs, None, log)
    return folder / RPC_SERVER


def build_tools(opts: BuildOptions, jobs: int | None = None, log: Callable[[str], None] = print) -> Path:
    """Return the folder holding `TOOLS` (with the ggml libraries they load) built from the pinned sdist with
    the patches and ``opts``, building them with CMake when the cache has none."""
    return _cached_build(opts, "tools", TOOLS, None, jobs, None, log)


def cached_tools() -> list[dict[str, object]]:
    """The cached builds of `TOOLS` made with the current patch series: each with its folder and options."""
    found = []
    for meta in sorted((cache_dir() / "tools").glob("*/build.json")):
        info = json.loads(meta.read_text())
        folder = meta.parent / "bin"
        if info.get("patch_sha256") == llama_patch_hash() and all((folder / t).is_file() for t in TOOLS):
            found.append({"folder": str(folder), "backend": info["options"]["backend"], "key": info["key"]})
    return found


def _cached_build(opts: BuildOptions, kind: str, targets: tuple[str, ...], source: Path | None, jobs: int | None,
                  build_dir: Path | None, log: Callable[[str], None]) -> Path:
    """Build ``targets`` with CMake into ``<cache>/<kind>/<key>/bin`` (shared libraries and executables),
    or return that folder when it already holds every target."""
    key = library_key(opts)
    dest = cache_dir() / kind / key / "bin"
    if all((dest / _ARTIFACTS[t]).is_file() for t in targets):
        log(f"using cached {kind} build {dest} (key {key})")
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
        programs = any(t in TOOLS for t in targets)
        run_logged(["cmake", "-S", str(tree), "-B", str(build), *cmake_configure_args(opts, programs)], logfile,
                   "cmake (configure)", log)
        log(f"building {', '.join(targets)} with {jobs} jobs (minutes; log: {logfile})")
        run_logged(["cmake", "--build", str(build), "-j", str(jobs), "--target", *targets], logfile,
                   "cmake --build", log)
        staging = work / "out"
        (staging / "bin").mkdir(parents=True)
        for built in (build / "bin").iterdir():  # the targets and the shared libraries they load
            shutil.copy2(built, staging / "bin" / built.name, follow_symlinks=False)
        (staging / "build.json").write_text(json.dumps({"key": key, "patch_sha256": llama_patch_hash(),
                                                        "options": asdict(opts), "targets": list(targets)},
                                                       indent=2) + "\n")
        shutil.rmtree(dest.parent, ignore_errors=True)
        os.replace(staging, dest.parent)
        log(f"cached the {kind} build under {dest}")
        return dest
    finally:
        shutil.rmtree(work, ignore_errors=True)
