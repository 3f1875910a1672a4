"""LLFF forward-facing captures: ``poses_bounds.npy`` and ``images_N/``."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from vqad.errors import InputError
from vqad.nerf.data import SceneDataset
from vqad.nerf.formats.common import HOLD_EVERY, _Frame, _Pinhole, _as_c2w, _dataset, _holdout, _list_images, dynamic_mask_of


#: the widest far / near of a capture's bounds (real LLFF captures: under 1,000); wider is a broken file
MAX_DEPTH_RATIO = 1e6


# -- LLFF ------------------------------------------------------------------------------------------
def _llff_image_dir(root: Path, downscale: int) -> tuple[Path, int, Path]:
    """The image folder to read, the downscale still to apply to it, and the highest-resolution folder present
    (``images`` = factor 1, or the smallest ``images_N``; its photos' dynamic masks stand for their copies).

    ``downscale`` is relative to that folder; a folder ``images_{base·downscale}`` is read directly when it
    exists.
    """
    dirs = {}
    for d in root.iterdir():
        m = re.fullmatch(r"images(?:_(\d+))?", d.name)
        if d.is_dir() and m:
            dirs[int(m.group(1) or 1)] = d
    if not dirs:
        raise InputError(f"{root} has poses_bounds.npy but no images/ or images_N/ folder: add the images")
    base = min(dirs)
    if base * downscale in dirs:
        return dirs[base * downscale], 1, dirs[base]
    return dirs[base], downscale, dirs[base]


def read_llff(path, downscale: int = 1, background=(1.0, 1.0, 1.0), split_limit=None, hold_every: int = HOLD_EVERY) -> SceneDataset:
    """An LLFF capture: ``poses_bounds.npy`` + ``images/`` or ``images_N/``.

    Every ``hold_every``-th image (0, 8, 16, ...) is test and val (the standard protocol); the
    rest train. World coordinates are the file's; the unit cube holds all camera frusta between
    the (padded) near/far bounds, which also give ``near``/``far``.
    """
    root = Path(path)
    if root.is_file():
        root = root.parent
    pb_path = root / "poses_bounds.npy"
    if not pb_path.is_file():
        raise InputError(f"{root} has no poses_bounds.npy: not an LLFF capture")
    try:
        with open(pb_path, "rb") as fh:
            magic = fh.read(6)
    except OSError as e:
        raise InputError(f"cannot read {pb_path}: {e.strerror}") from e
    if magic != b"\x93NUMPY":
        raise InputError(f"{pb_path} is not a NumPy .npy file (it does not start with the .npy magic bytes): "
                         "LLFF's imgs2poses.py writes it as np.save of an (N, 17) float array")
    try:  # mapped, so a header that claims more rows than the file holds is refused before any allocation
        pb = np.load(pb_path, allow_pickle=False, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {pb_path} as an (N, 17) float array: {str(e).splitlines()[0]} (the file is "
                         f"damaged or not what imgs2poses.py writes)") from e
    if pb.dtype.kind not in "fiu":
        raise InputError(f"{pb_path} holds {pb.dtype} values, not numbers: expected an (N, 17) float array")
    if pb.ndim != 2 or pb.shape[1] != 17 or pb.shape[0] == 0:
        raise InputError(f"{pb_path} must be an (N, 17) array of [3×5 pose | near far] rows, not {list(pb.shape)}")
    pb = np.array(pb, dtype=np.float64)
    if not np.all(np.isfinite(pb)):
        bad = np.nonzero(~np.all(np.isfinite(pb), axis=1))[0].tolist()
        raise InputError(f"{pb_path}: non-finite poses or bounds in rows {bad}; fix or drop those views")
    poses = pb[:, :15].reshape(-1, 3, 5)
    bds = pb[:, 15:17]
    if np.any(bds <= 0) or np.any(bds[:, 1] <= bds[:, 0]):
        raise InputError(f"{pb_path}: the near/far bounds must satisfy 0 < near < far in every row")
    if bds[:, 1].max() / bds[:, 0].min() > MAX_DEPTH_RATIO:
        raise InputError(f"{pb_path}: the bounds span {bds[:, 0].min():.3g} to {bds[:, 1].max():.3g}, a depth range over "
                         f"{MAX_DEPTH_RATIO:.0e}×: a far bound of that size is a broken file (COLMAP's LLFF script gives "
                         "each view the depths of its points); fix the bounds")
    img_dir, rest, full_dir = _llff_image_dir(root, downscale)
    paths = _list_images(img_dir)
    if len(paths) != len(poses):
        raise InputError(f"{pb_path} has {len(poses)} poses but {img_dir} has {len(paths)} images; "
                         "they must match one to one (same sorted order)")
    H, W, f = poses[0, :, 4]
    frames = []
    for i, (p, P) in enumerate(zip(paths, poses)):
        c2w = np.eye(4)
        c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = P[:, 1], -P[:, 0], P[:, 2], P[:, 3]
        h_i, w_i, f_i = P[:, 4]
        mask = dynamic_mask_of(p) or dynamic_mask_of(full_dir / p.name)  # or beside the full-size photo
        frames.append(_Frame(image=p, c2w=_as_c2w(c2w, f"view {i} of {pb_path.name}"),
                             pinhole=_Pinhole(fx=f_i, fy=f_i, w=w_i, h=h_i), name=f"{img_dir.name}/{p.name}", **mask))
    train, test = _holdout(frames, hold_every)
    desc = f"every {hold_every}th image of {img_dir.name}"
    sources = {"train": f"{img_dir.name} minus every {hold_every}th image", "val": desc + " (val = test)", "test": desc}
    near_all, far_all = 0.9 * bds[:, 0], 1.1 * bds[:, 1]

    def bounds(_splits):
        pts = []
        for fr, n, fa in zip(frames, near_all, far_all):
            K = fr.pinhole.resolve(int(round(W)), int(round(H)), fr.name)
            hx, hy = K[2] / K[0], K[3] / K[1]  # tan of the half field of view
            for z in (n, fa):
                cam = np.array([[sx * hx * z, sy * hy * z, -z] for sx in (-1, 1) for sy in (-1, 1)])
                pts.append(cam @ fr.c2w[:3, :3].T + fr.c2w[:3, 3])
        pts = np.concatenate(pts)
        return pts.min(0), pts.max(0), float(near_all.min()), float(far_all.max())

    return _dataset(root.name, "llff", {"train": train, "val": test, "test": test}, sources, rest, background,
                    split_limit, root, bounds, requested_downscale=downscale)
