"""The multi-resolution feature grid: a sparse octree plus one feature storage per level.

The feature at x for LOD l is the sum of the trilinearly interpolated features of levels
``L_base..l`` (a Laplacian-pyramid style residual). A point in an empty cell of a level gets no
contribution from that level.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vqad import kernels
from vqad.config import GridConfig
from vqad.octree import SparseOctree
from vqad.storages.base import FeatureStorage
from vqad.storages import make_storage, storage_class


def octree_args(cls: type[FeatureStorage], octree: SparseOctree, level: int) -> dict[str, torch.Tensor]:
    """What a storage kind takes from the octree at ``level`` (the :data:`~vqad.storages.OCTREE_ARGS` its
    ``create_args`` name): ``{"vertices": (m, 3) int64}`` for kinds that hash vertex positions, else nothing
    (so the vertex coordinates are not decoded for kinds that never read them)."""
    return {"vertices": octree.vertices[level]} if "vertices" in cls.create_args else {}


class _Interpolate(torch.autograd.Function):
    """``Σ_c w_c T[ids_c]`` with ``embedding_bag``'s forward and a gather / ``index_add_`` backward.

    ``embedding_bag`` (sums of 8-row bags with per-row weights) makes no ``(N, 8, k)`` copy of the
    features: measured on the CPU (65,536 points, k = 16) 10-20× faster than gathering the rows and
    summing them. Its own CPU backward sorts the indices, which made a training step slower (SDF
    codebook step 150-160 → 180-220 ms, paired runs), so the backward here is the one the gather and
    sum had: ``∂T = index_add(w ⊗ g)``, ``∂w_c = ⟨T[ids_c], g⟩``; on the CPU, ``∂T`` is one fused pass
    without the ``(8 N, k)`` product (:func:`vqad.kernels.interp_backward`). One forward with and without
    autograd, so training and baked outputs agree bit for bit. No double backward (nothing takes one).
    """

    @staticmethod
    def forward(ctx, w: torch.Tensor, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # one memory layout and index type: embedding_bag picks its kernel (and so its rounding) by them,
        # and a codebook made post hoc (a transposed k-means result) must compute what its file does
        table, ids, w = table.contiguous(), ids.long(), w.contiguous()
        ctx.save_for_backward(w, table, ids)
        return F.embedding_bag(ids, table, per_sample_weights=w, mode="sum")

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        w, table, ids = ctx.saved_tensors
        flat = ids.reshape(-1)
        g_w = g_t = None
        if ctx.needs_input_grad[0]:
            g_w = (table.index_select(0, flat).reshape(*ids.shape, -1) * g.unsqueeze(1)).sum(-1)
        if ctx.needs_input_grad[1]:
            if kernels.applies(w, table, g):
                g_t = kernels.interp_backward(w, ids, g, table.shape[0])
            else:
                rows = (g.unsqueeze(1) * w.unsqueeze(-1)).reshape(-1, table.shape[-1])  # (8 N, k)
                g_t = torch.zeros_like(table).index_add_(0, flat, rows)
        return g_w, g_t, None


def _interpolate(w: torch.Tensor, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``Σ_c w_c T[ids_c]``: ``(N, 8), (R, k), (N, 8) -> (N, k)`` (:class:`_Interpolate`); a weight dtype
    other than the table's (float64 points) takes a plain gather and sum."""
    if w.dtype == table.dtype:
        return _Interpolate.apply(w, table, ids)
    f = table.index_select(0, ids.reshape(-1)).reshape(*ids.shape, table.shape[-1])
    return (f * w.unsqueeze(-1)).sum(dim=1)


