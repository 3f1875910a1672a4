"""Sparse multi-resolution octree over the cube [-1, 1]^3, in plain PyTorch (CPU and CUDA).

Level ``L`` splits the cube into ``2^L`` cells per axis. A :class:`SparseOctree` keeps, for every
level ``L_base..L_max``:

* ``codes[L]``: the sorted Morton codes of the occupied cells, shape ``(n_L,)``. Sorted Morton order
  is the breadth-first order of the tree (children grouped under their parent, by child index), which
  the .vqad file relies on to derive every order instead of storing it;
* ``corners[L]``: each cell's 8 corner vertices as vertex ids ``0..m_L-1``, shape ``(n_L, 8)``;
* ``vertices[L]``: the integer lattice coordinates of those vertices in ``[0, 2^L]^3``, shape
  ``(m_L, 3)``, sorted by their Morton code (``m_L`` is the paper's m for that level).

Corner ``c`` of a cell sits at offset ``((c >> 2) & 1, (c >> 1) & 1, c & 1)`` along (x, y, z).
Points are looked up with ``searchsorted``; a point in an empty cell (or outside the cube) gets
cell index ``-1``.

The octree is an :class:`~torch.nn.Module` whose tables are non-persistent buffers: the module that
owns it (the grid, and so the field) moves it with its own ``.to(device)``, and none of it enters a
``state_dict`` (checkpoints and .vqad files store the finest level's codes their own way).
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vqad import kernels
from vqad.errors import InputError

MAX_SUPPORTED_LEVEL = 16  # Morton codes of level-16 vertices need 3*17 = 51 bits: fits int64
#: levels up to this one look cells up in a dense int32 table of all 8^L cells (8 MB at level 7,
#: 64 MB at level 8) instead of binary-searching Morton codes: one gather instead of ~log2(n) passes
DENSE_TABLE_MAX_LEVEL = 8
#: build the octree's tables with NumPy when they live on the CPU (measured faster there, see
#: :func:`_corner_tables_dense`); torch otherwise. Tests switch it off to check the torch path on the CPU.
NUMPY_ON_CPU = True
#: :meth:`SparseOctree.empty_levels` of a cell that is occupied at the asked level
OCCUPIED_LEVEL = 127

#: bit-spreading masks of 21-bit coordinates (x -> every third bit), the standard "magic numbers"
_SPREAD = ((32, 0x1F00000000FFFF), (16, 0x1F0000FF0000FF), (8, 0x100F00F00F00F00F),
           (4, 0x10C30C30C30C30C3), (2, 0x1249249249249249))


def _spread3(v: torch.Tensor) -> torch.Tensor:
    """Bit j of ``v`` (int64, < 2^21) moved to bit 3j: five shift-or-mask rounds, not 21 loops."""
    v = v & 0x1FFFFF
    for shift, mask in _SPREAD:
        v = (v | (v << shift)) & mask
    return v


def _compact3(v: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_spread3`: bit 3j of ``v`` to bit j."""
    v = v & 0x1249249249249249
    masks = [0x1FFFFF] + [mask for _, mask in _SPREAD]  # each round keeps the previous spread mask
    for i in range(len(_SPREAD) - 1, -1, -1):
        v = (v ^ (v >> _SPREAD[i][0])) & masks[i]
    return v


def morton_encode(ijk: torch.Tensor, bits: int = 21) -> torch.Tensor:
    """Interleave the bits of integer coordinates: ``(..., 3) int -> (...,) int64``.

    Bit ``j`` of x lands at ``3j + 2``, of y at ``3j + 1``, of z at ``3j``; only the low ``bits``
    (at most 21) bits of each coordinate are used.

    >>> morton_encode(torch.tensor([[1, 0, 0], [0, 0, 1], [1, 1, 1]]))
    tensor([4, 1, 7])
    """
    if not 0 <= bits <= 21:
        raise ValueError(f"morton_encode takes 0..21 bits per axis, got {bits}")
    ijk = ijk.long() & ((1 << bits) - 1)
    return (_spread3(ijk[..., 0]) << 2) | (_spread3(ijk[..., 1]) << 1) | _spread3(ijk[..., 2])


def morton_decode(code: torch.Tensor, bits: int = 21) -> torch.Tensor:
    """Inverse of :func:`morton_encode`: ``(...,) int64 -> (..., 3) int64`` (the low ``bits`` bits per axis)."""
    if not 0 <= bits <= 21:
        raise ValueError(f"morton_decode takes 0..21 bits per axis, got {bits}")
    code = code.long()
    mask = (1 << bits) - 1
    return torch.stack([_compact3(code >> 2) & mask, _compact3(code >> 1) & mask, _compact3(code) & mask], -1)


