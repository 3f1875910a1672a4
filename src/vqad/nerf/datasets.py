"""Readers of posed-image captures into a :class:`~vqad.nerf.data.SceneDataset`.

Formats (``load_dataset(..., format=...)``; ``"auto"`` looks at the files present):

========== ============================================ ==================================================
format     recognised by                                splits
========== ============================================ ==================================================
blender    ``transforms_train.json`` (NeRF-synthetic)    ``transforms_{train,val,test}.json``; a missing
                                                        test split is val (a missing val is test)
ngp        ``transforms.json`` (instant-ngp)             every 8th frame is test (and val), the rest train
llff       ``poses_bounds.npy`` + ``images[_N]/``        every 8th image is test (and val), the rest train
rtmv       ``NNNNN.json`` + ``NNNNN.exr`` (+ depth)      sorted; first ⌊2N/3⌋ train, next ⌊N/30⌋ val, rest
                                                        test (kaolin-wisp's split); no val → val = test
procedural the name ``procedural`` / ``builtin:procedural`` 40 / 5 / 10 views (:mod:`.procedural`)
========== ============================================ ==================================================

Where each split came from is recorded in ``SceneDataset.split_sources``.

Conventions of the output (see :mod:`vqad.nerf.data`): OpenGL camera-to-world poses; intrinsics
``fx, fy, cx, cy`` in pixels of the images as held (after ``downscale``), pixel centres at ``+ ½``;
images ``uint8`` composited on ``background`` (alpha, when present, becomes the mask); depth
``float16`` z-depth in world units, 0 where nothing was hit.

Per-format conversions:

* **blender / ngp**: ``transform_matrix`` is already OpenGL camera-to-world. Intrinsics come from
  ``fl_x``/``fl_y`` or ``camera_angle_x``/``camera_angle_y`` (``fl = ½ w / tan(angle / 2)``, ``fl_y``
  defaults to ``fl_x``), ``cx``/``cy`` (default: the image centre), given for an image of ``w × h``
  (default: the image's own size) and scaled to the size actually read. Any of these keys may be
  overridden per frame. ``k1, k2, p1, p2`` become ``Views.distortion`` (the rays undistort them);
  fisheye models and non-zero ``k3``/``k4`` are refused. ``file_path`` may omit the extension.
* **llff**: ``poses_bounds.npy`` rows are ``[R | t | (H, W, f)]`` (3×5, column-major flattened)
  then ``near, far``; R's columns are [down, right, backwards] and become [right, up, backwards]
  (OpenGL): ``x = right = col 1``, ``y = up = −col 0``, ``z = col 2``. ``(H, W, f)`` is for the
  full-size photos and is scaled to the images read (``cx, cy`` = image centre). World coordinates
  are the file's own (no recentring, no NDC).
* **rtmv**: ``camera_data.cam2world`` is stored transposed (translation in the last row), as
  kaolin-wisp's reader documents: ``c2w = array(cam2world).T`` is an OpenGL camera-to-world. Colour
  EXRs are linear RGB with straight (not premultiplied) alpha; they are composited on the
  background in linear light, then converted to sRGB. ``NNNNN.depth.exr`` holds, by default, the
  *distance along the ray* from the camera centre (as kaolin-wisp treats it: ``x = o + d·depth``
  with unit ``d``); it is converted to z-depth ``z = depth · cos θ``. Pass ``depth_kind="z"`` to
  :func:`read_rtmv` for files that store z-depth. Depth values that are non-finite, ``<= 0`` or
  ``>= 1000`` (RTMV's background sentinel) mean "no hit".

Scene normalisation (``x_unit = (x_world − center) · scale``, a cube around a world box):

* blender: the NeRF-synthetic object box [-1.5, 1.5]^3 (the box instant-ngp uses for it);
* ngp: instant-ngp's own box: ``aabb_scale`` times the unit cube of ngp space, which is
  ``ngp = world · scale + offset`` (defaults 0.33 and 0.5), i.e. centre ``(0.5 − offset) / scale``
  and half extent ``aabb_scale / (2 · scale)`` in world units;
* llff: the box holding every camera's view frustum between 0.9 × its near bound and 1.1 × its far
  bound;
* rtmv: the box of the back-projected depth of all views, grown by 5 % (or the JSON's
  ``scene_min_3d_box`` / ``scene_max_3d_box`` when there is no depth);
* procedural: the shapes' known box, grown by 10 %.

``near``/``far`` (world units, z-depth) bound that box as seen from every camera (for llff: the
near/far bounds of the file, ×0.9 and ×1.1).

Downscaling (``downscale=N``) crops each image to a multiple of N pixels (from the bottom / right,
so ``cx, cy`` keep their meaning) and averages N×N blocks (area resampling: PIL's ``reduce`` for 8-bit
images, which premultiplies alpha, the same box average on premultiplied float colour for EXRs);
intrinsics are divided by N. Depth is not averaged across silhouettes: a block keeps the lower
median of its valid samples when at least half of them are valid, else 0.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from ..errors import InputError
from ..fields import Normalization
from .data import SceneDataset, Views
from .rays import backproject

FORMATS = ("blender", "ngp", "llff", "rtmv", "procedural")
_ALIASES = {"nerf_synthetic": "blender", "nerf-synthetic": "blender", "instant-ngp": "ngp", "instant_ngp": "ngp"}
PROCEDURAL_NAMES = ("procedural", "builtin:procedural")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".exr")
_RTMV_JSON = re.compile(r"^(\d+)\.json$")
RTMV_DEPTH_INVALID = 1000.0  # RTMV marks background pixels with huge depths (kaolin-wisp: |d| >= 1000)


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
            has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
            arr = np.asarray(im.convert("RGBA"))
    except (OSError, ValueError) as e:
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


def downscale_depth(z: np.ndarray, n: int) -> np.ndarray:
    """``(H, W)`` z-depth (0 = no hit) → ``(H/n, W/n)``: the lower median of each block's valid
    samples where at least half are valid, else 0 (never a blend across a silhouette)."""
    if n == 1:
        return z
    h, w = z.shape[0] // n, z.shape[1] // n
    blocks = z.reshape(h, n, w, n).transpose(0, 2, 1, 3).reshape(h, w, n * n)
    valid = blocks > 0
    count = valid.sum(-1)
    srt = np.sort(np.where(valid, blocks, np.inf), axis=-1)
    k = np.maximum(count - 1, 0) // 2
    med = np.take_along_axis(srt, k[..., None], axis=-1)[..., 0]
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


def _resolve_image(base: Path, file_path: str, what: str) -> Path:
    """``base / file_path``, trying the usual extensions when it has none or does not exist."""
    p = (base / file_path).resolve() if not Path(file_path).is_absolute() else Path(file_path)
    if p.is_file():
        return p
    for ext in IMAGE_EXTS + tuple(e.upper() for e in IMAGE_EXTS):
        q = p.with_name(p.name + ext)
        if q.is_file():
            return q
    raise InputError(f"image not found: {p} ({what}); check the file_path entries or restore the missing images")


# -- poses and intrinsics --------------------------------------------------------------------------
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
        fx = self.fx if self.fx else (0.5 * w / math.tan(0.5 * self.angle_x) if self.angle_x else None)
        fy = self.fy if self.fy else (0.5 * h / math.tan(0.5 * self.angle_y) if self.angle_y else fx)
        if fx is None:
            raise InputError(f"no focal length for {what}: give fl_x (or camera_angle_x)")
        cx = float(self.cx) if self.cx is not None else w / 2
        cy = float(self.cy) if self.cy is not None else h / 2
        sx, sy = img_w / w, img_h / h
        if abs(sx / sy - 1) > 0.02:
            raise InputError(f"{what}: the image is {img_w}×{img_h} but its intrinsics are for {w:g}×{h:g} "
                             "(a different aspect ratio); use images that match the camera file")
        out = np.array([fx * sx, fy * sy, cx * sx, cy * sy], dtype=np.float64)
        if not np.all(np.isfinite(out)) or out[0] <= 0 or out[1] <= 0:
            raise InputError(f"invalid intrinsics for {what}: fx, fy, cx, cy = {out.tolist()}")
        return out


@dataclass
class _Frame:
    image: Path
    c2w: np.ndarray  # (4, 4) OpenGL
    pinhole: _Pinhole
    name: str
    distortion: np.ndarray | None = None  # (4,) k1 k2 p1 p2
    depth: Path | None = None  # RTMV depth EXR
    depth_kind: str = "ray"  # what the depth EXR holds: "ray" distance or "z"-depth


def _as_c2w(m, what: str) -> np.ndarray:
    """A ``(4, 4)`` float64 pose from a 3×4 / 4×4 nested list; refuses non-finite or singular ones."""
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
    return a


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
    """Read, downscale and composite a split's images (and depth) into a :class:`Views`."""
    if not frames:
        raise InputError(f"the {split!r} split of {source} has no views")
    images, alphas, depths, intr, poses, names, dists = [], [], [], [], [], [], []
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
            raise InputError(f"images of different sizes in the {split!r} split: {first} is {size[0]}×{size[1]}, "
                             f"{fr.image} is {W}×{H}; resize them to one size")
        K = fr.pinhole.resolve(W, H, str(fr.image)) / downscale
        rgb8, a8 = _image_to_srgb8(rgba, downscale, background)
        images.append(rgb8)
        alphas.append(a8)
        if fr.depth is not None:
            depths.append(_read_depth(fr, rgba.shape[:2], K * downscale, downscale))
        intr.append(K)
        poses.append(fr.c2w)
        names.append(fr.name)
        dists.append(fr.distortion)
    if depths and len(depths) != len(frames):
        raise InputError(f"some views of the {split!r} split of {source} have depth and others do not; "
                         "give every view a depth map or none")
    has_dist = any(d is not None and np.any(d != 0) for d in dists)
    return Views(
        images=torch.from_numpy(np.stack(images)),
        c2w=torch.from_numpy(np.stack(poses)).float(),
        intrinsics=torch.from_numpy(np.stack(intr)).float(),
        masks=torch.from_numpy(np.stack(alphas)) if any_alpha else None,
        depth=torch.from_numpy(np.stack(depths)).to(torch.float16) if depths else None,
        distortion=torch.from_numpy(np.stack([d if d is not None else np.zeros(4) for d in dists])).float() if has_dist else None,
        names=names,
    )


