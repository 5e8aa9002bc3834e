"""A budget per context without reloading the weights (patch 0004, `runtime.set_context_plan` /
`runtime.use_plan`): several contexts of one loaded model at different plans give each plan's
logits bit for bit, as separate loads of each plan do."""

from __future__ import annotations

import numpy as np
import pytest

from allocmoe_edge.errors import AllocMoeError
from allocmoe_edge.gguf_meta import plan_for_counts, read_info, stamp
from allocmoe_edge.runtime import LoadChoice, layer_counts, load, set_context_plan, use_plan

from .llama_logits import tokens_for

pytestmark = [pytest.mark.slow, pytest.mark.runtime]

PLANS = ([1, 2, 1], [2, 2, 2])  # per MoE layer of the tiny Mixtral (3 blocks, 6 experts, top-3)


@pytest.fixture(scope="module")
def two_plans(tiny_gguf, tmp_path_factory):
    _, path = tiny_gguf("mixtral")
    info = read_info(path)
    out = tmp_path_factory.mktemp("ctx") / "two.gguf"
    return stamp(path, out, [plan_for_counts(info, c) for c in PLANS], k_min=1, k_max=3)  # Alloc-T on


def _logits(llm, tokens, choice: LoadChoice | None = None) -> np.ndarray:
    """All-position logits of ``tokens`` as one ubatch in a new context on ``llm``'s model, running ``choice``."""
    from allocmoe_edge.graph_probe import ProbeContext

    with ProbeContext(llm, len(tokens), lambda t, ask, _: False) as ctx:
        if choice is not None:
            set_context_plan(ctx.ctx, choice)
        ctx.decode(tokens, 0)
        return ctx.logits(len(tokens))


def test_contexts_of_one_model_run_each_plan_bit_for_bit(patched_runtime, two_plans):
    tokens = tokens_for(50000, n=24)
    choices = [LoadChoice(plan_index=0), LoadChoice(plan_index=1), LoadChoice(full_budget=True)]
    separate = []
    for choice in choices:
        llm = load(two_plans.path, choice)
        separate.append(_logits(llm, tokens))
        llm.close()
    shared = load(two_plans.path)  # one copy of the weights, loaded at the default plan (0)
    try:
        # contexts created and run interleaved, each at its own plan
        for _ in range(2):
            for choice, expected in zip(reversed(choices), reversed(separate)):
                assert np.array_equal(_logits(shared, tokens, choice), expected), choice
        assert not np.array_equal(separate[0], separate[1])  # the plans really differ
    finally:
        shared.close()


def test_use_plan_switches_a_loaded_llama_between_requests(patched_runtime, two_plans):
    tokens = tokens_for(50000, n=12)
    fresh = load(two_plans.path, LoadChoice(plan_index=1), logits_all=True)
    fresh.eval(tokens)
    expected = np.array(fresh.scores[: len(tokens)])
    fresh.close()
    llm = load(two_plans.path, logits_all=True)
    try:
        llm.eval(tokens)  # plan 0 first: the switch must not reuse these tokens
        assert layer_counts(llm) == PLANS[0]
        use_plan(llm, LoadChoice(plan_index=1))
        assert layer_counts(llm) == PLANS[1]  # the context's plan, not the one chosen at load
        llm.eval(tokens)
        assert np.array_equal(np.array(llm.scores[: len(tokens)]), expected)
        use_plan(llm, LoadChoice(full_budget=True))
        assert layer_counts(llm) == [3, 3, 3]
        use_plan(llm, LoadChoice())
        assert layer_counts(llm) == PLANS[0]
        with pytest.raises(AllocMoeError, match="plan 5 does not exist"):
            use_plan(llm, LoadChoice(plan_index=5))
        with pytest.raises(AllocMoeError, match="chosen when the model is loaded"):
            use_plan(llm, LoadChoice(uniform_k=2))
    finally:
        llm.close()


def test_a_stored_plan_that_cannot_run_fails_only_where_it_is_chosen(patched_runtime, tiny_gguf, tmp_path):
    import gguf

    from allocmoe_edge.gguf_meta import Keys, copy_with_metadata

    _, path = tiny_gguf("mixtral")
    info = read_info(path)
    good = stamp(path, tmp_path / "g.gguf", [plan_for_counts(info, c) for c in PLANS], k_min=1, k_max=3)
    bad = tmp_path / "b.gguf"  # plan 1's counts above the expert count
    T = gguf.GGUFValueType
    copy_with_metadata(good.path, bad, {Keys.PLAN_LAYER_EXPERT_COUNTS.format(index=1): ([2, 9, 2], T.ARRAY, T.UINT32)},
                       drop=lambda k: False)
    llm = load(bad)  # the default plan, 0, is fine
    try:
        with pytest.raises(AllocMoeError, match=r"plan 1 cannot run: .*outside \[1, 6\]"):
            use_plan(llm, LoadChoice(plan_index=1))
        use_plan(llm, LoadChoice(full_budget=True))
    finally:
        llm.close()
    with pytest.raises(AllocMoeError, match="outside"):
        load(bad, LoadChoice(plan_index=1))
