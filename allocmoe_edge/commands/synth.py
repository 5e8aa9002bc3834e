"""`allocmoe synth`: a weightless GGUF with a real MoE model's shapes, for speed benchmarks."""

from __future__ import annotations

import click

from ..synth import QUANT_TYPES, SHAPES


@click.command("synth")
@click.option("--shape", "shape", required=True, type=click.Choice(sorted(SHAPES)), help="Model shape to copy.")
@click.option("--type", "qtype", default="q4_0", show_default=True, type=click.Choice(QUANT_TYPES),
              help="Weight type of the 2-D and 3-D tensors (norms and routers stay f32).")
@click.option("--layers", type=click.IntRange(min=1), default=None, help="Keep only the first N blocks (quick tests).")
@click.option("--seed", default=0, show_default=True, help="Random seed of the weights.")
@click.option("--no-weights", is_flag=True,
              help="Leave the quantized weights unwritten (a sparse file, zeros when read): seconds even for a 30B "
                   "shape, for measuring what a context reserves (metadata-only loads), not for running.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="GGUF to write (atomically).")
def command(shape: str, qtype: str, layers: int | None, seed: int, no_weights: bool, output: str) -> None:
    """Write a GGUF with SHAPE's exact tensor shapes and loader metadata and random weights.

    The file is labelled synthetic (general.name, allocmoe.synthetic = true): it is for
    speed only; quality numbers on it are meaningless.

    Example: allocmoe synth --shape deepseek-v2-lite --type q4_0 -o dsv2lite-synth.gguf
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    from ..gguf_meta import read_info
    from ..synth import synthesize

    with Progress(TextColumn("writing"), BarColumn(), DownloadColumn(), transient=True) as bar:
        task = bar.add_task("synth", total=None)
        synthesize(shape, qtype, output, layers, seed,
                   progress=lambda done, total: bar.update(task, completed=done, total=total), weights=not no_weights)
    info = read_info(output)
    click.echo(f"wrote {output}: {info.architecture}, {info.block_count} blocks, {len(info.moe_layers)} MoE layers x "
               f"{info.expert_count} experts (top-{info.expert_used_count}), {info.n_bytes / 2**20:.0f} MiB, "
               + ("no weights (sparse)" if no_weights else "random weights"))
