"""Fuzz of the patched loader (tests/fuzz_loader.py): hundreds of GGUFs with mutated allocmoe
metadata, loaded in worker subprocesses; only a load that runs the contract's counts or a clean
load error is allowed. Also the generator's own guarantees and read_info on hostile plan keys."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest

from allocmoe_edge.errors import AllocMoeError
from allocmoe_edge.gguf_meta import Keys, read_info

from . import fuzz_loader

T = gguf.GGUFValueType
PREFIX = Keys.PREFIX
N_CASES = 500  # the whole catalogue (445 cases) and seeded random combinations


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return fuzz_loader.write_base(tmp_path_factory.mktemp("fuzz") / "base.gguf")


def test_cases_are_deterministic_and_cover_the_contract(base):
    info = read_info(base)
    a, b = fuzz_loader.make_cases(info, N_CASES, 0), fuzz_loader.make_cases(info, N_CASES, 0)
    assert [c.name for c in a] == [c.name for c in b] and len(a) == N_CASES
    assert [c.name for c in fuzz_loader.make_cases(info, N_CASES, 1)] != [c.name for c in a]
    names = " ".join(c.name for c in a)
    for family in ("type:", "drop:", "len:", "val:", "kmin=", "kmax=", "version=", "enabled=", "plan_count=",
                   "file_plan_index=", "override_plan_index=", "dup:", "rand"):
        assert family in names, family
    base_kv = fuzz_loader.base_fields(info)
    verdicts = [fuzz_loader.expected(c, info, base_kv) for c in a]
    assert sum(v is None for v in verdicts) > 100 and sum(v is not None for v in verdicts) > 100


def test_duplicated_key_is_really_written_twice(base, tmp_path):
    info = read_info(base)
    case = next(c for c in fuzz_loader.catalogue(info) if c.duplicate == PREFIX + "version")
    out = tmp_path / "dup.gguf"
    fuzz_loader.write_case(base, case, fuzz_loader.base_fields(info), out)
    assert out.read_bytes().count(PREFIX.encode() + b"version") == 2
    with pytest.raises(AllocMoeError):  # gguf-py cannot read it either: a clean error
        read_info(out)


@pytest.mark.parametrize("fields, error", [
    # the plans are found from their keys: a huge plan_count reads the two stored (it used to loop 4e9 times)
    ({PREFIX + "plan_count": (2**32 - 1, T.UINT32, None)}, None),
    ({PREFIX + "plan_count": ("2", T.STRING, None)}, "allocmoe.plan_count is not an integer"),
    ({PREFIX + "plan.0.budget": ([0.5, 0.5], T.ARRAY, T.FLOAT32)}, "allocmoe.plan.0.* has values of the wrong type"),
    ({PREFIX + "plan.1.layer_expert_counts": (3, T.UINT32, None)}, "allocmoe.plan.1.* has values of the wrong type"),
    ({PREFIX + "plan.0.budget_count": ("7", T.STRING, None)}, "allocmoe.plan.0.* has values of the wrong type"),
])
def test_read_info_on_hostile_plan_keys(base, tmp_path, fields, error):
    """read_info (behind inspect, run, eval) refuses a plan key of the wrong type with one AllocMoeError that
    names it, and reads the stored plans whatever plan_count claims."""
    info = read_info(base)
    case = fuzz_loader.Case("hostile", dict(fields))
    out = tmp_path / "h.gguf"
    fuzz_loader.write_case(base, case, fuzz_loader.base_fields(info), out)
    if error is None:
        got = read_info(out)
        assert [list(p.counts) for p in got.plans] == fuzz_loader.base_plans(info)[0]
        assert [p.name for p in got.plans] == ["p0", "p1"]
    else:
        with pytest.raises(AllocMoeError) as e:
            read_info(out)
        assert str(e.value) == f"{out}: {error}; the file's plan metadata is malformed"


def test_a_dying_batch_is_rerun_per_file_and_names_the_file(base, monkeypatch):
    """A worker that dies mid-batch: the files it did not report are rerun alone, and the one
    that dies alone carries the reason (the others are judged normally)."""
    calls = []

    def fake_worker(jobs, folder, timeout):
        calls.append([Path(j["file"]).name for j in jobs])
        recs = [{"file": j["file"], "loaded": False, "counts": None, "finite": None, "error": "", "python": "ok"}
                for j in jobs]
        if len(jobs) > 1:
            return recs[:3], "killed by signal SIGSEGV: "
        return ([], "killed by signal SIGSEGV: ") if jobs[0]["file"].endswith("case0003.gguf") else (recs, "")

    monkeypatch.setattr(fuzz_loader, "_run_worker", fake_worker)
    results = fuzz_loader.fuzz(base, 6, seed=0, batch=6, log=lambda _: None)
    assert calls[1:] == [["case0003.gguf"], ["case0004.gguf"], ["case0005.gguf"]]
    assert "SIGSEGV" in results[3]["problem"]
    assert not any("SIGSEGV" in r["problem"] for i, r in enumerate(results) if i != 3)


@pytest.mark.slow
@pytest.mark.runtime
def test_loader_fuzz(patched_runtime, base):
    results = fuzz_loader.fuzz(base, N_CASES, seed=0, batch=100, timeout=240, log=lambda _: None)
    assert len(results) == N_CASES
    problems = [f"#{r['index']} {r['case']} (plan_index override {r['override']}): {r['problem']}"
                for r in results if r["problem"]]
    assert not problems, "\n".join(problems)
    loaded = [r for r in results if r["loaded"]]
    refused = [r for r in results if not r["loaded"]]
    assert len(loaded) > 100 and len(refused) > 100
    # a refusal names its reason (the loader's error line)
    assert all("error loading model" in r["error"] or "gguf" in r["error"] for r in refused), \
        [r for r in refused if "error loading model" not in r["error"]][:3]
