"""The TSDF field (kind ``"tsdf"``): a signed distance field that only speaks for observed space.

A fused TSDF holds truncated distances ``clamp(d, -τ, τ)`` in the voxels a depth camera saw. The
field decodes ``u(x) ≈ ψ(x, Σ_{L ≤ l} interp_L(x))`` like the SDF (:class:`~vqad.sdf.field.SDFField`)
but is trained on those truncated values, only inside the octree of observed near-surface space;
outside the octree it says nothing (:meth:`TSDFField.observed`), so meshes are cut there as a fusion
mesh is cut at unobserved voxels. An optional colour decoder ``c(x) ∈ [0, 1]^3`` shares the features.

The header stores the truncation ``τ`` and voxel size in the sequence's ``units`` (metres for every
reader in :mod:`vqad.tsdf.rgbd`), beside the normalisation to world coordinates.
"""

from __future__ import annotations

import math

import torch

from vqad.config import DecoderConfig, from_dict
from vqad.decoders import LODDecoder
from vqad.errors import InputError
from vqad.field import Normalization
from vqad.grid import OctreeGrid
from vqad.sdf.field import SDFField
from vqad.tsdf import check_units


class TSDFField(SDFField):
    """Truncated signed distance in unit-cube coordinates, ``(N, 3) -> (N,)`` (kind ``"tsdf"``).

    ``truncation`` ``τ`` and ``voxel`` are in world ``units``; :attr:`trunc_unit` is ``τ`` in the
    unit cube. With ``color``, :meth:`color` decodes ``(N, 3)`` RGB in [0, 1].
    """

    kind = "tsdf"

    def __init__(self, grid: OctreeGrid, decoder_cfg: DecoderConfig, normalization: Normalization | None = None,
                 truncation: float = 1.0, voxel: float = 1.0, units: str = "m", color: bool = False):
        check_tsdf_params(truncation, voxel, units, color)
        super().__init__(grid, decoder_cfg, normalization)
        self.truncation, self.voxel, self.units, self.has_color = float(truncation), float(voxel), units, color
        if color:
            in_dim = grid.k + (3 if decoder_cfg.position_input else 0)
            self.color_decoder = LODDecoder(in_dim, 3, grid.lods, decoder_cfg).to(grid.octree.device)

    def decoders(self) -> list[LODDecoder]:
        return [self.decoder, self.color_decoder] if self.has_color else [self.decoder]

    EXTRA_KEYS = ("tsdf",)

    def extra_config(self) -> dict:
        return {"tsdf": {"truncation": self.truncation, "voxel": self.voxel, "units": self.units, "color": self.has_color}}

    @classmethod
    def from_config(cls, cfg: dict, grid: OctreeGrid) -> "TSDFField":
        t = cfg.get("tsdf")
        if not isinstance(t, dict) or set(t) != {"truncation", "voxel", "units", "color"}:
            raise InputError(f"a tsdf field needs a 'tsdf' record with truncation, voxel, units and color, got {t!r:.120}")
        return cls(grid, from_dict(DecoderConfig, cfg["decoder"]), Normalization.from_dict(cfg["normalization"]),
                   truncation=t["truncation"], voxel=t["voxel"], units=t["units"], color=t["color"])

    @property
    def trunc_unit(self) -> float:
        """``τ`` in unit-cube units."""
        return self.truncation * self.normalization.scale

    def observed(self, x: torch.Tensor) -> torch.Tensor:
        """``(N,)`` bool: ``x (N, 3)`` lies in an occupied cell of the finest level this field holds,
        i.e. in the observed near-surface space the field was trained on."""
        return self.grid.octree.contains(self.check_points(x))

    def color(self, x: torch.Tensor, lod: int | None = None) -> torch.Tensor:
        """``(N, 3)`` RGB in [0, 1] at ``x (N, 3)`` at ``lod`` (default: the finest); an :class:`InputError` when
        the field has no colour."""
        if not self.has_color:
            raise InputError("this TSDF field has no colour (it was fitted to a sequence without colour, or with --no-color)")
        x, lod = self.check_points(x), self.check_lod(lod)
        return torch.sigmoid(self.color_decoder(self._input(x, self.grid.features(x, lod)), lod))

    def _input(self, x: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """What the MLPs read: the features ``(N, k)``, with the position ``(N, 3)`` when configured."""
        return torch.cat([feats, x], dim=-1) if self.decoder_cfg.position_input else feats

    def all_lods_with_color(self, x: torch.Tensor, lods: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Distances ``(n_lods, N)`` and colours ``(n_lods, N, 3)`` (or ``None``) at points ``x (N, 3)`` at several
        LODs (default: all), each level's features once: :meth:`query_lods_with_color` with the checks of
        :meth:`forward`."""
        return self.query_lods_with_color(self.check_points(x), self.check_lods(lods))

    def query_lods_with_color(self, x: torch.Tensor, lods: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`all_lods_with_color` without its checks (a fit's steps call it): ``x (N, 3)`` float32 points on
        the field's device, ``lods`` of :attr:`lods` (None: all)."""
        lods = self.lods if lods is None else lods
        feats = self.grid.multi_lod_features(x, lods)
        hs = [self._input(x, f) for f in feats]
        d = torch.stack([self.decoder(h, lod).squeeze(-1) for h, lod in zip(hs, lods)])
        if not self.has_color:
            return d, None
        return d, torch.stack([torch.sigmoid(self.color_decoder(h, lod)) for h, lod in zip(hs, lods)])


def check_tsdf_params(truncation, voxel, units, color) -> None:
    """The TSDF record's values (from flags, a checkpoint or a file header), or an :class:`InputError`."""

    def positive(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0

    if not positive(truncation) or not positive(voxel):
        raise InputError(f"a TSDF's truncation and voxel size must be positive finite numbers, got {truncation!r}, {voxel!r}")
    if truncation < voxel:
        raise InputError(f"the truncation ({truncation:g}) must be at least one voxel ({voxel:g})")
    check_units(units, "TSDF")
    if not isinstance(color, bool):
        raise InputError(f"the TSDF record's 'color' must be true or false, got {color!r:.40}")
