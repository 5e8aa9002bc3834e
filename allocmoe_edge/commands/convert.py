"""`allocmoe convert`: HF checkpoint -> one budgeted GGUF holding one or more plans."""

from __future__ import annotations

import click


@click.command("convert")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--plan", "plans", multiple=True, required=True, type=click.Path(dir_okay=False),
              help="plan.json from `allocmoe allocate`; repeat for several budgets in one file.")
@click.option("--default-plan", default=0, show_default=True, help="Index of the plan the file runs by default.")
@click.option("--outtype", type=click.Choice(["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"]),
              default="q8_0", show_default=True, help="Weight type (k-quants via llama.cpp's quantizer).")
@click.option("--pre-tokenizer", default=None,
              help="llama.cpp name of the BPE pre-tokenizer, used only if the converter does not know the model's.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="GGUF to write (atomically).")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
def command(model_dir: str, plans: tuple[str, ...], default_plan: int, outtype: str, pre_tokenizer: str | None,
            output: str, force: bool) -> None:
    """Convert MODEL_DIR with llama.cpp's converter (pinned sdist), quantize, and stamp the plans.

    The plans are checked against the checkpoint before any work starts. The standard
    <arch>.expert_used_count keeps its original value, so a stock llama.cpp runs the file at
    full budget; the patched runtime runs the default plan, or another with `allocmoe run --budget`.
    """
    from pathlib import Path

    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    from ..convert import build_budgeted_gguf
    from ..errors import AllocMoeError

    if Path(output).exists() and not force:
        raise AllocMoeError(f"{output} exists; pass --force to overwrite it")
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), transient=True) as bar:
        task = bar.add_task("converting", total=None)
        build_budgeted_gguf(model_dir, list(plans), output, outtype, default_plan, pre_tokenizer,
                            log=lambda m: bar.console.print(m),
                            progress=lambda done, total: bar.update(task, description="writing", completed=done,
                                                                    total=total))
    click.echo(f"wrote {output}")
