"""The build's patch steps: the bindings series applies to the pinned sdist's llama_cpp package,
a patch that does not apply is refused by name, and both series are part of the wheel cache key;
the series ships with the package; RPC builds; the build's progress lines."""

from __future__ import annotations

import shutil
import sys
import tomllib
from pathlib import Path

import pytest

from allocmoe_edge import build_runtime
from allocmoe_edge.build_runtime import (
    BuildOptions,
    apply_bindings_patches,
    build_progress,
    cache_key,
    patch_hash,
    run_logged,
)
from allocmoe_edge.errors import AllocMoeError

BAD_PATCH = """\
--- a/llama_cpp/llama.py
+++ b/llama_cpp/llama.py
@@ -1,3 +1,3 @@
-this line is not in the pinned llama.py
+nor is this one
 context
 context
"""


@pytest.fixture
def pristine_bindings(tmp_path: Path) -> Path:
    """A scratch sdist root holding a copy of the pinned sdist's llama_cpp package."""
    sdist = build_runtime.vendor_dir().parent.parent
    shutil.copytree(sdist / "llama_cpp", tmp_path / "sdist" / "llama_cpp")
    return tmp_path / "sdist"


def test_bindings_series_applies_to_the_pinned_sdist(pristine_bindings):
    llama_py = pristine_bindings / "llama_cpp" / "llama.py"
    assert "tensor_buft_overrides" not in llama_py.read_text()
    apply_bindings_patches(pristine_bindings, log=lambda _: None)
    assert "tensor_buft_overrides: Optional[List[Tuple[str, str]]] = None" in llama_py.read_text()
    assert "class llama_model_tensor_buft_override" in (pristine_bindings / "llama_cpp" / "llama_cpp.py").read_text()


def test_a_bindings_patch_that_does_not_apply_is_refused_by_name(pristine_bindings, tmp_path, monkeypatch):
    series = tmp_path / "bindings"
    series.mkdir()
    (series / "0001-broken.patch").write_text(BAD_PATCH)
    monkeypatch.setattr(build_runtime, "BINDINGS_PATCH_DIR", series)
    before = (pristine_bindings / "llama_cpp" / "llama.py").read_bytes()
    with pytest.raises(AllocMoeError, match=r"patch 0001-broken.patch does not apply to the pinned "
                                            r"llama-cpp-python bindings \(failing file: llama_cpp/llama.py\)"):
        apply_bindings_patches(pristine_bindings, log=lambda _: None)
    assert (pristine_bindings / "llama_cpp" / "llama.py").read_bytes() == before


def test_patch_hash_covers_the_bindings_series(tmp_path, monkeypatch):
    patches = tmp_path / "patches"
    shutil.copytree(build_runtime.PATCH_DIR, patches)
    monkeypatch.setattr(build_runtime, "PATCH_DIR", patches)
    monkeypatch.setattr(build_runtime, "BINDINGS_PATCH_DIR", patches / "bindings")
    before = patch_hash()
    bindings = build_runtime.patch_files(patches / "bindings")[0]
    bindings.write_text(bindings.read_text() + "\n")
    assert patch_hash() != before


def test_the_series_has_one_copy_that_wheels_ship():
    root = Path(__file__).resolve().parent.parent
    assert build_runtime.PATCH_DIR.resolve() == root / "patches"  # the package's patches/ is the symlink
    package_data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = {p for pattern in package_data["allocmoe_edge"] for p in (root / "allocmoe_edge").glob(pattern)}
    assert set(build_runtime.all_patch_files()) <= shipped


def test_rpc_option_adds_ggml_rpc_and_keeps_the_other_keys():
    assert "-DGGML_RPC=ON" in BuildOptions(rpc=True).cmake_args()
    assert "-DGGML_RPC=ON" not in BuildOptions().cmake_args()
    assert BuildOptions(rpc=True).cmake_args()[:-1] == BuildOptions().cmake_args()  # the other flags unchanged
    assert cache_key(BuildOptions(rpc=True)) != cache_key(BuildOptions())


@pytest.mark.parametrize("line, expected", [
    ("[ 42%] Building CXX object src/CMakeFiles/llama.dir/llama.cpp.o",
     (42, "Building CXX object src/CMakeFiles/llama.dir/llama.cpp.o")),
    ("  [30/120] /usr/bin/g++ -DGGML_BUILD -O3 -o vendor/ggml/CMakeFiles/ggml-base.dir/ggml.c.o -c ggml.c",
     (25, "building ggml.c.o")),
    ("[7/7] Linking CXX shared library bin/libllama.so", (100, "Linking CXX shared library bin/libllama.so")),
    ("  Building wheel for llama_cpp_python (pyproject.toml): still running...", None),
])
def test_build_progress_reads_make_and_ninja_lines(line, expected):
    assert build_progress(line) == expected


def test_run_logged_reports_steps_and_every_ten_percent(tmp_path):
    lines = ["*** Configuring CMake...", *(f"[{i}/40] cc -o obj{i}.o" for i in range(1, 41)), "done"]
    script = "".join(f"print({line!r})\n" for line in lines)
    logged: list[str] = []
    run_logged([sys.executable, "-c", script], tmp_path / "build.log", "the fake build", logged.append)
    assert logged[0] == "  Configuring CMake..."
    assert [int(m.split("%")[0]) for m in logged[1:]] == [2, 12, 22, 32, 42, 52, 62, 72, 82, 92]
    assert (tmp_path / "build.log").read_text().splitlines() == lines
    with pytest.raises(AllocMoeError, match=r"(?s)the fake build failed \(full log: .*build.log\):\n.*boom\n$"):
        run_logged([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], tmp_path / "build.log",
                   "the fake build", logged.append)
