"""The library-only build (`build_lib`) and the device check's scripts: cache keys, stamped trees,
CMake flags, and the check's CPU-runnable steps."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from allocmoe_edge import build_lib
from allocmoe_edge.build_runtime import BuildOptions
from allocmoe_edge.errors import AllocMoeError
from allocmoe_edge.gguf_meta import read_info

ROOT = Path(__file__).resolve().parent.parent
GPU_CHECK = ROOT / "scripts" / "gpu_check.sh"
CUDA = BuildOptions(backend="cuda", cuda_arch="90", cuda_fa=False)


def test_configure_args_are_the_wheels_plus_a_bare_shared_build():
    args = build_lib.cmake_configure_args(CUDA)
    assert args[-len(CUDA.cmake_args()):] == CUDA.cmake_args()
    assert {"-DBUILD_SHARED_LIBS=ON", "-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=90", "-DGGML_CUDA_FA=OFF",
            "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON"} <= set(args)
    assert "-DGGML_CUDA_FA=OFF" not in BuildOptions(backend="cuda").cmake_args()


def test_library_key_follows_options_and_patches_not_python(monkeypatch):
    key = build_lib.library_key(CUDA)
    assert key != build_lib.library_key(BuildOptions(backend="cuda", cuda_arch="90"))
    monkeypatch.setattr(sys, "version_info", (3, 99, 0))
    assert build_lib.library_key(CUDA) == key
    monkeypatch.setattr(build_lib, "llama_patch_hash", lambda: "another series")
    assert build_lib.library_key(CUDA) != key


def test_source_tree_must_carry_this_patch_series(tmp_path):
    with pytest.raises(AllocMoeError, match="not a llama.cpp source tree"):
        build_lib.build_library(CUDA, source=tmp_path)
    (tmp_path / "CMakeLists.txt").write_text("")
    with pytest.raises(AllocMoeError, match="no .allocmoe-patch-hash"):
        build_lib.build_library(CUDA, source=tmp_path)
    (tmp_path / build_lib.STAMP).write_text("0" * 64)
    with pytest.raises(AllocMoeError, match="another patch series"):
        build_lib.build_library(CUDA, source=tmp_path)
    build_lib.stamp_tree(tmp_path)
    assert (tmp_path / build_lib.STAMP).read_text().strip() == build_lib.llama_patch_hash()


def test_cached_library_is_reused_without_cmake(tmp_path, monkeypatch):
    monkeypatch.setenv("ALLOCMOE_CACHE", str(tmp_path))
    cached = tmp_path / "lib" / build_lib.library_key(CUDA) / "bin"
    cached.mkdir(parents=True)
    (cached / "libllama.so").write_bytes(b"")
    monkeypatch.setattr(build_lib, "run_logged", lambda *a: pytest.fail("cmake ran for a cached build"))
    assert build_lib.build_library(CUDA, source=tmp_path / "absent") == cached


RPC = BuildOptions(rpc=True)


def test_rpc_builds_configure_llama_cpps_tools():
    args = build_lib.cmake_configure_args(RPC)
    assert {"-DGGML_RPC=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_COMMON=ON"} <= set(args)
    assert "-DLLAMA_BUILD_SERVER=OFF" in args
    assert "-DLLAMA_BUILD_TOOLS=OFF" in build_lib.cmake_configure_args(BuildOptions())


@pytest.fixture
def fake_cmake(tmp_path, monkeypatch):
    """Record CMake commands instead of running them; a build leaves each requested target in bin/."""
    monkeypatch.setenv("ALLOCMOE_CACHE", str(tmp_path / "cache"))
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "CMakeLists.txt").write_text("")
    build_lib.stamp_tree(tree)
    commands: list[list[str]] = []

    def run(cmd, logfile, what, log):
        commands.append(cmd)
        if "--build" in cmd:
            bin_dir = Path(cmd[cmd.index("--build") + 1]) / "bin"
            bin_dir.mkdir(parents=True, exist_ok=True)
            for target in cmd[cmd.index("--target") + 1:]:
                (bin_dir / build_lib._ARTIFACTS[target]).write_bytes(b"")
            (bin_dir / "libggml-rpc.so").write_bytes(b"")

    monkeypatch.setattr(build_lib, "run_logged", run)
    return tree, commands


def test_rpc_library_build_adds_the_server(fake_cmake):
    tree, commands = fake_cmake
    folder = build_lib.build_library(RPC, source=tree, log=lambda m: None)
    assert commands[-1][-3:] == ["--target", "llama", "ggml-rpc-server"]
    assert {"libllama.so", "libggml-rpc.so", "ggml-rpc-server"} <= {f.name for f in folder.iterdir()}
    assert folder.parent.parent.name == "lib"


@pytest.fixture
def fake_sdist(fake_cmake, monkeypatch, tmp_path):
    """`fake_cmake`, and the pinned sdist an empty patched tree (builds that patch it themselves)."""
    (tmp_path / "sdist" / "vendor" / "llama.cpp").mkdir(parents=True)
    monkeypatch.setattr(build_lib, "fetch_sdist", lambda log: tmp_path / "sdist.tar.gz")
    monkeypatch.setattr(build_lib, "_unpack", lambda sdist, into: tmp_path / "sdist")
    monkeypatch.setattr(build_lib, "apply_patches", lambda tree, log: None)
    return fake_cmake


def test_rpc_server_alone_is_cached_apart_from_libraries(fake_sdist, monkeypatch):
    _, commands = fake_sdist
    server = build_lib.build_rpc_server(BuildOptions(), log=lambda m: None)  # rpc is implied
    assert server.name == "ggml-rpc-server" and server.parent.parent.parent.name == "rpc-server"
    assert commands[-1][-2:] == ["--target", "ggml-rpc-server"] and "-DGGML_RPC=ON" in commands[0]
    monkeypatch.setattr(build_lib, "run_logged", lambda *a: pytest.fail("cmake ran for a cached server"))
    assert build_lib.build_rpc_server(RPC, log=lambda m: None) == server


def test_tools_build_llama_cpps_programs_without_downloads_and_are_cached(fake_sdist, monkeypatch):
    _, commands = fake_sdist
    assert build_lib.cached_tools() == []
    vulkan = BuildOptions(backend="vulkan")
    folder = build_lib.build_tools(vulkan, log=lambda m: None)
    assert commands[-1][-5:] == ["--target", *build_lib.TOOLS]
    assert {"-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF",
            "-DGGML_VULKAN=ON"} <= set(commands[0])  # no web UI download, no OpenSSL
    assert folder.parent.parent.name == "tools" and set(build_lib.TOOLS) <= {f.name for f in folder.iterdir()}
    assert build_lib.cached_tools() == [{"folder": str(folder), "backend": "vulkan", "key": folder.parent.name}]
    monkeypatch.setattr(build_lib, "run_logged", lambda *a: pytest.fail("cmake ran for cached tools"))
    assert build_lib.build_tools(vulkan, log=lambda m: None) == folder
    monkeypatch.setattr(build_lib, "llama_patch_hash", lambda: "another series")
    assert build_lib.cached_tools() == []  # built from other patches: not offered


def test_gpu_check_script_parses():
    assert subprocess.run(["bash", "-n", str(GPU_CHECK)]).returncode == 0


@pytest.mark.slow
def test_gpu_check_synth_step_on_cpu(tmp_path):
    """The check's synth and mem steps (what they can run without a GPU, with this machine's library): both
    models with uniform-split plans and decode thresholds, and the compute buffers with and without Alloc-T."""
    import llama_cpp

    subprocess.run([sys.executable, str(ROOT / "scripts" / "device_carry.py")], check=True, capture_output=True)
    env = {**os.environ, "STEPS": "synth mem", "NGL": "0", "LAYERS": "2", "QWEN3_LAYERS": "2", "PYTHON": sys.executable,
           "WORK": str(tmp_path / "work"), "LIB": str(Path(llama_cpp.__file__).parent / "lib")}
    out = subprocess.run(["bash", str(GPU_CHECK), str(tmp_path / "out")], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    dsv2 = read_info(tmp_path / "work" / "dsv2lite-q4_0-2l.plans.gguf")
    assert dsv2.architecture == "deepseek2" and [p.budget_count for p in dsv2.plans] == [4, 3, 1]  # of 6
    assert dsv2.allocmoe["token_mode"] == "both" and all(p.thresholds is not None for p in dsv2.plans)
    qwen3 = read_info(tmp_path / "work" / "qwen3-30b-a3b-q4_0-2l.plans.gguf")
    assert qwen3.architecture == "qwen3moe" and [p.budget_count for p in qwen3.plans] == [12, 8, 4]  # of 16
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert all(f"ubatch {u}: with Alloc-T CPU" in summary for u in (512, 2048)), summary