# -- blender and instant-ngp (transforms json) -----------------------------------------------------
_PINHOLE_KEYS = ("fl_x", "fl_y", "cx", "cy", "w", "h", "camera_angle_x", "camera_angle_y")
_DIST_KEYS = ("k1", "k2", "p1", "p2")


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON ({e}); fix or regenerate it") from e
    except OSError as e:
        raise InputError(f"cannot read {path}: {e}") from e
    if not isinstance(meta, dict):
        raise InputError(f"{path} must hold a JSON object")
    return meta


def _transforms_frames(meta: dict, base: Path, json_path: Path) -> list[_Frame]:
    """Frames of a NeRF / instant-ngp ``transforms*.json`` (global keys, overridable per frame)."""
    frames = meta.get("frames")
    if not isinstance(frames, list) or not frames:
        raise InputError(f"{json_path} has no frames: it needs a non-empty 'frames' list")
    out = []
    for i, fr in enumerate(frames):
        what = f"frame {i} of {json_path.name}"
        if not isinstance(fr, dict) or "file_path" not in fr or "transform_matrix" not in fr:
            raise InputError(f"{what} needs 'file_path' and 'transform_matrix'")
        get = lambda k: fr.get(k, meta.get(k))  # noqa: E731 - per-frame keys override global ones
        if get("is_fisheye") or str(get("camera_model") or "OPENCV").upper() not in ("OPENCV", "PINHOLE", "SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL"):
            raise InputError(f"{what}: only pinhole cameras with k1, k2, p1, p2 distortion are supported "
                             f"(got camera_model={get('camera_model')!r}, is_fisheye={get('is_fisheye')!r})")
        if any(float(get(k) or 0) != 0 for k in ("k3", "k4")):
            raise InputError(f"{what}: distortion terms k3/k4 are not supported; undistort the images first")
        vals = {k: get(k) for k in _PINHOLE_KEYS}
        for k, v in vals.items():
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise InputError(f"{what}: {k} must be a finite number, not {v!r}")
        pin = _Pinhole(fx=vals["fl_x"], fy=vals["fl_y"], cx=vals["cx"], cy=vals["cy"], w=vals["w"], h=vals["h"],
                       angle_x=vals["camera_angle_x"], angle_y=vals["camera_angle_y"])
        if not pin.fx and not pin.angle_x:
            raise InputError(f"{what}: no focal length: give fl_x or camera_angle_x")
        dist = np.array([float(get(k) or 0.0) for k in _DIST_KEYS])
        if not np.all(np.isfinite(dist)):
            raise InputError(f"{what}: non-finite distortion coefficients")
        path = _resolve_image(base, str(fr["file_path"]), what)
        out.append(_Frame(image=path, c2w=_as_c2w(fr["transform_matrix"], what), pinhole=pin,
                          name=str(fr["file_path"]), distortion=dist if np.any(dist != 0) else None))
    return out


