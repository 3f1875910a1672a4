"""The multi-resolution feature grid: a sparse octree plus one feature storage per level.

The feature at x for LOD l is the sum of the trilinearly interpolated features of levels
``L_base..l`` (a Laplacian-pyramid style residual). A point in an empty cell of a level gets no
contribution from that level.
"""

from __future__ import annotations

import torch
from torch import nn

from vqad.config import GridConfig
from vqad.octree import SparseOctree
from vqad.storages.base import FeatureStorage
from vqad.storages import make_storage


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
                         table_bits=cfg.table_bits, vertices=octree.vertices[level])
            for level in octree.levels
        ]
        return cls(octree, storages, cfg).to(octree.device)

    @property
    def lods(self) -> list[int]:
        return self.octree.levels

    def storage(self, level: int) -> FeatureStorage:
        return self.storages[level - self.octree.base_level]

    def level_features(self, x: torch.Tensor, level: int) -> torch.Tensor:
        """Interpolated features of one level: ``(N, 3) -> (N, k)``, zero in empty cells."""
        q = self.octree.interpolation(x, level)
        f = self.storage(level)(q.vertex_ids)  # (Nv, 8, k)
        interp = (f * q.weights.unsqueeze(-1)).sum(dim=1)  # (Nv, k)
        out = x.new_zeros(x.shape[0], self.k)
        return out.index_put((q.valid,), interp)

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
