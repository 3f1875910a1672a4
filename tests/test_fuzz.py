"""Fuzzing the .vqad reader: whatever the bytes, only vqad's own StreamError may escape.

Two families of damage, applied to real files (raw and entropy-coded):

* raw byte mutations (flips, cuts, insertions, deletions, overwrites), which the CRCs mostly catch;
* mutations *behind valid CRCs*: a chunk's payload or frame fields are changed and the chunk is
  re-framed with a correct length and CRC, so the parsers behind the CRC (header JSON, decoder
  directory, octree masks, range-coded payloads, bit-packed indices) see hostile input directly.

A decoded result must also evaluate without error. Hypothesis shrinks any failure to a small
reproducer.
"""

import os
import struct
import warnings
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vqad import fileformat as F
from vqad.config import DecoderConfig, GridConfig
from vqad.errors import StreamError
from vqad.sdf.field import SDFField
from vqad.grid import OctreeGrid
from vqad.octree import SparseOctree


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is fastest, and far faster on a shared, busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _file(entropy: bool, storage: str = "codebook", tsdf: bool = False, context: bool = False) -> bytes:
    torch.manual_seed(0)
    p = torch.randn(1000, 3)
    octree = SparseOctree.from_points(0.7 * p / p.norm(dim=1, keepdim=True), 2, 5, dilate=1)
    grid = OctreeGrid.from_octree(octree, GridConfig(storage, 2, 4, 2, 5))
    if tsdf:  # the TSDF record and a second (colour) MLP in the decoder chunk
        from vqad.tsdf.field import TSDFField

        field = TSDFField(grid, DecoderConfig(hidden=4), truncation=0.04, voxel=0.01, units="m", color=True)
    else:
        field = SDFField(grid, DecoderConfig(hidden=4))
    field.bake(fp16=True)
    if storage == "codebook":
        for s in field.grid.storages:  # skewed indices, so the range coder is used and fuzzed too
            s.V = torch.clamp(torch.distributions.Geometric(0.5).sample((s.m,)).long(), max=15)
    if context:  # each index mostly copies the coarser level's at floor(v/2): the context coder is used
        storages = field.grid.storages
        for i, level in enumerate(octree.levels[1:], 1):
            up = storages[i - 1].V[octree.coarser_vertices(level)]
            storages[i].V = torch.where(torch.rand(storages[i].m) < 0.8, up, storages[i].V)
    return F.to_bytes(field, entropy=entropy)


FILES = {"raw": _file(False), "entropy": _file(True), "dense": _file(False, "dense"), "tsdf": _file(True, tsdf=True),
         "context": _file(True, context=True)}
_codecs = {c.codec for c in F.read_info(FILES["entropy"]).chunks}
assert {F.Codec.RANGE, F.Codec.OCTREE} <= _codecs, "the entropy file should exercise both entropy decoders"
assert F.Codec.CONTEXT in {c.codec for c in F.read_info(FILES["context"]).chunks}, "the context file should be context-coded"

