"""Neural fields: a feature grid plus decoder MLPs, with the normalisation back to world units.

:class:`NeuralField` is what every field kind shares (the SDF in :mod:`vqad.sdf.field`, the radiance
field in :mod:`vqad.nerf.field`): its grid and decoders, baking to the stored form, the decoder state
that checkpoints and .vqad files hold, the size accounting, and the config dict it is rebuilt from.
A kind adds only its own evaluation and its own config (:meth:`NeuralField.extra_config`).
"""

from __future__ import annotations

import importlib
import numbers
from dataclasses import dataclass

import torch

from typing import ClassVar

from torch import nn

from vqad.config import DecoderConfig, GridConfig, is_real, to_dict
from vqad.decoders import LODDecoder
from vqad.errors import InputError
from vqad.grid import OctreeGrid


#: the largest world coordinate, and the largest scale and its inverse, a :class:`Normalization` takes: float32
#: holds them with room for the unit cube's [-1, 1] (a header's 1e308 or 1e-300 gave meshes at ±inf or on one point)
MAX_WORLD = 1e12


@dataclass
class Normalization:
    """World → unit cube: ``x_unit = (x_world - center) * scale``.

    Stored with every model so outputs (meshes, metrics) come back in the input's own coordinates.
    """

    center: tuple[float, float, float] = (0.0, 0.0, 0.0)
    scale: float = 1.0

    def __post_init__(self) -> None:
        c, s = self.center, self.scale
        ok_c = isinstance(c, (tuple, list)) and len(c) == 3 and all(is_real(v) and abs(v) <= MAX_WORLD for v in c)
        if not ok_c or not (is_real(s) and 1 / MAX_WORLD <= s <= MAX_WORLD):
            raise InputError(
                f"normalization must be a center of 3 numbers within ±{MAX_WORLD:g} and a scale in [{1 / MAX_WORLD:g}, "
                f"{MAX_WORLD:g}] (beyond them a float32 world coordinate overflows or collapses to one value), got "
                f"center={c!r:.80}, scale={s!r}"
            )
        self.center = tuple(float(v) for v in c)
        self.scale = float(s)

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        return (x - torch.as_tensor(self.center, dtype=x.dtype, device=x.device)) * self.scale

    def to_world(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.scale + torch.as_tensor(self.center, dtype=x.dtype, device=x.device)

    def to_dict(self) -> dict:
        return {"center": [float(c) for c in self.center], "scale": float(self.scale)}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalization":
        """The normalization a checkpoint or .vqad header holds, checked (:class:`InputError` if not valid)."""
        if not isinstance(d, dict) or set(d) != {"center", "scale"}:
            raise InputError(f"normalization must be an object with 'center' and 'scale', got {d!r:.80}")
        c = d["center"]
        return cls(center=tuple(c) if isinstance(c, (list, tuple)) else c, scale=d["scale"])


class NeuralField(nn.Module):
    """A feature grid plus the MLPs that decode it, in unit-cube coordinates.

    Subclasses set :attr:`kind`, build their decoders in ``__init__`` (after calling this one) and
    list them in :meth:`decoders`; they implement :meth:`from_config` and, if they carry more
    configuration than grid, decoder and normalisation, :meth:`extra_config`.
    """

    kind: ClassVar[str] = ""
    #: field kind -> class, filled as each kind's module is imported (:func:`field_from_config` imports it)
    registry: ClassVar[dict[str, type["NeuralField"]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.kind:
            NeuralField.registry[cls.kind] = cls

    def __init__(self, grid: OctreeGrid, decoder_cfg: DecoderConfig, normalization: Normalization | None = None):
        super().__init__()
        decoder_cfg.validate()  # before any layer is allocated (a file's header may ask for anything)
        if decoder_cfg.per_lod is None:
            raise InputError("a field's decoders are shared or per-LOD: per_lod must be true or false (None, 'auto', "
                             "is resolved by the fit that builds the field, e.g. vqad.nerf.fit.build_nerf_field)")
        self.grid = grid
        self.decoder_cfg = decoder_cfg
        self.normalization = normalization or Normalization()

    # -- what a kind provides -------------------------------------------------------------------
    def decoders(self) -> list[LODDecoder]:
        """The stored MLPs (every parameter outside the grid belongs to one of them)."""
        raise NotImplementedError

    #: the keys :meth:`extra_config` adds to the field record (every one a record may hold; others are refused)
    EXTRA_KEYS: tuple[str, ...] = ()

    def extra_config(self) -> dict:
        """Kind-specific configuration stored beside grid, decoder and normalisation (JSON-serialisable)."""
        return {}

    @classmethod
    def from_config(cls, cfg: dict, grid: OctreeGrid) -> "NeuralField":
        """The field of :func:`field_config` ``cfg`` around ``grid`` (decoder weights still to be loaded)."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------
    @property
    def grid_cfg(self) -> GridConfig:
        return self.grid.cfg

    @property
    def lods(self) -> list[int]:
        return self.grid.lods

    @property
    def device(self) -> torch.device:
        return self.grid.octree.device

    def as_rows(self, v, what: str, noun: str, values: str) -> torch.Tensor:
        """``v`` as an ``(N, 3)`` floating-point tensor on the field's device (a NumPy array or nested list is
        converted), else an :class:`InputError` naming ``what`` (``x``, ``d``), its ``noun`` (points) and what its
        ``values`` are (coordinates in the unit cube)."""
        if not isinstance(v, torch.Tensor):
            try:
                v = torch.as_tensor(v, dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise InputError(f"{what} must be (N, 3) {noun} (a tensor or an array of numbers), got "
                                 f"{type(v).__name__}: {exc}") from None
        if v.dim() != 2 or v.shape[1] != 3:
            raise InputError(f"{what} must have shape (N, 3), got {tuple(v.shape)}")
        if not v.is_floating_point():
            raise InputError(f"{what} must be floating-point {values}, got {v.dtype}")
        if v.device != self.device:
            raise InputError(f"{what} is on {v.device}, the field on {self.device}: pass {what}.to(field.device)")
        return v

    def check_points(self, x, what: str = "x") -> torch.Tensor:
        """``x`` of a query from outside (``field(x, lod)``): ``(N, 3)`` unit-cube points as a float32 tensor on
        the field's device (a NumPy array or nested list is converted, float64 cast). Anything else, or a NaN
        or infinite coordinate, is an :class:`InputError` that says what to pass. (Points outside the cube are
        taken: the field is defined inside it, and outside it returns extrapolations, not distances.)"""
        x = self.as_rows(x, what, "points", "coordinates in the unit cube")
        dtype = next(self.parameters()).dtype
        if dtype != torch.float32:
            raise InputError(f"this field's parameters are {dtype}, but vqad fields compute in float32 (a file "
                             "stores fp16 and loads as float32): call field.float() before querying it")
        x = x if x.dtype == torch.float32 else x.float()  # (a float64 beyond float32's range becomes inf: refused)
        if x.numel() and not bool(torch.isfinite(x).all()):
            raise InputError(f"{what} holds NaN or infinite coordinates (in float32): the field is defined at points of "
                             "the unit cube [-1, 1]^3 (outside it, values are extrapolations of the grid's edge)")
        return x

    def check_lod(self, lod) -> int:
        """``lod`` of a query from outside: one of :attr:`lods` (None: the finest), else an :class:`InputError`."""
        if lod is None:
            return self.grid.octree.max_level
        if isinstance(lod, bool) or not isinstance(lod, numbers.Integral) or int(lod) not in self.lods:
            raise InputError(f"LOD {lod!r} is not in this model: choose one of {self.lods} (vqad info lists them)")
        return int(lod)

    def check_lods(self, lods) -> list[int]:
        """``lods`` of a query from outside: a non-empty list of :attr:`lods` (None: all of them)."""
        if lods is None:
            return list(self.lods)
        if isinstance(lods, (str, bytes)) or not hasattr(lods, "__iter__"):
            raise InputError(f"lods must be a list of LODs (of {self.lods}), got {type(lods).__name__}")
        lods = [self.check_lod(lod) for lod in lods]
        if not lods:
            raise InputError(f"lods is empty: give at least one of {self.lods}")
        return lods

    def bake(self, fp16: bool = True) -> None:
        """Inference form: indices instead of logits, and (with ``fp16``) fp16-rounded floats."""
        self.grid.bake(fp16=fp16)
        for dec in self.decoders():
            if fp16:
                dec.round_fp16()
            for p in dec.parameters():
                p.requires_grad_(False)
        self.eval()

    @property
    def baked(self) -> bool:
        return all(s.baked for s in self.grid.storages)

    def decoder_state(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer outside the grid, by name (what the file's decoder chunk holds)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("grid.")}

    def load_decoder_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load :meth:`decoder_state`'s tensors; a missing or unexpected name, or a wrong shape, is an error."""
        want = self.decoder_state()
        missing = [k for k in want if k not in state]
        unexpected = [k for k in state if k not in want]
        if missing or unexpected:
            what = (f"missing {', '.join(missing[:4])}" if missing else "") + \
                   ("; " if missing and unexpected else "") + (f"unexpected {', '.join(unexpected[:4])}" if unexpected else "")
            raise InputError(f"{self.kind} decoder weights do not fit this model ({what}): the file or checkpoint "
                             "was written by another model configuration")
        bad = [k for k, v in state.items() if tuple(v.shape) != tuple(want[k].shape)]
        if bad:
            raise InputError(f"{self.kind} decoder weight {bad[0]} has shape {tuple(state[bad[0]].shape)}, "
                             f"the model expects {tuple(want[bad[0]].shape)}")
        self.load_state_dict(state, strict=False)

    def decoder_bits(self) -> int:
        return sum(d.stored_bits() for d in self.decoders())

    def size_report(self) -> dict:
        """Bytes: dense fp16 grid (16·m·k bits), compressed grid, decoders (fp16), and the ratios."""
        dense = self.grid.dense_fp16_bits() / 8
        grid = self.grid.stored_bits() / 8
        dec = self.decoder_bits() / 8
        return {
            "vertices": self.grid.vertex_counts(),
            "dense_fp16_bytes": dense,
            "grid_bytes": grid,
            "decoder_bytes": dec,
            "compressed_bytes": grid + dec,
            "grid_ratio": dense / grid,
            "total_ratio": (dense + dec) / (grid + dec),
        }

    def size_lines(self) -> list[str]:
        """Human-readable size accounting printed after every fit."""
        r = self.size_report()
        storage = self.grid.storages[0]
        return [
            "vertices per level (m): " + ", ".join(f"L{lv}={m:,}" for lv, m in r["vertices"].items()),
            f"dense fp16 grid (16·m·k bits): {r['dense_fp16_bytes'] / 1e3:,.1f} kB",
            f"{storage.size_label()}: {r['grid_bytes'] / 1e3:,.1f} kB",
            f"decoder (fp16): {r['decoder_bytes'] / 1e3:,.1f} kB; total {r['compressed_bytes'] / 1e3:,.1f} kB",
            f"ratio: grid {ratio_text(r['grid_ratio'])}, with decoder {ratio_text(r['total_ratio'])}",
        ]


def ratio_text(ratio: float) -> str:
    """A compression ratio for people: ``31.7x``; below 1 (the storage is larger than the dense grid) also as
    how many times larger, never a bare ``0.0x`` (a hash table 60 times the grid's size printed that)."""
    return f"{ratio:.1f}x" if ratio >= 0.95 else f"{ratio:.3g}x ({1 / ratio:,.1f} times larger)"


# -- construction shared by checkpoints and the .vqad file ---------------------------------------
#: where each field kind lives: imported on demand, so the core never imports an application
FIELD_MODULES = {"sdf": "vqad.sdf.field", "nerf": "vqad.nerf.field", "tsdf": "vqad.tsdf.field"}


def field_config(field: NeuralField) -> dict:
    """Everything needed to rebuild ``field`` around a grid (JSON-serialisable)."""
    cfg = {
        "kind": field.kind,
        "grid": to_dict(field.grid.cfg),
        "decoder": to_dict(field.decoder_cfg),
        "normalization": field.normalization.to_dict(),
        "storage_params": [s.params() for s in field.grid.storages],
    }
    cfg.update(field.extra_config())
    return cfg


def field_class(kind) -> type[NeuralField]:
    """The class of a field kind, importing its module; an unknown kind is an :class:`InputError`."""
    if kind not in FIELD_MODULES:
        raise InputError(f"unknown field kind {kind!r} (known: {', '.join(FIELD_MODULES)})")
    importlib.import_module(FIELD_MODULES[kind])
    return NeuralField.registry[kind]


#: the keys of every field record (:func:`field_config`); a kind adds its ``EXTRA_KEYS``
FIELD_KEYS = ("kind", "grid", "decoder", "normalization", "storage_params")


def field_from_config(cfg: dict, grid: OctreeGrid) -> NeuralField:
    """The field a checkpoint's or a .vqad header's record ``cfg`` describes, around ``grid``."""
    return record_class(cfg).from_config(cfg, grid)


def field_record(cfg: dict) -> dict:
    """The field record's keys of a dict that holds others beside them (a checkpoint's config.json)."""
    extra = field_class(cfg.get("kind")).EXTRA_KEYS
    return {k: v for k, v in cfg.items() if k in FIELD_KEYS or k in extra}


def record_class(cfg) -> type[NeuralField]:
    """The field class of a checkpoint's or a .vqad header's record ``cfg``, once its keys are checked: a key that
    this vqad does not know is refused (a newer writer's setting would be silently misread), as is a missing one."""
    if not isinstance(cfg, dict):
        raise InputError(f"a field record must be an object, got {type(cfg).__name__}")
    cls = field_class(cfg.get("kind"))
    keys = set(FIELD_KEYS) | set(cls.EXTRA_KEYS)
    unknown, missing = sorted(set(cfg) - keys), sorted(set(FIELD_KEYS) - set(cfg))
    if unknown:
        raise InputError(f"the {cls.kind} field record has keys this vqad does not know: {', '.join(unknown)[:200]} "
                         "(written by a newer vqad? upgrade it; otherwise the file is damaged)")
    if missing:
        raise InputError(f"the {cls.kind} field record lacks {', '.join(missing)}: the file is damaged")
    return cls
