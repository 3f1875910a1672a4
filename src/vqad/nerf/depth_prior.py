"""Depth targets for training rays: where a capture says the first surface behind a pixel is.

A capture's sparse structure-from-motion points (COLMAP's points3D, nerfstudio's ``sparse_pc.ply``,
:attr:`vqad.nerf.data.SceneDataset.points`) are surface points; projected into a training view, the
nearest one in a pixel is the surface that pixel sees, unless a point in the pixels around it is
clearly nearer (it lies behind a surface that hides it, whose own points are sparser than the
pixels) or clearly farther (it is an occluder's rim, and the pixel's centre may see past it).
:func:`points_depth_targets` turns them into one target per covered pixel: the ray distance
from the camera to the point. A capture with dense depth (:attr:`vqad.nerf.data.Views.depth`, the
procedural scenes) gives a target for every pixel with a hit instead (:func:`capture_depth_targets`).

:func:`depth_spread_loss` then asks each supervised ray's weights to sit at its target (DS-NeRF's
idea, "Depth-supervised NeRF: fewer views and faster training for free", Deng et al. 2022, with a
robust penalty rather than a KL one): per ray ``Σ_i w_i ρ((t_i − t*) / (s t*))``, ``ρ(x) = x² / (1 + x²)``
(Geman–McClure), ``s`` = :data:`DEPTH_TOLERANCE`. Relative, so a far target (contracted space, where a
cell spans more) tolerates proportionally more; bounded, so a wrong target costs a unit of weight at
most 1, as a far one does. The penalty never rewards opacity: a ray whose pixel shows nothing pays 0.

Where the points count: in a contracted scene (``outer_scale > 1``: ngp ``aabb_scale``, COLMAP bounds)
only the points outside the central box give targets (every point still hides what lies behind it).
The central box is seen from all around and the
colours of many views pin its geometry, while the occlusion test cannot sort out every point behind a
nearby surface (back faces within the margin): on the generated capture's object alone, targets from
all its points cost 2 dB. The contracted shell is seen from afar, at grazing angles, by few views:
there the colours leave the depth loose, and the targets pin it (docs/benchmarks/scene.md,
sixteenth session). A scene without contraction takes every point (that same object lost 2 dB: the
loss is off unless asked for there); depth maps give every pixel.

Pixel convention: :mod:`vqad.nerf.octree_build` (``u = cx + fx X / (−Z)``, ``v = cy − fy Y / (−Z)``,
pixel ``(floor(u), floor(v))``), with the view's lens distortion applied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vqad.errors import InputError
from vqad.nerf.contraction import contract
from vqad.nerf.data import SceneDataset, Views
from vqad.nerf.rays import camera_directions, pixel_centers, project

#: a point is hidden in a view when a point projected within :data:`OCCLUSION_WINDOW` pixels of it is
#: nearer than its ray distance / (1 + this) (ground seen at grazing angles changes by ~2 % a pixel)
OCCLUSION_MARGIN = 0.1
OCCLUSION_WINDOW = 2  # pixels each side
RIM_WINDOW = 1  # a point with a point this much farther within this many pixels is an occluder's rim
#: s of :func:`depth_spread_loss`: a unit of weight this share of the target's distance away from it
#: costs half of what one far from it costs
DEPTH_TOLERANCE = 0.05


#: the share of a split's pixels with a target from which a map of every pixel (4 bytes a pixel) is smaller
#: than the list of those pixels and their distances (8 bytes a target on the device: int32 ids; 12 on the host)
DENSE_SHARE = 1 / 2


@dataclass(frozen=True)
class DepthTargets:
    """Depth targets of a split's ``N × H × W`` pixels, in whichever form is smaller: the pixels that have
    one and their distances (sparse points give a few percent of the pixels one), or a map of every pixel
    (depth maps give nearly all of them one: 4 bytes a pixel where the list would take 8 a target on the
    device and 12 on the host, 7.5 GB for 300 photos of 1920 × 1080). :meth:`of` picks the form
    (:data:`DENSE_SHARE`). The tensors are the targets' own: read them, do not write them.

    Attributes:
        shape: ``(N, H, W)``.
        ids: ``(K,)`` int64 flat pixel ids ``view·H·W + row·W + col``, ascending (the list form), or None.
        distances: ``(K,)`` float32 world ray distances from the camera (the list form), or None.
        pixel_map: ``(N·H·W,)`` float32 world ray distances, NaN where a pixel has no target (the map form), or None.
        count: K, the pixels with a target.
    """

    shape: tuple[int, int, int]
    ids: torch.Tensor | None
    distances: torch.Tensor | None
    pixel_map: torch.Tensor | None
    count: int

    @classmethod
    def of(cls, shape: tuple[int, int, int], ids: torch.Tensor | None = None, distances: torch.Tensor | None = None,
           pixel_map: torch.Tensor | None = None) -> "DepthTargets":
        """From the list form (``ids``, ``distances``) or the map form (``pixel_map``, NaN or any non-finite value
        where a pixel has no target, any shape of ``N·H·W`` elements), kept in the smaller form."""
        pixels = shape[0] * shape[1] * shape[2]
        if pixel_map is not None:
            pixel_map = pixel_map.reshape(-1).float()
            if pixel_map.numel() != pixels:
                raise ValueError(f"depth targets: a map of {pixel_map.numel()} pixels for {shape}")
            finite = torch.isfinite(pixel_map)
            count = int(finite.sum())
            if count >= DENSE_SHARE * pixels:  # a new tensor: the caller's is left as it was
                return cls(tuple(shape), None, None, torch.where(finite, pixel_map, float("nan")), count)
            ids = torch.nonzero(finite)[:, 0]
            return cls(tuple(shape), ids, pixel_map[ids], None, count)
        ids, distances = ids.reshape(-1).long(), distances.reshape(-1).float()
        if ids.shape != distances.shape:
            raise ValueError(f"depth targets: {ids.numel()} pixel ids for {distances.numel()} distances")
        if ids.numel() >= DENSE_SHARE * pixels:
            dense = torch.full((pixels,), float("nan"))
            dense[ids] = distances
            return cls(tuple(shape), None, None, dense, int(ids.numel()))
        return cls(tuple(shape), ids, distances, None, int(ids.numel()))

    @classmethod
    def from_dense(cls, dense: torch.Tensor) -> "DepthTargets":
        """From ``(N, H, W)`` distances, NaN (or any non-finite value) where a pixel has no target."""
        return cls.of(tuple(dense.shape), pixel_map=dense)

    def dense(self) -> torch.Tensor:
        """``(N, H, W)`` float32, NaN where a pixel has no target (a copy)."""
        if self.pixel_map is not None:
            return self.pixel_map.view(self.shape).clone()
        out = torch.full((self.shape[0] * self.shape[1] * self.shape[2],), float("nan"))
        out[self.ids] = self.distances
        return out.view(self.shape)

    def give_to(self, batcher) -> None:
        """Hand the targets to a :class:`vqad.nerf.rays.RayBatcher` of the same split, in their form."""
        if self.pixel_map is not None:
            batcher.set_depth_map(self.pixel_map.view(self.shape))
        else:
            batcher.set_depth_targets(self.ids, self.distances)

    def __len__(self) -> int:
        return self.count


def _gather(ids: list[torch.Tensor], dist: list[torch.Tensor], shape: tuple[int, int, int]) -> DepthTargets:
    """Per view, ascending ids and their distances, views in order: one :class:`DepthTargets`."""
    if not ids:
        return DepthTargets.of(shape, torch.zeros(0, dtype=torch.long), torch.zeros(0))
    return DepthTargets.of(shape, torch.cat(ids), torch.cat(dist))


def points_depth_targets(points: torch.Tensor, views: Views, margin: float = OCCLUSION_MARGIN,
                         window: int = OCCLUSION_WINDOW, rim: int = RIM_WINDOW,
                         targets: torch.Tensor | None = None) -> DepthTargets:
    """Per pixel of every view, the world ray distance to the nearest visible sparse point, where any.

    Args:
        points: ``(P, 3)`` world points.
        views: ``N`` views of ``H × W`` pixels.
        margin, window, rim: the occlusion and rim tests (module docstring).
        targets: ``(P,)`` bool, or None (all): the points that may give a target; the others still hide
            what lies behind them.
    Returns:
        the ray distances (world units) of the pixels with a visible point; one view's ``H × W`` map at a
        time in memory.
    """
    N, (H, W) = len(views), views.hw
    got_ids, got_dist = [], []
    pts = points.float()
    for n in range(N):
        u, v, z = project(views, n, pts)  # through the view's lens
        front = z > 1e-6
        u, v = u[front], v[front]
        usable = targets[front] if targets is not None else None
        to_cam = pts[front] - views.c2w[n, :3, 3].float()
        inside = (u >= 0) & (u < W) & (v >= 0) & (v < H)
        if not bool(inside.any()):
            continue
        pix = v[inside].long() * W + u[inside].long()
        dist = to_cam[inside].norm(dim=-1)
        nearest = torch.full((H * W,), float("inf")).scatter_reduce_(0, pix, dist, "amin")
        keep = torch.isfinite(nearest)
        if usable is not None:  # the pixel's nearest point is one that may give a target
            first = torch.zeros(H * W, dtype=torch.bool)
            first[pix[usable[inside] & (dist == nearest[pix])]] = True
            keep &= first
        img = nearest.view(1, 1, H, W)
        if window > 0:  # no clearly nearer point within the window: this one is not hidden behind a surface
            lo = -torch.nn.functional.max_pool2d(-img, 2 * window + 1, stride=1, padding=window).view(-1)
            keep &= nearest <= (1.0 + margin) * lo
        if rim > 0:  # no clearly farther one next to it: this one is not an occluder's rim, the pixel's centre behind it
            hi = torch.nn.functional.max_pool2d(img.nan_to_num(posinf=0.0), 2 * rim + 1, stride=1, padding=rim).view(-1)
            keep &= hi <= (1.0 + margin) * nearest
        if views.valid is not None:  # a pixel its loss mask leaves out is never trained on: no target
            keep &= views.valid[n].reshape(-1)
        at = torch.nonzero(keep)[:, 0]
        got_ids.append(at + n * H * W)
        got_dist.append(nearest[at])
    return _gather(got_ids, got_dist, (N, H, W))


def capture_depth_targets(views: Views) -> DepthTargets:
    """The capture's own z-depth maps as ray distances (world units), for every pixel with a hit
    (depth > 0). Needs :attr:`Views.depth`."""
    if views.depth is None:
        raise ValueError("capture_depth_targets: the views have no depth")
    N, (H, W) = len(views), views.hw
    uv = pixel_centers(H, W)
    dist = torch.empty(N, H * W)  # one map, filled view by view: no per-view lists to join
    for n in range(N):
        k = views.distortion[n].float() if views.distortion is not None else None
        per_z = camera_directions(views.intrinsics[n].float(), uv, k).norm(dim=-1)  # ray distance per unit z
        z = views.depth[n].float().reshape(-1)
        torch.where(z > 0, z * per_z, torch.tensor(float("nan")), out=dist[n])
    return DepthTargets.of((N, H, W), pixel_map=dist)


def depth_spread_loss(weights: torch.Tensor, t_mid: torch.Tensor, ray_indices: torch.Tensor,
                      target: torch.Tensor, scale: float = DEPTH_TOLERANCE) -> torch.Tensor:
    """Mean over the rays with a target of ``Σ_i w_i ρ((t_i − t*_r) / (s t*_r))``, ``ρ(x) = x² / (1 + x²)``
    (Geman–McClure: each unit of weight away from the target costs at most 1, so a wrong target, an
    occluded point that passed :func:`points_depth_targets`' test, pulls no harder than a far one).

    Args:
        weights: ``(S,)`` volume-rendering weights w_i.
        t_mid: ``(S,)`` the samples' ray distances (the same unit as ``target``).
        ray_indices: ``(S,)`` each sample's ray.
        target: ``(R,)`` each ray's target distance t*, NaN for a ray without one.
    Returns:
        a scalar (0 when no sampled ray has a target). No host synchronisation: it runs every training step.
    """
    t_star = target.index_select(0, ray_indices)
    on = torch.isfinite(t_star)
    t_star = torch.where(on, t_star, torch.ones_like(t_star))  # finite everywhere: no NaN in any gradient
    rel2 = ((t_mid - t_star) / (scale * t_star)) ** 2
    n = torch.isfinite(target).sum().clamp_min(1)
    return (weights * on * (rel2 / (1.0 + rel2))).sum() / n


def has_points(dataset: SceneDataset) -> bool:
    """Whether the capture came with sparse points."""
    return dataset.points is not None and len(dataset.points) > 0


def depth_source(dataset: SceneDataset, source: str = "auto", split: str = "train") -> str:
    """``source`` resolved for ``dataset``: ``capture`` (the views' depth maps) or ``points`` (its sparse
    points); ``auto``: depth maps where the capture has them, else points. A source the capture lacks is
    an :class:`InputError` that says what to do."""
    views = dataset.splits[split]
    if source == "auto":
        source = "capture" if views.depth is not None else "points"
    if source == "capture" and views.depth is None:
        raise InputError(f"--depth-from capture: {dataset.name!r} has no depth maps; use --depth-from points "
                         f"(its sparse points) or leave --depth-weight at 0")
    if source == "points" and not has_points(dataset):
        if views.depth is not None:  # only --depth-from points itself gets here: auto would have taken the maps
            raise InputError(f"--depth-from points: {dataset.name!r} has no sparse points (COLMAP's points3D, "
                             f"transforms.json's ply_file_path), but it has depth maps: use --depth-from capture (or auto)")
        raise InputError(f"--depth-weight needs depth targets: {dataset.name!r} has no depth maps and no sparse "
                         f"points (COLMAP's points3D, transforms.json's ply_file_path); leave --depth-weight at 0")
    return source


def depth_targets(dataset: SceneDataset, source: str = "auto", octree=None, split: str = "train") -> DepthTargets:
    """The world ray distances of ``split``'s pixels that have a target, from ``source``
    (:func:`depth_source`); in a contracted scene, targets from the points outside the central box
    only (module docstring). With ``octree`` (the field's :class:`~vqad.octree.SparseOctree`), only the
    sparse points inside its cells count: an outlier floating in free space (a mismatched feature)
    would otherwise pull rays' weights into the air."""
    source = depth_source(dataset, source, split)
    views = dataset.splits[split]
    if source == "capture":
        return capture_depth_targets(views)
    points = dataset.points.float()
    unit = dataset.normalization.to_unit(points)
    if octree is not None:  # outliers in free space neither give targets nor hide anything
        inside = octree.contains(contract(unit, dataset.outer_scale).to(octree.device)).cpu()
        points, unit = points[inside], unit[inside]
    # in a contracted scene only the shell's points give targets, the central box's still hide what is behind them
    shell = unit.abs().amax(-1) > 1.0 if dataset.outer_scale > 1 else None
    return points_depth_targets(points, views, targets=shell)
