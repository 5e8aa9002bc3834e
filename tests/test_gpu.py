"""Budgeted MoE on a GPU backend against the CPU backend on the same ubatch (skipped without one).

The process's library decides the backend: `scripts/gpu_check.sh` runs this module on a CUDA build on the
device machine, `scripts/test_vulkan.sh` (part of `make test`) on the series' Vulkan build on Mesa's lavapipe.
Under ALLOCMOE_GPU_BACKEND=<name> a library without that backend fails instead of skipping.

Two models with uniform-split plans at 75/50/25 % and decode thresholds, every layer offloaded against the CPU
backend of the same library (no layer and no op offloaded), for per-layer counts, the batch rule and the
decode rule:
- the bundled deep-moe (trained OLMoE, 32 experts top-8) in f16 on held-out text, ubatches of 1, 8, 64 and 512
  tokens (up to 8 take the mat-vec kernels, more the batched ones): the logits (top-1 agreement, NMSE, largest
  relative logit difference) and each MoE layer's output (in q8_0 the GPU's q8_1 activations against the CPU's
  q8_0 flip the stock top-k's top-1 at 1.4 % of 512 positions on lavapipe; f16 rounds alike on both);
- a synthetic DeepSeek-V2-Lite (3 blocks, 64 experts top-6) in q4_0 over 64- and 512-token ubatches: each MoE
  layer's output. Its random weights make logits that hardly depend on the experts (the stock path's logits
  already differ between the GPU and the CPU at 512 tokens: top-1 0.955 on lavapipe), so logits are checked
  only for being finite there.
A MoE layer agrees when `MOE_SHARE` of its tokens' outputs are within `MOE_TOL` of the CPU's: the rules are
discontinuous (a routing score within rounding of a threshold, or of the batch rule's last kept pair, keeps
an expert on one backend and drops it on the other), which moves a few tokens' outputs (and, through
attention, later layers' inputs), as the stock top-k moves a few tokens' experts. Where the stock graph (the
file at full budget, no allocmoe node) already agrees less on the same tokens (the synth's first MoE layer
at 512 tokens: 85 % of tokens on lavapipe), a rule may agree `SLACK` less than the stock graph does; the
same holds for top-1 (`TOP1_SLACK`). The bounds leave room for another LLVM's rounding (Debian 13's lavapipe)
while a broken kernel (wrong rows, unwritten rows) fails every one of them. Also: routed experts in system
memory (--cpu-moe, --n-cpu-moe: the scheduler copies the used experts to the GPU) with the decode rule's skipped
ids; a plan switched per context; no graph split added by a plan; `run` / `eval` / `bench` with -ngl. Each
agreement row is printed at the end and, under ALLOCMOE_GPU_REPORT=<file>, written there as JSON.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from allocmoe_edge.runtime import LoadChoice, devices, llama_cpp_module, load

pytestmark = [pytest.mark.slow, pytest.mark.runtime, pytest.mark.gpu]

TOP1_MIN = 0.99  # top-1 agreement of GPU and CPU logits over a ubatch's positions (trained model)
NMSE_MAX = 1e-2
MOE_TOL, MOE_SHARE = 0.05, 0.85  # a MoE layer's token outputs within 5 % of the CPU's, for 85 % of its tokens
SLACK = 0.1  # ... or for at most 10 points fewer of its tokens than the stock graph's (full budget)
TOP1_SLACK = 0.01  # top-1: at least TOP1_MIN (one position may differ in 64 to 99), or the stock graph's - this
ACTIVE_TOL = 0.05  # decode rule: executed activations of GPU and CPU within 5 % (near-threshold flips)
MODES = {"per-layer": {"token_k_max": 0}, "batch": {"token_mode": "batch"}, "decode": {"token_mode": "decode"}}
REPORT: list[dict] = []


@pytest.fixture(scope="module")
def backend() -> str:
    """The GPU backend ("CUDA", "Vulkan", ...) of the loaded library's first non-CPU device."""
    expected = os.environ.get("ALLOCMOE_GPU_BACKEND")
    found = [d["backend"] for d in devices() if d["backend"] not in ("CPU", "RPC")] \
        if llama_cpp_module().llama_supports_gpu_offload() else []
    if expected and expected not in found:
        pytest.fail(f"ALLOCMOE_GPU_BACKEND={expected}, but the library's devices are {devices()}")
    if not found:
        pytest.skip("needs a llama.cpp build with a GPU backend")
    yield found[0]
    _report(found[0])


