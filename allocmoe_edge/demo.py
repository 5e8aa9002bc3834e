"""The whole Alloc-MoE pipeline on one model, with a report: what `allocmoe demo` runs.

Steps: profile the layer sensitivities on the calibration text; allocate Alloc-L+T plans at
12.5, 25, 50 and 75 % of the full budget (a budget below one expert per MoE layer is left
out); convert to one q8_0 GGUF holding the plans (the 50 % plan is the default); evaluate
every configuration with llama.cpp on the held-out text; measure speed; write ``report.md``,
``frontier.png`` and the JSON.

Speed is `bench`'s protocol (interleaved repetitions, mean ± sd, a speedup within the noise
is a tie). A model that reads fewer than ``SPEED_MIN_BYTES`` of weights per generated token
(the bundled ones read a few MiB) is bound by per-operation overhead and caches on a CPU,
not by the bytes a budget saves, so its speed would mean nothing: the demo says so and
measures a synthetic file of a real shape instead (`synth`, ``SPEED_SHAPE`` cut to
``speed_layers`` blocks, random weights), with bench's uniform-split plans at the same budget
fractions. Quality rows carry the deterministic decode limit of the demo's own file.

``manifest.json`` in the output folder records, for the sensitivity file, the GGUF and the
synthetic speed file, the sha256 of the inputs each was made from (model files, calibration
text, plans, shape), the settings and the tool version, plus the artefact's own sha256. A rerun
reuses an artefact whose inputs are unchanged and resumes an interrupted profile; measurements
always run again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from . import __version__
from .errors import AllocMoeError
from .fsutil import atomic_write_json, atomic_write_text, sha256_file

MANIFEST_FORMAT = "allocmoe-demo-manifest"
MANIFEST_VERSION = 1
TOOL = f"allocmoe-edge {__version__}"
BUDGETS = (0.125, 0.25, 0.5, 0.75)
DEFAULT_BUDGET = 0.5  # the plan the GGUF runs by default
METHOD = "alloc-l+t"
PROFILE_MODE = "isolated"
OUTTYPE = "q8_0"
STEPS = ("profile", "allocate", "convert", "eval", "bench", "report")
SPEED_MIN_BYTES = 64 << 20  # weight bytes per generated token below which CPU speed is overhead bound
SPEED_SHAPE = "olmoe-1b-7b"  # the synthetic shape measured instead of a model that small
SPEED_TYPE = "q4_0"


@dataclass(frozen=True)
class DemoSettings:
    """How much text and time each measurement gets."""

    name: str
    ctx: int  # tokens per calibration window and per evaluation chunk
    calib_tokens: int  # calibration tokens profiled
    eval_chunks: int  # held-out chunks evaluated
    reps: int  # timed bench repetitions per test (at least 2: the sd decides ties)
    n_prompt: int  # tokens of the pp test
    n_gen: int  # tokens of the tg test
    speed_layers: int  # blocks of the synthetic SPEED_SHAPE file measured instead of a small model


FULL = DemoSettings("full", ctx=256, calib_tokens=8192, eval_chunks=32, reps=5, n_prompt=256, n_gen=32,
                    speed_layers=4)
QUICK = DemoSettings("quick", ctx=128, calib_tokens=1024, eval_chunks=4, reps=2, n_prompt=32, n_gen=8,
                     speed_layers=1)


@dataclass(frozen=True)
class DemoResult:
    """What a demo run leaves: its folder, the quality rows, the quality and speed tables and each
    step's status and time."""

    out: Path
    rows: list[dict[str, Any]]
    table: str
    steps: dict[str, dict[str, Any]]
    seconds: float


def model_hashes(model_dir: Path) -> dict[str, str]:
    """sha256 of every file of a model directory, by path relative to it."""
    return {p.relative_to(model_dir).as_posix(): sha256_file(p) for p in sorted(model_dir.rglob("*")) if p.is_file()}


