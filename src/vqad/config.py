"""Typed configuration. The CLI exposes these dataclasses; checkpoints store them as JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from vqad.errors import InputError
from vqad.octree import check_levels
from vqad.storages import RENAMED, storage_class
from vqad.storages.hash import DEFAULT_TABLE_BITS


@dataclass
class GridConfig:
    """The feature grid: octree levels, storage kind and the paper's k and b (see :mod:`vqad.storages`).

    Each kind uses only the options :func:`vqad.storages.options_of` names (and validates them);
    the others keep their defaults.
    """

    storage: str = "codebook"  # dense | codebook | hash | lowrank (vqad.storages.STORAGES)
    features: int = 16  # k
    bits: int = 4  # b (codebook)
    base_level: int = 3
    max_level: int = 7
    rank: int | None = None  # r (lowrank): 1..k-1; None: k // 2
    table_bits: int = DEFAULT_TABLE_BITS  # T (hash): 2^T table rows per level

    def validate(self) -> None:
        cls = storage_class(self.storage)
        check_levels(self.base_level, self.max_level)
        if not 1 <= self.features <= 256:
            raise InputError(f"features (k) must be in 1..256, got {self.features}")
        cls.check_options(self)

    @classmethod
    def from_stored(cls, data: dict) -> "GridConfig":
        """The grid config a checkpoint or .vqad header holds (unknown keys refused, not validated).

        A storage name older files used for a form another kind holds now is read as that kind
        (:data:`vqad.storages.RENAMED`: ``kmeans`` → ``codebook``, the same ``D`` fp16 + ``V`` b-bit form).
        """
        cfg = from_dict(cls, data)
        cfg.storage = RENAMED.get(cfg.storage, cfg.storage)
        return cfg

    @property
    def lods(self) -> list[int]:
        return list(range(self.base_level, self.max_level + 1))


@dataclass
class DecoderConfig:
    """The MLP ψ that decodes interpolated features (plus, optionally, the position x)."""

    hidden: int = 128
    layers: int = 1  # hidden layers
    per_lod: bool = False  # one MLP per LOD instead of a shared one
    position_input: bool = True  # feed x to ψ alongside the features


@dataclass
class SDFTrainConfig:
    """Signed distance fitting."""

    steps: int = 3000
    batch: int = 16384
    lr: float = 2e-3  # decoder learning rate
    grid_lr_scale: float = 10.0  # grid (features, codebook D) lr = lr × this
    logit_lr_scale: float | None = 200.0  # codebook logits C lr = lr × this (None: the grid's)
    resample_every: int = 500  # draw fresh samples every N steps
    max_minutes: float | None = None  # also stop after this long (the lr schedule follows time too)
    truncation: float = 0.0  # clamp predicted and true distances to ±this in the loss (0: no clamp)
    pool_size: int = 400_000  # samples per pool
    refine: int = 3  # Gauss–Newton index refinement sweeps (vqad.refine) after the last step (0: none)
    refine_during: int = 0  # ... and sweeps spread over training (or over its tail, below)
    refine_samples: int = 200_000  # samples each sweep sees (from the current pool)
    refine_band: float = 0.0  # ... only those within this many finest cells of the surface (0: all of them)
    refine_candidates: int = 2  # each sweep measures the real loss change of this many candidate codewords per vertex (0: GN prediction)
    refine_tail: float = 0.0  # refine_during sweeps over this last fraction of training, logits C frozen there (0: all of it)
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 1000


def parse_levels(text: str) -> tuple[int, int]:
    """``"3:7"`` -> (3, 7), with a clear error otherwise."""
    try:
        a, b = text.split(":")
        base, top = int(a), int(b)
    except ValueError as exc:
        raise InputError(f"--levels must look like BASE:MAX (e.g. 3:7), got {text!r}") from exc
    check_levels(base, top)
    return base, top


def to_dict(obj) -> dict:
    return asdict(obj)


def from_dict(cls, data: dict):
    """Rebuild a config dataclass, refusing unknown keys (never silently ignored)."""
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise InputError(f"unknown {cls.__name__} keys in config: {', '.join(sorted(unknown))}")
    return cls(**data)


__all__ = ["GridConfig", "DecoderConfig", "SDFTrainConfig", "parse_levels", "to_dict", "from_dict", "field"]
