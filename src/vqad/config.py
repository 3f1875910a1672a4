"""Typed configuration. The CLI exposes these dataclasses; checkpoints store them as JSON."""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, fields

import numpy as np

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
        check_types(self, "grid")
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
    per_lod: bool | None = False  # one MLP per LOD instead of a shared one (None: the application chooses, e.g.
    # vqad.nerf.fit.auto_per_lod; resolved before a decoder is built)
    position_input: bool = True  # feed x to ψ alongside the features

    def validate(self) -> None:
        check_types(self, "decoder")
        if not 1 <= self.hidden <= MAX_HIDDEN:  # (the fields' types: check_types)
            raise InputError(f"--hidden (decoder width) must be an integer in 1..{MAX_HIDDEN}, got {self.hidden!r}")
        if not 0 <= self.layers <= MAX_LAYERS:
            raise InputError(f"--layers (decoder hidden layers) must be an integer in 0..{MAX_LAYERS}, got {self.layers!r}")


#: decoder bounds: ψ is a tiny MLP (NGLOD: one hidden layer of 128)
MAX_HIDDEN, MAX_LAYERS = 4096, 16


def check_seed(seed) -> None:
    """Refuse a seed a generator cannot take (``torch.Generator.manual_seed`` and NumPy's: 0..2^63-1)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise InputError(f"--seed must be an integer in 0..2^63-1, got {seed}")


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


_TYPES = {"int": numbers.Integral, "float": numbers.Real, "bool": (bool, np.bool_), "str": str}
_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}
_AS = {"int": int, "float": float, "bool": bool, "str": str}


def check_types(cfg, what: str | None = None) -> None:
    """Refuse a config field whose value is not of its declared type (``int``, ``float``, ``bool``, ``str``,
    each optionally ``| None``): a ``True`` for a step count, ``2.5`` steps or ``"0.01"`` for a rate would
    otherwise fail deep inside PyTorch, or run (``steps=True`` ran one step). NumPy numbers are taken and
    stored as Python's (``np.int64(8)`` from an ``np.arange`` of settings). Ranges (a NaN, an infinity) and
    other annotations are left to the config's own checks, which name the flag."""
    what = what or type(cfg).__name__
    for f in fields(cfg):
        parts = [p.strip() for p in str(f.type).split("|")]
        optional = "None" in parts
        kinds = [p for p in parts if p != "None"]
        if len(kinds) != 1 or kinds[0] not in _TYPES:
            continue
        kind, value = kinds[0], getattr(cfg, f.name)
        if value is None and optional:
            continue
        if not isinstance(value, _TYPES[kind]) or (kind != "bool" and isinstance(value, (bool, np.bool_))):
            raise InputError(f"{what}.{f.name} must be {_NAMES[kind]}{' or None' if optional else ''}, got {value!r}")
        if type(value) is not _AS[kind]:
            setattr(cfg, f.name, _AS[kind](value))


def is_real(v) -> bool:
    """Whether ``v`` is a number (int or float) and not a bool: what a value read from a file must be to count
    as one (JSON's ``true`` is an int to Python)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def from_dict(cls, data: dict):
    """Rebuild a config dataclass, refusing unknown keys (never silently ignored)."""
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise InputError(f"unknown {cls.__name__} keys in config: {', '.join(sorted(unknown))}")
    return cls(**data)


__all__ = ["GridConfig", "DecoderConfig", "parse_levels", "to_dict", "from_dict", "check_types", "is_real"]