def _holdout(frames: list, every: int = 8) -> tuple[list, list]:
    """``(train, test)``: every ``every``-th item (0, 8, 16, ...) is held out."""
    test = [f for i, f in enumerate(frames) if i % every == 0]
    train = [f for i, f in enumerate(frames) if i % every != 0]
    return train, test


def _dataset(name, fmt, split_frames: dict[str, list[_Frame]], sources: dict[str, str], downscale, background,
             split_limit, source: Path, bounds_fn, requested_downscale: int | None = None) -> SceneDataset:
    """Load every distinct split once (a split that falls back to another shares its Views).

    ``bounds_fn(splits) -> (lo (3,), hi (3,), near | None, far | None)`` gives the world box that
    becomes the unit cube (and near/far, else they are derived from the box).
    """
    loaded: dict[tuple[int, int], Views] = {}
    splits: dict[str, Views] = {}
    for split, frames in split_frames.items():
        kept = _limit(frames, split, split_limit)
        key = (id(frames), len(kept))
        if key not in loaded:
            loaded[key] = _load_views(kept, downscale, background, split, source)
        splits[split] = loaded[key]
    lo, hi, near, far = bounds_fn(splits)
    norm = normalization_from_box(lo, hi)
    if near is None:
        near, far = near_far_from_box(torch.cat([v.c2w for v in splits.values()]), *unit_cube_box(norm))
    return SceneDataset(name=name, format=fmt, splits=splits, normalization=norm, near=float(near), far=float(far),
                        background=tuple(float(c) for c in background), source=str(source),
                        downscale=int(requested_downscale or downscale),
                        split_sources=sources, bbox=(tuple(float(x) for x in lo), tuple(float(x) for x in hi)))


