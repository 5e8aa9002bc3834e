"""`allocmoe inspect`: a GGUF's MoE shape and its allocmoe plans."""

from __future__ import annotations

import json

import click

from .options import cpu_moe_options


@click.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON: architecture, block_count, expert_count, expert_used_count, allocmoe "
                   "(and expert_placement with --cpu-moe / --n-cpu-moe).")
@cpu_moe_options
def command(model: str, as_json: bool, cpu_moe: bool, n_cpu_moe: int) -> None:
    """Show MODEL's architecture, blocks, experts, original top-k and stored budget plans; with
    --cpu-moe / --n-cpu-moe, which blocks' routed experts would stay in system memory."""
    from ..gguf_meta import read_info
    from ..placement import expert_placement, placement_line

    info = read_info(model)
    placement = expert_placement(info, cpu_moe, n_cpu_moe) if cpu_moe or n_cpu_moe else None
    if as_json:
        click.echo(json.dumps({**info.to_json(), **({"expert_placement": placement} if placement else {})}, indent=2))
        return
    click.echo(f"{info.path}: {info.architecture}, {info.block_count} blocks, {info.file_type}, "
               f"{info.n_bytes / 2**20:.1f} MiB")
    if not info.moe_layers:
        click.echo("no MoE layers (not a mixture-of-experts model)")
        return
    click.echo(f"experts: {info.expert_count}, original top-k: {info.expert_used_count}, "
               f"MoE layers: {len(info.moe_layers)} (full budget {info.full_budget} activations/token)")
    if placement:
        click.echo(placement_line(placement))
    meta = info.meta
    if not meta.has_plan:
        click.echo("allocmoe: no plan (runs at the original top-k)")
        return
    meta.check(info.path)
    click.echo(f"allocmoe: format {meta.version}, enabled={meta.enabled}, "
               f"Alloc-T k_min={meta.token_k_min} k_max={meta.token_k_max} (0 = off), "
               f"rule: {meta.token_mode} ({RULES[meta.token_mode]})")
    for i, p in enumerate(meta.plans):
        mark = "*" if i == meta.plan_default else " "
        click.echo(f" {mark} plan {i}: {p.name} ({p.method}) budget {p.budget:.3f} = {p.budget_count} "
                   f"activations; counts {','.join(map(str, p.counts))}")
        if p.thresholds is not None and len(p.thresholds) != info.block_count:
            click.echo(f"     decode thresholds: {len(p.thresholds)} values for {info.block_count} blocks (malformed: "
                       "llama.cpp refuses to run this plan)")
        elif p.thresholds is not None:
            taus = [_threshold(p.thresholds[b]) for b in info.moe_layers]
            click.echo(f"     decode thresholds {','.join(taus)}")


# what each allocmoe.token_mode runs (gguf_meta)
RULES = {"batch": "batch rule for ubatches of several tokens, per-layer top-k one token at a time",
         "decode": "decode rule (per-token thresholds) for every ubatch",
         "both": "decode rule one token at a time, batch rule for ubatches of several tokens"}


def _threshold(tau: float) -> str:
    """A decode threshold for display: '-' where the layer keeps k_min or k_max experts (inf / -inf)."""
    return f"{tau:.3g}" if abs(tau) != float("inf") else "-"