def report_lines() -> list[str]:
    """One line per agreement row of this session (printed in pytest's summary by conftest.py)."""
    def line(r: dict) -> str:
        logits = "" if r.get("top1") is None else \
            (f"top-1 {r['top1']:.4f} (stock graph {r['stock_top1']:.4f}), NMSE {r['nmse']:.1e}, max relative logit "
             f"difference {r['max_rel_diff']:.1e}; ")
        return (f"{r['test']}: {logits}least share of a MoE layer's outputs within {MOE_TOL:.0%}: "
                f"{min(r['moe_share'].values()):.4f} (stock graph {min(r['stock_share'].values()):.4f})")

    return [line(r) for r in REPORT]


def _report(name: str) -> None:
    """The rows as JSON in $ALLOCMOE_GPU_REPORT, when set."""
    if os.environ.get("ALLOCMOE_GPU_REPORT"):
        with open(os.environ["ALLOCMOE_GPU_REPORT"], "w") as f:
            json.dump({"backend": name, "devices": devices(), "rows": REPORT}, f, indent=1)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """Both models with uniform-split plans at 75/50/25 % (Alloc-T on, decode thresholds), each with its
    tokens: held-out text for deep-moe, random ids for the synth."""
    from allocmoe_edge.allocate import stamp_uniform_split
    from allocmoe_edge.assets import ASSETS, MODELS, model_dir
    from allocmoe_edge.convert import convert_hf
    from allocmoe_edge.synth import synthesize

    folder = tmp_path_factory.mktemp("gpu-models")
    deep = convert_hf(model_dir("deep-moe"), folder / "deep-moe-f16.gguf", "f16", MODELS["deep-moe"],
                      log=lambda m: None)
    deep = stamp_uniform_split(deep, folder / "deep-moe.plans.gguf", (0.75, 0.5, 0.25), decode_rule=True)
    vocab = load(deep.path, None, info=deep, vocab_only=True)
    text = vocab.tokenize((ASSETS / "heldout.txt").read_text()[:20000].encode(), add_bos=True, special=False)
    vocab.close()
    synth = synthesize("deepseek-v2-lite", "q4_0", folder / "dsv2-3.gguf", n_layer=3)
    synth = stamp_uniform_split(synth, folder / "dsv2-3.plans.gguf", (0.75, 0.5, 0.25), decode_rule=True)
    assert len(text) >= 512
    return {"deep-moe": (deep, text), "dsv2-synth": (synth, np.random.default_rng(0).integers(3, 102400, 512).tolist())}


@pytest.fixture(autouse=True)
def _alloc_t_on_gpu(monkeypatch):
    monkeypatch.setenv("ALLOCMOE_GPU_ALLOC_T", "1")  # CUDA loads turn Alloc-T off until gpu_check.sh verifies it


def _probe(info, tokens: list[int], gpu: bool, choice: LoadChoice, context_choice: LoadChoice | None = None,
           **load_kwargs):
    """Per-layer activations (with outputs) and logits of ``tokens`` as one ubatch: every layer offloaded
    (``gpu``), or on the CPU backend alone (no layer and no op offloaded)."""
    from allocmoe_edge.graph_probe import moe_activations

    n = max(len(tokens), 64)
    llm = load(info.path, choice, info=info, n_gpu_layers=99 if gpu else 0, n_ctx=n, n_batch=n, n_ubatch=n,
               **load_kwargs)
    try:
        return moe_activations(llm, tokens, choice=context_choice, op_offload=gpu, outputs=True)
    finally:
        llm.close()


def _shares(acts: dict, acts_cpu: dict) -> dict[int, float]:
    """Per MoE layer, the share of tokens whose output is within `MOE_TOL` of the CPU's."""
    assert sorted(acts) == sorted(acts_cpu)
    shares = {}
    for layer, a in acts.items():
        out, out_cpu = a["out"], acts_cpu[layer]["out"]
        assert np.isfinite(out).all(), f"layer {layer}: non-finite MoE output"
        err = np.linalg.norm(out - out_cpu, axis=1) / np.maximum(np.linalg.norm(out_cpu, axis=1), 1e-30)
        shares[layer] = round(float(np.mean(err <= MOE_TOL)), 4)
    return shares


