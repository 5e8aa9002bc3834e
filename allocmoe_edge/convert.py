"""HF checkpoint -> GGUF with llama.cpp's own converter from the pinned sdist (run, not forked)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .build_runtime import vendor_dir
from .errors import AllocMoeError
from .fsutil import atomic_output

CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")


def convert_hf(model_dir: str | os.PathLike[str], outfile: str | os.PathLike[str], outtype: str = "f32",
               log=print) -> Path:
    """Convert an HF model directory to a GGUF of ``outtype`` (atomic; stderr kept on failure)."""
    model_dir, outfile = Path(model_dir), Path(outfile)
    if outtype not in CONVERTER_TYPES:
        raise AllocMoeError(f"outtype {outtype!r}: the converter writes {', '.join(CONVERTER_TYPES)}")
    if not (model_dir / "config.json").is_file():
        raise AllocMoeError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    llama = vendor_dir(log)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(llama / "gguf-py"), str(llama), env.get("PYTHONPATH", "")])
    env.setdefault("NO_LOCAL_GGUF", "")
    with atomic_output(outfile) as tmp:
        cmd = [sys.executable, str(llama / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", outtype,
               "--outfile", str(tmp)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise AllocMoeError(f"llama.cpp's converter failed on {model_dir}:\n{proc.stderr[-3000:]}")
    return outfile
