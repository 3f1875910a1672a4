"""The progressive ``.vqad`` file: write a baked field, decode any prefix, stream LOD after LOD.

The byte layout is specified in ``docs/format.md``; in short::

    preamble   magic b"\\x89VQAD\\r\\n\\x1a", version u16, reserved u16              (12 bytes)
    chunk      type u8, level u8, slot u8, codec u8, length u32, payload, CRC32 u32
    order      HEAD, DECO, then per level L = base..max: TREE(L), GRID(L, slot 0..S-1)

HEAD holds the field config as JSON (kind, grid, decoder, normalisation, storage params), DECO
every tensor of ``field.decoder_state()`` in fp16 with names and shapes, TREE(L) the child masks of
level L (for the base level: of levels 1..base), one byte per occupied cell of the level above in
sorted Morton (= breadth-first) order, and GRID(L, i) the i-th tensor of the level's storage as its
:meth:`~vqad.storage.FeatureStorage.stored_layout` declares it (fp16, or unsigned ints bit-packed
at exactly b bits). Vertex order is derived from the octree, never stored. LOD L is decodable as
soon as its last GRID chunk is complete.

Public API::

    to_bytes(field, entropy=False) -> bytes            save(field, dst, entropy=False) -> int
    load(source, device="cpu", lod=None, max_bytes=None) -> field
    iter_lods(source, device="cpu", lod=None, max_bytes=None) -> Iterator[DecodedLOD]
    StreamDecoder().feed(data) -> list[int]            (push bytes as they arrive: sockets, HTTP)
    lod_prefix_sizes(source) -> {lod: bytes needed}    read_info(source) -> FileInfo

``source`` is a path, ``bytes``-like, a binary stream (``.read(n)``: file, ``socket.makefile('rb')``,
``urllib`` / ``http.client`` response) or an iterable of ``bytes`` blocks. Every problem with the
bytes raises :class:`~vqad.errors.StreamError` (:class:`TruncatedStreamError` before the first
complete LOD, :class:`CorruptStreamError` for damage); nothing is allocated beyond a small multiple
of the bytes actually received.
"""

from __future__ import annotations

import io
import json
import os
import struct
import warnings
import zlib
from dataclasses import dataclass, field as dfield, replace
from enum import IntEnum
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from vqad import entropy as E
from vqad.bitpack import pack_bits, packed_size, unpack_bits
from vqad.atomicio import write_atomic
from vqad.config import GridConfig, to_dict
from vqad.device import MAX_MEMORY_ENV, default_max_memory, parse_bytes, resolve_device  # (parse_bytes re-exported)
from vqad.errors import (CorruptStreamError, InputError, ShortPrefixWarning, StreamError, StreamLimitError,
                         TruncatedStreamError, VqadError)
from vqad.field import field_config, field_from_config, record_class
from vqad.grid import OctreeGrid, octree_args
from vqad.octree import DENSE_TABLE_MAX_LEVEL, SparseOctree, corner_tables
from vqad.storages import STORAGES, options_of
from vqad.storages.base import TensorLayout

MAGIC = b"\x89VQAD\r\n\x1a"
VERSION = 1
_PREAMBLE = struct.Struct("<8sHH")
_FRAME = struct.Struct("<BBBBI")
_CRC = struct.Struct("<I")
PREAMBLE_BYTES = _PREAMBLE.size  # 12
FRAME_BYTES = _FRAME.size + _CRC.size  # 12 bytes of framing per chunk

#: Decoding memory: building a LOD and querying it takes at most about ``DECODE_BYTES_PER_CELL`` per octree
#: cell and ``DECODE_BYTES_PER_VERTEX`` per vertex of its levels (codes, corner and vertex tables, storage
#: index tables and their transients), twice the decoded storage tensors, and the octree's dense tables up
#: to level ``DENSE_TABLE_MAX_LEVEL`` (:func:`_lattice_bytes`). The reader refuses, before building it, a LOD
#: whose estimate exceeds ``max_memory`` (see :func:`default_max_memory`).
DECODE_BYTES_PER_CELL = 250
DECODE_BYTES_PER_VERTEX = 150
#: an index or octree chunk is written entropy-coded only when that saves at least this share of its raw bytes:
#: range-decoding a b-bit index costs ~15 ns against ~2 ns to unpack it raw, so a plain 4-bit model's
#: finest indices (0.4 % smaller coded, 62 kB) would cost 2.4 ms of decoding to save 250 bytes
MIN_CODED_SAVING = 0.02
MAX_HEADER_BYTES = 1 << 20
MAX_DECODER_DIR_BYTES = 1 << 16
READ_BLOCK = 1 << 16


class ChunkType(IntEnum):
    HEAD = 1  # field config, JSON
    DECO = 2  # decoder tensors, fp16
    TREE = 3  # octree child masks of one level (base chunk: levels 1..base)
    GRID = 4  # one stored tensor of one level's feature storage


class Codec(IntEnum):
    RAW = 0  # bytes as specified (masks one byte each, fp16, bit-packed uints)
    RANGE = 1  # order-0 range coding with the frequency table in the chunk (vqad.entropy.encode)
    OCTREE = 2  # TREE only: child bits range-coded under a 7-neighbour context (vqad.entropy.encode_octree)
    CONTEXT = 3  # GRID only: per-vertex uints coded given the coarser level's value at floor(v/2) (vqad.entropy.encode_context)


_ALLOWED_CODECS = {
    ChunkType.HEAD: (Codec.RAW,),
    ChunkType.DECO: (Codec.RAW,),
    ChunkType.TREE: (Codec.RAW, Codec.RANGE, Codec.OCTREE),
    ChunkType.GRID: (Codec.RAW, Codec.RANGE, Codec.CONTEXT),  # RANGE / CONTEXT only for "uint" tensors (_context_slot)
}


@dataclass(frozen=True)
class ChunkRecord:
    """One chunk of a stream: where it is and what it holds (``length`` = payload bytes)."""

    offset: int
    type: int
    level: int
    slot: int
    codec: int
    length: int
    name: str
    raw_length: int | None = None  # payload bytes without entropy coding (TREE: once decoded; all: in read_info)
    symbols: int | None = None  # read_info, uint GRID chunks: the values (indices) it holds
    bits: int | None = None  # ... and their bits each before coding (b)
    model_length: int | None = None  # read_info, entropy-coded GRID chunks: bytes of the stored probability model

    @property
    def size(self) -> int:
        return FRAME_BYTES + self.length

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass
class DecodedLOD:
    """A level of detail as soon as its last chunk arrived: ``nbytes`` = stream prefix it needed."""

    lod: int
    nbytes: int
    field: torch.nn.Module


# ================================================================================================
# writing
# ================================================================================================
def _fp16_exact(t: torch.Tensor) -> bool:
    r = t.detach().half().to(t.dtype)
    same = (r == t) | (torch.isnan(r) & torch.isnan(t))
    return bool(same.all())


def _check_writable(field) -> None:
    if not field.baked:
        raise InputError(
            "the field is not baked: call field.bake(fp16=True) before writing a .vqad file "
            "(vqad export does this for you)"
        )
    for name, t in field.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InputError(
                f"tensor {name} holds NaN or inf values (the fit diverged): a .vqad file holds finite values only; "
                "refit with a lower learning rate"
            )
        if t.is_floating_point() and not _fp16_exact(t):
            raise InputError(
                f"tensor {name} holds values that fp16 cannot represent exactly, so the file would not "
                "decode to this model: bake with field.bake(fp16=True) first"
            )


