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

from vqad.errors import InputError

#: the units a sequence, a fused TSDF and a TSDF field may name (what the readers produce)
UNITS = ("m", "mm", "cm", "scene")  # scene: a capture's own units (RTMV, NeRF scenes)


def check_units(units, what: str) -> None:
    """``units`` is one of :data:`UNITS`, or an :class:`InputError` naming ``what``."""
    if not isinstance(units, str) or units not in UNITS:
        raise InputError(f"{what}: units must be one of {', '.join(UNITS)}, got {units!r:.40}")
