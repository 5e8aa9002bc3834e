"""allocmoe.* metadata: round trips, validation, never touching the input."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from allocmoe_edge.errors import AllocMoeError
from allocmoe_edge.gguf_meta import (
    AllocmoeMeta,
    Keys,
    StoredPlan,
    copy_with_metadata,
    expand_counts,
    find_plan,
    plan_for_counts,
    read_info,
    stamp,
    stored_plan_from_file,
)
from allocmoe_edge.plan import Budget, Plan, PlanModelShape

from .ggufs import write_fake_moe


def test_read_info_shape(tmp_path):
    info = read_info(write_fake_moe(tmp_path / "m.gguf", n_layer=4, n_expert=8, k=2, dense_first=True))
    assert (info.architecture, info.block_count, info.expert_count, info.expert_used_count) == ("qwen2moe", 4, 8, 2)
    assert info.moe_layers == [1, 2, 3]
    assert info.full_budget == 6
    assert info.allocmoe == {}


def test_stamp_round_trip_keeps_input_and_tensors(tmp_path):
    src = write_fake_moe(tmp_path / "m.gguf")
    before = src.read_bytes()
    info = read_info(src)
    plans = [plan_for_counts(info, [2, 1, 1, 2]), plan_for_counts(info, [1, 1, 1, 1], method="uniform")]
    out = stamp(src, tmp_path / "o.gguf", plans, default=1, k_min=1, k_max=2)
    assert src.read_bytes() == before
    assert out.allocmoe["layer_expert_counts"] == [1, 1, 1, 1]
    assert out.allocmoe["plan_count"] == 2 and out.allocmoe["plan_default"] == 1
    assert [p.counts for p in out.plans] == [(2, 1, 1, 2), (1, 1, 1, 1)]
    assert out.plans[0].budget == pytest.approx(6 / 8) and out.plans[0].budget_count == 6
    assert out.expert_used_count == 2  # the standard key keeps the original scalar
    reader = gguf.GGUFReader(tmp_path / "o.gguf")
    f = reader.get_field("allocmoe.layer_expert_counts")
    assert f.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32]
    src_tensors = {t.name: np.array(t.data) for t in gguf.GGUFReader(src).tensors}
    for t in reader.tensors:
        np.testing.assert_array_equal(np.array(t.data), src_tensors[t.name])


def test_restamp_replaces_old_plans(tmp_path):
    src = write_fake_moe(tmp_path / "m.gguf")
    info = read_info(src)
    stamp(src, tmp_path / "a.gguf", [plan_for_counts(info, [2, 2, 1, 1])] * 3)
    out = stamp(tmp_path / "a.gguf", tmp_path / "b.gguf", [plan_for_counts(info, [1, 2, 2, 1])])
    assert out.allocmoe["plan_count"] == 1
    assert [p.counts for p in out.plans] == [(1, 2, 2, 1)]


@pytest.mark.parametrize("counts, msg", [
    ([0, 1, 1, 1], "outside"), ([9, 1, 1, 1], "outside"), ([1, 1, 1], "counts given"),
])
def test_bad_counts_rejected(tmp_path, counts, msg):
    src = write_fake_moe(tmp_path / "m.gguf")
    info = read_info(src)
    with pytest.raises(AllocMoeError, match=msg):
        stamp(src, tmp_path / "o.gguf", [plan_for_counts(info, counts)])
    assert not (tmp_path / "o.gguf").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_k_min_above_a_count_rejected(tmp_path):
    src = write_fake_moe(tmp_path / "m.gguf")
    info = read_info(src)
    with pytest.raises(AllocMoeError, match="token_k_min"):
        stamp(src, tmp_path / "o.gguf", [plan_for_counts(info, [1, 2, 2, 2])], k_min=2)


def test_refuses_to_overwrite_input(tmp_path):
    src = write_fake_moe(tmp_path / "m.gguf")
    info = read_info(src)
    with pytest.raises(AllocMoeError, match="overwrite the input"):
        stamp(src, src, [plan_for_counts(info, [1, 1, 1, 1])])


def test_per_moe_layer_counts_expand(tmp_path):
    info = read_info(write_fake_moe(tmp_path / "m.gguf", dense_first=True))
    assert expand_counts(info, [1, 2, 1]) == [2, 1, 2, 1]


def test_corrupted_and_truncated_files(tmp_path):
    src = write_fake_moe(tmp_path / "m.gguf")
    (tmp_path / "t.gguf").write_bytes(src.read_bytes()[:100])
    for bad in (tmp_path / "t.gguf", tmp_path / "missing.gguf"):
        with pytest.raises(AllocMoeError):
            read_info(bad)


def test_plan_file_checked_against_gguf(tmp_path):
    src = write_fake_moe(tmp_path / "m.gguf", dense_first=True)
    info = read_info(src)
    ident = PlanModelShape("Qwen2MoeForCausalLM", 4, (1, 2, 3), 8, 2)
    plan = Plan(model=ident, budget=Budget.parse("0.5", ident), method="alloc-l", counts=(1, 1, 1), token_k_max=0)
    plan.save(tmp_path / "p.json")
    sp = stored_plan_from_file(info, tmp_path / "p.json")
    assert sp.counts == (2, 1, 1, 1) and sp.budget_count == 3
    other = PlanModelShape("Qwen2MoeForCausalLM", 4, (1, 2, 3), 16, 2)
    Plan(model=other, budget=Budget.parse("0.5", other), method="alloc-l", counts=(1, 1, 1),
         token_k_max=0).save(tmp_path / "q.json")
    with pytest.raises(AllocMoeError, match="expert count"):
        stored_plan_from_file(info, tmp_path / "q.json")


def test_find_plan_by_budget(tmp_path):
    src = write_fake_moe(tmp_path / "m.gguf")
    info = read_info(src)
    out = stamp(src, tmp_path / "o.gguf", [plan_for_counts(info, [1, 1, 1, 1]), plan_for_counts(info, [2, 1, 2, 1])])
    assert find_plan(out, 0.5) == 0 and find_plan(out, 0.75) == 1
    with pytest.raises(AllocMoeError, match="no stored plan"):
        find_plan(out, 0.25)
    assert isinstance(out.plans[0], StoredPlan)


def test_typed_metadata_view(tmp_path):
    src = write_fake_moe(tmp_path / "m.gguf")
    info = read_info(src)
    assert info.meta == AllocmoeMeta() and not info.meta.has_plan
    out = stamp(src, tmp_path / "o.gguf", [plan_for_counts(info, [2, 1, 1, 2]), plan_for_counts(info, [1, 1, 1, 1])],
                default=1, k_min=1, k_max=2)
    meta = out.meta
    assert meta.has_plan and meta.layer_expert_counts == (1, 1, 1, 1) and meta.budget_count == 4
    assert (meta.version, meta.enabled, meta.token_k_min, meta.token_k_max, meta.token_mode) == (1, True, 1, 2, "batch")
    assert (meta.plan_count, meta.plan_default, meta.source, meta.malformed) == (2, 1, "m.gguf", ())
    assert meta.plans == tuple(out.plans) and meta.plans[0].counts == (2, 1, 1, 2)
    for name in meta.keys:  # every key the file has is named by Keys and typed by AllocmoeMeta
        assert getattr(Keys, name.upper()) == Keys.PREFIX + name and hasattr(meta, name)
    assert Keys.PLAN_BUDGET.format(index=1) == "allocmoe.plan.1.budget"


def test_malformed_metadata_keeps_defaults_and_is_named(tmp_path):
    src = write_fake_moe(tmp_path / "m.gguf")
    info = read_info(src)
    good = stamp(src, tmp_path / "o.gguf", [plan_for_counts(info, [2, 1, 1, 2])], k_min=1, k_max=2)
    T = gguf.GGUFValueType
    bad = tmp_path / "bad.gguf"
    copy_with_metadata(good.path, bad, {Keys.TOKEN_K_MAX: ("two", T.STRING, None),
                                        Keys.TOKEN_MODE: ("sideways", T.STRING, None)}, drop=lambda k: False)
    meta = read_info(bad).meta
    assert set(meta.malformed) == {"token_k_max", "token_mode"} and meta.has_plan
    assert (meta.token_k_max, meta.token_mode) == (0, "batch")  # the defaults
    with pytest.raises(AllocMoeError, match="allocmoe.token_k_max"):
        meta.check(bad)


def test_copy_keeps_a_custom_alignment(tmp_path):
    """A GGUF aligned to 64 bytes is copied with its data aligned to 64 (readers place it by general.alignment)."""
    src = tmp_path / "a64.gguf"
    w = gguf.GGUFWriter(src, "qwen2moe")
    w.add_custom_alignment(64)
    w.add_block_count(1)
    tensors = {"a": np.arange(5, dtype=np.float32), "b": np.arange(7, dtype=np.float32) + 100,
               "c": np.arange(3, dtype=np.float32) - 7}  # sizes not multiples of 32 or 64: padding shows
    for name, data in tensors.items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    T = gguf.GGUFValueType
    dst = tmp_path / "copy.gguf"
    copy_with_metadata(src, dst, {Keys.SOURCE: ("a64.gguf", T.STRING, None)}, drop=lambda k: False)
    reader = gguf.GGUFReader(dst)
    assert reader.alignment == 64 and reader.get_field("general.alignment").contents() == 64
    assert reader.get_field(Keys.SOURCE).contents() == "a64.gguf"
    assert {t.name for t in reader.tensors} == set(tensors)
    for t in reader.tensors:
        np.testing.assert_array_equal(np.array(t.data), tensors[t.name])
        assert t.data_offset % 64 == 0
