"""What Alloc-T costs a context before it runs: compute buffer memory and graph nodes, as llama.cpp
reserves them on metadata-only loads of full-depth sparse synthetic files (no weight is written or read)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from allocmoe_edge.gguf_meta import copy_with_metadata, plan_fields, plan_for_counts, read_info
from allocmoe_edge.synth import SHAPES, synthesize

pytestmark = pytest.mark.runtime

RULE_NODES = 80  # LLAMA_ALLOCMOE_RULE_NODES of patch series (llama-graph.h): the token rules' ops per MoE layer


def _planned(root: Path, shape: str, k_max: int | None = None) -> Path:
    """A full-depth sparse synth of ``shape`` with one plan of K/2 experts per MoE layer (at least 2, so that the
    token rules apply: K = 2 on Mixtral), Alloc-T up to ``k_max`` (default: the model's K) candidates per token,
    and decode thresholds (any finite value: nothing runs)."""
    src = synthesize(shape, "q4_0", root / f"{shape}.gguf", weights=False)
    info = read_info(src)
    k_max = k_max or info.expert_used_count
    plan = plan_for_counts(info, [max(2, info.expert_used_count // 2)] * len(info.moe_layers), "half-k")
    taus = tuple(0.1 if b in info.moe_layers and 1 < k < k_max else math.inf for b, k in enumerate(plan.counts))
    fields = plan_fields(info, [replace(plan, thresholds=taus)], k_min=1, k_max=k_max, token_mode="batch")
    out = root / f"{shape}-{k_max}.gguf"
    copy_with_metadata(src, out, fields, drop=lambda key: False)
    assert out.stat().st_blocks * 512 < 1 << 30  # the copy stayed sparse: seconds, not a 17 GB write
    return out


def _measure(path: Path, ubatch: int, **choice: object) -> dict:
    """`reserve.measure` in a child process: a graph that outgrows its node budget aborts inside ggml."""
    code = ("import dataclasses, json, sys; from allocmoe_edge.reserve import measure; "
            "from allocmoe_edge.runtime import LoadChoice; "
            f"r = measure(sys.argv[1], LoadChoice(**json.loads(sys.argv[2])), n_ubatch={ubatch}); "
            "print(json.dumps(dataclasses.asdict(r)))")
    proc = subprocess.run([sys.executable, "-c", code, str(path), json.dumps(choice)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    made: dict[tuple[str, int | None], Path] = {}

    def make(shape: str, k_max: int | None = None) -> Path:
        if (shape, k_max) not in made:
            made[shape, k_max] = _planned(tmp_path_factory.mktemp(shape), shape, k_max)
        return made[shape, k_max]

    return make


@pytest.mark.parametrize("ubatch", [512, 2048])
@pytest.mark.parametrize("shape", ["olmoe-1b-7b", "qwen3-30b-a3b"])
def test_alloc_t_adds_at_most_a_tenth_to_the_compute_buffer(patched_runtime, planned, shape, ubatch):
    path = planned(shape)
    batch = _measure(path, ubatch)
    plain = _measure(path, ubatch, token_k_max=0)  # the same plan's per-layer top-k
    assert batch["graph_nodes"] > plain["graph_nodes"]  # the batch rule is in the reserved graph
    with_t, without = sum(batch["compute_mib"].values()), sum(plain["compute_mib"].values())
    print(f"{shape} ubatch {ubatch}: compute buffer {with_t:.1f} MiB with Alloc-T, {without:.1f} without "
          f"(+{100 * (with_t / without - 1):.1f} %)")
    assert with_t <= 1.10 * without


@pytest.mark.parametrize("mode", ["batch", "decode"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_node_budget_covers_the_token_rules_at_k_max_n_expert(patched_runtime, planned, shape, mode):
    """k_max = n_expert: the most candidate slots a plan can ask for, on every supported architecture."""
    path = planned(shape, SHAPES[shape].n_expert)
    info = read_info(path)
    ruled = _measure(path, 512, token_mode=mode)
    plain = _measure(path, 512, token_k_max=0)
    added = max(ruled["graph_nodes"] - plain["graph_nodes"], ruled["graph_nodes_token"] - plain["graph_nodes_token"])
    budget = info.block_count * (RULE_NODES + 2 * info.expert_count)
    print(f"{shape} {mode}: +{added} nodes over {len(info.moe_layers)} MoE layers (budget {budget}); "
          f"graph {ruled['graph_nodes']} of {ruled['max_nodes']}")
    assert ruled["max_nodes"] - plain["max_nodes"] == budget  # llama_context::graph_max_nodes adds this
    assert 0 < added <= budget
    assert ruled["graph_nodes"] <= ruled["max_nodes"] and ruled["graph_nodes_token"] <= ruled["max_nodes"]
