"""`allocmoe bench`: pp / tg tokens/s at full budget, each stored plan and uniform top-k."""

from __future__ import annotations

import click


def _budgets(ctx: click.Context, param: click.Parameter, value: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated fractions such as 1,0.75,0.5") from None


@click.command("bench")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--budgets", default="1,0.75,0.5,0.25", show_default=True, callback=_budgets,
              help="Budget fractions; full budget is always measured as the baseline.")
@click.option("--reps", default=3, show_default=True, help="Timed repetitions per test (after one warm-up).")
@click.option("-p", "n_prompt", default=512, show_default=True, help="Prompt tokens per pp test (one batch; 0 skips pp).")
@click.option("-n", "n_gen", default=128, show_default=True, help="Generated tokens per tg test (0 skips tg).")
@click.option("-t", "--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads (default: llama-cpp-python's choice).")
@click.option("-ngl", "--n-gpu-layers", "n_gpu_layers", default=0, show_default=True, help="Layers offloaded to the GPU.")
@click.option("-fa", "--flash-attn", is_flag=True, help="Enable flash attention.")
@click.option("--timeout", type=click.FloatRange(min=1), default=None,
              help="Seconds allowed per configuration (load and all its tests); default: no limit.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Write the full result here.")
def command(model: str, budgets: tuple[float, ...], reps: int, n_prompt: int, n_gen: int, threads: int | None,
            n_gpu_layers: int, flash_attn: bool, timeout: float | None, json_out: str | None) -> None:
    """Measure MODEL's prompt (pp) and generation (tg) speed like llama-bench, for full budget,
    uniform top-k and every stored plan (Alloc-T on and off) at each budget, in one run.

    A file without plans gets "uniform-split" plans in a temporary copy. The decode limit
    column is full-budget weight bytes per token divided by the row's. Each configuration runs
    in a child process: one that crashes is reported as failed (exit status 1 at the end) and
    the others are still measured.

    Example: allocmoe bench model.gguf --budgets 1,0.5 -p 512 -n 128 --json bench.json
    """
    from ..bench import BenchOptions, bench, markdown
    from ..fsutil import atomic_write_json

    opts = BenchOptions(budgets=budgets, reps=reps, n_prompt=n_prompt, n_gen=n_gen, threads=threads,
                        n_gpu_layers=n_gpu_layers, flash_attn=flash_attn, timeout=timeout)
    result = bench(model, opts, log=lambda msg: click.echo(msg, err=True))
    click.echo(markdown(result))
    click.echo(f"\nbackend {result['backend']}, threads {result['threads']}, ngl {n_gpu_layers}, "
               f"plans: {result['plans_source']}, commit {result['commit'] or 'unknown'}")
    if json_out:
        atomic_write_json(json_out, result)
        click.echo(f"wrote {json_out}")
    if result["failed"]:
        raise click.ClickException(f"{len(result['failed'])} configuration(s) failed: {', '.join(result['failed'])} "
                                   "(their errors are in the JSON rows)")