def read_blender(path, downscale: int = 1, background=(1.0, 1.0, 1.0), split_limit=None) -> SceneDataset:
    """A NeRF-synthetic (Blender) scene: ``transforms_{train,val,test}.json`` + RGBA images.

    Masks are the images' alpha. The unit cube is the object box [-1.5, 1.5]^3.
    """
    root = Path(path)
    found = {s: root / f"transforms_{s}.json" for s in ("train", "val", "test") if (root / f"transforms_{s}.json").is_file()}
    if "train" not in found:
        raise InputError(f"{root} has no transforms_train.json: not a Blender (NeRF-synthetic) scene")
    frames = {s: _transforms_frames(_read_json(p), root, p) for s, p in found.items()}
    sources = {s: p.name for s, p in found.items()}
    if "val" not in frames and "test" not in frames:
        frames["train"], held = _holdout(frames["train"])
        frames["val"] = frames["test"] = held
        sources = {"train": "transforms_train.json minus every 8th frame",
                   "val": "every 8th frame of transforms_train.json (no transforms_val.json or transforms_test.json)",
                   "test": "every 8th frame of transforms_train.json (no transforms_val.json or transforms_test.json)"}
    elif "test" not in frames:
        frames["test"] = frames["val"]
        sources["test"] = "transforms_val.json (no transforms_test.json: test = val)"
    elif "val" not in frames:
        frames["val"] = frames["test"]
        sources["val"] = "transforms_test.json (no transforms_val.json: val = test)"
    frames = {s: frames[s] for s in ("train", "val", "test")}
    return _dataset(root.name, "blender", frames, sources, downscale, background, split_limit, root,
                    lambda splits: (np.full(3, -1.5), np.full(3, 1.5), None, None))


