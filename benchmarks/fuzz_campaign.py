"""make bench-fuzz: a fuzz campaign against the .vqad reader, each input under its own time and memory limits.

The campaign builds real files of every storage kind (SDFs fitted to the bunny: dense, codebook raw and
entropy-coded, hash, post-hoc lowrank and k-means; a radiance field of the built-in procedural scene) and
a few decompression bombs (full octrees with constant indices behind padded entropy-coded payloads), then
decodes ≥ 100,000 inputs derived from them:

* ``truncate``  every prefix of every file (a dense sample, chunk boundaries included, for big ones);
* ``bytes``     raw byte mutations (flips, cuts, insertions, deletions, overwrites), mostly CRC-caught;
* ``payload``   chunk payloads mutated, then re-framed with a correct length and CRC;
* ``frame``     frame fields (type, level, slot, codec, length) forged, with a CRC over the forgery;
* ``header``    header JSON values replaced / deleted / added at any depth (type confusion, huge ints,
                NaN / inf, deep nesting), or its text edited, behind a valid CRC;
* ``sequence``  whole chunks dropped, repeated, swapped, moved or spliced in from another file;
* ``bomb``      the bombs as they are, truncated, mutated or with forged headers.

Each input is decoded in a worker process by :class:`vqad.fileformat.StreamDecoder` (in one piece or
in random pieces); every complete LOD's field is built and evaluated on a few points, which must be
finite. Per input the worker measures the wall time and the peak resident growth (VmHWM reset through
``/proc/self/clear_refs`` before the input), against the decoder's own memory estimate
(``StreamDecoder.needed_bytes``, at least 64 MiB); ``RLIMIT_AS`` backs it up, and the parent kills an
input after 10 s. Inputs over 2 s are re-run alone at the end (the machine may be shared) and both
times reported.

Targets (issue 21): 0 exceptions other than ``StreamError``, 0 inputs over 2 s or over the memory
bound, over ≥ 100,000 inputs. Exit status 1 if one is missed.

    python benchmarks/fuzz_campaign.py [--inputs 100000] [--seed 0] [--workers 2] [--out docs/benchmarks/fuzz.md]
    python benchmarks/fuzz_campaign.py --quick              # a few hundred inputs on a quickly-fitted corpus
    python benchmarks/fuzz_campaign.py --replay header:sdf-hash:123   # one input, in this process, traceback shown
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import random
import resource
import struct
import sys
import time
import traceback
import warnings
import zlib
from collections import Counter, defaultdict, deque
from dataclasses import asdict, dataclass
from multiprocessing.connection import wait
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_INPUTS = 100_000
SLOW_SECONDS = 2.0  # an input taking longer is a failure
KILL_SECONDS = 10.0  # ... and is killed after this long
MEMORY_FLOOR = 64 << 20  # the memory bound of an input: max(the decoder's estimate, this)
DEFAULT_MAX_MEMORY = "768M"  # the decoder's limit in the campaign: bomb-quarter7 and -sparse7 fit, bomb-full7 not
CORPUS_VERSION = 6  # bump when the recipes change: the cache is rebuilt

PREFIX_SAMPLE = 5_000  # the fewest truncations a file too big for every prefix gets (when the budget allows)
FAMILIES = {
    "truncate": "every prefix of every real file (a dense sample, chunk boundaries ±1 included, for big ones)",
    "bytes": "1-8 raw edits: bit flips, cuts, insertions, deletions, overwrites, fills (mostly CRC-caught)",
    "payload": "a chunk's payload edited (fp16 NaN / inf / max included) or swapped for another's, re-framed "
               "with a correct length and CRC",
    "frame": "a frame field (type, level, slot, codec or length) forged, the CRC computed over the forgery",
    "header": "header JSON values replaced, deleted or added at any depth (hostile numbers, NaN / inf, huge "
              "ints, type confusion, deep nesting), or its text edited, behind a valid CRC",
    "sequence": "whole chunks dropped, repeated, swapped, moved, cut or spliced in from another file",
    "bomb": "the bombs as they are, truncated, or with a payload, frame, header or chunk sequence forged",
}
SHARES = {"truncate": 0.55, "bytes": 0.10, "payload": 0.12, "frame": 0.05, "header": 0.10, "sequence": 0.075,
          "bomb": 0.005}
OUTCOMES = ("full", "partial", "truncated", "corrupt", "limit", "escaped", "nonfinite", "killed", "crashed")
FAILURES = ("escaped", "nonfinite", "killed", "crashed")

PREAMBLE = 12
FRAME = struct.Struct("<BBBBI")
HEAD, DECO, TREE, GRID = 1, 2, 3, 4
RAW, RANGE, OCTREE = 0, 1, 2


# ================================================================================================
# the corpus: real files of every storage kind, and bombs
# ================================================================================================
@dataclass(frozen=True)
class CorpusFile:
    """One file the inputs are derived from."""

    name: str
    what: str
    kind: str  # the field's kind: sdf | nerf
    storage: str  # dense | codebook | hash | lowrank
    bomb: bool = False


def _data_dir() -> Path | None:
    env = os.environ.get("VQAD_DATA")
    d = Path(env) if env else REPO.parent / "shared" / "data"
    return d if (d / "meshes" / "bunny.obj").is_file() else None


def _sdf_field(mesh, quick: bool, storage: str, levels: tuple[int, int], features: int, per_lod: bool = False,
               **grid):
    """A short real fit of ``mesh`` (one thread), baked as ``vqad export`` bakes it."""
    import torch

    from vqad.config import DecoderConfig, GridConfig
    from vqad.sdf.fit import SDFTrainConfig, fit_sdf

    cfg = GridConfig(storage=storage, features=features, base_level=levels[0], max_level=levels[1], **grid)
    codebook = storage == "codebook"
    train = SDFTrainConfig(steps=4 if quick else 150, batch=2048, pool_size=20_000 if quick else 100_000,
                           resample_every=100, refine=int(codebook and not quick), refine_samples=20_000, seed=0,
                           checkpoint_minutes=None)
    res = fit_sdf(mesh, cfg, DecoderConfig(hidden=32, per_lod=per_lod), train, torch.device("cpu"), quiet=True)
    res.field.bake(fp16=True)
    return res.field


def _nerf_field(quick: bool):
    """A tiny radiance field fitted to the built-in procedural scene."""
    from dataclasses import replace

    import torch

    from vqad.config import GridConfig
    from vqad.nerf.fit import NERF_DECODER, NERF_FIELD, fit_nerf
    from vqad.nerf.formats import load_dataset
    from vqad.nerf.task import NeRFTrainConfig

    dataset = load_dataset("procedural")
    grid = GridConfig(storage="codebook", features=4, bits=3, base_level=2, max_level=4)
    train = NeRFTrainConfig(steps=3 if quick else 40, batch_rays=256, seed=0, checkpoint_minutes=None)
    res = fit_nerf(dataset, grid, replace(NERF_DECODER, hidden=16), train, torch.device("cpu"), quiet=True,
                   nerf_cfg=replace(NERF_FIELD, color_hidden=16))
    res.field.bake(fp16=True)
    return res.field


def frame(ctype: int, level: int, slot: int, codec: int, payload: bytes, length: int | None = None) -> bytes:
    """A chunk with a valid CRC (over the frame header, whose ``length`` may be forged, and the payload)."""
    head = FRAME.pack(ctype, level, slot, codec, len(payload) if length is None else length)
    return head + payload + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head)))


def _padded(payload: bytes, symbols: int) -> bytes:
    """An entropy-coded payload padded with zero words up to the reader's bomb guard (64 symbols per byte)."""
    from vqad.entropy import MAX_SYMBOLS_PER_BYTE

    need = -(-symbols // MAX_SYMBOLS_PER_BYTE) - len(payload)
    return payload + bytes(4 * -(-max(need, 0) // 4))


def _bombs() -> dict[str, tuple[str, bytes]]:
    """Small files describing huge models, ``{name: (what, bytes)}``: octrees with constant indices,
    every TREE chunk context-coded and every index chunk range-coded where that is smaller, padded just
    enough to pass the bomb guard (64 symbols per payload byte). Under the campaign's default limit,
    bomb-full7 must be refused and the others decode (within their estimates)."""
    import numpy as np
    import torch

    from vqad import entropy as E
    from vqad import fileformat as F
    from vqad.config import DecoderConfig, GridConfig
    from vqad.grid import OctreeGrid
    from vqad.octree import SparseOctree
    from vqad.sdf.field import SDFField

    octree = SparseOctree.dense(2, 6)
    field = SDFField(OctreeGrid.from_octree(octree, GridConfig("codebook", 4, 4, 2, 6)), DecoderConfig(hidden=8))
    field.bake(fp16=True)
    plain = [split_chunks(c)[1][0] for c in list(F.iter_chunks(field))[1:]]
    head, deco = plain[0], plain[1]

    def _plain(ctype: int, level: int, slot: int) -> Chunk:  # the chunk as the writer made it (RAW)
        return next(c for c in plain if (c.type, c.level, c.slot) == (ctype, level, slot))

    chunks = [head, deco]
    for level in octree.levels:
        parts = [(octree.codes_at(lv - 1).numpy(), lv - 1, octree.child_masks(lv).numpy())
                 for lv in (range(1, level + 1) if level == 2 else [level])]
        tree = _padded(E.encode_octree(parts), sum(p[0].size for p in parts))
        chunks.append(min(Chunk(TREE, level, 0, OCTREE, tree), _plain(TREE, level, 0), key=lambda c: len(c.payload)))
        chunks.append(_plain(GRID, level, 0))  # the codebook D
        m = octree.num_vertices(level)
        index = Chunk(GRID, level, 1, RANGE, _padded(E.encode(np.zeros(m, dtype=np.int64), 16), m))
        chunks.append(min(index, _plain(GRID, level, 1), key=lambda c: len(c.payload)))
    preamble = F.MAGIC + struct.pack("<HH", F.VERSION, 0)
    out = {"bomb-full6": ("levels 2..6 full (300k cells)", join_chunks(preamble, chunks))}
    parents = octree.codes_at(6).numpy()
    doc = json.loads(head.payload)
    doc["field"]["grid"]["max_level"] = 7
    doc["field"]["storage_params"].append({"bits": 4})
    head7 = Chunk(HEAD, 0, 0, RAW, json.dumps(doc).encode())
    for name, mask, what in (
        ("bomb-quarter7", 0b11, "bomb-full6 + a level 7 holding 2 of every 8 children (824k cells)"),
        ("bomb-sparse7", 0b1, "bomb-full6 + a level 7 holding 1 of every 8 children: no two of its cells share "
                              "a corner (562k cells, 2.4M vertices)"),
        ("bomb-full7", 0xFF, "bomb-full6 + a full level 7 (2.4M cells, over the limit)"),
    ):
        masks = np.full(parents.size, mask, dtype=np.uint8)
        codes7 = SparseOctree.codes_from_child_masks(torch.from_numpy(parents), torch.from_numpy(masks))
        m = 129 ** 3 if mask == 0xFF else SparseOctree.from_codes(codes7, 7, 7).num_vertices(7)
        tree = _padded(E.encode_octree([(parents, 6, masks)]), parents.size)
        level7 = [Chunk(TREE, 7, 0, OCTREE, tree), Chunk(GRID, 7, 0, RAW, _plain(GRID, 2, 0).payload),
                  Chunk(GRID, 7, 1, RANGE, _padded(E.encode(np.zeros(m, dtype=np.int64), 16), m))]
        out[name] = (what, join_chunks(preamble, [head7] + chunks[1:] + level7))
    path = SDFField(OctreeGrid.from_octree(SparseOctree.from_codes(torch.zeros(1, dtype=torch.long), 2, 8),
                                           GridConfig("codebook", 4, 4, 2, 8)), DecoderConfig(hidden=8))
    path.bake(fp16=True)
    out["bomb-path8"] = ("one cell per level down to level 8: the octree's dense level-8 tables cost the memory",
                         F.to_bytes(path))
    return out


def build_corpus(cache: Path, quick: bool, log=print) -> tuple[list[CorpusFile], dict[str, bytes]]:
    """The corpus files, from ``cache`` if it holds this recipe's, else fitted and written there."""
    from vqad import fileformat as F
    from vqad.atomicio import write_atomic

    cache.mkdir(parents=True, exist_ok=True)
    data = _data_dir()
    recipe = {"version": CORPUS_VERSION, "format": F.VERSION, "quick": quick, "meshes": data is not None}
    manifest = cache / "manifest.json"
    if manifest.is_file():
        saved = json.loads(manifest.read_text())
        if saved.get("recipe") == recipe and all((cache / f"{n}.vqad").is_file() for n in saved["files"]):
            files = [CorpusFile(**f) for f in saved["files"].values()]
            return files, {f.name: (cache / f"{f.name}.vqad").read_bytes() for f in files}
    import torch
    from vqad.posthoc import posthoc

    torch.set_num_threads(1)
    made: dict[str, tuple[CorpusFile, bytes]] = {}

    def add(name: str, what: str, blob: bytes, bomb: bool = False) -> None:
        cfg = json.loads(split_chunks(blob)[1][0].payload)["field"]
        made[name] = (CorpusFile(name, what, cfg["kind"], cfg["grid"]["storage"], bomb), blob)
        log(f"  corpus: {name}: {len(blob):,} bytes ({what})")

    t0 = time.perf_counter()
    log(f"building the corpus in {cache} ({'quick fits' if quick else 'short real fits'}) ...")
    if data is None:
        log("  corpus: no meshes found (../shared/data/meshes/bunny.obj or $VQAD_DATA): the SDF files are skipped")
    else:
        from vqad.sdf.mesh import load_mesh

        mesh = load_mesh(data / "meshes" / "bunny.obj")
        cb = _sdf_field(mesh, quick, "codebook", (2, 4), 8, bits=4)
        add("sdf-codebook", "bunny SDF, codebook b=4, k=8, levels 2..4, raw", F.to_bytes(cb))
        add("sdf-codebook-entropy", "the same, entropy-coded", F.to_bytes(cb, entropy=True))
        big = _sdf_field(mesh, quick, "codebook", (3, 6), 16, bits=6)
        add("sdf-codebook-l6", "bunny SDF, codebook b=6, k=16, levels 3..6, entropy-coded", F.to_bytes(big, entropy=True))
        dense = _sdf_field(mesh, quick, "dense", (2, 4), 2)
        add("sdf-dense", "bunny SDF, dense fp16, k=2, levels 2..4", F.to_bytes(dense))
        add("sdf-lowrank", "post-hoc lowrank r=1 of sdf-dense", F.to_bytes(posthoc(dense, "lowrank", rank=1)))
        add("sdf-kmeans-entropy", "post-hoc k-means b=3 of sdf-dense (a codebook), entropy-coded",
            F.to_bytes(posthoc(dense, "kmeans", bits=3), entropy=True))
        hashed = _sdf_field(mesh, quick, "hash", (2, 4), 4, per_lod=True, table_bits=7)
        add("sdf-hash", "bunny SDF, hash T=7, k=4, levels 2..4, one decoder per LOD", F.to_bytes(hashed))
    add("nerf-codebook-entropy", "procedural radiance field, codebook b=3, k=4, levels 2..4, entropy-coded",
        F.to_bytes(_nerf_field(quick), entropy=True))
    for name, (what, blob) in _bombs().items():
        add(name, what, blob, bomb=True)
    for name, (_, blob) in made.items():
        write_atomic(cache / f"{name}.vqad", blob, what="corpus file")
    write_atomic(manifest, json.dumps({"recipe": recipe, "files": {n: asdict(f) for n, (f, _) in made.items()}},
                                      indent=1).encode(), what="corpus manifest")
    log(f"  corpus built in {time.perf_counter() - t0:.0f} s")
    return [f for f, _ in made.values()], {n: b for n, (_, b) in made.items()}


# ================================================================================================
# forging: chunks, headers, mutations
# ================================================================================================
@dataclass
class Chunk:
    """A parsed chunk (its frame header's fields and payload)."""

    type: int
    level: int
    slot: int
    codec: int
    payload: bytes


def split_chunks(data: bytes) -> tuple[bytes, list[Chunk]]:
    """(preamble, chunks) of a well-formed stream (a piece that starts at a chunk is fine too)."""
    pre = data[:PREAMBLE] if data[:1] == b"\x89" else b""
    pos, out = len(pre), []
    while pos + FRAME.size <= len(data):
        t, lv, sl, co, n = FRAME.unpack_from(data, pos)
        out.append(Chunk(t, lv, sl, co, data[pos + FRAME.size:pos + FRAME.size + n]))
        pos += FRAME.size + n + 4
    return pre, out


def join_chunks(preamble: bytes, chunks: list[Chunk]) -> bytes:
    return preamble + b"".join(frame(c.type, c.level, c.slot, c.codec, c.payload) for c in chunks)


def chunk_bounds(data: bytes) -> list[int]:
    """Offsets where each chunk starts, its payload starts and its CRC starts, and the end."""
    out, pos = [PREAMBLE], PREAMBLE
    while pos + FRAME.size <= len(data):
        n = FRAME.unpack_from(data, pos)[4]
        out += [pos + FRAME.size, pos + FRAME.size + n, pos + FRAME.size + n + 4]
        pos += FRAME.size + n + 4
    return out


_F16_SPECIAL = [b"\x00\x7c", b"\x00\xfc", b"\x00\x7e", b"\xff\x7b", b"\x00\x00", b"\x01\x00", b"\xff\xff"]


def mutate(rng: random.Random, b: bytes, ops: int, f16: bool = False) -> bytes:
    """Apply ``ops`` random edits (flip, cut, insert, delete, overwrite, and fp16 specials when ``f16``)."""
    out = bytearray(b)
    for _ in range(ops):
        op = rng.choice(["flip", "flip", "cut", "insert", "delete", "overwrite", "fill"] + ["f16"] * (2 * f16))
        i = rng.randrange(len(out) + 1)
        junk = rng.choice([bytes([rng.randrange(256)]) * rng.randint(1, 16), rng.randbytes(rng.randint(1, 16)),
                           b"\x00" * rng.randint(1, 64), b"\xff" * rng.randint(1, 64)])
        if op == "flip" and out:
            i = min(i, len(out) - 1)
            out[i] ^= 1 << rng.randrange(8)
        elif op == "cut":
            del out[i:]
        elif op == "insert":
            out[i:i] = junk
        elif op == "delete":
            del out[i:i + rng.randint(1, 64)]
        elif op == "overwrite":
            out[i:i + len(junk)] = junk
        elif op == "fill" and out:
            j = rng.randrange(len(out))
            out[min(i, j):max(i, j) + 1] = bytes([rng.choice([0, 255, rng.randrange(256)])]) * (abs(i - j) + 1)
        elif op == "f16" and len(out) >= 2:
            k = 2 * rng.randrange(len(out) // 2)
            out[k:k + 2] = rng.choice(_F16_SPECIAL)
    return bytes(out)


def _paths(doc, path=()):
    """Every path into a JSON document (containers included), down to depth 16 (a header is 4 deep;
    deeper nests are forgeries, replaced or deleted whole)."""
    yield path
    if len(path) >= 16:
        return
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, path + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, path + (i,))


def _get(doc, path):
    for k in path:
        doc = doc[k]
    return doc


_HOSTILE = [0, -1, 1, 2, 3, 7, 8, 12, 13, 16, 17, 24, 25, 255, 256, 257, 4096, 4097, 65535, 65536, 2**31, 2**32,
            2**35, 2**40, 2**53 + 1, 2**63, 2**64, -2**63, 10**30, 0.5, -0.0, 1.0000001, 1e308, -1e308, 1e-308, 5e-324,
            float("nan"), float("inf"), float("-inf"), True, False, None, "", "3", "nan", "1e999", "codebook", "dense",
            "hash", "lowrank", "kmeans", "nerf", "sdf", "\u0000", "\ud800", [], [0], [0, 0, 0, 0], [1e308] * 3, [None] * 3,
            {}, {"bits": 40}, {"rank": 0}, {"table_bits": 30}, [[]], "x" * 100_000]


def _hostile(rng: random.Random, doc):
    """A hostile JSON value: a listed one, a random one, another node of the document, or deep nesting."""
    r = rng.random()
    if r < 0.45:
        return rng.choice(_HOSTILE)
    if r < 0.6:
        return rng.choice([rng.randint(-2**70, 2**70), rng.randint(-300, 300), rng.uniform(-1e6, 1e6),
                           rng.random(), rng.randbytes(rng.randint(0, 8)).decode("latin-1")])
    if r < 0.85:  # type confusion: a value that is valid somewhere else
        return json.loads(json.dumps(_get(doc, rng.choice(list(_paths(doc))))))
    v = rng.choice([0, "x", None])
    for _ in range(rng.randint(2, 60)):
        v = rng.choice([[v], {"a": v}])
    return v


def forge_header(rng: random.Random, payload: bytes) -> bytes:
    """The header JSON with 1-3 values replaced, deleted or added at any depth, or its text edited."""
    if rng.random() < 0.15:  # text-level forgeries JSON values cannot express
        text = payload.decode("utf-8")
        digits = [i for i, ch in enumerate(text) if ch.isdigit() and not text[i - 1].isdigit()]
        i = rng.choice(digits) if digits else 0
        token = rng.choice(["9" * rng.choice([20, 400, 4400, 5000]), "1e999", "-1e999", "NaN", "Infinity", "-0",
                            "1" + "0" * 5000, "[" * 100_000, '{"a":' * 3000, "\"\\ud800\""])
        kind = rng.choice(["number", "number", "prefix", "truncate", "duplicate", "bytes"])
        if kind == "number":
            return (text[:i] + token + text[i:].lstrip("-0123456789.eE+")).encode("utf-8", "surrogatepass")
        if kind == "prefix":
            return rng.choice([b"\xef\xbb\xbf", b" \n", b"\xff\xfe", b"\x00"]) + payload
        if kind == "truncate":
            return payload[:rng.randrange(len(payload))]
        if kind == "duplicate":
            return payload[:-1] + b"," + payload[1:]
        return mutate(rng, payload, rng.randint(1, 3))
    doc = json.loads(payload)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(list(_paths(doc)))
        action = rng.choice(["replace"] * 6 + ["delete", "add", "grow", "shrink"])
        if not path:
            doc = _hostile(rng, doc) if action == "replace" else doc
            continue
        parent, key = _get(doc, path[:-1]), path[-1]
        if action == "delete":
            del parent[key]
        elif action == "add" and isinstance(parent, dict):
            parent[rng.choice(["extra", "kind", "grid", "bits", "_", key + "_" if isinstance(key, str) else "x"])] = \
                _hostile(rng, doc)
        elif action == "grow" and isinstance(parent, list):
            parent.insert(rng.randint(0, len(parent)), rng.choice([parent[key], _hostile(rng, doc)]))
        elif action == "shrink" and isinstance(parent, list):
            del parent[key:]
        else:
            parent[key] = _hostile(rng, doc)
    try:
        return json.dumps(doc, allow_nan=True).encode("utf-8", "surrogatepass")
    except (RecursionError, ValueError):
        return payload


def forge(family: str, rng: random.Random, data: bytes, corpus: dict[str, bytes]) -> bytes:
    """One input of ``family`` derived from ``data`` (``corpus``: every file, for splices)."""
    if family == "bytes":
        return mutate(rng, data, rng.choice([1, 1, 1, 2, 3, 4, 8]))
    pre, chunks = split_chunks(data)
    if family == "payload":
        i = rng.randrange(len(chunks))
        c = chunks[i]
        if rng.random() < 0.1:  # the payload of another chunk of the same type (another file's, maybe)
            other = split_chunks(corpus[rng.choice(sorted(corpus))])[1]
            c.payload = rng.choice([o for o in other if o.type == c.type] or other).payload
        else:
            c.payload = mutate(rng, c.payload, rng.choice([1, 1, 2, 3, 6]), f16=c.type in (DECO, GRID))
        return join_chunks(pre, chunks)
    if family == "frame":
        i = rng.randrange(len(chunks))
        c = chunks[i]
        name = rng.choice(["type", "level", "slot", "codec", "length"])
        if name == "length":  # CRC over the forged frame and the original payload: lengths and CRCs disagree
            n = len(c.payload)
            fake = rng.choice([0, max(n - 1, 0), n + 1, 2 * n, rng.randrange(2 * n + 8), 2**32 - 1, 2**31])
            blob = frame(c.type, c.level, c.slot, c.codec, c.payload, length=fake)
            return join_chunks(pre, chunks[:i]) + blob + join_chunks(b"", chunks[i + 1:])
        old = getattr(c, name)
        setattr(c, name, rng.choice([rng.randrange(256), (old + 1) % 256, (old - 1) % 256, rng.randrange(5)]))
        return join_chunks(pre, chunks)
    if family == "header":
        chunks[0].payload = forge_header(rng, chunks[0].payload)
        return join_chunks(pre, chunks)
    if family == "sequence":
        for _ in range(rng.randint(1, 3)):
            op = rng.choice(["drop", "duplicate", "swap", "move", "splice", "insert", "cut"])
            i, j = rng.randrange(len(chunks)), rng.randrange(len(chunks))
            if op == "drop" and len(chunks) > 1:
                del chunks[i]
            elif op == "duplicate":
                chunks.insert(j, Chunk(**asdict(chunks[i])))
            elif op == "swap":
                chunks[i], chunks[j] = chunks[j], chunks[i]
            elif op == "move":
                chunks.insert(j, chunks.pop(i))
            elif op in ("splice", "insert"):  # a chunk of another file, in place of one or added
                other = split_chunks(corpus[rng.choice(sorted(corpus))])[1]
                c = other[i] if op == "splice" and i < len(other) else rng.choice(other)
                if op == "splice":
                    chunks[i] = c
                else:
                    chunks.insert(j, c)
            elif op == "cut":
                del chunks[max(i, 1):]
        return join_chunks(pre, chunks)
    raise ValueError(f"unknown family {family!r}")


@dataclass(frozen=True)
class Case:
    """One input: ``family`` applied to corpus file ``file`` with ``seed`` (a prefix length for truncate)."""

    family: str
    file: str
    seed: int

    def __str__(self) -> str:
        return f"{self.family}:{self.file}:{self.seed}"

    @classmethod
    def parse(cls, text: str) -> "Case":
        family, file, seed = text.rsplit(":", 2)
        return cls(family, file, int(seed))

    def rng(self, salt: str = "") -> random.Random:
        return random.Random(f"{salt}{self}")

    def make(self, corpus: dict[str, bytes]) -> bytes:
        """The input's bytes (deterministic)."""
        data = corpus[self.file]
        if self.family == "truncate":
            return data[:self.seed]
        rng = self.rng()
        if self.family == "bomb":
            r = rng.random()
            if r < 0.1:
                return data
            if r < 0.4:
                bounds = chunk_bounds(data)
                return data[:rng.choice([rng.randrange(len(data)), rng.choice(bounds) + rng.randint(-2, 2)])]
            return forge(rng.choice(["payload", "header", "sequence", "frame"]), rng, data, corpus)
        return forge(self.family, rng, data, corpus)


def plan(files: list[CorpusFile], corpus: dict[str, bytes], n: int, seed: int) -> tuple[list[Case], dict[str, str]]:
    """The campaign's inputs (shuffled), and per file how its truncations were chosen."""
    real = [f.name for f in files if not f.bomb]
    bombs = [f.name for f in files if f.bomb]
    counts = {fam: round(n * share) for fam, share in SHARES.items()}
    counts["truncate"] = n - sum(v for k, v in counts.items() if k != "truncate")
    cases, coverage = [], {}
    left, todo = counts["truncate"], sorted(real, key=lambda f: len(corpus[f]))
    for k, name in enumerate(todo):  # small files get every prefix, if the bigger ones keep a sample each
        size, later = len(corpus[name]), len(todo) - k - 1
        quota = min(size + 1, max(left // (later + 1), left - PREFIX_SAMPLE * later))
        left -= quota
        if quota == size + 1:
            lengths = set(range(size + 1))
            coverage[name] = f"all {size + 1:,} prefixes"
        else:
            rng = random.Random(f"{seed}:truncate:{name}")
            edges = sorted({min(max(b + d, 0), size) for b in [0] + chunk_bounds(corpus[name]) for d in (-1, 0, 1)})
            lengths = set(rng.sample(edges, min(len(edges), quota // 4)))
            near = "every chunk boundary ±1" if len(lengths) == len(edges) else f"{len(lengths)} chunk boundaries ±1"
            step = size / max(quota - len(lengths), 1)
            lengths |= {min(int(i * step) + rng.randrange(max(int(step), 1)), size) for i in range(quota - len(lengths))}
            while len(lengths) < quota:
                lengths.add(rng.randrange(size + 1))
            coverage[name] = f"{len(lengths):,} of {size + 1:,} prefixes ({near}, the rest evenly spread)"
        cases += [Case("truncate", name, length) for length in sorted(lengths)]
    for fam in list(FAMILIES)[1:]:
        pool = bombs if fam == "bomb" else real
        cases += [Case(fam, pool[i % len(pool)], seed * 10**9 + i) for i in range(counts[fam]) if pool]
    random.Random(seed).shuffle(cases)
    return cases, coverage


# ================================================================================================
# decoding one input (in a worker)
# ================================================================================================
@dataclass
class Result:
    """What decoding one input did."""

    case: str
    outcome: str  # one of OUTCOMES
    seconds: float
    peak: int | None = None  # resident memory growth in bytes (VmHWM over the RSS before the input)
    bound: int = MEMORY_FLOOR  # max(decoder estimate, MEMORY_FLOOR)
    detail: str = ""  # the exception (type: message) or what went wrong
    alone: float | None = None  # seconds when re-run alone (slow inputs only)

    @property
    def family(self) -> str:
        return self.case.split(":", 1)[0]

    @property
    def file(self) -> str:
        return self.case.split(":")[1]

    @property
    def slow(self) -> bool:
        return self.outcome == "killed" or self.seconds > SLOW_SECONDS

    @property
    def over_memory(self) -> bool:
        return self.peak is not None and self.peak > self.bound


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def _reset_peak() -> int | None:
    """Reset VmHWM to the current RSS; returns that RSS in bytes (None without /proc)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmRSS") * 1024
    except OSError:
        return None


class Decoder:
    """Decodes inputs the way the campaign checks them (one per worker process)."""

    def __init__(self, corpus: dict[str, bytes], max_memory: int) -> None:
        import torch

        torch.set_num_threads(1)
        self.corpus = corpus
        self.max_memory = max_memory
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(48, 3, generator=g) * 2.4 - 1.2  # a few points outside the cube, too
        self.d = torch.nn.functional.normalize(torch.randn(48, 3, generator=g), dim=1)

    def decode(self, data: bytes, case: Case) -> tuple[str, str, int]:
        """(outcome, detail, the decoder's memory estimate) of decoding ``data`` and evaluating every LOD."""
        import torch

        from vqad import fileformat as F
        from vqad.errors import CorruptStreamError, StreamError, StreamLimitError, TruncatedStreamError

        dec = F.StreamDecoder(max_memory=self.max_memory)
        rng = case.rng("feed:")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if rng.random() < 0.25:  # pushed in random pieces
                    pos = 0
                    while pos < len(data):
                        n = rng.choice([1, 7, 64, 1000, 4096, 1 << 16])
                        dec.feed(data[pos:pos + n])
                        pos += n
                else:
                    dec.feed(data)
                if not dec.complete_lods:
                    raise dec.truncation_error()
                for lod in dec.complete_lods:
                    f = dec.field(lod)
                    with torch.no_grad():
                        out = f.all_lods(self.x, self.d) if dec.cfg.get("kind") == "nerf" else f.all_lods(self.x)
                    out = out if isinstance(out, (tuple, list)) else [out]
                    if not all(bool(torch.isfinite(t).all()) for t in out):
                        return "nonfinite", f"LOD {lod} evaluates to NaN or inf", dec.needed_bytes
                    del f, out
        except StreamError as exc:
            kind = {StreamLimitError: "limit", TruncatedStreamError: "truncated", CorruptStreamError: "corrupt"}
            return next((v for k, v in kind.items() if isinstance(exc, k)), "corrupt"), "", dec.needed_bytes
        except Exception as exc:  # the property under test: nothing else may escape
            return "escaped", f"{type(exc).__name__}: {str(exc)[:300]}", dec.needed_bytes
        return ("full" if dec.finished else "partial"), "", dec.needed_bytes

    def run(self, case: Case) -> Result:
        data = case.make(self.corpus)
        before = _reset_peak()
        t0 = time.perf_counter()
        outcome, detail, need = self.decode(data, case)
        seconds = time.perf_counter() - t0
        peak = None if before is None else max(_status_kib("VmHWM") * 1024 - before, 0)
        return Result(str(case), outcome, seconds, peak, max(need, MEMORY_FLOOR), detail)


def _worker(conn, corpus_dir: str, names: list[str], max_memory: int, headroom: int) -> None:
    """Worker process: warm up, cap the address space, then decode the cases it is sent."""
    corpus = {n: (Path(corpus_dir) / f"{n}.vqad").read_bytes() for n in names}
    dec = Decoder(corpus, max_memory)
    for name in names[:1] + [n for n in names if n.startswith("nerf")]:  # warm-up: PyTorch maps code and arenas
        dec.run(Case("truncate", name, len(corpus[name])))
    try:
        limit = _status_kib("VmSize") * 1024 + max_memory + headroom
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    except (OSError, ValueError, StopIteration):
        pass  # no /proc or not allowed: the parent's kill still bounds the time
    conn.send("ready")
    while True:
        case = conn.recv()
        if case is None:
            return
        conn.send(asdict(dec.run(Case.parse(case))))


# ================================================================================================
# the pool: per-input kill, crash detection, restarts
# ================================================================================================
class Pool:
    """Worker processes decoding cases; an input running past ``KILL_SECONDS`` kills its worker."""

    def __init__(self, n: int, args: tuple) -> None:
        self.ctx = mp.get_context("spawn")
        self.args = args
        self.workers = [self._start() for _ in range(n)]

    def _start(self) -> dict:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_worker, args=(child,) + self.args, daemon=True)
        proc.start()
        child.close()
        return {"proc": proc, "conn": parent, "case": None, "t0": 0.0, "ready": False}

    def _restart(self, i: int) -> None:
        w = self.workers[i]
        if w["proc"].is_alive():
            w["proc"].kill()
        w["proc"].join()
        w["conn"].close()
        self.workers[i] = self._start()

    def run(self, cases: list[Case], progress=None) -> list[Result]:
        todo, results = deque(cases), []
        while todo or any(w["case"] for w in self.workers):
            for w in self.workers:
                if w["ready"] and w["case"] is None and todo:
                    w["case"] = todo.popleft()
                    w["t0"] = time.perf_counter()
                    w["conn"].send(str(w["case"]))
            for conn in wait([w["conn"] for w in self.workers], timeout=0.5):
                i = next(k for k, w in enumerate(self.workers) if w["conn"] is conn)
                w = self.workers[i]
                try:
                    msg = conn.recv()
                except (EOFError, OSError):  # the worker died (a crash, or the kernel's OOM killer)
                    w["proc"].join(timeout=5)
                    code = w["proc"].exitcode
                    if w["case"] is None:
                        raise RuntimeError(f"a fuzz worker died while starting (exit code {code})") from None
                    results.append(Result(str(w["case"]), "crashed", time.perf_counter() - w["t0"],
                                          detail=f"worker died, exit code {code}"))
                    self._restart(i)
                    continue
                if msg == "ready":
                    w["ready"] = True
                else:
                    results.append(Result(**msg))
                    w["case"] = None
                    if progress:
                        progress(len(results))
            for i, w in enumerate(self.workers):
                if w["case"] is not None and time.perf_counter() - w["t0"] > KILL_SECONDS:
                    results.append(Result(str(w["case"]), "killed", time.perf_counter() - w["t0"],
                                          detail=f"killed after {KILL_SECONDS:.0f} s"))
                    self._restart(i)
        return results

    def close(self) -> None:
        for w in self.workers:
            try:
                w["conn"].send(None)
            except OSError:
                pass
        for w in self.workers:
            w["proc"].join(timeout=10)
            if w["proc"].is_alive():
                w["proc"].kill()


# ================================================================================================
# report
# ================================================================================================
def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, math.ceil(q * len(s)) - 1)]


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def _machine() -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor() or "?") if os.path.exists("/proc/cpuinfo") else platform.processor()
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {os.cpu_count()} cores, {ram:.0f} GiB RAM; Python {platform.python_version()}, "
            f"torch {torch.__version__}, one torch thread per worker")


@dataclass
class Report:
    """The campaign's results and how they were obtained."""

    results: list[Result]
    files: list[CorpusFile]
    corpus: dict[str, bytes]
    coverage: dict[str, str]
    command: str
    workers: int
    max_memory: int
    wall: float
    quick: bool
    load: tuple[float, float]  # the 1-minute load average at the start and at the end

    def targets(self) -> list[tuple[str, bool | None, str]]:
        """(target, met (None: not checked), the measured value)."""
        n = len(self.results)
        failed = [r for r in self.results if r.outcome in FAILURES and r.outcome != "killed"]
        slow = [r for r in self.results if r.slow and (r.alone is None or r.alone > SLOW_SECONDS)]
        over = [r for r in self.results if r.over_memory]
        from vqad.storages import STORAGES

        covered = {f.storage for f in self.files if f.kind == "sdf" and not f.bomb}
        nerf = any(f.kind == "nerf" for f in self.files)
        return [
            (f"≥ {TARGET_INPUTS:,} inputs", None if self.quick else n >= TARGET_INPUTS,
             f"{n:,}" + (" (--quick: not checked)" if self.quick else "")),
            ("0 escapes other than StreamError (exceptions, non-finite outputs, crashes)", not failed, f"{len(failed)}"),
            (f"0 inputs over {SLOW_SECONDS:.0f} s (re-run alone)", not slow, f"{len(slow)}"),
            ("0 inputs over the memory bound", not over, f"{len(over)}"),
            ("every storage kind and a radiance field in the corpus", None if self.quick else
             (covered == set(STORAGES) and nerf), ", ".join(sorted(covered)) + (", nerf" if nerf else "")),
        ]

    @property
    def ok(self) -> bool:
        return all(met is not False for _, met, _ in self.targets())

    def table(self) -> list[str]:
        by = defaultdict(list)
        for r in self.results:
            by[r.family].append(r)
        cols = ["family", "inputs", *OUTCOMES, "> 2 s", "> mem", "max s", "p99 s", "max MiB", "p99 MiB"]
        rows = [cols, ["---"] * len(cols)]
        for fam in [*FAMILIES, "all"]:
            rs = self.results if fam == "all" else by.get(fam, [])
            if not rs:
                continue
            c = Counter(r.outcome for r in rs)
            t = [r.seconds for r in rs]
            m = [r.peak for r in rs if r.peak is not None]
            rows.append([f"**{fam}**" if fam == "all" else fam, f"{len(rs):,}", *(f"{c[o]:,}" if c[o] else "·" for o in OUTCOMES),
                         f"{sum(r.slow for r in rs):,}", f"{sum(r.over_memory for r in rs):,}",
                         f"{max(t):.3f}", f"{_pct(t, 0.99):.3f}",
                         _mib(max(m)) if m else "n/a", _mib(_pct(m, 0.99)) if m else "n/a"])
        return ["| " + " | ".join(r) + " |" for r in rows]

    def markdown(self) -> str:
        n = len(self.results)
        lines = [
            "# Fuzz campaign: the .vqad reader under hostile input",
            "",
            f"`{self.command}` (`make bench-fuzz`; `benchmarks/fuzz_campaign.py`, issue 21). "
            f"{n:,} inputs in {self.wall / 60:.1f} min with {self.workers} worker processes.",
            "",
            f"Machine: {_machine()}. Load average {self.load[0]:.1f} at the start and {self.load[1]:.1f} at the "
            "end: wall times include whatever else ran (inputs over 2 s are re-run alone, with none of the "
            "campaign's other workers running, and both times are listed).",
            "",
            "Each input is decoded by `StreamDecoder` (in one piece, or for a quarter of them in random pieces), "
            f"with `max_memory` = {_mib(self.max_memory)} MiB; every complete LOD's field is built and evaluated on "
            "48 points (its outputs must be finite). Per input: wall time (a failure over 2 s; killed at "
            f"{KILL_SECONDS:.0f} s) and peak resident growth (VmHWM reset through `/proc/self/clear_refs` before the "
            "input, over the RSS before it), bounded by the decoder's own estimate `needed_bytes` "
            f"({self._estimate()}) or {_mib(MEMORY_FLOOR)} MiB, "
            "whichever is larger; `RLIMIT_AS` caps each worker at its size after warm-up plus `max_memory` plus "
            "1 GiB.",
            "",
            "## Targets",
            "",
        ]
        for name, met, value in self.targets():
            lines.append(f"- {'✅' if met else ('—' if met is None else '❌')} {name}: {value}")
        lines += ["", "## Families", ""] + [f"- `{k}`: {v}." for k, v in FAMILIES.items()]
        lines += [
            "",
            "## Outcomes",
            "",
            "full / partial: decoded every LOD / the complete LODs of a prefix; truncated, corrupt, limit: "
            "`TruncatedStreamError`, `CorruptStreamError`, `StreamLimitError`; escaped: any other exception; "
            "nonfinite: a decoded field evaluating to NaN / inf; killed: over 10 s; crashed: the worker died. "
            "> 2 s and > mem count inputs over the time and memory bounds; memory is the peak growth per input.",
            "",
            *self.table(),
            "",
            "## Corpus",
            "",
            "| file | bytes | what | truncations |",
            "|---|---|---|---|",
        ]
        for f in self.files:
            cov = self.coverage.get(f.name, "sampled by the bomb family")
            lines.append(f"| {f.name} | {len(self.corpus[f.name]):,} | {f.what} | {cov} |")
        lines += ["", "## Inputs over a bound", "",
                  "Failures, except inputs over 2 s that re-ran alone within it (the machine's other jobs, not the "
                  "decoder, made them slow).", ""]
        bad = [r for r in self.results if r.outcome in FAILURES or r.slow or r.over_memory]
        if not bad:
            lines.append("None.")
        for r in sorted(bad, key=lambda r: (r.outcome, -r.seconds))[:60]:
            alone = f", alone {r.alone:.2f} s" if r.alone is not None else ""
            mem = f", peak {_mib(r.peak)} MiB of {_mib(r.bound)}" if r.peak is not None else ""
            lines.append(f"- `{r.case}` {r.outcome}: {r.seconds:.2f} s{alone}{mem} {r.detail}".rstrip())
        if len(bad) > 60:
            lines.append(f"- ... and {len(bad) - 60} more")
        lines += ["", "Reproduce one input (decoded in this process, traceback shown): "
                  "`python benchmarks/fuzz_campaign.py --replay FAMILY:FILE:SEED`.", ""]
        return "\n".join(lines)

    @staticmethod
    def _estimate() -> str:
        from vqad.fileformat import DECODE_BYTES_PER_CELL, DECODE_BYTES_PER_VERTEX

        return (f"{DECODE_BYTES_PER_CELL} B per octree cell, {DECODE_BYTES_PER_VERTEX} B per vertex, twice the "
                "storage tensors and the octree's dense tables up to level 8; docs/format.md, Robustness")


# ================================================================================================
# main
# ================================================================================================
def replay(text: str, corpus: dict[str, bytes], max_memory: int) -> int:
    """Decode one case in this process and show what happened (with the traceback of an escape)."""
    case = Case.parse(text)
    data = case.make(corpus)
    print(f"{case}: {len(data):,} bytes")
    dec = Decoder(corpus, max_memory)
    res = dec.run(case)
    print(f"outcome {res.outcome} in {res.seconds:.3f} s, peak {_mib(res.peak or 0)} MiB of {_mib(res.bound)} MiB "
          f"{res.detail}")
    if res.outcome == "escaped":
        from vqad import fileformat as F

        try:
            F.StreamDecoder(max_memory=max_memory).feed(data)
        except Exception:
            traceback.print_exc()
    return 0 if res.outcome not in FAILURES else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", type=int, default=None, help=f"inputs to decode (default {TARGET_INPUTS:,}; --quick: 300)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="worker processes (each one torch thread)")
    p.add_argument("--quick", action="store_true", help="a smoke run: a quickly-fitted corpus and 300 inputs")
    p.add_argument("--corpus", default=None, help="corpus cache (default out/fuzz-corpus/full or .../quick)")
    p.add_argument("--max-memory", default=DEFAULT_MAX_MEMORY, help="the decoder's max_memory (default %(default)s)")
    p.add_argument("--out", default=None, help="write the markdown report here (make bench-fuzz: docs/benchmarks/fuzz.md)")
    p.add_argument("--replay", metavar="FAMILY:FILE:SEED", help="decode one input in this process and exit")
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO / "src"))
    from vqad.fileformat import parse_bytes

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    max_memory = parse_bytes(args.max_memory, "--max-memory")
    n = args.inputs if args.inputs is not None else (300 if args.quick else TARGET_INPUTS)
    cache = Path(args.corpus) if args.corpus else REPO / "out" / "fuzz-corpus" / ("quick" if args.quick else "full")
    files, corpus = build_corpus(cache, args.quick)
    if args.replay:
        return replay(args.replay, corpus, max_memory)
    for f in files:  # every clean file must decode whole (a bomb over the limit must be refused)
        res = Decoder(corpus, max_memory).run(Case("truncate", f.name, len(corpus[f.name])))
        expect = "limit" if f.name == "bomb-full7" else "full"
        if res.outcome != expect:
            sys.exit(f"fuzz-campaign: corpus file {f.name} decodes as {res.outcome!r}, expected {expect!r} {res.detail}")
    cases, coverage = plan(files, corpus, n, args.seed)
    command = "python benchmarks/fuzz_campaign.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"decoding {len(cases):,} inputs over {len(files)} files with {args.workers} workers ...", flush=True)
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    step = max(len(cases) // 20, 1000)

    def progress(done: int) -> None:
        if done % step == 0:
            el = time.perf_counter() - t0
            print(f"  {done:,} / {len(cases):,} inputs, {el / 60:.1f} min, ETA {el / done * (len(cases) - done) / 60:.1f} min",
                  flush=True)

    pool_args = (str(cache), [f.name for f in files], max_memory, 1 << 30)
    pool = Pool(args.workers, pool_args)
    try:
        results = pool.run(cases, progress)
    finally:
        pool.close()
    wall = time.perf_counter() - t0
    slow = [r for r in results if r.slow]
    if slow:  # contention or the decoder? re-run each alone, nothing else of ours running
        print(f"re-running {len(slow)} input(s) over {SLOW_SECONDS:.0f} s alone ...", flush=True)
        pool = Pool(1, pool_args)
        try:
            again = {r.case: r for r in pool.run([Case.parse(r.case) for r in slow])}
        finally:
            pool.close()
        for r in slow:
            if r.case in again:
                r.alone = again[r.case].seconds if again[r.case].outcome != "killed" else float("inf")
    report = Report(results, files, corpus, coverage, command.strip(), args.workers, max_memory, wall, args.quick,
                    (load0, os.getloadavg()[0]))
    print("\n".join(report.table()))
    for name, met, value in report.targets():
        print(f"{'ok  ' if met else ('--  ' if met is None else 'MISS')} {name}: {value}")
    bad = [r for r in results if r.outcome in FAILURES or r.slow or r.over_memory]
    for r in bad[:20]:
        print(f"  {r.case} {r.outcome} {r.seconds:.2f} s (alone {r.alone}) peak {_mib(r.peak or 0)} / "
              f"{_mib(r.bound)} MiB {r.detail}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report.markdown())
        print(f"wrote {args.out}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
