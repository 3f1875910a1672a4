"""The radiance-field task of the one fit loop: rays → packed samples → volume rendering → per-LOD loss.

One training step, from pixel to loss:

1. :class:`~vqad.nerf.rays.RayBatcher` draws B random training pixels (uint8 colours kept on the
   device) and turns them into unit-cube rays ``o, d (B, 3)``;
2. :class:`~vqad.nerf.render.OccupancySampler` marches them, keeping samples in occupied cells only
   (packed, with ``ray_indices``);
3. the field evaluates σ and RGB at every sample for the step's LODs, sharing one grid lookup;
4. :func:`~vqad.nerf.render.volume_render` composites them on the background;
5. the loss is ``Σ_LOD w_LOD · mean ||C_LOD − C_gt||²`` (``w = 1`` for the finest LOD,
   ``coarse_weight`` for the others); :func:`vqad.fit.run_fit` applies it.

Which LODs a step renders (``lod_mode``): ``all`` (every LOD, every step), ``random`` (one LOD drawn
uniformly), ``finest+random`` (the finest plus one coarser LOD drawn uniformly: the default, best at
every LOD in equal time on lego) or ``finest``; ``coarse_weight`` scales the coarser LODs' loss. The
measurements are in docs/benchmarks/nerf.md ("Which LODs a training step renders").

The same task trains the coarse field of the octree's density pass (:mod:`vqad.nerf.octree_build`)
and the final field (:func:`vqad.nerf.fit.fit_nerf`).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from vqad.device import MLP_PRECISIONS, resolve_mlp_precision
from vqad.errors import InputError
from vqad.fit import FitTask, StepLoss, TrainConfig
from vqad.nerf.appearance import (APPEARANCE_LR_SHARE, APPEARANCES, TENSOR_PREFIX, ViewAppearance, as_photographed,
                                  check_appearance_views)
from vqad.nerf.depth_prior import depth_spread_loss
from vqad.nerf.field import NeRFField, sh_encode
from vqad.nerf.rays import RayBatcher
from vqad.nerf.recode import RecodeStats, applies as recode_applies, recode_unreachable
from vqad.nerf.render import (OccupancySampler, distortion_loss, prune_by_model, prune_threshold, ray_offsets, render_rays,
                              volume_render)
from vqad.refine import RefineChunk, format_stats, has_codebook, rate_bit_cost, refine_indices

LOD_MODES = ("all", "random", "finest+random", "finest")
OCTREE_CHOICES = ("auto", "depth", "mask", "points", "density")  # vqad.nerf.octree_build builds each
#: the largest octree margin --dilate takes, in finest cells: a wider one grows the octree toward the whole cube
MAX_DILATE = 16
DEPTH_SOURCES = ("auto", "points", "capture")  # vqad.nerf.depth_prior.depth_targets


#: a radiance field's index sweep, in training steps per batch of its rays: measured 24.7 on the procedural scene
#: (4-bit, levels 4:7, two sweeps of 4,096 and of 16,384 rays, 2 threads: 5.84 and 13.43 s of work after training
#: at 0.051 s a step), ~19 on fern (a hostile pass: 45 s a sweep where 3 predicted 7 s, so a --minutes cap ran
#: 1.7-2.6x over); 25 keeps the cap
SWEEP_STEPS_PER_BATCH = 25

#: the most rays a training step takes (a million rays of ~100 samples: tens of GB of activations)
MAX_BATCH_RAYS = 1 << 20


@dataclass
class NeRFTrainConfig(TrainConfig):
    """Radiance-field fitting. Learning rates are Adam's; the grid's is ``lr × grid_lr_scale``.

    ``steps`` and ``max_minutes`` bound the training of the field; building the octree comes
    first and is bounded by its own settings (``density_steps``, ``density_minutes``).
    """

    INDEX_SETTINGS = TrainConfig.INDEX_SETTINGS + ("refine", "recode")  # (refine_rays acts only with refine)

    lr: float | None = 5e-3  # decoders ψ_σ, ψ_c
    grid_lr_scale: float = 30.0  # features Z / logits C / codebooks D
    log_every: int = 25
    batch_rays: int = 4096
    lod_mode: str = "finest+random"  # all | random | finest+random | finest
    coarse_weight: float = 1.0  # weight of the LODs coarser than the finest in a step's loss (the finest: 1)
    prune_every: int = 50  # re-test the occupancy every N steps (0: never)
    prune_warmup: int = 100  # ... starting after this many steps
    prune_decay: float = 0.95
    early_stop_eps: float | None = None  # drop training samples behind transmittance < this (0: keep all; None: auto_early_stop)
    distortion_weight: float = 0.0  # λ of mip-NeRF 360's distortion loss on the finest LOD's weights (0: none)
    depth_weight: float | None = None  # λ of the depth loss on the finest LOD's weights (vqad.nerf.depth_prior; 0: none; None: auto_depth_weight)
    depth_from: str = "auto"  # its targets: auto | points (sparse SfM points) | capture (the views' depth maps)
    octree: str = "auto"  # auto | depth | mask | points | density
    dilate: int = 1  # octree margin in finest cells
    density_steps: int = 400  # steps of the coarse density pass (octree="density")
    density_minutes: float | None = None  # ... and its time cap (None: none)
    octree_from: str | None = None  # reuse the octree of this checkpoint / .vqad fit of the same capture
    refine: int = 0  # Gauss–Newton index sweeps (vqad.refine) after the last step (codebook only; 0: none)
    refine_rays: int = 16384  # training rays each sweep sees
    recode: bool = True  # after training, recode the indices no render reaches (codebook only; vqad.nerf.recode)
    mlp_precision: str = "fp32"  # the decoders' products while training: fp32 | bf16 (vqad.device.resolve_mlp_precision)
    appearance: str = "none"  # per-training-view colour transforms learned beside the field: none | affine (vqad.nerf.appearance)

    def validate(self) -> None:
        super().validate()
        if not 0 < self.batch_rays <= MAX_BATCH_RAYS:
            raise InputError(f"--batch-rays must be in 1..{MAX_BATCH_RAYS:,} (each ray marches ~100 samples through "
                             f"the grid and both MLPs in one step), got {self.batch_rays:,}")
        if self.lod_mode not in LOD_MODES:
            raise InputError(f"unknown LOD mode {self.lod_mode!r}: choose one of {', '.join(LOD_MODES)}")
        if self.octree not in OCTREE_CHOICES:
            raise InputError(f"unknown octree method {self.octree!r}: choose one of {', '.join(OCTREE_CHOICES)}")
        if not 0 <= self.dilate <= MAX_DILATE:
            raise InputError(f"--dilate must be 0..{MAX_DILATE} finest cells (the octree's margin), got {self.dilate}")
        if not 0 < self.coarse_weight <= 1:
            raise InputError(f"--coarse-weight must be in (0, 1], got {self.coarse_weight}")
        if self.refine < 0 or self.refine_rays <= 0:
            raise InputError("--refine must be >= 0 and --refine-rays positive")
        if not (isinstance(self.distortion_weight, (int, float)) and 0.0 <= self.distortion_weight < math.inf):
            raise InputError(f"--distortion-weight must be a finite number >= 0, got {self.distortion_weight}")
        if self.depth_weight is not None and not (isinstance(self.depth_weight, (int, float))
                                                  and not isinstance(self.depth_weight, bool)
                                                  and 0.0 <= self.depth_weight < math.inf):
            raise InputError(f"--depth-weight must be a finite number >= 0, got {self.depth_weight}")
        if self.depth_from not in DEPTH_SOURCES:
            raise InputError(f"unknown --depth-from {self.depth_from!r}: choose one of {', '.join(DEPTH_SOURCES)}")
        if self.early_stop_eps is not None and not 0.0 <= self.early_stop_eps < 1.0:
            raise InputError(f"--early-stop-eps must be in [0, 1), got {self.early_stop_eps}")
        if self.density_steps <= 0 or (self.density_minutes is not None and not self.density_minutes > 0):
            raise InputError("--density-steps and --density-minutes must be positive")
        if self.prune_every < 0 or self.prune_warmup < 0 or not 0 < self.prune_decay <= 1:
            raise InputError("prune_every and prune_warmup must be >= 0 and prune_decay in (0, 1]")
        if self.mlp_precision not in MLP_PRECISIONS:
            raise InputError(f"unknown --mlp-precision {self.mlp_precision!r}: choose one of {', '.join(MLP_PRECISIONS)}")
        if self.appearance not in APPEARANCES:
            raise InputError(f"unknown --appearance {self.appearance!r}: choose one of {', '.join(APPEARANCES)}")

    #: :attr:`TrainConfig.ABSENT_MEANS`; a checkpoint from before early ray termination ran without it, and
    #: one from before the depth loss without that
    ABSENT_MEANS = {**TrainConfig.ABSENT_MEANS, "early_stop_eps": 0.0, "depth_weight": 0.0, "appearance": "none"}


#: the early-ray-termination threshold ε that ``early_stop_eps=None`` ('auto') means in a contracted scene
#: (:func:`auto_early_stop`); nerfacc's default
EARLY_STOP_CONTRACTED = 1e-4


def auto_early_stop(eps: float | None, outer_scale: float) -> float:
    """``eps``, or where it is None ('auto') :data:`EARLY_STOP_CONTRACTED` in a scene with contracted space
    around its central box (``outer_scale > 1``: ngp ``aabb_scale``, COLMAP bounds) and 0 (off) elsewhere.

    Measured (docs/benchmarks/scene.md, 2026-12-06): on the generated room, 4-bit, ε = 10⁻⁴ drops a late
    step's samples from 14 to 9 per ray (209 → 171 ms alone on one thread, 163 ms with each LOD decoding
    only its own samples); 8-minute fits side by side changed LOD 7 by +0.23 / +0.23 dB (aabb_scale 4,
    seeds 0 / 1) and −0.07 dB (aabb_scale 16): faster steps, quality within a seed's spread. On lego and fern (bounded, few samples per ray, or most of
    them in front of the surfaces) the density-only pre-pass cost more than it saved
    (docs/benchmarks/nerf.md), so bounded scenes keep it off; so does the octree's density pass
    (:func:`vqad.nerf.fit.fit_nerf`).
    """
    if eps is not None:
        return float(eps)
    return EARLY_STOP_CONTRACTED if outer_scale > 1.0 else 0.0


#: the depth loss's λ that ``depth_weight=None`` ('auto') means in a contracted scene with sparse points
#: (:func:`auto_depth_weight`)
DEPTH_WEIGHT_CONTRACTED = 0.03


def auto_depth_weight(weight: float | None, outer_scale: float, has_points: bool) -> float:
    """``weight``, or where it is None ('auto') :data:`DEPTH_WEIGHT_CONTRACTED` in a scene with contracted
    space around its central box (``outer_scale > 1``) whose targets come from its sparse points
    (``has_points``), and 0 (off) elsewhere: depth maps' dense targets were never measured with it.

    Measured (docs/benchmarks/scene.md, sixteenth and seventeenth sessions): on the generated room, 8-minute
    fits side by side, the targets of the shell's points at λ = 0.01 lifted the far ground's held-out PSNR
    by ~2 dB and LOD 7 by about 1.2 dB (dense); 0.03 added 0.2–0.4 dB more (dense) and −0.3 to +0.5 (4-bit,
    within its spread), while 0.1 added ~0.5 dense but cost a 4-bit fit 1.6 dB; on the object alone (no
    contraction, every point a target) λ = 0.01 cost 2 dB, so bounded scenes keep it off."""
    if weight is not None:
        return float(weight)
    return DEPTH_WEIGHT_CONTRACTED if outer_scale > 1.0 and has_points else 0.0


# -- pieces of a step ----------------------------------------------------------------------------
def step_lods(lods: list[int], mode: str, generator: torch.Generator) -> list[int]:
    """The LODs one training step renders (ascending)."""
    if mode == "all" or len(lods) == 1:
        return list(lods)
    if mode == "finest":
        return [lods[-1]]
    if mode == "random":
        return [lods[int(torch.randint(0, len(lods), (1,), generator=generator))]]
    return [lods[int(torch.randint(0, len(lods) - 1, (1,), generator=generator))], lods[-1]]


def prune_due(it: int, every: int, warmup: int) -> bool:
    """Whether training step ``it`` re-tests the occupancy (every ``every`` steps from ``warmup``; 0: never)."""
    return every > 0 and it >= warmup and it % every == 0


class RadianceTask(FitTask):
    """The photometric loss of random training rays, with occupancy pruning and index sweeps as hooks."""

    unit = "rays"
    min_useful_steps = 1000  # a stated floor: a third of the default 3,000 steps

    def __init__(self, field: NeRFField, sampler: OccupancySampler, batcher: RayBatcher, cfg: NeRFTrainConfig,
                 quiet: bool = True, octree_method: str | None = None):
        self.field, self.sampler, self.batcher, self.cfg, self.quiet = field, sampler, batcher, cfg, quiet
        self.octree_method = octree_method
        self.background = torch.tensor(batcher.background, dtype=torch.float32, device=batcher.device)
        self.sigma_thr = prune_threshold(field, sampler)
        self.lods: list[int] = field.lods
        self.total_samples = self.rays = 0
        self.extra_seconds = 0.0
        self.recode_stats: RecodeStats | None = None
        self.mlp_dtype = resolve_mlp_precision(cfg.mlp_precision, batcher.device)  # None: fp32
        self.early_stop_eps = auto_early_stop(cfg.early_stop_eps, sampler.outer_scale)
        # 'auto' follows the scene where the batcher holds targets (fit_nerf resolves it before setting them)
        self.depth_weight = auto_depth_weight(cfg.depth_weight, sampler.outer_scale, batcher.has_depth_targets)
        if self.depth_weight > 0 and not batcher.has_depth_targets:
            raise ValueError("RadianceTask: depth_weight > 0 needs the batcher's depth targets (DepthTargets.give_to)")
        # each training view's exposure and white balance (vqad.nerf.appearance), or None
        self.appearance = (ViewAppearance(batcher.N, batcher.device, active=batcher.views_with_pixels())
                           if cfg.appearance == "affine" else None)
        self.look_background = self.background if batcher.composited else None  # vqad.nerf.appearance.apply_look
        self.t0 = time.perf_counter()

    def begin(self, start, gen):
        self.t0 = time.perf_counter()
        if start >= self.cfg.prune_warmup and self.cfg.prune_every > 0:  # resumed: the occupancy from the model
            prune_by_model(self.field, self.sampler)

    def _finest_density(self, x: torch.Tensor) -> torch.Tensor:
        """``σ (N,)`` at the finest LOD, unchecked (pruning probes: points the sampler made)."""
        return self.field.query_densities(x, [self.field.grid.octree.max_level])[0]

    def before_step(self, it, progress, gen):
        c = self.cfg
        if prune_due(it, c.prune_every, c.prune_warmup):
            self.sampler.prune(self._finest_density, self.sigma_thr, decay=c.prune_decay, generator=gen)
        self.lods = step_lods(self.field.lods, c.lod_mode, gen)

    def step(self, it, progress, gen) -> StepLoss:
        c, b = self.cfg, self.cfg.batch_rays
        flat = self.batcher.sample_ids(b, gen)
        o, d, rgb, near, far = self.batcher.rays_for(flat)
        jitter = torch.rand(b, generator=gen).to(self.batcher.device)
        drawn: list = []
        with self.field.mlp_precision(self.mlp_dtype):
            out, n_samples = render_rays(self.field, self.sampler, o, d, self.lods, self.background, near=near, far=far,
                                         jitter=jitter, early_stop_eps=self.early_stop_eps, samples_out=drawn)
        pred = out.rgb
        if self.appearance is not None:  # the colours the photos recorded (vqad.nerf.appearance)
            gain, offset = self.appearance.looks(self.batcher.view_of(flat))
            pred = as_photographed(out.rgb, gain, offset, out.opacity, self.look_background, rgb)
        per_lod = ((pred - rgb[None]) ** 2).mean(dim=(1, 2))  # (n_lods,)
        self.total_samples += n_samples
        self.rays += b
        loss = None
        if out.rgb.requires_grad:  # else no ray had a sample: nothing to learn from
            finest = self.field.lods[-1]
            w = [1.0 if lod == finest else c.coarse_weight for lod in self.lods]
            loss = (per_lod * per_lod.new_tensor(w)).sum()
            if c.distortion_weight > 0:
                loss = loss + c.distortion_weight * self._distortion(out.weights[-1], drawn, b)
            if self.depth_weight > 0:
                samples = drawn[0]
                t_mid = 0.5 * (samples.t_starts + samples.t_ends)
                loss = loss + self.depth_weight * depth_spread_loss(out.weights[-1], t_mid, samples.ray_indices,
                                                                 self.batcher.depth_targets_for(flat))
        lods = list(self.lods)
        return StepLoss(loss, per_lod, b, log=lambda: {
            "psnr": psnr_of(per_lod), "lods": lods, "samples_per_ray": n_samples / b,
            "seconds": time.perf_counter() - self.t0})

    def _distortion(self, weights: torch.Tensor, drawn: list, n_rays: int) -> torch.Tensor:
        """The distortion loss of the finest LOD's weights ``(S,)``, distances in grid units (the
        contracted cube's: a far sample weighs as much as a near one, as mip-NeRF 360's normalised
        distance does): each sample's chord distance from its ray's first sample, and the marching step."""
        samples, x = drawn
        first, _ = ray_offsets(samples.ray_indices, n_rays)
        s = (x - x.index_select(0, first.index_select(0, samples.ray_indices))).norm(dim=-1)  # (S,)
        delta = torch.full_like(s, self.sampler.step)
        return distortion_loss(weights, s, delta, samples.ray_indices, n_rays)

    def after_training_seconds(self, step_seconds):
        """A sweep renders its rays for the held-out check and the sweep (all LODs), then refits: about
        :data:`SWEEP_STEPS_PER_BATCH` · refine_rays / batch_rays training steps each (an estimate; each
        sweep's measured time replaces it for the next)."""
        c = self.cfg
        recode = self._recode_seconds(step_seconds) if self._recodes() else 0.0
        if not c.refine or not has_codebook(self.field.grid):
            return recode
        return recode + c.refine * self._sweep_seconds(step_seconds)

    def _recodes(self) -> bool:
        return self.cfg.recode and recode_applies(self.field)

    def _recode_seconds(self, step_seconds: float) -> float:
        """Every LOD's occupancy before and after about two rounds (:func:`vqad.nerf.recode.recode_unreachable`),
        for the model and its fp16 form: 3 · 2 · 9 density probes per cell, each priced at a tenth of a
        training sample (those run the colour MLP and a backward pass too; measured on lego, one thread:
        ~2M probes/s against ~210k training samples/s). An estimate: lego's ~6 s."""
        octree = self.field.grid.octree
        probes = 3 * 2 * 9 / 10 * sum(octree.num_cells(lod) for lod in self.field.lods)
        per_step = max(self.total_samples / max(self.rays, 1), 1.0) * self.cfg.batch_rays
        return step_seconds * probes / per_step

    def _sweep_seconds(self, step_seconds: float) -> float:
        return SWEEP_STEPS_PER_BATCH * self.cfg.refine_rays / self.cfg.batch_rays * step_seconds

    def after_training(self, it, start, gen):
        c = self.cfg
        if c.refine and has_codebook(self.field.grid):
            t = self.deadline.clock()
            self.field.eval()
            self.sampler.prune(self._finest_density, self.sigma_thr)  # sweep over the samples render / eval will see
            self.run_sweeps(c.refine, self._sweep_seconds(self.step_seconds),
                            lambda share: refine_nerf(self.field, self.sampler, self.batcher,
                                                      max(int(share * c.refine_rays), 1), self.background, gen,
                                                      self.quiet, rate_weight=c.rate_weight,
                                                      appearance=self.appearance))
            self.field.train()
            self.extra_seconds += self.deadline.clock() - t
        if self._recodes():  # after the sweeps: they may leave vertices unreachable too
            t = self.deadline.clock()
            try:
                self.recode_stats = recode_unreachable(self.field)
            except Exception as exc:  # it puts every index back: the trained model is kept and saved as it is
                msg = (f"recoding the unreachable indices failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                       "the model is kept as trained, its file just larger: fit with --no-recode to skip this step")
                self.notes.append(msg)
                print(f"WARNING: {msg}", file=sys.stderr, flush=True)
            else:
                self.notes.extend(self.recode_stats.notes)
                if not self.quiet:
                    tqdm.write(self.recode_stats.summary())
            self.extra_seconds += self.deadline.clock() - t

    def loss_weights(self) -> dict[str, float]:
        return {"--depth-weight": self.depth_weight, "--distortion-weight": self.cfg.distortion_weight}

    def checkpoint_extra(self) -> dict:
        extra = {"octree_method": self.octree_method} if self.octree_method else {}
        if self.appearance is not None and self.batcher.names:  # whose transforms they are (vqad eval checks them)
            extra["appearance_views"] = self.batcher.names
        return extra

    def extra_optimizers(self, lr):
        if self.appearance is None:
            return {}
        rate = lr * self.cfg.grid_lr_scale * APPEARANCE_LR_SHARE
        return {"appearance": torch.optim.Adam(self.appearance.parameters(), lr=rate)}

    def checkpoint_tensors(self):
        return {} if self.appearance is None else {TENSOR_PREFIX + k: v for k, v in self.appearance.state().items()}

    def load_checkpoint_tensors(self, tensors, config, where):
        if self.appearance is not None:
            check_appearance_views(config, self.batcher.names, where)
            self.appearance.load({k[len(TENSOR_PREFIX):]: v for k, v in tensors.items() if k.startswith(TENSOR_PREFIX)},
                                 where)


def psnr_of(per_lod: torch.Tensor) -> float:
    """PSNR of the last (finest rendered) LOD's MSE in ``per_lod (n_lods,)``."""
    return -10.0 * math.log10(max(float(per_lod[-1].detach()), 1e-12))


# -- index refinement ----------------------------------------------------------------------------
def nerf_refine_chunks(field: NeRFField, sampler: OccupancySampler, batcher: RayBatcher, n_rays: int,
                       background: torch.Tensor, generator: torch.Generator, chunk_rays: int = 1024,
                       appearance: ViewAppearance | None = None) -> list[RefineChunk]:
    """The photometric loss of ``n_rays`` random training rays as :class:`~vqad.refine.RefineChunk` s.

    Each chunk holds one set of rays' packed samples (deterministic, mid-step positions); its residual
    is every LOD's rendered minus true colour ``(R, 3)`` (rendered through each ray's view's
    ``appearance``, as training compares them, held fixed), and each sample's owner is its ray.
    """
    flat = batcher.sample_ids(n_rays, generator)
    o, d, rgb, near, far = batcher.rays_for(flat)
    look = None
    if appearance is not None:
        with torch.no_grad():
            look = appearance.looks(batcher.view_of(flat))  # gain, offset (n_rays, 3)
    look_bg = background if batcher.composited else None
    chunks = []
    for a in range(0, n_rays, chunk_rays):
        sl = slice(a, a + chunk_rays)
        oc, dc, gt = o[sl], d[sl], rgb[sl]
        samples = sampler.march(oc, dc, near=near[sl], far=far[sl])
        if len(samples) == 0:
            continue
        x = samples.points(oc, dc)
        sh = sh_encode(dc[samples.ray_indices], field.nerf_cfg.sh_degree)
        g, b = (look[0][sl], look[1][sl]) if look is not None else (None, None)

        def residuals(F, x=x, sh=sh, samples=samples, gt=gt, g=g, b=b):
            out = {}
            for lod, f in F.items():
                sigma, c = field._decode(x, f, sh, lod)
                r = volume_render(samples.t_starts, samples.t_ends, sigma, c, samples.ray_indices, gt.shape[0],
                                  background)
                seen = r.rgb if g is None else as_photographed(r.rgb, g, b, r.opacity, look_bg, gt)  # as training
                out[lod] = seen - gt
            return out

        chunks.append(RefineChunk(x, residuals, owner=samples.ray_indices))
    return chunks


def refine_nerf(field: NeRFField, sampler: OccupancySampler, batcher: RayBatcher, n_rays: int,
                background: torch.Tensor, generator: torch.Generator, quiet: bool = True, check: bool = True,
                rate_weight: float = 0.0, appearance: ViewAppearance | None = None) -> list:
    """One Gauss–Newton index sweep (:func:`vqad.refine.refine_indices`) on ``n_rays`` random training
    rays; with ``check``, each level's moves are kept only if they lower the loss of as many other rays.
    ``rate_weight`` λ > 0: the moves minimise ``loss + λ · index bits per vertex``
    (:func:`vqad.refine.rate_bit_cost`; the training loss is the mean over rays and 3 channels). The
    training views' ``appearance``, if the fit learns one, is applied as training applies it."""
    held_out = (nerf_refine_chunks(field, sampler, batcher, n_rays, background, generator, appearance=appearance)
                if check else None)
    stats = refine_indices(field.grid, nerf_refine_chunks(field, sampler, batcher, n_rays, background, generator,
                                                          appearance=appearance),
                           check=held_out, bit_cost=rate_bit_cost(field.grid, rate_weight, 3 * n_rays))
    if not quiet:
        tqdm.write(format_stats(stats))
    return stats