def read_ngp(path, downscale: int = 1, background=(1.0, 1.0, 1.0), split_limit=None, hold_every: int = 8) -> SceneDataset:
    """An instant-ngp ``transforms.json`` scene (``path`` is its directory or the file itself).

    Every ``hold_every``-th frame (0, 8, ...) is test and val; the rest train. The unit cube is
    instant-ngp's ``aabb_scale`` box (see the module docstring).
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
    try:
        aabb_scale = float(meta.get("aabb_scale", 1))
        scale = float(meta.get("scale", 0.33))
        offset = np.asarray(meta.get("offset", [0.5, 0.5, 0.5]), dtype=np.float64).reshape(3)
    except (TypeError, ValueError) as e:
        raise InputError(f"{json_path}: aabb_scale, scale and offset must be numbers ({e})") from e
    if not (aabb_scale > 0 and scale > 0 and math.isfinite(aabb_scale) and math.isfinite(scale)) or not np.all(np.isfinite(offset)):
        raise InputError(f"{json_path}: aabb_scale and scale must be positive and offset finite")
    # ngp = world · scale + offset (offset in the file's axis order); ngp's box is 0.5 ± aabb_scale / 2
    center = (0.5 - offset) / scale
    half = 0.5 * aabb_scale / scale
    return _dataset(json_path.parent.name, "ngp", {"train": train, "val": test, "test": test}, sources, downscale,
                    background, split_limit, json_path.parent, lambda splits: (center - half, center + half, None, None))


# -- LLFF ------------------------------------------------------------------------------------------
def _llff_image_dir(root: Path, downscale: int) -> tuple[Path, int]:
    """The image folder to read and the downscale still to apply to it.

    ``downscale`` is relative to the highest-resolution folder present (``images`` = factor 1, or the
    smallest ``images_N``); a folder ``images_{base·downscale}`` is read directly when it exists.
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
        return dirs[base * downscale], 1
    return dirs[base], downscale


def _list_images(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in (".png", ".jpg", ".jpeg"))


