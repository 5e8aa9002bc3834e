"""Alloc-L dynamic program, uniform counts, plans from sensitivity files, `allocmoe allocate`."""

from __future__ import annotations

import itertools
import json
import math
import random

import numpy as np
import pytest
from click.testing import CliRunner

from allocmoe_edge.allocate import allocate_layers, plan_from_sensitivity, uniform_counts
from allocmoe_edge.cli import cli
from allocmoe_edge.errors import AllocMoeError
from allocmoe_edge.plan import Plan


def brute_force(costs, budget, k_min, k_max):
    """Optimum by enumeration with the documented tie-break: cost, then total, then counts."""
    feasible = (
        (sum(row[k - 1] for row, k in zip(costs, ks)), sum(ks), ks)
        for ks in itertools.product(range(k_min, k_max + 1), repeat=len(costs))
        if sum(ks) <= budget
    )
    return min(feasible)


def random_case(rng: random.Random, integer: bool):
    n_layers, k_top = rng.randint(1, 4), rng.randint(1, 4)
    k_min = rng.randint(1, k_top)
    k_max = rng.choice([None, rng.randint(k_min, k_top)])
    hi = k_top if k_max is None else k_max
    budget = rng.randint(n_layers * k_min, n_layers * hi + 2)
    value = (lambda: rng.randint(-1, 3)) if integer else (lambda: rng.uniform(-1.0, 3.0))
    costs = [[value() for _ in range(k_top)] for _ in range(n_layers)]
    return costs, budget, k_min, k_max, hi


def test_dp_matches_brute_force_with_ties():
    rng = random.Random(0)
    for _ in range(400):
        costs, budget, k_min, k_max, hi = random_case(rng, integer=True)
        cost, total, ks = brute_force(costs, budget, k_min, hi)
        got = allocate_layers(costs, budget, k_min, k_max)
        assert tuple(got) == ks, (costs, budget, k_min, k_max)
        assert sum(row[k - 1] for row, k in zip(costs, got)) == cost


def test_dp_matches_brute_force_float_costs():
    rng = random.Random(1)
    for _ in range(200):
        costs, budget, k_min, k_max, hi = random_case(rng, integer=False)
        cost, _, _ = brute_force(costs, budget, k_min, hi)
        got = allocate_layers(np.array(costs), budget, k_min, k_max)
        assert k_min <= min(got) and max(got) <= hi and sum(got) <= budget
        assert sum(row[k - 1] for row, k in zip(costs, got)) == pytest.approx(cost, abs=1e-12)


def test_dp_tie_break_rules():
    flat = [[0, 0, 0]] * 3
    assert allocate_layers(flat, 9) == [1, 1, 1]  # equal cost: fewest activations
    linear = [[2, 1, 0]] * 3  # cost 9 - sum(k): all sum-6 solutions tie; lexicographic
    assert allocate_layers(linear, 6) == [1, 2, 3]
    assert allocate_layers(linear, 6, k_min=2) == [2, 2, 2]


def test_dp_realistic_size_and_sensitivity_ordering():
    rng = np.random.default_rng(0)
    sens = rng.uniform(0.1, 2.0, size=26)
    costs = np.outer(sens, [1 / k - 1 / 6 for k in range(1, 7)])  # decreasing in k, 0 at K
    counts = allocate_layers(costs, 78)
    assert len(counts) == 26 and sum(counts) <= 78
    assert counts[int(np.argmax(sens))] >= counts[int(np.argmin(sens))]
    assert allocate_layers(costs, 156) == [6] * 26


@pytest.mark.parametrize(
    "costs, budget, kwargs, message",
    [
        ([[1, 2], [1]], 3, {}, "ragged"),
        ([], 3, {}, "non-empty"),
        ([[1, float("nan")]], 2, {}, "k=2 is nan"),
        ([[1, 2]], 2, {"k_min": 2, "k_max": 1}, "k_min"),
        ([[1, 2]], 2, {"k_max": 3}, "largest k"),
        ([[1, 2], [1, 2]], 3, {"k_min": 2}, "infeasible"),
        ([[1, "x"]], 2, {}, "non-number"),
        ([[1, 2]], 2.5, {}, "integer"),
    ],
)
def test_dp_errors(costs, budget, kwargs, message):
    with pytest.raises(AllocMoeError, match=message):
        allocate_layers(costs, budget, **kwargs)


