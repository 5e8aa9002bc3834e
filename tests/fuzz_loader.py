"""Fuzz the patched llama.cpp loader with mutated ``allocmoe.*`` metadata.

Test code: ``tests/test_fuzz_loader.py`` imports it, and from the repository root it runs on its
own as ``python -m tests.fuzz_loader BASE.gguf --n 300 --seed 0`` (``--make-base`` writes a
tiny synthetic MoE base first). Every case is a copy of BASE with a valid two-plan
allocmoe stamp, then mutated: wrong types for every key, wrong lengths, zero, negative,
huge and boundary values, k_min above k_max, plan_count / plan_index inconsistencies,
missing keys, duplicated keys, a plan_index kv_override, and seeded random combinations.
An oracle of the loader's contract (``expected``: what the patched loader of patches 0003-0006
must accept and run, and what it must refuse; patches/README.md says what each patch checks)
gives for each case the per-layer counts the loader must run, or that it must refuse the file.

Worker processes (``--worker JOBS.json``) load a batch of files in sequence with the
low-level llama.cpp API and print one JSON line per file; a batch that dies by a signal,
exits non-zero or hangs is rerun one file per process to name the file. Allowed outcomes:
a load that runs the oracle's counts (and decodes finite logits), or a clean load error;
the Python side (``read_info`` and the load choice) may only raise ``AllocMoeError``.
Runs under an AddressSanitizer build with ``LLAMA_CPP_LIB_PATH=<unpacked wheel>/llama_cpp/lib``,
``LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"`` (without
libstdc++ ASan cannot intercept the loader's C++ exceptions in a Python process and aborts on
the first clean load error) and ``ASAN_OPTIONS=detect_leaks=0`` set in the environment, which
the workers inherit; any "AddressSanitizer" report is a problem.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from allocmoe_edge.gguf_meta import (
    FORMAT_VERSION_THRESHOLDS,
    GgufModelInfo,
    Keys,
    StoredPlan,
    copy_with_metadata,
    plan_fields,
    read_info,
)

T = gguf.GGUFValueType
Field = tuple[Any, Any, Any]  # (value, GGUFValueType, sub_type or None)
U32_MAX = 2**32 - 1
MAX_THRESHOLD = 1e6  # the largest |threshold| of a layer that runs the decode rule (LLAMA_ALLOCMOE_MAX_THRESHOLD)


@dataclass
class Case:
    """One mutation of the base stamp."""

    name: str
    set: dict[str, Field] = field(default_factory=dict)
    drop: frozenset[str] = frozenset()
    override: int | None = None  # kv_override allocmoe.plan_index=int:<override>
    duplicate: str | None = None  # this key is written a second time (set[key] is the copy)

    def merged(self, base: dict[str, Field]) -> dict[str, Field]:
        """The file's allocmoe keys (without the duplicate's second copy)."""
        kv = {k: v for k, v in base.items() if k not in self.drop}
        kv.update({k: v for k, v in self.set.items() if k != self.duplicate})
        return kv


def u32(v: int) -> Field:
    return (v, T.UINT32, None)


def arr(values: list[Any], sub: Any) -> Field:
    return (list(values), T.ARRAY, sub)


def write_base(path: Path, seed: int = 0) -> Path:
    """A tiny synthetic Mixtral-layout GGUF (llama arch, 4 blocks, 8 experts, top-2; ~1 MB)."""
    from allocmoe_edge import synth

    # synthesize() takes the name of a registered shape
    synth.SHAPES.setdefault("fuzz-tiny", synth.Shape(
        "fuzz-tiny", "llama", n_layer=4, n_embd=64, n_head=4, n_head_kv=2, n_vocab=320, n_ctx=256,
        rope_theta=1e4, rms_eps=1e-5, n_ff=64, n_expert=8, n_expert_used=2, n_ff_exp=64))
    return synth.synthesize("fuzz-tiny", "q8_0", path, seed=seed)


def base_plans(info: GgufModelInfo) -> tuple[list[list[int]], int]:
    """Two valid plans (per block counts) and the Alloc-T k_max that the base stamp uses."""
    L, E = info.block_count, info.expert_count
    c0 = [min(E, 1 + i % 3) for i in range(L)]
    c1 = [min(E, info.expert_used_count + 1) if i % 2 == 0 else 1 for i in range(L)]
    return [c0, c1], min(E, max(c0 + c1) + 1)


def base_fields(info: GgufModelInfo) -> dict[str, Field]:
    """The valid stamp every case starts from: plans c0 (default) and c1, k_min 1, Alloc-T on."""
    plans, k_max = base_plans(info)
    stored = [StoredPlan(tuple(c), budget=0.5, budget_count=sum(c), method="fuzz", name=f"p{i}")
              for i, c in enumerate(plans)]
    return plan_fields(info, stored, k_min=1, k_max=k_max, provenance={"source": "fuzz-base"})


_WRONG = {  # name -> field for a scalar slot; arrays get the block count's length
    "str": ("7", T.STRING, None), "bool": (True, T.BOOL, None), "f32": (1.0, T.FLOAT32, None),
    "f64": (2.0, T.FLOAT64, None), "i8": (1, T.INT8, None), "i32": (1, T.INT32, None),
    "i64": (1, T.INT64, None), "u8": (1, T.UINT8, None), "u16": (1, T.UINT16, None),
    "u32": (1, T.UINT32, None), "u64": (1, T.UINT64, None),
}
_WRONG_ARR = {"str": ("1", T.STRING), "f32": (1.0, T.FLOAT32), "f64": (1.0, T.FLOAT64), "bool": (True, T.BOOL),
              "i64": (1, T.INT64), "u64": (1, T.UINT64), "u8": (1, T.UINT8), "i16": (1, T.INT16),
              "i32": (1, T.INT32), "u32": (1, T.UINT32)}


def catalogue(info: GgufModelInfo) -> list[Case]:
    """The systematic cases, in a fixed order."""
    L, E, K = info.block_count, info.expert_count, info.expert_used_count
    base = base_fields(info)
    (c0, c1), k_max = base_plans(info)
    counts, p1 = Keys.LAYER_EXPERT_COUNTS, Keys.PLAN_LAYER_EXPERT_COUNTS.format(index=1)
    kmin, kmax = Keys.TOKEN_K_MIN, Keys.TOKEN_K_MAX
    out: list[Case] = []
    pc, pi = Keys.PLAN_COUNT, Keys.PLAN_INDEX
    # every key with wrong scalar and array types: all of them for the keys the loader reads,
    # a few for the rest; the plan keys also with plan 1 selected
    loader_keys = {Keys.VERSION, Keys.ENABLED, counts, kmin, kmax, pc, pi, p1}
    for key in sorted(set(base) | {pi}):
        scalars = _WRONG if key in loader_keys else {t: _WRONG[t] for t in ("str", "f32", "i32")}
        arrays = _WRONG_ARR if key in loader_keys else {"str": _WRONG_ARR["str"]}
        for ov in (None, 1) if key in (pc, pi, p1) else (None,):
            tag = "" if ov is None else "+sel1"
            for t, f in scalars.items():
                if key in base and base[key][1] == f[1]:
                    continue
                out.append(Case(f"type:{key}={t}{tag}", {key: f}, override=ov))
            for t, (v, sub) in arrays.items():
                out.append(Case(f"type:{key}=arr_{t}{tag}", {key: arr([v] * L, sub)}, override=ov))
            out.append(Case(f"type:{key}=arr_empty{tag}", {key: arr([], T.UINT32)}, override=ov))
    # missing keys, one at a time
    for key in sorted(base):
        out.append(Case(f"drop:{key}", drop=frozenset({key})))
        if key.startswith(f"{Keys.PLAN_PREFIX}1."):
            out.append(Case(f"drop:{key}+sel1", drop=frozenset({key}), override=1))
    # lengths and values of the default counts and of plan 1 (selected)
    for key, ov, good in ((counts, None, c0), (p1, 1, c1)):
        for n in (0, 1, L - 1, L + 1, 100000):
            out.append(Case(f"len:{key}={n}", {key: arr([1] * n, T.UINT32)}, override=ov))
        for name, v, sub in (("zero", 0, T.UINT32), ("E", E, T.UINT32), ("E+1", E + 1, T.UINT32),
                             ("K", K, T.UINT32), ("2^31", 2**31, T.UINT32), ("2^32-1", U32_MAX, T.UINT32),
                             ("-1", -1, T.INT32), ("-2^31", -(2**31), T.INT32), ("i32ok", 1, T.INT32)):
            for pos in (0, L - 1):
                vals = list(good)
                vals[pos] = v
                out.append(Case(f"val:{key}[{pos}]={name}", {key: arr(vals, sub)}, override=ov))
        out.append(Case(f"val:{key}=all_E", {key: arr([E] * L, T.UINT32), kmax: u32(E)}, override=ov))
        out.append(Case(f"val:{key}=all_1", {key: arr([1] * L, T.UINT32)}, override=ov))
    # Alloc-T bounds
    for v in (0, 1, 2, max(c0), max(c0) + 1, E, E + 1, 2**31, U32_MAX):
        out.append(Case(f"kmin={v}", {kmin: u32(v)}))
        out.append(Case(f"kmin={v}+sel1", {kmin: u32(v)}, override=1))
    for v in (0, 1, max(c0) - 1, max(c0), E, E + 1, 2**31, U32_MAX):
        out.append(Case(f"kmax={v}", {kmax: u32(v)}))
    for lo, hi, c in ((3, 2, c0), (E, 1, c0), (2, 2, [2] * L), (E, E, [E] * L), (2, 1, [1] * L), (1, E, c0)):
        out.append(Case(f"kmin={lo},kmax={hi},counts={c}", {kmin: u32(lo), kmax: u32(hi), counts: arr(c, T.UINT32)}))
    # decode thresholds (the default plan's, and plan 1's selected): finite within +-1e6 where a layer runs the
    # decode rule (k_min < k < k_max), anything but NaN at the ends; block 1 of c0 is ruled, block 0 (k = 1) not
    thr, t1 = Keys.TOKEN_THRESHOLDS, Keys.PLAN_TOKEN_THRESHOLDS.format(index=1)
    for key, ov, good in ((thr, None, c0), (t1, 1, c1)):
        ruled = next(b for b, k in enumerate(good) if 1 < k < k_max)
        end = next(b for b, k in enumerate(good) if k == 1)
        for name, pos, v in (("finite", None, 0.1), ("inf", ruled, math.inf), ("-inf", ruled, -math.inf),
                             ("1e30", ruled, 1e30), ("1e6", ruled, 1e6), ("2e6", ruled, 2e6), ("nan", ruled, math.nan),
                             ("inf_end", end, math.inf), ("-inf_end", end, -math.inf), ("nan_end", end, math.nan)):
            vals = [0.1] * L
            if pos is not None:
                vals[pos] = v
            tag = "" if ov is None else "+sel1"
            out.append(Case(f"thr:{key}[{pos}]={name}{tag}", {key: arr(vals, T.FLOAT32)}, override=ov))
        inf_from_ruled = arr([0.1] * ruled + [math.inf] * (L - ruled), T.FLOAT32)
        out.append(Case(f"thr:{key}[{ruled}]=inf,kmax=0", {key: inf_from_ruled, kmax: u32(0)}, override=ov))
        out.append(Case(f"thr:{key}=len{L - 1}", {key: arr([0.1] * (L - 1), T.FLOAT32)}, override=ov))
        out.append(Case(f"thr:{key}=f64", {key: arr([0.1] * L, T.FLOAT64)}, override=ov))
    # version and enabled
    for v in (0, 2, 3, 2**31, U32_MAX):
        out.append(Case(f"version={v}", {Keys.VERSION: u32(v)}))
    for name, f in (("false", (False, T.BOOL, None)), ("str_false", ("false", T.STRING, None)),
                    ("i32_0", (0, T.INT32, None)), ("u8_1", (1, T.UINT8, None))):
        out.append(Case(f"enabled={name}", {Keys.ENABLED: f}))
        out.append(Case(f"enabled={name}+bad_counts", {Keys.ENABLED: f, counts: arr([E + 1] * (L + 1), T.UINT32)}))
    # plan_count / plan_index inconsistencies
    for v in (0, 1, 2, 2**31, U32_MAX):
        out.append(Case(f"file_plan_index={v}", {pi: u32(v)}))
    for v in (0, 1, 2, -1, 2**31 - 1, 2**31):
        out.append(Case(f"override_plan_index={v}", override=v))
    for count, ov in ((0, 0), (1, 1), (U32_MAX, 1), (U32_MAX, 7), (2**31, 2**31 - 1)):
        out.append(Case(f"plan_count={count}+sel{ov}", {pc: u32(count)}, override=ov))
    out.append(Case("plan_count=huge,no_sel", {pc: u32(U32_MAX)}))
    p5 = Keys.PLAN_LAYER_EXPERT_COUNTS.format(index=5)
    out.append(Case("plan.5_beyond_count", {p5: arr([1] * L, T.UINT32)}))
    out.append(Case("plan.5_beyond_count+sel5", {p5: arr([1] * L, T.UINT32)}, override=5))
    out.append(Case("plan_default=7", {Keys.PLAN_DEFAULT: u32(7)}))
    plan_keys = frozenset(k for k in base if k in (pc, Keys.PLAN_DEFAULT) or k.startswith(Keys.PLAN_PREFIX))
    out.append(Case("no_plan_keys+sel0", drop=plan_keys, override=0))
    # duplicated keys (gguf-py keeps one value per key; the writer below patches a placeholder name)
    for key, f in ((Keys.VERSION, u32(1)), (Keys.ENABLED, (True, T.BOOL, None)),
                   (counts, arr(c0, T.UINT32)), (kmax, u32(k_max)), (pc, u32(2)), (p1, arr(c1, T.UINT32))):
        out.append(Case(f"dup:{key}", {key: f}, duplicate=key))
    return out


def random_cases(info: GgufModelInfo, n: int, rng: random.Random) -> Iterator[Case]:
    """``n`` seeded combinations: random count arrays and Alloc-T bounds, plus 2-3 catalogue cases."""
    L, E = info.block_count, info.expert_count
    pool = [c for c in catalogue(info) if c.duplicate is None]
    for i in range(n):
        if i % 2 == 0:
            length = rng.choice([L, L, L, L - 1, L + 1])
            valid = rng.random() < 0.6
            vals = [rng.randint(1, E) if valid else rng.randint(-1, E + 1) for _ in range(length)]
            sub = T.INT32 if min(vals, default=0) < 0 or rng.random() < 0.2 else T.UINT32
            lo = rng.randint(1, min(vals)) if valid and vals else rng.randint(0, E + 1)
            hi = rng.choice([0, max(vals or [0]), E, rng.randint(0, E + 1)])
            plan0 = Keys.PLAN_LAYER_EXPERT_COUNTS.format(index=0)
            key = rng.choice([Keys.LAYER_EXPERT_COUNTS, plan0])
            yield Case(f"rand{i}:counts={vals},kmin={lo},kmax={hi}",
                       {key: arr(vals, sub), Keys.TOKEN_K_MIN: u32(lo), Keys.TOKEN_K_MAX: u32(hi)},
                       override=0 if key == plan0 else None)
        else:
            parts = rng.sample(pool, rng.randint(2, 3))
            case = Case(f"rand{i}:" + "&".join(p.name for p in parts))
            for p in parts:
                case.set.update(p.set)
                case.drop |= p.drop
                case.override = p.override if p.override is not None else case.override
            yield case


def make_cases(info: GgufModelInfo, n: int, seed: int) -> list[Case]:
    """``n`` cases: the whole catalogue then seeded random ones (a seeded sample if n is smaller)."""
    rng = random.Random(seed)
    cat = catalogue(info)
    if n <= len(cat):
        return [cat[i] for i in sorted(rng.sample(range(len(cat)), n))]
    return cat + list(random_cases(info, n - len(cat), rng))


class _Fail(Exception):
    pass


def expected(case: Case, info: GgufModelInfo, base: dict[str, Field]) -> list[int] | None:
    """The counts the patched loader must run for ``case``, or None when it must refuse the file."""
    if case.duplicate:
        return None  # gguf rejects a file with a duplicated key
    kv = case.merged(base)
    L, E = info.block_count, info.expert_count
    stock = [info.expert_used_count] * L

    def scalar(key: str, vtype: Any, default: Any) -> Any:
        if key not in kv:
            return default
        v, t, _ = kv[key]
        if t != vtype:
            raise _Fail
        return v

    try:
        if scalar(Keys.VERSION, T.UINT32, 0) > FORMAT_VERSION_THRESHOLDS:  # the newest format the patch reads
            return None
        enabled = scalar(Keys.ENABLED, T.BOOL, True)
        plan_count = scalar(Keys.PLAN_COUNT, T.UINT32, 0)
        counts_key = Keys.LAYER_EXPERT_COUNTS
        index = case.override % 2**32 if case.override is not None else scalar(Keys.PLAN_INDEX, T.UINT32, None)
        if index is not None:
            if index >= plan_count:
                return None
            counts_key = Keys.PLAN_LAYER_EXPERT_COUNTS.format(index=index)
        if counts_key not in kv:
            return None if index is not None else stock
        if not enabled:
            return stock
        v, t, sub = kv[counts_key]
        if t != T.ARRAY or sub not in (T.UINT32, T.INT32) or len(v) != L or not all(1 <= k <= E for k in v):
            return None
        k_min = scalar(Keys.TOKEN_K_MIN, T.UINT32, 1)
        k_max = scalar(Keys.TOKEN_K_MAX, T.UINT32, 0)
        if not 1 <= k_min <= E or k_max > E or any(k < k_min or (k_max and k > k_max) for k in v):
            return None
        thr_key = Keys.TOKEN_THRESHOLDS if index is None else Keys.PLAN_TOKEN_THRESHOLDS.format(index=index)
        if thr_key in kv and not _thresholds_ok(kv[thr_key], v, L, k_min, k_max):
            return None
        return list(v)
    except _Fail:
        return None


def _thresholds_ok(field: Field, counts: list[int], n_block: int, k_min: int, k_max: int) -> bool:
    """The loader's rule: f32[n_block], no NaN, finite within +-1e6 at blocks that run the decode rule."""
    taus, vtype, sub = field
    if vtype != T.ARRAY or sub != T.FLOAT32 or len(taus) != n_block:
        return False
    return not any(math.isnan(t) or (k_max and k_min < k < k_max and not abs(t) <= MAX_THRESHOLD)
                   for k, t in zip(counts, taus))


