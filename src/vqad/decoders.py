"""Decoders ψ: small MLPs from interpolated features (and optionally x) to field values."""

from __future__ import annotations

import torch
from torch import nn

from vqad.config import DecoderConfig


class MLP(nn.Module):
    """``in_dim -> [hidden]*layers -> out_dim`` with ReLU, as in NGLOD (one hidden layer of 128)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 128, layers: int = 1):
        super().__init__()
        dims = [in_dim] + [hidden] * layers + [out_dim]
        mods: list[nn.Module] = []
        for i in range(len(dims) - 1):
            mods.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                mods.append(nn.ReLU(inplace=True))
        self.net = nn.Sequential(*mods)
        self.in_dim, self.out_dim, self.hidden, self.layers = in_dim, out_dim, hidden, layers

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``(N, in_dim) -> (N, out_dim)``."""
        return self.net(h)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class LODDecoder(nn.Module):
    """ψ shared by every LOD, or one ψ per LOD (``cfg.per_lod``)."""

    def __init__(self, in_dim: int, out_dim: int, lods: list[int], cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.lods = list(lods)
        n = len(lods) if cfg.per_lod else 1
        self.mlps = nn.ModuleList(MLP(in_dim, out_dim, cfg.hidden, cfg.layers) for _ in range(n))

    def forward(self, h: torch.Tensor, lod: int) -> torch.Tensor:
        i = self.lods.index(lod) if self.cfg.per_lod else 0
        return self.mlps[i](h)

    def round_fp16(self) -> None:
        """Round weights to fp16 precision (what the file stores), keeping fp32 storage."""
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(p.half().float())

    def stored_bits(self) -> int:
        return 16 * sum(p.numel() for p in self.parameters())