X = torch.rand(64, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _chunks(data: bytes) -> list[tuple[int, int]]:
    out, pos = [], F.PREAMBLE_BYTES
    while pos + 8 <= len(data):
        n = struct.unpack_from("<I", data, pos + 4)[0]
        out.append((pos, n))
        pos += 12 + n
    return out


def _decode_or_stream_error(data: bytes) -> None:
    """The property: decoding either works (and the field evaluates) or raises StreamError."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncated-but-decodable files warn; that is fine here
        try:
            field = F.load(data)
        except StreamError:
            return
    with torch.no_grad():
        for lod in field.lods:
            field(X, lod)


def _mutate(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for op, pos, arg in ops:
        if not b:
            break
        i = pos % len(b)
        if op == "flip":
            b[i] ^= arg[0] or 1
        elif op == "cut":
            del b[i:]
        elif op == "insert":
            b[i:i] = arg
        elif op == "delete":
            del b[i:i + len(arg)]
        else:  # overwrite
            b[i:i + len(arg)] = arg
    return bytes(b)


OPS = st.lists(
    st.tuples(st.sampled_from(["flip", "cut", "insert", "delete", "overwrite"]),
              st.integers(0, 1 << 20), st.binary(min_size=1, max_size=12)),
    min_size=1, max_size=4,
)
# VQAD_FUZZ_EXAMPLES=5000 for a longer campaign
SETTINGS = settings(max_examples=int(os.environ.get("VQAD_FUZZ_EXAMPLES", 200)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(which=st.sampled_from(sorted(FILES)), ops=OPS)
def test_mutated_files_raise_only_stream_errors(which, ops):
    _decode_or_stream_error(_mutate(FILES[which], ops))


@SETTINGS
@given(which=st.sampled_from(sorted(FILES)), chunk=st.integers(0, 100), ops=OPS)
def test_mutated_payloads_behind_valid_crcs_raise_only_stream_errors(which, chunk, ops):
    data = FILES[which]
    chunks = _chunks(data)
    off, n = chunks[chunk % len(chunks)]
    payload = _mutate(data[off + 8:off + 8 + n], ops)
    head = data[off:off + 4] + struct.pack("<I", len(payload))
    forged = data[:off] + head + payload + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))) + data[off + 12 + n:]
    _decode_or_stream_error(forged)


_CONTEXT_CHUNKS = [(c.offset, c.length) for c in F.read_info(FILES["context"]).chunks if c.codec == F.Codec.CONTEXT]


@SETTINGS
@given(chunk=st.integers(0, 100), ops=OPS, model_byte=st.integers(0, 40), value=st.integers(0, 255))
def test_mutated_context_coded_payloads_raise_only_stream_errors(chunk, ops, model_byte, value):
    """The context model's tables (front of the payload) and its coded words, behind valid CRCs."""
    data = FILES["context"]
    off, n = _CONTEXT_CHUNKS[chunk % len(_CONTEXT_CHUNKS)]
    payload = bytearray(data[off + 8:off + 8 + n])
    payload[model_byte % n] = value  # the tables: counts, context ids, precisions, frequencies
    payload = _mutate(bytes(payload), ops)
    head = data[off:off + 4] + struct.pack("<I", len(payload))
    forged = data[:off] + head + payload + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))) + data[off + 12 + n:]
    _decode_or_stream_error(forged)


@SETTINGS
@given(which=st.sampled_from(sorted(FILES)), chunk=st.integers(0, 100),
       field=st.integers(0, 3), value=st.integers(0, 255))
def test_forged_frame_fields_behind_valid_crcs_raise_only_stream_errors(which, chunk, field, value):
    data = FILES[which]
    chunks = _chunks(data)
    off, n = chunks[chunk % len(chunks)]
    head = bytearray(data[off:off + 8])
    head[field] = value  # type, level, slot or codec
    payload = data[off + 8:off + 8 + n]
    forged = data[:off] + bytes(head) + payload + struct.pack("<I", zlib.crc32(payload, zlib.crc32(bytes(head)))) \
        + data[off + 12 + n:]
    _decode_or_stream_error(forged)


@SETTINGS
@given(which=st.sampled_from(sorted(FILES)), ops=OPS, pieces=st.lists(st.integers(1, 200), min_size=1, max_size=30))
def test_pushed_in_pieces_raise_only_stream_errors(which, ops, pieces):
    """The push decoder sees the same bytes in arbitrary pieces: same property."""
    data = _mutate(FILES[which], ops)
    dec, pos, i = F.StreamDecoder(), 0, 0
    try:
        while pos < len(data):
            n = pieces[i % len(pieces)]
            dec.feed(data[pos:pos + n])
            pos, i = pos + n, i + 1
        if dec.complete_lods:
            field = dec.field()
            with torch.no_grad():
                field(X)
    except StreamError:
        pass


@pytest.mark.parametrize("which", sorted(FILES))
def test_unmutated_files_decode(which):
    field = F.load(FILES[which])
    assert field.lods == [2, 3, 4, 5]


# -- forged header values and chunk sequences behind valid CRCs ---------------------------------------
def _reframe(chunks: list[tuple[int, int, int, int, bytes]]) -> bytes:
    return FILES["raw"][:F.PREAMBLE_BYTES] + b"".join(F._frame(*c) for c in chunks)


def _parsed(data: bytes) -> list[tuple[int, int, int, int, bytes]]:
    out = []
    for off, n in _chunks(data):
        t, lv, sl, co = data[off:off + 4]
        out.append((t, lv, sl, co, data[off + 8:off + 8 + n]))
    return out