def write_case(base_path: Path, case: Case, base: dict[str, Field], out: Path) -> None:
    """Write ``case`` as a GGUF at ``out``: the base file's keys and tensors, allocmoe keys replaced.

    A duplicated key is written under a placeholder name of the same length, renamed in place. Values
    are packed by `gguf_meta.pack_entry`, which also writes empty arrays (gguf-py's writer refuses them).
    """
    kv = case.merged(base)
    placeholder = None
    if case.duplicate:
        placeholder = case.duplicate.replace(Keys.PREFIX, Keys.PREFIX[:-2] + "#.", 1)
        kv[placeholder] = case.set[case.duplicate]
    copy_with_metadata(base_path, out, kv, drop=lambda k: k.startswith(Keys.PREFIX))
    if placeholder:
        at = out.read_bytes().index(placeholder.encode())
        with open(out, "r+b") as f:
            f.seek(at)
            f.write(case.duplicate.encode())


# ---- worker: runs in a subprocess, loads files with the low-level API --------------------------

def _worker(jobs_path: str) -> None:
    import ctypes

    import llama_cpp
    import numpy as np
    from click.testing import CliRunner

    from allocmoe_edge.commands.inspect import command as inspect_command
    from allocmoe_edge.errors import AllocMoeError
    from allocmoe_edge.runtime import LoadChoice

    errors: list[str] = []

    @llama_cpp.llama_log_callback
    def log(level: int, text: bytes, _: Any) -> None:
        if level == 4:  # GGML_LOG_LEVEL_ERROR
            errors.append(text.decode(errors="replace").strip())

    llama_cpp.llama_log_set(log, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    lib = llama_cpp.llama_cpp._lib
    lib.llama_model_allocmoe_layer_count.restype = ctypes.c_int32
    lib.llama_model_allocmoe_layer_count.argtypes = [ctypes.c_void_p, ctypes.c_int32]

    def decode(model: Any, tokens: list[int], ctx: Any, start: int) -> bool:
        batch = llama_cpp.llama_batch_init(len(tokens), 0, 1)
        try:
            for i, tok in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, start + i, 1, True
                batch.seq_id[i][0] = 0
            batch.n_tokens = len(tokens)
            if llama_cpp.llama_decode(ctx, batch) != 0:
                return False
            n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(len(tokens), n_vocab))
            return bool(np.isfinite(logits).all())
        finally:
            llama_cpp.llama_batch_free(batch)

    def python_side(path: str, override: int | None) -> str:
        def timeout(*_: Any) -> None:
            raise TimeoutError("read_info took over 10 s")

        signal.signal(signal.SIGALRM, timeout)
        signal.alarm(10)
        try:
            info = read_info(path)
            json.dumps(info.to_json())
            LoadChoice(plan_index=override).kv_overrides(info)
            shown = CliRunner().invoke(inspect_command, [path])  # `allocmoe inspect` renders every field
            if shown.exception and not isinstance(shown.exception, (AllocMoeError, SystemExit)):
                raise shown.exception
            return "ok"
        except AllocMoeError:
            return "error"
        except Exception as e:  # the finding: anything but a clean error
            return f"crash: {type(e).__name__}: {str(e)[:200]}"
        finally:
            signal.alarm(0)

    for job in json.loads(Path(jobs_path).read_text()):
        errors.clear()
        params = llama_cpp.llama_model_default_params()
        keep: Any = None
        if job["override"] is not None:
            keep = (llama_cpp.llama_model_kv_override * 2)()
            keep[0].key = Keys.PLAN_INDEX.encode()
            keep[0].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
            keep[0].value.val_i64 = job["override"]  # keep[1] stays zeroed: the end marker
            params.kv_overrides = keep
        rec: dict[str, Any] = {"file": job["file"], "loaded": False, "counts": None, "finite": None}
        model = llama_cpp.llama_model_load_from_file(job["file"].encode(), params)
        if model:
            n_layer = llama_cpp.llama_model_n_layer(model)
            rec["loaded"] = True
            rec["counts"] = [int(lib.llama_model_allocmoe_layer_count(model, i)) for i in range(n_layer)]
            cparams = llama_cpp.llama_context_default_params()
            cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = 64, 16, 16
            cparams.n_threads = cparams.n_threads_batch = 1
            ctx = llama_cpp.llama_init_from_model(model, cparams)
            rng = np.random.default_rng(0)
            if ctx:
                toks = rng.integers(3, 300, size=13).tolist()
                rec["finite"] = decode(model, toks[:12], ctx, 0) and decode(model, toks[12:], ctx, 12)
                llama_cpp.llama_free(ctx)
            llama_cpp.llama_model_free(model)
        rec["error"] = errors[0] if errors else ""  # the loader's reason comes first
        rec["python"] = python_side(job["file"], job["override"])
        print(json.dumps(rec), flush=True)


