"""`allocmoe build-runtime`: build and install the patched llama-cpp-python (or only its library), and
llama.cpp's rpc-server for RPC builds."""

from __future__ import annotations

import click


@click.command("build-runtime")
@click.option("--backend", type=click.Choice(["cpu", "cuda", "vulkan"]), default="cpu", show_default=True,
              help="ggml backend to build. vulkan checks for glslc, the Vulkan loader and headers and the SPIR-V "
                   "headers first and names the apt packages that are missing (it installs nothing); headers older "
                   "than 1.3.272 (Debian 12) are replaced by Debian 13's, downloaded into the build cache.")
@click.option("--cuda-arch", default="90", show_default=True,
              help="CMAKE_CUDA_ARCHITECTURES for --backend cuda (90 = H100/H200).")
@click.option("--cuda-fa/--no-cuda-fa", default=True, show_default=True,
              help="CUDA builds: compile the flash-attention kernels (--no-cuda-fa builds much faster; "
                   "flash attention is then unavailable).")
@click.option("--native/--portable", default=True, show_default=True,
              help="CPU builds: -march=native (fast, this CPU only) or a portable build.")
@click.option("--sanitize", type=click.Choice(["", "address"]), default="", show_default=True,
              help="Build with AddressSanitizer ('address') for fuzzing the loader.")
@click.option("--rpc", is_flag=True,
              help="Build with llama.cpp's RPC backend (GGML_RPC=ON: load(..., rpc_servers=[...]) offloads layers to "
                   "other machines) and also build its rpc-server (ggml-rpc-server) from the same patched sources; "
                   "its path is printed after the wheel's. Run the server on each machine that lends its CPU or GPU.")
@click.option("--tools", is_flag=True,
              help="Also build llama.cpp's own programs from the same patched sources and options: llama-server, "
                   "llama-cli, llama-bench and llama-perplexity (cached like the wheel; their folder is printed "
                   "last). They run budgeted files as llama.cpp's users know them (see the README).")
@click.option("--no-install", is_flag=True, help="Only build and cache the wheel; print its path.")
@click.option("--library-only", is_flag=True,
              help="Build only the shared libraries with CMake (no wheel, nothing installed) and print their "
                   "folder: point LLAMA_CPP_LIB_PATH at it. Cached like the wheel. With --rpc the folder also holds "
                   "ggml-rpc-server (what a machine that only serves layers needs).")
@click.option("--source", type=click.Path(exists=True, file_okay=False), default=None,
              help="(--library-only) an already patched llama.cpp tree laid out by scripts/device_carry.py "
                   "(default: the pinned sdist, patched here).")
@click.option("--build-dir", type=click.Path(file_okay=False), default=None,
              help="(--library-only) keep the CMake build here and build incrementally (default: a scratch folder).")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=None,
              help="(--library-only, and rpc-server) parallel compile jobs (default: all cores).")
def command(backend: str, cuda_arch: str, cuda_fa: bool, native: bool, sanitize: str, rpc: bool, tools: bool,
            no_install: bool, library_only: bool, source: str | None, build_dir: str | None, jobs: int | None) -> None:
    """Build llama-cpp-python from its pinned sdist with patches/ applied, cache the
    wheel ($ALLOCMOE_CACHE, default ~/.cache/allocmoe-edge) and install it.

    A first build takes minutes (progress is reported every 10 %); later calls with the same
    options, patches and Python reuse the cached wheel and take seconds.

    Examples: allocmoe build-runtime --backend cuda --cuda-arch 89;
    allocmoe build-runtime --backend vulkan --library-only (lavapipe: GGML_VK_VISIBLE_DEVICES=0);
    allocmoe build-runtime --rpc (then start the printed rpc-server on every machine);
    allocmoe build-runtime --tools (llama-server, llama-cli, llama-bench, llama-perplexity)
    """
    from pathlib import Path

    from ..build_runtime import BuildOptions, build_and_install
    from ..errors import AllocMoeError

    log = lambda m: click.echo(m, err=True)  # noqa: E731
    vulkan_include = ""
    if backend == "vulkan":
        from ..build_runtime import cache_dir
        from ..vulkan import build_include

        vulkan_include = str(build_include(cache_dir(), log) or "")
    opts = BuildOptions(backend=backend, cuda_arch=cuda_arch, native=native, sanitize=sanitize, cuda_fa=cuda_fa,
                        rpc=rpc, vulkan_include=vulkan_include)
    if library_only:
        from ..build_lib import build_library

        lib = build_library(opts, Path(source) if source else None, jobs, Path(build_dir) if build_dir else None, log)
        click.echo(str(lib))
        _tools(opts, tools, jobs, log)
        return
    if source or build_dir:
        raise AllocMoeError("--source and --build-dir are for --library-only builds")
    click.echo(str(build_and_install(opts, install=not no_install, log=log)))
    if rpc:
        from ..build_lib import build_rpc_server

        click.echo(str(build_rpc_server(opts, jobs, log)))
    _tools(opts, tools, jobs, log)


def _tools(opts, wanted: bool, jobs: int | None, log) -> None:
    """Build llama.cpp's programs when ``wanted`` and print their folder."""
    if wanted:
        from ..build_lib import build_tools

        click.echo(str(build_tools(opts, jobs, log)))
