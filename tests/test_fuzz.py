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


def _file(entropy: bool, storage: str = "codebook") -> bytes:
    torch.manual_seed(0)
    p = torch.randn(1000, 3)
    octree = SparseOctree.from_points(0.7 * p / p.norm(dim=1, keepdim=True), 2, 5, dilate=1)
    grid = OctreeGrid.from_octree(octree, GridConfig(storage, 2, 4, 2, 5))
    field = SDFField(grid, DecoderConfig(hidden=4))
    field.bake(fp16=True)
    if storage == "codebook":
        for s in field.grid.storages:  # skewed indices, so the range coder is used and fuzzed too
            s.V = torch.clamp(torch.distributions.Geometric(0.5).sample((s.m,)).long(), max=15)
    return F.to_bytes(field, entropy=entropy)


FILES = {"raw": _file(False), "entropy": _file(True), "dense": _file(False, "dense")}
_codecs = {c.codec for c in F.read_info(FILES["entropy"]).chunks}
assert {F.Codec.RANGE, F.Codec.OCTREE} <= _codecs, "the entropy file should exercise both entropy decoders"

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
