"""Truncated signed distance fields from RGB-D: the paper's second application.

- :mod:`vqad.tsdf.rgbd` — :class:`RGBDSequence` and readers for TUM RGB-D, Redwood / Open3D style
  folders, and the built-in synthetic sequences; :mod:`vqad.tsdf.sources` ``read_sequence(path, format="auto")``.
- :mod:`vqad.tsdf.synth` — synthetic sequences rendered from meshes and from the procedural scene,
  with a documented depth-camera noise model, and writers for each layout.
- :mod:`vqad.tsdf.fusion` — sparse projective TSDF fusion (PyTorch, CPU or GPU) into a
  :class:`FusedTSDF`: the uncompressed baseline, with its measured byte count and its own mesh.
- :mod:`vqad.tsdf.field` / :mod:`vqad.tsdf.fit` — the TSDF field kind (``"tsdf"``) and its task in the
  one fit loop (:func:`vqad.fit.run_fit`).

Conventions: poses are camera-to-world ``(4, 4)`` in OpenCV axes (x right, y down, z forward);
depth is metres (the sequence's own units) with 0 for a missing pixel; the pinhole intrinsics ``K``
are ``(3, 3)`` in pixels.
"""

import numpy as np

from vqad.errors import InputError

#: the units a sequence, a fused TSDF and a TSDF field may name (what the readers produce)
UNITS = ("m", "mm", "cm", "scene")  # scene: a capture's own units (RTMV, NeRF scenes)


def check_units(units, what: str) -> None:
    """``units`` is one of :data:`UNITS`, or an :class:`InputError` naming ``what``."""
    if not isinstance(units, str) or units not in UNITS:
        raise InputError(f"{what}: units must be one of {', '.join(UNITS)}, got {units!r:.40}")


def is_whole(a: np.ndarray) -> bool:
    """Whether every value of ``a`` is a whole number: an integer array, or finite floats without fractions (an
    index array a user built with ``np.zeros``)."""
    return a.dtype.kind in "iu" or (a.dtype.kind == "f" and bool(np.isfinite(a).all()) and bool((a == np.round(a)).all()))


def as_colour8(c, shape: tuple, what: str) -> np.ndarray:
    """``c`` as a ``shape`` uint8 array: uint8 as it is, whole numbers in 0..255 converted; anything else (floats
    in 0..1, 300, another shape) an :class:`InputError` naming ``what``, never wrapped to 8 bits."""
    a = np.asarray(c) if isinstance(c, (np.ndarray, list, tuple)) else None
    ok = a is not None and a.shape == tuple(shape) and (
        a.dtype == np.uint8 or (a.dtype.kind in "iuf" and is_whole(a) and (a.size == 0 or (a.min() >= 0 and a.max() <= 255))))
    if not ok:
        got = f"{a.dtype} {list(a.shape)}" if a is not None else type(c).__name__
        raise InputError(f"{what}: colour must be a {tuple(shape)} array of whole numbers in 0..255 (uint8), got {got}")
    return np.ascontiguousarray(a, dtype=np.uint8)
