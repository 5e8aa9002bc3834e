"""The whole Alloc-MoE pipeline on one model, with a report: what `allocmoe demo` runs.

Steps: profile the layer sensitivities on the calibration text; allocate Alloc-L+T plans at
25, 50 and 75 % of the full budget; convert to one q8_0 GGUF holding the three plans (the
50 % plan is the default); evaluate every configuration with llama.cpp on the held-out text;
benchmark the same configurations; write ``report.md``, ``frontier.png`` and the JSON.

``manifest.json`` in the output folder records, for the sensitivity file and the GGUF, the
sha256 of the inputs each was made from (model files, calibration text, plans), the settings
and the tool version, plus the artefact's own sha256. A rerun reuses an artefact whose
inputs are unchanged and resumes an interrupted profile; measurements always run again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from . import __version__
from .errors import AllocMoeError
from .fsutil import atomic_write_json, atomic_write_text

MANIFEST_FORMAT = "allocmoe-demo-manifest"
MANIFEST_VERSION = 1
TOOL = f"allocmoe-edge {__version__}"
BUDGETS = (0.25, 0.5, 0.75)
DEFAULT_PLAN = 1  # index of the 50 % plan in BUDGETS
METHOD = "alloc-l+t"
PROFILE_MODE = "isolated"
OUTTYPE = "q8_0"
STEPS = ("profile", "allocate", "convert", "eval", "bench", "report")


@dataclass(frozen=True)
class DemoSettings:
    """How much text and time each measurement gets."""

    name: str
    ctx: int  # tokens per calibration window and per evaluation chunk
    calib_tokens: int  # calibration tokens profiled
    eval_chunks: int  # held-out chunks evaluated
    reps: int  # timed bench repetitions per test
    n_prompt: int  # tokens of the pp test
    n_gen: int  # tokens of the tg test


FULL = DemoSettings("full", ctx=256, calib_tokens=8192, eval_chunks=32, reps=3, n_prompt=512, n_gen=128)
QUICK = DemoSettings("quick", ctx=128, calib_tokens=1024, eval_chunks=4, reps=1, n_prompt=64, n_gen=16)


@dataclass(frozen=True)
class DemoResult:
    """What a demo run leaves: its folder, the combined table and each step's status and time."""

    out: Path
    rows: list[dict[str, Any]]
    table: str
    steps: dict[str, dict[str, Any]]
    seconds: float


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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

    def _entry(self, name: str, inputs: dict[str, Any]) -> dict[str, Any] | None:
        entry = self.doc["artefacts"].get(name)
        return entry if isinstance(entry, dict) and entry.get("inputs") == inputs else None

    def reusable(self, name: str, inputs: dict[str, Any]) -> bool:
        """True when ``name`` is complete, made from ``inputs`` and unchanged since."""
        entry = self._entry(name, inputs)
        path = self.out / name
        return bool(entry and entry.get("complete") and path.is_file() and sha256_file(path) == entry.get("sha256"))

    def resumable(self, name: str, inputs: dict[str, Any]) -> bool:
        """True when an unfinished ``name`` was started from the same ``inputs``."""
        entry = self._entry(name, inputs)
        return bool(entry and not entry.get("complete") and (self.out / name).is_file())

    def begin(self, name: str, inputs: dict[str, Any]) -> None:
        """Record that ``name`` is being made from ``inputs``."""
        self.doc["artefacts"][name] = {"inputs": inputs, "complete": False}
        self.save()

    def finish(self, name: str) -> None:
        """Record that ``name`` is complete, with its sha256."""
        self.doc["artefacts"][name].update(complete=True, sha256=sha256_file(self.out / name))
        self.save()

    def save(self) -> None:
        atomic_write_json(self.path, self.doc)


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the converter runs as one)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class _Run:
    """One demo run: the output folder, its inputs, the manifest and the console."""

    def __init__(self, out: Path, settings: DemoSettings, model_dir: Path, calib: Path, heldout: Path,
                 console: Console) -> None:
        self.out, self.settings, self.console = out, settings, console
        self.model_dir, self.calib, self.heldout = model_dir, calib, heldout
        self.manifest = Manifest(out)
        self.steps: dict[str, dict[str, Any]] = {}
        self.sensitivity = out / "sensitivity.json"
        self.plans = [out / f"plan-{round(100 * b)}.json" for b in BUDGETS]
        self.gguf = out / f"{model_dir.name}-{OUTTYPE}.gguf"
        self.model_files = model_hashes(model_dir)

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
        with self.step("profile", f"S[l, k] of every MoE layer on {self.calib.name} "
                                  f"(up to {s.calib_tokens} tokens, windows of {s.ctx}) -> {name}") as rec:
            if self.manifest.reusable(name, inputs):
                rec["status"] = "reused"
                self.say(f"reused {name}: model files, calibration text and settings unchanged")
                return
            if self.manifest.resumable(name, inputs):
                rec["status"] = "resumed"
                self.say(f"resuming the interrupted profile in {name}")
            else:
                self.sensitivity.unlink(missing_ok=True)
            self.manifest.begin(name, inputs)
            with self.progress() as bar:
                task = bar.add_task("layer forwards", total=None)
                doc = run_profile(self.model_dir, self.calib, self.sensitivity, mode=PROFILE_MODE, ctx=s.ctx,
                                  max_tokens=s.calib_tokens, on_start=lambda n: bar.update(task, total=n),
                                  on_progress=lambda n: bar.advance(task, n))
            self.manifest.finish(name)
            self.say(f"{len(doc['layers'])} MoE layers x k=1..{doc['model']['k_orig']}, "
                     f"{doc['calibration']['n_tokens']} tokens, full-budget PPL {doc['full']['ppl']:.3f}")

    def allocate(self) -> None:
        from .allocate import plan_from_sensitivity
        from .plan import read_json

        budgets = ", ".join(f"{round(100 * b)}%" for b in BUDGETS)
        with self.step("allocate", f"{METHOD} plans at {budgets} of the full budget (DP on mean KLD)"):
            sens = read_json(self.sensitivity, "sensitivity file")
            source = {"sensitivity_file": self.sensitivity.name, "sensitivity_sha256": sha256_file(self.sensitivity)}
            for budget, path in zip(BUDGETS, self.plans):
                plan = plan_from_sensitivity(sens, budget, METHOD)
                plan = dataclasses.replace(plan, calibration={**plan.calibration, **source})
                plan.save(path)
                self.say(f"{path.name}: {plan.budget.count} of {plan.model.full_budget} activations/token, "
                         f"counts {list(plan.counts)}, predicted KLD {plan.predicted['kld']:.4f}")

    def convert(self) -> None:
        from .convert import build_budgeted_gguf

        inputs = {"model": self.model_files, "plans": {p.name: sha256_file(p) for p in self.plans},
                  "outtype": OUTTYPE, "default_plan": DEFAULT_PLAN, "tool": TOOL}
        name = self.gguf.name
        with self.step("convert", f"llama.cpp's converter -> {OUTTYPE}, stamp the {len(self.plans)} plans "
                                  f"(default {self.plans[DEFAULT_PLAN].stem}) -> {name}") as rec:
            if self.manifest.reusable(name, inputs):
                rec["status"] = "reused"
                self.say(f"reused {name}: model files, plans and weight type unchanged")
                return
            self.manifest.begin(name, inputs)
            with self.progress() as bar:
                task = bar.add_task("converting", total=None)
                build_budgeted_gguf(self.model_dir, [str(p) for p in self.plans], self.gguf, OUTTYPE, DEFAULT_PLAN,
                                    log=self.say,
                                    progress=lambda done, total: bar.update(task, description="writing",
                                                                            completed=done, total=total))
            self.manifest.finish(name)
            self.say(f"{name}: {self.gguf.stat().st_size / 2**20:.1f} MiB")

    def evaluate(self) -> dict[str, Any]:
        from .evaluate import evaluate_llama

        s = self.settings
        with self.step("eval", f"PPL, KLD and top-1 on {self.heldout.name} (up to {s.eval_chunks} chunks of "
                               f"{s.ctx} tokens): full budget, plans with Alloc-T on/off, uniform top-k"):
            with self.progress() as bar:
                task = bar.add_task("loading", total=None)
                result = evaluate_llama(
                    self.gguf, self.heldout, ctx=s.ctx, chunks=s.eval_chunks, budgets=list(BUDGETS),
                    progress=lambda name, done, total: bar.update(task, description=name, completed=done, total=total))
            atomic_write_json(self.out / "eval.json", result)
            self.say(f"{len(result['results'])} configurations x {result['chunks']} chunks -> eval.json")
        return result

    def bench(self) -> dict[str, Any]:
        from .bench import BenchOptions, bench

        s = self.settings
        opts = BenchOptions(budgets=BUDGETS, reps=s.reps, prompts=(s.n_prompt,), n_gen=s.n_gen)
        with self.step("bench", f"pp{s.n_prompt} / tg{s.n_gen} tokens/s, {s.reps} repetition(s), same configurations"):
            with self.progress() as bar:
                task = bar.add_task("loading", total=None)
                result = bench(self.gguf, opts, log=lambda message: None, progress=lambda name, done, total:
                               bar.update(task, description=name, completed=done, total=total))
            atomic_write_json(self.out / "bench.json", result)
            if result["failed"]:
                self.say(f"warning: no speed for {', '.join(result['failed'])} (errors in bench.json)")
            self.say(f"{len(result['rows'])} configurations, backend {result['backend']}, "
                     f"threads {result['threads']}/{result['threads_batch']} -> bench.json")
        return result

    def report(self, eval_result: dict[str, Any], bench_result: dict[str, Any], started: float) -> DemoResult:
        from .bench import plot_frontier

        with self.step("report", "report.md (combined table), frontier.png"):
            rows = combined_rows(self.gguf, eval_result, bench_result)
            table = markdown(rows, bench_result["options"])
            try:
                plot_frontier(eval_result, bench_result, self.out / "frontier.png", "tg")
            except ImportError:
                self.say("matplotlib is not installed: no frontier.png (pip install 'allocmoe-edge[plot]')")
        seconds = round(time.monotonic() - started, 1)
        self.manifest.doc["last_run"] = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "settings": dataclasses.asdict(self.settings), "steps": self.steps, "seconds": seconds, "tool": TOOL,
        }
        self.manifest.save()
        atomic_write_text(self.out / "report.md", self._report_md(table, eval_result, bench_result))
        return DemoResult(self.out, rows, table, self.steps, seconds)

    def _report_md(self, table: str, eval_result: dict[str, Any], bench_result: dict[str, Any]) -> str:
        s, run = self.settings, self.manifest.doc["last_run"]
        steps = "\n".join(f"| {k} | {v['status']} | {v['seconds']:.1f} | {v['cpu_seconds']:.1f} |"
                          for k, v in self.steps.items())
        files = [self.sensitivity, *self.plans, self.gguf]
        return f"""# allocmoe demo: {self.model_dir.name}

{run['date']}, {TOOL}, {s.name} settings, backend {bench_result['backend']}, \
threads {bench_result['threads']}/{bench_result['threads_batch']}, commit {bench_result['commit'] or 'unknown'}.
Plans: {METHOD} (DP on the mean KL divergence of {PROFILE_MODE} layer profiles), \
stored together in {self.gguf.name}.

{table}

Quality: {eval_result['chunks']} chunks of {eval_result['ctx']} tokens of {self.heldout.name} \
({eval_result['chunks'] * eval_result['scored_per_chunk']} scored tokens, llama-perplexity's protocol); \
KLD and top-1 agreement are against the full-budget model. Speed: llama-bench style, mean of {s.reps} run(s); \
speedups are over full budget in the same run. Decode limit: full-budget weight bytes read per generated \
token divided by the row's.

![quality vs speed](frontier.png)

| step | status | seconds | CPU seconds |
|---|---|---:|---:|
{steps}

Total {run['seconds']:.1f} s. Files: {', '.join(p.name for p in files)}, eval.json, bench.json, \
frontier.png, manifest.json.
"""