def read_llff(path, downscale: int = 1, background=(1.0, 1.0, 1.0), split_limit=None, hold_every: int = 8) -> SceneDataset:
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
        pb = np.load(pb_path)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {pb_path}: {e}") from e
    if pb.ndim != 2 or pb.shape[1] != 17 or pb.shape[0] == 0:
        raise InputError(f"{pb_path} must be an (N, 17) array of [3×5 pose | near far] rows, not {list(pb.shape)}")
    pb = pb.astype(np.float64)
    if not np.all(np.isfinite(pb)):
        bad = np.nonzero(~np.all(np.isfinite(pb), axis=1))[0].tolist()
        raise InputError(f"{pb_path}: non-finite poses or bounds in rows {bad}; fix or drop those views")
    poses = pb[:, :15].reshape(-1, 3, 5)
    bds = pb[:, 15:17]
    if np.any(bds <= 0) or np.any(bds[:, 1] <= bds[:, 0]):
        raise InputError(f"{pb_path}: the near/far bounds must satisfy 0 < near < far in every row")
    img_dir, rest = _llff_image_dir(root, downscale)
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
        frames.append(_Frame(image=p, c2w=_as_c2w(c2w, f"view {i} of {pb_path.name}"),
                             pinhole=_Pinhole(fx=f_i, fy=f_i, w=w_i, h=h_i), name=f"{img_dir.name}/{p.name}"))
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


# -- RTMV ------------------------------------------------------------------------------------------
def _rtmv_c2w(m, what: str) -> np.ndarray:
    """RTMV's ``cam2world`` (translation in the last row) → a column-vector OpenGL c2w ``(4, 4)``.

    A matrix already in column-vector form (last row ``0 0 0 1`` and translation in the last column)
    is accepted as is.
    """
    a = _as_c2w(m, what)
    if np.allclose(a[3], [0, 0, 0, 1]) and not np.allclose(a[:3, 3], 0):
        return a
    return _as_c2w(a.T, what)


def _read_depth(fr: _Frame, hw: tuple[int, int], K_full: np.ndarray, n: int) -> np.ndarray:
    """A view's depth EXR → z-depth ``(H/n, W/n)`` float32 (0 = no hit)."""
    ch = read_exr_channels(fr.depth)
    name = next((k for k in ("R", "Z", "Y", "DEPTH", "G", "B") if k in ch), next(iter(ch)))
    d = ch[name]
    if d.shape != tuple(hw):
        raise InputError(f"the depth map {fr.depth} is {d.shape[1]}×{d.shape[0]} but its image is {hw[1]}×{hw[0]}")
    valid = np.isfinite(d) & (d > 0) & (d < RTMV_DEPTH_INVALID)
    d = np.where(valid, d, 0.0)
    if fr.depth_kind == "ray":
        fx, fy, cx, cy = K_full
        u = (np.arange(hw[1]) + 0.5 - cx) / fx
        v = (np.arange(hw[0]) + 0.5 - cy) / fy
        d = d / np.sqrt(1.0 + u[None, :] ** 2 + v[:, None] ** 2)  # t → z = t · cos θ
    return downscale_depth(_crop_to_multiple(d.astype(np.float32), n), n)


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
                             depth=depth if depth.is_file() else None, depth_kind=depth_kind))
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


