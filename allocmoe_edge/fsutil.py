"""Files: atomic output (write under a temporary name in the target folder, fsync, rename), text
with its sha256, file hashes, scratch folders."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import AllocMoeError


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    On any exception the temporary file is removed, so a later run never mistakes a
    partial file for a complete one. With ``overwrite=False`` an existing ``path`` is an error.
    """
    target = Path(path)
    if not overwrite and target.exists():
        raise AllocMoeError(f"{target} exists; refusing to overwrite it (choose another output path)")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise AllocMoeError(f"could not write {target}: {e.strerror or e}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_text(path: str | os.PathLike[str]) -> tuple[str, dict[str, str]]:
    """The text of ``path`` (UTF-8, undecodable bytes replaced) and its description (path, sha256)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise AllocMoeError(f"could not read text file {p}: {e.strerror or e}") from e
    return data.decode("utf-8", errors="replace"), {"path": str(p), "sha256": hashlib.sha256(data).hexdigest()}


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def scratch_dir(parent: str | os.PathLike[str], prefix: str) -> Iterator[Path]:
    """A temporary folder ``parent/<prefix>XXXX`` removed on exit, SIGTERM included.

    The folder records its owner's pid; folders of the same prefix whose owner is gone (a
    run killed with SIGKILL, or a crash) are removed first, so big scratch copies never pile up.
    """
    import shutil
    import signal
    import threading

    base = Path(parent)
    for old in base.glob(f"{prefix}*"):
        try:
            pid = int((old / "owner.pid").read_text())
        except (OSError, ValueError):
            continue
        if not _pid_alive(pid):
            shutil.rmtree(old, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    (folder / "owner.pid").write_text(str(os.getpid()))
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None

    def _terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    if main:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        yield folder
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(folder, ignore_errors=True)