class Manifest:
    """``manifest.json``: per artefact, the inputs it was made from, whether it is complete, its sha256."""

    def __init__(self, out: Path) -> None:
        from .plan import read_json

        self.path = out / "manifest.json"
        try:
            doc = read_json(self.path, "demo manifest") if self.path.is_file() else None
        except AllocMoeError:  # unreadable: start afresh, which only costs recomputation
            doc = None
        if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
            doc = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "artefacts": {}}
        self.doc = doc
        self.out = out

    @contextlib.contextmanager
    def artefact(self, name: str, inputs: dict[str, Any], resume: bool = False) -> Iterator[str]:
        """Make ``name`` (a file in the output folder) from ``inputs`` in the body, recorded here.

        Yields "reused" when ``name`` is complete, made from the same ``inputs`` and unchanged since (the
        body does no work); "resumed" when ``resume`` is set and an unfinished ``name`` was started from
        the same ``inputs``; else "made" (with ``resume``, a leftover file is removed first). Records the
        inputs before the body and, after it succeeds, that ``name`` is complete, with its sha256.
        """
        path = self.out / name
        entry = self.doc["artefacts"].get(name)
        same = isinstance(entry, dict) and entry.get("inputs") == inputs
        if same and entry.get("complete") and path.is_file() and sha256_file(path) == entry.get("sha256"):
            yield "reused"
            return
        status = "resumed" if resume and same and not entry.get("complete") and path.is_file() else "made"
        if resume and status == "made":
            path.unlink(missing_ok=True)
        self.doc["artefacts"][name] = {"inputs": inputs, "complete": False}
        self.save()
        yield status
        self.doc["artefacts"][name].update(complete=True, sha256=sha256_file(path))
        self.save()

    def record_run(self, settings: DemoSettings, steps: dict[str, dict[str, Any]], seconds: float) -> dict[str, Any]:
        """Record the run that just ended as ``last_run`` (date, settings, steps, seconds, tool) and return it."""
        self.doc["last_run"] = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "settings": dataclasses.asdict(settings), "steps": steps, "seconds": seconds, "tool": TOOL,
        }
        self.save()
        return self.doc["last_run"]

    def save(self) -> None:
        atomic_write_json(self.path, self.doc)


def float32_copy(model_dir: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """``model_dir``'s checkpoint saved in float32 (with its tokenizer) to ``dst``: the same weights, which
    torch runs several times faster than bf16 on CPUs without bf16 matrix units."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(dst)
    return Path(dst)


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the converter runs as one)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def speed_policy(gguf: Path, speed_layers: int) -> tuple[bool, str]:
    """Whether ``gguf``'s own speed means something (it reads at least ``SPEED_MIN_BYTES`` of weights per
    token at full budget; else the synthetic ``SPEED_SHAPE`` file of ``speed_layers`` blocks is measured),
    and the report's sentence on which file is measured and why."""
    from .bench import WeightTraffic
    from .gguf_meta import read_info
    from .synth import SHAPES

    info = read_info(gguf)
    per_token = WeightTraffic.of(gguf, info).per_token((info.expert_used_count,) * len(info.moe_layers))
    mib = f"{per_token / 2**20:.1f} MiB"
    if per_token >= SPEED_MIN_BYTES:
        return True, f"Speed: {gguf.name} itself ({mib} of weights read per token at full budget)."
    shape = SHAPES[SPEED_SHAPE]
    return False, (
        f"Speed is not measured on {gguf.name}: it reads {mib} of weights per generated token at full "
        f"budget (below {SPEED_MIN_BYTES >> 20} MiB), so on a CPU its speed is set by per-operation overhead "
        f"and caches, not by the weight bytes a budget saves. It is measured instead on a synthetic "
        f"{shape.title} ({speed_layers} of its {shape.n_layer} blocks, {SPEED_TYPE}, random "
        f"weights) with bench's uniform-split plans at the same budget fractions (the budget's count spread "
        f"evenly over the layers): the demo's own plans are for another shape and cannot be stamped into it.")


