"""Click options shared by several subcommands."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import click

F = TypeVar("F", bound=Callable[..., object])


def cpu_moe_options(f: F) -> F:
    """``--cpu-moe`` and ``--n-cpu-moe N`` (parameters ``cpu_moe: bool``, ``n_cpu_moe: int``)."""
    f = click.option(
        "--n-cpu-moe", "n_cpu_moe", type=click.IntRange(min=0), default=0, show_default=True, metavar="N",
        help="Keep the routed experts of the first N blocks in system memory (llama.cpp's --n-cpu-moe); "
             "everything else follows -ngl. Use it when all but a few blocks' experts fit on the GPU.")(f)
    return click.option(
        "--cpu-moe", is_flag=True,
        help="Keep every block's routed-expert weights in system memory while -ngl offloads the rest to the "
             "GPU (llama.cpp's --cpu-moe): the edge-GPU set-up for models whose experts do not fit in GPU "
             "memory. Decode then reads the experts from system memory, which is where a budget saves the most.")(f)


def calib_option(f: F) -> F:
    """``--calib FILE`` (parameter ``calib: str``): the calibration text of the torch commands."""
    return click.option("--calib", required=True, type=click.Path(exists=True, dir_okay=False),
                        help="Calibration text file.")(f)


def load_options(f: F) -> F:
    """Options shared by the torch commands: calibration windows (``ctx``, ``max_tokens``) and
    memory-capped loading (``max_memory``, ``offload_folder``)."""
    options = [
        click.option("--ctx", default=256, show_default=True, type=click.IntRange(min=4),
                     help="Tokens per calibration window."),
        click.option("--max-tokens", type=click.IntRange(min=4), default=None,
                     help="Use at most this many calibration tokens."),
        click.option("--max-memory", default=None,
                     help="Memory caps for loading, e.g. '8GiB' or '0=20GiB,cpu=40GiB'; the rest is offloaded."),
        click.option("--offload-folder", type=click.Path(file_okay=False), default=None,
                     help="Folder for weights offloaded to disk under --max-memory."),
    ]
    for option in reversed(options):
        f = option(f)
    return f
