"""`allocmoe demo`: profile, allocate, convert, eval, bench and report on the bundled model."""

from __future__ import annotations

import click


@click.command("demo")
@click.option("--out", "out_dir", default="allocmoe-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for every artefact and the report; a rerun reuses what is still valid there.")
@click.option("--quick", is_flag=True,
              help="Fewer calibration and evaluation tokens, one bench repetition, short pp/tg tests.")
def command(out_dir: str, quick: bool) -> None:
    """Run the whole method on the bundled tiny MoE: sensitivity profile, Alloc-L+T plans at
    25/50/75 % budget, one q8_0 GGUF holding them, quality (PPL, KLD, top-1) and speed (pp/tg)
    of every configuration, then report.md and frontier.png in OUT.

    The sensitivity file and the GGUF are reused while the model, calibration text, plans and
    settings they were made from are unchanged (see OUT/manifest.json).
    """
    from pathlib import Path

    from ..demo import run_demo

    result = run_demo(out_dir, quick=quick)
    click.echo(result.table)
    status = ", ".join(f"{name} {step['status']}" for name, step in result.steps.items())
    click.echo(f"\n{status}; {result.seconds:.0f} s. Report: {Path(out_dir) / 'report.md'}")
