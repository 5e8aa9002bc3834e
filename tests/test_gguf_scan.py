"""gguf_scan against gguf-py's reader and writer: the same metadata and tensors, copies that
gguf-py reads back with identical data, clean errors for damaged files."""

from __future__ import annotations

import io

import gguf
import numpy as np
import pytest

from allocmoe_edge.errors import AllocMoeError
from allocmoe_edge.gguf_scan import StringArray, copy_with_fields, scan, stored_data_bytes

T = gguf.GGUFValueType


def _write(path, alignment: int | None = None, endianess=gguf.GGUFEndian.LITTLE):
    w = gguf.GGUFWriter(path, "llama", endianess=endianess)
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_block_count(2)
    w.add_key_value("test.u8", 7, T.UINT8)
    w.add_key_value("test.i64", -5, T.INT64)
    w.add_key_value("test.f64", 0.25, T.FLOAT64)
    w.add_key_value("test.bool", True, T.BOOL)
    w.add_key_value("test.str", "héllo", T.STRING)
    w.add_key_value("test.u32s", [1, 2, 3], T.ARRAY, sub_type=T.UINT32)
    w.add_key_value("test.f32s", [0.5, -1.0], T.ARRAY, sub_type=T.FLOAT32)
    w.add_key_value("tokenizer.ggml.tokens", [f"tok{i}" for i in range(300)] + ["ü", ""], T.ARRAY,
                    sub_type=T.STRING)
    rng = np.random.default_rng(0)
    w.add_tensor("a.weight", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("b.weight", rng.standard_normal((7,)).astype(np.float16))
    q = rng.integers(0, 255, size=(2, 36), dtype=np.uint8)  # two q4_0 blocks (32 weights, 18 bytes) per row
    w.add_tensor("c.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _reference(path):
    r = gguf.GGUFReader(path)
    fields = {}
    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            continue
        v = f.contents()
        fields[name] = v.tolist() if isinstance(v, np.ndarray) else v
    tensors = {t.name: (tuple(int(n) for n in t.shape), int(t.tensor_type), bytes(t.data.tobytes())) for t in r.tensors}
    return fields, tensors


@pytest.mark.parametrize("alignment", [None, 64])
@pytest.mark.parametrize("endianess", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])
def test_scan_reads_what_gguf_py_reads(tmp_path, alignment, endianess):
    path = _write(tmp_path / "m.gguf", alignment, endianess)
    fields, tensors = _reference(path)
    h = scan(path)
    assert h.byteorder == (">" if endianess == gguf.GGUFEndian.BIG else "<")
    assert isinstance(h.fields["tokenizer.ggml.tokens"].value, StringArray)  # not decoded unless asked
    assert {k: h.get(k) for k in h.fields} == fields
    assert h.get("test.f32s") == [0.5, -1.0] and h.get("missing", 3) == 3
    with open(path, "rb") as f:
        data = f.read()
    got = {t.name: (t.shape, t.ggml_type, data[h.data_start + t.offset:h.data_start + t.offset + t.n_bytes])
           for t in h.tensors}
    assert got == tensors


@pytest.mark.parametrize("alignment", [None, 64])
@pytest.mark.parametrize("new_alignment", [None, 128])
def test_copy_keeps_entries_and_tensors(tmp_path, alignment, new_alignment):
    """Entries dropped and added, tensor data laid out for the copy's alignment (its own key, or a new one)."""
    src = _write(tmp_path / "m.gguf", alignment)
    h = scan(src)
    packer = gguf.GGUFWriter(None, "llama")

    def entry(key, value, vtype, sub=None) -> bytes:
        return packer._pack_val(key, T.STRING, add_vtype=False) + packer._pack_val(value, vtype, True, sub)

    added = [entry("test.new", [4, 5], T.ARRAY, T.INT32)]
    if new_alignment:
        added.append(entry("general.alignment", new_alignment, T.UINT32))
    dropped = {"test.str", "general.alignment"} if new_alignment else {"test.str"}
    out = io.BytesIO()
    copy_with_fields(h, out, keep=lambda k: k not in dropped, added=added, alignment=new_alignment or h.alignment)
    dst = tmp_path / "copy.gguf"
    dst.write_bytes(out.getvalue())
    fields, tensors = _reference(dst)  # gguf-py places the data by the copy's general.alignment
    before_fields, before_tensors = _reference(src)
    assert tensors == before_tensors
    expected = {k: v for k, v in before_fields.items() if k not in dropped}
    assert fields == {**expected, "test.new": [4, 5], **({"general.alignment": new_alignment} if new_alignment else {})}
    assert scan(dst).alignment == (new_alignment or alignment or 32)


def test_damaged_files_are_clean_errors(tmp_path):
    src = _write(tmp_path / "m.gguf")
    data = src.read_bytes()
    cases = {"empty": b"", "magic": b"GGUX" + data[4:], "header": data[:40], "tensors": data[:-40],
             "version": data[:4] + (9).to_bytes(4, "little") + data[8:]}
    for name, content in cases.items():
        bad = tmp_path / f"{name}.gguf"
        bad.write_bytes(content)
        with pytest.raises(AllocMoeError, match="not a readable GGUF file"):
            scan(bad)
    with pytest.raises(AllocMoeError, match="no such file"):
        scan(tmp_path / "missing.gguf")


def test_a_sparse_file_copies_sparse_and_equal(tmp_path, monkeypatch):
    """synth --no-weights writes holes for the weights; a copy with new metadata keeps them holes (a 30B
    shape stamps in a second) and reads back equal, tensor data and the length of a trailing hole included."""
    from allocmoe_edge.gguf_meta import copy_with_metadata
    from allocmoe_edge.synth import synthesize

    src = synthesize("olmoe-1b-7b", "q4_0", tmp_path / "sparse.gguf", n_layer=2, weights=False)
    dense = src.stat().st_size
    assert src.stat().st_blocks * 512 < dense // 20  # mostly holes
    assert stored_data_bytes(scan(src)) < dense // 20
    # the disk-space check counts the bytes the copy writes, not the holes
    monkeypatch.setattr("allocmoe_edge.gguf_meta.writer._free_bytes", lambda folder: dense // 2)
    out = tmp_path / "copy.gguf"
    copy_with_metadata(src, out, {"allocmoe.test": (7, gguf.GGUFValueType.UINT32, None)}, drop=lambda key: False)
    assert out.stat().st_blocks * 512 < dense // 20
    a, b = scan(src), scan(out)
    assert out.stat().st_size == b.data_start + b.tensors[-1].offset + b.tensors[-1].n_bytes
    with open(src, "rb") as f, open(out, "rb") as g:
        for ta, tb in zip(a.tensors, b.tensors):
            f.seek(a.data_start + ta.offset)
            g.seek(b.data_start + tb.offset)
            assert f.read(ta.n_bytes) == g.read(tb.n_bytes), ta.name
    assert b.fields["allocmoe.test"].value == 7
