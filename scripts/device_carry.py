#!/usr/bin/env python3
"""Lay out `.carry/` for the GPU machine (which has no network), then run `scripts/gpu_check.sh`
there with `.carry` carried. The device tool carries at most 64 MiB with the repository, so
sources travel compressed:

* `llama.cpp.tar.xz`: the pinned llama.cpp with patches/ applied (build inputs only), stamped
  with the patch hash (`build_lib.stamp_tree`);
* `lib-<key>.tar.xz`: this machine's cached library build for the device check's options, when
  there is one (`allocmoe build-runtime --backend cuda --no-cuda-fa --library-only`): the check
  then skips the CUDA build;
* `cache/`: llama.cpp's converter and GPT-2 vocab in the layout `vendor_dir()` expects;
* `site/`: the pure-Python packages that machine lacks (llama_cpp bindings with
  `patches/bindings` applied, gguf, diskcache);
* `gpu-diag/`: ../shared/gpu-diag (the Alloc-T CUDA diagnostic), when this checkout has it;
* `COMMIT`: the commit the check runs (the copy there has no .git).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from allocmoe_edge.build_lib import library_key, stamp_tree  # noqa: E402
from allocmoe_edge.build_runtime import (  # noqa: E402
    SDIST_VERSION,
    BuildOptions,
    _unpack,
    apply_bindings_patches,
    apply_patches,
    cache_dir,
    fetch_sdist,
    vendor_dir,
)
from allocmoe_edge.hwinfo import git_commit  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CARRY = ROOT / ".carry"
DIAG = ROOT.parent / "shared" / "gpu-diag"
# the library the device check builds (scripts/gpu_check.sh, lib step)
DEVICE_BUILD = BuildOptions(backend="cuda", cuda_arch="90", cuda_fa=False)
UNUSED_BACKENDS = ("sycl", "vulkan", "opencl", "cann", "metal", "webgpu", "zdnn", "musa", "hexagon", "virtgpu",
                   "openvino", "zendnn", "et")


def _copy(src: Path, dst: Path) -> None:
    (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)


def _xz(folder: Path, archive: Path, name: str) -> None:
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(folder, arcname=name)


def patched_sources(tmp: Path) -> None:
    """`llama.cpp.tar.xz` (the patched, stamped tree) and the patched bindings in `site/`."""
    src = _unpack(fetch_sdist(), tmp)
    llama = src / "vendor" / "llama.cpp"
    apply_patches(llama)
    apply_bindings_patches(src)
    tree = tmp / "tree"
    tree.mkdir()
    for name in ("CMakeLists.txt", "cmake", "src", "include", "vendor", "licenses", "ggml"):
        _copy(llama / name, tree / name)
    for b in UNUSED_BACKENDS:
        shutil.rmtree(tree / "ggml" / "src" / f"ggml-{b}", ignore_errors=True)
    stamp_tree(tree)
    _xz(tree, CARRY / "llama.cpp.tar.xz", "llama.cpp")
    shutil.copytree(src / "llama_cpp", CARRY / "site" / "llama_cpp")


def converter() -> None:
    """llama.cpp's converter, gguf-py and the GPT-2 vocab where `vendor_dir()` looks for them."""
    pristine = vendor_dir()
    rel = pristine.relative_to(pristine.parents[3])  # src/pristine-*/llama_cpp_python-*/vendor/llama.cpp
    conv = CARRY / "cache" / "src" / rel
    conv.mkdir(parents=True)
    for name in ("convert_hf_to_gguf.py", "conversion", "gguf-py"):
        _copy(pristine / name, conv / name)
    (conv / "models").mkdir()
    shutil.copy2(pristine / "models" / "ggml-vocab-gpt-2.gguf", conv / "models")
    shutil.copytree(pristine / "gguf-py" / "gguf", CARRY / "site" / "gguf")


def diskcache(tmp: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "diskcache==5.6.3", "-d", str(tmp)],
                   check=True)
    with zipfile.ZipFile(next(tmp.glob("diskcache-*.whl"))) as z:
        z.extractall(CARRY / "site")


def cached_library() -> str:
    """Pack this machine's library build for the device check's options, if it has one."""
    key = library_key(DEVICE_BUILD)
    built = cache_dir() / "lib" / key
    if not (built / "bin" / "libllama.so").is_file():
        return f"no cached CUDA library (key {key}): the check builds it there"
    _xz(built, CARRY / f"lib-{key}.tar.xz", key)
    return f"cached CUDA library {key} included"


def main() -> None:
    shutil.rmtree(CARRY, ignore_errors=True)
    (CARRY / "site").mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        patched_sources(Path(tmp))
    converter()
    with tempfile.TemporaryDirectory() as tmp:
        diskcache(Path(tmp))
    lib = cached_library()
    if DIAG.is_dir():
        shutil.copytree(DIAG, CARRY / "gpu-diag")
    (CARRY / "COMMIT").write_text((git_commit() or "unknown") + "\n")
    size = sum(f.stat().st_size for f in CARRY.rglob("*") if f.is_file())
    print(f"{CARRY}: {size / 2**20:.1f} MiB (llama-cpp-python {SDIST_VERSION} patched tree, converter, site; {lib}; "
          f"gpu-diag {'included' if DIAG.is_dir() else 'absent'})")


if __name__ == "__main__":
    main()
