"""`allocmoe run`: generate text from a (budgeted) GGUF."""

from __future__ import annotations

import click

from .options import cpu_moe_options


@click.command("run")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-p", "--prompt", required=True, help="Prompt text.")
@click.option("-n", "--n-predict", default=64, show_default=True, help="Tokens to generate.")
@click.option("--budget", type=float, default=None,
              help="Run the stored plan with this budget fraction (1.0 = full budget). "
                   "Default: the file's default plan.")
@click.option("--plan-index", type=int, default=None, help="Run stored plan number N (see `allocmoe inspect`).")
@click.option("--uniform-k", type=int, default=None,
              help="Ignore the plans and run top-k everywhere (the stock expert_used_count override).")
@click.option("--token-k-max", type=int, default=None, help="Override Alloc-T's k_max (0 = Alloc-T off).")
@click.option("--temp", default=0.0, show_default=True, help="Sampling temperature (0 = greedy).")
@click.option("--seed", default=0, show_default=True, help="Sampling seed.")
@click.option("-t", "--threads", type=int, default=None, help="CPU threads (default: llama.cpp's choice).")
@click.option("-ngl", "--n-gpu-layers", default=0, show_default=True, help="Layers to offload to the GPU (-1 = all).")
@cpu_moe_options
@click.option("--allow-unpatched", is_flag=True,
              help="Run a budgeted file on a stock llama-cpp-python (at full budget, with a warning).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON with the text and the per-layer counts run.")
@click.option("-v", "--verbose", is_flag=True, help="Show llama.cpp's log.")
def command(model: str, prompt: str, n_predict: int, budget: float | None, plan_index: int | None,
            uniform_k: int | None, token_k_max: int | None, temp: float, seed: int, threads: int | None,
            n_gpu_layers: int, cpu_moe: bool, n_cpu_moe: int, allow_unpatched: bool, as_json: bool,
            verbose: bool) -> None:
    """Generate N_PREDICT tokens after PROMPT with MODEL at the chosen budget."""
    import dataclasses
    import json

    from ..errors import AllocMoeError
    from ..gguf_meta import read_info
    from ..runtime import choice_for_budget, layer_counts, load, patch_version

    if sum(x is not None for x in (budget, plan_index, uniform_k)) > 1:
        raise AllocMoeError("give at most one of --budget, --plan-index and --uniform-k")
    info = read_info(model)
    choice = choice_for_budget(info, budget)
    choice = dataclasses.replace(choice, plan_index=plan_index if plan_index is not None else choice.plan_index,
                                 uniform_k=uniform_k, token_k_max=token_k_max)
    llm = load(model, choice, allow_unpatched=allow_unpatched, verbose=verbose, seed=seed,
               n_threads=threads, n_gpu_layers=n_gpu_layers, cpu_moe=cpu_moe, n_cpu_moe=n_cpu_moe)
    out = llm(prompt, max_tokens=n_predict, temperature=temp, seed=seed)
    text = out["choices"][0]["text"]
    counts = layer_counts(llm) if patch_version() is not None else None
    if as_json:
        click.echo(json.dumps({"model": model, "choice": dataclasses.asdict(choice), "layer_counts": counts,
                               "prompt": prompt, "text": text, "usage": out.get("usage")}, indent=2))
    else:
        click.echo(prompt + text)
