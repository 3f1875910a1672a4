"""Lossless entropy coding of symbol streams (codebook indices V, octree child masks) for .vqad.

An order-0 model per chunk: the symbol frequencies of that chunk, quantized to integers that sum to
``2^FREQ_PRECISION``, are stored in front of the range-coded data, so the decoder needs nothing
else. Coding is done by the ``constriction`` package (a range coder with 32-bit words).

Payload layout (all little-endian)::

    frequency table   run-length varints covering the alphabet 0..A-1 (see _write_table)
    compressed data   uint32 words from constriction.stream.queue.RangeEncoder

The probability model handed to constriction on both sides is
``Categorical(freq / 2^FREQ_PRECISION, perfect=False)`` built from those same stored integers,
so encoder and decoder quantize identically. Where vqad's C kernels are built, decoding skips
constriction: :class:`vqad.kernels.RangeDecoder` decodes with the same 24-bit cumulative tables
(:func:`_cdf`), a whole level or chunk in one call instead of one Python call per context.

Decompression-bomb guard: a payload may decode at most ``MAX_SYMBOLS_PER_BYTE`` symbols per payload
byte (≥ 1/8 bit per symbol). The writer stores a chunk raw where that would not hold, so legitimate
files never hit the limit and a hostile one cannot make the reader allocate far more memory than it sent.
"""

from __future__ import annotations

import functools

import numpy as np

FREQ_PRECISION = 16  # the stored frequencies sum to 2^16
MAX_ALPHABET = 1 << 12  # codebook indices of up to 12 bits; octree masks use 256
MAX_SYMBOLS_PER_BYTE = 64


class EntropyError(ValueError):
    """An entropy-coded payload is malformed (the file reader turns this into CorruptStreamError)."""


def _constriction():
    try:
        import constriction
    except ImportError as exc:  # pragma: no cover - constriction is a declared dependency
        raise ImportError(
            "entropy-coded .vqad chunks need the 'constriction' package: pip install 'constriction>=0.4'"
        ) from exc
    return constriction


def _model(freqs: np.ndarray, precision: int = FREQ_PRECISION):
    c = _constriction()
    probs = freqs.astype(np.float64) / float(1 << precision)
    return c.stream.model.Categorical(probs, perfect=False)


#: the coder's fixed-point precision: constriction quantizes a Categorical model to a cumulative table
#: summing to 2^24 (its default coders' models)
CODER_PRECISION = 24


def _cdf(freqs: np.ndarray, precision: int | np.ndarray = FREQ_PRECISION) -> np.ndarray:
    """The cumulative tables ``(..., A + 1)`` int32 that ``Categorical(freqs / 2^precision, perfect=False)``
    codes with: ``cdf[i] = floor(F_i · (2^24 − A) / 2^precision) + i`` for the frequencies' partial sums
    ``F_i = Σ freqs[:i]``, and ``cdf[A] = 2^24`` (every symbol gets at least 1, constriction's "leaky"
    rule). constriction computes it in float64 from the probabilities ``freqs / 2^precision``; they are
    dyadic and sum to exactly 1 (the tables' frequencies sum to ``2^precision``), so its sums and
    products are exact and this integer form is the same table.

    Args:
        freqs: ``(..., A)`` non-negative integer frequencies, each row summing to ``2^precision``.
        precision: an int, or ``(...)`` one per row.
    """
    f = np.asarray(freqs, dtype=np.int64)
    A = f.shape[-1]
    shift = np.asarray(precision, dtype=np.int64)[..., None]
    partial = np.cumsum(f, axis=-1) - f  # F_i, exclusive
    cdf = np.empty(f.shape[:-1] + (A + 1,), dtype=np.int64)
    cdf[..., :A] = ((partial * ((1 << CODER_PRECISION) - A)) >> shift) + np.arange(A)
    cdf[..., A] = 1 << CODER_PRECISION
    return cdf.astype(np.int32)


def _fast_decoder(words: np.ndarray):
    """A :class:`vqad.kernels.RangeDecoder` over ``words (W,)`` uint32 where the kernels are built, else None
    (the callers then decode with constriction, group by group: the same symbols)."""
    import torch

    from vqad import kernels

    if not kernels.applies():
        return None
    return kernels.RangeDecoder(torch.from_numpy(np.ascontiguousarray(words, dtype=np.uint32).view(np.int32)))


def _binary_cut(q: np.ndarray) -> np.ndarray:
    """``cdf[1]`` of each binary model :func:`_binary_model` makes (P(1) = q / 2^16, q in [1, 2^16)):
    :func:`_cdf` of the frequencies ``(2^16 − q, q)``."""
    q = np.asarray(q, dtype=np.int64)
    return (((_P16 - q) * ((1 << CODER_PRECISION) - 2)) >> 16) + 1


