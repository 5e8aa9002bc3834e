"""`allocmoe refine`: measure a plan end to end and improve it by local search."""

from __future__ import annotations

import click

from ..sensitivity import METRICS
from .options import calib_option, load_options


def _fmt(block: dict | None, key: str) -> str:
    value = (block or {}).get(key)
    return "-" if value is None else f"{value:.5g}"


@click.command("refine")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--plan", "plan_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Plan JSON to refine.")
@calib_option
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Refined plan JSON to write.")
@click.option("--steps", default=20, show_default=True, type=click.IntRange(min=0),
              help="Most candidate moves to evaluate (one end-to-end evaluation each).")
@click.option("--metric", type=click.Choice(METRICS), default="kld", show_default=True,
              help="What a move must improve.")
@load_options
def command(model_dir: str, plan_path: str, calib: str, output: str, steps: int, metric: str, ctx: int,
            max_tokens: int | None, max_memory: str | None, offload_folder: str | None) -> None:
    """Report the plan's predicted vs measured degradation, then move single activations
    between layers while the measured metric improves; write the result as a 'refined' plan."""
    from ..refine import run_refine

    def on_step(counts: list[int], value: float, accepted: bool) -> None:
        click.echo(f"  {'keep' if accepted else 'drop'} {counts} {metric}={value:.5g}", err=True)

    plan = run_refine(model_dir, plan_path, calib, output, steps=steps, metric=metric, ctx=ctx,
                      max_tokens=max_tokens, max_memory=max_memory, offload_folder=offload_folder, on_step=on_step)
    m = plan.measured
    initial = m["initial"]
    click.echo(f"{'':10} {'counts':>24} {'pred KLD':>10} {'KLD':>10} {'pred PPL':>10} {'PPL':>10} {'top-1':>7}")
    for name, counts, pred, meas in (("initial", initial["counts"], initial["predicted"], initial["measured"]),
                                     ("refined", list(plan.counts), plan.predicted, m)):
        click.echo(f"{name:10} {str(counts):>24} {_fmt(pred, 'kld'):>10} {_fmt(meas, 'kld'):>10} "
                   f"{_fmt(pred, 'ppl'):>10} {_fmt(meas, 'ppl'):>10} {meas['top1']:>7.3f}")
    click.echo(f"full budget PPL {m['full']['ppl']:.5g}; {len(m['moves'])} move(s) kept of "
               f"{m['evaluations'] - 1} tried; wrote {output}")
