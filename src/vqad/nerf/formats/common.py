"""What every capture reader shares: scene bounds and normalisation, image and EXR decoding, frames → :class:`~vqad.nerf.data.Views`."""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from vqad.errors import InputError
from vqad.field import Normalization
from vqad.nerf.data import MASK_POLARITY, SceneDataset, Views
from vqad.nerf.lens import (BRANCH_MAX_DEG, DISTORTION_TOL_PX, LENS_COLUMNS, LENS_FISHEYE, LENS_OPENCV, MIN_PIXEL_RAD,
                            describe_lens, distortion_fit)
from vqad.nerf.rays import backproject, camera_directions, project, rays_for_pixels
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".exr")


# -- scene bounds ----------------------------------------------------------------------------------
def normalization_from_box(lo, hi) -> Normalization:
    """The cube normalisation that maps the world box ``[lo, hi]`` (``(3,)`` each) into [-1, 1]^3.

    ``center = (lo + hi) / 2``, ``scale = 2 / max(hi − lo)``: the box's longest side spans the cube.

    >>> normalization_from_box([-1.5] * 3, [1.5] * 3).scale
    0.6666666666666666
    """
    lo = np.asarray(lo, dtype=np.float64).reshape(3)
    hi = np.asarray(hi, dtype=np.float64).reshape(3)
    extent = float((hi - lo).max())
    if not np.all(np.isfinite(lo)) or not np.all(np.isfinite(hi)) or extent <= 0:
        raise InputError(f"the scene's bounding box is empty or not finite ({lo.tolist()} .. {hi.tolist()}); "
                         "check the poses and depth of the dataset")
    return Normalization(center=tuple(float(c) for c in (lo + hi) / 2), scale=2.0 / extent)


def unit_cube_box(norm: Normalization) -> tuple[torch.Tensor, torch.Tensor]:
    """The world-space box ``lo (3,), hi (3,)`` that ``norm`` maps onto [-1, 1]^3."""
    return norm.to_world(-torch.ones(3, dtype=torch.float64)), norm.to_world(torch.ones(3, dtype=torch.float64))


def near_far_from_box(c2w: torch.Tensor, lo, hi) -> tuple[float, float]:
    """Bounds on the z-depth of the world box ``[lo, hi]`` over all cameras ``c2w (N, 4, 4)``.

    z is linear in the point, so its extremes over the box are at corners: ``near`` is the smallest
    corner depth over all cameras (at least 0.1 % of the box diagonal, for cameras inside the box),
    ``far`` the largest.
    """
    lo = torch.as_tensor(lo, dtype=torch.float64).reshape(3)
    hi = torch.as_tensor(hi, dtype=torch.float64).reshape(3)
    sel = torch.tensor([[(c >> k) & 1 for k in range(3)] for c in range(8)], dtype=torch.float64)
    corners = lo + sel * (hi - lo)  # (8, 3)
    c2w = torch.as_tensor(c2w, dtype=torch.float64).reshape(-1, 4, 4)
    fwd = -c2w[:, :3, 2]  # (N, 3)
    fwd = fwd / fwd.norm(dim=-1, keepdim=True)
    z = torch.einsum("nck,nk->nc", corners[None] - c2w[:, None, :3, 3], fwd)  # (N, 8)
    eps = 1e-3 * float((hi - lo).norm())
    near = float(z.amin().clamp_min(eps))
    far = float(z.amax())
    return near, max(far, 2 * near)  # non-empty even if the box were behind every camera


# -- image I/O -------------------------------------------------------------------------------------
def srgb_to_linear(x: np.ndarray) -> np.ndarray:
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, None)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(x, 1 / 2.4) - 0.055)


def read_exr_channels(path: Path) -> dict[str, np.ndarray]:
    """All channels of an EXR file as ``(H, W) float32`` arrays, keyed by upper-case channel name
    without its layer prefix (``"default.R"`` → ``"R"``)."""
    try:
        import OpenEXR
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise InputError("reading EXR files needs the OpenEXR package: pip install openexr") from e
    try:
        with OpenEXR.File(str(path), separate_channels=True) as f:
            chans = {name.split(".")[-1].upper(): np.asarray(c.pixels, dtype=np.float32)
                     for name, c in f.channels().items()}
    except Exception as e:  # OpenEXR raises plain exceptions for unreadable files
        raise InputError(f"cannot read the EXR file {path}: {e}") from e
    if not chans:
        raise InputError(f"the EXR file {path} has no channels")
    return chans


