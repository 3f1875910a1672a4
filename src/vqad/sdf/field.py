"""The signed distance field: an octree feature grid decoded by one MLP (shared by the LODs, or one per LOD)."""

from __future__ import annotations

import torch

from vqad.config import DecoderConfig, from_dict
from vqad.decoders import LODDecoder
from vqad.field import NeuralField, Normalization
from vqad.grid import OctreeGrid


class SDFField(NeuralField):
    """Signed distance ``u(x) ≈ ψ(x, Σ_{L ≤ l} interp_L(x))`` in unit-cube coordinates (kind ``"sdf"``).

    Negative inside, positive outside. ``forward(x, lod)``: ``(N, 3) -> (N,)``.
    """

    kind = "sdf"

    def __init__(self, grid: OctreeGrid, decoder_cfg: DecoderConfig, normalization: Normalization | None = None):
        super().__init__(grid, decoder_cfg, normalization)
        in_dim = grid.k + (3 if decoder_cfg.position_input else 0)
        self.decoder = LODDecoder(in_dim, 1, grid.lods, decoder_cfg).to(grid.octree.device)

    def decoders(self) -> list[LODDecoder]:
        return [self.decoder]

    @classmethod
    def from_config(cls, cfg: dict, grid: OctreeGrid) -> "SDFField":
        return cls(grid, from_dict(DecoderConfig, cfg["decoder"]), Normalization.from_dict(cfg["normalization"]))

    def _decode(self, x: torch.Tensor, feats: torch.Tensor, lod: int) -> torch.Tensor:
        h = torch.cat([feats, x], dim=-1) if self.decoder_cfg.position_input else feats
        return self.decoder(h, lod).squeeze(-1)

    def forward(self, x: torch.Tensor, lod: int | None = None) -> torch.Tensor:
        """Signed distances ``(N,)`` at unit-cube points ``x (N, 3)``, at ``lod`` (default: the finest)."""
        x, lod = self.check_points(x), self.check_lod(lod)
        return self.query(x, lod)

    def query(self, x: torch.Tensor, lod: int) -> torch.Tensor:
        """:meth:`forward` without its checks, for the library's own loops (sphere tracing evaluates the field
        dozens of times a frame; each check of ``x`` would sync a GPU): ``x (N, 3)`` float32 unit-cube points on
        the field's device, ``lod`` one of :attr:`lods`. Returns ``(N,)``."""
        return self._decode(x, self.grid.features(x, lod), lod)

    def all_lods(self, x: torch.Tensor, lods: list[int] | None = None) -> torch.Tensor:
        """Distances ``(n_lods, N)`` at points ``x (N, 3)`` at several LODs (default: all), each level's features
        computed once: :meth:`query_lods` with the checks of :meth:`forward`."""
        return self.query_lods(self.check_points(x), self.check_lods(lods))

    def query_lods(self, x: torch.Tensor, lods: list[int] | None = None) -> torch.Tensor:
        """:meth:`all_lods` without its checks (as :meth:`query`; a fit's steps call it): ``x (N, 3)`` float32
        unit-cube points on the field's device, ``lods`` of :attr:`lods` (None: all). Returns ``(n_lods, N)``."""
        lods = self.lods if lods is None else lods
        feats = self.grid.multi_lod_features(x, lods)
        return torch.stack([self._decode(x, f, lod) for f, lod in zip(feats, lods)])
