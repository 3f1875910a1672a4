"""TSDF fitting: a fused TSDF → VQ-AD (or dense, hash, ...) TSDF field, all LODs jointly.

The TSDF task of the one fit loop (:func:`vqad.fit.run_fit`). The data is the fusion's own
(:class:`~vqad.tsdf.fusion.FusedTSDF`): the truncated distance of every observed voxel inside the
octree, plus points drawn between voxel centres whose targets are the fusion's trilinear
interpolation (so the field is fitted as a continuous function, not at a lattice only). A step draws
``batch`` samples (``jitter`` of them between centres) and its loss is

    Σ_LOD mean_i w_i (u_LOD(x_i) − t_i)²  [+ color_weight · Σ_LOD mean_i w_i ‖c_LOD(x_i) − c_i‖²]

with ``t`` the fused truncated distance in unit-cube units and ``w = min(W / W_ref, 1)`` the fusion
weight capped at ``weight_ref`` observations (a voxel seen once counts less than one seen often).
For grids with discrete indices, Gauss–Newton index sweeps (:mod:`vqad.refine`) on the distances run
after the last step, as for the SDF.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field as dfield
from pathlib import Path

import numpy as np
import torch

from vqad.config import DecoderConfig, GridConfig
from vqad.device import peak_memory_bytes
from vqad.errors import InputError
from vqad.field import Normalization
from vqad.fit import Deadline, FitTask, StepLoss, TrainConfig, check_fit_call, check_resumed_fit, load_for_resume, run_fit
from vqad.grid import OctreeGrid
from vqad.octree import SparseOctree
from vqad.refine import has_codebook
from vqad.sdf.fit import SDF_LR, SDF_LR_DISCRETE, refine_sdf
from vqad.tsdf.field import TSDFField

#: the observed voxels' bounding box fills this share of the unit cube [-1, 1]^3
FILL = 0.95


@dataclass
class TSDFTrainConfig(TrainConfig):
    """TSDF fitting."""

    DEFAULT_LRS = (SDF_LR, SDF_LR_DISCRETE)  # the SDF's
    INDEX_SETTINGS = TrainConfig.INDEX_SETTINGS + ("refine",)  # (the sweeps' sizes act only with it)
    # the fused values are smooth and fixed (no resampled oracle): on the bunny scan the loss had
    # flattened by step 450 of 600 (0.0075 → 0.0072), so half the SDF's 3,000 steps leave a 3x margin
    # and keep a default fit (a TSDF step costs ~1.4x an SDF step: every sample lies in occupied cells)
    # within 10 minutes on 2 cores
    steps: int = 1500
    lr: float | None = None  # decoder lr; None: as the SDF (5e-3 for grids with discrete indices, else 2e-3)
    grid_lr_scale: float = 10.0
    logit_lr_scale: float | None = 200.0
    batch: int = 16384  # samples per step
    jitter: float = 0.5  # share of each batch drawn between voxel centres (targets: the fusion's trilinear values)
    resample_every: int = 500  # draw fresh between-centre samples every N steps
    pool_size: int = 400_000  # between-centre samples per pool
    weight_ref: float = 5.0  # a voxel's loss weight is min(fusion weight / this, 1)
    # colour shares the 4-bit features with the distance: on the spot scan it cost geometry at every
    # LOD (Chamfer-L1 to GT, LOD 3: 8.1 mm with colour, 4.3 mm without; LOD 6: 0.82 vs 0.75 mm) and a
    # second MLP (5.8 kB fp16), so geometry-only is the default and colour is asked for
    color: bool = False  # fit the fusion's colour too (a second MLP on the same features)
    color_weight: float = 0.1  # the colour loss's weight against the distance loss
    refine: int = 3  # Gauss–Newton index sweeps after the last step (codebook only; 0: none)
    refine_samples: int = 200_000
    refine_candidates: int = 2

    def validate(self) -> None:
        super().validate()
        if self.batch <= 0 or self.pool_size <= 0 or self.resample_every <= 0:
            raise InputError("--batch, the sample pool and resample_every must be positive")
        if not 0 <= self.jitter < 1:
            raise InputError(f"jitter must be in [0, 1), got {self.jitter}")
        if not 0 < self.weight_ref < math.inf or not 0 <= self.color_weight < math.inf:
            raise InputError("weight_ref must be positive and --color-weight >= 0 (both finite)")
        if self.refine < 0 or self.refine_samples <= 0 or self.refine_candidates < 0:
            raise InputError("--refine and --refine-candidates must be >= 0 and --refine-samples positive")


def check_fusable(fused) -> None:
    """Refuse a fused TSDF with no voxel inside its truncation band: it observed no surface, so there is nothing to
    fit (and no box to normalise: an empty fusion's was a ValueError)."""
    if len(fused) == 0 or not band_mask(fused).any():
        raise InputError(f"the fused TSDF has {len(fused):,} observed voxels and none within its truncation band: it saw "
                         "no surface to fit; fuse more frames, or check the depth scale (--depth-scale) and --max-depth")


#: finest cells under this share of the fused voxel add bytes, not detail: warned about (``vqad fit-tsdf``)
FINE_CELL_WARNING = 0.5
#: the finest cells may be at most this many times finer than the fused voxel (each voxel would otherwise split into
#: more than 4³ of them: memory for no detail; --levels 2:16 on a 2 m scene took 4.8 GB in 12 s)
MAX_CELLS_PER_VOXEL_SIDE = 4


def finest_cell(fused, max_level: int, norm: Normalization | None = None) -> float:
    """The edge of the finest octree cells at ``max_level``, in ``fused``'s units (``norm``: its normalization,
    if already computed)."""
    return 2.0 / (1 << max_level) / (norm or tsdf_normalization(fused)).scale


def check_levels(fused, grid_cfg: GridConfig) -> None:
    """Refuse a finest level whose cells are more than :data:`MAX_CELLS_PER_VOXEL_SIDE` times finer than the
    fused voxel, naming the finest level whose cells are not under :data:`FINE_CELL_WARNING` of a voxel."""
    norm = tsdf_normalization(fused)
    cell = finest_cell(fused, grid_cfg.max_level, norm)
    if cell * MAX_CELLS_PER_VOXEL_SIDE < fused.voxel:
        ok = max([L for L in range(1, grid_cfg.max_level + 1) if finest_cell(fused, L, norm) >= FINE_CELL_WARNING * fused.voxel]
                 + [grid_cfg.base_level])
        raise InputError(f"the finest level's cells ({cell:.3g} {fused.units}) are {fused.voxel / cell:,.0f} times finer "
                         f"than the fused voxel ({fused.voxel:.3g} {fused.units}): they hold no detail the fusion has "
                         f"and cost memory; give the finest level {ok} (--levels {grid_cfg.base_level}:{ok}: cells of at "
                         f"least {FINE_CELL_WARNING:g} voxel), or a smaller --voxel")


def fused_box(fused) -> tuple[np.ndarray, np.ndarray]:
    """``(lo, hi)`` float64 ``(3,)``: the box of ``fused``'s observed voxels, in its units."""
    return fused.ijk.min(0).astype(np.float64) * fused.voxel, (fused.ijk.max(0).astype(np.float64) + 1) * fused.voxel


def tsdf_normalization(fused) -> Normalization:
    """World → unit cube for ``fused``: the observed voxels' box, centred, fills :data:`FILL` of the cube."""
    lo, hi = fused_box(fused)
    extent = float((hi - lo).max())
    return Normalization(center=tuple(float(v) for v in (lo + hi) / 2), scale=2 * FILL / extent)


def band_mask(fused) -> np.ndarray:
    """``(M,)`` bool: voxels strictly inside the truncation band (the near-surface space the octree covers)."""
    return np.abs(fused.tsdf) < fused.trunc * (1 - 1e-3)


def build_tsdf_field(fused, grid_cfg: GridConfig, dec_cfg: DecoderConfig, device, seed: int = 0,
                     color: bool = False) -> TSDFField:
    """Octree of the near-surface voxels (every finest cell a band voxel overlaps, not dilated),
    grid and decoders on ``device``."""
    grid_cfg.validate()
    dec_cfg.validate()
    norm = tsdf_normalization(fused)
    band = band_mask(fused)
    if not band.any():
        raise InputError("the fused TSDF has no voxel inside the truncation band: nothing to fit "
                         "(is the depth scale right? try a larger --trunc)")
    c = fused.centers()[band]
    corners = np.array([[i, j, k] for i in (-0.5, 0.5) for j in (-0.5, 0.5) for k in (-0.5, 0.5)]) * fused.voxel
    pts = np.concatenate([c] + [c + o for o in corners])
    pts_t = norm.to_unit(torch.from_numpy(pts).to(device))
    octree = SparseOctree.from_points(pts_t.float(), grid_cfg.base_level, grid_cfg.max_level, dilate=0)
    torch.manual_seed(seed)
    grid = OctreeGrid.from_octree(octree, grid_cfg)
    return TSDFField(grid, dec_cfg, norm, truncation=fused.trunc, voxel=fused.voxel, units=fused.units,
                     color=color).to(device)


@dataclass
class TSDFSamples:
    """The fused voxels a fit sees, in unit-cube coordinates: ``x (M, 3)``, truncated distance
    ``t (M,)``, loss weight ``w (M,)`` and colour ``rgb (M, 3)`` in [0, 1] (or ``None``)."""

    x: torch.Tensor
    t: torch.Tensor
    w: torch.Tensor
    rgb: torch.Tensor | None

    @classmethod
    def of(cls, fused, field: TSDFField, weight_ref: float, color: bool, device) -> "TSDFSamples":
        norm = field.normalization
        x = norm.to_unit(torch.from_numpy(fused.centers()).to(device)).float()
        keep = field.grid.octree.contains(x)
        if not keep.any():
            raise InputError("no fused voxel lies inside the octree: nothing to fit")
        t = torch.from_numpy(np.asarray(fused.tsdf, np.float32)).to(device) * norm.scale
        w = (torch.from_numpy(np.asarray(fused.weight, np.float32)).to(device) / weight_ref).clamp(max=1.0)
        rgb = torch.from_numpy(np.asarray(fused.color)).to(device).float() / 255 if color else None
        return cls(x[keep], t[keep], w[keep], None if rgb is None else rgb[keep])


@dataclass
class FitResult:
    field: TSDFField
    steps: int
    seconds: float
    samples_per_second: float
    final_loss: float
    peak_memory_bytes: int
    refine_seconds: float = 0.0
    steps_done: int = 0
    after_training_resumed: bool = False  # no step left: only the work after training an interrupt stopped ran
    earlier_seconds: float | None = 0.0  # training time of the runs this one resumed (None: not known; ``seconds`` is this call's)
    history: list = dfield(default_factory=list)
    skipped_steps: int = 0
    train_cfg: TSDFTrainConfig | None = None
    notes: list[str] = dfield(default_factory=list)


class TSDFTask(FitTask):
    """The TSDF loss on the fused voxels (and between them), with Gauss–Newton index sweeps after training."""

    unit = "pts"
    min_useful_steps = 500  # a stated floor, as the SDF's

    def __init__(self, field: TSDFField, fused, cfg: TSDFTrainConfig, rng_seed: int, device, quiet: bool = True,
                 source: str | None = None):
        self.field, self.fused, self.cfg, self.device, self.quiet, self.source = field, fused, cfg, device, quiet, source
        self.color = field.has_color
        self.data = TSDFSamples.of(fused, field, cfg.weight_ref, self.color, device)
        self.rng = np.random.default_rng(rng_seed)
        self.pool_x = self.pool_t = None
        self.refining = has_codebook(field.grid)
        self.extra_seconds = 0.0
        self.start = 0

    def begin(self, start, gen):
        self.start = start

    def _draw_pool(self) -> None:
        """``pool_size`` points between voxel centres, targets from the fusion's trilinear interpolation."""
        c, f = self.cfg, self.fused
        pick = self.rng.integers(0, len(f.tsdf), size=c.pool_size)
        pts = f.centers()[pick] + self.rng.uniform(-0.5, 0.5, size=(c.pool_size, 3)) * f.voxel
        vals, valid = f.sample(pts)
        norm = self.field.normalization
        x = norm.to_unit(torch.from_numpy(pts[valid]).to(self.device)).float()
        t = torch.from_numpy(np.asarray(vals[valid], np.float32)).to(self.device) * norm.scale
        keep = self.field.grid.octree.contains(x)
        self.pool_x, self.pool_t = x[keep], t[keep]
        if self.pool_x.shape[0] == 0:  # a fusion too thin to interpolate anywhere: centres only
            self.pool_x, self.pool_t = self.data.x, self.data.t

    def after_training_seconds(self, step_seconds):
        c = self.cfg
        return c.refine * self._sweep_seconds(step_seconds) if c.refine and self.refining else 0.0

    def _sweep_seconds(self, step_seconds: float) -> float:
        c = self.cfg
        n = min(c.refine_samples, self.data.x.shape[0])
        return 2 * len(self.field.lods) * n / c.batch * step_seconds * (1 + 0.4 * c.refine_candidates)

    def before_step(self, it, progress, gen):
        if self.cfg.jitter > 0 and (self.pool_x is None or (it - self.start) % self.cfg.resample_every == 0):
            self._draw_pool()

    def step(self, it, progress, gen) -> StepLoss:
        c, d = self.cfg, self.data
        nj = int(c.batch * c.jitter)
        ic = torch.randint(0, d.x.shape[0], (c.batch - nj,), generator=gen).to(self.device)
        x, t, w = d.x[ic], d.t[ic], d.w[ic]
        if nj:
            ij = torch.randint(0, self.pool_x.shape[0], (nj,), generator=gen).to(self.device)
            x = torch.cat([x, self.pool_x[ij]])
            t = torch.cat([t, self.pool_t[ij]])
            w = torch.cat([w, torch.ones(nj, device=self.device)])  # interpolated: all 8 voxels observed
        pred, rgb = self.field.query_lods_with_color(x, self.field.lods)  # (n_lods, B), (n_lods, B, 3)
        per_lod = (w[None] * (pred - t[None]) ** 2).mean(dim=1)
        if rgb is not None and c.color_weight > 0:
            nc = c.batch - nj  # colour only at voxel centres, where the fusion has it
            err = ((rgb[:, :nc] - d.rgb[ic][None]) ** 2).sum(-1)
            per_lod = per_lod + c.color_weight * (w[None, :nc] * err).mean(dim=1)
        return StepLoss(per_lod.sum(), per_lod, c.batch, log=lambda: {"per_lod": per_lod.detach().tolist()})

    def after_training(self, it, start, gen):
        c = self.cfg
        if self.refining and c.refine:
            self.run_sweeps(c.refine, self._sweep_seconds(self.step_seconds),
                            lambda share: self._sweep(gen, max(int(share * c.refine_samples), 1)))

    def _sweep(self, gen: torch.Generator, samples: int) -> None:
        t0 = self.deadline.clock()
        d = self.data
        sel = torch.randperm(d.x.shape[0], generator=gen)[:samples].to(self.device)
        refine_sdf(self.field, d.x[sel], d.t[sel], self.quiet, measured=self.cfg.refine_candidates)
        self.extra_seconds += self.deadline.clock() - t0

    def loss_weights(self) -> dict[str, float]:
        return {"--color-weight": self.cfg.color_weight if self.data.rgb is not None else 0.0}

    def checkpoint_extra(self) -> dict:
        return {"rng_seed": self.cfg.seed, "source": self.source}


def fit_tsdf(fused, grid_cfg: GridConfig, dec_cfg: DecoderConfig, train_cfg: TSDFTrainConfig, device,
             out_dir: str | Path | None = None, resume: bool = False, quiet: bool = False,
             source: str | None = None, deadline: Deadline | None = None) -> FitResult:
    """Fit a TSDF field to ``fused`` (a :class:`~vqad.tsdf.fusion.FusedTSDF`), every LOD jointly.

    Checkpoints, ``resume`` and ``deadline`` behave as in :func:`vqad.sdf.fit.fit_sdf`; colour is
    fitted when ``train_cfg.color`` says so.
    """
    from vqad.tsdf.fusion import FusedTSDF

    device = check_fit_call("fit_tsdf", fused, FusedTSDF, "vqad.tsdf.fusion.fuse(sequence) or FusedTSDF.load(path)",
                            {"grid_cfg": (grid_cfg, GridConfig), "dec_cfg": (dec_cfg, DecoderConfig),
                             "train_cfg": (train_cfg, TSDFTrainConfig)}, device)
    grid_cfg.validate()
    check_fusable(fused)
    check_levels(fused, grid_cfg)
    ckpt_dir = Path(out_dir) / "checkpoint" if out_dir is not None else None
    train_cfg = train_cfg.resolved(grid_cfg)
    if train_cfg.color and fused.color is None:
        raise InputError("--color: this fused TSDF has no colour (the sequence has no colour frames)")
    train_cfg.validate()
    dec_cfg.validate()
    color = train_cfg.color
    start, resume_cfg = 0, None
    if resume:
        field, resume_cfg, start = load_for_resume(ckpt_dir, "tsdf", device)
        check_resumed_fit(ckpt_dir, resume_cfg, grid_cfg, dec_cfg, train_cfg)
        if (field.truncation, field.voxel, field.has_color) != (float(fused.trunc), float(fused.voxel), color):
            raise InputError(f"--resume: {ckpt_dir} was fitted to another fusion (truncation, voxel or colour differ); "
                             "resume with the same --voxel / --trunc, or start a fresh fit")
        rng_seed = resume_cfg.get("rng_seed", train_cfg.seed) + start
    else:
        field = build_tsdf_field(fused, grid_cfg, dec_cfg, device, seed=train_cfg.seed, color=color)
        rng_seed = train_cfg.seed
    task = TSDFTask(field, fused, train_cfg, rng_seed, device, quiet=quiet, source=source)
    res = run_fit(task, train_cfg, device, ckpt_dir, resume_cfg=resume_cfg, start=start,
                  gen=torch.Generator(device="cpu").manual_seed(int(rng_seed)), quiet=quiet, deadline=deadline)
    return FitResult(field=field, steps=res.steps, seconds=res.seconds, samples_per_second=res.items_per_second,
                     final_loss=res.final_loss, peak_memory_bytes=peak_memory_bytes(device),
                     refine_seconds=res.extra_seconds, steps_done=res.steps_done,
                     after_training_resumed=res.after_training_resumed, earlier_seconds=res.earlier_seconds, history=res.history,
                     skipped_steps=res.skipped_steps, train_cfg=train_cfg, notes=res.notes)