# ---- driver --------------------------------------------------------------------------------

def _run_worker(jobs: list[dict[str, Any]], folder: Path, timeout: float) -> tuple[list[dict[str, Any]], str]:
    """Run one worker over ``jobs``; returns its records and, if it did not exit 0, why."""
    jobs_file = folder / "jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(jobs_file)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err, rc = "", None
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    if rc is None:
        return records, f"hang (no exit within {timeout:.0f} s)"
    if "AddressSanitizer" in err:
        return records, err[err.rfind("\n", 0, err.index("AddressSanitizer")) + 1:][:3000]
    if rc < 0:
        return records, f"killed by signal {signal.Signals(-rc).name}: {err[-1500:]}"
    if rc != 0:
        return records, f"exit status {rc}: {err[-1500:]}"
    return records, ""


def fuzz(base_path: Path, n: int, seed: int, batch: int = 60, timeout: float = 300.0,
         log: Any = print) -> list[dict[str, Any]]:
    """Write, load and delete ``n`` mutated files; one result per case with ``problem`` ("" if allowed)."""
    info = read_info(base_path)
    base = base_fields(info)
    cases = make_cases(info, n, seed)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        folder = Path(tmp)
        for start in range(0, len(cases), batch):
            chunk = list(enumerate(cases[start:start + batch], start))
            jobs = []
            for i, case in chunk:
                path = folder / f"case{i:04d}.gguf"
                write_case(base_path, case, base, path)
                jobs.append({"file": str(path), "override": case.override})
            records, why = _run_worker(jobs, folder, timeout)
            by_file = {r["file"]: r for r in records}
            first = len(results)
            for (i, case), job in zip(chunk, jobs):
                rec = by_file.get(job["file"])
                if rec is None:  # the batch died or hung before this file: rerun it alone
                    single, single_why = _run_worker([job], folder, timeout)
                    rec = dict(single[0] if single else {}, died=single_why)
                results.append(_judge(i, case, expected(case, info, base), rec))
                Path(job["file"]).unlink(missing_ok=True)
            if why and not any(r["problem"] for r in results[first:]):  # no single file reproduced it
                culprit = results[first + min(len(records), len(jobs) - 1)]
                culprit["problem"] = f"batch failed at or after this file: {why}"
            log(f"{min(start + batch, len(cases))}/{len(cases)} cases; "
                f"{sum(bool(r['problem']) for r in results)} problem(s)")
    return results


