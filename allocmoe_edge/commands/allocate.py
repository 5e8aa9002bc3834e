"""`allocmoe allocate`: sensitivity JSON -> plan JSON (Alloc-L dynamic program)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from ..allocate import ALLOCATE_METHODS
from ..errors import AllocMoeError
from ..plan import TOKEN_MODES
from ..sensitivity import METRICS


@click.command("allocate")
@click.argument("sensitivity", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--budget",
    "-b",
    required=True,
    help="Routed-expert activations per token over all MoE layers: a fraction of the full "
    "budget (0.5 or 50%) or an absolute count (78: an integer, no decimal point). "
    "Fractions round down, so the budget is never exceeded.",
)
@click.option(
    "--metric",
    type=click.Choice(METRICS),
    default="kld",
    show_default=True,
    help="Cost the DP minimises: kld = mean KL divergence to the full model; "
    "ppl = increase in log-perplexity.",
)
@click.option(
    "--k-min",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Fewest experts per layer; with Alloc-T also the experts every token keeps.",
)
@click.option(
    "--k-max",
    type=click.IntRange(min=1),
    default=None,
    help="Most experts per layer; with Alloc-T also per token.  [default: the model's top-k]",
)
@click.option(
    "--method",
    type=click.Choice(list(ALLOCATE_METHODS)),
    default="alloc-l+t",
    show_default=True,
    help="alloc-l+t: DP over layers plus token-level reallocation at run time; "
    "alloc-l: DP only; uniform+t: the same k in every layer plus token-level reallocation (Alloc-T alone); "
    "uniform: the same k in every layer (baseline).",
)
@click.option(
    "--alloc-t",
    "token_mode",
    type=click.Choice(TOKEN_MODES),
    default=None,
    help="Which Alloc-T rule the plan runs (methods with +t): batch = redistribute the activations of each "
    "ubatch of several tokens among them (prefill), one token at a time plain per-layer top-k; decode = "
    "per token, keep the top-k_min experts plus the candidates whose routing score clears a per-layer "
    "threshold calibrated to the layer's count (every ubatch); both = decode for one token at a time, batch "
    "above.  [default: both when the sensitivity file has routing statistics, else batch]",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Plan file to write (atomically). Required unless --json is given.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON on stdout instead of the table.")
def command(
    sensitivity: Path,
    budget: str,
    metric: str,
    k_min: int,
    k_max: int | None,
    method: str,
    token_mode: str | None,
    output: Path | None,
    as_json: bool,
) -> None:
    """Choose per-layer expert counts for a budget from SENSITIVITY (from `allocmoe profile`)."""
    from ..allocate import plan_from_sensitivity
    from ..fsutil import sha256_file
    from ..sensitivity import read as read_sensitivity

    if output is None and not as_json:
        raise click.UsageError("give -o PLAN.json, or --json to print the plan")
    if output is not None and output.exists() and output.samefile(sensitivity):
        raise AllocMoeError(f"-o {output} is the sensitivity file itself; choose another output path")
    plan = plan_from_sensitivity(read_sensitivity(sensitivity), budget, method, k_min, k_max, metric,
                                 token_mode)
    source = {"sensitivity_file": sensitivity.name, "sensitivity_sha256": sha256_file(sensitivity)}
    plan = dataclasses.replace(plan, calibration={**plan.calibration, **source})
    if output is not None:
        plan.save(output)
    if as_json:
        click.echo(json.dumps(plan.to_dict(), indent=2))
        return
    predicted = plan.predicted
    assert predicted is not None  # plan_from_sensitivity always predicts
    taus = plan.token_thresholds or (None,) * len(plan.counts)
    click.echo(f"{'block':>5}  {'count':>5}  {metric:>10}" + (f"  {'threshold':>10}" if plan.token_thresholds else ""))
    for block, count, cost, tau in zip(plan.model.moe_layers, plan.counts, predicted["per_layer"], taus):
        rule = "" if plan.token_thresholds is None else f"  {'-' if tau is None else format(tau, '.4g'):>10}"
        click.echo(f"{block:>5}  {count:>5}  {cost:>10.5g}{rule}")
    b = plan.budget
    click.echo(f"{'total':>5}  {sum(plan.counts):>5}  {predicted['cost']:>10.5g}")
    alloc_t = (f"Alloc-T tokens k {plan.token_k_min}..{plan.token_k_max}, {plan.token_mode} rule"
               if plan.alloc_t else "Alloc-T off")
    click.echo(f"budget {b.count} of {plan.model.full_budget} ({100 * b.fraction:.4g}%), {method}, {alloc_t}")
    estimates = ", ".join(f"{m} {predicted[m]:.5g}" for m in METRICS if m in predicted)
    click.echo(f"predicted (layer effects summed): {estimates}")
    click.echo(f"wrote {output}")
