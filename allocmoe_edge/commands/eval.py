"""`allocmoe eval`: perplexity, KL divergence to full budget and top-1 agreement of every budget configuration."""

from __future__ import annotations

import click

from .options import cpu_moe_options


def _budgets(ctx: click.Context, param: click.Parameter, value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a comma-separated list of fractions such as 0.25,0.5,0.75") from None


@click.command("eval")
@click.argument("model", type=click.Path(exists=True))
@click.option("--text", "text_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Held-out text (UTF-8).")
@click.option("--ctx", default=256, show_default=True, type=click.IntRange(min=4),
              help="Tokens per chunk; the second half of each chunk is scored.")
@click.option("--chunks", type=click.IntRange(min=1), default=None, help="Evaluate at most N chunks (default: all).")
@click.option("--budgets", callback=_budgets, default=None,
              help="Budget fractions, e.g. 0.25,0.5,0.75: which stored plans and uniform top-k budgets to run "
                   "(default: every stored plan and uniform top-k at their budgets).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Write the results as JSON.")
@click.option("--backend", type=click.Choice(["llama", "torch"]), default="llama", show_default=True,
              help="llama: MODEL is a GGUF run by the patched llama.cpp; torch: MODEL is a Hugging Face "
                   "directory and the plans come from --plan.")
@click.option("--plan", "plan_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="(torch backend) a plan JSON to evaluate; repeat for several.")
@click.option("-t", "--threads", type=int, default=None,
              help="CPU threads (llama backend; default: llama.cpp's choice).")
@click.option("-ngl", "--n-gpu-layers", default=0, show_default=True,
              help="Layers to offload to the GPU (llama backend; -1 = all).")
@click.option("--decode", is_flag=True,
              help="The decode protocol: every chunk is decoded one token per ubatch, as generation runs, so "
                   "Alloc-T rows run the decode rule (per-token thresholds, moved by its budget controller) "
                   "instead of the batch rule, each followed by a \"fixed\" twin (the calibrated thresholds "
                   "alone), and each row reports the experts per token measured while decoding, with the least "
                   "and the most over any 64-token window. Torch backend: Alloc-T rows use the plans' decode "
                   "thresholds alone (no controller).")
@click.option("--peers", "peers", type=click.Path(exists=True, dir_okay=False), default=None,
              metavar="CALIBRATION_TEXT",
              help="(llama backend) Also run the field's per-token rules at full budget: SER (keep experts "
                   "weighing more than t x the top one) and top-p (the best experts until their routing "
                   "probability reaches p), each value calibrated on the first 8192 tokens of CALIBRATION_TEXT "
                   "to every budget of the uniform rows. Use the text the profile calibrated on.")
@cpu_moe_options
def command(model: str, text_file: str, ctx: int, chunks: int | None, budgets: list[float] | None,
            json_out: str | None, backend: str, plan_files: tuple[str, ...], threads: int | None,
            n_gpu_layers: int, decode: bool, peers: str | None, cpu_moe: bool, n_cpu_moe: int) -> None:
    """Measure MODEL at full budget, at each stored plan with Alloc-T on and off, and at uniform
    top-k of the same budgets, on TEXT with llama-perplexity's protocol; print a markdown table.

    Example: allocmoe eval model.budget.gguf --text heldout.txt --decode --json eval-decode.json"""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from ..errors import AllocMoeError
    from ..evaluate import evaluate_llama
    from ..fsutil import atomic_write_json
    from ..presentation import eval_table

    columns = (TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("loading", total=None)
        if backend == "llama":
            if plan_files:
                raise AllocMoeError("--plan is for the torch backend; a GGUF carries its plans "
                                    "(see `allocmoe inspect`)")
            result = evaluate_llama(
                model, text_file, ctx=ctx, chunks=chunks, budgets=budgets, n_threads=threads,
                n_gpu_layers=n_gpu_layers, cpu_moe=cpu_moe, n_cpu_moe=n_cpu_moe, decode=decode, peers=peers,
                progress=lambda name, done, total: progress.update(task, description=name, completed=done, total=total))
        else:
            if cpu_moe or n_cpu_moe or peers:
                raise AllocMoeError("--cpu-moe, --n-cpu-moe and --peers are for the llama backend")
            from ..torch_eval import evaluate_torch_plans

            result = evaluate_torch_plans(
                model, text_file, plan_files, ctx=ctx, chunks=chunks, budgets=budgets, decode=decode,
                on_window=lambda: progress.update(task, description="all configurations", advance=1))
    click.echo(eval_table(result))
    protocol = "one token per ubatch" if decode else "one ubatch per chunk"
    click.echo(f"\n{result['chunks']} chunks of {ctx} tokens ({backend} backend, {protocol})")
    if json_out:
        atomic_write_json(json_out, result)
        click.echo(f"wrote {json_out}")