def _frame(ctype: int, level: int, slot: int, codec: int, payload: bytes) -> bytes:
    head = _FRAME.pack(ctype, level, slot, codec, len(payload))
    return head + payload + _CRC.pack(zlib.crc32(payload, zlib.crc32(head)))


def _encode_decoder(state: dict[str, torch.Tensor]) -> bytes:
    """Directory (u16 count; per tensor u16 name length, UTF-8 name, u8 ndim, u32 dims) + fp16 data."""
    head = bytearray(struct.pack("<H", len(state)))
    data = []
    for name, t in state.items():
        if not t.is_floating_point():
            raise InputError(f"decoder tensor {name} has dtype {t.dtype}: the .vqad decoder chunk holds floating tensors only")
        nb = name.encode("utf-8")
        head += struct.pack("<H", len(nb)) + nb + struct.pack("<B", t.dim())
        head += struct.pack(f"<{t.dim()}I", *t.shape)
        data.append(t.detach().cpu().to(torch.float16).numpy().astype("<f2").tobytes())
    return bytes(head) + b"".join(data)


def _tree_levels(octree: SparseOctree, level: int) -> list[int]:
    """Levels whose child masks the TREE chunk of ``level`` holds."""
    return list(range(1, level + 1)) if level == octree.base_level else [level]


def _encode_tree(octree: SparseOctree, level: int, entropy: bool) -> tuple[int, bytes]:
    parts = []
    for lv in _tree_levels(octree, level):
        masks = octree.child_masks(lv).cpu().numpy()
        parts.append((octree.codes_at(lv - 1).cpu().numpy(), lv - 1, masks))
    raw = b"".join(p[2].tobytes() for p in parts)
    if not entropy:
        return Codec.RAW, raw
    return _choose_codec(raw, [(Codec.RANGE, E.encode(np.frombuffer(raw, dtype=np.uint8), 256)),
                               (Codec.OCTREE, E.encode_octree(parts))], symbols=len(raw))


def _choose_codec(raw: bytes, candidates: list[tuple[int, bytes]], symbols: int) -> tuple[int, bytes]:
    """``(Codec.RAW, raw)``, or the smallest coded ``(codec, payload)`` of ``candidates`` that is at least
    :data:`MIN_CODED_SAVING` smaller than ``raw`` and that a reader accepts for ``symbols`` symbols
    (:func:`vqad.entropy.allowed`). The one rule of every TREE and GRID chunk."""
    best = (Codec.RAW, raw)
    for codec, payload in candidates:
        if (len(payload) < len(best[1]) and len(payload) <= (1 - MIN_CODED_SAVING) * len(raw)
                and E.allowed(symbols, len(payload))):
            best = (codec, payload)
    return best


def _context_slot(lay: TensorLayout, m: int, coarser: list[TensorLayout] | None, m_coarser: int) -> int | None:
    """The slot of the coarser level's tensor that gives ``lay`` its contexts (:data:`Codec.CONTEXT`), or None.

    A tensor can be context-coded when it holds one uint per vertex (shape ``(m,)``) and the next coarser
    level (``coarser``, None at the base level) stores a tensor of the same name that also holds one uint
    per vertex (``(m_coarser,)``), with ``2^bits · 2^bits_coarser ≤ CONTEXT_MAX_CELLS``: vertex ``v``'s value is
    coded given that tensor's value at the coarser vertex ``floor(v / 2)``
    (:meth:`~vqad.octree.SparseOctree.coarser_vertices`). For VQ-AD that is ``V_L`` given ``V_{L-1}``.
    Writer and reader both decide with this function.
    """
    if coarser is None or lay.encoding != "uint" or lay.shape != (m,):
        return None
    for slot, c in enumerate(coarser):
        if (c.name == lay.name and c.encoding == "uint" and c.shape == (m_coarser,)
                and E.context_codable(1 << lay.bits, 1 << c.bits)):
            return slot
    return None


def _encode_tensor(t: torch.Tensor, lay: TensorLayout, entropy: bool,
                   context: tuple[np.ndarray, int] | None = None) -> tuple[int, bytes]:
    """The smallest of the codecs that apply: ``context = (contexts (n,), K)`` when :func:`_context_slot` allows;
    RAW unless a coded payload is at least :data:`MIN_CODED_SAVING` smaller."""
    if t.numel() != lay.numel:
        raise InputError(f"stored tensor {lay.name} has shape {tuple(t.shape)}, its layout says {lay.shape}")
    if lay.encoding == "f16":
        return Codec.RAW, t.detach().cpu().to(torch.float16).reshape(-1).numpy().astype("<f2").tobytes()
    values = t.detach().cpu().reshape(-1).numpy()
    raw = pack_bits(values, lay.bits)
    if not (entropy and lay.bits <= 12 and values.size):
        return Codec.RAW, raw
    candidates = [(Codec.RANGE, E.encode(values, 1 << lay.bits))]
    if context is not None:
        candidates.append((Codec.CONTEXT, E.encode_context(values, context[0], 1 << lay.bits, context[1])))
    return _choose_codec(raw, candidates, symbols=values.size)


def iter_chunks(field, entropy: bool = False) -> Iterator[bytes]:
    """The file of a baked field, piece by piece: the preamble, then each framed chunk in stream order."""
    _check_writable(field)
    cfg = field_config(field)
    header = json.dumps({"field": cfg}, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")
    yield _PREAMBLE.pack(MAGIC, VERSION, 0)
    yield _frame(ChunkType.HEAD, 0, 0, Codec.RAW, header)
    yield _frame(ChunkType.DECO, 0, 0, Codec.RAW, _encode_decoder(field.decoder_state()))
    octree = field.grid.octree
    k = field.grid.cfg.features
    coarser = None  # (layout, tensors, m) of the level above
    for level in octree.levels:
        codec, payload = _encode_tree(octree, level, entropy)
        yield _frame(ChunkType.TREE, level, 0, codec, payload)
        storage = field.grid.storage(level)
        layout = type(storage).stored_layout(storage.m, k, **storage.params())
        tensors = storage.export_tensors()
        for slot, lay in enumerate(layout):
            context = None
            src = _context_slot(lay, storage.m, coarser and coarser[0], coarser[2] if coarser else 0) if entropy else None
            if src is not None:
                c_lay = coarser[0][src]
                up = octree.coarser_vertices(level).cpu()
                context = (coarser[1][c_lay.name].detach().cpu().reshape(-1)[up].numpy(), 1 << c_lay.bits)
            codec, payload = _encode_tensor(tensors[lay.name], lay, entropy, context)
            yield _frame(ChunkType.GRID, level, slot, codec, payload)
        coarser = (layout, tensors, storage.m)


def to_bytes(field, entropy: bool = False) -> bytes:
    """The whole ``.vqad`` file of a baked field (see :func:`iter_chunks`).

    Args:
        field: a baked field (``field.bake(fp16=True)``), any kind (sdf, nerf, ...).
        entropy: range-code index and octree chunks where that makes them smaller (lossless).
    """
    if not isinstance(entropy, bool):  # "no" is truthy: it coded the file
        raise InputError(f"entropy must be True or False, got {entropy!r}")
    return b"".join(iter_chunks(field, entropy))


def save(field, dst, entropy: bool = False) -> int:
    """Write the ``.vqad`` file of a baked field to a path (atomically) or a binary stream; returns its bytes."""
    if isinstance(field, (str, os.PathLike)) or not hasattr(field, "grid"):
        raise InputError(f"save(field, dst): the first argument is the baked field to write, not a "
                         f"{type(field).__name__}; the path or binary stream comes second")
    if isinstance(dst, io.TextIOBase):
        raise InputError(f"cannot write a .vqad file to a text stream ({type(dst).__name__}): open it in binary mode ('wb')")
    if not hasattr(dst, "write") and (not isinstance(dst, (str, os.PathLike)) or not str(os.fspath(dst)).strip()):
        raise InputError(f"save(field, dst): dst is a path or a binary stream, got {dst!r:.60}")
    data = to_bytes(field, entropy)
    if hasattr(dst, "write"):
        dst.write(data)
        return len(data)
    return write_atomic(dst, data, what=".vqad file")


# ================================================================================================
# reading
# ================================================================================================
def _gb(n: float) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.0f} MiB" if n >= 10 * 2**20 else f"{n / 2**20:.2g} MiB"


