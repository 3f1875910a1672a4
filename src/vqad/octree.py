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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vqad.errors import InputError

MAX_SUPPORTED_LEVEL = 16  # Morton codes of level-16 vertices need 3*17 = 51 bits: fits int64

_CORNER_OFFSETS = torch.tensor(
    [[(c >> 2) & 1, (c >> 1) & 1, c & 1] for c in range(8)], dtype=torch.long
)  # (8, 3)


def morton_encode(ijk: torch.Tensor, bits: int = 21) -> torch.Tensor:
    """Interleave the bits of integer coordinates: ``(..., 3) int -> (...,) int64``.

    Bit ``j`` of x lands at ``3j + 2``, of y at ``3j + 1``, of z at ``3j``.

    >>> morton_encode(torch.tensor([[1, 0, 0], [0, 0, 1], [1, 1, 1]]))
    tensor([4, 1, 7])
    """
    ijk = ijk.long()
    code = torch.zeros(ijk.shape[:-1], dtype=torch.long, device=ijk.device)
    for j in range(bits):
        code |= ((ijk[..., 0] >> j) & 1) << (3 * j + 2)
        code |= ((ijk[..., 1] >> j) & 1) << (3 * j + 1)
        code |= ((ijk[..., 2] >> j) & 1) << (3 * j)
    return code


def morton_decode(code: torch.Tensor, bits: int = 21) -> torch.Tensor:
    """Inverse of :func:`morton_encode`: ``(...,) int64 -> (..., 3) int64``."""
    code = code.long()
    out = torch.zeros(code.shape + (3,), dtype=torch.long, device=code.device)
    for j in range(bits):
        out[..., 0] |= ((code >> (3 * j + 2)) & 1) << j
        out[..., 1] |= ((code >> (3 * j + 1)) & 1) << j
        out[..., 2] |= ((code >> (3 * j)) & 1) << j
    return out


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
    off = _CORNER_OFFSETS.to(x.device)  # (8, 3)
    w = torch.where(off.bool()[None], t[:, None, :], 1.0 - t[:, None, :])  # (N, 8, 3)
    return w.prod(dim=-1)


@dataclass
class LevelQuery:
    """Where a batch of points falls at one level.

    Attributes:
        cell: ``(N,)`` occupied-cell index, -1 where the cell is empty or the point outside.
        valid: ``(N,)`` bool, ``cell >= 0``.
        vertex_ids: ``(N_valid, 8)`` vertex ids of the valid points' cell corners.
        weights: ``(N_valid, 8)`` trilinear weights for the valid points.
    """

    cell: torch.Tensor
    valid: torch.Tensor
    vertex_ids: torch.Tensor
    weights: torch.Tensor


