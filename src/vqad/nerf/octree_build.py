"""The radiance field's octree, four ways, each with a dilation margin of ``dilate`` finest cells.

* :func:`octree_from_depth` — the paper's way: back-project every valid depth pixel;
* :func:`octree_from_masks` — visual-hull carving from foreground masks (object captures, lego);
* :func:`octree_from_points` — the capture's sparse structure-from-motion points (COLMAP, ngp's
  ``ply_file_path``), isolated points dropped;
* :func:`octree_from_density` — a short coarse density pass on a low-resolution dense grid, which
  needs nothing but RGB (forward-facing captures such as LLFF fern).

:func:`build_octree` with ``method="auto"`` picks depth > masks > points > density, by what the training split
has. Every function works in the dataset's unit cube (``dataset.normalization``) and returns a
:class:`~vqad.octree.SparseOctree` on ``device``; an octree that would be empty raises
:class:`~vqad.errors.InputError`.

Camera convention (:mod:`vqad.nerf.data`): OpenGL camera-to-world, pixel ``(i, j)`` covers
``[i, i+1) × [j, j+1)``, so a camera-space point ``(X, Y, Z)`` (``Z < 0`` in front) lands at
``u = cx + fx X / (−Z)``, ``v = cy − fy Y / (−Z)`` and pixel ``(floor(u), floor(v))``, through the
view's lens (:mod:`vqad.nerf.lens`) when it has one: applied by the mask test, undone for depth
back-projection.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vqad.errors import InputError
from vqad.octree import SparseOctree, cell_coords, dilate_codes, morton_decode, morton_encode
from vqad.nerf.data import SceneDataset, Views
from vqad.nerf.contraction import contract
from vqad.nerf.rays import backproject, project


def available_methods(dataset: SceneDataset, split: str = "train") -> list[str]:
    """Octree methods the split supports, best first (density always works)."""
    views = dataset.splits[split]
    out = []
    if views.depth is not None:
        out.append("depth")
    if views.masks is not None:
        out.append("mask")
    if dataset.points is not None and dataset.points.shape[0] > 0:
        out.append("points")
    return out + ["density"]


def resolve_method(dataset: SceneDataset, method: str, split: str = "train") -> str:
    from vqad.nerf.task import OCTREE_CHOICES  # the one list of methods

    if method not in OCTREE_CHOICES:
        raise InputError(f"unknown octree method {method!r}: choose one of {', '.join(OCTREE_CHOICES)}")
    have = available_methods(dataset, split)
    if method == "auto":
        return have[0]
    if method not in have:
        what = {"depth": "depth maps", "mask": "foreground masks",
                "points": "sparse points (COLMAP points3D, or ply_file_path in transforms.json)"}[method]
        raise InputError(
            f"--octree {method}: the {dataset.format} dataset {dataset.name!r} has no {what}; "
            f"use one of {', '.join(have)} (or auto)"
        )
    return method


def build_octree(dataset: SceneDataset, method: str, base_level: int, max_level: int, device,
                 dilate: int = 1, split: str = "train", **kwargs) -> tuple[SparseOctree, str]:
    """The octree by ``method`` (``auto | depth | mask | points | density``); returns it and the method used.

    ``kwargs`` go to the chosen builder (e.g. ``steps`` of the density pass).
    """
    requested, method = method, resolve_method(dataset, method, split)
    try:
        if method == "depth":
            return octree_from_depth(dataset, base_level, max_level, device, dilate=dilate, split=split), method
        if method == "mask":
            return octree_from_masks(dataset, base_level, max_level, device, dilate=dilate, split=split), method
        if method == "points":
            return octree_from_points(dataset, base_level, max_level, device, dilate=dilate), method
    except InputError as e:
        # name the choice the user did not make, and the way out (none for an octree too fine: any method's is)
        if requested == "auto" and method == "points" and not isinstance(e, OctreeTooFine):
            said = "--octree density" in str(e)
            raise InputError(f"--octree auto chose the capture's sparse points, but: {e}"
                             + ("" if said else " (or pass --octree density)")) from e
        raise
    return octree_from_density(dataset, base_level, max_level, device, dilate=dilate, split=split, **kwargs), method


def _capture(info: dict) -> dict:
    """What identifies the images a model was fitted to, from :func:`~vqad.nerf.train.dataset_info`."""
    src = info.get("source") or ""
    return {"name": info.get("name"), "source": str(Path(src).resolve()) if src else "",
            "format": info.get("format"), "downscale": int(info.get("downscale") or 1)}


def octree_from_model(source, dataset: SceneDataset, base_level: int, max_level: int, device) -> SparseOctree:
    """The octree of an earlier radiance-field fit of the same capture (a checkpoint directory or a
    .vqad file), rebuilt for ``base_level..max_level``.

    A density pass costs minutes and depends only on the capture, so fits of several storages or
    bitrates can share one. The model must come from the same images (source, format, downscale)
    and have the same finest level; its dilation margin comes with it.
    """
    from vqad.api import load
    from vqad.nerf.data import dataset_info

    field = load(source, device=device)
    if field.kind != "nerf":
        raise InputError(f"--octree-from: {source} holds a {field.kind!r} model, not a radiance field")
    ours, theirs = _capture(dataset_info(dataset)), _capture(field.dataset)
    diff = [f"{k} {theirs[k]!r} vs {ours[k]!r}" for k in ours if theirs[k] != ours[k]]
    if diff:
        raise InputError(f"--octree-from: {source} was fitted to other images ({'; '.join(diff)}): "
                         "reuse the octree of a fit of this capture at the same --downscale")
    oc = field.grid.octree
    if oc.max_level != max_level:
        raise InputError(f"--octree-from: {source} has finest level {oc.max_level}, this fit's --levels end at "
                         f"{max_level}: use --levels {base_level}:{oc.max_level} or build a new octree")
    return SparseOctree.from_codes(oc.codes[oc.max_level], base_level, max_level)


def _finest_cells_to_octree(ijk: torch.Tensor, base_level: int, max_level: int, device, dilate: int, what: str) -> SparseOctree:
    """Octree whose finest level holds cells ``ijk (n, 3)`` dilated by ``dilate``."""
    if ijk.numel() == 0:
        raise InputError(f"the octree is empty: {what}")
    centers = (ijk.float() + 0.5) * (2.0 / (1 << max_level)) - 1.0
    return SparseOctree.from_points(centers.to(device), base_level, max_level, dilate=dilate)


# -- sparse points (structure from motion) ------------------------------------------------------------
#: sparse points mark cells this many levels above the finest: SfM points are far apart (tens of
#: thousands on a room's surfaces), a finest cell per point would leave holes between them
POINTS_LEVELS_UP = 1
#: a point whose cell and 26 neighbours (at that level) hold fewer points than this, itself included,
#: is an outlier (a mismatched feature floating in free space) and marks nothing
POINTS_MIN_AROUND = 3
#: ... but never finer than the level where the points average this many per occupied cell: finer, the
#: gaps between them outgrow the one-cell growth and the outlier test drops real surface points. The
#: generated room's 30,000 points average 4.2 per level-6 cell and 1.9 per level-7 cell; for
#: ``--levels 4:8`` marking level 7 held 90 % of the ground's true surface points (99.5 % at level 6)
#: and a 4-bit fit there stayed in a fog (docs/benchmarks/scene.md, ninth-session note)
POINTS_PER_CELL = 3.0


def points_level(x: torch.Tensor, max_level: int) -> int:
    """The level whose cells sparse points ``x (n, 3)`` (grid coordinates in ``[-1, 1]``) mark:
    ``max_level − POINTS_LEVELS_UP``, or the finest coarser one (down to 1) where they average at
    least :data:`POINTS_PER_CELL` per occupied cell."""
    level = max(1, max_level - POINTS_LEVELS_UP)
    while level > 1:
        ijk, _ = cell_coords(x, level)
        if x.shape[0] >= POINTS_PER_CELL * torch.unique(morton_encode(ijk)).numel():
            break
        level -= 1
    return level


def octree_from_points(dataset: SceneDataset, base_level: int, max_level: int, device, dilate: int = 1) -> SparseOctree:
    """Every cell of level ``max_level − POINTS_LEVELS_UP`` (coarser where the points are too sparse
    for it: :func:`points_level`) that holds one of the capture's sparse points (in the contracted
    cube when the scene is large), grown by one such cell to close the gaps between points,
    subdivided to ``max_level`` and dilated by ``dilate`` finest cells (a margin the coarse growth
    already covers when ``dilate`` is at most its cells' size in finest cells).

    Structure-from-motion points lie on textured surfaces, background included, so unlike the
    density pass this needs no fit; a surface without texture gets no points and no cells. Isolated
    points (fewer than :data:`POINTS_MIN_AROUND` in their cell and its neighbours) are dropped as
    outliers."""
    if dataset.points is None or dataset.points.shape[0] == 0:
        raise InputError(f"--octree points: {dataset.name!r} has no sparse points")
    x = contract(dataset.normalization.to_unit(dataset.points.to(device).float()), dataset.outer_scale)
    x = x[(x.abs() < 1).all(-1)]
    if x.shape[0] == 0:
        raise InputError(f"--octree points: none of the {dataset.points.shape[0]:,} sparse points of {dataset.name!r} "
                         "is inside the scene's box: check the points' file (and, in a transforms.json, its "
                         "aabb_scale / scale / offset), or use --octree density")
    level = points_level(x, max_level)
    res = 1 << level
    ijk, _ = cell_coords(x, level)
    cells, counts = torch.unique(morton_encode(ijk), return_counts=True)  # (c,) sorted, (c,)
    cijk = morton_decode(cells)
    nb = cijk[:, None, :] + _lattice(torch.arange(-1, 2, device=x.device))[None]  # (c, 27, 3)
    valid = ((nb >= 0) & (nb < res)).all(-1)
    q = morton_encode(nb.clamp(0, res - 1))
    pos = torch.searchsorted(cells, q).clamp(max=cells.numel() - 1)
    around = torch.where(valid & (cells[pos] == q), counts[pos], torch.zeros_like(pos)).sum(1)  # (c,)
    ijk = cijk[around >= POINTS_MIN_AROUND]
    if ijk.shape[0] == 0:
        raise InputError(f"--octree points: the {x.shape[0]:,} sparse points of {dataset.name!r} are all isolated "
                         f"(fewer than {POINTS_MIN_AROUND} within a cell of each other): use --octree density")
    fine = _dilate_and_subdivide(ijk, level, max_level)
    return _finest_cells_to_octree(fine, base_level, max_level, device, max(0, dilate - (1 << (max_level - level))),
                                   "no sparse point is inside the scene")


# -- depth ---------------------------------------------------------------------------------------
def backproject_depth(views: Views, index: int) -> torch.Tensor:
    """World points of view ``index``'s valid depth pixels: ``(n, 3)`` float32.

    ``X_cam = ((u − cx) z / fx, −(v − cy) z / fy, −z)`` at pixel centres ``(u, v)`` (undistorted
    when the view has lens distortion), ``X_world = R X_cam + t`` (:func:`vqad.nerf.rays.backproject`).
    """
    depth = views.depth[index].float()  # (H, W)
    rows, cols = torch.nonzero(depth > 0, as_tuple=True)
    uv = torch.stack([cols, rows], dim=-1).float() + 0.5
    dist = views.distortion[index] if views.distortion is not None else None
    return backproject(views.c2w[index].float(), views.intrinsics[index].float(), uv, depth[rows, cols], dist)


def octree_from_depth(dataset: SceneDataset, base_level: int, max_level: int, device, dilate: int = 1,
                      split: str = "train") -> SparseOctree:
    """Every finest cell that holds a back-projected depth sample, dilated by ``dilate`` cells."""
    views = dataset.splits[split]
    if views.depth is None:
        raise InputError(f"the {split!r} views have no depth maps: use --octree mask or density")
    res = 1 << max_level
    cells = []
    for n in range(len(views)):
        x = contract(dataset.normalization.to_unit(backproject_depth(views, n)), dataset.outer_scale)
        inside = ((x >= -1) & (x <= 1)).all(-1)
        ijk = torch.floor((x[inside] + 1) * (0.5 * res)).long().clamp_(0, res - 1)
        cells.append(torch.unique(morton_encode(ijk)))
    codes = torch.unique(torch.cat(cells)) if cells else torch.zeros(0, dtype=torch.long)
    return _finest_cells_to_octree(morton_decode(codes), base_level, max_level, device, dilate,
                                   "no depth sample fell inside the scene's box: are the depth maps in the poses' "
                                   "units? (a transforms.json's depth_unit_scale_factor: world units per stored unit, "
                                   "0.001 by default)")


# -- masks ---------------------------------------------------------------------------------------
def _mask_distance_maps(views: Views, max_pixels: int = 60_000_000) -> tuple[torch.Tensor, float]:
    """Per view, each pixel's distance (in pixels) to the nearest foreground pixel: ``(N, H', W')`` fp16.

    Masks are max-pooled by 2 until ``N·H'·W'`` fits ``max_pixels``; returns the maps and the
    scale ``H'/H`` to apply to intrinsics.
    """
    from scipy.ndimage import distance_transform_edt

    masks = views.masks
    factor = 1
    N, H, W = masks.shape
    while N * (H // factor) * (W // factor) > max_pixels:
        factor *= 2
    out = []
    for n in range(N):
        fg = masks[n] > 127
        if factor > 1:
            fg = torch.nn.functional.max_pool2d(fg[None, None].float(), factor, ceil_mode=True)[0, 0] > 0
        out.append(torch.from_numpy(distance_transform_edt(~fg.numpy()).astype(np.float16)))
    return torch.stack(out), 1.0 / factor


def octree_from_masks(dataset: SceneDataset, base_level: int, max_level: int, device, dilate: int = 1,
                      split: str = "train", miss_fraction: float = 0.05, start_level: int = 4) -> SparseOctree:
    """Visual-hull carving, coarse to fine.

    A cell is kept if, in all but ``miss_fraction`` of the views whose image contains its centre,
    its bounding sphere (radius ``√3 h / 2`` for cell size h) projects onto foreground, i.e. the
    distance from the centre's pixel to the nearest foreground pixel is at most the sphere's
    projected radius ``f r / z`` (+1 pixel). The test is conservative, so a cell that any part of
    the object touches survives; children of survivors are tested at the next level. Cells no
    view sees are dropped (nothing could supervise them).
    """
    views = dataset.splits[split]
    if views.masks is None:
        raise InputError(f"the {split!r} views have no foreground masks: use --octree density")
    if dataset.outer_scale > 1:
        raise InputError(f"the foreground (alpha) masks of {dataset.name!r} mark an object, but the scene extends to {dataset.outer_scale:g}× "
                         "its central box (aabb_scale): use --octree density, or a capture with aabb_scale 1")
    dist, s = _mask_distance_maps(views)
    N, Hs, Ws = dist.shape
    level = min(start_level, max_level)
    ijk = _lattice(torch.arange(1 << level))
    children = torch.tensor([[(c >> 2) & 1, (c >> 1) & 1, c & 1] for c in range(8)])
    while True:
        h = 2.0 / (1 << level)
        centers_unit = (ijk.float() + 0.5) * h - 1.0
        centers = dataset.normalization.to_world(centers_unit)
        radius = math.sqrt(3) * h / 2 / dataset.normalization.scale  # world units
        seen = torch.zeros(ijk.shape[0], dtype=torch.int32)
        missed = torch.zeros(ijk.shape[0], dtype=torch.int32)
        for n in range(N):
            u, v, z = project(views, n, centers)
            fx, fy = views.intrinsics[n, :2].tolist()
            u, v = u * s, v * s
            vis = (z > 1e-6) & (u >= 0) & (u < Ws) & (v >= 0) & (v < Hs)
            iu = u.clamp(0, Ws - 1).long()
            iv = v.clamp(0, Hs - 1).long()
            rho = max(fx, fy) * s * radius / z.clamp_min(1e-6) + 1.0
            far_from_fg = dist[n][iv, iu].float() > rho
            seen += vis.int()
            missed += (vis & far_from_fg).int()
        keep = (seen > 0) & (missed.float() <= miss_fraction * seen.float())
        ijk = ijk[keep]
        if level == max_level or ijk.numel() == 0:
            break
        ijk = (ijk[:, None, :] * 2 + children[None]).reshape(-1, 3)
        level += 1
    return _finest_cells_to_octree(ijk, base_level, max_level, device, dilate,
                                   "mask carving removed every cell (are the masks and poses consistent?)")


# -- density pass --------------------------------------------------------------------------------
@dataclass
class DensityPassConfig:
    """The short coarse fit that finds where the scene is when there is no depth and no mask.

    Coarse to fine, so that its cost follows the occupied space, not the box: a first stage fits a
    dense grid of ``coarse_level`` (16³ cells by default, marched one coarse cell per step: few
    samples per ray), keeps the cells some training ray sees, and the second stage fits ``level``
    (64³) only inside them. ``coarse_share`` of the steps and of the time cap go to the first stage;
    ``coarse_level >= level`` runs the fine stage alone on the whole cube (the former pass).

    What a sample costs (measured in docs/benchmarks/scene.md): each stage's grid has
    ``grid_levels`` octree levels (each one a trilinear lookup per sample), the fine stage marches
    ``fine_step_ratio`` of its cells per step, and the probe that measures the weights evaluates
    density alone and stops a ray once its transmittance is below ``weight_threshold`` (no later
    sample can reach that weight: ``w_i ≤ T_i``), ``probe_rays`` rays per stage.
    """

    level: int = 6  # resolution of the coarse dense grid (2^level cells per axis)
    coarse_level: int = 4  # the first stage's grid (>= level: one stage)
    coarse_share: float = 0.3  # the first stage's share of the steps and of max_minutes
    steps: int = 400
    batch_rays: int = 2048
    weight_threshold: float = 0.02  # keep coarse cells where some training ray puts this much weight
    probe_rays: int = 100_000  # training rays rendered (density only) to measure the weights, per stage
    grid_levels: int = 2  # octree levels of each stage's grid (1..3; each costs one lookup per sample)
    fine_step_ratio: float = 2.0  # the fine stage's marching step, in its cells (the coarse stage: one cell)
    prune_every: int = 25  # re-test the coarse occupancy every N steps (0: never), so empty space stops costing samples
    prune_warmup: int = 100  # (at most a quarter of a stage's steps)
    early_stop_eps: float = 0.0  # training skips samples behind transmittance below this (0: keep all)
    max_minutes: float | None = None  # also stop the pass after this long (None: run every step)
    sh_degree: int = 2  # view-direction encoding of the pass's colour (0: view-independent)
    distortion_weight: float = 0.0  # λ of the distortion loss in the pass's fits (NeRFTrainConfig.distortion_weight)
    mlp_precision: str = "fp32"  # the pass's decoder products (NeRFTrainConfig.mlp_precision)

    def validate(self) -> None:
        if not 1 <= self.level <= 8 or self.coarse_level < 1:
            raise InputError(f"density pass: level must be in 1..8 and coarse_level >= 1, got {self.level}, {self.coarse_level}")
        if self.steps <= 0 or self.batch_rays <= 0 or self.probe_rays <= 0:
            raise InputError("density pass: steps, batch_rays and probe_rays must be positive")
        if not 1 <= self.grid_levels <= 3:
            raise InputError(f"density pass: grid_levels must be 1, 2 or 3, got {self.grid_levels}")
        if not 0 < self.fine_step_ratio <= 4 or not 0 < self.coarse_share < 1 or not 0 < self.weight_threshold < 1:
            raise InputError("density pass: fine_step_ratio must be in (0, 4], coarse_share and weight_threshold in (0, 1)")
        if not 0 <= self.sh_degree <= 3:
            raise InputError(f"density pass: sh_degree must be in 0..3, got {self.sh_degree}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise InputError("density pass: max_minutes must be positive")


def _stage(dataset: SceneDataset, octree: SparseOctree, device, split: str, cfg: DensityPassConfig, steps: int,
           minutes: float | None, quiet: bool, seed: int, desc: str, step_ratio: float = 1.0) -> tuple[torch.Tensor, int]:
    """Fit a small radiance field on ``octree`` (marched ``step_ratio`` finest cells per step) for
    ``steps`` steps; return the finest cells ``(n, 3)`` where some probe ray puts weight
    ``w_i ≥ weight_threshold`` (empty when none) and the steps that ran (the time cap may cut them)."""
    from vqad.config import DecoderConfig, GridConfig
    from vqad.grid import OctreeGrid
    from vqad.nerf.field import NeRFConfig, NeRFField
    from vqad.nerf.render import OccupancySampler
    from vqad.nerf.rays import RayBatcher
    from vqad.fit import run_fit
    from vqad.nerf.task import NeRFTrainConfig, RadianceTask

    level = octree.max_level
    grid_cfg = GridConfig(storage="dense", features=8, bits=4, base_level=octree.base_level, max_level=level)
    torch.manual_seed(seed)
    grid = OctreeGrid.from_octree(octree, grid_cfg)
    field = NeRFField(grid, DecoderConfig(hidden=32, layers=1, position_input=False),
                      NeRFConfig(geo_features=7, color_hidden=32, sh_degree=cfg.sh_degree, step_ratio=1.0,
                                 outer_scale=dataset.outer_scale), dataset.normalization)
    sampler = OccupancySampler(octree, step=step_ratio * 2.0 / (1 << level), outer_scale=dataset.outer_scale)
    batcher = RayBatcher(dataset.splits[split], dataset, device)
    # the same radiance task as the final fit, through the same loop (no checkpoint: it is seconds to minutes)
    pass_cfg = NeRFTrainConfig(steps=steps, batch_rays=cfg.batch_rays, lr=5e-3, grid_lr_scale=10.0,
                               lod_mode="finest", seed=seed, prune_every=cfg.prune_every,
                               prune_warmup=min(cfg.prune_warmup, steps // 4), early_stop_eps=cfg.early_stop_eps,
                               max_minutes=minutes, distortion_weight=cfg.distortion_weight,
                               mlp_precision=cfg.mlp_precision)
    field.train()
    task = RadianceTask(field, sampler, batcher, pass_cfg, quiet=quiet)
    task.min_useful_steps = 0  # the pass is meant to stop early: the undertrained warning is for the final fit
    ran = run_fit(task, pass_cfg, device, quiet=quiet, desc=desc).steps
    # the weights below are measured through the pruned occupancy: a pruned cell absorbs less than
    # prune_alpha per step, far below weight_threshold, so it would not have been kept anyway
    field.eval()
    # a sample spanning step_ratio cells carries about their summed weight: the same per-cell floor
    floor = min(cfg.weight_threshold * step_ratio, 0.5)
    best = probe_weights(field, sampler, batcher, level, min(cfg.probe_rays, batcher.num_valid), floor,
                         torch.Generator(device="cpu").manual_seed(seed + 1))
    res = 1 << min(level, sampler.level)
    keep = (best >= floor).nonzero().squeeze(-1)
    return torch.stack([keep // (res * res), (keep // res) % res, keep % res], -1), ran


@torch.no_grad()
def probe_weights(field, sampler, batcher, level: int, n_rays: int, floor: float, generator: torch.Generator,
                  chunk: int = 8192) -> torch.Tensor:
    """Per cell of the sampler's occupancy grid, the largest weight ``w_i = T_i α_i`` any of ``n_rays``
    random training rays puts in it: ``(res³,)``, res ``= 2^sampler.level``.

    Density alone (no colour MLP). A ray is evaluated in segments of ``seg`` samples, front to back,
    and stops once its transmittance is below ``floor``: since ``w_i ≤ T_i``, none of its later
    samples could reach ``floor``, so the cells reaching it are exactly those of a full render.
    """
    from vqad.nerf.render import ray_offsets

    best = torch.zeros(sampler.res ** 3, device=sampler.device)
    for s in range(0, n_rays, chunk):
        o, d, _, near, far = batcher.sample(min(chunk, n_rays - s), generator)
        samples = sampler.march(o, d, near=near, far=far)
        if len(samples) == 0:
            continue
        x = samples.points(o, d)
        first, count = ray_offsets(samples.ray_indices, samples.n_rays)  # (R,), (R,)
        tau_before = torch.zeros(samples.n_rays, dtype=torch.float64, device=x.device)  # Σ σδ of the evaluated part
        seg = 16
        for j0 in range(0, int(count.max()), seg):
            live = ((count > j0) & (tau_before < -math.log(floor))).nonzero().squeeze(1)  # T ≥ floor still
            if live.numel() == 0:
                break
            n = (count[live] - j0).clamp(max=seg)  # (L,) samples of this segment per live ray
            rows = torch.repeat_interleave(live, n)
            idx = first[rows] + torch.arange(rows.numel(), device=x.device) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
            xs = x[idx]
            sig = field.query_densities(xs, [level])[0]
            tau = (sig * (samples.t_ends[idx] - samples.t_starts[idx])).double()
            incl = torch.cumsum(tau, 0)
            start = torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
            excl = incl - tau - (incl - tau)[start] + tau_before[rows]
            w = torch.exp(-excl).float() * -torch.expm1(-tau.float())
            best.scatter_reduce_(0, sampler._flat_index(xs), w, reduce="amax")
            tau_before.index_add_(0, rows, tau)
    return best


def _lattice(r: torch.Tensor) -> torch.Tensor:
    """Every ``(i, j, k)`` with coordinates in the 1-D range ``r``: ``(len(r)³, 3)``, x-major."""
    return torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)


#: the most finest cells an octree built from points or a density pass may hold: their coordinates take
#: 24 bytes each, and a 4-bit grid's logits with their optimiser state ~200 bytes a vertex (the generated
#: room holds 262,000 at level 7). A larger one is refused before it is built, naming the levels that fit.
MAX_FINEST_CELLS = 1 << 25


class OctreeTooFine(InputError):
    """The octree asked for would hold more than :data:`MAX_FINEST_CELLS` finest cells (whatever builds it)."""


def _dilate_and_subdivide(ijk: torch.Tensor, level: int, to_level: int) -> torch.Tensor:
    """Cells ``ijk (n, 3)`` of ``level`` grown by one cell, then every cell of ``to_level`` inside them.
    More than :data:`MAX_FINEST_CELLS` of them is an :class:`InputError` that names the finest level
    that fits."""
    ijk = morton_decode(dilate_codes(morton_encode(ijk, bits=level), level, 1), bits=level)
    f = 1 << (to_level - level)
    n = ijk.shape[0] * f ** 3
    if n > MAX_FINEST_CELLS:
        fits = level + int(math.log2(max(1, MAX_FINEST_CELLS // ijk.shape[0]))) // 3  # n · 8^(L − level) ≤ the cap
        raise OctreeTooFine(f"--levels up to {to_level} would give the octree {n:,} finest cells (its {ijk.shape[0]:,} "
                            f"occupied cells of level {level}, {f ** 3:,} each), more than the {MAX_FINEST_CELLS:,} "
                            f"allowed: use a finest level of {fits} or less (--levels BASE:{fits})")
    sub = _lattice(torch.arange(f, device=ijk.device))
    return (ijk[:, None, :] * f + sub[None]).reshape(-1, 3)


def octree_from_density(dataset: SceneDataset, base_level: int, max_level: int, device, dilate: int = 1,
                        split: str = "train", cfg: DensityPassConfig | None = None, quiet: bool = True,
                        seed: int = 0, stats: dict | None = None) -> SparseOctree:
    """Fit a small dense-grid radiance field for a few hundred steps, keep the cells that some
    training ray actually sees (maximum volume-rendering weight ``w_i ≥ weight_threshold``),
    dilate them by one cell and subdivide to ``max_level``; coarse to fine in two stages
    (:class:`DensityPassConfig`), the second fitted only inside what the first kept.

    Visibility weights, rather than a density threshold, keep only surfaces that explain pixels:
    floaters and hidden interior regions get little weight.

    ``stats``, when given, receives ``steps`` (both stages), ``rays`` (training rays) and ``seconds``.
    """
    cfg = cfg or DensityPassConfig()
    cfg.validate()
    level = min(cfg.level, max_level)
    empty = (f"the octree is empty: the density pass found no surface in its {cfg.steps} steps"
             + (f" / {cfg.max_minutes:g} minutes" if cfg.max_minutes is not None else "")
             + f": give it more (--density-steps, --density-minutes; default {DensityPassConfig.steps} steps), or an octree from the "
               "capture's depth, masks or points (--octree)")
    t0 = time.perf_counter()
    steps, coarse, ran_total = cfg.steps, None, 0
    if cfg.coarse_level < level:
        c_level = max(cfg.coarse_level, 1)
        c_steps = max(1, int(cfg.coarse_share * cfg.steps))
        c_min = cfg.max_minutes * cfg.coarse_share if cfg.max_minutes is not None else None
        ijk, ran = _stage(dataset, SparseOctree.dense(max(1, c_level - cfg.grid_levels + 1), c_level, device=device), device,
                          split, cfg, c_steps, c_min, quiet, seed, f"octree density pass (level {c_level})")
        ran_total += ran
        if ijk.numel() == 0:
            raise InputError(empty)
        coarse = _dilate_and_subdivide(ijk, c_level, level)
        steps = max(1, cfg.steps - c_steps)
    if coarse is None:
        octree = SparseOctree.dense(max(1, level - cfg.grid_levels + 1), level, device=device)
    else:
        centers = (coarse.float() + 0.5) * (2.0 / (1 << level)) - 1.0
        octree = SparseOctree.from_points(centers, max(1, level - cfg.grid_levels + 1), level, dilate=0)
    minutes = None if cfg.max_minutes is None else max(cfg.max_minutes - (time.perf_counter() - t0) / 60, 1e-3)
    ijk, ran = _stage(dataset, octree, device, split, cfg, steps, minutes, quiet, seed, f"octree density pass (level {level})",
                      step_ratio=cfg.fine_step_ratio if coarse is not None else 1.0)
    ran_total += ran
    if stats is not None:
        stats.update(steps=ran_total, rays=ran_total * cfg.batch_rays, seconds=time.perf_counter() - t0)
    if ijk.numel() == 0:
        raise InputError(empty)
    fine = _dilate_and_subdivide(ijk, level, max_level)
    # the margin already covers f finest cells; dilate only by what is left
    return _finest_cells_to_octree(fine, base_level, max_level, device, max(0, dilate - (1 << (max_level - level))),
                                   "the coarse density pass found no surface")