def combined_rows(gguf: Path, eval_result: dict[str, Any], bench_result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per configuration joining quality (eval) and speed (bench) by configuration name.

    ``budget_count`` is a plan's budget, or the activations of a full-budget / uniform row.
    """
    from .bench import headline
    from .evaluate import gguf_configurations
    from .gguf_meta import read_info

    info = read_info(gguf)
    plans = {c.name: info.plans[c.plan] for c in gguf_configurations(info, BUDGETS) if c.plan is not None}
    speed = {r["name"]: r for r in bench_result["rows"]}
    rows = []
    for e in eval_result["results"]:
        b = speed.get(e["name"], {})
        plan = plans.get(e["name"])
        count = plan.budget_count if plan else int(e["activations_per_token"])
        rows.append({
            "config": e["name"], "method": e["method"], "alloc_t": e["alloc_t"],
            "budget": plan.budget if plan else count / info.full_budget, "budget_count": count,
            "activations_per_token": e["activations_per_token"], "ppl": e["ppl"], "kld_mean": e["kld_mean"],
            "kld_p99": e["kld_p99"], "top1": e["top1"],
            **headline(b), "decode_limit": b.get("decode_limit"),
        })
    return rows


def markdown(rows: list[dict[str, Any]], bench_options: dict[str, Any]) -> str:
    """The combined quality and speed table."""

    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    p, n = bench_options["prompts"][0], bench_options["n_gen"]
    head = ["config", "budget", "act/token", "PPL", "KLD mean", "KLD p99", "top-1 %", f"pp{p} t/s", f"tg{n} t/s",
            "speedup pp", "speedup tg", "decode limit"]
    lines = ["| " + " | ".join(head) + " |", "|---|---:" + "|---:" * (len(head) - 2) + "|"]
    for r in rows:
        cells = [r["config"], f"{100 * r['budget']:.0f}% ({r['budget_count']})", f"{r['activations_per_token']:g}",
                 f"{r['ppl']:.3f}", f"{r['kld_mean']:.5f}", f"{r['kld_p99']:.4f}", f"{100 * r['top1']:.2f}",
                 num(r["pp_ts"], ".1f"), num(r["tg_ts"], ".1f"), num(r["speedup_pp"], ".2f") + "x",
                 num(r["speedup_tg"], ".2f") + "x", num(r["decode_limit"], ".2f") + "x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def require_patched_runtime() -> None:
    """Raise unless the patched llama-cpp-python is installed (checked before any slow step)."""
    from .runtime import patch_version

    if patch_version() is None:  # a missing or broken llama_cpp raises runtime's own AllocMoeError
        raise AllocMoeError("the installed llama-cpp-python is a stock build, which would run every budget plan "
                            "at full budget; run `allocmoe build-runtime`")


def run_demo(out: str | os.PathLike[str] = "allocmoe-demo", quick: bool = False,
             model_dir: str | os.PathLike[str] | None = None, calib: str | os.PathLike[str] | None = None,
             heldout: str | os.PathLike[str] | None = None, console: Console | None = None) -> DemoResult:
    """Run every step into ``out`` (default inputs: the bundled model and its texts)."""
    from . import assets

    started = time.monotonic()
    require_patched_runtime()
    model_dir = Path(model_dir) if model_dir is not None else assets.model_dir()
    calib = Path(calib) if calib is not None else assets.calib_text()
    heldout = Path(heldout) if heldout is not None else assets.heldout_text()
    for path in (model_dir / "config.json", calib, heldout):
        if not path.is_file():
            raise AllocMoeError(f"{path}: no such file")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run = _Run(out, QUICK if quick else FULL, model_dir, calib, heldout, console or Console(file=sys.stderr))
    run.console.print(escape(f"allocmoe demo: {model_dir} -> {out} ({run.settings.name} settings)"), highlight=False,
                      soft_wrap=True)
    run.profile()
    run.allocate()
    run.convert()
    eval_result = run.evaluate()
    bench_result = run.bench()
    return run.report(eval_result, bench_result, started)
