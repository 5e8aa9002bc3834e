"""`allocmoe stamp`: write per-layer expert counts (or plan files) into a copy of a GGUF."""

from __future__ import annotations

import click


@click.command("stamp")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--counts", "counts_list", multiple=True, metavar="K1,K2,...",
              help="Per-layer expert counts, one per block or one per MoE layer. Repeat for several plans.")
@click.option("--plan", "plan_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="A plan.json from `allocmoe allocate`. Repeat for several plans.")
@click.option("--default", "default", default=0, show_default=True,
              help="Index of the plan the file runs by default (in the order given: --plan files first).")
@click.option("--token-k-min", default=1, show_default=True, help="Alloc-T: experts every token keeps.")
@click.option("--token-k-max", default=0, show_default=True,
              help="Alloc-T: most experts one token may get (0 = Alloc-T off).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="New GGUF to write (never the input; written atomically).")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
def command(model: str, counts_list: tuple[str, ...], plan_files: tuple[str, ...], default: int,
            token_k_min: int, token_k_max: int, output: str, force: bool) -> None:
    """Copy MODEL to OUTPUT with allocmoe budget plans in its metadata.

    Example: allocmoe stamp model.gguf --counts 4,2,2,3 -o model.budget.gguf
    """
    from pathlib import Path

    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    from ..errors import AllocMoeError
    from ..gguf_meta import plan_for_counts, read_info, stamp, stored_plan_from_file

    if not counts_list and not plan_files:
        raise click.UsageError("give --counts or --plan")
    if Path(output).exists() and not force:
        raise AllocMoeError(f"{output} exists; pass --force to overwrite it")
    info = read_info(model)
    plans = [stored_plan_from_file(info, f) for f in plan_files]
    for text in counts_list:
        try:
            counts = [int(x) for x in text.replace(" ", "").split(",") if x]
        except ValueError as e:
            raise AllocMoeError(f"--counts {text!r}: expected comma-separated integers") from e
        plans.append(plan_for_counts(info, counts))
    with Progress(TextColumn("writing"), BarColumn(), DownloadColumn(), transient=True) as bar:
        task = bar.add_task("copy", total=None)
        out = stamp(model, output, plans, default=default, k_min=token_k_min, k_max=token_k_max,
                    progress=lambda done, total: bar.update(task, completed=done, total=total))
    click.echo(f"wrote {output}: {len(out.plans)} plan(s), default {default}")
