"""instant-ngp and nerfstudio captures: one ``transforms.json`` with intrinsics, lenses and poses."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from vqad.errors import InputError
from vqad.nerf.contraction import MAX_OUTER_SCALE
from vqad.nerf.data import SceneDataset
from vqad.nerf.formats.common import (CAMERA_BOX_OUTER, HOLD_EVERY, _dataset, _holdout, _json_numbers, _read_json, _transforms_frames,
                                      capture_box, depth_points, inside_capture)
from vqad.nerf.formats.points import read_ply_points


#: keys of instant-ngp's scene box; a transforms.json with none of them but with nerfstudio's keys is nerfstudio's
NGP_SCENE_KEYS = ("aabb_scale", "scale", "offset")
NERFSTUDIO_KEYS = ("camera_model", "applied_transform", "applied_scale", "orientation_override")


def is_nerfstudio(meta: dict) -> bool:
    """Whether a ``transforms.json`` is nerfstudio's (``ns-process-data``, Polycam, Record3D exports): its
    camera keys and none of instant-ngp's scene keys, so its poses are in arbitrary units."""
    return not any(k in meta for k in NGP_SCENE_KEYS) and any(k in meta for k in NERFSTUDIO_KEYS)


def read_ngp(path, downscale: int = 1, background=(1.0, 1.0, 1.0), split_limit=None, hold_every: int = HOLD_EVERY) -> SceneDataset:
    """An instant-ngp (or nerfstudio) ``transforms.json`` scene (``path`` is its directory or the file itself).

    Every ``hold_every``-th frame (0, 8, ...) is test and val; the rest train. The unit cube is
    instant-ngp's ``aabb_scale`` box (see the module docstring); a nerfstudio file (:func:`is_nerfstudio`)
    has no box, and gets one from its cameras, or its points and depth maps (:func:`capture_box`).
    """
    p = Path(path)
    json_path = p if p.is_file() else p / "transforms.json"
    if not json_path.is_file():
        raise InputError(f"{p} has no transforms.json: not an instant-ngp scene")
    meta = _read_json(json_path)
    all_frames = _transforms_frames(meta, json_path.parent, json_path)
    if len(all_frames) < 2:
        raise InputError(f"{json_path} has {len(all_frames)} frame: at least 2 are needed (one is held out)")
    train, test = _holdout(all_frames, hold_every)
    desc = f"every {hold_every}th frame of {json_path.name}"
    sources = {"train": f"{json_path.name} minus every {hold_every}th frame", "val": desc + " (val = test)", "test": desc}
    for key in ("aabb_scale", "scale"):
        v = meta.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise InputError(f"{json_path}: {key} must be a number, not {v!r}")
    if meta.get("offset") is not None and not (_json_numbers(meta["offset"], depth=1) and len(meta["offset"]) == 3):
        raise InputError(f"{json_path}: offset must be a list of 3 numbers, not {str(meta['offset'])[:60]}")
    try:
        aabb_scale = float(meta.get("aabb_scale", 1))
        scale = float(meta.get("scale", 0.33))
        offset = np.asarray(meta.get("offset", [0.5, 0.5, 0.5]), dtype=np.float64).reshape(3)
    except (TypeError, ValueError) as e:
        raise InputError(f"{json_path}: aabb_scale, scale and offset must be numbers ({e})") from e
    if not (aabb_scale > 0 and scale > 0 and math.isfinite(aabb_scale) and math.isfinite(scale)) or not np.all(np.isfinite(offset)):
        raise InputError(f"{json_path}: aabb_scale and scale must be positive and offset finite")
    # ngp = world · scale + offset (offset in the file's axis order); ngp's box is 0.5 ± aabb_scale / 2.
    # aabb_scale > 1: the central box (aabb_scale 1) is the unit cube and the rest is contracted
    if aabb_scale > MAX_OUTER_SCALE:
        raise InputError(f"{json_path}: aabb_scale {aabb_scale:g} is above the largest vqad contracts "
                         f"({MAX_OUTER_SCALE:g}); lower it (instant-ngp itself stops at 128)")
    outer = max(aabb_scale, 1.0)
    center = (0.5 - offset) / scale
    half = 0.5 * aabb_scale / outer / scale
    points = None
    if meta.get("ply_file_path") is not None:  # nerfstudio's sparse structure-from-motion points
        ply = meta["ply_file_path"]
        if not isinstance(ply, str):
            raise InputError(f"{json_path}: ply_file_path must be a path, got {ply!r}")
        ply_path = inside_capture(json_path.parent, json_path.parent, ply, str(json_path), "ply_file_path")
        if not ply_path.is_file():
            raise InputError(f"{json_path}: ply_file_path {ply!r} not found at {ply_path}: restore it or remove the key")
        points = read_ply_points(ply_path)
    if not is_nerfstudio(meta):
        return _dataset(json_path.parent.name, "ngp", {"train": train, "val": test, "test": test}, sources, downscale,
                        background, split_limit, json_path.parent, lambda splits: (center - half, center + half, None, None),
                        outer_scale=outer, points=points)
    # nerfstudio: poses in the units of its structure from motion, no box: it comes from the cameras (or points)
    placed = {}

    def box(splits):
        pts = points if points is not None else depth_points(splits["train"])
        c, h, placed["by"] = capture_box([f.c2w for f in all_frames], str(json_path), pts)
        return c - h, c + h, None, None

    ds = _dataset(json_path.parent.name, "ngp", {"train": train, "val": test, "test": test}, sources, downscale,
                  background, split_limit, json_path.parent, box, outer_scale=CAMERA_BOX_OUTER, points=points)
    ds.split_sources = {k: f"{v} (nerfstudio: the scene box from its {placed['by']})" for k, v in ds.split_sources.items()}
    return ds