# -- format detection and the entry point ----------------------------------------------------------
def detect_format(path) -> str:
    """The format of a dataset folder (or of a ``transforms*.json`` / ``poses_bounds.npy`` file)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"dataset not found: {p} (give a dataset folder, or 'procedural' for the built-in scene)")
    if p.is_file():
        if re.fullmatch(r"transforms_(train|val|test)\.json", p.name):
            return "blender"
        if p.suffix == ".json":
            return "ngp"
        if p.name == "poses_bounds.npy":
            return "llff"
        raise InputError(f"{p} is not a dataset folder or a recognised dataset file")
    names = {q.name for q in p.iterdir()}
    if "transforms_train.json" in names:
        return "blender"
    if "transforms.json" in names:
        return "ngp"
    if "poses_bounds.npy" in names:
        return "llff"
    if any(_RTMV_JSON.match(n) for n in names) and any(re.fullmatch(r"\d+\.exr", n) for n in names):
        return "rtmv"
    raise InputError(
        f"{p} holds no recognisable dataset: expected transforms_train.json (blender), transforms.json (ngp), "
        "poses_bounds.npy + images_N/ (llff) or NNNNN.json + NNNNN.exr (rtmv); or pass --format"
    )


def _check_args(downscale, background) -> tuple[int, tuple[float, float, float]]:
    if isinstance(downscale, bool) or not isinstance(downscale, (int, np.integer)) or downscale < 1:
        raise InputError(f"--downscale must be a positive integer, not {downscale!r}")
    try:
        bg = tuple(float(c) for c in background)
    except (TypeError, ValueError):
        bg = ()
    if len(bg) != 3 or not all(0.0 <= c <= 1.0 for c in bg):
        raise InputError(f"the background must be three numbers in [0, 1], not {background!r}")
    return int(downscale), bg


def load_dataset(path_or_name, format: str = "auto", downscale: int = 1, background=(1.0, 1.0, 1.0),
                 split_limit: int | Mapping[str, int] | None = None) -> SceneDataset:
    """Read a dataset folder (or the built-in scene) into a :class:`SceneDataset`.

    Args:
        path_or_name: a dataset folder (or its ``transforms*.json`` / ``poses_bounds.npy``), or
            ``"procedural"`` / ``"builtin:procedural"`` for the built-in scene.
        format: ``auto | blender | ngp | llff | rtmv | procedural``.
        downscale: integer area-downscaling factor (intrinsics follow).
        background: RGB in [0, 1] that images with alpha are composited on.
        split_limit: keep only the first N views of every split (an int) or of the named splits
            (``{"val": 20}``).
    Raises:
        InputError: unknown format, nothing recognisable, missing images, pose/image count
            mismatch, non-finite poses, images of different sizes, ...
    """
    downscale, background = _check_args(downscale, background)
    fmt = _ALIASES.get(str(format).lower(), str(format).lower())
    if fmt != "auto" and fmt not in FORMATS:
        raise InputError(f"unknown dataset format {format!r}: choose one of auto, {', '.join(FORMATS)}")
    name = str(path_or_name)
    if fmt == "procedural" or (fmt == "auto" and name in PROCEDURAL_NAMES):
        if name not in PROCEDURAL_NAMES:
            raise InputError(f"the procedural scene is named 'procedural', not {name!r}")
        from .procedural import ProceduralConfig, procedural_dataset

        cfg = ProceduralConfig()
        counts = {s: len(_limit(range(getattr(cfg, f"n_{s}")), s, split_limit)) for s in ("train", "val", "test")}
        cfg = ProceduralConfig(n_train=counts["train"], n_val=counts["val"], n_test=counts["test"])
        return procedural_dataset(cfg, background=background, downscale=downscale)
    if fmt == "auto":
        fmt = detect_format(name)
    path = Path(name)
    if not path.exists():
        raise InputError(f"dataset not found: {path}")
    readers = {"blender": read_blender, "ngp": read_ngp, "llff": read_llff, "rtmv": read_rtmv}
    if fmt in ("blender", "rtmv") and path.is_file():
        path = path.parent
    if fmt != "ngp" and not path.is_dir():
        raise InputError(f"{path} is not a folder: the {fmt} format is a folder of files")
    return readers[fmt](path, downscale=downscale, background=background, split_limit=split_limit)


def dataset_summary(ds: SceneDataset) -> str:
    """A few human-readable lines about a dataset (views, sizes, bounds, where each split came from)."""
    lines = [f"{ds.name} ({ds.format}{', ' + ds.source if ds.source else ''}), downscale {ds.downscale}"]
    for s, v in ds.splits.items():
        h, w = v.hw
        extra = [k for k in ("masks", "depth", "distortion") if getattr(v, k) is not None]
        lines.append(f"  {s}: {len(v)} views {w}×{h}{' + ' + ', '.join(extra) if extra else ''}"
                     f"{' — ' + ds.split_sources[s] if s in ds.split_sources else ''}")
    lines.append(f"  unit cube: center {tuple(round(c, 4) for c in ds.normalization.center)}, "
                 f"scale {ds.normalization.scale:.4g}; near {ds.near:.4g}, far {ds.far:.4g}")
    return "\n".join(lines)
