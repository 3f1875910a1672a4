"""Neural fields: a feature grid plus a decoder, with the normalisation back to world units."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import DecoderConfig, GridConfig
from .decoders import LODDecoder
from .grid import OctreeGrid


@dataclass
class Normalization:
    """World → unit cube: ``x_unit = (x_world - center) * scale``.

    Stored with every model so outputs (meshes, metrics) come back in the input's own coordinates.
    """

    center: tuple[float, float, float] = (0.0, 0.0, 0.0)
    scale: float = 1.0

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        return (x - torch.as_tensor(self.center, dtype=x.dtype, device=x.device)) * self.scale

    def to_world(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.scale + torch.as_tensor(self.center, dtype=x.dtype, device=x.device)

    def to_dict(self) -> dict:
        return {"center": [float(c) for c in self.center], "scale": float(self.scale)}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalization":
        return cls(center=tuple(float(c) for c in d["center"]), scale=float(d["scale"]))


class SDFField(nn.Module):
    """Signed distance ``u(x) ≈ ψ(x, Σ_{L ≤ l} interp_L(x))`` in unit-cube coordinates.

    Negative inside, positive outside. ``forward(x, lod)``: ``(N, 3) -> (N,)``.
    """

    kind = "sdf"

    def __init__(self, grid: OctreeGrid, decoder_cfg: DecoderConfig, normalization: Normalization | None = None):
        super().__init__()
        self.grid = grid
        self.decoder_cfg = decoder_cfg
        self.normalization = normalization or Normalization()
        in_dim = grid.k + (3 if decoder_cfg.position_input else 0)
        self.decoder = LODDecoder(in_dim, 1, grid.lods, decoder_cfg).to(grid.octree.device)

    @property
    def grid_cfg(self) -> GridConfig:
        return self.grid.cfg

    @property
    def lods(self) -> list[int]:
        return self.grid.lods

    def _decode(self, x: torch.Tensor, feats: torch.Tensor, lod: int) -> torch.Tensor:
        h = torch.cat([feats, x], dim=-1) if self.decoder_cfg.position_input else feats
        return self.decoder(h, lod).squeeze(-1)

    def forward(self, x: torch.Tensor, lod: int | None = None) -> torch.Tensor:
        lod = self.grid.octree.max_level if lod is None else lod
        return self._decode(x, self.grid.features(x, lod), lod)

    def all_lods(self, x: torch.Tensor, lods: list[int] | None = None) -> torch.Tensor:
        """Distances at several LODs, each level's features computed once: ``(n_lods, N)``."""
        lods = self.lods if lods is None else lods
        feats = self.grid.multi_lod_features(x, lods)
        return torch.stack([self._decode(x, f, lod) for f, lod in zip(feats, lods)])

    def bake(self, fp16: bool = True) -> None:
        """Inference form: indices instead of logits, and (with ``fp16``) fp16-rounded floats."""
        self.grid.bake(fp16=fp16)
        if fp16:
            self.decoder.round_fp16()
        for p in self.decoder.parameters():
            p.requires_grad_(False)
        self.eval()

    @property
    def baked(self) -> bool:
        return all(s.baked for s in self.grid.storages)

    def decoder_state(self) -> dict[str, torch.Tensor]:
        """Every parameter that is not part of the grid, by name (what the file's decoder chunk holds)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("grid.")}

    def load_decoder_state(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(state, strict=False)

    def size_report(self) -> dict:
        """Bytes: dense fp16 grid (16·m·k bits), compressed grid, decoder, and the ratio."""
        dense = self.grid.dense_fp16_bits() / 8
        grid = self.grid.stored_bits() / 8
        dec = self.decoder.stored_bits() / 8
        return {
            "vertices": self.grid.vertex_counts(),
            "dense_fp16_bytes": dense,
            "grid_bytes": grid,
            "decoder_bytes": dec,
            "compressed_bytes": grid + dec,
            "grid_ratio": dense / grid,
            "total_ratio": (dense + dec) / (grid + dec),
        }


# -- generic construction, shared by checkpoints and the .vqad file ----------------------------
# A field kind registers a builder ``(config dict, grid) -> field``. Every field exposes:
#   kind, grid (OctreeGrid), normalization, decoder_cfg, config_dict(), bake(fp16), lods,
#   decoder_state() (all non-grid parameters, by name), load_decoder_state(dict).
FIELD_BUILDERS: dict[str, "callable"] = {}


def register_field(kind: str):
    def deco(builder):
        FIELD_BUILDERS[kind] = builder
        return builder

    return deco


def field_config(field) -> dict:
    """Everything needed to rebuild ``field`` around a grid (JSON-serialisable)."""
    from .config import to_dict

    cfg = {
        "kind": field.kind,
        "grid": to_dict(field.grid.cfg),
        "decoder": to_dict(field.decoder_cfg),
        "normalization": field.normalization.to_dict(),
        "storage_params": [s.params() for s in field.grid.storages],
    }
    cfg.update(getattr(field, "extra_config", lambda: {})())
    return cfg


def field_from_config(cfg: dict, grid: OctreeGrid):
    from .errors import InputError

    kind = cfg.get("kind")
    if kind not in FIELD_BUILDERS and kind == "nerf":
        from . import nerf  # noqa: F401  (registers the radiance field)
    if kind not in FIELD_BUILDERS:
        raise InputError(f"unknown field kind {kind!r} (known: {', '.join(FIELD_BUILDERS)})")
    return FIELD_BUILDERS[kind](cfg, grid)


@register_field("sdf")
def _build_sdf(cfg: dict, grid: OctreeGrid) -> SDFField:
    from .config import from_dict

    return SDFField(grid, from_dict(DecoderConfig, cfg["decoder"]), Normalization.from_dict(cfg["normalization"]))