def _judge(i: int, case: Case, expect: list[int] | None, rec: dict[str, Any]) -> dict[str, Any]:
    problem = ""
    if rec.get("died"):
        problem = rec["died"]
    elif not rec:
        problem = "no record from the worker"
    elif str(rec.get("python", "")).startswith("crash"):
        problem = f"python side: {rec['python']}"
    elif expect is None and rec["loaded"]:
        problem = f"loaded (counts {rec['counts']}) but the contract says refuse"
    elif expect is not None and not rec["loaded"]:
        problem = f"refused ({rec['error']}) but the contract says run {expect}"
    elif expect is not None and rec["counts"] != expect:
        problem = f"runs {rec['counts']}, expected {expect}"
    elif expect is not None and rec["finite"] is not True:
        problem = "decode failed or logits not finite"
    return {"index": i, "case": case.name, "override": case.override, "expect": expect,
            "loaded": rec.get("loaded"), "counts": rec.get("counts"), "error": rec.get("error", ""),
            "python": rec.get("python", ""), "problem": problem}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base", nargs="?", help="base GGUF (a MoE model; its allocmoe keys are replaced)")
    ap.add_argument("--n", type=int, default=300, help="number of cases")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=60, help="files per worker process")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per worker process")
    ap.add_argument("--make-base", action="store_true", help="first write a tiny synthetic MoE GGUF at BASE")
    ap.add_argument("--report", help="write every case's result as JSON here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args.worker)
        return 0
    if not args.base:
        ap.error("BASE is required")
    base = Path(args.base)
    if args.make_base:
        write_base(base, args.seed)
    results = fuzz(base, args.n, args.seed, args.batch, args.timeout, log=lambda m: print(m, file=sys.stderr))
    if args.report:
        Path(args.report).write_text(json.dumps(results, indent=1))
    loaded = sum(bool(r["loaded"]) for r in results)
    bad = [r for r in results if r["problem"]]
    print(f"{len(results)} files: {loaded} loaded, {len(results) - loaded} refused, {len(bad)} problem(s)")
    for r in bad:
        print(f"  #{r['index']} {r['case']} (override {r['override']}): {r['problem']}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