def _top1(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean(got.argmax(axis=1) == ref.argmax(axis=1)))


_STOCK: dict = {}


def _stock(models: dict, model: str, tokens: list[int]) -> tuple[dict[int, float], float]:
    """The stock graph's agreement on ``tokens`` (the file at full budget): MoE output shares and top-1."""
    key = (model, len(tokens))
    if key not in _STOCK:
        info = models[model][0]
        acts_cpu, cpu = _probe(info, tokens, False, LoadChoice(full_budget=True))
        acts, got = _probe(info, tokens, True, LoadChoice(full_budget=True))
        _STOCK[key] = (_shares(acts, acts_cpu), _top1(got, cpu))
    return _STOCK[key]


def _agree(test: str, acts: dict, got: np.ndarray, acts_cpu: dict, ref: np.ndarray,
           stock: tuple[dict[int, float], float], logits: bool = True) -> None:
    """Every MoE layer's outputs, and with ``logits`` the logits (top-1 agreement, NMSE), agree with the CPU's
    (`MOE_SHARE`, `TOP1_MIN`, or within `SLACK` of the ``stock`` graph's agreement); the row goes to the report."""
    assert np.isfinite(got).all(), f"{test}: non-finite logits"
    shares, (stock_shares, stock_top1) = _shares(acts, acts_cpu), stock
    row = {"test": test, "moe_share": shares, "stock_share": stock_shares, "top1": None}
    if logits:
        row.update(top1=_top1(got, ref), stock_top1=stock_top1, nmse=float(((got - ref) ** 2).sum() / (ref ** 2).sum()),
                   max_rel_diff=float((np.abs(got - ref).max(axis=1) / np.abs(ref).max(axis=1)).max()))
    REPORT.append(row)
    for layer, share in shares.items():
        assert share >= min(MOE_SHARE, stock_shares[layer] - SLACK), f"{test}: layer {layer}: {row}"
    if logits:
        one_position = 1 / len(ref) if len(ref) >= 64 else 0.0  # 1 % of 64 positions is less than one
        top1_min = min(TOP1_MIN, 1 - one_position, stock_top1 - TOP1_SLACK)
        assert row["top1"] >= top1_min and row["nmse"] < NMSE_MAX, f"{test}: {row}"


CASES = [("deep-moe", T) for T in (1, 8, 64, 512)] + [("dsv2-synth", T) for T in (64, 512)]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("model,T", CASES)
def test_gpu_matches_cpu_on_the_same_ubatch(backend, models, model, T, mode):
    info, text = models[model]
    choice = LoadChoice(plan_index=1, **MODES[mode])  # plan 1: 50 %
    tokens = text[:T]
    acts_cpu, cpu = _probe(info, tokens, False, choice)
    acts, got = _probe(info, tokens, True, choice)
    _agree(f"{model} {mode} T={T}", acts, got, acts_cpu, cpu, _stock(models, model, tokens), logits=model == "deep-moe")
    for layer, a in acts.items():
        if mode == "per-layer" or T == 1 and mode == "batch":  # one token: the batch rule is top-k_l
            assert a["per_token"] is None and a["active"] == a["pairs"] == acts_cpu[layer]["active"]
        elif mode == "batch":
            assert a["per_token"] is not None and sum(a["per_token"]) == a["pairs"]  # Alloc-T ran on the GPU
            real = [col[col >= 0] for col in a["ids"]]
            assert all(len(set(c.tolist())) == len(c) for c in real), f"layer {layer}: repeated expert"
        else:
            assert (a["ids"] < 0).any() or T == 1  # candidates were dropped
            assert abs(a["active"] - acts_cpu[layer]["active"]) <= max(2, ACTIVE_TOL * a["active"]), (layer, a)


