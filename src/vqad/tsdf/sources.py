"""``read_sequence``: any RGB-D layout :mod:`vqad.tsdf.rgbd` reads, or the built-in scene of
:mod:`vqad.tsdf.synth`, by name or detected (it sits above both, so neither imports the other back)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable

from vqad.errors import InputError
from vqad.tsdf.rgbd import FORMATS, RGBDSequence, detect_sequence_format, read_redwood, read_rtmv_sequence, read_tum
from vqad.tsdf.synth import procedural_sequence


def _readers() -> dict[str, Callable[..., RGBDSequence]]:
    return {"tum": read_tum, "redwood": read_redwood, "rtmv": read_rtmv_sequence,
            "procedural": lambda path=None, **kw: procedural_sequence(**kw)}


def read_sequence(path, format: str = "auto", **kw) -> RGBDSequence:
    """Read an RGB-D sequence of any supported layout (``format`` one of :data:`FORMATS`).

    ``kw`` go to the reader (``depth_scale``, ``K``, ...); one the reader does not take is an
    :class:`InputError` (e.g. a depth scale for RTMV's float depth). ``"procedural"`` is the built-in
    scene with exact depth unless ``noise`` is given (:func:`vqad.tsdf.synth.procedural_sequence`).
    """
    if format not in FORMATS:
        raise InputError(f"unknown RGB-D format {format!r}: use one of {', '.join(FORMATS)}")
    fmt = detect_sequence_format(path) if format == "auto" else format
    if fmt != "procedural" and not Path(path).is_dir():
        raise InputError(f"{fmt} sequence folder not found: {path}")
    reader = _readers()[fmt]
    target = procedural_sequence if fmt == "procedural" else reader
    accepted = set(inspect.signature(target).parameters)
    extra = sorted(k for k, v in kw.items() if v is not None and k not in accepted)
    if extra:
        raise InputError(f"{', '.join(extra)} does not apply to a {fmt} sequence (it takes {', '.join(sorted(accepted - {'path'}))})")
    kw = {k: v for k, v in kw.items() if v is not None}
    return reader(path, **kw)
