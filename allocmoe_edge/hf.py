"""MoE structure of a transformers model, per-layer top-k, and the Alloc-T routing hook.

Found by config-key lists plus attribute probing (the text config is unwrapped), not by one
adapter per model: a MoE block is a decoder-layer submodule with an ``experts`` child and a
router child (``gate`` or ``router``) that has a ``top_k`` attribute and returns
``(router_logits, top_k_weights, top_k_index)``, as in transformers 5 (Mixtral, Qwen2-MoE,
Qwen3-MoE, OLMoE, DeepSeek-V2/V3 and their relatives). Routing details (softmax or sigmoid
scores, selection bias, renormalisation, scaling, group limits) come from the router's
attributes, the config, and a small override table.

* ``layer_topk`` sets each MoE layer's ``top_k``, so the model runs its own routing code.
* ``alloc_t_routing`` runs the model's router at ``top_k = k_max`` and keeps the candidates that
  Alloc-T (``alloc_t_reference.select_ranked``) picks over all tokens of the forward pass; a dropped
  candidate gets weight 0 and the index ``n_expert``, which the experts implementations of
  transformers skip (the expert-parallel sentinel), so it costs no compute.

Both yield an ``ActivationCounter`` of the activations actually routed per layer.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .alloc_t_reference import check_bounds, select_above, select_above_controlled, select_peer, select_ranked
from .errors import AllocMoeError
from .plan import PlanModelShape

N_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "num_selected_experts")
ROUTER_ATTRS = ("gate", "router")
# Routers that renormalise the selected weights without saying so in a `norm_topk_prob` attribute.
RENORMALISE_OVERRIDES = {"mixtral": True}


@dataclass(frozen=True)
class Routing:
    """How a model turns router logits into selected experts and weights."""

    score: str  # "softmax" or "sigmoid": the score that ranks experts (before any bias)
    renormalise: bool  # selected weights divided by their sum
    scaling: float  # routed_scaling_factor applied to the selected weights
    n_group: int | None  # group-limited routing: experts split into n_group groups ...
    topk_group: int | None  # ... of which the best topk_group are eligible

    def max_k(self, n_expert: int) -> int:
        """The most experts a token can select (group limits cap it)."""
        if self.n_group and self.topk_group:
            return n_expert // self.n_group * self.topk_group
        return n_expert


@dataclass(frozen=True)
class MoeLayer:
    """One MoE block: its decoder-layer index, router and experts modules."""

    index: int
    router: nn.Module
    experts: nn.Module


@dataclass(frozen=True)
class HfMoeShape:
    """The MoE shape of a transformers model, with its router and experts modules (the HF side;
    `plan.PlanModelShape` is what a plan records of it, `gguf_meta.GgufModelInfo` the GGUF side)."""

    architecture: str
    n_layer: int
    layers: tuple[MoeLayer, ...]
    n_expert: int
    k_orig: int
    routing: Routing
    shared_experts: bool

    @property
    def plan_shape(self) -> PlanModelShape:
        """The shape as a plan records it."""
        return PlanModelShape(
            architecture=self.architecture,
            n_layer=self.n_layer,
            moe_layers=tuple(layer.index for layer in self.layers),
            n_expert=self.n_expert,
            k_orig=self.k_orig,
        )


@dataclass
class ActivationCounter:
    """Routed tokens and executed (token, expert) activations per MoE block index."""

    tokens: dict[int, int] = field(default_factory=dict)
    activations: dict[int, int] = field(default_factory=dict)

    def add(self, block: int, tokens: int, activations: int) -> None:
        self.tokens[block] = self.tokens.get(block, 0) + tokens
        self.activations[block] = self.activations.get(block, 0) + activations

    def per_token(self) -> dict[int, float]:
        """Mean activations per token for each block that has routed tokens."""
        return {b: self.activations[b] / self.tokens[b] for b in self.tokens if self.tokens[b]}

    def total_per_token(self) -> float:
        """Mean activations per token summed over blocks: the budget actually spent."""
        return sum(self.per_token().values())


def _first_attr(obj: Any, names: Sequence[str]) -> Any:
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value
    return None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder-layer list of a causal LM (the ModuleList named ``*layers`` of the text model)."""
    n_layer = model.config.get_text_config().num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.endswith("layers") and len(module) == n_layer:
            return module
    raise AllocMoeError(f"could not find the {n_layer} decoder layers of {type(model).__name__}")


