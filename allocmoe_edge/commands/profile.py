"""`allocmoe profile`: layer sensitivities S[l, k] of a Hugging Face MoE model."""

from __future__ import annotations

import click

from ..sensitivity import MODES
from .options import calib_option, load_options


@click.command("profile")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@calib_option
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Sensitivity JSON to write.")
@click.option("--mode", type=click.Choice(MODES), default="isolated", show_default=True,
              help="isolated: other layers at full top-k (the paper); deeper-top1: later layers at top-1.")
@load_options
def command(model_dir: str, calib: str, output: str, mode: str, ctx: int, max_tokens: int | None,
            max_memory: str | None, offload_folder: str | None) -> None:
    """Measure perplexity and KL divergence with each MoE layer at top-1..K (others at full
    budget). Interrupted runs keep their layers in OUTPUT; rerun the same command to resume."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from ..profile import run_profile

    columns = (TextColumn("profiling"), BarColumn(), TextColumn("{task.completed}/{task.total} layer forwards"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task("profile", total=None)
        try:
            doc = run_profile(
                model_dir, calib, output, mode=mode, ctx=ctx, max_tokens=max_tokens, max_memory=max_memory,
                offload_folder=offload_folder,
                on_start=lambda total: progress.update(task, total=total),
                on_progress=lambda n: progress.advance(task, n),
            )
        except KeyboardInterrupt:
            click.echo(f"interrupted; finished layers are kept in {output}; rerun to resume", err=True)
            raise
    cost = doc["cost"]
    click.echo(
        f"wrote {output}: {len(doc['layers'])} MoE layers x k=1..{doc['model']['k_orig']}, "
        f"full-budget PPL {doc['full']['ppl']:.4f}, {cost['layer_forwards']} layer forwards in {cost['seconds']:.1f} s"
    )