@pytest.mark.parametrize("T", [64, 512])
@pytest.mark.parametrize("where", ["cpu_moe", "n_cpu_moe"])
def test_experts_in_system_memory_with_the_decode_rule(backend, models, where, T):
    """Routed experts in system memory (--cpu-moe: every block; --n-cpu-moe 4: the first four of deep-moe's eight)
    and the decode rule on a T-token ubatch: the GPU runs mul_mat_id on experts the scheduler copies from host
    memory, only the used ones, reading the ids on the host; it must skip the -1 ids (it asserted on them) and
    still match the CPU."""
    info, text = models["deep-moe"]
    choice = LoadChoice(plan_index=1, token_mode="decode")
    kwargs = {"cpu_moe": True} if where == "cpu_moe" else {"n_cpu_moe": 4}
    acts_cpu, cpu = _probe(info, text[:T], False, choice)
    acts, got = _probe(info, text[:T], True, choice, **kwargs)
    assert any((a["ids"] < 0).any() for a in acts.values())  # the scheduler saw skipped ids
    _agree(f"{where} decode T={T}", acts, got, acts_cpu, cpu, _stock(models, "deep-moe", text[:T]))


PEERS = {"ser": LoadChoice(full_budget=True, token_rule="ser", token_rule_value=0.3),
         "top-p": LoadChoice(full_budget=True, token_rule="top_p", token_rule_value=0.6)}


@pytest.mark.parametrize("T", [1, 64])
@pytest.mark.parametrize("rule", sorted(PEERS))
def test_ser_and_top_p_on_the_gpu(backend, models, rule, T):
    """The field's per-token rules (patch 0011) on deep-moe: the GPU drops candidates (id -1) and matches the CPU."""
    info, text = models["deep-moe"]
    acts_cpu, cpu = _probe(info, text[:T], False, PEERS[rule])
    acts, got = _probe(info, text[:T], True, PEERS[rule])
    _agree(f"{rule} T={T}", acts, got, acts_cpu, cpu, _stock(models, "deep-moe", text[:T]))
    assert any((a["ids"] < 0).any() for a in acts.values())  # candidates were dropped
    for layer, a in acts.items():
        assert abs(a["active"] - acts_cpu[layer]["active"]) <= max(2, ACTIVE_TOL * a["active"]), (layer, a)


def test_a_plan_switched_per_context_on_the_gpu(backend, models):
    """One GPU load at plan 0 (75 %); fresh contexts switched to plan 2 (25 %) and full budget run what the
    CPU runs for those choices."""
    info, text = models["deep-moe"]
    for context_choice in (LoadChoice(plan_index=2), LoadChoice(full_budget=True)):
        acts_cpu, cpu = _probe(info, text[:64], False, context_choice)
        acts, got = _probe(info, text[:64], True, LoadChoice(plan_index=0), context_choice)
        _agree(f"context switched to {context_choice}", acts, got, acts_cpu, cpu, _stock(models, "deep-moe", text[:64]))
        for layer, a in acts.items():
            assert a["active"] == acts_cpu[layer]["active"]
            assert a["active"] == 64 * 8 or not context_choice.full_budget
            assert (a["per_token"] is None) == context_choice.full_budget


def _graph_splits(capfd, info, choice: LoadChoice) -> list[str]:
    """The "splits = N" counts llama.cpp logs over one load, a 20-token ubatch and six single tokens."""
    capfd.readouterr()
    llm = load(info.path, choice, info=info, verbose=True, n_gpu_layers=99, n_ctx=640, n_batch=512, n_ubatch=512)
    try:
        llm.eval(list(range(10, 30)))
        for t in range(30, 36):
            llm.eval([t])
    finally:
        llm.close()
    log = capfd.readouterr().err
    found = re.findall(r"splits = (\d+)", log)
    assert found, log[-2000:]
    if "CUDA" in log:
        assert "CUDA graph warmup complete" in log or "CUDA Graph id" in log, "decode did not run as a CUDA graph"
        assert "disabling CUDA graphs" not in log
    return found


def test_a_plan_adds_no_graph_split(backend, models, capfd):
    """Per-layer counts, the batch rule, the decode rule, SER and top-p split the graph as the file at full budget
    does: no op of the budgeted graph falls back to the CPU."""
    for info, _ in models.values():
        full = _graph_splits(capfd, info, LoadChoice(full_budget=True))
        for mode, kwargs in MODES.items():
            assert _graph_splits(capfd, info, LoadChoice(plan_index=1, **kwargs)) == full, (info.path, mode)
        for rule, choice in PEERS.items():
            assert _graph_splits(capfd, info, choice) == full, (info.path, rule)