def _leaves(doc, path=()):
    """Every path into the header JSON (objects and lists included), so any value can be replaced."""
    yield path
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _leaves(v, path + (i,))


HOSTILE = st.one_of(
    st.sampled_from([0, -1, 1, 2, 3, 13, 17, 255, 256, 4097, 2**31, 2**35, 2**40, 2**63, -2**63, 10**30,
                     0.5, -0.0, 1e308, 1e-308, float("nan"), float("inf"), float("-inf"), True, False, None,
                     "", "3", "nan", "codebook", "dense", "hash", "nerf", "sdf", [], [0, 0, 0, 0], [1e308] * 3, {},
                     {"bits": 40}, [[]], "x" * 1000]),
    st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
)
# per input: far below what a hang or a huge allocation would take, far above a normal decode (~10 ms)
SECONDS_PER_INPUT = 2.0


def _timed_decode(data: bytes) -> None:
    import time

    t0 = time.perf_counter()
    _decode_or_stream_error(data)
    assert time.perf_counter() - t0 < SECONDS_PER_INPUT


@SETTINGS
@given(which=st.sampled_from(sorted(FILES)), pick=st.integers(0, 10**6), value=HOSTILE,
       action=st.sampled_from(["replace", "delete", "add"]))
def test_forged_header_values_raise_only_stream_errors(which, pick, value, action):
    """Any value of the header JSON replaced (or deleted, or a key added), re-framed with a valid CRC."""
    import json

    chunks = _parsed(FILES[which])
    doc = json.loads(chunks[0][4])
    paths = list(_leaves(doc))
    path = paths[pick % len(paths)]
    if not path:
        doc = value
    else:
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        if action == "delete":
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent["extra_" + str(pick)] = value
        else:
            parent[path[-1]] = value
    header = json.dumps(doc).encode()
    if len(header) > F.MAX_HEADER_BYTES:
        return
    _timed_decode(_reframe([chunks[0][:4] + (header,)] + chunks[1:]))


@SETTINGS
@given(which=st.sampled_from(sorted(FILES)),
       edits=st.lists(st.tuples(st.sampled_from(["drop", "duplicate", "swap", "move"]), st.integers(0, 100),
                                st.integers(0, 100)), min_size=1, max_size=3))
def test_forged_chunk_sequences_raise_only_stream_errors(which, edits):
    """Whole chunks dropped, repeated, swapped or moved, each with a valid frame and CRC."""
    chunks = _parsed(FILES[which])
    for op, i, j in edits:
        i, j = i % len(chunks), j % len(chunks)
        if op == "drop" and len(chunks) > 1:
            del chunks[i]
        elif op == "duplicate":
            chunks.insert(j, chunks[i])
        elif op == "swap":
            chunks[i], chunks[j] = chunks[j], chunks[i]
        else:
            chunks.insert(j, chunks.pop(i))
    _timed_decode(_reframe(chunks))


@pytest.mark.parametrize("literal", ["9" * 5000, "1" + "0" * 4400, "[" * 100_000])
def test_header_json_past_the_parsers_limits_is_corrupt(literal):
    """Found by benchmarks/fuzz_campaign.py: a 5000-digit integer in the header made json.loads raise a bare
    ValueError (Python's int digit limit), which escaped vqad.load; deep nesting raises RecursionError."""
    from vqad.errors import CorruptStreamError

    chunks = _parsed(FILES["raw"])
    header = chunks[0][4].replace(b'"features":', b'"features":' + literal.encode() + b",\"x\":", 1)
    with pytest.raises(CorruptStreamError, match="header is not valid JSON"):
        F.load(_reframe([chunks[0][:4] + (header,)] + chunks[1:]))


def _with_header(which: str, edit) -> bytes:
    """``FILES[which]`` with ``edit(doc)`` applied to its header JSON, re-framed with a valid CRC."""
    import json

    chunks = _parsed(FILES[which])
    doc = json.loads(chunks[0][4])
    edit(doc)
    return _reframe([chunks[0][:4] + (json.dumps(doc).encode(),)] + chunks[1:])