def test_uniform_counts():
    assert uniform_counts(4, 12, 1, 6) == [3, 3, 3, 3]
    assert uniform_counts(4, 14, 1, 6) == [4, 4, 3, 3]  # remainder to the first layers
    assert uniform_counts(4, 100, 1, 6) == [6, 6, 6, 6]
    assert uniform_counts(4, 9, 2, 6) == [3, 2, 2, 2]
    with pytest.raises(AllocMoeError, match="infeasible"):
        uniform_counts(4, 7, 2, 6)


def test_uniform_is_an_optimum_of_a_flat_convex_cost():
    """Uniform counts solve the DP for the same convex cost in every layer."""
    for n, budget in [(4, 14), (5, 11), (3, 18), (6, 6)]:
        costs = [[(6 - k) ** 2 for k in range(1, 7)]] * n
        u = uniform_counts(n, budget, 1, 6)
        dp = allocate_layers(costs, budget)
        assert sorted(u) == sorted(dp)


def make_sensitivity(k_orig=4, blocks=(1, 2, 3)):
    """Layer 1 is very sensitive, layer 3 barely; kld and ppl agree in ranking."""
    weight = {1: 1.0, 2: 0.3, 3: 0.05}
    layers = []
    for b in blocks:
        kld = [weight[b] * (k_orig - k) for k in range(1, k_orig + 1)]
        layers.append({"layer": b, "kld": kld, "ppl": [10.0 * math.exp(v) for v in kld]})
    return {
        "format": "allocmoe-sensitivity",
        "version": 1,
        "model": {"architecture": "toy", "n_layer": 4, "moe_layers": list(blocks), "n_expert": 8, "k_orig": k_orig},
        "calibration": {"file": "calib.txt", "n_tokens": 1024},
        "mode": "isolated",
        "full": {"ppl": 10.0, "nll": math.log(10.0)},
        "layers": list(reversed(layers)),  # order in the file does not matter
    }


@pytest.mark.parametrize("metric", ["kld", "ppl"])
def test_plan_from_sensitivity(metric):
    plan = plan_from_sensitivity(make_sensitivity(), "50%", "alloc-l+t", metric=metric)
    assert plan.budget.count == 6 and plan.counts == (4, 1, 1)
    assert plan.token_k_min == 1 and plan.token_k_max == 4
    p = plan.predicted
    assert p["metric"] == metric and p["per_layer"] == pytest.approx([0.0, 0.9, 0.15])
    assert p["cost"] == pytest.approx(1.05) and p["kld"] == pytest.approx(1.05)
    assert p["ppl"] == pytest.approx(10.0 * math.exp(1.05))
    assert plan.calibration == {"file": "calib.txt", "n_tokens": 1024, "profile_mode": "isolated"}
    assert plan.layer_expert_counts() == [4, 4, 1, 1]


def _with_routing(sens, seed=0):
    """The sensitivity file of a version 2 profile: routing statistics of random softmax routers."""
    from allocmoe_edge.thresholds import rank_quantiles

    rng = np.random.default_rng(seed)
    layers = []
    for b in sens["model"]["moe_layers"]:
        logits = rng.normal(size=(2000, sens["model"]["n_expert"])) * 2
        p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        layers.append(rank_quantiles(b, -np.sort(-p, axis=1)[:, :8]).to_dict())
    return {**sens, "version": 2, "routing": {"score": "softmax", "layers": layers}}


def test_decode_thresholds_from_the_profile_routing_statistics():
    from allocmoe_edge.thresholds import LayerRouting, expected_count

    sens = _with_routing(make_sensitivity())
    plan = plan_from_sensitivity(sens, 8, "uniform+t")  # counts (3, 3, 2), k 1..4
    assert plan.counts == (3, 3, 2) and plan.token_mode == "both"
    stats = {d["layer"]: LayerRouting.from_dict(d) for d in sens["routing"]["layers"]}
    for block, k, tau in zip(plan.model.moe_layers, plan.counts, plan.token_thresholds):
        assert expected_count(stats[block], tau, 1, 4) == pytest.approx(k, abs=1e-3)
    edges = plan_from_sensitivity(sens, 6, "alloc-l+t", token_mode="decode")  # counts (4, 1, 1): k_max, k_min
    assert edges.counts == (4, 1, 1) and edges.token_thresholds == (None, None, None)
    assert plan_from_sensitivity(sens, 8, "uniform+t", token_mode="batch").token_thresholds is None
    assert plan_from_sensitivity(sens, 8, "uniform").token_mode == "batch"  # Alloc-T off: no rule
    assert plan_from_sensitivity(make_sensitivity(), 8, "uniform+t").token_mode == "batch"  # version 1: no statistics
    with pytest.raises(AllocMoeError, match="no routing statistics"):
        plan_from_sensitivity(make_sensitivity(), 8, "uniform+t", token_mode="both")


