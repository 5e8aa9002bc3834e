"""`allocmoe build-runtime`: build and install the patched llama-cpp-python."""

from __future__ import annotations

import click


@click.command("build-runtime")
@click.option("--backend", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="ggml backend to build.")
@click.option("--cuda-arch", default="90", show_default=True,
              help="CMAKE_CUDA_ARCHITECTURES for --backend cuda (90 = H100/H200).")
@click.option("--native/--portable", default=True, show_default=True,
              help="CPU builds: -march=native (fast, this CPU only) or a portable build.")
@click.option("--sanitize", type=click.Choice(["", "address"]), default="", show_default=True,
              help="Build with AddressSanitizer ('address') for fuzzing the loader.")
@click.option("--no-install", is_flag=True, help="Only build and cache the wheel; print its path.")
def command(backend: str, cuda_arch: str, native: bool, sanitize: str, no_install: bool) -> None:
    """Build llama-cpp-python from its pinned sdist with patches/ applied, cache the
    wheel ($ALLOCMOE_CACHE, default ~/.cache/allocmoe-edge) and install it."""
    from ..build_runtime import BuildOptions, build_and_install

    opts = BuildOptions(backend=backend, cuda_arch=cuda_arch, native=native, sanitize=sanitize)
    wheel = build_and_install(opts, install=not no_install, log=lambda m: click.echo(m, err=True))
    click.echo(str(wheel))
