"""Helpers shared by the CLI command modules."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError


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


def parse_lod(field, lod: int | None) -> int:
    if lod is None:
        return field.grid.octree.max_level
    if lod not in field.lods:
        raise InputError(f"LOD {lod} is not available in this model: choose one of {field.lods}")
    return lod


def add_device_arg(p) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda[:N]")
