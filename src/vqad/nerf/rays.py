"""Camera rays in world units, for the renderer, the trainer and the dataset readers.

Conventions (the same as :mod:`vqad.nerf.data`):

* camera-to-world ``c2w (4, 4)`` in the OpenGL convention: camera x right, y up, looking down −z;
* pinhole intrinsics ``fx, fy, cx, cy`` in pixels; pixel ``(col, row)`` covers
  ``[col, col + 1) × [row, row + 1)`` and its centre is ``(col + ½, row + ½)``; image rows grow
  downwards, so the camera-space direction through pixel coordinates ``(u, v)`` is
  ``((u − cx) / fx, −(v − cy) / fy, −1)``;
* an optional lens per view (:mod:`vqad.nerf.lens`: OpenCV's radial-tangential or fisheye model)
  acting on the normalised coordinates ``x = (u − cx) / fx``, ``y = (v − cy) / fy`` (y down). A
  pixel records the distorted point, so ray generation inverts the model (Newton iterations, as
  instant-ngp does).
* z-depth ``z`` is measured along the optical axis; a ray with unit direction ``d`` reaches it at
  distance ``t = z · |dir_cam|`` where ``dir_cam`` is the camera direction with ``z_cam = −1``
  (:func:`camera_directions`), i.e. ``t = z / cos θ``.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch

from vqad.errors import InputError
from vqad.nerf.data import MASK_POLARITY, SceneDataset, Views
from vqad.nerf.lens import LensBatch, distort_within, expand_rows, image_radius2, lens_table, undistort


def pixel_centers(height: int, width: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Pixel-centre coordinates of a whole image, row-major: ``(H·W, 2)`` as ``(u, v) = (col + ½, row + ½)``.

    >>> pixel_centers(2, 3)[:4].tolist()
    [[0.5, 0.5], [1.5, 0.5], [2.5, 0.5], [0.5, 1.5]]
    """
    v, u = torch.meshgrid(torch.arange(height, device=device, dtype=dtype),
                          torch.arange(width, device=device, dtype=dtype), indexing="ij")
    return torch.stack([u.reshape(-1), v.reshape(-1)], dim=-1) + 0.5


def camera_directions(intrinsics: torch.Tensor, pixel_uv: torch.Tensor,
                      distortion: torch.Tensor | None = None) -> torch.Tensor:
    """Camera-space directions through pixel coordinates, scaled so that ``z = −1``.

    Args:
        intrinsics: ``(4,)`` or ``(N, 4)``: fx, fy, cx, cy.
        pixel_uv: ``(N, 2)`` pixel coordinates ``(u, v)`` (pixel centres are ``+ 0.5``).
        distortion: ``None`` or lens rows ``(9,)`` / ``(N, 9)`` (or ``k1, k2, p1, p2``: :func:`lens_rows`).
    Returns:
        ``(N, 3)`` ``(x, −y, −1)`` with ``(x, y)`` the undistorted normalised coordinates; its norm
        is ``1 / cos θ`` (the ray distance per unit of z-depth).
    """
    uv = pixel_uv.float() if not pixel_uv.is_floating_point() else pixel_uv
    fx, fy, cx, cy = expand_rows(intrinsics, uv.shape[0], 4).to(uv).unbind(-1)
    xy = torch.stack([(uv[:, 0] - cx) / fx, (uv[:, 1] - cy) / fy], dim=-1)
    if distortion is not None:
        xy = undistort(xy, distortion)
    return torch.stack([xy[:, 0], -xy[:, 1], -torch.ones_like(xy[:, 0])], dim=-1)