class SparseOctree:
    """Occupied cells and their corner vertices for levels ``base_level..max_level``.

    Build one with :meth:`from_points` (training) or :meth:`from_codes` (loading); it is never
    half-built. All tensors live on ``device``.
    """

    def __init__(self, finest_codes: torch.Tensor, base_level: int, max_level: int):
        check_levels(base_level, max_level)
        self.base_level = int(base_level)
        self.max_level = int(max_level)
        codes = torch.unique(finest_codes.long())  # sorted
        if codes.numel() == 0:
            raise InputError("the octree is empty: no sample fell inside the cube [-1, 1]^3")
        self.codes: dict[int, torch.Tensor] = {}
        self.corners: dict[int, torch.Tensor] = {}
        self.vertices: dict[int, torch.Tensor] = {}
        for level in range(self.max_level, self.base_level - 1, -1):
            self.codes[level] = codes
            self._build_vertices(level)
            codes = torch.unique(codes >> 3)

    # -- construction -------------------------------------------------------------------------
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
        ijk = torch.unique(ijk[inside], dim=0)
        if ijk.numel() == 0:
            raise InputError("the octree is empty: no sample fell inside the cube [-1, 1]^3")
        if dilate > 0:
            r = torch.arange(-dilate, dilate + 1, device=ijk.device)
            offs = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
            res = 1 << max_level
            chunks = []
            for off in offs:  # (2d+1)^3 shifted copies, deduplicated as we go to bound memory
                chunks.append(morton_encode((ijk + off).clamp_(0, res - 1)))
            codes = torch.unique(torch.cat(chunks))
        else:
            codes = morton_encode(ijk)
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

    def _build_vertices(self, level: int) -> None:
        # only as many bits as the level needs (cells: L bits per axis, vertices: L + 1)
        ijk = morton_decode(self.codes[level], bits=level)  # (n, 3)
        corner_ijk = ijk[:, None, :] + _CORNER_OFFSETS.to(ijk.device)[None]  # (n, 8, 3)
        keys = morton_encode(corner_ijk, bits=level + 1)  # (n, 8)
        uniq, inv = torch.unique(keys.reshape(-1), return_inverse=True)
        self.corners[level] = inv.reshape(-1, 8)
        self.vertices[level] = morton_decode(uniq, bits=level + 1)

    # -- properties ---------------------------------------------------------------------------
    @property
    def levels(self) -> list[int]:
        return list(range(self.base_level, self.max_level + 1))

    @property
    def device(self) -> torch.device:
        return self.codes[self.max_level].device

    def num_cells(self, level: int) -> int:
        return int(self.codes[level].numel())

    def num_vertices(self, level: int) -> int:
        """m for this level."""
        return int(self.vertices[level].shape[0])

    def to(self, device: torch.device | str) -> "SparseOctree":
        return SparseOctree(self.codes[self.max_level].to(device), self.base_level, self.max_level)

    def vertex_positions(self, level: int) -> torch.Tensor:
        """``(m_L, 3)`` vertex positions in [-1, 1]^3."""
        return self.vertices[level].float() * (2.0 / (1 << level)) - 1.0

    # -- queries ------------------------------------------------------------------------------
    def query(self, x: torch.Tensor, level: int) -> torch.Tensor:
        """Occupied-cell index of each point at ``level``: ``(N, 3) -> (N,)`` int64, -1 if empty."""
        ijk, inside = cell_coords(x, level)
        return self._lookup(ijk, inside, level)

    def _lookup(self, ijk: torch.Tensor, inside: torch.Tensor, level: int) -> torch.Tensor:
        codes = self.codes[level]
        q = morton_encode(ijk)
        idx = torch.searchsorted(codes, q).clamp_(max=codes.numel() - 1)
        found = (codes[idx] == q) & inside
        return torch.where(found, idx, torch.full_like(idx, -1))

    def interpolation(self, x: torch.Tensor, level: int) -> LevelQuery:
        """Cell, corner vertex ids and trilinear weights of each point at ``level``."""
        ijk, inside = cell_coords(x, level)
        cell = self._lookup(ijk, inside, level)
        valid = cell >= 0
        vid = self.corners[level][cell[valid]]
        w = trilinear_weights(x[valid], ijk[valid], level)
        return LevelQuery(cell=cell, valid=valid, vertex_ids=vid, weights=w)

    def contains(self, x: torch.Tensor, level: int | None = None) -> torch.Tensor:
        """``(N,)`` bool: the point lies in an occupied cell of ``level`` (default the finest)."""
        return self.query(x, self.max_level if level is None else level) >= 0

    # -- structure as child masks (the .vqad stream stores this) --------------------------------
    def child_masks(self, level: int) -> torch.Tensor:
        """One uint8 per occupied cell of ``level - 1`` (sorted order): bit c set if child c is occupied.

        Covers every cell of level ``level - 1``, which for ``level <= base_level`` means the
        ancestors of the base level (computed on the fly). Shape ``(n_{level-1},)``.
        """
        child = self._codes_at(level)
        parent_codes = torch.unique(child >> 3)
        parent_idx = torch.searchsorted(parent_codes, child >> 3)
        bits = (1 << (child & 7)).long()
        masks = torch.zeros(parent_codes.numel(), dtype=torch.long, device=child.device)
        masks.scatter_add_(0, parent_idx, bits)  # children are distinct, so add == or
        return masks.to(torch.uint8)

    def _codes_at(self, level: int) -> torch.Tensor:
        if level in self.codes:
            return self.codes[level]
        if level > self.max_level:
            raise ValueError(f"level {level} is finer than the octree's max level {self.max_level}")
        return torch.unique(self.codes[self.base_level] >> (3 * (self.base_level - level)))

    @staticmethod
    def codes_from_child_masks(parent_codes: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Children's sorted Morton codes from the parents' codes ``(n,)`` and masks ``(n,)`` uint8."""
        bits = (masks.long()[:, None] >> torch.arange(8, device=masks.device)) & 1  # (n, 8)
        parent, child = torch.nonzero(bits, as_tuple=True)
        return (parent_codes[parent] << 3) | child


def check_levels(base_level: int, max_level: int) -> None:
    """Raise :class:`InputError` unless ``1 <= base_level <= max_level <= MAX_SUPPORTED_LEVEL``."""
    if not (isinstance(base_level, int) and isinstance(max_level, int)):
        raise InputError(f"levels must be integers, got {base_level!r}:{max_level!r}")
    if not 1 <= base_level <= max_level <= MAX_SUPPORTED_LEVEL:
        raise InputError(
            f"levels {base_level}:{max_level} out of range: need 1 <= BASE <= MAX <= {MAX_SUPPORTED_LEVEL}"
            " (e.g. --levels 3:7)"
        )