def _set(path, value):
    def edit(doc):
        for k in path[:-1]:
            doc = doc[k]
        doc[path[-1]] = value
    return edit


@pytest.mark.parametrize("which, path, value, message", [
    # found by a fuzz pass: accepted, and meshes came out at ±inf or all on one point
    ("raw", ("field", "normalization", "scale"), 1e-300, "normalization must be a center of 3 numbers within"),
    ("raw", ("field", "normalization", "scale"), 1e308, "normalization must be"),
    ("raw", ("field", "normalization", "center"), [1e308, 0, 0], "normalization must be"),
    # a bit flip in a key, or no key: the storage's defaults were taken silently
    ("raw", ("field", "storage_params", 0), {"bIts": 4}, "storage_params of level 2 name \\['bIts'\\], a codebook"),
    ("raw", ("field", "storage_params", 1), {}, "storage_params of level 3 name \\[\\]"),
    ("dense", ("field", "storage_params", 0), {"bits": 4}, "a dense level's are \\[\\]"),
    # a key this reader does not know (a newer writer's setting, or a bit flip in a key's name): ignored before
    ("raw", ("field", "appearance"), {"kind": "affine"}, "sdf field record has keys this vqad does not know: "
     "appearance \\(written by a newer vqad\\? upgrade it"),
    ("raw", ("field", "normalizatiom"), {"center": [0, 0, 0], "scale": 1.0}, "does not know: normalizatiom"),
    ("raw", ("field", "tsdf"), {"truncation": 1, "voxel": 1, "units": "m", "color": False}, "sdf field .* know: tsdf"),
    ("raw", ("extra",), 1, "header JSON has keys besides 'field' \\(extra\\)"),
])
def test_forged_header_semantics_behind_valid_crcs_are_refused(which, path, value, message):
    from vqad.errors import CorruptStreamError

    with pytest.raises(CorruptStreamError, match=message):
        F.load(_with_header(which, _set(path, value)))


@pytest.mark.parametrize("key", ["normalization", "decoder", "storage_params"])
def test_a_field_record_without_one_of_its_keys_is_corrupt(key):
    from vqad.errors import CorruptStreamError

    with pytest.raises(CorruptStreamError, match=f"lacks {key}"):
        F.load(_with_header("raw", lambda doc: doc["field"].pop(key)))


def test_non_finite_payloads_behind_valid_crcs_are_refused():
    """NaN / inf in a codebook or in the decoder weights would load as a field that outputs NaN."""
    chunks = _parsed(FILES["raw"])
    for i, (t, lv, sl, co, payload) in enumerate(chunks):
        if t == F.ChunkType.GRID and sl == 0:  # the codebook D, fp16
            forged = chunks[:i] + [(t, lv, sl, co, b"\xff" * len(payload))] + chunks[i + 1:]
            with pytest.raises(StreamError, match="non-finite"):
                F.load(_reframe(forged))
            break
    t, lv, sl, co, payload = chunks[1]
    forged = [chunks[0], (t, lv, sl, co, payload[:-2] + b"\x00\x7c")] + chunks[2:]  # +inf in fp16
    with pytest.raises(StreamError, match="non-finite"):
        F.load(_reframe(forged))


# -- a tiny file that describes a huge model: refused before it is built ------------------------------
def _model_file(path, finest_codes: torch.Tensor, max_level: int) -> Path:
    """An SDF file of the octree with these finest cells (levels 2..max_level), constant indices, entropy-coded."""
    grid = OctreeGrid.from_octree(SparseOctree.from_codes(finest_codes, 2, max_level),
                                  GridConfig("codebook", 2, 4, 2, max_level))
    field = SDFField(grid, DecoderConfig(hidden=4))
    field.bake(fp16=True)
    for s in field.grid.storages:
        s.V = torch.zeros_like(s.V)
    path.write_bytes(F.to_bytes(field, entropy=True))
    return path


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> dict[str, Path]:
    """Small files of big models, each a shape the decoding memory estimate must cover:

    * ``full``: levels 2..6 with every cell occupied: 300k cells in ~50 kB;
    * ``sparse``: levels 2..6 full, and level 7 holds child 0 of every level-6 cell, so no two of its cells
      share a corner: 8 vertices per cell, 2.1M in all (the estimate used to count cells only, and such a
      level exceeded it by a third; found by the fuzz campaign);
    * ``path8``: one cell per level down to level 8: the octree's dense level-8 tables, not its 7 cells,
      cost the memory (~150 MB from a 2 kB file; found by the fuzz campaign).
    """
    d = tmp_path_factory.mktemp("bomb")
    return {
        "full": _model_file(d / "full.vqad", torch.arange(8 ** 6), 6),
        "sparse": _model_file(d / "sparse.vqad", torch.arange(8 ** 6) << 3, 7),
        "path8": _model_file(d / "path8.vqad", torch.zeros(1, dtype=torch.long), 8),
    }