# -- frequency table -------------------------------------------------------------------------------
def quantize_counts(counts: np.ndarray, precision: int = FREQ_PRECISION) -> np.ndarray:
    """Integer frequencies summing to exactly ``2^precision``, ≥ 1 wherever ``counts > 0``.

    Args:
        counts: ``(A,)`` non-negative symbol counts, not all zero, ``A <= MAX_ALPHABET``, at most
            ``2^precision`` of them non-zero.
    Returns:
        ``(A,)`` int64 frequencies (zero exactly where the count is zero).
    """
    counts = np.asarray(counts, dtype=np.int64)
    total = 1 << precision
    n = int(counts.sum())
    if n <= 0:
        raise ValueError("cannot build a frequency table from no symbols")
    if int((counts > 0).sum()) > total:
        raise ValueError(f"{int((counts > 0).sum())} distinct symbols do not fit frequencies summing to 2^{precision}")
    f = (counts * total) // n
    f[(counts > 0) & (f == 0)] = 1
    diff = total - int(f.sum())
    if diff > 0:  # give the rounding remainder to the most frequent symbol
        f[int(np.argmax(counts))] += diff
    while diff < 0:  # bumping rare symbols to 1 overshot: take it back from the largest, never below 1
        order = np.argsort(-f, kind="stable")
        # at most half of each frequency (at least 1), never below 1, nothing from absent symbols
        take = np.clip(np.minimum(f[order] - 1, np.maximum(1, f[order] // 2)), 0, None)
        cum = np.cumsum(take)
        k = int(np.searchsorted(cum, -diff))
        if k < len(take):
            take[k] -= int(cum[k] + diff)  # take exactly -diff in total
            take[k + 1:] = 0
        f[order] -= take
        diff = total - int(f.sum())
    return f


def _write_varint(out: bytearray, v: int) -> None:
    while True:
        byte = v & 0x7F
        v >>= 7
        if v:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    v = shift = 0
    while True:
        if pos >= len(buf):
            raise EntropyError("frequency table runs past the end of the chunk")
        byte = buf[pos]
        pos += 1
        v |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return v, pos
        shift += 7
        if shift > 28:
            raise EntropyError("frequency table holds an over-long varint")


def _write_table(freqs: np.ndarray) -> bytes:
    """Tokens: ``varint(f << 1)`` for a frequency ``f > 0``, ``varint((run - 1) << 1 | 1)`` for ``run`` zeros."""
    out = bytearray()
    i, a = 0, len(freqs)
    while i < a:
        if freqs[i] > 0:
            _write_varint(out, int(freqs[i]) << 1)
            i += 1
        else:
            j = i
            while j < a and freqs[j] == 0:
                j += 1
            _write_varint(out, ((j - i - 1) << 1) | 1)
            i = j
    return bytes(out)


def _read_table(buf: memoryview, alphabet: int, precision: int = FREQ_PRECISION) -> tuple[np.ndarray, int]:
    freqs = np.zeros(alphabet, dtype=np.int64)
    i = pos = 0
    while i < alphabet:
        tok, pos = _read_varint(buf, pos)
        if tok & 1:
            run = (tok >> 1) + 1
            if i + run > alphabet:
                raise EntropyError(f"frequency table covers more than the alphabet of {alphabet} symbols")
            i += run
        else:
            f = tok >> 1
            if f == 0:
                raise EntropyError("frequency table holds a zero frequency outside a zero run")
            freqs[i] = f
            i += 1
    if int(freqs.sum()) != 1 << precision:
        raise EntropyError(f"frequencies sum to {int(freqs.sum())}, expected 2^{precision}")
    return freqs, pos


# -- coding ----------------------------------------------------------------------------------------
def encode(symbols: np.ndarray, alphabet: int) -> bytes:
    """Range-code ``symbols`` with their own order-0 model stored in front.

    Args:
        symbols: ``(n,)`` integers in ``[0, alphabet)``, n ≥ 1.
        alphabet: A, the number of possible symbols (2^b for indices, 256 for child masks), ≤ 4096.
    Returns:
        the payload bytes (frequency table + compressed words).
    """
    if not 2 <= alphabet <= MAX_ALPHABET:
        raise ValueError(f"alphabet size must be in 2..{MAX_ALPHABET}, got {alphabet}")
    s = np.asarray(symbols).reshape(-1).astype(np.int64)
    if s.size == 0:
        raise ValueError("nothing to encode")
    if s.min() < 0 or s.max() >= alphabet:
        raise ValueError(f"symbols must lie in [0, {alphabet})")
    freqs = quantize_counts(np.bincount(s, minlength=alphabet))
    enc = _constriction().stream.queue.RangeEncoder()
    enc.encode(s.astype(np.int32), _model(freqs))
    words = np.asarray(enc.get_compressed(), dtype="<u4")
    return _write_table(freqs) + words.tobytes()


class Decoder:
    """Decodes a payload written by :func:`encode`, possibly in several calls.

    Several calls let the reader decode the octree levels above the base level one after the other
    from one payload: the number of masks of level ``L`` is only known once level ``L-1`` is decoded.
    """

    def __init__(self, payload, alphabet: int):
        if not 2 <= alphabet <= MAX_ALPHABET:
            raise EntropyError(f"alphabet size must be in 2..{MAX_ALPHABET}, got {alphabet}")
        buf = memoryview(payload)
        self.alphabet = alphabet
        self.budget = MAX_SYMBOLS_PER_BYTE * len(buf)
        self.freqs, pos = _read_table(buf, alphabet)
        rest = buf[pos:]
        if len(rest) % 4:
            raise EntropyError(f"compressed data is {len(rest)} bytes, not a whole number of 32-bit words")
        words = np.frombuffer(rest, dtype="<u4").astype(np.uint32)
        self._fast = _fast_decoder(words)
        if self._fast is not None:
            import torch

            self._cdf = torch.from_numpy(_cdf(self.freqs[None]))
        else:
            self._model = _model(self.freqs)
            self._dec = _constriction().stream.queue.RangeDecoder(words)

    def decode(self, n: int) -> np.ndarray:
        """The next ``n`` symbols, ``(n,)`` int64 in ``[0, alphabet)``."""
        if n < 0 or n > self.budget:
            raise EntropyError(
                f"payload would expand to more than {MAX_SYMBOLS_PER_BYTE} symbols per byte: refusing to decode"
            )
        self.budget -= n
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        try:
            if self._fast is not None:
                return self._fast.decode_symbols(self._cdf, [0], [n]).numpy()
            out = self._dec.decode(self._model, n)
        except Exception as exc:  # constriction reports bad data with its own exception types
            raise EntropyError(f"range decoder failed: {exc}") from exc
        return np.asarray(out, dtype=np.int64)


def decode(payload, n: int, alphabet: int) -> np.ndarray:
    """Inverse of :func:`encode`: ``n`` symbols, ``(n,)`` int64."""
    return Decoder(payload, alphabet).decode(n)


def allowed(n: int, payload_len: int) -> bool:
    """Whether a payload of ``payload_len`` bytes may carry ``n`` symbols (the bomb guard)."""
    return n <= MAX_SYMBOLS_PER_BYTE * payload_len


# -- octree child masks coded bit by bit with a geometric context ---------------------------------
# Each occupied cell P of level L-1 has 8 child bits (child c occupied at level L). The bit of child c
# is coded with a binary model chosen by a 7-bit context: which of the 7 other level-(L-1) cells that
# touch the corner of P where child c sits are occupied. Surfaces are continuous, so a child whose
# neighbours beyond P's face/edge/corner are occupied is much more likely to be occupied itself. The
# contexts depend only on level L-1, which the decoder already has, so a whole level decodes at once.
OCTREE_CONTEXTS = 128
_P16 = 1 << 16


DENSE_OCCUPANCY_MAX_RES = 128  # below this, neighbours are looked up in a dense bitmap (≤ 2 MB)


def _context_neighbours() -> np.ndarray:
    """``(8, 7)``: for child ``c`` and ``t = 1..7``, which of the 27 offsets ``(dx, dy, dz) ∈ {-1, 0, 1}^3``
    (numbered ``(dx + 1)·9 + (dy + 1)·3 + dz + 1``) bit ``t − 1`` of its context reads."""
    out = np.zeros((8, 7), dtype=np.int64)
    for c in range(8):
        d = (2 * ((c >> 2) & 1) - 1, 2 * ((c >> 1) & 1) - 1, 2 * (c & 1) - 1)
        for t in range(1, 8):
            o = (((t >> 2) & 1) * d[0], ((t >> 1) & 1) * d[1], (t & 1) * d[2])
            out[c, t - 1] = (o[0] + 1) * 9 + (o[1] + 1) * 3 + o[2] + 1
    return out


_CONTEXT_NEIGHBOURS = _context_neighbours()


def _contexts_and_sizes(parent_codes, parent_level: int, corners=None, vertices: int | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`octree_contexts` of a level, flat ``(8n,)`` uint8, and how many bits have each context
    ``(OCTREE_CONTEXTS,)`` int64 (counted in the same C pass where the kernels serve it; from the level's
    corner table ``corners (n, 8)`` over ``vertices`` vertices where the caller has it)."""
    import torch

    from vqad import kernels

    codes = torch.as_tensor(np.asarray(parent_codes), dtype=torch.long).reshape(-1)
    if kernels.applies(codes) and (corners is not None or parent_level <= 8):
        counts = torch.zeros(OCTREE_CONTEXTS, dtype=torch.long)
        if corners is not None:
            if corners.shape != (codes.numel(), 8) or vertices is None:
                raise ValueError(f"corners {tuple(corners.shape)} must be the (n, 8) table of the {codes.numel()} cells, "
                                 "with their vertex count")
            ctx = kernels.octree_contexts_from_corners(corners, vertices, counts)
        else:  # a bitmap of the level: codes in any order
            ctx = kernels.octree_contexts(codes, parent_level, counts)
        return ctx.numpy().reshape(-1), counts.numpy()
    ctx = octree_contexts(codes.numpy(), parent_level).reshape(-1)
    return ctx, np.bincount(ctx, minlength=OCTREE_CONTEXTS)


def octree_contexts(parent_codes, parent_level: int, dense_max_res: int = DENSE_OCCUPANCY_MAX_RES) -> np.ndarray:
    """Context of every child bit of a level: ``(n,) sorted Morton codes at parent_level -> (n, 8) uint8``.

    For child ``c`` with offset ``o_c = ((c>>2)&1, (c>>1)&1, c&1)``, let ``d = 2·o_c − 1`` (the corner's
    direction). Bit ``t−1`` of the context (``t = 1..7``) is set when the parent-level cell at
    ``P + ((t>>2)&1·d_x, (t>>1)&1·d_y, t&1·d_z)`` is occupied. Cells outside the cube are empty.
    Each of the 26 neighbours of every cell is looked up once (not once per child that reads it).
    ``dense_max_res`` only picks how neighbours are looked up (a dense bitmap or a sorted search); both
    give the same contexts.
    """
    import torch

    from vqad import kernels
    from vqad.octree import morton_decode

    codes = torch.as_tensor(np.asarray(parent_codes), dtype=torch.long).reshape(-1)
    n = codes.numel()
    if kernels.applies(codes) and parent_level <= 20 and (parent_level <= 8 or n < 2 or bool((codes[1:] > codes[:-1]).all())):
        return kernels.octree_contexts(codes, parent_level).numpy()  # one C pass (vqad.kernels), the same contexts
    res = 1 << parent_level
    ijk = morton_decode(codes, bits=max(parent_level, 1)).numpy()  # (n, 3)
    # padded lattice [-1, res]^3 so that every neighbour index is valid; outside cells stay empty
    r2 = res + 2
    lin = ((ijk[:, 0] + 1) * r2 + (ijk[:, 1] + 1)) * r2 + (ijk[:, 2] + 1)  # (n,)
    o = np.arange(-1, 2)
    steps = ((o[:, None, None] * r2 + o[None, :, None]) * r2 + o[None, None, :]).reshape(-1)  # (27,)
    if res <= dense_max_res:
        grid = np.zeros(r2 ** 3, dtype=np.uint8)
        grid[lin] = 1

        def occupied(step: int) -> np.ndarray:
            return np.take(grid, lin + step)
    else:
        keys = np.sort(lin)

        def occupied(step: int) -> np.ndarray:
            q = lin + step
            return (np.take(keys, np.searchsorted(keys, q).clip(max=n - 1)) == q).view(np.uint8)

    occ = [None if k == 13 else occupied(int(steps[k])) for k in range(27)]  # 13: the cell itself, never read
    ctx = np.empty((8, n), dtype=np.uint8)
    for c in range(8):
        acc = occ[_CONTEXT_NEIGHBOURS[c, 0]].copy()
        for t in range(2, 8):
            acc |= occ[_CONTEXT_NEIGHBOURS[c, t - 1]] << (t - 1)
        ctx[c] = acc
    return ctx.T.copy()


def _group_bounds(sizes: np.ndarray) -> list[int]:
    """Where each context's group lies in coding order (the coders send symbols grouped by context,
    context 0 first, positions in order within a group), from the groups' sizes ``(K,)``: ``K + 1``
    Python ints (constriction's decoding, one call per group, slices with them)."""
    return [0] + np.cumsum(sizes).tolist()


def _ungroup(contexts: np.ndarray, grouped: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """``(n,)`` values in position order from ``grouped (n,)`` in coding order (:func:`_group_bounds`): one C
    pass (:func:`vqad.kernels.ungroup`) where the kernels are built, else a stable sort and a scatter."""
    import torch

    from vqad import kernels

    if kernels.applies():
        return kernels.ungroup(torch.from_numpy(contexts), torch.from_numpy(grouped), torch.from_numpy(sizes)).numpy()
    out = np.empty_like(grouped)
    out[np.argsort(contexts, kind="stable")] = grouped
    return out


def _ungroup_bits(ctx: np.ndarray, grouped: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """The child masks ``(n,)`` uint8 from the bits ``grouped (8n,)`` in coding order (by context, stable)
    and their contexts ``ctx (8n,)`` uint8: one C pass (:func:`vqad.kernels.ungroup_bits`) where the
    kernels are built, else a stable sort, a scatter and ``packbits``."""
    import torch

    from vqad import kernels

    if kernels.applies():
        return kernels.ungroup_bits(torch.from_numpy(ctx), torch.from_numpy(grouped), torch.from_numpy(sizes)).numpy()
    order = np.argsort(ctx, kind="stable")  # uint8 keys: a radix sort
    bits = np.empty_like(grouped)
    bits[order] = grouped
    return np.packbits(bits.reshape(-1, 8), axis=1, bitorder="little").reshape(-1)


def _mask_bits(masks: np.ndarray) -> np.ndarray:
    """``(n,) uint8 -> (n, 8)`` child bits, bit c = child c."""
    return ((np.asarray(masks, dtype=np.int64)[:, None] >> np.arange(8)) & 1).astype(np.int64)


@functools.lru_cache(maxsize=4096)  # a model per probability, made once per process
def _binary_model(q: int):
    c = _constriction()
    return c.stream.model.Categorical(np.array([_P16 - q, q], dtype=np.float64) / _P16, perfect=False)


def encode_octree(levels: list[tuple[np.ndarray, int, np.ndarray]]) -> bytes:
    """Context-code the child masks of one or more consecutive levels.

    Args:
        levels: ``[(parent_codes (n,), parent_level, masks (n,) uint8), ...]`` coarsest first.
    Returns:
        payload: ``OCTREE_CONTEXTS`` little-endian uint16 probabilities ``q`` (P(bit = 1) = q / 2^16,
        0 for a context that never occurs), then the range-coded words. Within a level, bits are
        coded grouped by context (context 0 first), each group in (parent, child) order.
    """
    per_level = []
    ones = np.zeros(OCTREE_CONTEXTS, dtype=np.int64)
    total = np.zeros(OCTREE_CONTEXTS, dtype=np.int64)
    for codes, plevel, masks in levels:
        ctx = octree_contexts(codes, plevel).reshape(-1)
        bits = _mask_bits(masks).reshape(-1)
        per_level.append((ctx, bits))
        total += np.bincount(ctx, minlength=OCTREE_CONTEXTS)
        ones += np.bincount(ctx[bits == 1], minlength=OCTREE_CONTEXTS)
    q = np.where(total > 0, np.clip(np.rint(ones * _P16 / np.maximum(total, 1)), 1, _P16 - 1), 0).astype(np.int64)
    enc = _constriction().stream.queue.RangeEncoder()
    for ctx, bits in per_level:
        order = np.argsort(ctx, kind="stable")
        sc, sb = ctx[order], bits[order]
        bounds = np.searchsorted(sc, np.arange(OCTREE_CONTEXTS + 1))
        for j in range(OCTREE_CONTEXTS):
            a, b = bounds[j], bounds[j + 1]
            if b > a:
                enc.encode(sb[a:b].astype(np.int32), _binary_model(int(q[j])))
    words = np.asarray(enc.get_compressed(), dtype="<u4")
    return q.astype("<u2").tobytes() + words.tobytes()


class OctreeDecoder:
    """Decodes :func:`encode_octree` payloads level by level (see :meth:`decode_level`)."""

    def __init__(self, payload):
        buf = memoryview(payload)
        head = 2 * OCTREE_CONTEXTS
        if len(buf) < head:
            raise EntropyError(f"context-coded octree chunk is {len(buf)} bytes, shorter than its {head}-byte model")
        rest = buf[head:]
        if len(rest) % 4:
            raise EntropyError(f"compressed data is {len(rest)} bytes, not a whole number of 32-bit words")
        self.q = np.frombuffer(buf[:head], dtype="<u2").astype(np.int64)
        self.budget = MAX_SYMBOLS_PER_BYTE * len(buf)
        words = np.frombuffer(rest, dtype="<u4").astype(np.uint32)
        self._fast = _fast_decoder(words)
        if self._fast is None:
            self._dec = _constriction().stream.queue.RangeDecoder(words)
        else:  # cdf[1] of each context's model (a placeholder where q = 0: such a context must not occur)
            self._cut = _binary_cut(np.where(self.q > 0, self.q, _P16 // 2))

    def decode_level(self, parent_codes, parent_level: int, corners=None, vertices: int | None = None) -> np.ndarray:
        """The child masks ``(n,) uint8`` of the ``n`` occupied cells ``parent_codes`` of ``parent_level``.

        ``corners (n, 8)`` and ``vertices``: that level's corner table and vertex count
        (:func:`vqad.octree.corner_tables`), where the caller has them: the contexts then come from them
        (the same contexts, several times faster in the kernels)."""
        codes = np.asarray(parent_codes).reshape(-1)
        n = codes.size
        if n > self.budget:
            raise EntropyError(
                f"payload would expand to more than {MAX_SYMBOLS_PER_BYTE} masks per byte: refusing to decode"
            )
        self.budget -= n
        ctx, sizes = _contexts_and_sizes(codes, parent_level, corners, vertices)
        used = np.flatnonzero(sizes)
        unmodelled = used[self.q[used] == 0]
        if unmodelled.size:
            raise EntropyError(f"octree context {int(unmodelled[0])} occurs but its model says it never does")
        if self._fast is not None:
            try:
                sb = self._fast.decode_bits(self._cut, sizes).numpy()
            except ValueError as exc:
                raise EntropyError(f"range decoder failed: {exc}") from exc
            return _ungroup_bits(ctx, sb, sizes)
        bounds = _group_bounds(sizes)
        sb = np.empty(ctx.size, dtype=np.uint8)  # the bits grouped by context, as they were coded
        q = self.q.tolist()  # Python ints: ~300 calls a file, each cheaper
        for j in used.tolist():
            a, b = bounds[j], bounds[j + 1]
            try:
                sb[a:b] = self._dec.decode(_binary_model(q[j]), b - a)
            except Exception as exc:  # constriction's own exception types
                raise EntropyError(f"range decoder failed: {exc}") from exc
        return _ungroup_bits(ctx, sb, sizes)


# -- indices coded given a context (the co-located index of the coarser level) ---------------------
# Each symbol s_i (the index V_L[i] of a vertex of level L) comes with a context j_i in [0, K) that the
# decoder knows before it reads the chunk (the index V_{L-1} of the coarser vertex at floor(v / 2), see
# SparseOctree.coarser_vertices). The model is semi-static: a frequency table per context that pays for
# itself, one shared table for every other context. Symbols are coded grouped by context (context 0
# first), each group in vertex order, so a whole level decodes with one constriction call per context.
#: contexts × alphabet above which the writer does not context-code (the reader refuses it): bounds the
#: tables a hostile chunk can make the reader build (≤ 8 MB of frequencies) and the writer's count matrix
CONTEXT_MAX_CELLS = 1 << 20
MIN_TABLE_PRECISION = 4


def _varint_size(v: int) -> int:
    return max(1, (int(v).bit_length() + 6) // 7)


def _table_size(freqs: np.ndarray) -> int:
    return len(_write_table(freqs))


def _coded_bits(counts: np.ndarray, freqs: np.ndarray, precision: int) -> float:
    """Ideal bits of ``counts`` under the table ``freqs / 2^precision`` (inf if a present symbol has f = 0)."""
    nz = counts > 0
    if (freqs[nz] == 0).any():
        return float("inf")
    return float((counts[nz] * (precision - np.log2(freqs[nz]))).sum())


def _best_table(counts: np.ndarray) -> tuple[int, np.ndarray, float]:
    """The precision P and frequencies minimising table bytes + ideal coded bits of ``counts``; (P, f, total bits)."""
    distinct = int((counts > 0).sum())
    best = None
    for p in range(max(MIN_TABLE_PRECISION, (distinct - 1).bit_length()), FREQ_PRECISION + 1):
        f = quantize_counts(counts, p)
        bits = 8 * (1 + _table_size(f)) + _coded_bits(counts, f, p)
        if best is None or bits < best[2]:
            best = (p, f, bits)
    return best


class ContextModel:
    """The probability model of a context-coded chunk, shared by :func:`encode_context` and :func:`ContextDecoder`.

    ``tables[j] = (P, f)``: context j's own frequencies ``f (A,)`` summing to ``2^P``; ``shared`` the
    same for every context without its own table (None when there is none). Serialized as::

        varint G                                   number of own tables
        G × (varint id_delta, u8 P, table)         contexts in increasing order, id_delta = id − previous id − 1
                                                   (previous = −1 for the first); table as in _write_table
        u8 P_shared (0 = no shared table), table

    ``P(s | j) = f_s / 2^P`` is handed to constriction as ``Categorical(perfect=False)`` on both sides.
    """

    def __init__(self, alphabet: int, n_contexts: int, tables: dict[int, tuple[int, np.ndarray]],
                 shared: tuple[int, np.ndarray] | None):
        self.alphabet, self.n_contexts = alphabet, n_contexts
        self.tables, self.shared = tables, shared
        self._models: dict = {}

    @classmethod
    def fit(cls, symbols: np.ndarray, contexts: np.ndarray, alphabet: int, n_contexts: int) -> "ContextModel":
        """Pick own tables greedily: a context gets one when its table's bytes plus its ideal coded bits
        are fewer than its bits under the marginal of all symbols; the rest share the table of their union."""
        used = np.unique(contexts)
        rank = np.searchsorted(used, contexts)
        counts = np.bincount(rank * alphabet + symbols, minlength=used.size * alphabet).reshape(used.size, alphabet)
        marg = counts.sum(axis=0)
        p0, f0, _ = _best_table(marg)
        tables = {}
        for r, j in enumerate(used.tolist()):
            p, f, own = _best_table(counts[r])
            if own + 8 * _varint_size(j) < _coded_bits(counts[r], f0, p0):
                tables[j] = (p, f)
        rest = counts[[r for r, j in enumerate(used.tolist()) if j not in tables]].sum(axis=0)
        shared = None
        if rest.sum() > 0:
            p, f, _ = _best_table(rest)
            shared = (p, f)
        return cls(alphabet, n_contexts, tables, shared)

    def to_bytes(self) -> bytes:
        out = bytearray()
        _write_varint(out, len(self.tables))
        prev = -1
        for j in sorted(self.tables):
            p, f = self.tables[j]
            _write_varint(out, j - prev - 1)
            out.append(p)
            out += _write_table(f)
            prev = j
        if self.shared is None:
            out.append(0)
        else:
            out.append(self.shared[0])
            out += _write_table(self.shared[1])
        return bytes(out)

    @classmethod
    def from_bytes(cls, buf: memoryview, alphabet: int, n_contexts: int) -> tuple["ContextModel", int]:
        """Parse a model; returns it and the bytes it took. Raises :class:`EntropyError` on any malformation."""
        check_context_sizes(alphabet, n_contexts)

        def precision(pos: int) -> int:
            if pos >= len(buf):
                raise EntropyError("context model runs past the end of the chunk")
            p = buf[pos]
            if not MIN_TABLE_PRECISION <= p <= FREQ_PRECISION:
                raise EntropyError(f"context table precision {p} outside {MIN_TABLE_PRECISION}..{FREQ_PRECISION}")
            return p

        g, pos = _read_varint(buf, 0)
        if g > n_contexts:
            raise EntropyError(f"context model declares {g} tables for {n_contexts} contexts")
        tables, prev = {}, -1
        for _ in range(g):
            delta, pos = _read_varint(buf, pos)
            j = prev + 1 + delta
            if j >= n_contexts:
                raise EntropyError(f"context table for context {j}, outside 0..{n_contexts - 1}")
            p = precision(pos)
            f, used = _read_table(buf[pos + 1:], alphabet, p)
            tables[j] = (p, f)
            pos += 1 + used
            prev = j
        if pos >= len(buf):
            raise EntropyError("context model runs past the end of the chunk")
        shared = None
        if buf[pos] == 0:
            pos += 1
        else:
            p = precision(pos)
            f, used = _read_table(buf[pos + 1:], alphabet, p)
            shared = (p, f)
            pos += 1 + used
        return cls(alphabet, n_contexts, tables, shared), pos

    def model(self, j: int):
        """The constriction model of context ``j`` (its own table, else the shared one)."""
        if j not in self._models:
            p, f = self.tables.get(j) or self.shared or (None, None)
            if f is None:
                raise EntropyError(f"context {j} occurs but the chunk has no table for it")
            self._models[j] = _model(f, p)
        return self._models[j]

    def cdf_tables(self, used: np.ndarray):
        """The cumulative tables of the contexts ``used (u,)`` (:func:`_cdf`) for
        :meth:`vqad.kernels.RangeDecoder.decode_symbols`: ``cdf (T, A + 1)`` int32 (each own table of a used
        context, then the shared one) and ``table (K,)`` int64, each context's row (-1 where unused)."""
        import torch

        table = np.full(self.n_contexts, -1, dtype=np.int64)
        own = [j for j in used.tolist() if j in self.tables]
        rest = [j for j in used.tolist() if j not in self.tables]
        if rest and self.shared is None:
            raise EntropyError(f"context {rest[0]} occurs but the chunk has no table for it")
        rows = [self.tables[j] for j in own] + ([self.shared] if rest else [])
        table[own] = np.arange(len(own))
        table[rest] = len(own)
        freqs = np.stack([f for _, f in rows]) if rows else np.zeros((1, self.alphabet), dtype=np.int64)
        precisions = np.array([p for p, _ in rows] or [FREQ_PRECISION], dtype=np.int64)
        return torch.from_numpy(_cdf(freqs, precisions)), torch.from_numpy(table)

    def groups(self, contexts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Coding order: ``order (n,)`` sorting the symbols by context (stable), ``bounds (K + 1,)`` of each group."""
        c = contexts.astype(np.uint16)  # a 16-bit key: numpy's stable sort is then a radix sort
        order = np.argsort(c, kind="stable")
        bounds = np.searchsorted(c[order], np.arange(self.n_contexts + 1))
        return order, bounds


def check_context_sizes(alphabet: int, n_contexts: int) -> None:
    if not 2 <= alphabet <= MAX_ALPHABET or not 2 <= n_contexts <= MAX_ALPHABET:
        raise EntropyError(f"context coding needs alphabet and contexts in 2..{MAX_ALPHABET}, got {alphabet}, {n_contexts}")
    if alphabet * n_contexts > CONTEXT_MAX_CELLS:
        raise EntropyError(f"{n_contexts} contexts × {alphabet} symbols exceed the context coder's {CONTEXT_MAX_CELLS} cells")


def context_codable(alphabet: int, n_contexts: int) -> bool:
    """Whether :func:`encode_context` takes these sizes."""
    try:
        check_context_sizes(alphabet, n_contexts)
    except EntropyError:
        return False
    return True


def _check_contexts(contexts, n_contexts: int) -> np.ndarray:
    c = np.asarray(contexts).reshape(-1).astype(np.int64, copy=False)
    if c.size and (c.min() < 0 or c.max() >= n_contexts):
        raise EntropyError(f"contexts must lie in [0, {n_contexts})")
    return c


def encode_context(symbols: np.ndarray, contexts: np.ndarray, alphabet: int, n_contexts: int) -> bytes:
    """Range-code ``symbols`` given ``contexts``, with the :class:`ContextModel` stored in front.

    Args:
        symbols: ``(n,)`` integers in ``[0, alphabet)``, n ≥ 1 (V_L).
        contexts: ``(n,)`` integers in ``[0, n_contexts)`` the decoder knows (V_{L-1} at the coarser vertex).
        alphabet, n_contexts: A = 2^b_L and K = 2^b_{L-1}, with ``A · K ≤ CONTEXT_MAX_CELLS``.
    Returns:
        the payload: model bytes, then the range coder's uint32 words.
    """
    check_context_sizes(alphabet, n_contexts)
    s = np.asarray(symbols).reshape(-1).astype(np.int64)
    c = _check_contexts(contexts, n_contexts)
    if s.size == 0 or s.size != c.size:
        raise ValueError(f"need as many contexts as symbols (≥ 1), got {s.size} symbols, {c.size} contexts")
    if s.min() < 0 or s.max() >= alphabet:
        raise ValueError(f"symbols must lie in [0, {alphabet})")
    cm = ContextModel.fit(s, c, alphabet, n_contexts)
    order, bounds = cm.groups(c)
    ss = s[order].astype(np.int32)
    enc = _constriction().stream.queue.RangeEncoder()
    for j in np.flatnonzero(np.diff(bounds)).tolist():
        enc.encode(ss[bounds[j]:bounds[j + 1]], cm.model(j))
    return cm.to_bytes() + np.asarray(enc.get_compressed(), dtype="<u4").tobytes()


def decode_context(payload, contexts: np.ndarray, alphabet: int, n_contexts: int) -> np.ndarray:
    """Inverse of :func:`encode_context`: ``(n,)`` int64 symbols for the ``(n,)`` contexts."""
    buf = memoryview(payload)
    c = _check_contexts(contexts, n_contexts)
    if not allowed(c.size, len(buf)):
        raise EntropyError(f"payload would expand to more than {MAX_SYMBOLS_PER_BYTE} symbols per byte: refusing to decode")
    cm, pos = ContextModel.from_bytes(buf, alphabet, n_contexts)
    rest = buf[pos:]
    if len(rest) % 4:
        raise EntropyError(f"compressed data is {len(rest)} bytes, not a whole number of 32-bit words")
    words = np.frombuffer(rest, dtype="<u4").astype(np.uint32)
    sizes = np.bincount(c, minlength=n_contexts)  # each context's group
    fast = _fast_decoder(words)
    if fast is not None:
        cdf, table = cm.cdf_tables(np.flatnonzero(sizes))
        try:
            ss = fast.decode_symbols(cdf, table, sizes).numpy()
        except ValueError as exc:
            raise EntropyError(f"range decoder failed: {exc}") from exc
        return _ungroup(c, ss, sizes)
    dec = _constriction().stream.queue.RangeDecoder(words)
    bounds = _group_bounds(sizes)
    ss = np.empty(c.size, dtype=np.int64)  # the symbols grouped by context, as they were coded
    for j in np.flatnonzero(sizes).tolist():
        try:
            ss[bounds[j]:bounds[j + 1]] = dec.decode(cm.model(j), bounds[j + 1] - bounds[j])
        except EntropyError:
            raise
        except Exception as exc:  # constriction's own exception types
            raise EntropyError(f"range decoder failed: {exc}") from exc
    return _ungroup(c, ss, sizes)


def model_bytes(payload, codec: str, alphabet: int, n_contexts: int = 0) -> int:
    """Bytes of a payload's stored probability model: the order-0 frequency table (``codec="range"``) or the
    :class:`ContextModel` (``codec="context"``); the rest of the payload is the coded symbols."""
    buf = memoryview(payload)
    if codec == "range":
        return _read_table(buf, alphabet)[1]
    return ContextModel.from_bytes(buf, alphabet, n_contexts)[1]
