"""Benchmark child processes: one per configuration, driven round-robin over JSON lines.

llama.cpp aborts the whole process on a failed GGML_ASSERT or a CUDA error, so every
configuration runs in its own interpreter: an abort costs that configuration's row only,
with the log lines that explain it. This module is both ends of the protocol and imports
nothing of `bench` (plain JSON crosses the pipe, never pickles):

* the parent starts ``python -m allocmoe_edge.bench_worker`` with stdin and stdout as pipes
  and stderr (llama.cpp's log) in a log file, and writes the job as the first line:
  ``{"name", "path", "choice": {LoadChoice fields}, "llama": {runtime.load kwargs},
  "prompts": [n, ...], "n_gen": n, "seed": s}``;
* the child loads the model, warms up (one run of every prompt size and one generated
  token) and answers ``{"ready": true, "threads": .., "threads_batch": ..}``;
* each ``{"rep": i}`` runs one timed repetition of every test and is answered
  ``{"rep": i, "prompt": {"<n>": {"decode_s", "first_token_s"}}, "gen": {"total_s", "token_s"}}``;
* end of input closes the model and ends the child.

`interleave` drives the children: repetition 1 of every configuration, then repetition 2
of every configuration, and so on, so drift on a noisy machine hits every row alike.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

CHILD_ARGV = (sys.executable, "-m", __name__)
STOP_GRACE_S = 30.0  # seconds a child may take to close its model after its last repetition
# llama.cpp log lines kept per row (once each): graph nodes / splits, GPU offload, CUDA graphs, the plan
# loaded and the patch's own messages (such as an Alloc-T fallback)
_LOG_KEEP = ("splits = ", "CUDA graph", "offloaded ", "llama_allocmoe", "allocmoe: ", "validate_override")
_LOG_FAIL = ("error", "failed", "ggml_assert", "traceback", "abort")  # lines that say why (lower case)
_MEMORY_MARGIN = 1 << 30  # bytes of system memory left free when deciding whether a child stays loaded


# ---------------------------------------------------------------- child

class Session:
    """Timed llama_decode calls on one loaded configuration (its ``llama_cpp.Llama``, context and batch)."""

    def __init__(self, job: dict[str, Any]) -> None:
        import numpy as np

        from .runtime import LoadChoice, llama_cpp_module, load

        self.lib = llama_cpp_module()
        self.prompts, self.n_gen = [int(n) for n in job["prompts"]], int(job["n_gen"])
        # verbose=True: llama-cpp-python's log callback prints llama.cpp's log through Python's stderr
        self.llm = load(job["path"], LoadChoice(**job["choice"]), verbose=True, **job["llama"])
        rng = np.random.default_rng(job["seed"])
        self.tokens = [int(t) for t in rng.integers(0, self.llm.n_vocab(), max([*self.prompts, self.n_gen]))]

    def _decode(self) -> None:
        """One llama_decode of the batch, waited for (llama_synchronize)."""
        from .errors import AllocMoeError

        try:
            self.llm._ctx.decode(self.llm._batch)
        except RuntimeError as e:
            raise AllocMoeError(f"llama_decode failed: {e}") from e
        self.lib.llama_synchronize(self.llm._ctx.ctx)

    def prompt(self, n: int) -> dict[str, float]:
        """Seconds to decode ``n`` tokens in one batch from an empty cache, and to the first token
        (the same plus the greedy choice from the last position's logits)."""
        import numpy as np

        self.llm._ctx.kv_cache_clear()
        self.llm._batch.set_batch(self.tokens[:n], n_past=0, logits_all=False)
        t0 = time.perf_counter()
        self._decode()
        t1 = time.perf_counter()
        np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(n - 1), shape=(self.llm.n_vocab(),)).argmax()
        return {"decode_s": t1 - t0, "first_token_s": time.perf_counter() - t0}

    def generate(self, n: int) -> dict[str, Any]:
        """Seconds for ``n`` tokens decoded one at a time from an empty cache, and each token's
        llama_decode + llama_synchronize on its own (llama-bench also synchronizes every token)."""
        self.llm._ctx.kv_cache_clear()
        token_s = []
        t0 = time.perf_counter()
        for i in range(n):
            self.llm._batch.set_batch(self.tokens[i:i + 1], n_past=i, logits_all=False)
            start = time.perf_counter()
            self._decode()
            token_s.append(time.perf_counter() - start)
        return {"total_s": time.perf_counter() - t0, "token_s": token_s}

    def warm_up(self) -> None:
        """One run of every prompt size and one generated token, untimed (llama-bench's warm-up)."""
        for n in self.prompts:
            self.prompt(n)
        if self.n_gen:
            self.generate(1)

    def repetition(self) -> dict[str, Any]:
        """One timed run of every test."""
        return {"prompt": {str(n): self.prompt(n) for n in self.prompts},
                "gen": self.generate(self.n_gen) if self.n_gen else None}

    def decode_activations(self, n: int = 32) -> dict[str, Any]:
        """Experts per token each MoE layer runs, measured over ``n`` tokens decoded one at a time
        (`graph_probe.DecodeCounter`; Alloc-T's decode rule varies them per token)."""
        from .graph_probe import DecodeCounter

        counter = DecodeCounter(self.llm, n)
        try:
            for token in self.tokens[:n]:
                counter.step(token)
        finally:
            counter.close()
        per_layer = counter.per_token()
        return {"per_layer": {str(layer): v for layer, v in per_layer.items()}, "total": sum(per_layer.values()),
                "tokens": counter.tokens}

    def describe(self) -> dict[str, Any]:
        """What the parent records about the loaded configuration."""
        return {"threads": self.llm.context_params.n_threads, "threads_batch": self.llm.context_params.n_threads_batch,
                "decode_activations": self.decode_activations()}


