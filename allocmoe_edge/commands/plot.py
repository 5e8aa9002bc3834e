"""`allocmoe plot`: the quality-vs-speed frontier from `allocmoe eval` and `allocmoe bench` JSON."""

from __future__ import annotations

import click


@click.command("plot")
@click.option("--eval", "eval_json", required=True, type=click.Path(exists=True, dir_okay=False),
              help="JSON written by `allocmoe eval`.")
@click.option("--bench", "bench_json", required=True, type=click.Path(exists=True, dir_okay=False),
              help="JSON written by `allocmoe bench --json`.")
@click.option("--speed", type=click.Choice(["tg", "pp"]), default="tg", show_default=True,
              help="Speedup on the x axis: generation or prompt processing.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="PNG to write.")
def command(eval_json: str, bench_json: str, speed: str, output: str) -> None:
    """Plot mean KL divergence against speedup, one line per method, matching rows on
    (method, budget, Alloc-T); rows without a partner are left out.

    Example: allocmoe plot --eval eval.json --bench bench.json -o frontier.png
    """
    from ..plan import read_json
    from ..presentation import plot_frontier

    matched, total = plot_frontier(read_json(eval_json, "eval result"), read_json(bench_json, "bench result"),
                                   output, speed)
    click.echo(f"wrote {output}: {matched} of {total} eval rows matched a bench row")
