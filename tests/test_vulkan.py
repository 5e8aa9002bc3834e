"""A Vulkan build's prerequisites: what is missing is named with its apt command, too-old headers are
replaced from the build cache, and the build's CMake flags; doctor lists the devices it sees."""

from __future__ import annotations

from pathlib import Path

import pytest

from allocmoe_edge import vulkan
from allocmoe_edge.build_runtime import BuildOptions
from allocmoe_edge.errors import AllocMoeError


def _headers(include: Path, minor: int, patch: int) -> Path:
    core = include / "vulkan" / "vulkan_core.h"
    core.parent.mkdir(parents=True)
    core.write_text(f"#define VK_HEADER_VERSION {patch}\n"
                    f"#define VK_HEADER_VERSION_COMPLETE VK_MAKE_API_VERSION(0, 1, {minor}, VK_HEADER_VERSION)\n")
    return include


def test_header_version(tmp_path):
    assert vulkan.header_version(_headers(tmp_path / "a", 3, 239)) == (1, 3, 239)
    assert vulkan.header_version(_headers(tmp_path / "b", 4, 309)) == (1, 4, 309)
    assert vulkan.header_version(tmp_path / "none") is None
    assert (1, 3, 239) < vulkan.MIN_HEADERS <= (1, 4, 309)  # Debian 12's are too old, Debian 13's are not


def test_missing_packages_are_named_with_their_apt_command(tmp_path, monkeypatch):
    monkeypatch.setattr(vulkan.ctypes.util, "find_library", lambda name: None)
    monkeypatch.setattr(vulkan.shutil, "which", lambda name: None)
    assert vulkan.missing_packages(tmp_path) == ["libvulkan1", "glslc", "spirv-headers", "libvulkan-dev"]
    monkeypatch.setattr(vulkan, "missing_packages", lambda include=None: ["glslc", "spirv-headers"])
    with pytest.raises(AllocMoeError) as e:
        vulkan.build_include(tmp_path / "cache")
    assert "apt-get install -y glslc\n  apt-get install -y spirv-headers" in str(e.value)
    assert not (tmp_path / "cache").exists()  # nothing fetched, nothing installed


def test_new_enough_system_headers_are_used_and_old_ones_replaced_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(vulkan, "missing_packages", lambda include=None: [])
    monkeypatch.setattr(vulkan, "SYSTEM_INCLUDE", _headers(tmp_path / "new", 4, 309))
    assert vulkan.build_include(tmp_path / "cache") is None
    monkeypatch.setattr(vulkan, "SYSTEM_INCLUDE", _headers(tmp_path / "old", 3, 239))
    fetched = []

    def fetch(target: Path) -> None:
        fetched.append(target)
        _headers(target / "usr" / "include", 4, 309)

    monkeypatch.setattr(vulkan, "_fetch_headers", fetch)
    include = vulkan.build_include(tmp_path / "cache", log=lambda m: None)
    assert include == tmp_path / "cache" / "vulkan-headers" / vulkan.NEWER_HEADERS_SUITE / "usr" / "include"
    assert vulkan.build_include(tmp_path / "cache", log=lambda m: None) == include and len(fetched) == 1  # cached


def test_vulkan_cmake_flags():
    args = BuildOptions(backend="vulkan", vulkan_include="/cache/inc").cmake_args()
    assert "-DGGML_VULKAN=ON" in args and "-DVulkan_INCLUDE_DIR=/cache/inc" in args and "-DGGML_CUDA=ON" not in args
    assert not any("Vulkan_INCLUDE_DIR" in a for a in BuildOptions(backend="vulkan").cmake_args())
    with pytest.raises(AllocMoeError, match="cpu, cuda or vulkan"):
        BuildOptions(backend="metal").cmake_args()


@pytest.mark.runtime
def test_doctor_lists_the_devices(patched_runtime):
    from allocmoe_edge.runtime import doctor

    devices = doctor()["devices"]
    assert any(d["backend"] == "CPU" and d["type"] == "CPU" and d["name"] for d in devices), devices


def test_lavapipe_is_found_by_its_driver_manifest(tmp_path):
    icd = tmp_path / "icd.d"
    icd.mkdir()
    assert not vulkan.lavapipe_installed((icd, tmp_path / "missing"))
    (icd / "radeon_icd.x86_64.json").write_text("{}")
    assert not vulkan.lavapipe_installed((icd,))
    (icd / "lvp_icd.x86_64.json").write_text("{}")
    assert vulkan.lavapipe_installed((tmp_path / "missing", icd))
