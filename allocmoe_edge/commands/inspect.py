"""`allocmoe inspect`: a GGUF's MoE shape and its allocmoe plans."""

from __future__ import annotations

import json

import click


@click.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON: architecture, block_count, expert_count, expert_used_count, allocmoe.")
def command(model: str, as_json: bool) -> None:
    """Show MODEL's architecture, blocks, experts, original top-k and stored budget plans."""
    from ..gguf_meta import read_info

    info = read_info(model)
    if as_json:
        click.echo(json.dumps(info.to_json(), indent=2))
        return
    click.echo(f"{info.path}: {info.architecture}, {info.block_count} blocks, {info.file_type}, {info.n_bytes / 2**20:.1f} MiB")
    if not info.moe_layers:
        click.echo("no MoE layers (not a mixture-of-experts model)")
        return
    click.echo(f"experts: {info.expert_count}, original top-k: {info.expert_used_count}, "
               f"MoE layers: {len(info.moe_layers)} (full budget {info.full_budget} activations/token)")
    meta = info.allocmoe
    if "layer_expert_counts" not in meta:
        click.echo("allocmoe: no plan (runs at the original top-k)")
        return
    click.echo(f"allocmoe: format {meta.get('version')}, enabled={meta.get('enabled', True)}, "
               f"Alloc-T k_min={meta.get('token_k_min', 1)} k_max={meta.get('token_k_max', 0)} (0 = off)")
    default = meta.get("plan_default", 0)
    for i, p in enumerate(info.plans):
        mark = "*" if i == default else " "
        click.echo(f" {mark} plan {i}: {p.name} ({p.method}) budget {p.budget:.3f} = {p.budget_count} "
                   f"activations; counts {','.join(map(str, p.counts))}")
