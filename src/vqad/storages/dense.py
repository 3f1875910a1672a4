"""The uncompressed grid (NGLOD): a float feature vector per vertex."""

from __future__ import annotations

import torch
from torch import nn

from vqad.errors import InputError
from vqad.storages.base import FeatureStorage, ParamGroup, TensorLayout, gather_unique_rows, round_fp16, unique_rows


class DenseStorage(FeatureStorage):
    """The uncompressed NGLOD-style grid: a float feature vector per vertex, ``Z (m, k)``."""

    kind = "dense"

    def __init__(self, m: int, k: int, init_std: float = 0.01):
        super().__init__(m, k)
        self.Z = nn.Parameter(torch.randn(m, k) * init_std)

    def forward(self, vertex_ids: torch.Tensor) -> torch.Tensor:
        """``(...,) int64 -> (..., k)``: ``Z[ids]``."""
        table, ids = self.rows(vertex_ids)
        return table.index_select(0, ids.reshape(-1)).reshape(*vertex_ids.shape, self.k)

    def rows(self, vertex_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``Z`` and the ids themselves; training: the distinct rows of Z once (Z's sparse gradient then
        arrives summed, no sort) and each id's row among them."""
        if self.baked or not (torch.is_grad_enabled() and self.Z.requires_grad):
            return self.Z, vertex_ids
        uniq, inv = unique_rows(vertex_ids.reshape(-1), self.m)
        return gather_unique_rows(self.Z, uniq), inv.reshape(vertex_ids.shape)

    def bake(self, fp16: bool = True) -> None:
        if fp16:
            self.Z.data = round_fp16(self.Z)
        self.Z.requires_grad_(False)
        self.baked = True

    def stored_bits(self) -> int:
        return 16 * self.m * self.k

    def export_tensors(self) -> dict[str, torch.Tensor]:
        return {"Z": self.Z.detach().half()}

    @classmethod
    def from_export(cls, m, k, tensors, **params):
        s = cls(m, k)
        s.Z.data = tensors["Z"].float().reshape(m, k).to(s.Z.device)
        s.bake(fp16=False)
        return s

    def param_groups(self) -> list[ParamGroup]:
        """Z, whose gradient is sparse (the rows a batch touches), at the grid rate."""
        return [] if self.baked else [ParamGroup((self.Z,), "sparse")]

    @classmethod
    def stored_layout(cls, m, k, **params):
        return [TensorLayout("Z", (m, k), "f16")]


def check_dense(dense) -> None:
    """Raise :class:`InputError` unless ``dense`` is a :class:`DenseStorage` (what post-hoc conversions take)."""
    if not isinstance(dense, DenseStorage):
        raise InputError(
            f"post-hoc baselines compress a trained dense grid, but this grid's storage is "
            f"{getattr(dense, 'kind', type(dense).__name__)!r}: fit with --grid dense first"
        )
