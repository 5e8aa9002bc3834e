"""Budgets, plan validation, JSON round trips and model checks."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from allocmoe_edge.errors import AllocMoeError
from allocmoe_edge.plan import Budget, Plan, PlanModelShape

# DeepSeek-V2-Lite's shape: block 0 dense, 26 MoE blocks, 64 experts, top-6
DSV2 = PlanModelShape("deepseek2", 27, tuple(range(1, 27)), 64, 6)


def make_plan(**changes) -> Plan:
    fields = dict(model=DSV2, budget=Budget.parse("50%", DSV2), method="alloc-l+t", counts=(3,) * 26)
    fields.update(changes)
    return Plan(**fields)


def test_identity_full_budget():
    assert DSV2.full_budget == 156
    assert PlanModelShape("x", 4, [1, 3], 8, 2).moe_layers == (1, 3)


@pytest.mark.parametrize(
    "value, fraction, count",
    [
        ("0.5", 0.5, 78),
        (0.5, 0.5, 78),
        ("50%", 0.5, 78),
        (" 25% ", 0.25, 39),
        ("1", 1 / 156, 1),
        (78, 0.5, 78),
        ("78", 0.5, 78),
        ("1.0", 1.0, 156),
        (1.0, 1.0, 156),
        ("0.3", 0.3, 46),  # 46.8 rounds down
    ],
)
def test_budget_parse(value, fraction, count):
    assert Budget.parse(value, 156) == Budget(fraction, count)


def test_budget_parse_fraction_tolerates_binary_rounding():
    assert Budget.parse(0.29, 100).count == 29


@pytest.mark.parametrize(
    "value, message",
    [
        ("0", "positive"),
        (0, "positive"),
        ("-3", "positive"),
        ("0.0", r"\(0, 1\]"),
        ("1.5", r"\(0, 1\]"),
        ("150%", r"\(0, 1\]"),
        (78.0 * 2, r"\(0, 1\]"),
        ("157", "above the full budget 156"),
        ("half", "not a number"),
        (True, "not a number"),
        (None, "not a number"),
        ("nan", r"\(0, 1\]"),
        ("25", "below the minimum 26"),
        ("0.1", "below the minimum 26"),
    ],
)
def test_budget_parse_errors(value, message):
    with pytest.raises(AllocMoeError, match=message):
        Budget.parse(value, DSV2)


def test_budget_parse_k_min():
    assert Budget.parse(52, DSV2, k_min=2).count == 52
    with pytest.raises(AllocMoeError, match=r"26 MoE layers x k_min 2"):
        Budget.parse(51, DSV2, k_min=2)


def test_plan_defaults_and_layer_counts():
    plan = make_plan(counts=[1, 5] + [3] * 24)
    assert plan.token_k_min == 1 and plan.token_k_max == 6 and plan.alloc_t
    assert plan.layer_expert_counts() == [6, 1, 5] + [3] * 24
    assert not make_plan(method="alloc-l", token_k_max=0).alloc_t


def test_plan_json_round_trip(tmp_path):
    plan = make_plan(
        counts=[2, 4] * 13,
        calibration={"file": "wiki.txt", "sha256": "ab" * 32, "n_tokens": 4096},
        predicted={"metric": "kld", "cost": 0.25},
        measured={"kld": 0.3},
    )
    path = tmp_path / "sub" / "plan.json"
    plan.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == "allocmoe-plan" and data["version"] == 2
    assert data["budget"] == {"fraction": 0.5, "count": 78, "full": 156}
    assert Plan.load(path) == plan


def test_decode_thresholds_validated_round_tripped_and_per_block(tmp_path):
    counts = [1, 6] + [3] * 23 + [2]  # k_min, k_max, then layers the decode rule thresholds (78 in all)
    plan = make_plan(counts=counts, token_mode="both", token_thresholds=[None, None] + [0.125] * 24)
    plan.save(tmp_path / "p.json")
    assert Plan.load(tmp_path / "p.json") == plan
    assert plan.block_thresholds()[:4] == [math.inf, math.inf, -math.inf, 0.125]  # block 0 is dense
    with pytest.raises(AllocMoeError, match="token_mode decode needs token_thresholds"):
        make_plan(counts=counts, token_mode="decode")
    with pytest.raises(AllocMoeError, match="block 1: expected null"):
        make_plan(counts=counts, token_mode="both", token_thresholds=[0.5] * 26)
    with pytest.raises(AllocMoeError, match="block 3: expected a finite number"):
        make_plan(counts=counts, token_mode="both", token_thresholds=[None, None, math.inf] + [0.1] * 23)
    assert make_plan(counts=counts, token_mode="both", token_thresholds=[None, None] + [0.125] * 24).alloc_t
    with pytest.raises(AllocMoeError, match="token_mode 'sometimes'"):
        make_plan(token_mode="sometimes")
    # a version 1 plan (no token rule fields) still loads, as the batch rule
    data = {**plan.to_dict(), "version": 1}
    del data["token_mode"], data["token_thresholds"]
    old = Plan.from_dict(data)
    assert old.version == 1 and old.token_mode == "batch" and old.token_thresholds is None
    assert Plan.from_dict(plan.to_dict()) == plan


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"counts": (3,) * 25}, "25 counts for 26 MoE layers"),
        ({"counts": (0,) + (3,) * 25}, r"outside \[1, 6\] at block:count 1:0"),
        ({"counts": (7,) + (3,) * 25}, "1:7"),
        ({"counts": (4,) * 26}, "above the budget 78"),
        ({"counts": (2,) * 26, "token_k_min": 3}, r"outside \[3, 6\]"),
        ({"token_k_min": 0}, "token_k_min 0"),
        ({"token_k_max": 65}, "token_k_max 65"),
        ({"token_k_min": 4, "token_k_max": 3, "counts": (3,) * 26}, "token_k_max 3"),
        ({"method": "magic"}, "method 'magic'"),
        ({"budget": Budget(0.5, 200)}, "outside \\[1, full budget 156\\]"),
        ({"model": PlanModelShape("x", 4, (1, 5), 8, 2), "counts": (1, 1)}, "moe_layers"),
        ({"model": PlanModelShape("x", 4, (1, 2), 8, 9), "counts": (1, 1)}, "k_orig 9"),
    ],
)
def test_plan_validation_errors(changes, message):
    with pytest.raises(AllocMoeError, match=message):
        make_plan(**changes)


def test_plan_alloc_t_off_allows_counts_up_to_n_expert():
    model = PlanModelShape("x", 2, (0, 1), 8, 2)
    plan = Plan(model, Budget(1.0, 4), "custom", (3, 1), token_k_max=0)
    assert plan.layer_expert_counts() == [3, 1]
    with pytest.raises(AllocMoeError, match="0:3"):
        dataclasses.replace(plan, token_k_max=2)


def test_check_against():
    plan = make_plan()
    plan.check_against(DSV2)
    other = PlanModelShape("qwen2moe", 24, tuple(range(24)), 60, 4)
    with pytest.raises(AllocMoeError) as e:
        plan.check_against(other)
    text = str(e.value)
    for label in ("architecture", "layer count", "MoE layers", "expert count", "top-k"):
        assert label in text
    expected = r"^plan was made for a different model: expert count \(plan 64, model 32\)"
    with pytest.raises(AllocMoeError, match=expected):
        plan.check_against(dataclasses.replace(DSV2, n_expert=32))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(format="gguf"), "not an allocmoe plan"),
        (lambda d: d.update(version=3), "newer than this allocmoe-edge supports"),
        (lambda d: d.update(version=0), "unknown plan version 0"),
        (lambda d: d.pop("counts"), r"missing field\(s\) counts"),
        (lambda d: d["model"].pop("n_expert"), r"plan.model: missing field\(s\) n_expert"),
        (lambda d: d.update(counts="3,3"), "plan.counts: expected a list of integers"),
        (lambda d: d["budget"].update(full=100), "full budget 156"),
        (lambda d: d.update(measured=[1]), "plan.measured"),
    ],
)
def test_plan_from_dict_errors(edit, message):
    data = make_plan().to_dict()
    edit(data)
    with pytest.raises(AllocMoeError, match=message):
        Plan.from_dict(data)


def test_plan_load_errors(tmp_path):
    with pytest.raises(AllocMoeError, match="not found"):
        Plan.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(AllocMoeError, match="not valid JSON"):
        Plan.load(bad)
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({**make_plan().to_dict(), "version": 9}))
    with pytest.raises(AllocMoeError, match=f"^{newer}: plan version 9 is newer"):
        Plan.load(newer)
