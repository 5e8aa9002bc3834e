"""`allocmoe demo`: profile, allocate, convert, eval, bench and report on a bundled model."""

from __future__ import annotations

import click

from ..assets import DEMO_MODEL, MODELS


@click.command("demo")
@click.option("--out", "out_dir", default="allocmoe-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for every artefact and the report; a rerun reuses what is still valid there.")
@click.option("--model", type=click.Choice(sorted(MODELS)), default=DEMO_MODEL, show_default=True,
              help="Bundled model: deep-moe (OLMoE-style, 8 MoE layers, 32 experts top-8) or tiny-moe "
                   "(Mixtral-style, 4 layers, 16 experts top-4).")
@click.option("--quick", is_flag=True,
              help="Fewer calibration and evaluation tokens, two bench repetitions, short pp/tg tests.")
def command(out_dir: str, model: str, quick: bool) -> None:
    """Run the whole method on a bundled MoE: sensitivity profile, Alloc-L+T plans at 12.5/25/50/75 %
    budget, one q8_0 GGUF holding them, quality (PPL, KLD, top-1) of every configuration with its
    decode limit, speed (pp/tg, mean ± sd, ties within the noise), then report.md and frontier.png in OUT.

    The bundled models are too small for CPU speed to follow the bytes a budget saves, so speed is
    measured on a synthetic OLMoE-1B-7B shape (a few blocks, random weights) at the same budget
    fractions; report.md says so. The sensitivity file, the GGUF and the synthetic file are reused
    while what they were made from is unchanged (see OUT/manifest.json).
    """
    from pathlib import Path

    from ..demo import run_demo

    result = run_demo(out_dir, quick=quick, model=model)
    click.echo(result.table)
    status = ", ".join(f"{name} {step['status']}" for name, step in result.steps.items())
    click.echo(f"\n{status}; {result.seconds:.0f} s. Report: {Path(out_dir) / 'report.md'}")
