"""Instant-NGP random indices: each vertex's integer coordinates hashed into a trained table of 2^T rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vqad.errors import InputError
from vqad.storages.base import FeatureStorage, ParamGroup, TensorLayout, is_int, round_fp16

DEFAULT_TABLE_BITS = 14
MIN_TABLE_BITS, MAX_TABLE_BITS = 1, 24
HASH_PRIMES = (1, 2654435761, 805459861)  # π of Instant-NGP's spatial hash


def check_table_bits(table_bits) -> None:
    """Raise :class:`InputError` unless T is an integer in ``MIN_TABLE_BITS..MAX_TABLE_BITS``."""
    if not is_int(table_bits) or not MIN_TABLE_BITS <= table_bits <= MAX_TABLE_BITS:
        raise InputError(
            f"table_bits (T, a hash table of 2^T rows per level) must be an integer in "
            f"{MIN_TABLE_BITS}..{MAX_TABLE_BITS}, got {table_bits!r} (e.g. --table-bits {DEFAULT_TABLE_BITS})"
        )


# ================================================================================================
# hash
# ================================================================================================
def spatial_hash(coords: torch.Tensor, table_bits: int) -> torch.Tensor:
    """Instant-NGP's spatial hash of integer coordinates: ``(..., 3) -> (...,)`` int64 in ``[0, 2^T)``.

    ``h(x) = (x_0·π_0 ⊕ x_1·π_1 ⊕ x_2·π_2) mod 2^T``, ``π = (1, 2654435761, 805459861)``. Products are
    exact in int64 for coordinates below 2^31, and their low T ≤ 32 bits equal those of Instant-NGP's
    wrapping uint32 arithmetic, so the rows are Instant-NGP's.

    >>> spatial_hash(torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0]]), 8)
    tensor([  0,   1, 177])
    """
    check_table_bits(table_bits)
    c = coords.long()
    if c.shape[-1] != 3:
        raise InputError(f"spatial_hash needs (..., 3) integer coordinates, got shape {tuple(coords.shape)}")
    h = (c[..., 0] * HASH_PRIMES[0]) ^ (c[..., 1] * HASH_PRIMES[1]) ^ (c[..., 2] * HASH_PRIMES[2])
    return h & ((1 << table_bits) - 1)


class HashStorage(FeatureStorage):
    """Random (hash) indices: ``Z[i] = θ[h(x_i)]``, a trained table ``θ (2^T, k)`` per level.

    ``h`` is :func:`spatial_hash` of vertex i's integer coordinates ``x_i`` at this level, recomputed
    from the octree whenever the storage is built (never stored): only θ is, in fp16,
    ``16·k·2^T`` bits. Vertices that collide share a row. θ's gradient is sparse (the rows a batch
    touches), so it trains with SparseAdam like the dense Z.
    """

    kind = "hash"
    create_args = ("table_bits", "vertices")

    def __init__(self, m: int, k: int, vertices: torch.Tensor | None, table_bits: int = DEFAULT_TABLE_BITS,
                 init_std: float = 0.01):
        super().__init__(m, k)
        check_table_bits(table_bits)
        if vertices is None:
            raise InputError(
                "the hash storage hashes each vertex's integer coordinates: pass vertices=octree.vertices[level] "
                "(OctreeGrid.from_octree, checkpoints and the .vqad reader do)"
            )
        if tuple(vertices.shape) != (m, 3) or vertices.is_floating_point():
            raise InputError(f"hash storage vertices must be ({m}, 3) integer coordinates, got {tuple(vertices.shape)} {vertices.dtype}")
        self.T = int(table_bits)
        rows = 1 << self.T
        table = torch.randn(rows, k) * init_std if init_std > 0 else torch.zeros(rows, k)
        self.table = nn.Parameter(table.to(vertices.device))
        self.register_buffer("h", spatial_hash(vertices, self.T), persistent=False)  # (m,) rows of θ

    @classmethod
    def check_options(cls, cfg) -> None:
        check_table_bits(cfg.table_bits)

    @classmethod
    def create(cls, m: int, k: int, table_bits: int = DEFAULT_TABLE_BITS, vertices: torch.Tensor | None = None) -> "HashStorage":
        return cls(m, k, vertices, table_bits)

    def params(self) -> dict:
        return {"table_bits": self.T}

    def forward(self, vertex_ids: torch.Tensor) -> torch.Tensor:
        """``(...,) int64 -> (..., k)``: ``θ[h[ids]]``."""
        return F.embedding(self.h[vertex_ids], self.table, sparse=not self.baked)

    def rows(self, vertex_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Baked: the table θ and ``h[ids]``; training: the default (θ's sparse gradient via ``embedding``)."""
        if self.baked:
            return self.table, self.h[vertex_ids]
        return super().rows(vertex_ids)

    def bake(self, fp16: bool = True) -> None:
        if fp16:
            self.table.data = round_fp16(self.table)
        self.table.requires_grad_(False)
        self.baked = True

    def stored_bits(self) -> int:
        """The fp16 table only: ``16·k·2^T``."""
        return 16 * self.k * (1 << self.T)

    def export_tensors(self) -> dict[str, torch.Tensor]:
        return {"table": self.table.detach().half()}

    @classmethod
    def from_export(cls, m, k, tensors, table_bits: int = DEFAULT_TABLE_BITS, vertices: torch.Tensor | None = None, **params):
        s = cls(m, k, vertices, table_bits, init_std=0.0)
        s.table.data = tensors["table"].float().reshape(1 << s.T, k).to(s.table.device)
        s.bake(fp16=False)
        return s

    def param_groups(self) -> list[ParamGroup]:
        """θ, whose gradient is sparse (the rows a batch touches), at the grid rate."""
        return [] if self.baked else [ParamGroup((self.table,), "sparse")]

    @classmethod
    def stored_layout(cls, m, k, table_bits: int = DEFAULT_TABLE_BITS, **params):
        """The table ``θ (2^T, k)`` in fp16 (indices are recomputed from the octree)."""
        check_table_bits(table_bits)
        return [TensorLayout("table", (1 << table_bits, k), "f16")]

