"""RTMV captures: per view ``NNNNN.exr`` colour, ``NNNNN.depth.exr`` and ``NNNNN.json`` camera data."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch

from vqad.errors import InputError
from vqad.nerf.data import SceneDataset
from vqad.nerf.rays import backproject
from vqad.nerf.formats.common import _Frame, _Pinhole, _as_c2w, _dataset, _read_json

RTMV_DEPTH_INVALID = 1000.0  # RTMV marks background pixels with huge depths (kaolin-wisp: |d| >= 1000)
_RTMV_JSON = re.compile(r"^(\d+)\.json$")
def _rtmv_c2w(m, what: str) -> np.ndarray:
    """RTMV's ``cam2world`` (translation in the last row) → a column-vector OpenGL c2w ``(4, 4)``.

    A matrix already in column-vector form (last row ``0 0 0 1`` and translation in the last column)
    is accepted as is.
    """
    a = _as_c2w(m, what, rigid=False)  # either layout: checked as a pose below, once it is column-vector
    if np.allclose(a[3], [0, 0, 0, 1]) and not np.allclose(a[:3, 3], 0):
        return _as_c2w(a, what)
    return _as_c2w(a.T, what)


def read_rtmv(path, downscale: int = 1, background=(1.0, 1.0, 1.0), split_limit=None,
              depth_kind: str = "ray") -> SceneDataset:
    """An RTMV scene folder: per view ``NNNNN.exr`` (linear RGBA), ``NNNNN.depth.exr`` and
    ``NNNNN.json`` (``camera_data``: ``cam2world``, ``intrinsics`` {fx, fy, cx, cy}, ``width``,
    ``height``).

    ``depth_kind`` says what the depth EXRs hold: ``"ray"`` (distance from the camera centre along
    the ray; RTMV's convention as read by kaolin-wisp) or ``"z"`` (z-depth). Splits follow
    kaolin-wisp: sorted by view number, the first ⌊2N/3⌋ train, the next ⌊N/30⌋ val, the rest test.
    """
    if depth_kind not in ("ray", "z"):
        raise InputError(f"depth_kind must be 'ray' or 'z', not {depth_kind!r}")
    root = Path(path)
    jsons = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _RTMV_JSON.match(p.name)))
    exrs = [p for p in root.iterdir() if re.fullmatch(r"\d+\.exr", p.name)]
    if not jsons:
        raise InputError(f"{root} has no NNNNN.json camera files: not an RTMV scene")
    if len(jsons) != len(exrs):
        raise InputError(f"{root} has {len(jsons)} camera files (NNNNN.json) but {len(exrs)} colour images "
                         "(NNNNN.exr); every view needs both")
    if len(jsons) < 3:
        raise InputError(f"{root} has {len(jsons)} views: RTMV splits need at least 3")
    frames, boxes = [], []
    for _, jp in jsons:
        what = jp.name
        meta = _read_json(jp)
        cam = meta.get("camera_data")
        if not isinstance(cam, dict) or "cam2world" not in cam or "intrinsics" not in cam:
            raise InputError(f"{jp} needs camera_data with cam2world and intrinsics")
        intr = cam["intrinsics"]
        try:
            pin = _Pinhole(fx=float(intr["fx"]), fy=float(intr["fy"]), cx=float(intr["cx"]), cy=float(intr["cy"]),
                           w=float(cam["width"]), h=float(cam["height"]))
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{jp}: camera_data needs intrinsics fx, fy, cx, cy and width, height ({e})") from e
        img = jp.with_suffix(".exr")
        if not img.is_file():
            raise InputError(f"image not found: {img} (the colour of {what}); restore it or remove {what}")
        depth = jp.with_name(jp.stem + ".depth.exr")
        frames.append(_Frame(image=img, c2w=_rtmv_c2w(cam["cam2world"], what), pinhole=pin, name=jp.stem,
                             depth=depth if depth.is_file() else None, depth_kind=depth_kind,
                             depth_invalid_at=RTMV_DEPTH_INVALID))
        if "scene_min_3d_box" in cam and "scene_max_3d_box" in cam:
            boxes.append((np.asarray(cam["scene_min_3d_box"], float), np.asarray(cam["scene_max_3d_box"], float)))
    n = len(frames)
    n_train, n_val = math.floor(n * 2 / 3), math.floor(n / 30)
    train, val, test = frames[:n_train], frames[n_train:n_train + n_val], frames[n_train + n_val:]
    sources = {"train": f"views 0..{n_train - 1} (first 2/3)", "test": f"views {n_train + n_val}..{n - 1}"}
    if val:
        sources["val"] = f"views {n_train}..{n_train + n_val - 1} (next 1/30)"
    else:
        val = test
        sources["val"] = "the test views (fewer than 30 views: no separate val split)"

    def bounds(splits):
        pts = []
        for views in splits.values():
            if views.depth is None:
                continue
            for i in range(len(views)):
                z = views.depth[i].float()
                jj, ii = torch.nonzero(z > 0, as_tuple=True)
                step = max(1, jj.numel() // 50_000)
                jj, ii = jj[::step], ii[::step]
                uv = torch.stack([ii, jj], -1).double() + 0.5
                pts.append(backproject(views.c2w[i].double(), views.intrinsics[i].double(), uv, z[jj, ii].double()))
        if pts:
            p = torch.cat(pts)
            lo, hi = p.amin(0).numpy(), p.amax(0).numpy()
            pad = 0.05 * float((hi - lo).max()) / 2
            return lo - pad, hi + pad, None, None
        if boxes:
            return np.min([b[0] for b in boxes], 0), np.max([b[1] for b in boxes], 0), None, None
        raise InputError(f"{root}: no view has depth (NNNNN.depth.exr) and the JSON has no scene box; "
                         "the scene's bounds are unknown")

    return _dataset(root.name, "rtmv", {"train": train, "val": val, "test": test}, sources, downscale, background,
                    split_limit, root, bounds)
