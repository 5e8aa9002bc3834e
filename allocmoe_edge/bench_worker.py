"""One benchmark configuration, timed in a child process.

llama.cpp aborts the whole process on a failed GGML_ASSERT or a CUDA error; measuring each
configuration in its own interpreter turns such an abort into one failed row (with the log
lines that explain it) instead of a lost run. The parent pickles (model, LoadChoice,
BenchOptions, ModelInfo) into a request file; the child writes its measurements as JSON and
its whole stderr (llama.cpp's log included) to a log file that the parent filters.
"""

from __future__ import annotations

import json
import pickle
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .bench import BenchOptions
    from .gguf_meta import ModelInfo
    from .runtime import LoadChoice

# llama.cpp log lines kept per row (once each): graph nodes / splits, GPU offload, CUDA graphs, the plan
# loaded and the patch's own messages (such as an Alloc-T fallback)
_LOG_KEEP = ("splits = ", "CUDA graph", "offloaded ", "llama_allocmoe", "allocmoe: ", "validate_override")
# lines that say why a child failed
_LOG_FAIL = ("error", "failed", "ggml_assert", "traceback", "abort")  # matched in lower case


def _stats(samples: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(samples), "sd": statistics.stdev(samples) if len(samples) > 1 else 0.0,
            "samples": samples}


class _Runner:
    """Timed llama_decode calls on a loaded ``llama_cpp.Llama`` (its context and batch)."""

    def __init__(self, llm: Any, tokens: list[int]) -> None:
        from .runtime import llama_cpp_module

        self.lib = llama_cpp_module()
        self.llm, self.tokens = llm, tokens

    def _decode(self) -> None:
        from .errors import AllocMoeError

        try:
            self.llm._ctx.decode(self.llm._batch)
        except RuntimeError as e:
            raise AllocMoeError(f"llama_decode failed: {e}") from e

    def prompt(self, n: int) -> float:
        """Tokens/s of one batch of ``n`` tokens after a KV reset."""
        self.llm._ctx.kv_cache_clear()
        self.llm._batch.set_batch(self.tokens[:n], n_past=0, logits_all=False)
        t0 = time.perf_counter()
        self._decode()
        self.lib.llama_synchronize(self.llm._ctx.ctx)
        return n / (time.perf_counter() - t0)

    def generate(self, n: int) -> float:
        """Tokens/s of ``n`` tokens decoded one at a time after a KV reset."""
        self.llm._ctx.kv_cache_clear()
        t0 = time.perf_counter()
        for i in range(n):
            self.llm._batch.set_batch(self.tokens[i:i + 1], n_past=i, logits_all=False)
            self._decode()
        self.lib.llama_synchronize(self.llm._ctx.ctx)
        return n / (time.perf_counter() - t0)


def llama_kwargs(opts: BenchOptions) -> dict[str, Any]:
    """Context parameters of a bench run (one batch of n_prompt tokens)."""
    n_batch = max(opts.n_prompt, 1)
    kw: dict[str, Any] = {"n_ctx": opts.n_prompt + opts.n_gen, "n_batch": n_batch, "n_ubatch": n_batch,
                          "n_gpu_layers": opts.n_gpu_layers, "flash_attn": opts.flash_attn}
    if opts.threads:
        kw["n_threads"] = kw["n_threads_batch"] = opts.threads
    return kw


def measure(path: str | Path, choice: LoadChoice, opts: BenchOptions, info: ModelInfo | None = None) -> dict[str, Any]:
    """Load ``path`` as ``choice`` and time it in this process; returns pp / tg stats and threads.

    One warm-up prompt and one warm-up token, then ``opts.reps`` timed prompt runs and
    ``opts.reps`` timed generation runs (llama-bench's protocol). llama.cpp logs to stderr.
    """
    import numpy as np

    from .runtime import load

    # verbose=True: llama-cpp-python's log callback prints llama.cpp's log through Python's stderr
    llm = load(path, choice, verbose=True, info=info, **llama_kwargs(opts))
    try:
        rng = np.random.default_rng(opts.seed)
        run = _Runner(llm, [int(t) for t in rng.integers(0, llm.n_vocab(), max(opts.n_prompt, opts.n_gen))])
        if opts.n_prompt:
            run.prompt(opts.n_prompt)
        if opts.n_gen:
            run.generate(1)
        pp = [run.prompt(opts.n_prompt) for _ in range(opts.reps)] if opts.n_prompt else []
        tg = [run.generate(opts.n_gen) for _ in range(opts.reps)] if opts.n_gen else []
        return {"pp": _stats(pp) if pp else None, "tg": _stats(tg) if tg else None,
                "threads": llm.context_params.n_threads, "threads_batch": llm.context_params.n_threads_batch}
    finally:
        llm.close()


def _exit_reason(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


def measure_isolated(path: str | Path, choice: LoadChoice, opts: BenchOptions, info: ModelInfo | None,
                     workdir: str | Path, timeout: float | None = None) -> dict[str, Any]:
    """`measure` in a child interpreter; a crash, error or timeout gives a row with ``error`` set and
    no numbers. The row's ``log`` holds the kept llama.cpp lines (and the failure's last lines)."""
    work = Path(workdir)
    request, result, log_file = work / "request.pkl", work / "result.json", work / "child.log"
    result.unlink(missing_ok=True)
    request.write_bytes(pickle.dumps((str(path), choice, opts, info)))
    try:
        with open(log_file, "wb") as log:
            proc = subprocess.run([sys.executable, "-m", __name__, str(request), str(result)],
                                  stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
        error = None if proc.returncode == 0 and result.exists() else _exit_reason(proc.returncode)
    except subprocess.TimeoutExpired:
        error = f"timed out after {timeout:g} s"
    lines = [ln.strip() for ln in log_file.read_text(errors="replace").splitlines() if ln.strip()]
    kept = [ln for ln in lines if any(k in ln for k in _LOG_KEEP)]
    if error is None:
        return {**json.loads(result.read_text()), "error": None, "log": list(dict.fromkeys(kept))}
    why = [ln for ln in lines if any(k in ln.lower() for k in _LOG_FAIL)][-3:] or lines[-3:]
    return {"pp": None, "tg": None, "threads": None, "threads_batch": None,
            "error": "; ".join([error, *why]), "log": list(dict.fromkeys(kept + lines[-12:]))}


def _child(request: str, result: str) -> None:
    from .fsutil import atomic_write_json

    path, choice, opts, info = pickle.loads(Path(request).read_bytes())
    atomic_write_json(result, measure(path, choice, opts, info))


if __name__ == "__main__":
    _child(*sys.argv[1:3])
