"""What a Vulkan build of the patched runtime needs, checked before the build (never installed here).

ggml-vulkan compiles its shaders with ``glslc`` and needs the Vulkan loader, the SPIR-V headers and
Vulkan headers recent enough for the pinned llama.cpp (it uses ``vk::LayerSettingEXT`` unguarded,
from VK_EXT_layer_settings, which the headers have since 1.3.272). Debian 12 ships 1.3.239: then
the header-only ``libvulkan-dev`` of Debian 13 (1.4.309) is downloaded from the machine's own Debian
mirror through a private apt configuration (the system's sources, lists and caches stay as they
are) and unpacked into the build cache; CMake's ``Vulkan_INCLUDE_DIR`` points there. Anything
missing is reported with the apt command that installs it; nothing is installed on its own.
Mesa's lavapipe (``mesa-vulkan-drivers``) is a Vulkan device on the CPU: it runs the backend's
code paths here (``GGML_VK_VISIBLE_DEVICES=0`` lists it), at no GPU's speed.
"""

from __future__ import annotations

import ctypes.util
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import AllocMoeError

MIN_HEADERS = (1, 3, 272)  # VK_EXT_layer_settings (vk::LayerSettingEXT)
NEWER_HEADERS_SUITE = "trixie"  # Debian 13: libvulkan-dev 1.4.309
SYSTEM_INCLUDE = Path("/usr/include")
_DEBIAN_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
_VERSION = re.compile(r"#define VK_HEADER_VERSION_COMPLETE VK_MAKE_API_VERSION\(\s*\d+,\s*(\d+),\s*(\d+),")
_PATCH = re.compile(r"#define VK_HEADER_VERSION (\d+)")


def header_version(include: Path) -> tuple[int, int, int] | None:
    """(major, minor, patch) of the Vulkan headers under ``include``, None without them."""
    core = include / "vulkan" / "vulkan_core.h"
    if not core.is_file():
        return None
    text = core.read_text(errors="replace")
    complete, patch = _VERSION.search(text), _PATCH.search(text)
    if complete is None or patch is None:
        return None
    return int(complete.group(1)), int(complete.group(2)), int(patch.group(1))


def missing_packages(include: Path = SYSTEM_INCLUDE) -> list[str]:
    """The Debian packages a Vulkan build lacks on this machine (the loader, glslc, SPIR-V headers, any
    Vulkan headers; too old ones are replaced from the cache, see `build_include`)."""
    missing = []
    if ctypes.util.find_library("vulkan") is None:
        missing.append("libvulkan1")
    if shutil.which("glslc") is None:
        missing.append("glslc")
    if not (include / "spirv" / "unified1" / "spirv.hpp").is_file():
        missing.append("spirv-headers")
    if header_version(include) is None:
        missing.append("libvulkan-dev")
    return missing


ICD_DIRS = (Path("/usr/share/vulkan/icd.d"), Path("/etc/vulkan/icd.d"))  # where Vulkan drivers register


def lavapipe_installed(icd_dirs: tuple[Path, ...] = ICD_DIRS) -> bool:
    """Whether Mesa's lavapipe driver (``mesa-vulkan-drivers``) is registered with the Vulkan loader."""
    return any(any(d.glob("lvp_icd*.json")) for d in icd_dirs if d.is_dir())


def install_command(packages: list[str]) -> str:
    """What to run (as root) for ``packages``, one line per package."""
    return "\n".join(f"  apt-get install -y {p}" for p in packages)


def build_include(cache: Path, log: Callable[[str], None] = print) -> Path | None:
    """The include folder a Vulkan build should use: None when the system's headers are new enough,
    else newer headers unpacked into ``cache`` (downloaded once). Raises with the apt commands when
    packages are missing."""
    missing = missing_packages()
    if missing:
        raise AllocMoeError("a Vulkan build needs packages this machine lacks; install them (as root) with\n"
                            f"{install_command(missing)}\n(and mesa-vulkan-drivers for lavapipe, a Vulkan device on "
                            "the CPU, where no GPU driver is installed)")
    have = header_version(SYSTEM_INCLUDE)
    if have is not None and have >= MIN_HEADERS:
        return None
    target = cache / "vulkan-headers" / NEWER_HEADERS_SUITE
    include = target / "usr" / "include"
    fetched = header_version(include)
    if fetched is None or fetched < MIN_HEADERS:
        log(f"Vulkan headers {'.'.join(map(str, have or ()))} are older than {'.'.join(map(str, MIN_HEADERS))}: "
            f"fetching libvulkan-dev of Debian {NEWER_HEADERS_SUITE} into {target}")
        _fetch_headers(target)
        fetched = header_version(include)
        if fetched is None or fetched < MIN_HEADERS:
            raise AllocMoeError(f"the downloaded libvulkan-dev has no usable headers under {include}")
    return include


def _fetch_headers(target: Path) -> None:
    """Download libvulkan-dev of `NEWER_HEADERS_SUITE` with apt-get from the system's Debian mirror, through a
    private sources/lists/cache folder, and unpack it into ``target`` (no package is installed)."""
    if not _DEBIAN_SOURCES.is_file() or shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise AllocMoeError(f"the system's Vulkan headers are too old (need {'.'.join(map(str, MIN_HEADERS))}) and "
                            f"this is not a Debian system to fetch newer ones from; install Vulkan SDK headers and "
                            "set CMAKE_ARGS=-DVulkan_INCLUDE_DIR=<their include folder>")
    stanzas = [s for s in _DEBIAN_SOURCES.read_text().split("\n\n") if re.search(r"^Suites:", s, re.M)]
    main = next((s for s in stanzas if "security" not in s), None)
    if main is None:
        raise AllocMoeError(f"{_DEBIAN_SOURCES} names no Debian mirror")
    with tempfile.TemporaryDirectory(prefix="allocmoe-apt-") as tmp:
        root = Path(tmp)
        (root / "parts").mkdir()
        (root / "lists" / "partial").mkdir(parents=True)
        (root / "cache" / "archives" / "partial").mkdir(parents=True)
        (root / "parts" / "newer.sources").write_text(
            re.sub(r"^Suites:.*$", f"Suites: {NEWER_HEADERS_SUITE}", main, flags=re.M) + "\n")
        apt = ["apt-get", "-q", "-o", "Dir::Etc::SourceList=/dev/null", "-o", f"Dir::Etc::SourceParts={root}/parts",
               "-o", f"Dir::State::Lists={root}/lists", "-o", f"Dir::Cache={root}/cache"]
        for args in (["update"], ["download", "libvulkan-dev"]):
            proc = subprocess.run(apt + args, cwd=root, capture_output=True, text=True)
            if proc.returncode != 0:
                raise AllocMoeError(f"apt-get {args[0]} for the newer Vulkan headers failed:\n{proc.stderr[-1500:]}")
        debs = sorted(root.glob("libvulkan-dev_*.deb"))
        if not debs:
            raise AllocMoeError("apt-get download left no libvulkan-dev package")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".vulkan-headers-", dir=target.parent))
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(staging)], check=True, capture_output=True)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
