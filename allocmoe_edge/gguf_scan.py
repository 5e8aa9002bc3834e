"""Fast reads of a GGUF's header, and copies that change only its metadata.

gguf-py's ``GGUFReader`` makes a numpy view for every element of every array: seconds for one
50k-token vocabulary, and the tools here read a model's header many times (an evaluation loads
one file once per configuration). `scan` reads the header in one pass over a memory map with
``struct``; string arrays (vocabularies, merges) are only measured, and decoded when asked for.
`copy_with_fields` writes a copy with metadata replaced: kept entries byte for byte, tensor data
copied as is and laid out for the copy's ``general.alignment``.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .errors import AllocMoeError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = "general.alignment"
# GGUFValueType -> struct format of one value (STRING = 8 and ARRAY = 9 are handled apart)
VALUE_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
_CHUNK = 64 << 20  # tensor data is copied in pieces of this many bytes


class _Truncated(Exception):
    """The header ends before a value it announces."""


@dataclass(frozen=True)
class StringArray:
    """A string array left undecoded: ``count`` strings from byte ``start`` of the file."""

    start: int
    count: int


@dataclass(frozen=True)
class Field:
    """One metadata entry: its type (GGUFValueType value), element type for arrays, value and the
    byte span of the whole entry (key included) in the file."""

    name: str
    type: int
    sub_type: int | None
    value: Any  # int, float, bool, str, a list, or StringArray (see GgufHeader.contents)
    span: tuple[int, int]


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's description: ``shape`` as ggml orders it (ne0 first), ``offset`` into the data
    section, ``n_bytes`` of data."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    n_bytes: int


@dataclass
class GgufHeader:
    """A scanned GGUF: metadata, tensor infos, and where the data section starts."""

    path: Path
    byteorder: str  # "<" or ">" (struct prefix)
    version: int
    fields: dict[str, Field]
    tensors: list[TensorInfo]
    alignment: int
    data_start: int

    def get(self, key: str, default: Any = None) -> Any:
        """The decoded value of ``key`` (string arrays as lists of str), or ``default``."""
        return self.contents(key) if key in self.fields else default

    def contents(self, key: str) -> Any:
        value = self.fields[key].value
        if isinstance(value, StringArray):
            with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _Cursor(mm, value.start, self.byteorder).strings(value.count, decode=True)
        return value


class _Cursor:
    """Sequential reads from a buffer in one byte order."""

    def __init__(self, buf: Any, pos: int, byteorder: str) -> None:
        self.buf, self.pos, self.order = buf, pos, byteorder

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise _Truncated
        (value,) = struct.unpack_from(self.order + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def raw(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise _Truncated
        out = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return out

    def string(self) -> str:
        return self.raw(self.take("Q")).decode("utf-8")

    def strings(self, count: int, decode: bool) -> list[str]:
        """``count`` strings; with ``decode`` False they are only skipped (an empty list comes back)."""
        if decode:
            return [self.raw(self.take("Q")).decode("utf-8") for _ in range(count)]
        length, buf, pos, end = struct.Struct(self.order + "Q").unpack_from, self.buf, self.pos, len(self.buf)
        for _ in range(count):  # the hot loop of a vocabulary: locals only
            if pos + 8 > end:
                raise _Truncated
            pos += 8 + length(buf, pos)[0]
        if pos > end:
            raise _Truncated
        self.pos = pos
        return []

    def value(self, vtype: int, decode_strings: bool) -> tuple[Any, int | None]:
        """A value of ``vtype`` and its array element type."""
        if vtype in VALUE_FORMATS:
            return self.take(VALUE_FORMATS[vtype]), None
        if vtype == STRING:
            return self.string(), None
        if vtype != ARRAY:
            raise ValueError(f"unknown metadata value type {vtype}")
        sub, count = self.take("I"), self.take("Q")
        if sub == STRING:
            if decode_strings:
                return self.strings(count, decode=True), sub
            start = self.pos
            self.strings(count, decode=False)
            return StringArray(start, count), sub
        if sub in VALUE_FORMATS:
            fmt = VALUE_FORMATS[sub]
            size = struct.calcsize(fmt)
            if count * size > len(self.buf) - self.pos:
                raise _Truncated
            values = list(struct.unpack_from(f"{self.order}{count}{fmt}", self.buf, self.pos))
            self.pos += count * size
            return values, sub
        if sub == ARRAY:  # nested arrays: rare, decoded element by element
            return [self.value(ARRAY, decode_strings)[0] for _ in range(count)], sub
        raise ValueError(f"unknown array element type {sub}")


def _tensor_bytes(shape: tuple[int, ...], ggml_type: int) -> int:
    import gguf

    try:
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise ValueError(f"unknown tensor type {ggml_type}") from None
    elements = 1
    for n in shape:
        elements *= n
    return elements // block * type_size


def _parse(buf: Any, path: Path, decode_strings: Callable[[str], bool]) -> GgufHeader:
    if bytes(buf[:4]) != MAGIC:
        raise ValueError("no GGUF magic")
    order = "<"
    version = struct.unpack_from("<I", buf, 4)[0]
    if version & 0xFFFF == 0:  # written on a big-endian machine
        order, version = ">", struct.unpack_from(">I", buf, 4)[0]
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported")
    cur = _Cursor(buf, 8, order)
    n_tensors, n_kv = cur.take("Q"), cur.take("Q")
    fields: dict[str, Field] = {}
    for _ in range(n_kv):
        start = cur.pos
        name = cur.string()
        vtype = cur.take("I")
        value, sub = cur.value(vtype, decode_strings(name))
        if name in fields:
            raise ValueError(f"duplicated key {name}")
        fields[name] = Field(name, vtype, sub, value, (start, cur.pos))
    tensors = []
    for _ in range(n_tensors):
        name = cur.string()
        shape = tuple(cur.take("Q") for _ in range(cur.take("I")))
        ggml_type, offset = cur.take("I"), cur.take("Q")
        tensors.append(TensorInfo(name, shape, ggml_type, offset, _tensor_bytes(shape, ggml_type)))
    alignment = fields[ALIGNMENT_KEY].value if ALIGNMENT_KEY in fields else DEFAULT_ALIGNMENT
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"{ALIGNMENT_KEY} {alignment!r} is not a power of two")
    data_start = -(-cur.pos // alignment) * alignment
    if any(data_start + t.offset + t.n_bytes > len(buf) for t in tensors):
        raise _Truncated
    return GgufHeader(path, order, version, fields, tensors, alignment, data_start)


def scan(path: str | os.PathLike[str], decode_strings: Callable[[str], bool] = lambda key: False) -> GgufHeader:
    """The header of the GGUF at ``path``; string arrays are decoded for keys where
    ``decode_strings(key)`` is true, else left as `StringArray`. A missing, truncated or
    corrupted file is a clean error."""
    p = Path(path)
    if not p.is_file():
        raise AllocMoeError(f"{p}: no such file")
    try:
        with open(p, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise ValueError("empty file")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _parse(mm, p, decode_strings)
    except _Truncated:
        raise AllocMoeError(f"{p} is not a readable GGUF file (it is truncated)") from None
    except (ValueError, UnicodeDecodeError, OverflowError, struct.error) as e:
        raise AllocMoeError(f"{p} is not a readable GGUF file ({e})") from e


def _pad(out: BinaryIO, alignment: int) -> None:
    out.write(b"\0" * (-out.tell() % alignment))


def _data_extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """The ranges [a, b) of [start, end) that hold data: a sparse file's holes (zeros when read) are left
    out; where the file system cannot tell, all of it."""
    at = start
    while at < end:
        try:
            a = os.lseek(fd, at, os.SEEK_DATA)
        except OSError as e:  # ENXIO: no data from ``at`` to the end of the file; else unsupported
            if e.errno != errno.ENXIO:
                yield at, end
            return
        if a >= end:
            return
        b = min(os.lseek(fd, a, os.SEEK_HOLE), end)
        yield a, b
        at = b


def stored_data_bytes(header: GgufHeader) -> int:
    """Bytes of tensor data the file really stores (a sparse file's holes left out): what a copy writes."""
    with open(header.path, "rb") as f:
        return sum(b - a for t in header.tensors
                   for a, b in _data_extents(f.fileno(), header.data_start + t.offset,
                                             header.data_start + t.offset + t.n_bytes))


def copy_with_fields(header: GgufHeader, out: BinaryIO, keep: Callable[[str], bool], added: list[bytes],
                     alignment: int, progress: Callable[[int, int], None] | None = None) -> None:
    """Write a copy of ``header``'s file to ``out``: the entries ``keep`` accepts byte for byte, then
    ``added`` (packed key-value entries in the file's byte order), the tensor infos with offsets
    for ``alignment``, and every tensor's data."""
    kept = [f for f in header.fields.values() if keep(f.name)]
    o = header.byteorder
    total = sum(t.n_bytes for t in header.tensors)
    with open(header.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as src:
        out.write(MAGIC + struct.pack(f"{o}IQQ", header.version, len(header.tensors), len(kept) + len(added)))
        for field in kept:
            out.write(src[field.span[0]:field.span[1]])
        for entry in added:
            out.write(entry)
        offset = 0
        for t in header.tensors:
            name = t.name.encode()
            out.write(struct.pack(f"{o}Q", len(name)) + name + struct.pack(f"{o}I", len(t.shape)))
            out.write(struct.pack(f"{o}{len(t.shape)}Q", *t.shape) + struct.pack(f"{o}IQ", t.ggml_type, offset))
            offset += -(-t.n_bytes // alignment) * alignment
        done = 0
        for t in header.tensors:
            _pad(out, alignment)
            start = header.data_start + t.offset
            at = start
            for a, b in _data_extents(f.fileno(), start, start + t.n_bytes):  # a sparse input stays sparse
                out.seek(a - at, os.SEEK_CUR)
                for piece in range(a, b, _CHUNK):
                    out.write(src[piece:min(piece + _CHUNK, b)])
                at = b
            out.seek(start + t.n_bytes - at, os.SEEK_CUR)
            done += t.n_bytes
            if progress:
                progress(done, total)
        out.truncate()  # the length reaches the end of a last tensor that was a hole