def serve(requests: IO[str], replies: IO[str]) -> None:
    """The child's loop: the job line, then one reply per request line until end of input."""

    def send(message: dict[str, Any]) -> None:
        replies.write(json.dumps(message) + "\n")
        replies.flush()

    session = Session(json.loads(requests.readline()))
    try:
        session.warm_up()
        send({"ready": True, **session.describe()})
        for line in requests:
            send({"rep": json.loads(line)["rep"], **session.repetition()})
    finally:
        session.llm.close()


def _child_main() -> None:
    """Entry point of a child: replies on the original stdout; anything else written to stdout
    (Python or C) goes to stderr, so it cannot corrupt the protocol."""
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(sys.stdin, replies)


# ---------------------------------------------------------------- parent

def _exit_reason(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


def _end_reason(proc: subprocess.Popen[bytes]) -> str:
    """How a child that closed its output ended."""
    try:
        return _exit_reason(proc.wait(STOP_GRACE_S))
    except subprocess.TimeoutExpired:
        return "stopped answering"


class Worker:
    """The parent's handle on one configuration's child process.

    ``timeout`` bounds the seconds spent waiting for this configuration's replies over the
    whole run (its loads, warm-ups and repetitions together). A child that dies, times out
    or answers nonsense is killed and sets ``error``; later calls do nothing.
    """

    def __init__(self, job: dict[str, Any], log_file: Path, timeout: float | None = None,
                 argv: Sequence[str] = CHILD_ARGV) -> None:
        self.job, self.log_file, self.timeout, self.argv = job, Path(log_file), timeout, tuple(argv)
        self.name: str = job["name"]
        self.proc: subprocess.Popen[bytes] | None = None
        self.error: str | None = None
        self.ready: dict[str, Any] | None = None  # the last ready reply
        self.replies: list[dict[str, Any]] = []  # one per completed repetition
        self.resident = True  # False: reloaded (and warmed up) for every repetition
        self.waited = 0.0
        self._buffer = b""
        self.log_file.unlink(missing_ok=True)

    @property
    def running(self) -> bool:
        return self.proc is not None

    def start(self) -> bool:
        """Start the child and wait until it has loaded and warmed up; False when it failed."""
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        self._buffer = b""
        reply = self._ask(self.job)
        if reply is not None and reply.get("ready") is not True:
            self._fail(f"unexpected reply {reply!r}")
            return False
        self.ready = reply
        return reply is not None

    def repetition(self, rep: int) -> bool:
        """Run timed repetition ``rep`` of every test; False when the child failed."""
        reply = self._ask({"rep": rep})
        if reply is not None and reply.get("rep") != rep:
            self._fail(f"unexpected reply {reply!r}")
            return False
        if reply is not None:
            self.replies.append(reply)
        return reply is not None

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """Let the child close its model and exit; killed after ``grace`` seconds."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        proc.stdin.close()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()

    def private_bytes(self) -> int | None:
        """Resident memory of the child that no other process shares (Linux RssAnon), None if unknown."""
        return _proc_status_bytes(self.proc.pid, "RssAnon") if self.proc is not None else None

    def log_lines(self) -> tuple[list[str], str | None]:
        """The kept llama.cpp log lines (and, after a failure, its last lines) and the row's error."""
        text = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        kept = [ln for ln in lines if any(k in ln for k in _LOG_KEEP)]
        if self.error is None:
            return list(dict.fromkeys(kept)), None
        why = [ln for ln in lines if any(k in ln.lower() for k in _LOG_FAIL)][-3:] or lines[-3:]
        return list(dict.fromkeys(kept + lines[-12:])), "; ".join([self.error, *why])

    def _ask(self, message: dict[str, Any]) -> dict[str, Any] | None:
        """Send one line, wait for one reply line within the time left; None (and ``error`` set) on failure."""
        if self.proc is None or self.error is not None:
            return None
        started = time.monotonic()
        try:
            self.proc.stdin.write((json.dumps(message) + "\n").encode())
            self.proc.stdin.flush()
            line = self._read_line(None if self.timeout is None else started + self.timeout - self.waited)
        except BrokenPipeError:
            line = None
        except TimeoutError:
            self._fail(f"timed out after {self.timeout:g} s")
            return None
        finally:
            self.waited += time.monotonic() - started
        if line is None:  # the child ended without answering
            self._fail(_end_reason(self.proc))
            return None
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            self._fail(f"unreadable reply {line[:200]!r}")
            return None

    def _read_line(self, deadline: float | None) -> bytes | None:
        """The next line from the child's stdout; None at end of file; TimeoutError past ``deadline``."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and (left <= 0 or not select.select([fd], [], [], left)[0]):
                raise TimeoutError
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def _fail(self, reason: str) -> None:
        """Record ``reason`` and make sure the child is gone."""
        self.error = reason
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdin.close()
            proc.stdout.close()


def _proc_status_bytes(pid: int | str, field: str) -> int | None:
    """A ``kB`` field of /proc/<pid>/status in bytes (None where /proc is missing)."""
    return _kib_field(Path(f"/proc/{pid}/status"), field)


def _available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where /proc is missing)."""
    return _kib_field(Path("/proc/meminfo"), "MemAvailable")


def _kib_field(path: Path, field: str) -> int | None:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(":")
            if name == field:
                return int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _room_for_another(loaded: list[Worker]) -> bool:
    """Whether system memory holds one more child as large as the largest loaded one (with a margin)."""
    sizes = [s for s in (w.private_bytes() for w in loaded) if s is not None]
    available = _available_memory()
    return not sizes or available is None or available >= 1.25 * max(sizes) + _MEMORY_MARGIN


def interleave(workers: list[Worker], reps: int, *, max_loaded: int | None = None,
               log: Callable[[str], None] = print, on_step: Callable[[Worker, int], None] | None = None) -> None:
    """Run ``reps`` rounds; each round runs one repetition of every configuration not yet failed, in order.

    A configuration loaded for the first time stays loaded while fewer than ``max_loaded``
    children (all of them when None) leave room for one more and system memory holds one more
    child as large as the largest so far; the others are reloaded and warmed up for each
    repetition (``resident`` False). ``on_step(worker, rep)`` follows every (configuration,
    repetition) slot, failed or not. Every child is stopped on return (killed on an exception).
    """
    keep = len(workers) if max_loaded is None or len(workers) <= max_loaded else max_loaded - 1
    try:
        for rep in range(reps):
            log(f"repetition {rep + 1}/{reps}")
            for worker in workers:
                if worker.error is None:
                    _run_slot(worker, rep, workers, keep, log)
                if on_step is not None:
                    on_step(worker, rep)
    except BaseException:  # interrupted: kill the children at once
        for worker in workers:
            worker.stop(grace=0)
        raise
    for worker in workers:
        worker.stop()


def _run_slot(worker: Worker, rep: int, workers: list[Worker], keep: int, log: Callable[[str], None]) -> None:
    """One repetition of ``worker``, loading it first when needed."""
    if not worker.running:
        if rep == 0:
            log(f"loading {worker.name}")
        if not worker.start():
            log(f"  {worker.name} failed: {worker.error}")
            return
        if rep == 0:
            loaded = [w for w in workers if w.running]
            worker.resident = len(loaded) <= keep and (len(loaded) == len(workers) or _room_for_another(loaded))
            if not worker.resident:
                log(f"  {worker.name} is reloaded for every repetition (no room to keep it loaded)")
    if not worker.repetition(rep):
        log(f"  {worker.name} failed: {worker.error}")
    elif not worker.resident:
        worker.stop()


if __name__ == "__main__":
    _child_main()