@pytest.fixture(scope="module")
def full_octree_file(model_files) -> Path:
    return model_files["full"]


def test_a_model_over_the_memory_limit_is_refused_before_it_is_built(full_octree_file):
    import time

    from vqad.errors import StreamLimitError

    data = full_octree_file.read_bytes()
    dec = F.StreamDecoder(max_memory=1 << 40)
    dec.feed(data)
    need = dec.needed_bytes
    cells, vertices = 299_584, 316_329  # levels 2..6 of a full octree: 4^3 + .. + 64^3 cells, 5^3 + .. + 65^3 vertices
    least = cells * F.DECODE_BYTES_PER_CELL + vertices * F.DECODE_BYTES_PER_VERTEX
    assert least < need < 2 * least
    t0 = time.perf_counter()
    with pytest.raises(StreamLimitError, match=r"LOD 6 .* needs about .*\(--lod 5\)"):
        F.load(data, max_memory=need - 1)
    assert time.perf_counter() - t0 < 0.5  # refused from the octree counts, nothing built
    assert F.load(data, lod=5, max_memory=need - 1).lods == [2, 3, 4, 5]  # coarser LODs still decode
    with pytest.raises(StreamLimitError):
        list(F.iter_lods(data, max_memory=need - 1))
    import vqad

    with pytest.raises(StreamLimitError):  # the package's load passes it on, as format.md says
        vqad.load(data, max_memory=need - 1)
    assert vqad.load(data, lod=5, max_memory=need - 1).lods == [2, 3, 4, 5]
    os.environ[F.MAX_MEMORY_ENV] = str(need - 1)
    try:
        with pytest.raises(StreamLimitError):
            F.load(data)
    finally:
        del os.environ[F.MAX_MEMORY_ENV]


@pytest.mark.parametrize("shape", ["full", "sparse", "path8"])
def test_decoding_stays_within_its_stated_memory_estimate(model_files, shape):
    """Peak resident memory of a fresh process decoding a big model (see ``model_files``) and evaluating it,
    over what it held before, stays within the estimate the limit uses."""
    if not os.path.exists("/proc/self/statm"):
        pytest.skip("needs /proc (Linux) to read the resident memory")
    import subprocess
    import sys

    code = (
        "import torch, sys; torch.set_num_threads(1); from vqad import fileformat as F\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "F.load(data, lod=3)(torch.rand(8, 3))  # warm up: PyTorch's first calls map code and arenas\n"
        "import os; r0 = int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') // 1024\n"
        "dec = F.StreamDecoder(); dec.feed(data); f = dec.field(); f(torch.rand(8, 3))\n"
        "hwm = next(int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmHWM'))\n"
        "print(dec.needed_bytes, (hwm - r0) * 1024)  # VmHWM, not ru_maxrss: that one counts the forking parent\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(model_files[shape])], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    need, peak = int(out[0]), int(out[1])
    assert 0 < peak <= need, f"decoding peaked at {peak / 2**20:.0f} MiB, over its {need / 2**20:.0f} MiB estimate"


@pytest.mark.parametrize("text,value", [("4G", 4 << 30), ("512M", 512 << 20), ("64k", 64 << 10), ("1000", 1000),
                                        ("1.5GiB", 3 << 29)])
def test_parse_bytes(text, value):
    assert F.parse_bytes(text, "x") == value


@pytest.mark.parametrize("text", ["", "0", "-1G", "nan", "1X", "G", "1e30T"])
def test_parse_bytes_refuses(text):
    from vqad.errors import InputError

    with pytest.raises(InputError, match="must be a size"):
        F.parse_bytes(text, "x")
