"""requirements.lock pins everything `make` installs, and the venv `make` built holds exactly it."""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from allocmoe_edge.build_runtime import BINDINGS_BUILD_REQUIRES, BINDINGS_DEPENDENCIES

ROOT = Path(__file__).resolve().parent.parent


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and " " not in line, f"not an exact pin: {line!r}"
            pins[_canon(name)] = version
    return pins


def _name(requirement: str) -> str:
    return _canon(re.match(r"[A-Za-z0-9_.-]+", requirement).group(0))


def test_lock_pins_every_requirement():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
    wanted += [*BINDINGS_DEPENDENCIES, *BINDINGS_BUILD_REQUIRES, "torch", "pip", "setuptools"]
    missing = sorted({_name(r) for r in wanted} - set(_lock()))
    assert not missing, f"requirements.lock lacks {missing}: run `make lock`"
    assert _lock()["torch"] == "2.13.0"


@pytest.mark.skipif(Path(sys.prefix).resolve() != (ROOT / ".venv").resolve(),
                    reason="checks the venv that `make` builds")
def test_make_venv_holds_the_locked_versions():
    pins = _lock()
    wrong = {}
    for dist in metadata.distributions():
        name = _canon(dist.metadata["Name"])
        version = dist.version.split("+")[0]
        if name in pins and pins[name] != version:
            wrong[name] = (version, pins[name])
    assert not wrong, f"installed vs locked: {wrong}"
