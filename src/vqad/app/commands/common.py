"""Helpers shared by the CLI command modules."""

from __future__ import annotations

import os
from pathlib import Path

from vqad.errors import InputError


def ensure_writable_dir(path: str | Path) -> Path:
    """Create ``path`` (and parents) or raise a one-line :class:`InputError`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"output path exists and is not a directory: {path}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create output directory {path}: {exc.strerror}") from exc
    if not os.access(path, os.W_OK):
        raise InputError(f"output directory is not writable: {path}")
    return path


def ensure_writable_file(path: str | Path) -> Path:
    path = Path(path)
    ensure_writable_dir(path.parent if str(path.parent) else Path("."))
    if path.exists() and path.is_dir():
        raise InputError(f"output path is a directory, expected a file: {path}")
    return path


def report_skipped_steps(n: int) -> None:
    """The fit's line about steps skipped for a non-finite loss or gradient (nothing when there were none)."""
    if n:
        print(f"skipped {n} steps with a non-finite loss or gradient (a sign of too high a learning rate)")


def parse_lod(field, lod: int | None) -> int:
    if lod is None:
        return field.grid.octree.max_level
    if lod not in field.lods:
        raise InputError(f"LOD {lod} is not available in this model: choose one of {field.lods}")
    return lod


def add_device_arg(p) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda[:N]")


TRAINABLE_GRIDS = ["dense", "codebook", "hash"]


def add_grid_args(p, default_features: int) -> None:
    """``--grid``, ``--bits``, ``--table-bits`` and ``--features`` of the fit commands."""
    from vqad.storages.hash import DEFAULT_TABLE_BITS

    p.add_argument("--grid", choices=TRAINABLE_GRIDS, default="codebook",
                   help="feature storage: dense, codebook (VQ-AD) or hash (Instant-NGP random indices); "
                        "for post-hoc kmeans / lowrank fit dense, then run vqad compress")
    p.add_argument("--bits", type=int, default=4, help="b: codebook index bits (1..12; codebook only)")
    p.add_argument("--table-bits", type=int, default=None,
                   help=f"T: hash table of 2^T rows per level (1..24, default {DEFAULT_TABLE_BITS}; hash only)")
    p.add_argument("--features", type=int, default=default_features, help="k: features per vertex")


def grid_config(args, base: int, top: int):
    """The validated :class:`~vqad.config.GridConfig` of :func:`add_grid_args`' flags and the levels."""
    from vqad.config import GridConfig

    if args.table_bits is not None and args.grid != "hash":
        raise InputError(f"--table-bits sets the hash table size; it applies to --grid hash, not --grid {args.grid}")
    grid = GridConfig(storage=args.grid, features=args.features, bits=args.bits, base_level=base, max_level=top)
    if args.table_bits is not None:
        grid.table_bits = args.table_bits
    grid.validate()
    return grid
