#!/usr/bin/env python3
"""Lay out `.carry/` for the GPU machine (which has no network): the patched llama.cpp tree
(build inputs only), llama.cpp's converter and GPT-2 vocab in the cache layout `vendor_dir()`
expects, and the pure-Python packages that machine lacks (llama_cpp bindings with
`patches/bindings` applied, gguf, diskcache).
Then run `scripts/gpu_check.sh` there with `.carry` carried."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from allocmoe_edge.build_runtime import (  # noqa: E402
    SDIST_VERSION, _unpack, apply_bindings_patches, apply_patches, fetch_sdist, vendor_dir)

ROOT = Path(__file__).resolve().parent.parent
CARRY = ROOT / ".carry"
UNUSED_BACKENDS = ("sycl", "vulkan", "opencl", "cann", "metal", "webgpu", "zdnn", "musa", "hexagon", "virtgpu",
                   "openvino", "zendnn", "et")


def main() -> None:
    shutil.rmtree(CARRY, ignore_errors=True)
    (CARRY / "site").mkdir(parents=True)
    pristine = vendor_dir()
    with tempfile.TemporaryDirectory() as tmp:
        src = _unpack(fetch_sdist(), Path(tmp))
        llama = src / "vendor" / "llama.cpp"
        apply_patches(llama)
        apply_bindings_patches(src)
        dst = CARRY / "llama.cpp"
        dst.mkdir()
        for name in ("CMakeLists.txt", "cmake", "src", "include", "vendor", "licenses", "ggml"):
            (shutil.copytree if (llama / name).is_dir() else shutil.copy2)(llama / name, dst / name)
        for b in UNUSED_BACKENDS:
            shutil.rmtree(dst / "ggml" / "src" / f"ggml-{b}", ignore_errors=True)
        shutil.copytree(src / "llama_cpp", CARRY / "site" / "llama_cpp")
    rel = pristine.relative_to(pristine.parents[3])  # src/pristine-*/llama_cpp_python-*/vendor/llama.cpp
    conv = CARRY / "cache" / "src" / rel
    conv.mkdir(parents=True)
    for name in ("convert_hf_to_gguf.py", "conversion", "gguf-py"):
        (shutil.copytree if (pristine / name).is_dir() else shutil.copy2)(pristine / name, conv / name)
    (conv / "models").mkdir()
    shutil.copy2(pristine / "models" / "ggml-vocab-gpt-2.gguf", conv / "models")
    shutil.copytree(pristine / "gguf-py" / "gguf", CARRY / "site" / "gguf")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "diskcache==5.6.3", "-d", tmp],
                       check=True)
        with zipfile.ZipFile(next(Path(tmp).glob("diskcache-*.whl"))) as z:
            z.extractall(CARRY / "site")
    size = sum(f.stat().st_size for f in CARRY.rglob("*") if f.is_file())
    print(f"{CARRY}: {size / 2**20:.1f} MiB (llama-cpp-python {SDIST_VERSION} patched tree, converter, site)")


if __name__ == "__main__":
    main()