def rays_for_pixels(c2w: torch.Tensor, intrinsics: torch.Tensor, pixel_uv: torch.Tensor,
                    distortion: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """World-space rays through pixel coordinates.

    Args:
        c2w: ``(4, 4)`` / ``(3, 4)`` one camera, or ``(N, 4, 4)`` / ``(N, 3, 4)`` one per pixel
            (OpenGL convention).
        intrinsics: ``(4,)`` or ``(N, 4)``: fx, fy, cx, cy in pixels.
        pixel_uv: ``(N, 2)`` pixel coordinates ``(u, v)``; pass ``col + 0.5, row + 0.5`` for centres.
        distortion: ``None`` or lens rows ``(9,)`` / ``(N, 9)`` (:func:`lens_rows`; undistorted iteratively).
    Returns:
        origins ``(N, 3)`` (the camera centres) and unit directions ``(N, 3)``, world units.

    Example: the principal point of an identity camera looks down −z.

    >>> o, d = rays_for_pixels(torch.eye(4), torch.tensor([10., 10., 4., 3.]), torch.tensor([[4., 3.]]))
    >>> d.tolist()
    [[0.0, 0.0, -1.0]]
    """
    dirs = camera_directions(intrinsics, pixel_uv, distortion)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    c2w = c2w.to(dirs)
    if c2w.dim() == 2:
        return c2w[:3, 3].expand_as(dirs).contiguous(), dirs @ c2w[:3, :3].T
    return c2w[:, :3, 3].contiguous(), torch.einsum("nij,nj->ni", c2w[:, :3, :3], dirs)


def backproject(c2w: torch.Tensor, intrinsics: torch.Tensor, pixel_uv: torch.Tensor, z: torch.Tensor,
                distortion: torch.Tensor | None = None) -> torch.Tensor:
    """World points at z-depth ``z`` behind pixel coordinates: ``X = t + R · (dir_cam · z)``.

    Args:
        c2w: ``(4, 4)`` or ``(N, 4, 4)``; intrinsics ``(4,)`` or ``(N, 4)``; pixel_uv ``(N, 2)``;
        z: ``(N,)`` z-depth along the optical axis (world units); distortion as in
        :func:`rays_for_pixels`.
    Returns:
        ``(N, 3)`` world points.
    """
    cam = camera_directions(intrinsics, pixel_uv, distortion)
    cam = cam * z.to(cam.dtype)[:, None]
    c2w = c2w.to(cam)
    if c2w.dim() == 2:
        return cam @ c2w[:3, :3].T + c2w[:3, 3]
    return torch.einsum("nij,nj->ni", c2w[:, :3, :3], cam) + c2w[:, :3, 3]


def project(views: Views, index: int, x_world: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixel coordinates ``u, v`` and depth ``z`` (> 0 in front) of world points ``(n, 3)``, through the
    view's lens distortion when it has one."""
    c2w = views.c2w[index].float()
    cam = (x_world - c2w[:3, 3]) @ c2w[:3, :3]  # R^T (x − t), rows
    z = -cam[:, 2]
    K = views.intrinsics[index].tolist()
    fx, fy, cx, cy = K
    zs = z.clamp_min(1e-8)
    xy = torch.stack([cam[:, 0] / zs, -cam[:, 1] / zs], dim=-1)  # normalised, y down
    if views.distortion is not None:
        lens = views.distortion[index]
        xy = distort_within(xy, lens, _image_radius2(tuple(K), tuple(lens.tolist()), views.hw))
    return cx + fx * xy[:, 0], cy + fy * xy[:, 1], z


@functools.lru_cache(maxsize=4096)
def _image_radius2(intrinsics: tuple, lens: tuple, hw: tuple[int, int]) -> float:
    """:func:`vqad.nerf.lens.image_radius2` of one view, remembered: the carving and the depth checks
    project into the same views again and again."""
    return image_radius2(intrinsics, lens, hw)


def camera_rays(views: Views, indices: int | Sequence[int] | torch.Tensor,
                device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every pixel-centre ray of one or several views (row-major, view after view).

    Args:
        views: a split of a :class:`~vqad.nerf.data.SceneDataset`.
        indices: a view index, or a sequence of K indices.
        device: where to build the rays (default: CPU).
    Returns:
        origins and unit directions, ``(H·W, 3)`` each for one index or ``(K·H·W, 3)`` for K,
        in world units; pixel ``(row, col)`` of the k-th view is row ``k·H·W + row·W + col``.
    """
    single = isinstance(indices, int)
    idx = [indices] if single else [int(i) for i in indices]
    h, w = views.hw
    uv = pixel_centers(h, w, device=device)
    outs_o, outs_d = [], []
    for i in idx:
        if not -len(views) <= i < len(views):
            raise IndexError(f"view {i} out of range: the split has {len(views)} views")
        dist = views.distortion[i].to(device) if views.distortion is not None else None
        o, d = rays_for_pixels(views.c2w[i].float().to(device), views.intrinsics[i].float().to(device), uv, dist)
        outs_o.append(o)
        outs_d.append(d)
    return torch.cat(outs_o), torch.cat(outs_d)



# -- rays ----------------------------------------------------------------------------------------
def pixel_rays(c2w: torch.Tensor, intrinsics: torch.Tensor, px: torch.Tensor, py: torch.Tensor,
               distortion: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """World rays through pixel centres (:func:`vqad.nerf.rays.rays_for_pixels`).

    Args:
        c2w: ``(n, 4, 4)`` per ray (OpenGL: the camera looks down −z), intrinsics ``(n, 4)``
            fx, fy, cx, cy; px, py ``(n,)`` integer pixel columns and rows; distortion ``(n, 9)`` lens
            rows (:func:`vqad.nerf.lens.lens_rows`), a :class:`vqad.nerf.lens.LensBatch`, or None.
    Returns:
        origins ``(n, 3)``, unit directions ``(n, 3)`` and ``cos (n,)``, the cosine between each
        direction and the optical axis (a z-depth z is the ray distance ``z / cos``).
    """
    uv = torch.stack([px, py], dim=-1).to(intrinsics.dtype) + 0.5
    o, d = rays_for_pixels(c2w, intrinsics, uv, distortion)
    cos = -(d * c2w[:, :3, 2]).sum(-1)  # the camera looks down −z: the optical axis is −c2w[:3, 2]
    return o, d, cos


_POPCOUNT8 = np.array([bin(v).count("1") for v in range(256)], dtype=np.uint8)  # (256,): set bits of each byte
# (256·8,): the position of each byte's j-th set bit (lowest first), at [byte·8 + j] (0 past its last)
_SELECT8 = np.array([[[i for i in range(8) if v >> i & 1][j] if j < bin(v).count("1") else 0 for j in range(8)]
                     for v in range(256)], dtype=np.uint8).reshape(-1)


class KeptPixels:
    """The pixels that ``(N, H, W)`` bool loss masks keep, as flat ids ``view·H·W + row·W + col``, without listing
    them: the masks packed one bit a pixel (:attr:`bytes`, 8 bytes, 64 pixels, a row) and the kept pixels counted
    before each row (:attr:`starts`; int32 while the count fits, else int64).

    That is 3/16 of a byte a pixel (1/4 past 2^31 kept pixels) whatever share is kept, on the device; the sorted
    list of kept ids it replaces took 4 bytes a kept pixel (4.2 GiB held for 300 photos of 1920×1080).
    :meth:`nth` finds the k-th kept pixel, so a draw of uniform k in ``[0, count)`` is a uniform kept pixel,
    the same pixel the list's ``ids[k]`` was.
    """

    WORD = 64  # pixels a row of :attr:`bytes`

    def __init__(self, valid: torch.Tensor, device: torch.device):
        bits = np.packbits(valid.reshape(-1).numpy(), bitorder="little")  # (⌈N·H·W / 8⌉,) uint8: pixel p is bit p % 8
        bits = np.concatenate([bits, np.zeros((-bits.size) % 8, np.uint8)]).reshape(-1, 8)
        per_row = _POPCOUNT8[bits].sum(axis=1, dtype=np.int64)
        self.count = int(per_row.sum())  # K, the kept pixels
        starts = np.cumsum(per_row) - per_row
        self.bytes = torch.from_numpy(bits).to(device)  # (⌈N·H·W / 64⌉, 8) uint8
        self.starts = torch.from_numpy(starts.astype(np.int32 if self.count < 2**31 else np.int64)).to(device)  # (same,)
        self._popcount = torch.from_numpy(_POPCOUNT8).to(device)
        self._select = torch.from_numpy(_SELECT8).to(device)

    def nth(self, k: torch.Tensor) -> torch.Tensor:
        """Flat ids ``(n,)`` int64 of the k-th kept pixels in ascending order, for ``k (n,)`` in ``[0, count)``."""
        row = torch.searchsorted(self.starts, k.to(self.starts.dtype), right=True) - 1  # the last row starting at or before k
        rank = k - self.starts[row].long()  # (n,) in [0, 64): which of the row's set bits
        octets = self.bytes[row]  # (n, 8)
        upto = self._popcount[octets.long()].long().cumsum(dim=1)  # (n, 8): set bits up to each byte's end
        byte = (upto <= rank.unsqueeze(1)).sum(dim=1)  # the byte holding it
        rank = rank - torch.where(byte > 0, upto.gather(1, (byte - 1).clamp_min(0).unsqueeze(1)).squeeze(1), 0)
        bit = self._select[octets.gather(1, byte.unsqueeze(1)).squeeze(1).long() * 8 + rank]
        return row * self.WORD + byte * 8 + bit.long()


class RayBatcher:
    """A split's pixels held compactly on ``device`` (uint8 colours) and turned into rays on demand.

    Rays are returned in the unit cube: ``o = (o_world − center) · scale`` and unit ``d``, with
    ``near``/``far`` (unit-cube lengths along ``d``) from the dataset's world-unit bounds.
    """

    def __init__(self, views: Views, dataset: SceneDataset, device: torch.device):
        self.device = device
        self.N, (self.H, self.W) = len(views), views.hw
        self.colors = views.images.reshape(-1, 3).to(device)  # (N·H·W, 3) uint8
        self.c2w = views.c2w.float().to(device)
        self.intrinsics = views.intrinsics.float().to(device)
        self.lenses = None  # (LensTable, each view's row in it (N,)): the rays' lenses, prepared once
        if views.distortion is not None:
            self.lenses = lens_table(views.distortion.float().to(device))
        self.norm = dataset.normalization
        self.near, self.far = float(dataset.near), float(dataset.far)
        self.background = tuple(float(c) for c in dataset.background)
        # the depth loss's targets as unit-cube ray distances: the pixels that have one, sorted flat ids (K,) int32
        # (int64 past 2^31 pixels) and their distances (K,); or a map (N·H·W,), NaN where a pixel has none
        self._depth_list: tuple[torch.Tensor, torch.Tensor] | None = None
        self._depth_map: torch.Tensor | None = None
        # (N, H, W) bool loss masks, or None (none, or keeping every pixel): :attr:`kept` is built from them when asked
        self._valid = views.valid if views.valid is not None and not bool(views.valid.all()) else None
        self._kept: KeptPixels | None = None
        self.names = [str(n) for n in views.names]  # each view's photo, in order
        self.composited = views.composited  # the reader composited the photos on the background the camera never saw

    def set_depth_targets(self, ids: torch.Tensor, distances: torch.Tensor) -> None:
        """Targets of :meth:`depth_targets_for` as a list: ``ids (K,)`` ascending flat pixel ids, ``distances (K,)``
        their world ray distances (:class:`vqad.nerf.depth_prior.DepthTargets`, which picks this or :meth:`set_depth_map`)."""
        ids, distances = ids.reshape(-1).long(), distances.reshape(-1).float()
        if ids.shape != distances.shape:
            raise ValueError(f"depth targets: {ids.numel()} pixel ids for {distances.numel()} distances")
        if ids.numel() and (int(ids[0]) < 0 or int(ids[-1]) >= self.num_rays or not bool((ids[1:] > ids[:-1]).all())):
            raise ValueError(f"depth targets: pixel ids must be ascending in [0, {self.num_rays}) "
                             f"({self.N} views of {self.H}x{self.W})")
        small = torch.int32 if self.num_rays < 2**31 else torch.int64
        self._depth_list = (ids.to(small).to(self.device), (distances * self.norm.scale).to(self.device))
        self._depth_map = None

    def set_depth_map(self, distances: torch.Tensor) -> None:
        """Targets of :meth:`depth_targets_for` as a map: ``distances (N, H, W)`` world ray distances, NaN (or any
        non-finite value) where a pixel has none."""
        if tuple(distances.shape) != (self.N, self.H, self.W):
            raise ValueError(f"depth map of shape {tuple(distances.shape)} for {self.N} views of {self.H}x{self.W}")
        unit = distances.reshape(-1).to(self.device, torch.float32, copy=True).mul_(self.norm.scale)  # one copy
        self._depth_map = unit.masked_fill_(~torch.isfinite(unit), float("nan"))
        self._depth_list = None

    @property
    def has_depth_targets(self) -> bool:
        """Whether :meth:`set_depth_targets` or :meth:`set_depth_map` gave the loss its targets."""
        return self._depth_list is not None or self._depth_map is not None

    def depth_targets_for(self, flat: torch.Tensor) -> torch.Tensor:
        """``(n,)`` unit-cube ray distances of flat pixel ids' targets (NaN: none)."""
        if self._depth_map is not None:
            return self._depth_map[flat]
        if self._depth_list is None:
            raise ValueError("no depth targets: call set_depth_targets or set_depth_map first")
        ids, dist = self._depth_list
        if ids.numel() == 0:
            return torch.full(flat.shape, float("nan"), device=flat.device)
        pos = torch.searchsorted(ids, flat.to(ids.dtype)).clamp_(max=ids.numel() - 1)
        return torch.where(ids[pos] == flat, dist[pos], torch.full_like(dist[pos], float("nan")))

    @property
    def num_rays(self) -> int:
        """Every pixel of the split (the range of flat ids)."""
        return self.N * self.H * self.W

    @property
    def kept(self) -> KeptPixels | None:
        """The pixels the loss masks keep, packed for drawing (:class:`KeptPixels`: 3/16 of a byte a pixel,
        on the device, built on first use, so rendering a split never pays for it), or None: every pixel."""
        if self._kept is None and self._valid is not None:
            self._kept = KeptPixels(self._valid, self.device)
        return self._kept

    def views_with_pixels(self) -> torch.Tensor:
        """``(N,) bool``: the views whose loss masks keep at least one pixel (every view without masks)."""
        if self._valid is None:
            return torch.ones(self.N, dtype=torch.bool)
        return self._valid.flatten(1).any(dim=1)

    @property
    def num_valid(self) -> int:
        """The pixels the training samples: those its loss masks keep (every pixel without masks)."""
        kept = self.kept
        return self.num_rays if kept is None else kept.count

    def view_of(self, flat: torch.Tensor) -> torch.Tensor:
        """The view ``(n,)`` of each flat pixel id ``(n,)``."""
        return torch.div(flat, self.H * self.W, rounding_mode="floor")

    def rays_for(self, flat: torch.Tensor):
        """Rays of flat pixel ids ``(n,)`` (``view·H·W + row·W + col``): o, d, rgb, near, far."""
        view = self.view_of(flat)
        pix = flat % (self.H * self.W)
        py, px = pix // self.W, pix % self.W
        dist = LensBatch(self.lenses[0], self.lenses[1][view]) if self.lenses is not None else None
        o, d, cos = pixel_rays(self.c2w[view], self.intrinsics[view], px, py, dist)
        o = self.norm.to_unit(o)
        s = self.norm.scale
        near = torch.full_like(cos, self.near * s)  # a z-depth bound is a lower bound on the ray distance
        far = self.far * s / cos.clamp_min(1e-6)
        rgb = self.colors[flat].float() * (1.0 / 255.0)
        return o, d, rgb, near, far

    def sample_ids(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``(n,)`` uniformly random flat pixel ids on the batcher's device, among those the loss masks keep."""
        kept = self.kept
        if kept is None:
            return torch.randint(0, self.num_rays, (n,), generator=generator).to(self.device)
        if kept.count == 0:
            raise InputError(f"the loss masks leave out every pixel of these views: there is no pixel to draw; "
                             f"{MASK_POLARITY}")
        return kept.nth(torch.randint(0, kept.count, (n,), generator=generator).to(self.device))

    def sample(self, n: int, generator: torch.Generator):
        """``n`` uniformly random training pixels (:meth:`sample_ids`): o, d ``(n, 3)``, rgb ``(n, 3)``, near, far ``(n,)``."""
        return self.rays_for(self.sample_ids(n, generator))

    def view(self, index: int):
        """Every pixel of one view, row-major: o, d, rgb, near, far with ``H·W`` rows."""
        base = index * self.H * self.W
        return self.rays_for(torch.arange(base, base + self.H * self.W, device=self.device))
