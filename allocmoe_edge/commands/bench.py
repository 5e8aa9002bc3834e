"""`allocmoe bench`: pp / tg tokens/s and latency at full budget, each stored plan and uniform top-k."""

from __future__ import annotations

import click

from .options import cpu_moe_options


def _budgets(ctx: click.Context, param: click.Parameter, value: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated fractions such as 1,0.75,0.5") from None


def _prompts(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated token counts such as 512,2048") from None
    return () if sizes == (0,) else sizes


@click.command("bench")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--budgets", default="1,0.75,0.5,0.25", show_default=True, callback=_budgets,
              help="Budget fractions; full budget is always measured as the baseline.")
@click.option("--reps", type=click.IntRange(min=1), default=5, show_default=True,
              help="Timed repetitions of every test, interleaved across configurations (after one warm-up).")
@click.option("-p", "prompts", default="512", show_default=True, callback=_prompts, metavar="N[,N...]",
              help="Prompt sizes: one pp<N> test each, N tokens in one batch and one ubatch (0 skips pp).")
@click.option("-n", "n_gen", type=click.IntRange(min=0), default=128, show_default=True,
              help="Generated tokens of the tg test, decoded one at a time (0 skips tg).")
@click.option("--latency", is_flag=True,
              help="Also report time to first token for each -p size and per-token decode latency "
                   "p50/p90/p99 over the -n tokens of all repetitions (a second table).")
@click.option("-t", "--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads (default: llama-cpp-python's choice).")
@click.option("-ngl", "--n-gpu-layers", "n_gpu_layers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Layers offloaded to the GPU.")
@cpu_moe_options
@click.option("-fa", "--flash-attn", is_flag=True, help="Enable flash attention.")
@click.option("--timeout", type=click.FloatRange(min=1), default=None,
              help="Seconds allowed per configuration over the whole run (its loads and all its tests); "
                   "default: no limit.")
@click.option("--max-loaded", type=click.IntRange(min=1), default=None,
              help="Configurations loaded at once (default: as many as system memory holds). Each holds its own "
                   "GPU-offloaded weights: lower this when they do not all fit in GPU memory; the rest are "
                   "reloaded for every repetition.")
@click.option("--fixed-thresholds", is_flag=True,
              help="Also run each Alloc-T row with the decode rule's budget controller off (its calibrated thresholds "
                   "alone), as `eval --decode` does: the controller's cost in decode.")
@click.option("--peers", type=click.Path(exists=True, dir_okay=False), default=None, metavar="CALIBRATION_TEXT",
              help="Also run SER and top-p (the field's per-token rules) at each budget below 1, each value "
                   "calibrated on CALIBRATION_TEXT to the budget's mean activations, as `eval --peers` does.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Write the full result here (also after every round of repetitions, marked incomplete).")
def command(model: str, budgets: tuple[float, ...], reps: int, prompts: tuple[int, ...], n_gen: int, latency: bool,
            threads: int | None, n_gpu_layers: int, cpu_moe: bool, n_cpu_moe: int, flash_attn: bool,
            timeout: float | None, max_loaded: int | None, fixed_thresholds: bool, peers: str | None,
            json_out: str | None) -> None:
    """Measure MODEL's prompt (pp) and generation (tg) speed like llama-bench, for full budget,
    uniform top-k and every stored plan (Alloc-T on and off) at each budget, in one run.

    Each configuration loads once in its own child process; the repetitions are interleaved
    (repetition 1 of every configuration, then repetition 2, ...) so drift hits every row
    alike. Rows show mean ± sd; a speedup within the combined sd of the two rows is marked
    "(tie)". A configuration that crashes or times out is reported as failed (exit status 1 at
    the end) and the others are still measured.

    The decode limit column is full-budget weight bytes per generated token divided by the
    row's; with --cpu-moe / --n-cpu-moe and GPU layers it counts only the routed experts kept
    in system memory, which bound decode there. A file without plans gets "uniform-split"
    plans in a temporary copy.

    Example: allocmoe bench model.gguf --budgets 1,0.5 -p 512,2048 -n 128 --latency --json bench.json
    """
    from ..bench import BenchOptions, bench
    from ..fsutil import atomic_write_json
    from ..presentation import bench_tables

    opts = BenchOptions(budgets=budgets, reps=reps, prompts=prompts, n_gen=n_gen, latency=latency, threads=threads,
                        n_gpu_layers=n_gpu_layers, cpu_moe=cpu_moe, n_cpu_moe=n_cpu_moe, flash_attn=flash_attn,
                        timeout=timeout, max_loaded=max_loaded, fixed_thresholds=fixed_thresholds, peers=peers)
    # --json is rewritten after every round of repetitions ("complete": false until the end)
    result = bench(model, opts, log=lambda msg: click.echo(msg, err=True),
                   on_round=(lambda partial: atomic_write_json(json_out, partial)) if json_out else None)
    click.echo(bench_tables(result))
    click.echo(f"\nbackend {result['backend']} ({result['device']}), threads {result['threads']}, ngl {n_gpu_layers}, "
               f"plans: {result['plans_source']}, {reps} interleaved repetition(s), "
               f"commit {result['commit'] or 'unknown'}")
    if json_out:
        atomic_write_json(json_out, result)
        click.echo(f"wrote {json_out}")
    if result["failed"]:
        raise click.ClickException(f"{len(result['failed'])} configuration(s) failed: {', '.join(result['failed'])} "
                                   "(their errors are in the JSON rows)")