def test_plan_from_sensitivity_methods_and_bounds():
    sens = make_sensitivity()
    alloc_l = plan_from_sensitivity(sens, 6, "alloc-l", k_min=1, k_max=3)
    assert alloc_l.counts == (3, 2, 1) and alloc_l.token_k_max == 0 and alloc_l.method == "alloc-l"
    uni = plan_from_sensitivity(sens, 0.5, "uniform")
    assert uni.counts == (2, 2, 2) and uni.token_k_max == 0
    alloc_t = plan_from_sensitivity(sens, 0.5, "uniform+t")  # Alloc-T alone: uniform counts, Alloc-T on
    assert alloc_t.counts == (2, 2, 2) and (alloc_t.token_k_min, alloc_t.token_k_max) == (1, 4)
    alloc_t.validate()  # raises on a bad plan
    assert alloc_t.predicted == uni.predicted
    assert uni.predicted["cost"] > alloc_l.predicted["cost"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.update(format="other"), "not an allocmoe sensitivity"),
        (lambda s: s.update(version=3), "version"),
        (lambda s: s.update(mode="weird"), "mode"),
        (lambda s: s["layers"].pop(), "covers blocks"),
        (lambda s: s["layers"][0].update(kld=[0.0]), "must be 4 finite"),
        (lambda s: s["layers"][0].update(kld=[0.0, float("nan"), 0.0, 0.0]), "must be 4 finite"),
        (lambda s: [e.pop("kld") for e in s["layers"]], "lacks 'kld'"),
        (lambda s: s.pop("full"), "missing field"),
    ],
)
def test_plan_from_sensitivity_errors(edit, message):
    sens = make_sensitivity()
    edit(sens)
    with pytest.raises(AllocMoeError, match=message):
        plan_from_sensitivity(sens, 0.5)


def test_plan_from_sensitivity_bad_options():
    with pytest.raises(AllocMoeError, match="method"):
        plan_from_sensitivity(make_sensitivity(), 0.5, "lexi")
    with pytest.raises(AllocMoeError, match="profiled range"):
        plan_from_sensitivity(make_sensitivity(), 0.5, k_max=5)
    with pytest.raises(AllocMoeError, match="below the minimum"):
        plan_from_sensitivity(make_sensitivity(), 5, k_min=2)


@pytest.fixture()
def sens_file(tmp_path):
    path = tmp_path / "sens.json"
    path.write_text(json.dumps(make_sensitivity()))
    return path


def test_cli_writes_plan_and_table(sens_file, tmp_path):
    out = tmp_path / "plan.json"
    result = CliRunner().invoke(cli, ["allocate", str(sens_file), "--budget", "0.5", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "total      6" in result.output and "predicted" in result.output
    plan = Plan.load(out)
    assert plan.counts == (4, 1, 1) and plan.method == "alloc-l+t"
    assert plan.calibration["sensitivity_file"] == "sens.json"
    assert len(plan.calibration["sensitivity_sha256"]) == 64


def test_cli_json_and_options(sens_file):
    args = ["allocate", str(sens_file), "-b", "6", "--metric", "ppl", "--method", "alloc-l", "--k-max", "3", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["counts"] == [3, 2, 1] and data["token_k_max"] == 0 and data["predicted"]["metric"] == "ppl"


def test_cli_errors(sens_file):
    runner = CliRunner()
    same = runner.invoke(cli, ["allocate", str(sens_file), "-b", "0.5", "-o", str(sens_file)])
    assert isinstance(same.exception, AllocMoeError) and "sensitivity file itself" in str(same.exception)
    assert json.loads(sens_file.read_text())["format"] == "allocmoe-sensitivity"
    no_out = runner.invoke(cli, ["allocate", str(sens_file), "-b", "0.5"])
    assert no_out.exit_code == 2 and "--json" in no_out.output
    bad = runner.invoke(cli, ["allocate", str(sens_file), "-b", "lots", "--json"])
    assert isinstance(bad.exception, AllocMoeError) and "not a number" in str(bad.exception)
    help_text = runner.invoke(cli, ["allocate", "--help"]).output
    assert "--k-max" in help_text and "default: 1" in help_text
