"""HF checkpoint -> budgeted GGUF: llama.cpp's own converter and quantizer, then the plans.

The converter runs from the pinned sdist (never a fork or a copy) in a subprocess, through
``converter_subprocess`` which adds one hook for unknown BPE pre-tokenizers. Quantization to
k-quants uses llama.cpp's quantizer as exposed by llama-cpp-python. Every output is written
under a temporary name and renamed at the end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .build_runtime import vendor_dir
from .errors import AllocMoeError
from .fsutil import atomic_output

CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
QUANT_TYPES = {"q4_k_m": 15, "q4_0": 2, "q5_k_m": 17, "q6_k": 18}  # llama_ftype values
OUT_TYPES = CONVERTER_TYPES + tuple(QUANT_TYPES)


def convert_hf(model_dir: str | os.PathLike[str], outfile: str | os.PathLike[str], outtype: str = "f32",
               pre_tokenizer: str | None = None, log: Callable[[str], None] = print) -> Path:
    """Convert an HF model directory to a GGUF written by llama.cpp's converter (atomic)."""
    model_dir, outfile = Path(model_dir), Path(outfile)
    if outtype not in CONVERTER_TYPES:
        raise AllocMoeError(f"outtype {outtype!r}: the converter writes {', '.join(CONVERTER_TYPES)}")
    if not (model_dir / "config.json").is_file():
        raise AllocMoeError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    llama = vendor_dir(log)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(llama / "gguf-py"), str(llama), env.get("PYTHONPATH")] if p)
    pre = ["--pre-tokenizer", pre_tokenizer] if pre_tokenizer else []
    with atomic_output(outfile) as tmp:
        cmd = [sys.executable, "-m", "allocmoe_edge.converter_subprocess", *pre, "--", str(model_dir),
               "--outtype", outtype, "--outfile", str(tmp)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise AllocMoeError(_converter_error(model_dir, proc.stderr))
    return outfile


def _converter_error(model_dir: Path, stderr: str) -> str:
    if "pre-tokenizer was not recognized" in stderr:
        h = re.search(r"chkhsh:\s+([0-9a-f]{64})", stderr)
        return (f"llama.cpp's converter does not know the BPE pre-tokenizer of {model_dir}"
                f"{f' (hash {h.group(1)})' if h else ''}. If you know how its tokenizer splits text, pass "
                "--pre-tokenizer NAME with the llama.cpp name of the same pre-tokenizer (for example gpt-2, "
                "llama-bpe, qwen2, deepseek-llm); a wrong name changes tokenization, so check the result "
                "with `allocmoe eval`.")
    return f"llama.cpp's converter failed on {model_dir}:\n{stderr[-3000:]}"


def quantize(src: str | os.PathLike[str], dst: str | os.PathLike[str], qtype: str, threads: int = 0) -> Path:
    """Quantize a GGUF with llama.cpp's quantizer (via llama-cpp-python), atomically."""
    from .runtime import llama_cpp_module

    if qtype not in QUANT_TYPES:
        raise AllocMoeError(f"quantization type {qtype!r}: choose one of {', '.join(QUANT_TYPES)}")
    llama_cpp = llama_cpp_module()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[qtype]
    params.nthread = threads
    with atomic_output(dst) as tmp:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise AllocMoeError(f"llama.cpp's quantizer failed on {src} (code {rc})")
    return Path(dst)


def convert_to_type(model_dir: str | os.PathLike[str], outfile: str | os.PathLike[str], outtype: str,
                    pre_tokenizer: str | None = None, log: Callable[[str], None] = print) -> Path:
    """Converter types directly; quantized types through an f16 intermediate that is removed after."""
    if outtype not in OUT_TYPES:
        raise AllocMoeError(f"outtype {outtype!r}: choose one of {', '.join(OUT_TYPES)}")
    if outtype in CONVERTER_TYPES:
        return convert_hf(model_dir, outfile, outtype, pre_tokenizer, log)
    outfile = Path(outfile)
    with tempfile.TemporaryDirectory(prefix=".allocmoe-", dir=outfile.parent) as tmp:
        f16 = convert_hf(model_dir, Path(tmp) / "f16.gguf", "f16", pre_tokenizer, log)
        log(f"quantizing to {outtype}")
        return quantize(f16, outfile, outtype)


def calibration_provenance(calibration: dict[str, Any]) -> str:
    """The plan's calibration description as stored in a published GGUF: the text's file name and
    sha256, never the absolute path it had on the machine that converted it."""
    public = {k: v for k, v in calibration.items() if k != "path"}
    if "path" in calibration:
        public["file"] = Path(str(calibration["path"])).name
    return json.dumps(public, sort_keys=True)


def build_budgeted_gguf(model_dir: str | os.PathLike[str], plan_paths: list[str], outfile: str | os.PathLike[str],
                        outtype: str = "q8_0", default: int = 0, pre_tokenizer: str | None = None,
                        log: Callable[[str], None] = print,
                        progress: Callable[[int, int], None] | None = None) -> Path:
    """Check the plans against the checkpoint, convert (and quantize), then stamp every plan."""
    from .gguf_meta import read_info, stamp, stored_plan
    from .hf import plan_shape
    from .plan import Plan

    model_dir, outfile = Path(model_dir), Path(outfile)
    if outtype not in OUT_TYPES:
        raise AllocMoeError(f"outtype {outtype!r}: choose one of {', '.join(OUT_TYPES)}")
    if outfile.resolve().is_relative_to(model_dir.resolve()) and outfile.exists():
        raise AllocMoeError(f"{outfile} is inside the input model directory and exists; choose another output")
    plans = [Plan.load(p) for p in plan_paths]
    if not plans:
        raise AllocMoeError("give at least one --plan (from `allocmoe allocate`)")
    if not 0 <= default < len(plans):
        raise AllocMoeError(f"--default-plan {default} is outside [0, {len(plans) - 1}]")
    shape = plan_shape(model_dir)
    for p in plans:
        p.check_against(shape)
    d = plans[default]
    if any((p.token_k_min, p.token_k_max) != (d.token_k_min, d.token_k_max) for p in plans):
        log(f"plans differ in Alloc-T bounds; the file uses the default plan's k_min={d.token_k_min} "
            f"k_max={d.token_k_max} (override at load time with allocmoe.token_k_max)")
    token_mode = d.token_mode if all(p.token_thresholds is not None for p in plans) else "batch"
    if token_mode != d.token_mode:
        log("some plans have no decode thresholds: the file runs Alloc-T's batch rule only")
    outfile.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".allocmoe-", dir=outfile.parent) as tmp:
        base = convert_to_type(model_dir, Path(tmp) / f"model-{outtype}.gguf", outtype, pre_tokenizer, log)
        info = read_info(base)
        stored = [stored_plan(info, p) for p in plans]
        provenance = {"source": model_dir.name, "calibration": calibration_provenance(d.calibration),
                      "outtype": outtype}
        log(f"stamping {len(stored)} plan(s)")
        if token_mode == "batch":
            stored = [dataclasses.replace(p, thresholds=None) for p in stored]
        stamp(base, outfile, stored, default=default, k_min=d.token_k_min, k_max=d.token_k_max,
              provenance=provenance, progress=progress, token_mode=token_mode)
    return outfile
