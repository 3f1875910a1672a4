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


#: the reader arguments that vqad fit-tsdf's flags set, for messages
CLI_FLAGS = {"depth_scale": "--depth-scale", "K": "--intrinsics", "intrinsics_file": "--intrinsics FILE.json",
             "trajectory": "--trajectory"}


def read_sequence(path, format: str = "auto", **kw) -> RGBDSequence:
    """Read an RGB-D sequence of any supported layout (``format`` one of :data:`FORMATS`).

    ``kw`` go to the reader (``depth_scale``, ``K``, ...); one the reader does not take is an
    :class:`InputError` (e.g. a depth scale for RTMV's float depth). ``"procedural"`` is the built-in
    scene with exact depth unless ``noise`` is given (:func:`vqad.tsdf.synth.procedural_sequence`).
    """
    if format not in FORMATS:
        raise InputError(f"unknown RGB-D format {format!r}: use one of {', '.join(FORMATS)}")
    fmt = detect_sequence_format(path) if format == "auto" else format
    if fmt == "procedural" and path is not None and str(path) != "procedural":
        raise InputError(f"--format procedural is the built-in scene, not a folder: give 'procedural' as the source, "
                         f"or another --format (auto detects it) to read {path}")
    if fmt != "procedural" and not Path(path).is_dir():
        raise InputError(f"{fmt} sequence folder not found: {path}")
    reader = _readers()[fmt]
    target = procedural_sequence if fmt == "procedural" else reader
    accepted = set(inspect.signature(target).parameters)
    extra = sorted(k for k, v in kw.items() if v is not None and k not in accepted)
    if extra:
        named = ", ".join(f"{k} ({CLI_FLAGS[k]})" if k in CLI_FLAGS else k for k in extra)
        raise InputError(f"{named} does not apply to a {fmt} sequence"
                         + (": its depth is stored as floats, in the scene's own units" if "depth_scale" in extra and fmt == "rtmv" else ""))
    kw = {k: v for k, v in kw.items() if v is not None}
    return reader(path, **kw)
