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
    pack_entry,
    plan_for_counts,
    read_header,
    read_info,
    stamp,
    stored_plan_from_file,
)
from allocmoe_edge.plan import BUDGET_TOLERANCE, Budget, Plan, PlanModelShape

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
    assert find_plan(out, 0.5 - BUDGET_TOLERANCE / 2) == 0  # the tolerance `allocmoe eval --budgets` matches with
    for budget in (0.25, 0.5 - 2 * BUDGET_TOLERANCE):
        with pytest.raises(AllocMoeError, match="no stored plan"):
            find_plan(out, budget)
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


T = gguf.GGUFValueType
# one entry of every value type gguf-py writes, arrays of every item type included
ENTRIES = [("t.u8", 200, T.UINT8, None), ("t.i8", -100, T.INT8, None), ("t.u16", 60000, T.UINT16, None),
           ("t.i16", -30000, T.INT16, None), ("t.u32", 2**32 - 1, T.UINT32, None), ("t.i32", -(2**31), T.INT32, None),
           ("t.u64", 2**64 - 1, T.UINT64, None), ("t.i64", -(2**63), T.INT64, None), ("t.f32", 0.5, T.FLOAT32, None),
           ("t.f64", -1e300, T.FLOAT64, None), ("t.yes", True, T.BOOL, None), ("t.no", False, T.BOOL, None),
           ("t.str", "Grüße, 世界", T.STRING, None), ("t.empty_str", "", T.STRING, None),
           ("t.u32s", [1, 2, 2**32 - 1], T.ARRAY, T.UINT32), ("t.i32s", [-1, 0, 7], T.ARRAY, T.INT32),
           ("t.f32s", [0.25, float("inf"), -2.0], T.ARRAY, T.FLOAT32), ("t.f64s", [1e-300], T.ARRAY, T.FLOAT64),
           ("t.u8s", [0, 255], T.ARRAY, T.UINT8), ("t.i64s", [-(2**63)], T.ARRAY, T.INT64),
           ("t.bools", [True, False, True], T.ARRAY, T.BOOL), ("t.strs", ["a", "", "ß"], T.ARRAY, T.STRING)]


@pytest.mark.parametrize("endianess", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])
def test_pack_entry_writes_what_gguf_py_writes(tmp_path, endianess):
    """Byte for byte the key/value section gguf-py's writer puts in a file, in either byte order."""
    path = tmp_path / "kv.gguf"
    w = gguf.GGUFWriter(path, "qwen2moe", endianess=endianess)  # its first entry: general.architecture
    for key, value, vtype, sub in ENTRIES:
        w.add_key_value(key, value, vtype, sub)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    order = ">" if endianess == gguf.GGUFEndian.BIG else "<"
    ours = pack_entry("general.architecture", "qwen2moe", T.STRING, byteorder=order) + b"".join(
        pack_entry(key, value, vtype, sub, order) for key, value, vtype, sub in ENTRIES)
    assert path.read_bytes()[24:] == ours  # after magic, version, tensor and key/value counts


def test_pack_entry_writes_empty_arrays_and_refuses_unknown_types(tmp_path):
    """Empty arrays (which gguf-py refuses) read back empty, with their item type."""
    src = write_fake_moe(tmp_path / "m.gguf")
    out = tmp_path / "o.gguf"
    copy_with_metadata(src, out, {Keys.LAYER_EXPERT_COUNTS: ([], T.ARRAY, T.UINT32),
                                  Keys.TOOL: ([], T.ARRAY, T.STRING)}, drop=lambda k: False)
    header = read_header(out)
    assert header.get(Keys.LAYER_EXPERT_COUNTS) == [] and header.fields[Keys.LAYER_EXPERT_COUNTS].sub_type == T.UINT32
    assert header.get(Keys.TOOL) == [] and header.fields[Keys.TOOL].sub_type == T.STRING
    with pytest.raises(ValueError, match="cannot pack"):
        pack_entry("t.nested", [[1]], T.ARRAY, T.ARRAY)
    with pytest.raises(ValueError, match="cannot pack"):
        pack_entry("t.array_without_items_type", [1], T.ARRAY)