def cell_coords(x: torch.Tensor, level: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer cell coordinates of points at ``level`` and whether each point is inside the cube.

    Args:
        x: ``(N, 3)`` points in [-1, 1]^3.
    Returns:
        ``ijk`` ``(N, 3)`` int64 clamped to ``[0, 2^L - 1]``, and ``inside`` ``(N,)`` bool.
    """
    res = 1 << level
    inside = ((x >= -1.0) & (x <= 1.0)).all(dim=-1)
    ijk = torch.floor((x + 1.0) * (0.5 * res)).long().clamp_(0, res - 1)
    return ijk, inside


def trilinear_weights(x: torch.Tensor, ijk: torch.Tensor, level: int) -> torch.Tensor:
    """Trilinear weights of the 8 corners of cell ``ijk`` at point ``x``: ``(N, 3), (N, 3) -> (N, 8)``.

    ``w_c = prod_a (t_a if offset_c[a] else 1 - t_a)`` with ``t = local coordinate in [0, 1]^3``.
    The weights sum to one and reproduce any function linear in x exactly.
    """
    res = 1 << level
    t = (x + 1.0) * (0.5 * res) - ijk.to(x.dtype)  # (N, 3) in [0, 1]
    w = torch.stack([1.0 - t, t], dim=1)  # (N, 2, 3): weight of offset 0 / 1 along each axis
    # corner c = (ox << 2) | (oy << 1) | oz: an outer product over x, y, z in that order
    return (w[:, :, None, None, 0] * w[:, None, :, None, 1] * w[:, None, None, :, 2]).reshape(-1, 8)


def _flat_index(ijk: torch.Tensor, level: int) -> torch.Tensor:
    """``(N, 3)`` cell coordinates of ``level`` -> ``(N,)`` x-major index into a dense table of its ``8^L`` cells."""
    res = 1 << level
    return (ijk[:, 0] * res + ijk[:, 1]) * res + ijk[:, 2]


def _corner_offsets(device: torch.device | str) -> torch.Tensor:
    """``(8, 3)`` int64: row c is ``((c >> 2) & 1, (c >> 1) & 1, c & 1)``, made on ``device`` (no host copy)."""
    c = torch.arange(8, device=device)
    return (c[:, None] >> torch.arange(2, -1, -1, device=device)) & 1


@dataclass
class LevelQuery:
    """Where a batch of ``N`` points falls at one level (:meth:`SparseOctree.interpolation`).

    Attributes:
        valid: ``(N,)`` bool: the point lies inside the cube in an occupied cell.
        rows: the points that ``vertex_ids`` and ``weights`` describe: ``(N_valid,)`` int64 indices
            into the batch for a compact query; ``None`` for a padded one, which covers all N points.
        vertex_ids: ``(N_valid, 8)`` (padded: ``(N, 8)``) vertex ids of the cell corners.
        weights: ``(N_valid, 8)`` (padded: ``(N, 8)``) trilinear weights; a padded query gives an
            invalid point weight 0 (on the corners of some occupied cell).
    """

    valid: torch.Tensor
    rows: torch.Tensor | None
    vertex_ids: torch.Tensor
    weights: torch.Tensor


class _LevelTable(Mapping):
    """Read-only ``{level: tensor}`` view of an octree's per-level buffers ``<name>_<level>``.

    A view rather than a dict so that it always shows the buffers the module holds now (``.to()``
    replaces them).
    """

    def __init__(self, octree: "SparseOctree", name: str):
        self._octree, self._name = octree, name

    def __getitem__(self, level: int) -> torch.Tensor:
        try:
            level = operator.index(level)  # ints of any kind, as a dict keyed by int would take
        except TypeError:
            raise KeyError(level) from None
        if not self._octree.base_level <= level <= self._octree.max_level:
            raise KeyError(level)
        return self._octree._buffers[f"{self._name}_{level}"]

    def __iter__(self) -> Iterator[int]:
        return iter(self._octree.levels)

    def __contains__(self, level) -> bool:  # without reading (for vertices: decoding) the table
        try:
            return self._octree.base_level <= operator.index(level) <= self._octree.max_level
        except TypeError:
            return False

    def __len__(self) -> int:
        return self._octree.max_level - self._octree.base_level + 1


class _VertexTable(_LevelTable):
    """``{level: (m_L, 3) int64}`` vertex coordinates, decoded from the level's vertex keys on first use and
    kept as a non-persistent buffer ``vertices_<level>`` (only some storages and the index sweeps need them:
    a decoded file does not pay for them up front)."""

    def __init__(self, octree: "SparseOctree"):
        super().__init__(octree, "keys")

    def __getitem__(self, level: int) -> torch.Tensor:
        keys = super().__getitem__(level)  # validates level
        level = operator.index(level)
        name = f"vertices_{level}"
        table = self._octree._buffers.get(name)
        if table is None or table.device != keys.device:
            table = _vertices_of_keys(keys, level)
            self._octree.register_buffer(name, table, persistent=False)
        return table


def dilate_codes(codes: torch.Tensor, level: int, dilate: int) -> torch.Tensor:
    """The cells within ``dilate`` cells (L∞) of the cells ``codes`` (sorted unique Morton codes at ``level``),
    clipped to the grid: a cube's dilation is separable, so one axis at a time, ``2·dilate + 1`` shifted
    copies each (not ``(2·dilate + 1)³`` at once). Returns sorted unique codes."""
    res = 1 << level
    r = torch.arange(-dilate, dilate + 1, device=codes.device)
    for axis in range(3):
        ijk = morton_decode(codes, bits=level)
        shifted = ijk[None].repeat(r.numel(), 1, 1)  # (2d+1, n, 3)
        shifted[..., axis] += r[:, None]
        codes = torch.unique(morton_encode(shifted.reshape(-1, 3).clamp_(0, res - 1), bits=level))
    return codes


class SparseOctree(nn.Module):
    """Occupied cells and their corner vertices for levels ``base_level..max_level``.

    Build one with :meth:`from_points` (training) or :meth:`from_codes` (loading); it is never
    half-built. ``codes``, ``corners`` and ``vertices`` map each level to a non-persistent buffer, so
    ``.to(device)`` (its own or its owner's) moves every table and ``device`` follows.
    """

    def __init__(self, finest_codes: torch.Tensor, base_level: int, max_level: int,
                 tables: Mapping[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None):
        """``tables``: optionally, ``{level: (codes, corners, vertex_keys)}`` for every level
        ``base_level..max_level``, each level's sorted cell codes and the tables :func:`corner_tables`
        built from them, ``tables[max_level][0]`` being ``finest_codes`` (the file reader decodes every
        level's codes and builds its tables while the stream arrives, so that a field costs no second
        pass); taken as given, not copied or re-derived."""
        super().__init__()
        check_levels(base_level, max_level)
        self.base_level = int(base_level)
        self.max_level = int(max_level)
        if tables is not None and set(tables) != set(self.levels):
            raise ValueError(f"tables cover levels {sorted(tables)}, the octree has {self.levels}")
        if tables is not None and tables[self.max_level][0] is not finest_codes:
            raise ValueError("tables[max_level] must hold finest_codes itself as its codes")
        codes = _sorted_unique(finest_codes.long()) if tables is None else finest_codes
        if codes.numel() == 0:
            raise InputError("the octree is empty: no sample fell inside the cube [-1, 1]^3")
        for level in range(self.max_level, self.base_level - 1, -1):
            if tables is None:
                corners, keys = corner_tables(codes, level)
            else:
                codes, corners, keys = tables[level]
            if codes.dim() != 1 or codes.dtype != torch.long or corners.shape != (codes.numel(), 8) or keys.dim() != 1:
                raise ValueError(f"level {level}: {tuple(corners.shape)} corner rows for {tuple(codes.shape)} cells, "
                                 f"vertex keys of shape {tuple(keys.shape)}")
            self.register_buffer(f"codes_{level}", codes, persistent=False)
            self.register_buffer(f"corners_{level}", corners, persistent=False)
            self.register_buffer(f"keys_{level}", keys, persistent=False)
            if tables is None:
                codes = torch.unique_consecutive(codes >> 3)  # sorted children: parents come sorted, grouped

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_tables(cls, tables: Mapping[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], base_level: int,
                    max_level: int) -> "SparseOctree":
        """Octree of ``{level: (codes, corners, vertex_keys)}`` already decoded for every level (the file
        reader's), taken as given: see ``tables`` in :meth:`__init__`."""
        if max_level not in tables:
            raise ValueError(f"tables cover levels {sorted(tables)}, the octree has {base_level}..{max_level}")
        return cls(tables[max_level][0], base_level, max_level, tables=tables)

    @classmethod
    def from_points(
        cls, points: torch.Tensor, base_level: int, max_level: int, dilate: int = 1
    ) -> "SparseOctree":
        """Octree whose finest level holds every cell containing a point, dilated by ``dilate`` cells.

        Args:
            points: ``(N, 3)`` points in [-1, 1]^3 (points outside are ignored).
        """
        check_levels(base_level, max_level)
        ijk, inside = cell_coords(points, max_level)
        codes = torch.unique(morton_encode(ijk[inside], bits=max_level))
        if codes.numel() == 0:
            raise InputError("the octree is empty: no sample fell inside the cube [-1, 1]^3")
        if dilate > 0:
            codes = dilate_codes(codes, max_level, dilate)
        return cls(codes, base_level, max_level)

    @classmethod
    def from_codes(cls, finest_codes: torch.Tensor, base_level: int, max_level: int) -> "SparseOctree":
        """Octree from the Morton codes of its finest level's occupied cells."""
        return cls(finest_codes, base_level, max_level)

    @classmethod
    def dense(cls, base_level: int, max_level: int, device: torch.device | str = "cpu") -> "SparseOctree":
        """Every cell of ``max_level`` occupied (a full grid); useful for tests and coarse passes."""
        res = 1 << max_level
        r = torch.arange(res, device=device)
        ijk = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
        return cls(morton_encode(ijk), base_level, max_level)

    # -- properties ---------------------------------------------------------------------------
    @property
    def levels(self) -> list[int]:
        return list(range(self.base_level, self.max_level + 1))

    @property
    def codes(self) -> Mapping[int, torch.Tensor]:
        """``{level: (n_L,) int64}`` sorted Morton codes of the occupied cells."""
        return _LevelTable(self, "codes")

    @property
    def corners(self) -> Mapping[int, torch.Tensor]:
        """``{level: (n_L, 8) int64}`` each cell's corner vertex ids."""
        return _LevelTable(self, "corners")

    @property
    def vertices(self) -> Mapping[int, torch.Tensor]:
        """``{level: (m_L, 3) int64}`` integer lattice coordinates of the vertices, in id order (decoded
        from :attr:`vertex_keys` on first use)."""
        return _VertexTable(self)

    @property
    def vertex_keys(self) -> Mapping[int, torch.Tensor]:
        """``{level: (m_L,) int64}`` the vertices' ``(L + 1)``-bit Morton codes, strictly increasing (id order)."""
        return _LevelTable(self, "keys")

    @property
    def device(self) -> torch.device:
        return self._buffers[f"codes_{self.max_level}"].device

    def extra_repr(self) -> str:
        return f"levels={self.base_level}:{self.max_level}, finest_cells={self.num_cells(self.max_level)}"

    def num_cells(self, level: int) -> int:
        return int(self.codes[level].numel())

    def num_vertices(self, level: int) -> int:
        """m for this level."""
        return int(self.vertex_keys[level].shape[0])

    def vertex_positions(self, level: int) -> torch.Tensor:
        """``(m_L, 3)`` vertex positions in [-1, 1]^3."""
        return self.vertices[level].float() * (2.0 / (1 << level)) - 1.0

    def coarser_vertices(self, level: int) -> torch.Tensor:
        """For each vertex ``v`` of ``level``, the id of the vertex of ``level - 1`` at ``floor(v / 2)``: ``(m_L,)`` int64.

        ``floor(v / 2)`` is the coarser vertex at the same place when every coordinate of ``v`` is even,
        else the coarser vertex at the low corner of the segment / face / cell of level ``L - 1`` that
        holds ``v``. It always exists: ``v`` is a corner of a cell ``c`` of level ``L``, and ``floor(v / 2)``
        is a corner of ``c``'s parent ``floor(c / 2)``, which is occupied. In Morton terms it is the
        vertex key with its low three bits dropped. ``level`` must be above ``base_level``.
        """
        if not self.base_level < level <= self.max_level:
            raise ValueError(f"level {level} has no coarser level in this octree ({self.base_level}..{self.max_level})")
        missing = f"a vertex of level {level} has no vertex of level {level - 1} at floor(v / 2)"  # impossible here
        if kernels.applies(self.vertex_keys[level]):  # one merge of the two sorted key lists
            try:
                return kernels.coarser_vertices(self.vertex_keys[level], self.vertex_keys[level - 1])
            except ValueError:
                raise ValueError(missing) from None
        fine = self.vertex_keys[level] >> 3  # (m_L,) keys of floor(v / 2), non-decreasing
        coarse = self.vertex_keys[level - 1]  # (m_{L-1},) strictly increasing: vertex ids are in Morton order
        n = coarse.numel()
        if level <= DENSE_TABLE_MAX_LEVEL and 8 ** level <= LATTICE_POINTS_PER_CORNER * fine.numel():
            # keys of level L - 1 are below 8^L: a table of them, one gather instead of a search
            table = torch.empty(8 ** level, dtype=torch.int32, device=coarse.device)  # only `coarse` rows are read
            table.index_put_((coarse,), torch.arange(n, dtype=torch.int32, device=coarse.device))
            idx = table.index_select(0, fine).long().clamp_(0, n - 1)
        else:
            idx = torch.searchsorted(coarse, fine).clamp_(max=n - 1)
        if not bool((coarse.index_select(0, idx) == fine).all()):
            raise ValueError(missing)
        return idx

    # -- queries ------------------------------------------------------------------------------
    def query(self, x: torch.Tensor, level: int) -> torch.Tensor:
        """Occupied-cell index of each point at ``level``: ``(N, 3) -> (N,)`` int64, -1 if empty."""
        ijk, inside = cell_coords(x, level)
        idx, found = self._lookup(ijk, inside, level)
        return torch.where(found, idx, -1)

    def _lookup(self, ijk: torch.Tensor, inside: torch.Tensor, level: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N,)`` index of a cell (always in range) and whether it is the point's occupied cell.

        Levels with at most :data:`DENSE_TABLE_MAX_LEVEL` read a dense table of all ``8^L`` cells
        (one gather); finer ones binary-search the sorted Morton codes.
        """
        if level <= DENSE_TABLE_MAX_LEVEL:
            idx = self._cell_table(level).index_select(0, _flat_index(ijk, level)).long()  # (N,), -1: empty
            found = (idx >= 0) & inside
            return idx.clamp_(min=0), found
        codes = self.codes[level]
        q = morton_encode(ijk, bits=level)  # ijk < 2^level: the higher bits are all zero
        idx = torch.searchsorted(codes, q).clamp_(max=codes.numel() - 1)
        return idx, (codes[idx] == q) & inside

    def empty_levels(self, level: int) -> torch.Tensor:
        """``(8^L,)`` int8 over every cell of ``level`` (x-major, as :meth:`_cell_table`): the coarsest
        level ``base..level`` whose cell holding it is empty, or ``OCCUPIED_LEVEL`` where the cell
        of ``level`` is occupied. What an empty-space-skipping ray march reads with one lookup: how
        large a cell it may jump out of. Only for ``level <= DENSE_TABLE_MAX_LEVEL``; cached."""
        if level > DENSE_TABLE_MAX_LEVEL:
            raise ValueError(f"empty_levels needs a level <= {DENSE_TABLE_MAX_LEVEL}, got {level}")
        cache = self.__dict__.setdefault("_empty_levels", {})
        device = self.codes[level].device
        table = cache.get(level)
        if table is None or table.device != device:
            table = torch.full((1 << level,) * 3, OCCUPIED_LEVEL, dtype=torch.int8, device=device)
            for lv in range(level, self.base_level - 1, -1):  # finer first, so coarser empty cells win
                sub, s = 1 << lv, 1 << (level - lv)  # each cell of lv covers s^3 cells of level
                empty = (self._cell_table(lv) < 0).view(sub, 1, sub, 1, sub, 1)
                table.view(sub, s, sub, s, sub, s).masked_fill_(empty, lv)
            table = table.reshape(-1)
            cache[level] = table
        return table

    def empty_level_at(self, x: torch.Tensor, level: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For points ``x (N, 3)``: whether each lies in an occupied cell of ``level``, whether it lies
        inside the cube, and the coarsest level ``base..level`` whose cell holding it is empty
        (``level`` where that cell is occupied): three ``(N,)`` tensors, the last int64. One lookup in
        :meth:`empty_levels` up to :data:`DENSE_TABLE_MAX_LEVEL`, a query per level above."""
        ijk, inside = cell_coords(x, level)
        if level <= DENSE_TABLE_MAX_LEVEL:
            skip = self.empty_levels(level).index_select(0, _flat_index(ijk, level)).long()
            occupied = (skip == OCCUPIED_LEVEL) & inside
            return occupied, inside, skip.clamp_(max=level)
        occupied = self._lookup(ijk, inside, level)[1]
        skip = torch.full(x.shape[:1], level, dtype=torch.long, device=x.device)
        for lv in range(level - 1, self.base_level - 1, -1):  # coarser empty cells win
            skip = torch.where(self.contains(x, lv), skip, lv)
        return occupied, inside, skip

    def _cell_table(self, level: int) -> torch.Tensor:
        """``(8^L,)`` int32: the occupied-cell index of every cell of ``level`` in x-major order, -1 if
        empty. Built on first use on the octree's current device (and rebuilt after a move)."""
        cache = self.__dict__.setdefault("_tables", {})
        codes = self.codes[level]
        table = cache.get(level)
        if table is None or table.device != codes.device:
            table = torch.full((8 ** level,), -1, dtype=torch.int32, device=codes.device)
            table[_flat_index(morton_decode(codes, bits=level), level)] = torch.arange(
                codes.numel(), dtype=torch.int32, device=codes.device)
            cache[level] = table
        return table

    def interpolation(self, x: torch.Tensor, level: int) -> LevelQuery:
        """Corner vertex ids and trilinear weights at ``level`` of the points in occupied cells.

        Compact: ``vertex_ids`` and ``weights`` are ``(N_valid, 8)``, for the points ``rows``. Finding
        ``N_valid`` costs one host synchronisation; :meth:`padded_interpolation` costs none.
        """
        if (level <= DENSE_TABLE_MAX_LEVEL and x.dtype == torch.float32 and not (x.requires_grad and torch.is_grad_enabled())
                and kernels.applies(x, self.codes[level])):  # one fused pass on the CPU (vqad.kernels), the same values
            valid, rows, vid, w = kernels.level_query(x, level, self._cell_table(level), self.corners[level])
            return LevelQuery(valid=valid, rows=rows, vertex_ids=vid, weights=w)
        ijk, inside = cell_coords(x, level)
        idx, valid = self._lookup(ijk, inside, level)
        rows = valid.nonzero().squeeze(1)
        vid = self.corners[level].index_select(0, idx.index_select(0, rows))
        w = trilinear_weights(x.index_select(0, rows), ijk.index_select(0, rows), level)
        return LevelQuery(valid=valid, rows=rows, vertex_ids=vid, weights=w)

    def padded_interpolation(self, x: torch.Tensor, level: int) -> LevelQuery:
        """Like :meth:`interpolation`, but for all N points, so with shapes known without a sync.

        ``vertex_ids`` and ``weights`` are ``(N, 8)``; a point outside the occupied cells gets weight
        0 on the corners of some occupied cell (so its vertex ids are in range, and it touches them).
        """
        ijk, inside = cell_coords(x, level)
        idx, valid = self._lookup(ijk, inside, level)
        vid = self.corners[level].index_select(0, idx)
        w = torch.where(valid[:, None], trilinear_weights(x, ijk, level), 0.0)
        return LevelQuery(valid=valid, rows=None, vertex_ids=vid, weights=w)

    def contains(self, x: torch.Tensor, level: int | None = None) -> torch.Tensor:
        """``(N,)`` bool: the point lies in an occupied cell of ``level`` (default the finest)."""
        ijk, inside = cell_coords(x, self.max_level if level is None else level)
        return self._lookup(ijk, inside, self.max_level if level is None else level)[1]

    # -- structure as child masks (the .vqad stream stores this) --------------------------------
    def child_masks(self, level: int) -> torch.Tensor:
        """One uint8 per occupied cell of ``level - 1`` (sorted order): bit c set if child c is occupied.

        Covers every cell of level ``level - 1``, which for ``level <= base_level`` means the
        ancestors of the base level (computed on the fly). Shape ``(n_{level-1},)``.
        """
        child = self.codes_at(level)
        parent_codes = torch.unique(child >> 3)
        parent_idx = torch.searchsorted(parent_codes, child >> 3)
        bits = (1 << (child & 7)).long()
        masks = torch.zeros(parent_codes.numel(), dtype=torch.long, device=child.device)
        masks.scatter_add_(0, parent_idx, bits)  # children are distinct, so add == or
        return masks.to(torch.uint8)

    def codes_at(self, level: int) -> torch.Tensor:
        """``(n,)`` sorted Morton codes of the occupied cells of any level ``0..max_level``.

        The stored ``codes[level]`` from ``base_level`` on; above it, the base level's ancestors
        (computed on the fly; level 0 is the root cell, code 0).
        """
        if level in self.codes:
            return self.codes[level]
        if level > self.max_level:
            raise ValueError(f"level {level} is finer than the octree's max level {self.max_level}")
        if level < 0:
            raise ValueError(f"level {level} is negative")
        return torch.unique(self.codes[self.base_level] >> (3 * (self.base_level - level)))

    @staticmethod
    def codes_from_child_masks(parent_codes: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Children's sorted Morton codes from the parents' codes ``(n,)`` and masks ``(n,)`` uint8."""
        if kernels.applies(parent_codes, masks):  # one C pass (vqad.kernels)
            return kernels.children(parent_codes, masks)
        if NUMPY_ON_CPU and masks.device.type == "cpu" and parent_codes.device.type == "cpu":
            # NumPy's boolean selection: ~3x torch.nonzero on the (n, 8) bits here
            bits = np.unpackbits(masks.numpy().astype(np.uint8, copy=False)[:, None], axis=1, bitorder="little")
            children = (parent_codes.numpy()[:, None] << 3) | np.arange(8)  # (n, 8) every child's code
            return torch.from_numpy(children[bits.view(bool)])
        bits = (masks.long()[:, None] >> torch.arange(8, device=masks.device)) & 1  # (n, 8)
        parent, child = torch.nonzero(bits, as_tuple=True)
        return (parent_codes[parent] << 3) | child


def _sorted_unique(codes: torch.Tensor) -> torch.Tensor:
    """``torch.unique(codes)``, without the sort when ``codes`` is already strictly increasing (a file's
    codes come in that order)."""
    if codes.numel() < 2 or bool((codes[1:] > codes[:-1]).all()):
        return codes.clone()  # the octree owns its tables: never the caller's tensor
    return torch.unique(codes)


#: the bits of each axis in a Morton code (x, y, z), for adding in Morton space without decoding
_AXIS_MASKS = tuple(0x1249249249249249 << s for s in (2, 1, 0))


#: the dense table pays (its ``8^L`` marks) only where it is not much larger than the corners: a sparse
#: level (one cell of a fine level, say) sorts its ``8 n`` corners instead
LATTICE_POINTS_PER_CORNER = 32


def corner_tables(codes: torch.Tensor, level: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Corner vertex ids ``(n, 8)`` and vertex Morton keys ``(m,)`` (``L + 1`` bits per axis, strictly
    increasing: vertex ids follow the vertices' Morton order, which the .vqad file relies on) of the cells
    ``codes`` (sorted) of ``level``; both int64. :func:`_vertices_of_keys` gives the coordinates.

    Up to :data:`DENSE_TABLE_MAX_LEVEL`, where a table of all ``8^L`` Morton codes is at most
    ``LATTICE_POINTS_PER_CORNER`` entries per corner, the corners are deduplicated on that table
    (:func:`_corner_tables_dense`: mark, then number, no sort); otherwise by sorting their Morton codes.
    On the CPU with :mod:`vqad.kernels`, the table is a bitmap (64 entries a word) marked and ranked in
    one C pass, so it pays up to 64× more lattice points per corner.
    """
    if level <= DENSE_TABLE_MAX_LEVEL:
        lattice_budget = LATTICE_POINTS_PER_CORNER * 8 * codes.numel()
        if 8 ** level <= 64 * lattice_budget and kernels.applies(codes):  # a bitmap: 64 lattice points a word
            return kernels.corner_tables(codes, level)
        if 8 ** level <= lattice_budget:
            return _corner_tables_dense(codes, level)
    keys = _corner_codes(codes, torch.int32 if 3 * (level + 1) <= 31 else torch.long)  # int32: a smaller sort key
    uniq, inv = torch.unique(keys.reshape(-1), return_inverse=True)
    return inv.reshape(-1, 8), uniq.long()


def _vertices_of_keys(keys: torch.Tensor, level: int) -> torch.Tensor:
    """``(m,)`` vertex keys of ``level`` -> ``(m, 3)`` int64 lattice coordinates (``0..2^L``)."""
    if level + 1 <= 9:  # few 12-bit chunks: the table lookup is faster (see _morton_decode_lut)
        return _morton_decode_lut(keys, level + 1)
    return morton_decode(keys, bits=level + 1)


def _corner_codes(codes: torch.Tensor, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """``(n,) -> (n, 8)``: the ``(L + 1)``-bit Morton codes of the cells' corner vertices, corner
    ``c = ox·4 + oy·2 + oz``, by adding in Morton space (a carry out of bit ``L`` of an axis lands in its
    bit ``L``: the vertices on the cube's far faces); in ``dtype`` (int32 when ``3 (L + 1) <= 31``)."""
    parts = []
    for mask in _AXIS_MASKS:  # per axis: the cell's dilated coordinate, and that plus one
        a = codes & mask
        parts.append((a.to(dtype), (((a | ~mask) + 1) & mask).to(dtype)))  # ((a | ~mask) + 1) & mask: a + 1
    (x0, x1), (y0, y1), (z0, z1) = parts
    xy = [x0 | y0, x0 | y1, x1 | y0, x1 | y1]  # offsets (ox, oy) in corner order
    return torch.stack([v | z for v in xy for z in (z0, z1)], dim=1)


_MORTON_LUTS: dict[str, torch.Tensor] = {}


def _morton_lut(device: torch.device) -> torch.Tensor:
    """``(4096, 3)`` int64: row w holds the 4 bits of each axis (x, y, z) in the 12-bit Morton chunk w
    (cached per device): a row gather per chunk instead of :func:`_compact3`'s shift-and-mask rounds."""
    key = str(device)
    if key not in _MORTON_LUTS:
        w = torch.arange(4096, device=device)
        _MORTON_LUTS[key] = torch.stack([_compact3(w >> 2), _compact3(w >> 1), _compact3(w)], 1)
    return _MORTON_LUTS[key]


def _morton_decode_lut(code: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`morton_decode` of ``code (m,)`` int64 through :func:`_morton_lut`: ``(m, 3)`` int64.

    Only for few-chunk codes (``bits <= 9``, the vertex keys of levels up to 8): there it saved ~1.3 ms
    of the level 6 + 7 tables of a decoded file (4.8 vs 6.2 ms, paired runs); on 21-bit codes the shift
    rounds of :func:`morton_decode` are ~4x faster, so that stays the general one."""
    lut = _morton_lut(code.device)
    out = lut.index_select(0, code & 4095)
    for shift in range(12, 3 * bits, 12):
        out |= lut.index_select(0, (code >> shift) & 4095) << (shift // 3)
    return out


def _corner_tables_dense(codes: torch.Tensor, level: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`corner_tables` through a table of all ``8^L`` Morton codes of ``level`` (``L <= 8``).

    The vertices inside the cube's far faces have ``L``-bit coordinates, so their ``(L + 1)``-bit
    Morton codes are below ``8^L`` and already in Morton order: mark them in the table and read the
    marks back in order (no sort). A vertex on a far face (a coordinate of ``2^L``) sets a top bit of
    its code, so it comes after all of them; those few are sorted on their own. On the CPU the marking
    and numbering run in NumPy, whose scatter and ``flatnonzero`` over the ``8^L`` marks measured
    ~2.5x faster than torch's ``index_put_`` and ``nonzero`` (level 7 of the format benchmark's file:
    0.9 + 0.4 ms against 1.2 + 1.3 ms, one thread; the whole level 5.5 -> 3.7 ms).
    """
    dev = codes.device
    B = 1 << (3 * level)
    keys = _corner_codes(codes, torch.int32).reshape(-1)  # (8n,): 3 (L + 1) <= 27 bits
    far = bool(keys.max() >= B)  # n >= 1: corner_tables takes this path only then
    idx = keys.clamp(max=B) if far else keys  # far-face corners share the dump slot B
    if NUMPY_ON_CPU and dev.type == "cpu":
        k = idx.numpy()
        mark = np.zeros(B + 1, dtype=bool)
        mark[k] = True
        inner_np = np.flatnonzero(mark[:B])  # (m_i,) int64 Morton codes of the other vertices, in order
        table = np.empty(B + 1, dtype=np.int32)  # int32 ids: as fast as int64 here, half the memory
        table[inner_np] = np.arange(inner_np.size, dtype=np.int32)
        corners = torch.from_numpy(np.take(table, k)).long()  # (8n,); np.take: ~2x fancy indexing here
        inner = torch.from_numpy(inner_np)
    else:
        mark = torch.zeros(B + 1, dtype=torch.bool, device=dev)
        mark.index_put_((idx,), torch.ones((), dtype=torch.bool, device=dev))
        inner = mark[:B].nonzero().squeeze(1)  # (m_i,) Morton codes of the other vertices, in order
        table = torch.empty(B + 1, dtype=torch.int32, device=dev)
        table.index_put_((inner,), torch.arange(inner.numel(), dtype=torch.int32, device=dev))
        corners = table.index_select(0, idx).long()  # (8n,)
    if far:
        at = (keys >= B).nonzero().squeeze(1)
        uniq, inv = torch.unique(keys.index_select(0, at), return_inverse=True)
        corners.index_copy_(0, at, inv.long() + inner.numel())
        inner = torch.cat([inner, uniq.long()])
    return corners.reshape(-1, 8), inner


def check_levels(base_level: int, max_level: int) -> None:
    """Raise :class:`InputError` unless ``1 <= base_level <= max_level <= MAX_SUPPORTED_LEVEL``."""
    if not (isinstance(base_level, int) and isinstance(max_level, int)):
        raise InputError(f"levels must be integers, got {base_level!r}:{max_level!r}")
    if not 1 <= base_level <= max_level <= MAX_SUPPORTED_LEVEL:
        raise InputError(
            f"levels {base_level}:{max_level} out of range: need 1 <= BASE <= MAX <= {MAX_SUPPORTED_LEVEL}"
            " (e.g. --levels 3:7)"
        )