class OctreeGrid(nn.Module):
    """Octree + per-level :class:`FeatureStorage`.

    Build with :meth:`from_octree`; ``storages[i]`` holds level ``base_level + i``.
    """

    def __init__(self, octree: SparseOctree, storages: list[FeatureStorage], cfg: GridConfig):
        super().__init__()
        self.octree = octree
        self.cfg = cfg
        self.storages = nn.ModuleList(storages)
        self.k = cfg.features

    @classmethod
    def from_octree(cls, octree: SparseOctree, cfg: GridConfig) -> "OctreeGrid":
        cfg.validate()
        storages = [
            make_storage(cfg.storage, octree.num_vertices(level), cfg.features, bits=cfg.bits, rank=cfg.rank,
                         table_bits=cfg.table_bits, **octree_args(storage_class(cfg.storage), octree, level))
            for level in octree.levels
        ]
        return cls(octree, storages, cfg).to(octree.device)

    @property
    def lods(self) -> list[int]:
        return self.octree.levels

    def storage(self, level: int) -> FeatureStorage:
        return self.storages[level - self.octree.base_level]

    def level_features(self, x: torch.Tensor, level: int) -> torch.Tensor:
        """Interpolated features of one level: ``(N, 3) -> (N, k)``, zero in empty cells.

        ``Σ_c w_c Z[v_c]`` over the 8 corners of the point's cell, in one of two forms with the same
        values, bit for bit. The compact form looks features up for the points in occupied cells
        only: a storage's sparse gradient then names exactly the rows they touch (the rows SparseAdam
        moves), but counting those points makes the host wait for the device. So the compact form
        serves whenever autograd records the lookup (``x`` or the storage needs a gradient), and on
        the CPU, where nothing waits and the empty cells' lookups would be wasted work; the padded
        form (every point looks up, with weight 0 outside the occupied cells) serves inference on an
        accelerator, without a single synchronisation.
        """
        storage = self.storage(level)
        records = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in storage.parameters()))
        if records or x.device.type == "cpu":
            return self._compact_level_features(x, level)
        return self._padded_level_features(x, level)

    def _compact_level_features(self, x: torch.Tensor, level: int) -> torch.Tensor:
        q = self.octree.interpolation(x, level)
        interp = _interpolate(q.weights, *self.storage(level).rows(q.vertex_ids))  # (N_valid, k)
        return x.new_zeros(x.shape[0], self.k).index_copy(0, q.rows, interp)

    def _padded_level_features(self, x: torch.Tensor, level: int) -> torch.Tensor:
        q = self.octree.padded_interpolation(x, level)
        interp = _interpolate(q.weights, *self.storage(level).rows(q.vertex_ids))  # (N, k)
        # a zero weight does not zero a non-finite feature (0 · inf): select instead
        return torch.where(q.valid[:, None], interp, 0.0)

    def features(self, x: torch.Tensor, lod: int | None = None) -> torch.Tensor:
        """Summed features of levels ``base..lod`` (default: finest): ``(N, 3) -> (N, k)``."""
        return self.multi_lod_features(x, [self.octree.max_level if lod is None else lod])[0]

    def multi_lod_features(self, x: torch.Tensor, lods: list[int]) -> list[torch.Tensor]:
        """Cumulative features for several LODs at once, each level computed once.

        Returns a list aligned with ``lods``, each ``(N, k)``.
        """
        top = max(lods)
        want = set(lods)
        acc = None
        out: dict[int, torch.Tensor] = {}
        for level in range(self.octree.base_level, top + 1):
            f = self.level_features(x, level)
            acc = f if acc is None else acc + f
            if level in want:
                out[level] = acc
        return [out[lod] for lod in lods]

    def bake(self, fp16: bool = True) -> None:
        for s in self.storages:
            s.bake(fp16=fp16)

    # -- size accounting ----------------------------------------------------------------------
    def vertex_counts(self) -> dict[int, int]:
        return {level: self.octree.num_vertices(level) for level in self.lods}

    def stored_bits(self, upto: int | None = None) -> int:
        top = self.octree.max_level if upto is None else upto
        return sum(self.storage(level).stored_bits() for level in self.lods if level <= top)

    def dense_fp16_bits(self, upto: int | None = None) -> int:
        top = self.octree.max_level if upto is None else upto
        return sum(self.storage(level).dense_fp16_bits() for level in self.lods if level <= top)
