"""The uncompressed grid (NGLOD): a float feature vector per vertex."""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn
from vqad.storages.base import FeatureStorage, TensorLayout, round_fp16
from vqad.errors import InputError



class DenseStorage(FeatureStorage):
    """The uncompressed NGLOD-style grid: a float feature vector per vertex, ``Z (m, k)``."""

    kind = "dense"

    def __init__(self, m: int, k: int, init_std: float = 0.01):
        super().__init__(m, k)
        self.Z = nn.Parameter(torch.randn(m, k) * init_std)

    def forward(self, vertex_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(vertex_ids, self.Z, sparse=not self.baked)

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

    def sparse_parameters(self):
        return [] if self.baked else [self.Z]

    @classmethod
    def stored_layout(cls, m, k, **params):
        return [TensorLayout("Z", (m, k), "f16")]


def check_dense(dense) -> None:
    if not isinstance(dense, DenseStorage):
        raise InputError(
            f"post-hoc baselines compress a trained dense grid, got a {type(dense).__name__}: "
            "fit with --grid dense first"
        )