def _find_block(layer: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """The (router, experts) of a decoder layer's MoE block, or None for a dense layer."""
    for module in layer.modules():
        experts = getattr(module, "experts", None)
        if not isinstance(experts, nn.Module):
            continue
        router = _first_attr(module, ROUTER_ATTRS)
        if not isinstance(router, nn.Module) or not hasattr(router, "top_k"):
            raise AllocMoeError(
                f"{type(module).__name__} has experts but no router module with a top_k attribute "
                "(routing inside the block is not supported; use transformers >= 5)"
            )
        return router, experts
    return None


def moe_shape(model: nn.Module) -> HfMoeShape:
    """Find the MoE layers, expert count, original top-k and routing of ``model``."""
    config = model.config.get_text_config()
    layers = decoder_layers(model)
    blocks = [(i, _find_block(layer)) for i, layer in enumerate(layers)]
    moe = tuple(MoeLayer(i, found[0], found[1]) for i, found in blocks if found is not None)
    if not moe:
        raise AllocMoeError(f"{type(model).__name__} has no mixture-of-experts layers")
    router = moe[0].router
    n_expert = _first_attr(config, N_EXPERT_KEYS) or getattr(router, "num_experts", None)
    k_orig = _first_attr(config, TOP_K_KEYS) or router.top_k
    if not n_expert or not k_orig:
        raise AllocMoeError(f"could not read the expert count and top-k of {type(model).__name__}")
    model_type = getattr(config, "model_type", type(model).__name__)
    has_bias = getattr(router, "e_score_correction_bias", None) is not None
    renormalise = getattr(router, "norm_topk_prob", None)
    if renormalise is None:
        renormalise = RENORMALISE_OVERRIDES.get(model_type, False)
    group_limited = getattr(router, "topk_method", "group_limited") != "greedy"
    routing = Routing(
        score=getattr(config, "scoring_func", None) or ("sigmoid" if has_bias else "softmax"),
        renormalise=bool(renormalise),
        scaling=float(getattr(router, "routed_scaling_factor", 1.0) or 1.0),
        n_group=getattr(router, "num_group", None) if group_limited else None,
        topk_group=getattr(router, "topk_group", None) if group_limited else None,
    )
    shared = any(_first_attr(layer, ("shared_expert", "shared_experts")) is not None for layer in layers.modules())
    return HfMoeShape(
        architecture=model_type,
        n_layer=len(layers),
        layers=moe,
        n_expert=int(n_expert),
        k_orig=int(k_orig),
        routing=routing,
        shared_experts=shared,
    )


def plan_shape(model: nn.Module | str | os.PathLike[str]) -> PlanModelShape:
    """The shape of ``model``, or of the checkpoint in the directory ``model``, as a plan records it
    (architecture is the config's model_type); a checkpoint's comes from its config alone (the model
    is built on the meta device, no weights read)."""
    if not isinstance(model, nn.Module):
        from transformers import AutoConfig, AutoModelForCausalLM

        try:
            config = AutoConfig.from_pretrained(model)
        except (OSError, ValueError) as e:
            raise AllocMoeError(f"could not read the config of {model}: {e}") from e
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    return moe_shape(model).plan_shape


def _per_layer(info: HfMoeShape, counts: Sequence[int] | Mapping[int, int]) -> dict[int, int]:
    """Counts keyed by block index: a sequence is in MoE-layer order; a mapping leaves other blocks at k_orig."""
    blocks = [layer.index for layer in info.layers]
    if isinstance(counts, Mapping):
        unknown = sorted(set(counts) - set(blocks))
        if unknown:
            raise AllocMoeError(f"blocks {unknown} are not MoE layers (MoE layers: {blocks})")
        out = {b: info.k_orig for b in blocks}
        out.update({b: int(k) for b, k in counts.items()})
        return out
    if len(counts) != len(blocks):
        raise AllocMoeError(f"{len(counts)} expert counts for {len(blocks)} MoE layers")
    return {b: int(k) for b, k in zip(blocks, counts)}


def _per_layer_values(info: HfMoeShape, values: Sequence[float] | Mapping[int, float]) -> dict[int, float]:
    """Per-MoE-layer values keyed by block index (a sequence is in MoE-layer order)."""
    blocks = [layer.index for layer in info.layers]
    if isinstance(values, Mapping):
        if sorted(values) != blocks:
            raise AllocMoeError(f"thresholds for blocks {sorted(values)}; the MoE layers are {blocks}")
        return {b: float(values[b]) for b in blocks}
    if len(values) != len(blocks):
        raise AllocMoeError(f"{len(values)} thresholds for {len(blocks)} MoE layers")
    return {b: float(v) for b, v in zip(blocks, values)}


@contextlib.contextmanager
def _counting(info: HfMoeShape) -> Iterator[ActivationCounter]:
    """Count routed activations per layer while the context is open."""
    counter = ActivationCounter()
    handles = []

    def hook_for(block: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            index = output[2]
            counter.add(block, index.shape[0], int((index < info.n_expert).sum()))

        return hook

    try:
        for layer in info.layers:
            handles.append(layer.router.register_forward_hook(hook_for(layer.index)))
        yield counter
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _top_k(routers: Mapping[nn.Module, int]) -> Iterator[None]:
    saved = {router: router.top_k for router in routers}
    try:
        for router, k in routers.items():
            router.top_k = k
        yield
    finally:
        for router, k in saved.items():
            router.top_k = k


@contextlib.contextmanager
def layer_topk(model: nn.Module, counts: Sequence[int] | Mapping[int, int]) -> Iterator[ActivationCounter]:
    """Run each MoE layer at its own top-k (``counts`` per MoE layer); restore on exit."""
    info = moe_shape(model)
    per_layer = _per_layer(info, counts)
    max_k = info.routing.max_k(info.n_expert)
    bad = {b: k for b, k in per_layer.items() if not 1 <= k <= max_k}
    if bad:
        raise AllocMoeError(f"expert counts {bad} (block: k) outside [1, {max_k}]")
    with _top_k({layer.router: per_layer[layer.index] for layer in info.layers}):
        with _counting(info) as counter:
            yield counter


def _gate_values(info: HfMoeShape, logits: torch.Tensor) -> torch.Tensor:
    """The gate's values over all experts (the routing weights before the top-k), without a selection bias."""
    return logits.float().sigmoid() if info.routing.score == "sigmoid" else logits.float().softmax(dim=-1)


def _selection_scores(info: HfMoeShape, router: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """The scores the router ranks experts by (biased for sigmoid-with-bias routers)."""
    scores = _gate_values(info, logits)
    bias = getattr(router, "e_score_correction_bias", None) if info.routing.score == "sigmoid" else None
    return scores if bias is None else scores + bias.float()


Selector = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _cutting_hook(info: HfMoeShape, select: Selector):
    """A router forward hook that keeps only some of the router's candidates: ``select(logits, index, scores)``
    (index and selection scores [T, candidates], best first) says which; the others are dropped (sentinel index
    n_expert, zero weight) and the kept weights renormalised where the model renormalises."""
    routing = info.routing

    def hook(router: nn.Module, args: Any, output: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, weights, index = output
        scores = _selection_scores(info, router, logits).gather(1, index)
        order = scores.argsort(dim=1, descending=True)
        scores, weights, index = scores.gather(1, order), weights.gather(1, order), index.gather(1, order)
        keep = select(logits, index, scores)
        kept = weights * keep
        if routing.renormalise:
            # weights are scaling x w / sum(w) over the candidates; renormalise over the kept ones
            kept = kept * (routing.scaling / kept.sum(dim=-1, keepdim=True))
        index = torch.where(keep, index, torch.full_like(index, info.n_expert))
        return logits, kept.to(weights.dtype), index

    return hook


def _alloc_t_hook(info: HfMoeShape, k: int, k_min: int, tau: float | None = None, window: int | None = None):
    """A router hook that keeps the Alloc-T selection of the router's top-k_max candidates: the batch rule
    over all tokens of the forward pass, or the decode rule with threshold ``tau`` (moved by its budget
    controller over ``window`` tokens, the pass's tokens in order, when given)."""

    def select(logits: torch.Tensor, index: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if tau is None:
            return select_ranked(scores, k, k_min)
        if window is None:
            return select_above(scores, tau, k_min)
        return select_above_controlled(scores, tau, k, k_min, scores.shape[1], window)

    return _cutting_hook(info, select)


def _peer_hook(info: HfMoeShape, rule: str, value: float, k_min: int):
    """A router hook that cuts the router's top-k candidates by SER or top-p (`alloc_t_reference.select_peer`)
    on the gate's values (without a selection bias, as llama.cpp's weights)."""

    def select(logits: torch.Tensor, index: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        gate = _gate_values(info, logits)
        return select_peer(rule, gate.gather(1, index), gate.sum(dim=-1), value, k_min)

    return _cutting_hook(info, select)


@contextlib.contextmanager
def _rerouting(info: HfMoeShape, hooks: Mapping[MoeLayer, Callable], top_k: Mapping[nn.Module, int]
               ) -> Iterator[ActivationCounter]:
    """Register ``hooks`` on their layers' routers with ``top_k`` candidates per router, counting activations;
    restore on exit. Dropped candidates carry the sentinel index n_expert, which the fused experts
    implementations skip only in expert-parallel mode (the eager loop always skips it)."""
    handles = [layer.router.register_forward_hook(hook) for layer, hook in hooks.items()]
    sentinel = [layer.experts for layer in hooks if hasattr(layer.experts, "_is_expert_parallel")]
    saved = [experts._is_expert_parallel for experts in sentinel]
    try:
        for experts in sentinel:
            experts._is_expert_parallel = True
        with _top_k(top_k):
            with _counting(info) as counter:
                yield counter
    finally:
        for handle in handles:
            handle.remove()
        for experts, value in zip(sentinel, saved):
            experts._is_expert_parallel = value


@contextlib.contextmanager
def alloc_t_routing(
    model: nn.Module, counts: Sequence[int] | Mapping[int, int], k_min: int = 1, k_max: int | None = None,
    thresholds: Sequence[float] | Mapping[int, float] | None = None, decode_window: int | None = None,
) -> Iterator[ActivationCounter]:
    """Context manager: route each MoE layer by Alloc-T (a forward hook on its router); restore on exit.

    ``counts`` gives k_l per MoE layer; ``k_max`` defaults to the model's top-k. Without
    ``thresholds`` the batch rule runs over all tokens of each forward pass; with them (one per
    MoE layer, as ``counts``) the decode rule runs on every token by itself, so a whole sequence
    in one pass equals decoding it one token at a time. Every router runs at ``top_k = k_max``;
    a layer with ``k_l`` equal to ``k_min`` or ``k_max`` is then plain top-k_l, the model's own
    routing unchanged. ``decode_window`` runs the decode rule's budget controller over that window
    (llama.cpp's default: on, 64 tokens), the pass's tokens in order as one sequence (batch size 1).
    """
    info = moe_shape(model)
    per_layer = _per_layer(info, counts)
    taus = None if thresholds is None else _per_layer_values(info, thresholds)
    k_max = info.k_orig if k_max is None else k_max
    max_k = info.routing.max_k(info.n_expert)
    if k_max > max_k:
        raise AllocMoeError(f"k_max {k_max} is above the {max_k} experts a token can select in this model")
    for k in per_layer.values():
        check_bounds(k, k_min, k_max, info.n_expert)
    hooks = {layer: _alloc_t_hook(info, per_layer[layer.index], k_min,
                                  None if taus is None else taus[layer.index], decode_window)
             for layer in info.layers if per_layer[layer.index] < k_max}
    with _rerouting(info, hooks, {layer.router: k_max for layer in info.layers}) as counter:
        yield counter


@contextlib.contextmanager
def peer_routing(model: nn.Module, rule: str, value: float, k_min: int = 1) -> Iterator[ActivationCounter]:
    """Context manager: cut each token's top-k experts (the model's own k) in every MoE layer by SER (``rule``
    "ser", ``value`` t) or top-p ("top_p", ``value`` p), keeping at least ``k_min`` (`peers`, patch 0011); the
    torch reference of llama.cpp's ``allocmoe.token_rule``. Restores the routing on exit."""
    from .peers import check_value

    check_value(rule, value)
    info = moe_shape(model)
    with _rerouting(info, {layer: _peer_hook(info, rule, value, k_min) for layer in info.layers}, {}) as counter:
        yield counter


@contextlib.contextmanager
def routing_scores(model: nn.Module, ranks: int) -> Iterator[dict[int, list[torch.Tensor]]]:
    """Collect, per MoE block, each routed token's ``ranks`` largest selection scores (best first,
    float32 on the CPU; one [tokens, ranks] tensor per forward pass) while the context is open."""
    info = moe_shape(model)
    ranks = min(ranks, info.n_expert)
    collected: dict[int, list[torch.Tensor]] = {layer.index: [] for layer in info.layers}

    def hook_for(block: int):
        def hook(router: nn.Module, args: Any, output: Any) -> None:
            scores = _selection_scores(info, router, output[0].reshape(-1, info.n_expert))
            collected[block].append(scores.topk(ranks, dim=-1, sorted=True).values.cpu())

        return hook

    handles = [layer.router.register_forward_hook(hook_for(layer.index)) for layer in info.layers]
    try:
        yield collected
    finally:
        for handle in handles:
            handle.remove()


def budget_routing(
    model: nn.Module,
    counts: Sequence[int] | Mapping[int, int],
    alloc_t: bool = False,
    k_min: int = 1,
    k_max: int | None = None,
    thresholds: Sequence[float] | None = None,
) -> contextlib.AbstractContextManager[ActivationCounter]:
    """Context manager routing at ``counts``: ``alloc_t_routing`` (the decode rule when ``thresholds`` are given)
    when ``alloc_t`` is set, else ``layer_topk``."""
    return alloc_t_routing(model, counts, k_min, k_max, thresholds) if alloc_t else layer_topk(model, counts)


def parse_max_memory(text: str) -> dict[int | str, str]:
    """Read ``--max-memory``: ``"20GiB"`` (every device) or ``"0=20GiB,cpu=40GiB"``."""
    out: dict[int | str, str] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        device, sep, size = part.rpartition("=")
        if not sep:
            out.update({i: part for i in range(torch.cuda.device_count())})
            out["cpu"] = part
        elif device.isdigit() or device == "cpu":
            out[int(device) if device.isdigit() else device] = size
        else:
            raise AllocMoeError(f"--max-memory entry {part!r}: expected SIZE, GPU_INDEX=SIZE or cpu=SIZE")
    return out


def load_model(
    model_dir: str | os.PathLike[str],
    max_memory: str | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer, in eval mode, in the checkpoint's dtype.

    With ``max_memory`` the weights are placed by accelerate (``device_map="auto"``) within
    the given caps; what does not fit is offloaded to ``offload_folder`` on disk.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": "auto"}
    if max_memory:
        kwargs.update(device_map="auto", max_memory=parse_max_memory(max_memory))
        if offload_folder is not None:
            kwargs["offload_folder"] = str(offload_folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise AllocMoeError(f"could not load the model in {model_dir}: {e}") from e
    return model.eval(), tokenizer


def input_device(model: nn.Module) -> torch.device:
    """Where input ids should go: the device of the first placed module (accelerate's hooks move them on)."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return model.device
    first = next(iter(device_map.values()))
    if first in ("cpu", "disk"):
        return torch.device("cpu")
    return torch.device(f"cuda:{first}" if isinstance(first, int) else first)