class DemoPipeline:
    """The demo's steps on one model, called in order by `run_demo`: the output folder, the inputs, the
    manifest, the console and each step's record (status, seconds)."""

    def __init__(self, out: Path, settings: DemoSettings, model_dir: Path, pre_tokenizer: str | None, calib: Path,
                 heldout: Path, console: Console) -> None:
        self.out, self.settings, self.console = out, settings, console
        self.model_dir, self.pre_tokenizer, self.calib, self.heldout = model_dir, pre_tokenizer, calib, heldout
        self.manifest = Manifest(out)
        self.steps: dict[str, dict[str, Any]] = {}
        self.sensitivity = out / "sensitivity.json"
        self.budgets: tuple[float, ...] = BUDGETS  # the feasible ones, once allocate has run
        self.gguf = out / f"{model_dir.name}-{OUTTYPE}.gguf"
        self.model_files = model_hashes(model_dir)

    @property
    def plans(self) -> list[Path]:
        return [self.out / f"plan-{100 * b:g}.json" for b in self.budgets]

    @contextlib.contextmanager
    def step(self, key: str, what: str) -> Iterator[dict[str, Any]]:
        """Announce step ``key``, time it and keep its status (the body may set it to "reused")."""
        self.console.print(f"[bold]\\[{STEPS.index(key) + 1}/{len(STEPS)}] {key}[/bold]: {escape(what)}",
                           highlight=False, soft_wrap=True)
        record = {"status": "made"}
        start, cpu = time.monotonic(), _cpu_seconds()
        yield record
        record.update(seconds=round(time.monotonic() - start, 2), cpu_seconds=round(_cpu_seconds() - cpu, 2))
        self.steps[key] = record

    def say(self, message: str) -> None:
        self.console.print(f"      {escape(message)}", highlight=False, soft_wrap=True)

    def progress(self) -> Progress:
        return Progress(TextColumn("      {task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=True)

    # ------------------------------------------------------------ steps

    def profile(self) -> None:
        from .profile import run_profile

        s = self.settings
        inputs = {"model": self.model_files, "calib": sha256_file(self.calib), "tool": TOOL,
                  "settings": {"mode": PROFILE_MODE, "ctx": s.ctx, "max_tokens": s.calib_tokens}}
        name = self.sensitivity.name
        with self.step("profile", f"S[l, k] of every MoE layer on {self.calib.name} (up to {s.calib_tokens} "
                                  f"tokens, windows of {s.ctx}; float32 weights) -> {name}") as rec:
            with self.manifest.artefact(name, inputs, resume=True) as status:
                rec["status"] = status
                if status == "reused":
                    self.say(f"reused {name}: model files, calibration text and settings unchanged")
                    return
                if status == "resumed":
                    self.say(f"resuming the interrupted profile in {name}")
                with self.progress() as bar, tempfile.TemporaryDirectory(prefix="allocmoe-f32-") as tmp:
                    task = bar.add_task("layer forwards", total=None)
                    doc = run_profile(float32_copy(self.model_dir, tmp), self.calib, self.sensitivity,
                                      mode=PROFILE_MODE, ctx=s.ctx, max_tokens=s.calib_tokens,
                                      on_start=lambda n: bar.update(task, total=n),
                                      on_progress=lambda n: bar.advance(task, n))
            self.say(f"{len(doc['layers'])} MoE layers x k=1..{doc['model']['k_orig']}, "
                     f"{doc['calibration']['n_tokens']} tokens, full-budget PPL {doc['full']['ppl']:.3f}")

    def allocate(self) -> None:
        from . import sensitivity
        from .allocate import plan_from_sensitivity

        budgets = ", ".join(f"{100 * b:g}%" for b in BUDGETS)
        with self.step("allocate", f"{METHOD} plans at {budgets} of the full budget (DP on mean KLD)"):
            sens = sensitivity.read(self.sensitivity)
            source = {"sensitivity_file": self.sensitivity.name, "sensitivity_sha256": sha256_file(self.sensitivity)}
            plans, skipped = [], []
            for budget in BUDGETS:
                try:
                    plans.append(plan_from_sensitivity(sens, budget, METHOD))
                except AllocMoeError as e:  # below one expert per MoE layer
                    skipped.append(f"{100 * budget:g}% ({e})")
            if skipped:
                self.say(f"left out {'; '.join(skipped)}")
            self.budgets = tuple(p.budget.fraction for p in plans)
            if DEFAULT_BUDGET not in self.budgets:
                raise AllocMoeError(f"no plan at the default budget {DEFAULT_BUDGET:g}: {'; '.join(skipped)}")
            for plan, path in zip(plans, self.plans):
                plan = dataclasses.replace(plan, calibration={**plan.calibration, **source})
                plan.save(path)
                self.say(f"{path.name}: {plan.budget.count} of {plan.model.full_budget} activations/token, "
                         f"counts {list(plan.counts)}, predicted KLD {plan.predicted['kld']:.4f}")

    def convert(self) -> None:
        from .convert import build_budgeted_gguf

        default = self.budgets.index(DEFAULT_BUDGET)
        inputs = {"model": self.model_files, "plans": {p.name: sha256_file(p) for p in self.plans},
                  "outtype": OUTTYPE, "default_plan": default, "pre_tokenizer": self.pre_tokenizer, "tool": TOOL}
        name = self.gguf.name
        with self.step("convert", f"llama.cpp's converter -> {OUTTYPE}, stamp the {len(self.plans)} plans "
                                  f"(default {self.plans[default].stem}) -> {name}") as rec:
            with self.manifest.artefact(name, inputs) as status:
                rec["status"] = status
                if status == "reused":
                    self.say(f"reused {name}: model files, plans and weight type unchanged")
                    return
                with self.progress() as bar:
                    task = bar.add_task("converting", total=None)
                    build_budgeted_gguf(self.model_dir, [str(p) for p in self.plans], self.gguf, OUTTYPE, default,
                                        pre_tokenizer=self.pre_tokenizer, log=self.say,
                                        progress=lambda done, total: bar.update(task, description="writing",
                                                                                completed=done, total=total))
            self.say(f"{name}: {self.gguf.stat().st_size / 2**20:.1f} MiB")

    def evaluate(self) -> dict[str, Any]:
        from .evaluate import evaluate_llama

        s = self.settings
        with self.step("eval", f"PPL, KLD and top-1 on {self.heldout.name} (up to {s.eval_chunks} chunks of "
                               f"{s.ctx} tokens): full budget, plans with Alloc-T on/off, uniform top-k"):
            with self.progress() as bar:
                task = bar.add_task("loading", total=None)
                result = evaluate_llama(
                    self.gguf, self.heldout, ctx=s.ctx, chunks=s.eval_chunks, budgets=list(self.budgets),
                    progress=lambda name, done, total: bar.update(task, description=name, completed=done, total=total))
            atomic_write_json(self.out / "eval.json", result)
            self.say(f"{len(result['results'])} configurations x {result['chunks']} chunks -> eval.json")
        return result

    def synthetic(self) -> Path:
        """The synthetic speed file in the output folder, written once and reused while its recipe holds."""
        from .synth import synthesize

        layers = self.settings.speed_layers
        path = self.out / f"synthetic-{SPEED_SHAPE}-{layers}l-{SPEED_TYPE}.gguf"
        inputs = {"shape": SPEED_SHAPE, "layers": layers, "type": SPEED_TYPE, "seed": 0, "tool": TOOL}
        with self.manifest.artefact(path.name, inputs) as status:
            if status == "reused":
                self.say(f"reused {path.name}")
            else:
                with self.progress() as bar:
                    task = bar.add_task(f"writing {path.name}", total=None)
                    synthesize(SPEED_SHAPE, SPEED_TYPE, path, layers,
                               progress=lambda done, total: bar.update(task, completed=done, total=total))
        return path

    def bench(self) -> tuple[dict[str, Any], str]:
        from .bench import BenchOptions, bench

        s = self.settings
        opts = BenchOptions(budgets=self.budgets, reps=s.reps, prompts=(s.n_prompt,), n_gen=s.n_gen)
        with self.step("bench", f"pp{s.n_prompt} / tg{s.n_gen} tokens/s, {s.reps} interleaved repetitions, "
                                "mean ± sd, ties within the noise") as rec:
            measure_own, note = speed_policy(self.gguf, s.speed_layers)
            target = self.gguf if measure_own else self.synthetic()
            rec["model"] = target.name
            self.say(note)
            with self.progress() as bar:
                task = bar.add_task("loading", total=None)
                result = bench(target, opts, log=lambda message: None, progress=lambda name, done, total:
                               bar.update(task, description=name, completed=done, total=total))
            atomic_write_json(self.out / "bench.json", result)
            if result["failed"]:
                self.say(f"warning: no speed for {', '.join(result['failed'])} (errors in bench.json)")
            self.say(f"{len(result['rows'])} configurations of {target.name}, backend {result['backend']}, "
                     f"threads {result['threads']}/{result['threads_batch']} -> bench.json")
        return result, note

    def report(self, eval_result: dict[str, Any], bench_result: dict[str, Any], speed_note: str,
               started: float) -> DemoResult:
        from .presentation import demo_quality_table, demo_report, plot_frontier, speed_table

        with self.step("report", "report.md (quality and speed tables), frontier.png"):
            rows = quality_rows(self.gguf, eval_result, self.budgets)
            table = f"{demo_quality_table(rows)}\n\n{speed_table(bench_result)}"
            try:
                plot_frontier(eval_result, bench_result, self.out / "frontier.png", "tg",
                              decode_limits={r["config"]: r["decode_limit"] for r in rows})
            except ImportError:
                self.say("matplotlib is not installed: no frontier.png (pip install 'allocmoe-edge[plot]')")
        seconds = round(time.monotonic() - started, 1)
        run = self.manifest.record_run(self.settings, self.steps, seconds)
        report = demo_report(self.model_dir.name, run, rows, eval_result, bench_result, speed_note, method=METHOD,
                             profile_mode=PROFILE_MODE, gguf=self.gguf.name, heldout=self.heldout.name,
                             files=[p.name for p in (self.sensitivity, *self.plans, self.gguf)])
        atomic_write_text(self.out / "report.md", report)
        return DemoResult(self.out, rows, table, self.steps, seconds)


def quality_rows(gguf: Path, eval_result: dict[str, Any], budgets: tuple[float, ...]) -> list[dict[str, Any]]:
    """One row per evaluated configuration with its decode limit (bench's bytes-per-token ratio for
    the counts it runs at T = 1). ``budget_count`` is a plan's budget, or the activations of a
    full-budget / uniform row."""
    from .bench import WeightTraffic, decode_limits
    from .evaluate import gguf_configurations
    from .gguf_meta import read_info

    info = read_info(gguf)
    plans = {c.name: info.plans[c.plan] for c in gguf_configurations(info, budgets) if c.plan is not None}
    traffic = WeightTraffic.of(gguf, info)
    full = (info.expert_used_count,) * len(info.moe_layers)
    rows = []
    for e in eval_result["results"]:
        plan = plans.get(e["name"])
        count = plan.budget_count if plan else int(e["activations_per_token"])
        rows.append({
            "config": e["name"], "method": e["method"], "alloc_t": e["alloc_t"],
            "budget": plan.budget if plan else count / info.full_budget, "budget_count": count,
            "activations_per_token": e["activations_per_token"], "ppl": e["ppl"], "kld_mean": e["kld_mean"],
            "kld_p99": e["kld_p99"], "top1": e["top1"],
            "decode_limit": decode_limits(traffic, full, tuple(e["counts"]), ())["decode_limit"],
        })
    return rows


def require_patched_runtime() -> None:
    """Raise unless the patched llama-cpp-python is installed (checked before any slow step)."""
    from .runtime import patch_version

    if patch_version() is None:  # a missing or broken llama_cpp raises runtime's own AllocMoeError
        raise AllocMoeError("the installed llama-cpp-python is a stock build, which would run every budget plan "
                            "at full budget; run `allocmoe build-runtime`")


def run_demo(out: str | os.PathLike[str] = "allocmoe-demo", quick: bool = False, model: str | None = None,
             model_dir: str | os.PathLike[str] | None = None, pre_tokenizer: str | None = None,
             calib: str | os.PathLike[str] | None = None, heldout: str | os.PathLike[str] | None = None,
             console: Console | None = None, settings: DemoSettings | None = None) -> DemoResult:
    """Run every step into ``out``. The model is ``model_dir`` (converted with ``pre_tokenizer``) or the
    bundled ``model`` (default `assets.DEMO_MODEL`); the texts default to the bundled ones; ``settings``
    default to QUICK or FULL."""
    from . import assets

    started = time.monotonic()
    require_patched_runtime()
    if model_dir is None:
        model = model or assets.DEMO_MODEL
        model_dir, pre_tokenizer = assets.model_dir(model), assets.pre_tokenizer(model)
    model_dir = Path(model_dir)
    calib = Path(calib) if calib is not None else assets.calib_text()
    heldout = Path(heldout) if heldout is not None else assets.heldout_text()
    for path in (model_dir / "config.json", calib, heldout):
        if not path.is_file():
            raise AllocMoeError(f"{path}: no such file")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = settings or (QUICK if quick else FULL)
    run = DemoPipeline(out, settings, model_dir, pre_tokenizer, calib, heldout, console or Console(file=sys.stderr))
    run.console.print(escape(f"allocmoe demo: {model_dir} -> {out} ({settings.name} settings)"), highlight=False,
                      soft_wrap=True)
    run.profile()
    run.allocate()
    run.convert()
    eval_result = run.evaluate()
    bench_result, speed_note = run.bench()
    return run.report(eval_result, bench_result, speed_note, started)
