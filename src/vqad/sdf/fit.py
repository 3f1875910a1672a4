"""Signed distance fitting: mesh → samples → VQ-AD (or dense, hash, ...) SDF field, all LODs jointly.

The SDF task of the one fit loop (:func:`vqad.fit.run_fit`): a step draws ``batch`` points from a
pool of exact signed distances (redrawn every ``resample_every`` steps) and its loss is
``Σ_LOD mean (u_LOD(x) − d(x))²`` over every LOD. For grids with discrete indices, Gauss–Newton
index sweeps (:mod:`vqad.refine`) run after the last step (``refine``) and optionally during
training (``refine_during``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field as dfield
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from vqad.config import DecoderConfig, GridConfig
from vqad.device import available_memory, peak_memory_bytes
from vqad.errors import InputError
from vqad.fit import Deadline, FitTask, StepLoss, TrainConfig, check_fit_call, check_resumed_fit, load_for_resume, run_fit
from vqad.grid import OctreeGrid
from vqad.octree import SparseOctree
from vqad.refine import RefineChunk, format_stats, has_codebook, rate_bit_cost, refine_indices
from vqad.sdf.field import SDFField
from vqad.sdf.mesh import Mesh, SampleMix, SDFOracle, draw_sdf_samples, fit_normalization, sample_surface

#: decoder learning rates by grid (``SDFTrainConfig.lr=None``): the argmax of codebook logits needs
#: larger steps to move (armadillo, 600 steps: see docs/method.md)
SDF_LR_DISCRETE, SDF_LR = 5e-3, 2e-3


@dataclass
class SDFTrainConfig(TrainConfig):
    """Signed distance fitting."""

    DEFAULT_LRS = (SDF_LR, SDF_LR_DISCRETE)  # (continuous, discrete grids); a discrete argmax needs larger steps to move
    INDEX_SETTINGS = TrainConfig.INDEX_SETTINGS + ("refine", "refine_during")  # (the sweeps' sizes act only with them)
    lr: float | None = None  # decoder lr; None: 5e-3 for grids with discrete indices (codebook), else 2e-3
    grid_lr_scale: float = 10.0  # grid (features, codebook D) lr = lr × this
    logit_lr_scale: float | None = 200.0  # codebook logits C lr = lr × this (None: the grid's)
    batch: int = 16384  # points per step
    resample_every: int = 500  # draw fresh samples every N steps
    truncation: float = 0.0  # clamp predicted and true distances to ±this in the loss (0: no clamp)
    pool_size: int = 400_000  # samples per pool
    refine: int = 10  # Gauss–Newton index refinement sweeps (vqad.refine) after the last step (codebook only; 0: none; 10: see docs/method.md §7)
    refine_during: int = 0  # ... and sweeps spread over training (or over its tail, below)
    refine_samples: int = 200_000  # samples each sweep sees (from the current pool)
    refine_band: float = 0.0  # ... only those within this many finest cells of the surface (0: all of them)
    refine_candidates: int = 2  # each sweep measures the real loss change of this many candidate codewords per vertex (0: GN prediction)
    refine_tail: float = 0.0  # refine_during sweeps over this last fraction of training, logits C frozen there (0: all of it)

    def validate(self) -> None:
        super().validate()
        if self.batch <= 0 or self.pool_size <= 0 or self.resample_every <= 0:
            raise InputError("--batch, the sample pool and resample_every must be positive")
        if self.batch > self.pool_size:
            raise InputError(f"--batch {self.batch:,}: a step draws its points from a pool of {self.pool_size:,} "
                             f"samples; a larger batch repeats them (and its memory grows with it): at most "
                             f"{self.pool_size:,}")
        if not 0 <= self.truncation < math.inf:
            raise InputError(f"--truncation must be a finite distance >= 0 (0: none), got {self.truncation}")
        if self.refine < 0 or self.refine_during < 0 or self.refine_samples <= 0 or self.refine_candidates < 0:
            raise InputError("--refine and --refine-candidates must be >= 0 and --refine-samples positive")
        if not 0 <= self.refine_tail < 1 or self.refine_band < 0:
            raise InputError("refine_tail must be in [0, 1) and refine_band >= 0")


#: bytes per surface sample while the octree is found (NumPy's face draw, barycentric coordinates and points in
#: float64, their float32 copy, the octree's codes and sort): a fit's peak RSS grew 0.84 -> 2.33 GB from 2.6M to
#: 10.5M samples (spot, --levels 3:8 and 3:9), ~190 bytes each
SURFACE_SAMPLE_BYTES = 200


def build_sdf_field(mesh: Mesh, grid_cfg: GridConfig, dec_cfg: DecoderConfig, device, seed: int = 0,
                    octree_samples: int = 2_000_000) -> SDFField:
    """Octree from surface samples at ``L_max`` (dilated by one cell), grid and decoder on ``device``."""
    grid_cfg.validate()
    dec_cfg.validate()
    norm = fit_normalization(mesh)
    rng = np.random.default_rng(seed)
    # dense enough that every finest cell the surface crosses gets a sample
    n = max(octree_samples, 40 * 4 ** grid_cfg.max_level)
    need, free = n * SURFACE_SAMPLE_BYTES, available_memory()
    if free is not None and need > free:  # refuse now: at --levels 3:13 this asked for ~180 GB and the system killed it
        raise InputError(f"--levels {grid_cfg.base_level}:{grid_cfg.max_level}: finding the finest cells takes {n:,} surface "
                         f"samples, about {need / 1e9:,.0f} GB, and this machine has {free / 1e9:,.1f} GB free; lower the "
                         f"finest level (each level needs 4x as much)")
    pts, _ = sample_surface(mesh, n, rng)
    pts = torch.from_numpy(((pts - np.asarray(norm.center)) * norm.scale).astype(np.float32)).to(device)
    pts = torch.cat([pts, norm.to_unit(torch.as_tensor(mesh.vertices, dtype=torch.float32, device=device))])
    octree = SparseOctree.from_points(pts, grid_cfg.base_level, grid_cfg.max_level, dilate=1)
    torch.manual_seed(seed)
    grid = OctreeGrid.from_octree(octree, grid_cfg)
    return SDFField(grid, dec_cfg, norm).to(device)


@dataclass
class FitResult:
    field: SDFField
    steps: int
    seconds: float
    points_per_second: float
    final_loss: float
    peak_memory_bytes: int
    refine_seconds: float = 0.0  # time in Gauss–Newton index sweeps (included in ``seconds``)
    steps_done: int = 0  # steps run by this call (``steps`` counts from 0, across --resume)
    after_training_resumed: bool = False  # no step left: only the work after training an interrupt stopped ran
    earlier_seconds: float | None = 0.0  # training time of the runs this one resumed (None: not known; ``seconds`` is this call's)
    history: list = dfield(default_factory=list)
    skipped_steps: int = 0  # steps not applied because their loss or a gradient was not finite
    train_cfg: SDFTrainConfig | None = None  # the configuration that ran (lr resolved; on resume, the checkpoint's)
    notes: list[str] = dfield(default_factory=list)  # what the time cap cut (vqad.fit.LoopResult.notes)


class SDFTask(FitTask):
    """The SDF loss on pools of exact distances, with Gauss–Newton index sweeps as hooks."""

    unit = "pts"
    min_useful_steps = 500  # a stated floor: a sixth of the default 3,000 steps

    def __init__(self, field: SDFField, oracle: SDFOracle, cfg: SDFTrainConfig, rng_seed: int, device,
                 quiet: bool = True, mesh_path: str | None = None):
        self.field, self.oracle, self.cfg, self.device, self.quiet = field, oracle, cfg, device, quiet
        self.mesh_path = mesh_path
        self.rng = np.random.default_rng(rng_seed)
        self.pool_x = self.pool_d = None
        self.x = self.d = None
        self.extra_seconds = 0.0
        self.refining = has_codebook(field.grid)
        n_during = cfg.refine_during if self.refining else 0
        self.tail = cfg.refine_tail if n_during else 0.0
        span = self.tail if self.tail > 0 else 1.0  # at (1 - span) + span · i / (n + 1), i = 1..n
        self.refine_at = [(1 - span) + span * i / (n_during + 1) for i in range(1, n_during + 1)]
        self.start = 0

    def begin(self, start: int, gen: torch.Generator) -> None:
        self.start = start
        # sweeps spread over training that a resumed fit has already passed are skipped
        self.refine_at = [f for f in self.refine_at if f > start / max(self.cfg.steps, 1)]

    def after_training_seconds(self, step_seconds):
        """The sweeps after training. A sweep costs about ``2 · levels · samples`` point evaluations,
        i.e. that many / batch training steps (armadillo, levels 3..7: predicted 33 s, measured 35 s),
        and each measured candidate codeword (``refine_candidates``) 0.4 of a sweep more (measured
        63 s with 2 against 35 s for a Gauss–Newton sweep)."""
        c = self.cfg
        if not c.refine or not self.refining:
            return 0.0
        return c.refine * self._sweep_seconds(step_seconds)

    def _sweep_seconds(self, step_seconds: float) -> float:
        c = self.cfg
        sweep_s = 2 * len(self.field.lods) * min(c.refine_samples, c.pool_size) / c.batch * step_seconds
        return sweep_s * (1 + 0.4 * c.refine_candidates)

    def before_step(self, it, progress, gen):
        c = self.cfg
        if self.pool_x is None or (it - self.start) % c.resample_every == 0:
            self._draw_pool()
        idx = torch.randint(0, self.pool_x.shape[0], (c.batch,), generator=gen).to(self.device)
        self.x, self.d = self.pool_x.index_select(0, idx), self.pool_d.index_select(0, idx)  # 34 µs against [idx]'s 108 here
        if self.refine_at and self.refine_at[0] <= progress:
            self.refine_at.pop(0)
            self._sweep(gen)

    def _draw_pool(self) -> None:
        self.pool_x, self.pool_d = draw_sdf_samples(self.oracle, self.field.normalization, self.cfg.pool_size, self.rng,
                                                    SampleMix())
        self.pool_x, self.pool_d = self.pool_x.to(self.device), self.pool_d.to(self.device)

    def step(self, it, progress, gen) -> StepLoss:
        pred = self.field.query_lods(self.x, self.field.lods)  # (n_lods, B)
        d = self.d
        if self.cfg.truncation > 0:
            tr = self.cfg.truncation
            pred, d = pred.clamp(-tr, tr), d.clamp(-tr, tr)
        per_lod = ((pred - d[None]) ** 2).mean(dim=1)
        return StepLoss(per_lod.sum(), per_lod, self.cfg.batch, log=lambda: {"per_lod": per_lod.detach().tolist()})

    def after_backward(self, progress):
        if self.tail > 0 and progress >= 1 - self.tail:
            for st in self.field.grid.storages:  # the tail: sweeps pick the indices, steps fit D and ψ
                for p in st.logit_parameters():
                    p.grad = None

    def after_training(self, it, start, gen):
        """The last sweeps (their indices are kept), shortened or skipped where the time cap needs it."""
        c = self.cfg
        if self.refining and c.refine:
            if self.pool_x is None:  # a resume that only runs the sweeps an interrupt stopped: no step drew it
                self._draw_pool()
            self.run_sweeps(c.refine, self._sweep_seconds(self.step_seconds),
                            lambda share: self._sweep(gen, max(int(share * c.refine_samples), 1)))

    def checkpoint_extra(self) -> dict:
        return {"rng_seed": self.cfg.seed, "mesh": self.mesh_path}

    def _sweep(self, gen: torch.Generator, samples: int | None = None) -> None:
        """One sweep on ``samples`` pool samples (default ``refine_samples``; optionally only those near
        the surface)."""
        t = self.deadline.clock()
        c, pd = self.cfg, self.pool_d
        # a band keeps the sweep on the surface, but lets coarse indices drift where no sample
        # looks (floaters: a worse Chamfer-L1 on armadillo), so by default every sample counts
        band = c.refine_band * 2.0 / (1 << self.field.grid.octree.max_level)
        near = (pd.abs() < band).nonzero().squeeze(1) if band > 0 else torch.arange(pd.shape[0], device=pd.device)
        sel = near[torch.randperm(near.shape[0], generator=gen)[: samples or c.refine_samples].to(pd.device)]
        refine_sdf(self.field, self.pool_x[sel], pd[sel], self.quiet, measured=c.refine_candidates,
                   rate_weight=c.rate_weight)
        self.extra_seconds += self.deadline.clock() - t


def fit_sdf(
    mesh: Mesh,
    grid_cfg: GridConfig,
    dec_cfg: DecoderConfig,
    train_cfg: SDFTrainConfig,
    device: torch.device,
    out_dir: str | Path | None = None,
    resume: bool = False,
    quiet: bool = False,
    mesh_path: str | None = None,
    deadline: Deadline | None = None,
) -> FitResult:
    """Fit an SDF field to ``mesh``. Loss: Σ over LODs of the mean squared distance error.

    With ``out_dir``, a checkpoint is written there every ``checkpoint_every`` steps, at the end,
    and on Ctrl-C / SIGTERM (then :class:`KeyboardInterrupt` is re-raised after saving).
    ``resume`` continues from ``out_dir/checkpoint``: its grid, decoder and training settings must
    match ``grid_cfg``, ``dec_cfg`` and ``train_cfg`` except the step budget and time cap
    (:func:`vqad.fit.check_resumable`). ``deadline`` is the whole job's time cap (default:
    ``train_cfg.max_minutes`` from the first step on; see :func:`vqad.fit.run_fit`).
    """
    device = check_fit_call("fit_sdf", mesh, Mesh, "vqad.sdf.mesh.load_mesh(path)",
                            {"grid_cfg": (grid_cfg, GridConfig), "dec_cfg": (dec_cfg, DecoderConfig),
                             "train_cfg": (train_cfg, SDFTrainConfig)}, device)
    ckpt_dir = Path(out_dir) / "checkpoint" if out_dir is not None else None
    grid_cfg.validate()
    train_cfg = train_cfg.resolved(grid_cfg)
    train_cfg.validate()
    dec_cfg.validate()
    start, resume_cfg = 0, None
    if resume:
        field, resume_cfg, start = load_for_resume(ckpt_dir, "sdf", device)
        check_resumed_fit(ckpt_dir, resume_cfg, grid_cfg, dec_cfg, train_cfg)
        rng_seed = resume_cfg.get("rng_seed", train_cfg.seed) + start
    else:
        field = build_sdf_field(mesh, grid_cfg, dec_cfg, device, seed=train_cfg.seed)
        rng_seed = train_cfg.seed
    task = SDFTask(field, SDFOracle(mesh), train_cfg, rng_seed, device, quiet=quiet, mesh_path=mesh_path)
    res = run_fit(task, train_cfg, device, ckpt_dir, resume_cfg=resume_cfg, start=start,
                  gen=torch.Generator(device="cpu").manual_seed(int(rng_seed)), quiet=quiet, deadline=deadline)
    return FitResult(
        field=field,
        steps=res.steps,
        seconds=res.seconds,
        points_per_second=res.items_per_second,
        final_loss=res.final_loss,
        peak_memory_bytes=peak_memory_bytes(device),
        refine_seconds=res.extra_seconds,
        steps_done=res.steps_done,
        after_training_resumed=res.after_training_resumed, earlier_seconds=res.earlier_seconds,
        history=res.history,
        skipped_steps=res.skipped_steps,
        train_cfg=train_cfg,
        notes=res.notes,
    )


def sdf_refine_chunks(field: SDFField, x: torch.Tensor, d: torch.Tensor, chunk: int = 1 << 15) -> list:
    """The SDF loss as :class:`vqad.refine.RefineChunk` s: predicted minus true distance, per LOD."""

    def residuals(xc, dc):
        return lambda F: {lod: (field._decode(xc, f, lod) - dc).unsqueeze(-1) for lod, f in F.items()}

    return [RefineChunk(x[a:a + chunk], residuals(x[a:a + chunk], d[a:a + chunk])) for a in range(0, x.shape[0], chunk)]


def refine_sdf(field: SDFField, x: torch.Tensor, d: torch.Tensor, quiet: bool = True, measured: int = 0,
               rate_weight: float = 0.0) -> list:
    """One Gauss–Newton index sweep (:func:`vqad.refine.refine_indices`) on samples ``x (N, 3)``,
    ``d (N,)``; ``measured`` > 0: that many best-predicted codewords per vertex, measured exactly.
    ``rate_weight`` λ > 0: the moves minimise the fit's ``loss + λ · index bits per vertex``
    (:func:`vqad.refine.rate_bit_cost`, the training loss being the mean over samples)."""
    stats = refine_indices(field.grid, sdf_refine_chunks(field, x, d), measured=measured,
                           bit_cost=rate_bit_cost(field.grid, rate_weight, x.shape[0]))
    if not quiet:
        tqdm.write(format_stats(stats))
    return stats