def _model_buffers(log: str) -> dict[str, float]:
    """MiB per buffer type from llama.cpp's "<type> model buffer size = X MiB" lines."""
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"(\S+) model buffer size = +([\d.]+) MiB", log)}


def test_cpu_moe_keeps_the_experts_in_system_memory(backend, tmp_path, capfd):
    """--cpu-moe on a GPU build: the routed experts leave the GPU's buffer for a CPU one, the
    logits stay those of the fully offloaded model, and the runtime says where the experts are."""
    from allocmoe_edge.gguf_meta import read_info
    from allocmoe_edge.graph_probe import moe_activations
    from allocmoe_edge.placement import expert_placement
    from allocmoe_edge.synth import synthesize

    info = read_info(synthesize("qwen3-30b-a3b", "q4_0", tmp_path / "qwen3-2.gguf", n_layer=2))
    tokens = np.random.default_rng(1).integers(3, 151936, 64).tolist()
    logits, buffers = {}, {}
    for cpu_moe in (False, True):
        capfd.readouterr()
        llm = load(info.path, None, info=info, verbose=True, cpu_moe=cpu_moe, n_gpu_layers=99, n_ctx=64,
                   n_batch=64, n_ubatch=64)
        _, logits[cpu_moe] = moe_activations(llm, tokens)
        llm.close()
        log = capfd.readouterr().err
        buffers[cpu_moe] = _model_buffers(log)
    placement = expert_placement(info, cpu_moe=True)
    assert "stay in system memory" in log and placement["cpu_blocks"] == [0, 1]
    on_gpu = {k: sum(v for name, v in b.items() if name.startswith(backend)) for k, b in buffers.items()}
    expert_mib = placement["cpu_expert_bytes"] / 2**20
    assert abs((on_gpu[False] - on_gpu[True]) - expert_mib) < 0.05 * expert_mib, (buffers, placement)
    top1 = float(np.mean(logits[True].argmax(axis=1) == logits[False].argmax(axis=1)))
    assert top1 >= TOP1_MIN, f"--cpu-moe vs full offload: top-1 agreement {top1:.4f}"


def test_run_eval_and_bench_offload_with_ngl(backend, bundled_budget_gguf, tmp_path):
    """`run`, `eval` and `bench` take -ngl on a GPU build: the same greedy text and counts as the CPU, eval rows
    within 1 % of the CPU's perplexity, and bench's JSON names the backend and the device that ran the layers."""
    from click.testing import CliRunner

    from allocmoe_edge.assets import ASSETS
    from allocmoe_edge.cli import cli
    from allocmoe_edge.hwinfo import cpu_model

    runner, path = CliRunner(), str(bundled_budget_gguf)
    runs, evals = {}, {}
    text = tmp_path / "text.txt"
    text.write_text((ASSETS / "heldout.txt").read_text()[:6000])
    for ngl in ("0", "99"):
        res = runner.invoke(cli, ["run", path, "-p", "Once upon a time", "-n", "24", "-ngl", ngl, "--json"])
        assert res.exit_code == 0, res.output
        runs[ngl] = json.loads(res.stdout)
        out = tmp_path / f"eval-{ngl}.json"
        res = runner.invoke(cli, ["eval", path, "--text", str(text), "--ctx", "128", "--chunks", "2",
                                  "--budgets", "0.5", "-ngl", ngl, "--json", str(out)])
        assert res.exit_code == 0, res.output
        evals[ngl] = {row["name"]: row for row in json.loads(out.read_text())["results"]}
    assert runs["99"]["text"] == runs["0"]["text"] and runs["99"]["layer_counts"] == runs["0"]["layer_counts"]
    assert evals["99"].keys() == evals["0"].keys()
    for name, row in evals["99"].items():
        assert abs(row["ppl"] / evals["0"][name]["ppl"] - 1) < 0.01, (name, row["ppl"], evals["0"][name]["ppl"])
    out = tmp_path / "bench.json"
    res = runner.invoke(cli, ["bench", path, "--budgets", "1,0.5", "-p", "16", "-n", "4", "--reps", "1", "-ngl", "99",
                              "--json", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    gpu = next(d for d in result["devices"] if d["backend"] == backend)
    assert result["backend"] == backend and result["device"] == gpu["description"] != cpu_model()
    assert result["n_gpu_layers"] == 99 and not result["failed"]