def _corrupt(msg: str) -> CorruptStreamError:
    return CorruptStreamError(f"{msg}: the .vqad stream is damaged (re-download or re-export it)")


@dataclass
class _Level:
    """What the stream has delivered for one level."""

    codes: torch.Tensor  # (n_L,) sorted Morton codes (CPU)
    n_masks: int  # mask bytes the TREE chunk decodes to (its raw size)
    corners: torch.Tensor  # (n_L, 8) corner vertex ids, built once as the level arrives (corner_tables)
    keys: torch.Tensor  # (m_L,) vertex Morton keys (the octree decodes coordinates from them when asked)
    grid: list[tuple[ChunkRecord, bytes]] = dfield(default_factory=list)
    tensors: dict[str, torch.Tensor] | None = None  # decoded once, on first use


class StreamDecoder:
    """Incremental .vqad decoder: push bytes with :meth:`feed` as they arrive, build fields on demand.

    >>> dec = StreamDecoder()
    >>> for block in blocks:                      # e.g. socket.recv / an HTTP response, any sizes
    ...     for lod in dec.feed(block):           # LODs completed by this block
    ...         show(dec.field(lod))

    Chunks are checked (order, sizes, CRC) as soon as they are complete; octree chunks are decoded
    immediately (each level's structure is needed to read the next), storage chunks when a field
    that needs them is built. Memory stays proportional to the bytes received.
    """

    def __init__(self, max_memory: int | None = None, stop_lod: int | None = None) -> None:
        """``max_memory``: refuse (:class:`StreamLimitError`) a LOD whose decoding would take more bytes
        (default :func:`default_max_memory`); ``stop_lod``: read no chunk past this LOD's last one."""
        self.max_memory = default_max_memory() if max_memory is None else int(max_memory)
        self._stop_lod = stop_lod
        self._cells = 0  # octree cells of the levels decoded so far
        self._vertices: dict[int, int] = {}  # each decoded level's vertex count m
        self.needed_bytes = 0  # estimated memory to build the finest LOD whose octree has arrived
        self._buf = bytearray()
        self._off = 0  # stream offset of _buf[0]
        self._preamble_done = False
        self.cfg: dict | None = None
        self.grid_cfg: GridConfig | None = None
        self.chunks: list[ChunkRecord] = []
        self.prefix_sizes: dict[int, int] = {}
        self._decoder: dict[str, torch.Tensor] | None = None
        self._decoder_shapes: dict[str, tuple[int, ...]] = {}
        self._shell = None  # the header's field on the meta device, until a field of every LOD takes it
        self._slots: dict[int, list[str]] = {}
        self._levels: dict[int, _Level] = {}
        self._frame: tuple | None = None  # parsed frame header of the chunk being received
        self._error: StreamError | None = None

    # -- state ------------------------------------------------------------------------------------
    @property
    def bytes_received(self) -> int:
        return self._off + len(self._buf)

    @property
    def complete_lods(self) -> list[int]:
        return sorted(self.prefix_sizes)

    @property
    def finished(self) -> bool:
        """Every LOD of the file has arrived."""
        return self.grid_cfg is not None and self.grid_cfg.max_level in self.prefix_sizes

    @property
    def base_level(self) -> int | None:
        return None if self.grid_cfg is None else self.grid_cfg.base_level

    @property
    def max_level(self) -> int | None:
        return None if self.grid_cfg is None else self.grid_cfg.max_level

    def _expected(self) -> tuple[int, int, int, str]:
        """(type, level, slot, name) of the next chunk."""
        if self.cfg is None:
            return ChunkType.HEAD, 0, 0, "header"
        if self._decoder is None:
            return ChunkType.DECO, 0, 0, "decoder"
        level = self.grid_cfg.base_level + len(self.prefix_sizes)
        lv = self._levels.get(level)
        if lv is None:
            return ChunkType.TREE, level, 0, f"octree L{level}"
        slot = len(lv.grid)
        return ChunkType.GRID, level, slot, f"grid L{level} {self._slots[level][slot]}"

    def where(self) -> str:
        """Where the stream stands, for error messages."""
        if not self._preamble_done:
            return "in the 12-byte preamble"
        if self.finished:
            return "after the last chunk"
        _, _, _, name = self._expected()
        return f"in chunk '{name}'" + (f" (starting at byte {self._off:,})" if self._frame or self._buf else "")

    def truncation_error(self) -> TruncatedStreamError:
        if self.bytes_received == 0:
            return TruncatedStreamError("the .vqad stream is empty (truncated to no bytes at all): pass a file written by vqad export")
        first = "the first level of detail" if self.grid_cfg is None else f"the coarsest level of detail (LOD {self.grid_cfg.base_level})"
        need = ""
        if self._frame is not None:
            need = f"; that chunk ends at byte {self._off + FRAME_BYTES + self._frame[4]:,}"
        return TruncatedStreamError(
            f"the .vqad stream is truncated: it ended after {self.bytes_received:,} bytes {self.where()}, "
            f"before {first} was complete{need}. Pass the whole file (or, for a command that reads a prefix, a "
            f"larger --bytes)"
        )

    # -- bytes in ---------------------------------------------------------------------------------
    def feed(self, data) -> list[int]:
        """Append received bytes; returns the LODs completed by them (coarsest first).

        Raises:
            CorruptStreamError: bad magic, unknown version, a CRC mismatch, chunks out of order,
                impossible sizes or undecodable payloads, or bytes after the last chunk.
        """
        if self._error is not None:  # a damaged stream stays damaged: no decoding past the damage
            raise self._error
        try:
            return self._feed(data)
        except StreamError as exc:
            self._error = exc
            raise

    def _feed(self, data) -> list[int]:
        if not data:
            return []
        if self.finished:
            raise _corrupt(f"trailing data after the last chunk, from byte {self.bytes_received:,} (at least "
                           f"{len(data):,} bytes)")
        self._buf += data
        done: list[int] = []
        while True:
            if not self._preamble_done:
                n = min(len(self._buf), 8)
                if bytes(self._buf[:n]) != MAGIC[:n]:
                    raise CorruptStreamError(
                        "not a .vqad file: bad magic bytes (expected \\x89VQAD\\r\\n\\x1a); pass a file written by vqad export"
                    )
                if len(self._buf) < PREAMBLE_BYTES:
                    return done
                _, version, reserved = _PREAMBLE.unpack_from(self._buf)
                if version != VERSION:
                    raise CorruptStreamError(
                        f"unsupported .vqad version {version}: this vqad reads version {VERSION}; upgrade vqad or re-export the model"
                    )
                if reserved != 0:
                    raise _corrupt(f"reserved preamble field is {reserved}, expected 0")
                self._consume(PREAMBLE_BYTES)
                self._preamble_done = True
            if self.finished:
                if self._buf:
                    raise _corrupt(f"trailing data after the last chunk, from byte {self._off:,} (at least "
                                   f"{len(self._buf):,} bytes)")
                return done
            if self._stop_lod is not None and self.prefix_sizes and max(self.prefix_sizes) >= self._stop_lod:
                return done  # what was asked for is complete: the rest is never parsed
            if self._frame is None:
                if len(self._buf) < _FRAME.size:
                    return done
                self._frame = _FRAME.unpack_from(self._buf)
                self._check_frame(*self._frame)
            total = FRAME_BYTES + self._frame[4]
            if len(self._buf) < total:
                return done
            lod = self._take_chunk(bytes(self._buf[:total]))
            self._consume(total)
            self._frame = None
            if lod is not None:
                done.append(lod)

    def _consume(self, n: int) -> None:
        del self._buf[:n]
        self._off += n

    def _check_frame(self, ctype: int, level: int, slot: int, codec: int, length: int) -> None:
        """Validate a chunk's frame header before waiting for (or allocating) its payload."""
        etype, elevel, eslot, name = self._expected()
        at = f"at byte {self._off:,}"
        if ctype not in {c.value for c in ChunkType}:
            raise _corrupt(f"unknown chunk type {ctype} {at} (expected '{name}')")
        if (ctype, level, slot) != (etype, elevel, eslot):
            got = f"{ChunkType(ctype).name} level {level} slot {slot}"
            raise _corrupt(f"chunk {at} is {got}, expected '{name}' ({ChunkType(etype).name} level {elevel} slot {eslot})")
        if codec not in [c.value for c in _ALLOWED_CODECS[ChunkType(ctype)]]:
            raise _corrupt(f"chunk '{name}' {at} uses codec {codec}, not allowed for {ChunkType(ctype).name} chunks")
        limit = self._max_payload(ChunkType(ctype), level, slot, codec)
        if length > limit:
            raise _corrupt(f"chunk '{name}' {at} declares {length:,} payload bytes, more than the {limit:,} it can hold")

    def _max_payload(self, ctype: ChunkType, level: int, slot: int, codec: int) -> int:
        """Upper bound on a chunk's payload, from what the stream has already established."""
        if ctype == ChunkType.HEAD:
            return MAX_HEADER_BYTES
        if ctype == ChunkType.DECO:
            return MAX_DECODER_DIR_BYTES + 2 * sum(int(np.prod(s)) for s in self._decoder_shapes.values())
        if ctype == ChunkType.TREE:
            if level == self.grid_cfg.base_level:  # masks of levels 0..base-1 cells: at most (8^base - 1) / 7
                return ((8 ** level - 1) // 7) - (1 if codec != Codec.RAW else 0)
            raw = int(self._levels[level - 1].codes.numel())
            return raw if codec == Codec.RAW else raw - 1  # entropy coding must save bytes
        # GRID: m ≤ 8 n_L vertices, so the raw size with that m bounds the payload
        m_max = 8 * int(self._levels[level].codes.numel())
        lay = self._layout(level, m_max)[slot]
        if codec == Codec.RANGE and (lay.encoding != "uint" or lay.bits > 12):
            raise _corrupt(f"chunk 'grid L{level} {lay.name}' is range-coded, which only {lay.name!r} tensors of uint ≤ 12 bits may be")
        if codec == Codec.CONTEXT and self._context_slot(level, slot, m_max) is None:
            raise _corrupt(f"chunk 'grid L{level} {lay.name}' is context-coded, which only per-vertex uint tensors "
                           "whose coarser level stores the same tensor may be")
        return _raw_size(lay)

    def _take_chunk(self, chunk: bytes) -> int | None:
        ctype, level, slot, codec, length = self._frame
        _, _, _, name = self._expected()
        payload = chunk[_FRAME.size:_FRAME.size + length]
        (stored,) = _CRC.unpack_from(chunk, _FRAME.size + length)
        computed = zlib.crc32(payload, zlib.crc32(chunk[:_FRAME.size]))
        if stored != computed:
            raise _corrupt(
                f"CRC mismatch in chunk '{name}' (bytes {self._off:,}..{self._off + len(chunk):,}): "
                f"stored {stored:08x}, computed {computed:08x}"
            )
        rec = ChunkRecord(self._off, ctype, level, slot, codec, length, name)
        if ctype == ChunkType.HEAD:
            self._read_header(payload)
        elif ctype == ChunkType.DECO:
            self._read_decoder(payload)
        elif ctype == ChunkType.TREE:
            rec = replace(rec, raw_length=self._read_tree(level, codec, payload))
        else:
            lv = self._levels[level]
            lv.grid.append((rec, payload))
        self.chunks.append(rec)
        if ctype == ChunkType.GRID and len(self._levels[level].grid) == len(self._slots[level]):
            self.prefix_sizes[level] = rec.end
            return level
        return None

    # -- chunk payloads ---------------------------------------------------------------------------
    def _read_header(self, payload: bytes) -> None:
        try:
            doc = json.loads(payload.decode("utf-8"))
        except (ValueError, RecursionError) as exc:  # bad UTF-8 / JSON, or an integer literal over Python's digit limit
            raise _corrupt(f"header is not valid JSON ({exc})") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("field"), dict):
            raise _corrupt("header JSON has no 'field' object")
        if set(doc) != {"field"}:
            raise _corrupt(f"header JSON has keys besides 'field' ({', '.join(sorted(map(str, set(doc) - {'field'})))[:120]}): "
                           "written by a newer vqad? upgrade it")
        cfg = doc["field"]
        try:
            record_class(cfg)  # its keys, before any is read
            grid_cfg = GridConfig.from_stored(cfg["grid"])  # an old storage name is read as today's kind
            grid_cfg.validate()
            cfg = dict(cfg, grid=to_dict(grid_cfg))
            params = cfg["storage_params"]
            if not isinstance(params, list) or len(params) != len(grid_cfg.lods) or not all(isinstance(p, dict) for p in params):
                raise InputError(f"storage_params must hold one object per level ({len(grid_cfg.lods)})")
            slots = {}
            options = options_of(grid_cfg.storage)
            for level, p in zip(grid_cfg.lods, params):
                if set(p) != set(options):  # what the writer wrote (the storage's params(); their values may differ by level)
                    raise InputError(f"storage_params of level {level} name {sorted(p)}, a {grid_cfg.storage} level's "
                                     f"are {list(options)}")
                layout = STORAGES[grid_cfg.storage].stored_layout(1, grid_cfg.features, **p)
                for lay in layout:
                    if lay.encoding not in ("f16", "uint") or (lay.encoding == "uint" and not 1 <= lay.bits <= 32):
                        raise InputError(f"storage layout entry {lay} cannot be stored")
                slots[level] = [lay.name for lay in layout]
            shell = _decoder_shell(cfg, grid_cfg)
            shapes = {k: tuple(v.shape) for k, v in shell.decoder_state().items()}
        except (VqadError, KeyError, TypeError, ValueError, AttributeError, RuntimeError, OverflowError) as exc:
            raise _corrupt(f"header describes a model this vqad cannot build ({type(exc).__name__}: {exc})") from exc
        self.cfg, self.grid_cfg, self._slots, self._decoder_shapes = cfg, grid_cfg, slots, shapes
        self._shell = shell

    def _read_decoder(self, payload: bytes) -> None:
        try:
            (count,) = struct.unpack_from("<H", payload, 0)
            pos = 2
            entries = []
            for _ in range(count):
                (nlen,) = struct.unpack_from("<H", payload, pos)
                name = payload[pos + 2:pos + 2 + nlen].decode("utf-8")
                pos += 2 + nlen
                (ndim,) = struct.unpack_from("<B", payload, pos)
                shape = struct.unpack_from(f"<{ndim}I", payload, pos + 1)
                pos += 1 + 4 * ndim
                entries.append((name, tuple(shape)))
        except (struct.error, UnicodeDecodeError) as exc:
            raise _corrupt(f"decoder chunk directory is malformed ({exc})") from exc
        got = dict(entries)
        if len(got) != len(entries) or got != self._decoder_shapes:
            raise _corrupt(
                "decoder chunk does not match the header's decoder architecture "
                f"(tensors {sorted(got)[:3]}..., expected {sorted(self._decoder_shapes)[:3]}...)"
            )
        need = 2 * sum(int(np.prod(s)) for _, s in entries)
        if len(payload) - pos != need:
            raise _corrupt(f"decoder chunk holds {len(payload) - pos:,} data bytes, its directory needs {need:,}")
        data = _finite_f16(np.frombuffer(payload, dtype="<f2", offset=pos), "decoder chunk")
        state, i = {}, 0
        for name, shape in entries:
            n = int(np.prod(shape))
            state[name] = torch.from_numpy(data[i:i + n].astype(np.float32)).reshape(shape)
            i += n
        self._decoder = state

    def _read_tree(self, level: int, codec: int, payload: bytes) -> int:
        """Decode one TREE chunk into the sorted codes of ``level``; returns the mask bytes it held."""
        base = self.grid_cfg.base_level
        if level == base:
            parents, plevels = torch.zeros(1, dtype=torch.long), list(range(0, base))
        else:
            parents, plevels = self._levels[level - 1].codes, [level - 1]
        try:
            if codec == Codec.RAW:
                pos = 0

                def next_masks(codes, plevel):
                    nonlocal pos
                    n = codes.numel()
                    if pos + n > len(payload):
                        raise _corrupt(f"octree chunk of level {level} is too short: {len(payload)} bytes")
                    m = np.frombuffer(payload, dtype=np.uint8, count=n, offset=pos)
                    pos += n
                    return m
            elif codec == Codec.RANGE:
                dec = E.Decoder(payload, 256)

                def next_masks(codes, plevel):
                    return dec.decode(codes.numel()).astype(np.uint8)
            else:
                odec = E.OctreeDecoder(payload)
                up = self._levels.get(level - 1)  # its corner table, built when it was read

                def next_masks(codes, plevel):
                    if up is not None and plevel == level - 1:
                        return odec.decode_level(codes.numpy(), plevel, up.corners, int(up.keys.shape[0]))
                    return odec.decode_level(codes.numpy(), plevel)

            total = 0
            for plevel in plevels:
                masks = next_masks(parents, plevel)
                total += masks.size
                if masks.size and not masks.all():
                    raise _corrupt(f"octree chunk of level {level}: an occupied cell of level {plevel} has no children")
                parents = SparseOctree.codes_from_child_masks(parents, torch.from_numpy(np.array(masks, dtype=np.uint8)))
            if codec == Codec.RAW and pos != len(payload):
                raise _corrupt(f"octree chunk of level {level} has {len(payload) - pos} bytes after its last mask")
            if codec != Codec.RAW and len(payload) >= total:
                raise _corrupt(f"entropy-coded octree chunk of level {level} is not smaller than its {total} raw bytes")
        except E.EntropyError as exc:
            raise _corrupt(f"octree chunk of level {level}: {exc}") from exc
        corners, keys = self._build_tables(level, parents)
        self._levels[level] = _Level(codes=parents, n_masks=total, corners=corners, keys=keys)
        return total

    def _build_tables(self, level: int, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The corner and vertex-key tables of ``level`` (its cells ``codes``), built once: refused before
        building if the cells alone exceed ``max_memory``, and again once its vertex count m is known."""
        self._cells += int(codes.numel())
        self._vertices[level] = 0
        self._check_memory(level)  # the tables' own memory is counted per cell
        corners, keys = corner_tables(codes, level)
        self._vertices[level] = int(keys.shape[0])
        self._check_memory(level)
        return corners, keys

    def _check_memory(self, level: int) -> None:
        """Refuse LOD ``level`` if building it would take more than ``max_memory``."""
        storage = sum(lay.numel * (4 if lay.encoding == "f16" else 8)
                      for lv, m in self._vertices.items() for lay in self._layout(lv, m))
        need = (DECODE_BYTES_PER_CELL * self._cells + DECODE_BYTES_PER_VERTEX * sum(self._vertices.values())
                + 2 * storage + _lattice_bytes(self.grid_cfg.base_level, level))
        self.needed_bytes = need
        if need > self.max_memory:
            raise StreamLimitError(
                f"LOD {level} of this .vqad stream ({self._cells:,} octree cells) needs about {_gb(need)} to decode, "
                f"more than the limit of {_gb(self.max_memory)}: "
                + (f"decode a coarser LOD (--lod {level - 1}), or " if level > self.grid_cfg.base_level else "")
                + f"raise the limit (max_memory=, ${MAX_MEMORY_ENV}) if this machine has the memory"
            )

    # -- fields out -------------------------------------------------------------------------------
    def _layout(self, level: int, m: int) -> list[TensorLayout]:
        i = level - self.grid_cfg.base_level
        return STORAGES[self.grid_cfg.storage].stored_layout(m, self.grid_cfg.features, **self.cfg["storage_params"][i])

    def _context_slot(self, level: int, slot: int, m: int, m_coarser: int | None = None) -> int | None:
        """:func:`_context_slot` for a chunk of this stream (``m_coarser``: the coarser level's vertices, if known)."""
        if level == self.grid_cfg.base_level:
            return None
        if m_coarser is None:  # only shapes matter: a per-vertex tensor has the length it is given
            m_coarser = 1
        return _context_slot(self._layout(level, m)[slot], m, self._layout(level - 1, m_coarser), m_coarser)

    def _level_tensors(self, octree: SparseOctree, level: int) -> dict[str, torch.Tensor]:
        lv = self._levels[level]
        if lv.tensors is not None:
            return lv.tensors
        m = octree.num_vertices(level)
        out = {}
        for (rec, payload), lay in zip(lv.grid, self._layout(level, m)):
            raw = _raw_size(lay)
            try:
                if rec.codec == Codec.RAW:
                    if len(payload) != raw:
                        raise _corrupt(f"chunk '{rec.name}' holds {len(payload):,} bytes; {lay.name} {lay.shape} needs {raw:,}")
                    if lay.encoding == "f16":
                        a = _finite_f16(np.frombuffer(payload, dtype="<f2"), f"chunk '{rec.name}'")
                        t = torch.from_numpy(a.astype(np.float16))
                    else:
                        t = torch.from_numpy(unpack_bits(payload, lay.numel, lay.bits))
                else:
                    if len(payload) >= raw:
                        raise _corrupt(f"entropy-coded chunk '{rec.name}' is not smaller than its raw size")
                    if rec.codec == Codec.RANGE:
                        t = torch.from_numpy(E.decode(payload, lay.numel, 1 << lay.bits))
                    else:
                        t = torch.from_numpy(self._decode_context(octree, level, rec.slot, payload))
            except (ValueError, E.EntropyError) as exc:  # bitpack / entropy reject malformed payloads
                raise _corrupt(f"chunk '{rec.name}': {exc}") from exc
            out[lay.name] = t.reshape(lay.shape)
        lv.tensors = out
        return out

    def _decode_context(self, octree: SparseOctree, level: int, slot: int, payload: bytes) -> np.ndarray:
        """A :data:`Codec.CONTEXT` chunk: its contexts are the coarser level's decoded tensor at ``floor(v / 2)``."""
        m, m_up = octree.num_vertices(level), octree.num_vertices(level - 1)
        src = self._context_slot(level, slot, m, m_up)
        if src is None:
            raise _corrupt(f"grid L{level} slot {slot} is context-coded, but this tensor has no coarser counterpart")
        c_lay = self._layout(level - 1, m_up)[src]
        up = self._level_tensors(octree, level - 1)[c_lay.name].reshape(-1)
        contexts = up.index_select(0, octree.coarser_vertices(level).to(up.device)).numpy()
        return E.decode_context(payload, contexts, 1 << self._layout(level, m)[slot].bits, 1 << c_lay.bits)

    def field(self, lod: int | None = None, device: str | torch.device = "cpu", *, copy_tables: bool = True):
        """The baked field of the largest complete LOD ``<= lod`` (default: the largest complete).

        ``copy_tables=False`` hands this decoder's octree tables to the field instead of copies (no copy
        of the largest tables): only for a decoder that is not used again, as :func:`load`'s.

        Raises:
            TruncatedStreamError: no LOD is complete yet.
            InputError: ``lod`` is coarser than the file's coarsest LOD.
        """
        if not self.prefix_sizes:
            raise self.truncation_error()
        if lod is not None and lod < self.grid_cfg.base_level:
            raise InputError(
                f"LOD {lod} is coarser than this file's coarsest LOD {self.grid_cfg.base_level}: "
                f"choose one of {self.grid_cfg.base_level}..{self.grid_cfg.max_level}"
            )
        top = max(lv for lv in self.prefix_sizes if lod is None or lv <= lod)
        device = resolve_device(device)  # cpu or an existing CUDA GPU, else one clear error
        grid_cfg = replace(self.grid_cfg, max_level=top)
        tables = {lv: (self._levels[lv].codes, self._levels[lv].corners, self._levels[lv].keys)
                  for lv in range(grid_cfg.base_level, top + 1)}
        if copy_tables:  # each field owns its tables
            tables = {lv: tuple(t.clone() for t in tab) for lv, tab in tables.items()}
        octree = SparseOctree.from_tables(tables, grid_cfg.base_level, top)
        storages = []
        cls = STORAGES[grid_cfg.storage]
        for i, level in enumerate(octree.levels):
            m = octree.num_vertices(level)
            tensors = self._level_tensors(octree, level)
            try:
                storages.append(cls.from_export(m, grid_cfg.features, tensors, **octree_args(cls, octree, level),
                                                **self.cfg["storage_params"][i]))
            except (VqadError, ValueError, RuntimeError, TypeError) as exc:
                raise _corrupt(f"the {grid_cfg.storage} storage of level {level} cannot be rebuilt ({exc})") from exc
        grid = OctreeGrid(octree, storages, grid_cfg)  # on the CPU, where the decoding put every tensor
        cfg = dict(self.cfg, grid=to_dict(grid_cfg), storage_params=self.cfg["storage_params"][: len(octree.levels)])
        field = None
        if top == self.grid_cfg.max_level and self._shell is not None:  # the header's modules, made real once
            field, self._shell = _fill_shell(self._shell, grid, self._decoder, device), None
        if field is None:
            with torch.random.fork_rng(devices=[]):  # the decoder's random init is overwritten: keep the caller's RNG
                field = field_from_config(cfg, grid)
            if device != octree.device:
                field = field.to(device)
            want = field.decoder_state()
            field.load_decoder_state({k: self._decoder[k] for k in want})
        field.bake(fp16=False)
        return field


def _finite_f16(a: np.ndarray, where: str) -> np.ndarray:
    """``a`` (decoded fp16 values) if every value is finite; a NaN or inf is damage."""
    bad = ~np.isfinite(a)
    if bad.any():
        raise _corrupt(f"{where} holds {int(bad.sum()):,} non-finite values (NaN or inf)")
    return a


def _lattice_bytes(base: int, level: int) -> int:
    """The octree's dense tables for LOD ``level``: while building, a table of marks and vertex ids (5 bytes
    an entry) over the ``8^L`` Morton codes of its finest level up to ``DENSE_TABLE_MAX_LEVEL``
    (:func:`vqad.octree.corner_tables`); for lookups, an int32 cell table and the renderer's int8
    empty-space table over all ``8^L`` cells of each such level."""
    dense = range(base, min(level, DENSE_TABLE_MAX_LEVEL) + 1)
    if not dense:
        return 0
    return 5 * (8 ** dense[-1] + 1) + sum(5 * 8 ** lv for lv in dense)


def _raw_size(lay: TensorLayout) -> int:
    return 2 * lay.numel if lay.encoding == "f16" else packed_size(lay.numel, lay.bits)


def _decoder_shell(cfg: dict, grid_cfg: GridConfig):
    """The field a header describes, allocating nothing: its ``decoder_state()`` names and shapes are
    what the decoder chunk must hold.

    The field is built around a one-cell octree whose tensors live on PyTorch's ``meta`` device and
    with no storages (a field's decoders never look at them), inside ``torch.device("meta")``: so a
    damaged header that asks for a gigantic decoder costs no memory; the decoder chunk that follows
    must then physically hold every weight before anything real is allocated. The reader later makes
    the first field of every LOD out of this shell (:func:`_fill_shell`) instead of building its modules again.
    """
    cell = torch.empty(1, dtype=torch.long, device="meta")
    one = {lv: (cell, torch.empty(1, 8, dtype=torch.long, device="meta"), cell) for lv in grid_cfg.lods}
    octree = SparseOctree.from_tables(one, grid_cfg.base_level, grid_cfg.max_level)  # never read: placeholders
    with torch.device("meta"), torch.random.fork_rng(devices=[]):
        return field_from_config(cfg, OctreeGrid(octree, [], grid_cfg))


def _fill_shell(shell, grid: OctreeGrid, state: dict[str, torch.Tensor], device: torch.device):
    """The field of ``shell`` (:func:`_decoder_shell` of the same header) around ``grid``: each tensor
    outside the grid replaced by a copy, on ``device``, of the decoder chunk's tensor of that name
    (``state``, whose names and shapes were checked against the header's when the chunk arrived), and
    ``grid`` in place of the placeholder. None where that cannot hold: a tensor outside the grid that
    the decoder chunk does not cover (a buffer kept out of the state dict) would stay on the meta
    device, so such a field is built afresh."""
    outside = {n: t for n, t in (*shell.named_parameters(), *shell.named_buffers()) if not n.startswith("grid.")}
    if outside.keys() != state.keys() or any(tuple(t.shape) != tuple(state[n].shape) for n, t in outside.items()):
        return None
    for name, t in state.items():
        path, _, attr = name.rpartition(".")
        module = shell.get_submodule(path)
        copy = t.to(device=device, dtype=outside[name].dtype, copy=True)
        if attr in module._parameters:
            module._parameters[attr] = torch.nn.Parameter(copy, requires_grad=outside[name].requires_grad)
        else:
            module._buffers[attr] = copy
    shell.grid = grid if grid.octree.device == device else grid.to(device)
    return shell


# ================================================================================================
# sources
# ================================================================================================
def _blocks(source, max_bytes: int | None = None, block: int = READ_BLOCK) -> Iterator[bytes]:
    """Bytes of ``source`` in blocks, at most ``max_bytes`` in total."""
    if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 0):
        raise InputError(f"max_bytes must be a non-negative integer, got {max_bytes!r}")
    left = float("inf") if max_bytes is None else max_bytes
    if isinstance(source, (bytes, bytearray, memoryview)):
        mv = memoryview(source)
        if isinstance(source, bytes) and not source.startswith(MAGIC[:1]) and len(source) < 4096 \
                and b"\0" not in source and os.path.exists(source):
            raise InputError(f"{source!r} is read as a .vqad file's contents (bytes), not as its path: pass the path "
                             "as a str or pathlib.Path")
        yield bytes(mv[: int(min(left, len(mv)))])
        return
    if isinstance(source, (str, os.PathLike)):
        try:
            f = open(source, "rb")
        except OSError as exc:
            raise InputError(f"cannot read {source}: {exc.strerror}") from exc
        with f:
            yield from _blocks(f, max_bytes, block=max(block, 1 << 20))
        return
    if isinstance(source, io.TextIOBase):
        raise InputError(f"cannot read a .vqad stream from a text stream ({type(source).__name__}): open the file in "
                         "binary mode ('rb'), or pass its path")
    if hasattr(source, "read"):
        if getattr(source, "closed", False) is True:
            raise InputError(f"the {type(source).__name__} to read the .vqad stream from is closed: read it inside its "
                             "`with open(path, 'rb')` block, or pass the path")
        # read1 returns what has arrived (at least a byte) where read waits for the whole block: over a network a
        # file smaller than the block (a 58 kB model, 64 kB blocks) decoded nothing until the download ended
        read = source.read1 if callable(getattr(source, "read1", None)) else source.read
        while left > 0:
            data = read(int(min(block, left)))
            if data is None:
                raise InputError("the stream is non-blocking and has no data: pass a blocking stream or use StreamDecoder.feed")
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise InputError(f"the stream's read() gives {type(data).__name__}, not bytes: open the file in binary "
                                 "mode ('rb'), or pass its path")
            if not data:
                return
            left -= len(data)
            yield bytes(data)
        return
    if isinstance(source, Iterable) and not isinstance(source, np.ndarray):
        for data in source:
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise InputError(f"an iterable .vqad source yields blocks of bytes, not {type(data).__name__}: pass a "
                                 "path, bytes or a binary file-like object")
            data = bytes(data)[: int(min(left, len(data)))]
            left -= len(data)
            if data:
                yield data
            if left <= 0:
                return
        return
    raise InputError(
        f"cannot read a .vqad stream from a {type(source).__name__}: pass a path, bytes (an array's .tobytes()), a binary "
        "file-like object or an iterable of bytes"
    )


def _describe(source) -> str:
    return str(source) if isinstance(source, (str, Path)) else "the .vqad stream"


def _decode(source, lod: int | None, max_bytes: int | None, block: int = READ_BLOCK, max_memory: int | None = None,
            dec: "StreamDecoder | None" = None):
    """Feed ``source`` until ``lod`` is complete (or the end); yields (decoder, newly complete LODs). ``dec``:
    the decoder to feed (a new one by default), so a caller can read what it completed before an error."""
    dec = StreamDecoder(max_memory=max_memory, stop_lod=lod) if dec is None else dec
    for data in _blocks(source, max_bytes, block):
        new = dec.feed(data)
        if dec.grid_cfg is not None and lod is not None and not dec.grid_cfg.base_level <= lod <= dec.grid_cfg.max_level:
            coarse = lod < dec.grid_cfg.base_level
            raise InputError(
                f"LOD {lod} is {'coarser' if coarse else 'finer'} than this file's {'coarsest' if coarse else 'finest'} "
                f"LOD {dec.grid_cfg.base_level if coarse else dec.grid_cfg.max_level}: "
                f"choose one of {dec.grid_cfg.base_level}..{dec.grid_cfg.max_level}"
            )
        if lod is not None:
            new = [lv for lv in new if lv <= lod]
        yield dec, new
        if dec.finished or (lod is not None and dec.prefix_sizes and max(dec.prefix_sizes) >= lod):
            return  # read no further than the LOD asked for


def load(source, device: str | torch.device = "cpu", lod: int | None = None, max_bytes: int | None = None,
         max_memory: int | None = None, whole: bool = False):
    """Decode a ``.vqad`` file (or any prefix of one) into a baked field.

    Args:
        source: path, bytes-like, binary stream or iterable of byte blocks.
        device: where the field lives.
        lod: stop at this level of detail (reading no further than it needs).
        max_bytes: use only the first N bytes of the source.
        max_memory: refuse a LOD whose decoding needs more bytes (default :func:`default_max_memory`).
        whole: the stream must hold every LOD (what re-encoding a file needs): a cut one is an error, not
            a warning.
    Returns:
        the field holding the largest complete LOD ``<= lod`` (its ``lods`` say which). Its outputs
        equal, bit for bit, those of the baked in-memory field that was written.
    Raises:
        TruncatedStreamError: the bytes end before the first LOD is complete (with ``whole``: before the last).
        CorruptStreamError: the bytes are damaged (the message names the chunk).
        StreamLimitError: a LOD up to ``lod`` needs more than ``max_memory`` to decode.
    """
    dec = StreamDecoder()
    for dec, _ in _decode(source, lod, max_bytes, max_memory=max_memory):
        pass
    if not dec.prefix_sizes:
        raise dec.truncation_error()
    if whole and max(dec.prefix_sizes) < dec.max_level:
        raise TruncatedStreamError(
            f"{_describe(source)} ended after {dec.bytes_received:,} bytes {dec.where()}: it holds LODs "
            f"{dec.base_level}..{max(dec.prefix_sizes)} of {dec.base_level}..{dec.max_level}; fetch the whole file, or "
            "export the model again from its checkpoint")
    _warn_if_cut(dec, source, lod, max_bytes)
    return dec.field(lod, device=device, copy_tables=False)  # the decoder ends here


def _warn_if_cut(dec: "StreamDecoder", source, lod: int | None, max_bytes: int | None) -> None:
    """Warn when a whole stream (no ``max_bytes``) ended before the LOD asked for (or its last) was complete,
    or when the first ``max_bytes`` bytes end before a ``lod`` asked for (a prefix without ``lod`` is a coarser
    LOD by design)."""
    wanted = dec.max_level if lod is None else min(lod, dec.max_level)
    have = max(dec.prefix_sizes)
    if max_bytes is None and have < wanted:
        warnings.warn(
            f"{_describe(source)} ended after {dec.bytes_received:,} bytes {dec.where()}: "
            f"using LOD {have} of {dec.base_level}..{dec.max_level}",
            stacklevel=_caller_level(),
        )
    elif max_bytes is not None and lod is not None and have < wanted:
        warnings.warn(f"the first {max_bytes:,} bytes of {_describe(source)} hold LODs up to {have}: using LOD {have}, "
                      f"not the LOD {lod} asked for (it needs more bytes)", ShortPrefixWarning, stacklevel=_caller_level())


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside the vqad package, for a warning raised in the function that
    calls this: the user's own line whether they called ``vqad.load`` or ``fileformat.load``."""
    import sys

    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def iter_lods(source, device: str | torch.device = "cpu", lod: int | None = None, max_bytes: int | None = None,
              block: int = READ_BLOCK, max_memory: int | None = None) -> Iterator[DecodedLOD]:
    """Yield each level of detail as soon as its bytes have arrived, coarsest first.

    ``source`` is read ``block`` bytes at a time, so a socket or an HTTP response is drawn from as
    it arrives:

    >>> with urllib.request.urlopen(url) as response:
    ...     for step in iter_lods(response):
    ...         print(step.lod, step.nbytes)        # LOD 3 after 6,912 bytes, ...
    """
    dec, yielded = StreamDecoder(max_memory=max_memory, stop_lod=lod), set()

    def step(lv: int) -> DecodedLOD:
        yielded.add(lv)
        return DecodedLOD(lv, dec.prefix_sizes[lv], dec.field(lv, device=device))

    try:
        for _, new in _decode(source, lod, max_bytes, block, max_memory, dec=dec):
            yield from map(step, new)
    except CorruptStreamError:
        # the block that held the damage may have completed LODs before it: they are whole, so they come first
        yield from map(step, sorted(lv for lv in dec.prefix_sizes if lv not in yielded and (lod is None or lv <= lod)))
        raise
    if not yielded:
        raise dec.truncation_error()
    _warn_if_cut(dec, source, lod, max_bytes)  # as load() does: a dropped connection is no end of file


def lod_prefix_sizes(source, max_memory: int | None = None) -> dict[int, int]:
    """``{lod: bytes}``: how many leading bytes of the stream each complete LOD needs."""
    dec = StreamDecoder()
    for dec, _ in _decode(source, None, None, max_memory=max_memory):
        pass
    if not dec.prefix_sizes:
        raise dec.truncation_error()
    return dict(dec.prefix_sizes)


# ================================================================================================
# inspection (vqad info)
# ================================================================================================
@dataclass
class LevelInfo:
    """Sizes of one level, in bytes (``formula`` = the storage's own bits / 8, e.g. (m·b + 16·k·2^b)/8)."""

    level: int
    cells: int
    vertices: int
    prefix_bytes: int  # stream bytes needed to decode this LOD
    grid_bytes: int  # GRID payloads of this level as stored
    grid_raw_bytes: int  # ... without entropy coding
    tree_bytes: int  # TREE payload as stored
    tree_raw_bytes: int  # ... without entropy coding (one byte per mask)
    formula_bytes: float
    dense_fp16_bytes: float  # 16·m·k / 8


@dataclass
class FileInfo:
    """What ``vqad info`` prints: the header, the chunk table and per-level sizes."""

    total_bytes: int
    config: dict
    chunks: list[ChunkRecord]
    levels: list[LevelInfo]
    header_bytes: int
    decoder_bytes: int  # DECO payload (directory + fp16 data)
    decoder_params: int
    complete: bool
    received_bytes: int | None = None  # the stream's length: more than total_bytes when it is cut inside a chunk
    cut: str = ""  # where an incomplete stream ends (StreamDecoder.where)
    damage: str = ""  # the damaged chunk that ended the account (the LODs before it are intact), if any

    @property
    def framing_bytes(self) -> int:
        return PREAMBLE_BYTES + FRAME_BYTES * len(self.chunks)

    @property
    def raw_total_bytes(self) -> int:
        """What the same file takes without entropy coding."""
        return self.total_bytes + sum(lv.grid_raw_bytes - lv.grid_bytes + lv.tree_raw_bytes - lv.tree_bytes for lv in self.levels)


def _model_length(dec: StreamDecoder, level: int, rec: ChunkRecord, payload: bytes, lay: TensorLayout) -> int | None:
    """Bytes of the probability model an entropy-coded uint chunk stores (None for a raw one); the chunk was
    decoded (so validated) before this is asked."""
    if rec.codec == Codec.RANGE:
        return E.model_bytes(payload, "range", 1 << lay.bits)
    if rec.codec == Codec.CONTEXT:
        src = dec._context_slot(level, rec.slot, lay.numel)
        up = dec._layout(level - 1, 1)[src]
        return E.model_bytes(payload, "context", 1 << lay.bits, 1 << up.bits)
    return None


def read_info(source, max_memory: int | None = None) -> FileInfo:
    """Decode a whole stream (validating every chunk) and account for its bytes. A damaged chunk after a complete
    LOD ends the account there, as a cut would (``damage`` says what is wrong); before one it raises."""
    dec = StreamDecoder(max_memory=max_memory)
    damage = ""
    try:
        for _ in _decode(source, None, None, max_memory=max_memory, dec=dec):
            pass
    except CorruptStreamError as exc:
        if not dec.prefix_sizes:
            raise
        damage = str(exc)
    if not dec.prefix_sizes:
        raise dec.truncation_error()
    field = dec.field()  # builds (and so validates) every complete level
    octree = field.grid.octree
    k = dec.grid_cfg.features
    levels = []
    chunks = []
    raw_of, extra = {}, {}
    for level in octree.levels:
        for (rec, payload), lay in zip(dec._levels[level].grid, dec._layout(level, octree.num_vertices(level))):
            raw_of[(level, rec.slot)] = _raw_size(lay)
            if lay.encoding == "uint":
                extra[(level, rec.slot)] = dict(symbols=lay.numel, bits=lay.bits,
                                                model_length=_model_length(dec, level, rec, payload, lay))
    for c in dec.chunks:
        raw = {ChunkType.TREE: c.raw_length, ChunkType.GRID: raw_of.get((c.level, c.slot))}.get(c.type, c.length)
        more = extra.get((c.level, c.slot), {}) if c.type == ChunkType.GRID else {}
        chunks.append(replace(c, raw_length=raw, **more))
    for level in octree.levels:
        m = octree.num_vertices(level)
        tree = next(c for c in dec.chunks if c.type == ChunkType.TREE and c.level == level)
        grid_recs = [rec for rec, _ in dec._levels[level].grid]
        layout = dec._layout(level, m)
        levels.append(LevelInfo(
            level=level, cells=octree.num_cells(level), vertices=m, prefix_bytes=dec.prefix_sizes[level],
            grid_bytes=sum(r.length for r in grid_recs), grid_raw_bytes=sum(_raw_size(lay) for lay in layout),
            tree_bytes=tree.length, tree_raw_bytes=tree.raw_length,
            formula_bytes=sum(lay.stored_bits() for lay in layout) / 8, dense_fp16_bytes=16 * m * k / 8,
        ))
    head = next(c for c in dec.chunks if c.type == ChunkType.HEAD)
    deco = next(c for c in dec.chunks if c.type == ChunkType.DECO)
    end = max(c.end for c in dec.chunks)
    return FileInfo(
        total_bytes=end, config=dec.cfg, chunks=chunks, levels=levels, header_bytes=head.length,
        decoder_bytes=deco.length, decoder_params=sum(int(np.prod(s)) for s in dec._decoder_shapes.values()),
        complete=dec.finished, received_bytes=dec.bytes_received, cut="" if dec.finished or damage else dec.where(),
        damage=damage,
    )


__all__ = [
    "MAGIC", "VERSION", "ChunkType", "Codec", "ChunkRecord", "DecodedLOD", "StreamDecoder", "FileInfo", "LevelInfo",
    "to_bytes", "save", "iter_chunks", "load", "iter_lods", "lod_prefix_sizes", "read_info", "StreamError",
    "StreamLimitError", "default_max_memory", "parse_bytes", "DECODE_BYTES_PER_CELL", "DECODE_BYTES_PER_VERTEX",
]