def _read_rgba(path: Path) -> tuple[np.ndarray, bool]:
    """An image as ``(H, W, 4)``: ``uint8`` sRGB for PNG/JPEG, ``float32`` *linear* for EXR; and
    whether it had an alpha channel (otherwise alpha is opaque)."""
    if path.suffix.lower() == ".exr":
        ch = read_exr_channels(path)
        try:
            rgb = np.stack([ch["R"], ch["G"], ch["B"]], axis=-1)
        except KeyError:
            y = ch.get("Y")
            if y is None:
                raise InputError(f"the EXR image {path} has no R, G, B (or Y) channels: it has {sorted(ch)}")
            rgb = np.repeat(y[..., None], 3, axis=-1)
        alpha = ch.get("A")
        has_alpha = alpha is not None
        a = alpha if has_alpha else np.ones(rgb.shape[:2], np.float32)
        return np.concatenate([np.nan_to_num(rgb, nan=0.0, posinf=0.0, neginf=0.0), np.clip(a, 0, 1)[..., None]], -1), has_alpha
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode not in ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "La", "RGBa"):
                raise InputError(f"the image {path} is {im.mode!r} (16-bit or float pixels): only 8-bit images are "
                                 f"read; convert it to 8-bit PNG or JPEG (or to EXR for linear float data)")
            has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
            arr = np.asarray(im.convert("RGBA"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot read the image {path}: {e}") from e
    return arr, has_alpha


def _crop_to_multiple(a: np.ndarray, n: int) -> np.ndarray:
    h, w = a.shape[0] // n * n, a.shape[1] // n * n
    if h == 0 or w == 0:
        raise InputError(f"--downscale {n} is larger than the image ({a.shape[1]}×{a.shape[0]}): use a smaller factor")
    return a[:h, :w]


def _block_mean(a: np.ndarray, n: int) -> np.ndarray:
    """Area average of ``n × n`` blocks: ``(H, W, C) → (H/n, W/n, C)`` (H, W multiples of n)."""
    h, w = a.shape[0] // n, a.shape[1] // n
    return a.reshape(h, n, w, n, *a.shape[2:]).mean(axis=(1, 3))


def _block_all(a: np.ndarray, n: int) -> np.ndarray:
    """Whether every pixel of each ``n × n`` block is set: ``(H, W) bool → (H/n, W/n)`` (H, W multiples of n)."""
    return a.reshape(a.shape[0] // n, n, a.shape[1] // n, n).all(axis=(1, 3))


#: an even block's two middle depths are one surface, and averaged, when they are within this ratio of each
#: other (a slope at a grazing angle changes depth by a few % a pixel; a silhouette by more). The sorted
#: values cannot tell a slope along the pixel rows (tied pairs) from a silhouette under 15 % deep
SAME_SURFACE = 1.15


def downscale_depth(z: np.ndarray, n: int) -> np.ndarray:
    """``(H, W)`` z-depth (0 = no hit) → ``(H/n, W/n)``: the median of each block's valid samples where
    at least half are valid, else 0. An even count's two middle samples are averaged where they lie on one
    surface (within :data:`SAME_SURFACE`) and the nearer is kept where a silhouette falls between them: no
    pull toward the camera on a slope (the lower median alone read the generated room's depth ~1 % near at
    ``--downscale 2``, 3 % through a fisheye), and no blend across a silhouette deeper than 15 %."""
    if n == 1:
        return z
    h, w = z.shape[0] // n, z.shape[1] // n
    blocks = z.reshape(h, n, w, n).transpose(0, 2, 1, 3).reshape(h, w, n * n)
    valid = blocks > 0
    count = valid.sum(-1)
    srt = np.sort(np.where(valid, blocks, np.inf), axis=-1)

    lo = np.take_along_axis(srt, (np.maximum(count - 1, 0) // 2)[..., None], axis=-1)[..., 0]
    hi = np.take_along_axis(srt, np.minimum(count // 2, n * n - 1)[..., None], axis=-1)[..., 0]
    with np.errstate(invalid="ignore"):
        med = np.where((count % 2 == 0) & (hi <= SAME_SURFACE * lo), 0.5 * (lo + hi), lo)
    return np.where(2 * count >= n * n, med, 0.0).astype(np.float32)


def _image_to_srgb8(rgba: np.ndarray, n: int, background: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Downscale by ``n`` and composite on ``background``: ``(H, W, 4)`` → rgb ``(h, w, 3) uint8``,
    alpha ``(h, w) uint8``.

    8-bit images are sRGB with straight alpha, composited in sRGB as NeRF does
    (``rgb · a + bg · (1 − a)``); float (EXR) images are linear light, composited in linear light
    and then encoded as sRGB.
    """
    bg = np.asarray(background, dtype=np.float32)
    rgba = _crop_to_multiple(rgba, n)
    if rgba.dtype == np.uint8:
        if n > 1:
            from PIL import Image

            rgba = np.asarray(Image.fromarray(rgba, "RGBA").reduce(n))  # premultiplied box average
        f = rgba.astype(np.float32) / 255.0
        a = f[..., 3:4]
        rgb = f[..., :3] * a + bg * (1 - a)
    else:
        a = rgba[..., 3:4]
        prem = np.concatenate([rgba[..., :3] * a, a], -1)
        if n > 1:
            prem = _block_mean(prem, n)
        a = prem[..., 3:4]
        rgb = linear_to_srgb(prem[..., :3] + srgb_to_linear(bg) * (1 - a))
    rgb8 = np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
    a8 = np.clip(np.rint(a[..., 0] * 255.0), 0, 255).astype(np.uint8)
    return rgb8, a8


def inside_capture(root: Path, base: Path, file_path: str, what: str, key: str) -> Path:
    """``base / file_path``, refused where it names a place outside the capture folder ``root`` (an
    absolute path, or ``..`` climbing out of it): a capture's files say which files vqad reads, and
    they must not reach the rest of the machine. The test is on the path as written, so a symbolic
    link inside the capture (an images folder linked from elsewhere) is followed as the user set it up."""
    root_abs = Path(os.path.abspath(root))
    p = Path(os.path.normpath(os.path.join(os.path.abspath(base), file_path)))
    if Path(file_path).is_absolute() or (p != root_abs and root_abs not in p.parents):
        raise InputError(f"{what}: {key} {file_path!r} points outside the capture folder {root_abs}; vqad reads only "
                         f"files inside it: move (or link) the file into it and give a path relative to it")
    return p


def named_file(path: Path, what: str, key: str, rel: str) -> Path:
    """``path``, the file a capture's ``key`` names as ``rel``, when it is a regular file; else an InputError
    that says what is there instead (nothing, a folder or a device, or a name the system refuses)."""
    try:
        if path.is_file():
            return path
        why = "is not a regular file" if path.exists() else "not found"
    except OSError as e:  # a name too long for the file system, a loop of links...
        why = f"cannot be looked up ({e.strerror or e})"
    raise InputError(f"{what}: {key} {rel[:200]!r} {why} at {str(path)[:300]}: restore it or remove the key")


def _resolve_image(base: Path, file_path: str, what: str, root: Path | None = None, key: str = "file_path") -> Path:
    """``base / file_path`` inside the capture folder ``root`` (default ``base``; :func:`inside_capture`),
    trying the usual extensions when it has none or does not exist."""
    p = inside_capture(base if root is None else root, base, file_path, what, key)
    if p.is_file():
        return p
    for ext in IMAGE_EXTS + tuple(e.upper() for e in IMAGE_EXTS):
        q = p.with_name(p.name + ext)
        if q.is_file():
            return q
    raise InputError(f"image not found: {p} ({what}); check the file_path entries or restore the missing images")


# -- poses and intrinsics --------------------------------------------------------------------------
#: the most fx / fy (or fy / fx) a camera may have: anamorphic lenses squeeze 2×; more is a broken camera file
MAX_PIXEL_ASPECT = 4.0


@dataclass
class _Pinhole:
    """Intrinsics as a file gives them, for a reference image size (None = the image's own)."""

    fx: float | None = None
    fy: float | None = None
    cx: float | None = None
    cy: float | None = None
    w: float | None = None
    h: float | None = None
    angle_x: float | None = None
    angle_y: float | None = None

    def resolve(self, img_w: int, img_h: int, what: str) -> np.ndarray:
        """``fx, fy, cx, cy`` in pixels of an image of ``img_w × img_h``."""
        w = float(self.w) if self.w else float(img_w)
        h = float(self.h) if self.h else float(img_h)
        for name, angle in (("camera_angle_x", self.angle_x), ("camera_angle_y", self.angle_y)):
            if angle is not None and not 0 < angle < math.pi:
                raise InputError(f"{what}: {name} = {angle:g} is not a field of view in radians (0 to π): the camera "
                                 f"file gives it in radians" + (f" ({angle:g}° is {math.radians(angle):.4g})"
                                                                if 0 < angle < 180 else ""))
        fx = self.fx if self.fx else (0.5 * w / math.tan(0.5 * self.angle_x) if self.angle_x else None)
        fy = self.fy if self.fy else (0.5 * h / math.tan(0.5 * self.angle_y) if self.angle_y else fx)
        if fx is None:
            raise InputError(f"no focal length for {what}: its camera file gives none (or 0); transforms.json gives "
                             "fl_x (or camera_angle_x), poses_bounds.npy each image's focal, COLMAP its camera's")
        cx = float(self.cx) if self.cx is not None else w / 2
        cy = float(self.cy) if self.cy is not None else h / 2
        sx, sy = img_w / w, img_h / h
        if abs(sx / sy - 1) > 0.02:
            raise InputError(f"{what}: the image is {img_w}×{img_h} but its intrinsics are for {w:g}×{h:g} "
                             "(a different aspect ratio); use images that match the camera file")
        out = np.array([fx * sx, fy * sy, cx * sx, cy * sy], dtype=np.float64)
        if not np.all(np.isfinite(out)) or out[0] <= 0 or out[1] <= 0:
            raise InputError(f"invalid intrinsics for {what}: fx, fy, cx, cy = {out.tolist()} (focal lengths must be "
                             "positive pixels: check the camera file)")
        if not 1 / MAX_PIXEL_ASPECT <= out[0] / out[1] <= MAX_PIXEL_ASPECT:
            raise InputError(f"invalid intrinsics for {what}: fx = {out[0]:.6g} and fy = {out[1]:.6g} pixels differ "
                             f"more than {MAX_PIXEL_ASPECT:g}× (a camera's pixels are near square): check the camera "
                             "file's focal lengths")
        return out


@dataclass
class _Frame:
    image: Path
    c2w: np.ndarray  # (4, 4) OpenGL
    pinhole: _Pinhole
    name: str
    distortion: np.ndarray | None = None  # (9,) a lens row (vqad.nerf.lens.LENS_COLUMNS); None: a pinhole
    depth: Path | None = None  # a depth map: RTMV's EXR, or a transforms.json's depth_file_path (PNG, EXR, .npy)
    depth_kind: str = "ray"  # what the depth map holds: "ray" distance or "z"-depth
    depth_scale: float = 1.0  # world units per stored unit (nerfstudio's depth_unit_scale_factor)
    depth_invalid_at: float = math.inf  # stored values from this one up mean "no hit" (RTMV's sentinel)
    loss_mask: Path | None = None  # which pixels to train on (nerfstudio's mask_path, instant-ngp's dynamic_mask_*)
    loss_mask_keeps: bool = True  # the mask's non-zero pixels are kept (nerfstudio) or left out (instant-ngp)


def _as_c2w(m, what: str, rigid: bool = True) -> np.ndarray:
    """A ``(4, 4)`` float64 pose from a 3×4 / 4×4 nested list; refuses non-finite or singular ones and,
    when ``rigid``, any that is not a rotation and a translation (last row ``0 0 0 1``, ``RᵀR = I`` within
    :data:`POSE_ORTHO_TOL`, ``det R > 0``)."""
    try:
        a = np.asarray(m, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InputError(f"{what}: the pose is not a numeric matrix") from e
    if a.shape == (3, 4):
        a = np.concatenate([a, [[0.0, 0.0, 0.0, 1.0]]])
    if a.shape != (4, 4):
        raise InputError(f"{what}: the pose must be a 4×4 (or 3×4) matrix, not {list(a.shape)}")
    if not np.all(np.isfinite(a)):
        raise InputError(f"{what}: the pose has non-finite values (NaN or inf); fix or drop that frame")
    if abs(np.linalg.det(a[:3, :3])) < 1e-6:
        raise InputError(f"{what}: the pose's rotation is singular; fix or drop that frame")
    if not rigid:
        return a
    if np.abs(a[3] - [0.0, 0.0, 0.0, 1.0]).max() > 1e-6:
        raise InputError(f"{what}: the pose's last row is {a[3].tolist()}, not [0, 0, 0, 1]: a camera pose is rigid")
    r = a[:3, :3]
    off = np.abs(r.T @ r - np.eye(3)).max()
    if off > POSE_ORTHO_TOL or np.linalg.det(r) < 0:
        kind = "a mirror (det < 0)" if np.linalg.det(r) < 0 else f"scaled or sheared (RᵀR is {off:.3g} from I)"
        raise InputError(f"{what}: the pose's rotation is {kind}: a camera pose must be a rotation and a "
                         f"translation; fix or drop that frame")
    return a


POSE_ORTHO_TOL = 1e-3  # how far RᵀR of a pose may be from I (poses in text files carry ~7 digits)


def _limit(frames: list, split: str, split_limit) -> list:
    if split_limit is None:
        return frames
    n = split_limit.get(split) if isinstance(split_limit, Mapping) else split_limit
    if n is None:
        return frames
    if int(n) < 1:
        raise InputError(f"split_limit must be >= 1 (got {n} for {split!r})")
    return frames[: int(n)]


def _load_views(frames: list[_Frame], downscale: int, background, split: str, source: Path) -> Views:
    """Read, downscale and composite a split's images (and depth, and loss masks) into a :class:`Views`;
    ``split`` names it in messages (``'val' and 'test'`` for splits that share their frames)."""
    if not frames:
        raise InputError(f"the {split} split of {source} has no views")
    images, alphas, depths, intr, poses, names, dists, keeps, blank = [], [], [], [], [], [], [], [], []
    block = 1  # the largest block of mask pixels one view's pixel needs all of (--downscale, a larger mask)
    any_alpha = False
    size = None
    first = None
    for fr in frames:
        rgba, has_alpha = _read_rgba(fr.image)
        any_alpha |= has_alpha
        H, W = rgba.shape[:2]
        if size is None:
            size, first = (W, H), fr.image
        elif (W, H) != size:
            raise InputError(f"images of different sizes in the {split} split: {first} is {size[0]}×{size[1]}, "
                             f"{fr.image} is {W}×{H}; resize them to one size")
        K = fr.pinhole.resolve(W, H, str(fr.image)) / downscale
        rgb8, a8 = _image_to_srgb8(rgba, downscale, background)
        images.append(rgb8)
        alphas.append(a8)
        keep, kept_before, factor = (_read_loss_mask(fr, rgba.shape[:2], downscale) if fr.loss_mask is not None
                                     else (None, True, 1))
        keeps.append(keep)
        block = max(block, factor * downscale)
        if not kept_before:
            blank.append(fr.name)
        if keep is not None:  # a left-out pixel is no evidence: not of empty space (carving), not of depth
            a8[~keep] = 255
        if fr.depth is not None:
            z = _read_depth(fr, rgba.shape[:2], K * downscale, downscale, fr.distortion)
            depths.append(z if keep is None else np.where(keep, z, 0.0).astype(z.dtype))
        intr.append(K)
        poses.append(fr.c2w)
        names.append(fr.name)
        dists.append(fr.distortion)
    if depths and len(depths) != len(frames):
        raise InputError(f"some views of the {split} split of {source} have depth and others do not; "
                         "give every view a depth map or none")
    empty = [names[i] for i, z in enumerate(depths) if not (z > 0).any()  # a view its mask empties: said below
             and (keeps[i] is None or keeps[i].any())]
    if empty:  # NaN, negative or 0 everywhere: the view trains, but gives the octree and the depth loss nothing
        warnings.warn(f"{len(empty)} of the {split} views' depth maps hold no valid depth ({', '.join(empty[:3])}"
                      f"{', ...' if len(empty) > 3 else ''}): those views give no depth", stacklevel=2)
    emptied = [names[i] for i, k in enumerate(keeps) if k is not None and not k.any() and names[i] not in blank]
    for which, why in ((blank, MASK_POLARITY),
                       (emptied, f"a pixel is kept only where its whole block of mask pixels is (up to {block}×"
                                 f"{block} here: --downscale {downscale}, and masks larger than their photos); a "
                                 f"smaller --downscale keeps more")):
        if which:
            warnings.warn(f"{len(which)} of the {split} views' masks leave out every pixel ({', '.join(which[:3])}"
                          f"{', ...' if len(which) > 3 else ''}): those views give nothing; {why}", stacklevel=2)
    has_dist = any(d is not None for d in dists)
    h, w = images[0].shape[:2]
    return Views(
        images=torch.from_numpy(np.stack(images)),
        c2w=torch.from_numpy(np.stack(poses)).float(),
        intrinsics=torch.from_numpy(np.stack(intr)).float(),
        masks=torch.from_numpy(np.stack(alphas)) if any_alpha else None,
        depth=_depth_tensor(np.stack(depths)) if depths else None,
        distortion=torch.from_numpy(np.stack([d if d is not None else np.zeros(9) for d in dists])).float() if has_dist else None,
        names=names,
        valid=(torch.from_numpy(np.stack([k if k is not None else np.ones((h, w), bool) for k in keeps]))
               if any(k is not None and not k.all() for k in keeps) else None),  # masks that keep every pixel: None
    )


#: depths float16 holds to ~0.05 % (its normal range); a capture with others is kept in float32
FLOAT16_DEPTH_RANGE = (6.2e-5, 65000.0)


def _depth_tensor(z: np.ndarray) -> torch.Tensor:
    """Depth maps ``(N, H, W)`` as stored: float16 (half the memory) where every depth fits its normal
    range, else float32 (poses in millimetres, or in micro-units: float16 would overflow or round)."""
    valid = z[z > 0]
    fits = valid.size == 0 or (valid.min() >= FLOAT16_DEPTH_RANGE[0] and valid.max() <= FLOAT16_DEPTH_RANGE[1])
    return torch.from_numpy(z).to(torch.float16 if fits else torch.float32)


# -- blender and instant-ngp (transforms json) -----------------------------------------------------
_PINHOLE_KEYS = ("fl_x", "fl_y", "cx", "cy", "w", "h", "camera_angle_x", "camera_angle_y")
_DIST_KEYS = ("k1", "k2", "k3", "k4", "p1", "p2")
#: a transforms.json's camera models (instant-ngp's ``is_fisheye``, nerfstudio's ``camera_model``)
_TRANSFORMS_PINHOLE_MODELS = ("OPENCV", "PINHOLE", "SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL")
_TRANSFORMS_FISHEYE_MODELS = ("OPENCV_FISHEYE",)


def lens_row(model: int, **coefficients: float) -> np.ndarray | None:
    """A ``(9,)`` lens row (:data:`vqad.nerf.lens.LENS_COLUMNS`) from named coefficients, or None for a
    plain pinhole (the OpenCV model with every coefficient zero)."""
    row = np.zeros(len(LENS_COLUMNS))
    row[0] = model
    for k, v in coefficients.items():
        row[LENS_COLUMNS.index(k)] = float(v or 0.0)
    return None if model == LENS_OPENCV and not np.any(row[1:]) else row


def _lens_model_of(keys: dict, what: str) -> bool | None:
    """Whether one level of a ``transforms.json`` (the file's keys, or a frame's own) says fisheye: its
    ``camera_model`` and ``is_fisheye``, which must agree; None where it says neither."""
    model, fisheye = keys.get("camera_model"), keys.get("is_fisheye")
    if model is not None and not isinstance(model, str):
        raise InputError(f"{what}: camera_model must be a name such as OPENCV or OPENCV_FISHEYE, not {model!r}")
    if fisheye is not None and not isinstance(fisheye, bool):
        raise InputError(f"{what}: is_fisheye must be true or false, not {fisheye!r}")
    if model is not None and model.upper() not in _TRANSFORMS_PINHOLE_MODELS + _TRANSFORMS_FISHEYE_MODELS:
        raise InputError(f"{what}: camera_model {model!r} is not supported (pinhole models "
                         f"{', '.join(_TRANSFORMS_PINHOLE_MODELS)} and OPENCV_FISHEYE are); undistort the images "
                         f"to a pinhole camera first")
    says = None if model is None else model.upper() in _TRANSFORMS_FISHEYE_MODELS
    if says is not None and fisheye is not None and says != fisheye:
        raise InputError(f"{what}: camera_model {model!r} and is_fisheye {str(fisheye).lower()} contradict each other; "
                         f"keep the one that is right")
    return says if says is not None else fisheye


def _transforms_lens(frame: dict, meta: dict, file_fisheye: bool | None, what: str) -> np.ndarray | None:
    """A frame's lens from a ``transforms.json``: instant-ngp's ``is_fisheye`` or nerfstudio's
    ``camera_model: OPENCV_FISHEYE`` give OpenCV's fisheye with ``k1..k4``; otherwise OpenCV's ``k1, k2,
    k3, p1, p2`` (a ``k4`` there has no one meaning: refused). A frame's own model keys decide over the
    file's (``file_fisheye``: :func:`_lens_model_of` the file), and so does each of its coefficients."""
    own = _lens_model_of(frame, what)
    fisheye = own if own is not None else file_fisheye
    k = {key: frame.get(key, meta.get(key)) for key in _DIST_KEYS}
    if fisheye:
        if k["p1"] or k["p2"]:
            raise InputError(f"{what}: a fisheye camera has no tangential terms, but p1, p2 = {k['p1']}, {k['p2']}; "
                             f"check the camera model")
        return lens_row(LENS_FISHEYE, k1=k["k1"], k2=k["k2"], k3=k["k3"], k4=k["k4"])
    if k["k4"]:
        raise InputError(f"{what}: k4 = {k['k4']} on a pinhole camera has no one meaning (OpenCV's rational term or "
                         f"a radial r⁸ term); undistort the images first, or give k4 = 0")
    return lens_row(LENS_OPENCV, k1=k["k1"], k2=k["k2"], k3=k["k3"], p1=k["p1"], p2=k["p2"])


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            meta = json.load(f)
    except RecursionError as e:
        raise InputError(f"{path} is not valid JSON for a capture (nested too deeply); fix or regenerate it") from e
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not valid JSON (not UTF-8 text: {e.reason} at byte {e.start}); "
                         f"fix or regenerate it") from e
    except ValueError as e:  # JSONDecodeError, and an integer of over 4,300 digits
        raise InputError(f"{path} is not valid JSON ({e}); fix or regenerate it") from e
    except OSError as e:
        raise InputError(f"cannot read {path}: {e}") from e
    if not isinstance(meta, dict):
        raise InputError(f"{path} must hold a JSON object")
    return meta


def _json_numbers(v, depth: int) -> bool:
    """Whether a JSON value is numbers (not booleans, not strings) nested in lists ``depth`` deep."""
    if depth == 0:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return isinstance(v, list) and all(_json_numbers(x, depth - 1) for x in v)


def _transforms_frames(meta: dict, base: Path, json_path: Path) -> list[_Frame]:
    """Frames of a NeRF / instant-ngp ``transforms*.json`` (global keys, overridable per frame)."""
    frames = meta.get("frames")
    if not isinstance(frames, list) or not frames:
        raise InputError(f"{json_path} has no frames: it needs a non-empty 'frames' list")
    out = []
    seen: dict[str, int] = {}
    depth_scale = _depth_scale(meta, json_path)
    file_fisheye = _lens_model_of(meta, f"{json_path} (the file's keys)")  # checked even where every frame has its own
    for i, fr in enumerate(frames):
        what = f"frame {i} of {json_path.name}"
        if not isinstance(fr, dict) or "file_path" not in fr or "transform_matrix" not in fr:
            raise InputError(f"{what} needs 'file_path' and 'transform_matrix'")
        get = lambda k: fr.get(k, meta.get(k))  # noqa: E731 - per-frame keys override global ones
        for k in _PINHOLE_KEYS + _DIST_KEYS:
            v = get(k)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise InputError(f"{what}: {k} must be a finite number, not {v!r}")
            if v <= 0 and k in ("fl_x", "fl_y", "w", "h"):
                raise InputError(f"{what}: {k} must be positive, not {v!r}")
        lens = _transforms_lens(fr, meta, file_fisheye, what)
        vals = {k: get(k) for k in _PINHOLE_KEYS}
        pin = _Pinhole(fx=vals["fl_x"], fy=vals["fl_y"], cx=vals["cx"], cy=vals["cy"], w=vals["w"], h=vals["h"],
                       angle_x=vals["camera_angle_x"], angle_y=vals["camera_angle_y"])
        if not pin.fx and not pin.angle_x:
            raise InputError(f"{what}: no focal length: give fl_x or camera_angle_x")
        path = _resolve_image(base, str(fr["file_path"]), what)
        if str(path) in seen:  # one photo twice: two poses for it, or a held-out view that is also trained on
            raise InputError(f"{what} and frame {seen[str(path)]} are both {fr['file_path']!r}: each image once, please")
        seen[str(path)] = i
        if not _json_numbers(fr["transform_matrix"], depth=2):
            raise InputError(f"{what}: transform_matrix must be a 4×4 (or 3×4) list of lists of numbers, not "
                             f"{str(fr['transform_matrix'])[:60]}")
        out.append(_Frame(image=path, c2w=_as_c2w(fr["transform_matrix"], what), pinhole=pin,
                          name=str(fr["file_path"]), distortion=lens, depth=_depth_path(fr, base, what),
                          depth_kind="z", depth_scale=depth_scale, **_loss_mask_of(fr.get("mask_path"), base, path, what)))
    with_mask = sum(isinstance(fr, dict) and fr.get("mask_path") is not None for fr in frames)
    if 0 < with_mask < len(out):  # as nerfstudio: a frame without one is a typo more often than a choice
        raise InputError(f"{json_path}: {with_mask} of its {len(out)} frames name a mask_path: give every frame a mask "
                         f"(one that keeps every pixel where nothing is to be left out) or none")
    if meta.get("mask_path") is not None:
        raise InputError(f"{json_path}: mask_path is a frame's key (each photo has its own mask), not the file's: "
                         f"move it into the frames")
    with_depth = sum(f.depth is not None for f in out)
    if 0 < with_depth < len(out):  # held-out views with depth and training views without (or the reverse) mislead
        raise InputError(f"{json_path}: {with_depth} of its {len(out)} frames name a depth_file_path: give every frame "
                         f"a depth map or none")
    return out


#: world units per stored depth unit when a transforms.json does not say (nerfstudio's default: millimetres)
DEPTH_UNIT_SCALE = 1e-3


def _depth_scale(meta: dict, json_path: Path) -> float:
    """A transforms.json's ``depth_unit_scale_factor`` (world units per stored depth unit), default
    :data:`DEPTH_UNIT_SCALE`."""
    v = meta.get("depth_unit_scale_factor", DEPTH_UNIT_SCALE)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
        raise InputError(f"{json_path}: depth_unit_scale_factor must be a positive number, not {v!r}")
    return float(v)


def _depth_path(fr: dict, base: Path, what: str) -> Path | None:
    """A frame's ``depth_file_path`` (nerfstudio: a z-depth map, 16-bit PNG in millimetres by default), or None."""
    rel = fr.get("depth_file_path")
    if rel is None:
        return None
    if not isinstance(rel, str) or not rel:
        raise InputError(f"{what}: depth_file_path must be a path, not {rel!r}")
    return named_file(inside_capture(base, base, rel, what, "depth_file_path"), what, "depth_file_path", rel)


DYNAMIC_MASK_PREFIX = "dynamic_mask_"  #: instant-ngp's loss masks: ``dynamic_mask_<image stem>.png`` beside the image


def dynamic_mask_of(image: Path) -> dict:
    """An image's instant-ngp loss mask (``colmap2nerf --mask_categories``: a non-zero colour = leave the pixel
    out) as :class:`_Frame` fields, where the file is there (any capture format: the images' folder is the same)."""
    dynamic = image.parent / f"{DYNAMIC_MASK_PREFIX}{image.stem}.png"
    return {"loss_mask": dynamic, "loss_mask_keeps": False} if dynamic.is_file() else {}


def _loss_mask_of(rel, base: Path, image: Path, what: str, key: str = "mask_path") -> dict:
    """A frame's loss mask as :class:`_Frame` fields: the mask ``rel`` names (nerfstudio's ``mask_path``, or
    None: none; non-zero = train on the pixel; ``key`` names it in messages), or else instant-ngp's
    ``dynamic_mask_<image stem>.png`` beside the image (:func:`dynamic_mask_of`); both at once are refused."""
    dynamic = dynamic_mask_of(image)
    if rel is None:
        return dynamic
    if not isinstance(rel, str) or not rel:
        raise InputError(f"{what}: {key} must be a path, not {rel!r}")
    path = named_file(inside_capture(base, base, rel, what, key), what, key, rel)
    if dynamic and os.path.abspath(path) == os.path.abspath(dynamic["loss_mask"]):
        raise InputError(f"{what}: {key} {rel} is instant-ngp's dynamic mask of its photo, which means the opposite "
                         f"(white = leave the pixel out): give a mask where white = train on the pixel, or remove "
                         f"the {key} and let the dynamic mask be read as such")
    if dynamic:
        raise InputError(f"{what} has both {key} {rel} (white = train on the pixel) and {dynamic['loss_mask'].name} "
                         f"(instant-ngp's: white = leave the pixel out), which mean opposite things: keep one")
    return {"loss_mask": path, "loss_mask_keeps": True}


def fits_image(w: int, h: int, hw: tuple[int, int]) -> bool:
    """Whether a ``w × h`` per-pixel map (a depth map, a mask) can stand for an image of ``hw = (H, W)``: its
    size, or smaller with its aspect ratio (within 2 %; a phone's depth sensor is coarser than its camera)."""
    return h <= hw[0] and w <= hw[1] and abs((w / h) / (hw[1] / hw[0]) - 1) <= 0.02


def nearest_to(a: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """A map ``(h, w)`` resized to ``hw = (H, W)`` by nearest neighbour, each pixel's centre sampled (as
    nerfstudio resizes depth and masks)."""
    h, w = a.shape[:2]
    if (h, w) == tuple(hw):
        return a
    rows = ((np.arange(hw[0]) + 0.5) * h / hw[0]).astype(np.int64)
    cols = ((np.arange(hw[1]) + 0.5) * w / hw[1]).astype(np.int64)
    return a[rows][:, cols]


#: how many times larger (per side) than its photo a loss mask may be: the full-size photos' mask of an LLFF
#: ``images_8`` or nerfstudio ``images_8`` copy
MAX_MASK_FACTOR = 16

#: image formats whose compression alters pixel values: a mask in one is "on" from 128 up, not from 1
LOSSY_MASK_FORMATS = ("JPEG", "MPO", "JPEG2000", "WEBP")


def mask_factor(w: int, h: int, hw: tuple[int, int]) -> int:
    """How many times larger per side a ``w × h`` mask is than its image ``hw = (H, W)``: a whole ``f`` in
    2..:data:`MAX_MASK_FACTOR` where ``w, h`` are within ``f`` pixels of ``f·W, f·H`` (a downscaled copy's
    size is rounded: mip-NeRF 360's bicycle is 4946 px wide, its images_4 1237), else 1 (its size or smaller)
    or 0 (neither)."""
    if fits_image(w, h, hw):
        return 1
    f = round(w / hw[1])
    return f if 2 <= f <= MAX_MASK_FACTOR and abs(w - f * hw[1]) < f and abs(h - f * hw[0]) < f else 0


def _read_loss_mask(fr: _Frame, hw: tuple[int, int], n: int) -> tuple[np.ndarray, bool, int]:
    """A frame's loss mask → ``(H/n, W/n) bool``, True = train on and score the pixel, whether the mask
    kept any pixel before it was reduced, and how many times larger than the photo it was (:func:`mask_factor`).

    A pixel is "on" where its value is non-zero (at least 128 in a lossy format, whose noise lifts black;
    :data:`LOSSY_MASK_FORMATS`): a grey mask's value; a colour mask's brightest channel (as instant-ngp reads
    its dynamic masks); a palette mask's index for a ``mask_path`` (as nerfstudio reads it) and its colour
    for a dynamic mask. A mask whose alpha varies where its colour does not is refused (which would be the
    mask?). A mask smaller than its image is resized to it by nearest neighbour; one a whole factor f larger
    (the full-size photos' mask of a downscaled copy; cropped or edge-padded to ``f·H × f·W`` first) and a
    downscaled pixel are kept only where every pixel of its block is (a block's average colour mixes in
    whatever a left-out pixel shows)."""
    from PIL import Image, UnidentifiedImageError

    path = fr.loss_mask
    try:
        with Image.open(path) as im:
            w, h = im.size  # from the header: a mask too large is refused before it is decoded
            f = mask_factor(w, h, hw)
            if not f:
                raise InputError(f"the mask {path} is {w}×{h} but its image {fr.image.name} is {hw[1]}×{hw[0]}: a "
                                 f"mask must be the image's size, smaller with its aspect ratio, or a whole factor "
                                 f"(2..{MAX_MASK_FACTOR}) larger")
            lossy = im.format in LOSSY_MASK_FORMATS
            if im.mode in ("1", "L", "I", "F") or im.mode.startswith("I;16") or (im.mode == "P" and fr.loss_mask_keeps):
                values = np.asarray(im)  # its own type: no float copy of a large mask
            else:  # RGB, RGBA, LA, CMYK, a dynamic mask's palette...: its colour
                rgba = np.asarray(im.convert("RGBA"))
                values = rgba[..., :3].max(axis=-1)
                if np.ptp(rgba[..., 3]) > 0 and np.ptp(values) == 0:
                    raise InputError(f"the mask {path} is one colour with a varying alpha channel: vqad reads a mask's "
                                     f"colour (nerfstudio wants one grey channel); save the mask as a grey image")
    except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot read the mask {path}: {e}") from e
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise InputError(f"the mask {path} has values that are not numbers (NaN or infinity): a mask is 0 or not")
    if lossy and 0 < values.max() < 128:
        raise InputError(f"the mask {path} is a {im.format} image (a format that may be lossy, read from 128 up) whose "
                         f"values stay below 128 (a mask of 0 and 1?): save the mask as PNG, 0 and 255")
    on = values >= 128 if lossy else values != 0
    keep = on if fr.loss_mask_keeps else ~on
    any_kept = bool(keep.any())
    if f >= 2:  # to f·H × f·W (a rounded copy's size: crop, or repeat the last rows and columns), then blocks
        keep = _block_all(np.pad(keep[:f * hw[0], :f * hw[1]], ((0, max(0, f * hw[0] - h)), (0, max(0, f * hw[1] - w))),
                                 mode="edge"), f)
    else:
        keep = nearest_to(keep, hw)
    return _block_all(_crop_to_multiple(keep, n), n), any_kept, f


#: the readers hold out every this-many-th frame (0, 8, 16, ...) of a capture without splits, for test and val
HOLD_EVERY = 8


def _holdout(frames: list, every: int = HOLD_EVERY) -> tuple[list, list]:
    """``(train, test)``: every ``every``-th item (0, 8, 16, ...) is held out."""
    test = [f for i, f in enumerate(frames) if i % every == 0]
    train = [f for i, f in enumerate(frames) if i % every != 0]
    return train, test


def _dataset(name, fmt, split_frames: dict[str, list[_Frame]], sources: dict[str, str], downscale, background,
             split_limit, source: Path, bounds_fn, requested_downscale: int | None = None,
             outer_scale: float = 1.0, points=None) -> SceneDataset:
    """Load every distinct split once (a split that falls back to another shares its Views).

    ``bounds_fn(splits) -> (lo (3,), hi (3,), near | None, far | None)`` gives the world box that
    becomes the unit cube (and near/far, else they are derived from the box, grown by ``outer_scale``
    around its centre: the scene's outer box).
    """
    loaded: dict[tuple[int, int], Views] = {}
    splits: dict[str, Views] = {}
    for split, frames in split_frames.items():
        kept = _limit(frames, split, split_limit)
        key = (id(frames), len(kept))
        if key not in loaded:
            label = " and ".join(repr(s) for s, f in split_frames.items() if f is frames)  # 'val' and 'test'
            loaded[key] = _load_views(kept, downscale, background, label, source)
        splits[split] = loaded[key]
    lo, hi, near, far = bounds_fn(splits)
    norm = normalization_from_box(lo, hi)
    if near is None:
        outer = Normalization(norm.center, norm.scale / outer_scale)
        near, far = near_far_from_box(torch.cat([v.c2w for v in splits.values()]), *unit_cube_box(outer))
    if not (math.isfinite(near) and math.isfinite(far) and 0 <= near < far):
        raise InputError(f"{source}: the scene's depth range is empty or not finite (near {near:g}, far {far:g}): "
                         f"check the poses and the scene's scale (instant-ngp 'scale' / 'offset', COLMAP's units)")
    for split, views in {id(v): (s, v) for s, v in reversed(splits.items())}.values():  # a shared split once
        _check_views(views, split, source, norm, outer_scale)
    seen = box_coverage(splits.get("train", next(iter(splits.values()))), norm, outer_scale)
    if seen < MIN_BOX_COVERAGE:
        fix = {"ngp": "set aabb_scale (and scale / offset) in transforms.json as instant-ngp would need them",
               "blender": "the NeRF-synthetic box is [-1.5, 1.5]³: is this a blender capture?"}.get(
                   fmt, "check the poses and the scene's scale")
        warnings.warn(f"{source}: the scene box covers {seen:.1%} of the training pixels (its rays miss it): the scene "
                      f"is larger than the box or elsewhere, and a fit would learn little; {fix}", stacklevel=2)
    wrong = depth_units_check(splits.get("train", next(iter(splits.values()))))
    if wrong is not None:
        warnings.warn(f"{source}: {wrong}", stacklevel=2)
    return SceneDataset(name=name, format=fmt, splits=splits, normalization=norm, near=float(near), far=float(far),
                        background=tuple(float(c) for c in background), source=str(source),
                        downscale=int(requested_downscale or downscale),
                        split_sources=sources, bbox=(tuple(float(x) for x in lo), tuple(float(x) for x in hi)),
                        outer_scale=float(outer_scale),
                        points=None if points is None else torch.as_tensor(points, dtype=torch.float32).reshape(-1, 3))


CAMERA_BOX_HALF = 0.375  #: a camera box's half extent / the cameras' mean distance to its centre (colmap2nerf: 1.5 / 4)
CAMERA_BOX_OUTER = 16.0  #: how far the scene extends around a camera box, contracted (instant-ngp's aabb_scale 16)


def attention_center(c2w: np.ndarray) -> np.ndarray:
    """The point nearest to every optical axis in least squares: ``(N, 4, 4)`` OpenGL poses → ``(3,)``.

    ``Σ (I − a aᵀ) p = Σ (I − a aᵀ) o`` for axes ``o + s a``; the cameras' mean when the axes are parallel.
    """
    o, a = c2w[:, :3, 3], -c2w[:, :3, 2]
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    P = np.eye(3)[None] - a[:, :, None] * a[:, None, :]
    M, b = P.sum(0), np.einsum("nij,nj->i", P, o)
    if np.linalg.cond(M) > 1e8:
        return o.mean(0)
    return np.linalg.solve(M, b)


#: a camera counts as looking at the cameras' common point when it lies within this angle of its axis
LOOKS_AT_DEG = 60.0
#: the share of the cameras that must look at their common point for the box to be centred there
LOOKING_SHARE = 0.75
#: how far the common point may lie, in the cameras' own spread: nearly parallel axes (a forward-facing
#: row, tilted by a degree or two) "meet" a hundred spreads away, where no scene is
MAX_ATTENTION_DISTANCE = 10.0
#: the percentiles of the scene's points (sparse points, depth) whose box is the central box otherwise
POINTS_BOX_PERCENTILES = (5.0, 95.0)


def capture_box(poses, what: str, points=None) -> tuple[np.ndarray, float, str]:
    """The scene box of a capture whose units say nothing (COLMAP's, nerfstudio's).

    Where the cameras look at a common point (an object or room captured around its middle: at least
    :data:`LOOKING_SHARE` of them within :data:`LOOKS_AT_DEG` of their axis, the point at most
    :data:`MAX_ATTENTION_DISTANCE` times the cameras' spread away): centred on the point nearest to
    every optical axis (:func:`attention_center`, instant-ngp's ``colmap2nerf`` rule), half extent
    :data:`CAMERA_BOX_HALF` × the cameras' mean distance to it. Elsewhere (a forward-facing or inside-out
    capture, whose axes meet nowhere in front of them) the :data:`POINTS_BOX_PERCENTILES` box of the scene's
    ``points`` (sparse points, back-projected depth) when it has them; without them the capture is refused
    with what to give it. The scene extends, contracted, to :data:`CAMERA_BOX_OUTER` times the box.

    Args:
        poses: ``(N, 4, 4)`` OpenGL camera-to-world; what: the capture, for messages; points: ``(P, 3)``
            world points or None.
    Returns:
        the centre ``(3,)``, the half extent and what placed it (``"cameras"`` or ``"points"``); the outer
        scale is :data:`CAMERA_BOX_OUTER`.
    """
    poses = np.stack(poses) if isinstance(poses, (list, tuple)) else np.asarray(poses)
    o, axis = poses[:, :3, 3], -poses[:, :3, 2] / np.linalg.norm(poses[:, :3, 2], axis=-1, keepdims=True)
    center = attention_center(poses)
    to_center = center - o
    dist = np.linalg.norm(to_center, axis=-1)
    size = max(1.0, float(np.abs(o).max()))
    looking = (to_center * axis).sum(-1) > math.cos(math.radians(LOOKS_AT_DEG)) * dist
    spread = float(np.ptp(o, axis=0).max())
    if 1e-9 * size < dist.mean() <= MAX_ATTENTION_DISTANCE * spread and looking.mean() >= LOOKING_SHARE:
        return center, CAMERA_BOX_HALF * float(dist.mean()), "cameras"
    pts = None if points is None else np.asarray(points, dtype=np.float64).reshape(-1, 3)
    pts = None if pts is None else pts[np.isfinite(pts).all(axis=1)]
    if pts is not None and len(pts) >= 16:
        lo, hi = np.percentile(pts, POINTS_BOX_PERCENTILES, axis=0)
        half = 0.5 * float((hi - lo).max())
        if half > 1e-9 * max(1.0, float(np.abs(pts).max())):
            return 0.5 * (lo + hi), half, "points"
    if np.ptp(o, axis=0).max() <= 1e-9 * size:
        raise InputError(f"{what}: every camera sits at one point and no points place the scene; its size is unknown")
    raise InputError(f"{what}: its cameras do not look at a common point ({looking.mean():.0%} of them face the point "
                     f"nearest their axes: a forward-facing or inside-out capture?), and it has no sparse points or "
                     f"depth maps to place the scene: give it an instant-ngp box (aabb_scale, scale, offset in "
                     f"transforms.json), or its structure-from-motion points (ply_file_path)")


def depth_points(views: Views, stride: int = 8) -> np.ndarray | None:
    """World points ``(P, 3)`` of every ``stride``-th pixel of each view's depth map (through its lens), or
    None without depth."""
    if views.depth is None:
        return None
    h, w = views.hw
    v, u = torch.meshgrid(torch.arange(0, h, stride) + 0.5, torch.arange(0, w, stride) + 0.5, indexing="ij")
    uv = torch.stack([u.reshape(-1), v.reshape(-1)], -1).double()
    out = []
    for i in range(len(views)):
        z = views.depth[i, ::stride, ::stride].double().reshape(-1)
        keep = z > 0
        lens = None if views.distortion is None else views.distortion[i].double()
        out.append(backproject(views.c2w[i].double(), views.intrinsics[i].double(), uv[keep], z[keep], lens).numpy())
    return np.concatenate(out)


#: the scales :func:`depth_units_check` tries on a capture's depth maps: metres read as millimetres and the
#: reverse, and every 1/8 of an octave from ¼ to 4 (the agreement is not unimodal in the scale: a sparser grid
#: lands beside the wrong dip)
DEPTH_SCALES_TRIED = (1e-3, 0.01, 0.1) + tuple(round(2.0 ** (k / 8), 4) for k in range(-16, 17) if k) + (10.0, 100.0, 1e3)
#: how much better another scale must make the maps agree (median) for :func:`depth_units_check` to blame the
#: units: 1.15× to 1000× off gives 0.05–0.18 on the generated room; maps that do not fit their poses at all
#: (but are in their units) found dips of 0.38–0.5 on the finer grid, which are no units error
DEPTH_SCALE_GAIN = 0.25
#: the median disagreement as given above which the maps are warned about even where no scale fits better
MAX_DEPTH_DISAGREEMENT = 0.1
#: :func:`depth_agreement` pairs each view with the farthest camera whose axis is within this angle of its own
DEPTH_CHECK_DEG = 45.0


def depth_agreement(views: Views, samples: int = 256, seed: int = 0, scale: float = 1.0,
                    max_views: int = 16) -> float | None:
    """How well a split's depth maps agree with each other through its poses: ``samples`` pixels of each
    view with depth, back-projected and projected into the farthest camera facing within
    :data:`DEPTH_CHECK_DEG` of the same way (a wide baseline: maps in other units than the poses show as
    parallax that does not fit), whose own depth there they should match. Returns the median relative
    difference (occlusions and edges make a few large), or None with under two views of depth. ``scale``
    multiplies every map first (:func:`depth_units_check` tries several: :func:`_depth_agreement_at`); at
    most ``max_views`` views, evenly spread, are checked."""
    return _depth_agreement_at(views, samples, seed, max_views)(scale)


def _depth_agreement_at(views: Views, samples: int = 256, seed: int = 0, max_views: int = 16):
    """:func:`depth_agreement` as a function of the scale: the view pairs, their pixels and the points at
    scale 1 are drawn once (a scale moves each point along its ray, ``x = o + s (x₁ − o)``), so trying many
    scales projects and looks up, nothing more."""
    if views.depth is None or len(views) < 2:
        return lambda scale: None
    gen = torch.Generator().manual_seed(seed)
    h, w = views.hw
    pos, axis = views.c2w[:, :3, 3].double(), -views.c2w[:, :3, 2].double()
    pairs = []  # (the other view j, the camera centre (3,), each point's offset from it at scale 1 (k, 3))
    for i in sorted({round(k * (len(views) - 1) / max(1, max_views - 1)) for k in range(min(max_views, len(views)))}):
        faces = (axis @ axis[i]) > math.cos(math.radians(DEPTH_CHECK_DEG))
        faces[i] = False
        if not bool(faces.any()):
            continue
        dist = (pos - pos[i]).norm(dim=-1).masked_fill(~faces, -1.0)
        j = int(dist.argmax())  # the widest baseline among them: depth in wrong units shows as parallax
        z = views.depth[i].float().reshape(-1)
        have = torch.nonzero(z > 0)[:, 0]
        if have.numel() == 0:
            continue
        pick = have[torch.randint(0, have.numel(), (min(samples, have.numel()),), generator=gen)]
        uv = torch.stack([pick % w, pick // w], -1).float() + 0.5
        lens = None if views.distortion is None else views.distortion[i]
        origin = views.c2w[i, :3, 3].float()
        pairs.append((j, origin, backproject(views.c2w[i].float(), views.intrinsics[i].float(), uv, z[pick], lens) - origin))

    def at(scale: float) -> float | None:
        rel = []
        for j, origin, offset in pairs:
            u, v, zj = project(views, j, origin + scale * offset)
            inside = (u >= 0) & (u < w) & (v >= 0) & (v < h) & (zj > 0)
            seen = views.depth[j].float()[v[inside].long(), u[inside].long()] * scale
            ok = seen > 0
            rel.append(((zj[inside][ok] - seen[ok]).abs() / seen[ok]))
        rel = torch.cat(rel) if rel else torch.zeros(0)
        return float(rel.median()) if rel.numel() >= 16 else None

    return at


def depth_units_check(views: Views) -> str | None:
    """Whether a split's depth maps are in its poses' units: :func:`depth_agreement` as given and scaled by
    each of :data:`DEPTH_SCALES_TRIED` (metres read as millimetres to the reverse), then fitted between the
    best one's neighbours (:func:`_fitted_depth_scale`: poses from structure from motion and a phone's metric
    depth differ by any factor). Maps in the right units agree best as given (the generated room: 0.4 % median,
    4.6 % or more at any other scale); maps 2× off agree best at 0.5 (0.4 % against 16 %), 1.25× off at 0.8.
    Returns what is wrong, in words, or None: a scale more than 10 % from 1 agrees :data:`DEPTH_SCALE_GAIN`
    times as closely or better, or none does but the maps disagree by over :data:`MAX_DEPTH_DISAGREEMENT` as
    given."""
    agreement = _depth_agreement_at(views)
    given = agreement(1.0)
    if given is not None and given < 0.01:
        return None
    tried = [(m, s) for s in DEPTH_SCALES_TRIED if (m := agreement(s)) is not None]
    best, scale = min(tried) if tried else (None, 1.0)
    if best is not None:  # between the scales tried: the one that fits (poses from structure from motion
        best, scale = _fitted_depth_scale(agreement, best, scale)  # and metric depth differ by any factor)
    shown = f"{float(f'{scale:.3g}'):g}"  # 0.8, 1.25, 1000
    if best is not None and (given is None or best < DEPTH_SCALE_GAIN * given) and abs(math.log(scale)) > math.log(1.1):
        as_given = "as given too few land in the other views to compare" if given is None else f"{given:.1%} as given"
        return (f"its depth maps agree with each other through the poses best when scaled by {shown} ({best:.1%} "
                f"median difference; {as_given}): they are probably in other units than the poses; multiply their "
                f"scale by {shown} (a transforms.json's depth_unit_scale_factor: world units per stored unit)")
    if given is not None and given > MAX_DEPTH_DISAGREEMENT:
        return (f"its depth maps disagree with each other by {given:.0%} (median) once moved between views by the "
                f"poses, at any scale: the poses or the maps are off")
    return None


def _fitted_depth_scale(agreement, best: float, scale: float, steps: int = 14) -> tuple[float, float]:
    """The scale between the neighbours of ``scale`` in :data:`DEPTH_SCALES_TRIED` (and 1, as given) at which
    ``agreement`` (:func:`_depth_agreement_at`) is least, by golden-section search on its logarithm:
    ``(agreement, scale)``, the scale to three significant digits (``best`` at ``scale`` if the search finds
    nothing better)."""
    grid = sorted({*DEPTH_SCALES_TRIED, 1.0})
    i = grid.index(scale)
    a, b = math.log(grid[max(i - 1, 0)]), math.log(grid[min(i + 1, len(grid) - 1)])
    g = (math.sqrt(5.0) - 1.0) / 2.0

    def at(x: float) -> float:
        m = agreement(math.exp(x))
        return math.inf if m is None else m

    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = at(c), at(d)
    for _ in range(steps):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = at(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = at(d)
    found = float(f"{math.exp(0.5 * (a + b)):.3g}")
    m = agreement(found)
    return (m, found) if m is not None and m < best else (best, scale)


#: the share of a capture's training pixels whose rays must cross its scene box, below which readers warn
MIN_BOX_COVERAGE = 0.02


def box_coverage(views: Views, norm: Normalization, outer_scale: float, n: int = 16) -> float:
    """The share of an ``n × n`` grid of each view's pixels whose rays (through the lens) cross the scene's
    outer box (the unit cube grown by ``outer_scale``, the whole field)."""
    h, w = views.hw
    v, u = torch.meshgrid(torch.linspace(0.5, h - 0.5, n), torch.linspace(0.5, w - 0.5, n), indexing="ij")
    uv = torch.stack([u.reshape(-1), v.reshape(-1)], -1)
    hits = 0
    for i in range(len(views)):
        lens = None if views.distortion is None else views.distortion[i]
        o, d = rays_for_pixels(views.c2w[i], views.intrinsics[i], uv, lens)
        o = norm.to_unit(o.double())
        d = d.double()
        safe = torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)
        a, b = (-outer_scale - o) / safe, (outer_scale - o) / safe
        t0 = torch.minimum(a, b).max(dim=-1).values
        t1 = torch.maximum(a, b).min(dim=-1).values
        hits += int((t1 > t0.clamp_min(0.0)).sum())
    return hits / (len(views) * uv.shape[0])


#: how far (in central-box half-sizes, beyond the scene's outer box) a camera may stand: farther, a
#: float32 ray from it cannot resolve the scene's cells
MAX_CAMERA_DISTANCE = 1e5
#: how far from its optical axis a view's corner may look, in degrees (a pinhole image spans less than
#: 180°; rays keep ``z = −1``, so a fisheye image is cropped to this too)
MAX_RAY_ANGLE = 85.0


def _check_views(views: Views, split: str, source: Path, norm: Normalization, outer_scale: float) -> None:
    """Refuse the geometry a capture's numbers allow but its rays cannot use, as training stores it
    (float32): non-finite or zero intrinsics and poses after the cast, cameras absurdly far from the
    scene (:data:`MAX_CAMERA_DISTANCE`), corners wider than :data:`MAX_RAY_ANGLE` off the axis, every view
    one camera, and lens distortion the rays cannot undo inside the image
    (:func:`vqad.nerf.lens.distortion_fit`)."""
    names = views.names or [f"view {i}" for i in range(len(views))]
    K, c2w = views.intrinsics, views.c2w  # float32, as the rays use them
    for i in range(len(views)):
        what = f"{source}: {names[i]} ({split} split)"
        if not (bool(torch.isfinite(K[i]).all()) and K[i, 0] > 0 and K[i, 1] > 0):
            raise InputError(f"{what}: its intrinsics fx, fy, cx, cy = {K[i].tolist()} in 32-bit floats: they must be "
                             f"finite, with fx, fy > 0; check fl_x / fl_y / cx / cy (COLMAP: the camera's parameters)")
        if not bool(torch.isfinite(c2w[i]).all()):
            raise InputError(f"{what}: its pose overflows 32-bit floats (non-finite after the cast); check the "
                             f"transform_matrix / the scene's scale")
        cam = norm.to_unit(c2w[i, :3, 3].double()).abs().max().item()
        if not cam <= MAX_CAMERA_DISTANCE * outer_scale:
            raise InputError(f"{what}: the camera stands {cam:.3g} scene-box half-sizes from the scene (at most "
                             f"{MAX_CAMERA_DISTANCE * outer_scale:g} are usable); fix or drop that frame")
        h, w = views.hw
        corners = torch.tensor([[0.0, 0.0], [w, 0.0], [0.0, h], [w, h], [w / 2, h / 2]])
        dist = None if views.distortion is None else views.distortion[i]
        if dist is not None:
            if not bool(torch.isfinite(dist).all()):
                raise InputError(f"{what}: its lens distortion ({describe_lens(dist)}) is not finite in 32-bit floats")
            fit = distortion_fit(K[i], dist, (h, w))
            if not fit.ok:
                lens = f"{describe_lens(dist)}; fx, fy, cx, cy = {[round(v, 4) for v in K[i].tolist()]} for a {w}×{h} image"
                if fit.reach > 1 and fit.branch_deg >= BRANCH_MAX_DEG:
                    raise InputError(f"{what}: its image reaches past {BRANCH_MAX_DEG:g}° off the optical axis through its "
                                     f"lens ({lens}), beyond the {MAX_RAY_ANGLE:g}° vqad's rays reach: crop the images "
                                     f"(and shift cx, cy) or undistort them")
                if fit.reach > 1:
                    how = f"turns back (or meets its pole) {fit.branch_deg:.1f}° off axis, inside the image"
                elif fit.min_det <= 0:
                    how = "folds inside the image (two directions would land on one pixel)"
                elif fit.min_pixel_rad < MIN_PIXEL_RAD:
                    how = (f"squeezes a pixel into {fit.min_pixel_rad:.2g} rad of the view, less than 32-bit rays tell "
                           f"apart ({MIN_PIXEL_RAD:g})")
                else:
                    how = f"cannot be undone to within {DISTORTION_TOL_PX:g} px (off by {fit.error_px:.3g} px)"
                raise InputError(f"{what}: its lens distortion {how} ({lens}); check the coefficients, or undistort the "
                                 f"images first and give 0")
        o, d = rays_for_pixels(c2w[i], K[i], corners, dist)
        if not (bool(torch.isfinite(o).all()) and bool(torch.isfinite(d).all())):
            raise InputError(f"{what}: its rays are not finite in 32-bit floats (fx, fy, cx, cy = {K[i].tolist()}); "
                             f"check the intrinsics and the distortion")
        axis = -c2w[i, :3, 2] / c2w[i, :3, 2].norm()
        widest = math.degrees(math.acos(min(1.0, float((d @ axis).min()))))
        if widest > MAX_RAY_ANGLE:
            fix = ("vqad's rays stop short of 90°: crop the fisheye images (and shift cx, cy) or undistort them"
                   if dist is not None and int(dist[0]) == LENS_FISHEYE else
                   "check the focal length and the camera's width and height")
            raise InputError(f"{what}: its image corners look {widest:.1f}° off the optical axis (more than "
                             f"{MAX_RAY_ANGLE:g}°: fx, fy, cx, cy = {K[i].tolist()} for a {w}×{h} image); {fix}")
    if len(views) > 1 and bool((c2w == c2w[:1]).all()):
        raise InputError(f"{source}: every view of the {split!r} split has the same pose: the poses are missing "
                         f"or wrong (a radiance field needs views from different places)")


def _list_images(d: Path) -> list[Path]:
    """A folder's photos, by name (not the loss masks beside them: :func:`dynamic_mask_of`)."""
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in (".png", ".jpg", ".jpeg")
                  and not p.name.startswith(DYNAMIC_MASK_PREFIX))


#: an EXR's channels that hold depth, in the order they are looked for (Blender writes Z, or
#: ``ViewLayer.Depth.Z`` in a multilayer file); a colour-only EXR (RTMV's) gives its first colour channel
_EXR_DEPTH_CHANNELS = ("Z", "DEPTH", "Y", "R", "G", "B")


def exr_depth(path: Path) -> np.ndarray:
    """The depth channel ``(h, w) float32`` of an EXR file: the first of :data:`_EXR_DEPTH_CHANNELS` it holds
    (layer prefixes dropped), else its only channel (``Depth.V``, ``depth``); several channels none of which is
    one of those is an :class:`InputError` naming them."""
    ch = read_exr_channels(path)
    name = next((c for c in _EXR_DEPTH_CHANNELS if c in ch), next(iter(ch)) if len(ch) == 1 else None)
    if name is None:
        raise InputError(f"the depth map {path} has the EXR channels {', '.join(sorted(ch))[:200]}, none of which is "
                         f"depth: vqad reads depth from a channel named {', '.join(_EXR_DEPTH_CHANNELS)} (in this order)")
    return ch[name]


#: raw depth values from this one up mean "no surface" (Blender's background is 1e10)
DEPTH_BACKGROUND = 1e9


def _read_depth_values(path: Path) -> np.ndarray:
    """A depth map's raw values ``(h, w)`` float64: an EXR's depth channel, a 16-bit or 32-bit PNG / TIFF,
    or a 2-D ``.npy`` array of numbers."""
    if not path.is_file():
        raise InputError(f"the depth map {path} is not a file")
    suffix = path.suffix.lower()
    if suffix == ".exr":
        return exr_depth(path).astype(np.float64)
    if suffix == ".npy":
        try:
            d = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise InputError(f"the depth map {path} is not a NumPy array file (.npy) vqad can read: {e}") from e
        if not isinstance(d, np.ndarray):
            raise InputError(f"the depth map {path} holds several arrays (an .npz archive?): save one 2-D array")
        if d.ndim == 3 and d.shape[-1] == 1:
            d = d[..., 0]
        if d.ndim != 2 or d.dtype.kind not in "fiu" or d.size == 0:
            raise InputError(f"the depth map {path} must be a non-empty 2-D array of numbers, not {d.dtype} {list(d.shape)}")
        return d.astype(np.float64)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode not in ("I;16", "I;16B", "I;16L", "I", "F"):
                raise InputError(f"the depth map {path} is a {im.mode} image ({im.format}): depth needs one channel of "
                                 f"16 bits (PNG, in depth_unit_scale_factor units) or 32 bits (TIFF), not a picture of it")
            return np.asarray(im, dtype=np.float64)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot read the depth map {path}: {e}") from e


def _read_depth(fr: _Frame, hw: tuple[int, int], K_full: np.ndarray, n: int, lens: np.ndarray | None = None) -> np.ndarray:
    """A view's depth map → z-depth ``(H/n, W/n)`` float32 in world units (0 = no hit). A map smaller than
    its image (a phone's depth sensor) is resized to it by nearest neighbour, as nerfstudio does."""
    raw = _read_depth_values(fr.depth)
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.where(raw < min(fr.depth_invalid_at, DEPTH_BACKGROUND), raw, 0.0) * fr.depth_scale
    if not fits_image(d.shape[1], d.shape[0], hw):
        raise InputError(f"the depth map {fr.depth} is {d.shape[1]}×{d.shape[0]} but its image is {hw[1]}×{hw[0]}: a "
                         f"depth map must be the image's size or smaller with its aspect ratio")
    d = nearest_to(d, hw)
    valid = np.isfinite(d) & (d > 0)
    d = np.where(valid, d, 0.0)
    if fr.depth_kind == "ray":
        uv = torch.from_numpy(np.stack(np.meshgrid(np.arange(hw[1]) + 0.5, np.arange(hw[0]) + 0.5), -1).reshape(-1, 2))
        per_z = camera_directions(torch.from_numpy(K_full), uv, None if lens is None else torch.from_numpy(lens))
        d = d / per_z.norm(dim=-1).reshape(hw).numpy()  # t → z = t · cos θ
    return downscale_depth(_crop_to_multiple(d.astype(np.float32), n), n)




# -- RTMV ------------------------------------------------------------------------------------------
