"""Radiance-field fitting: posed images → octree → VQ-AD (or dense) NeRF field, all LODs jointly.

One training step, from pixel to loss:

1. :class:`RayBatcher` draws B random training pixels (uint8 colours kept on the device) and turns
   them into unit-cube rays ``o, d (B, 3)``;
2. :class:`~vqad.nerf.render.OccupancySampler` marches them, keeping samples in occupied cells only
   (packed, with ``ray_indices``);
3. the field evaluates σ and RGB at every sample for the step's LODs, sharing one grid lookup;
4. :func:`~vqad.nerf.render.volume_render` composites them on the background;
5. the loss is ``Σ_LOD w_LOD · mean ||C_LOD − C_gt||²`` (``w = 1`` for the finest LOD,
   ``coarse_weight`` for the others); sparse grid rows go to SparseAdam, the codebooks and MLPs to
   Adam, the grid at ``grid_lr_scale`` × the decoder's learning rate.

Which LODs a step renders (``lod_mode``): ``all`` (every LOD, every step), ``random`` (one LOD drawn
uniformly), ``finest+random`` (the finest plus one coarser LOD drawn uniformly: the default, best at
every LOD in equal time on lego) or ``finest``; ``coarse_weight`` scales the coarser LODs' loss. The
measurements are in docs/benchmarks/nerf.md ("Which LODs a training step renders").
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field as dfield, replace
from pathlib import Path

import torch

from vqad import fit as T
from vqad.checkpoint import load_checkpoint, load_optimizer_state, save_checkpoint
from vqad.config import DecoderConfig, GridConfig, to_dict
from vqad.device import peak_memory_bytes
from vqad.errors import InputError
from vqad.grid import OctreeGrid
from vqad.nerf.data import SceneDataset
from vqad.nerf.field import NeRFConfig, NeRFField, sh_encode
from vqad.nerf.render import OccupancySampler, volume_render
from vqad.refine import RefineChunk, format_stats, has_codebook, refine_indices
from tqdm.auto import tqdm
from vqad.nerf.data import dataset_info
from vqad.nerf.rays import RayBatcher
from vqad.nerf.task import LOD_MODES, make_sampler, prune_due, prune_threshold, step_lods, train_step
from vqad.optim import make_optimizers


@dataclass
class NeRFTrainConfig:
    """Radiance-field fitting. Learning rates are Adam's; the grid's is ``lr × grid_lr_scale``."""

    steps: int = 3000
    batch_rays: int = 4096
    lr: float = 5e-3  # decoders ψ_σ, ψ_c
    grid_lr_scale: float = 30.0  # features Z / logits C / codebooks D
    logit_lr_scale: float | None = None  # codebook logits C lr = lr × this (None: the grid's)
    codebook_lr_scale: float | None = None  # codebooks D lr = lr × this (None: the grid's); see docs/benchmarks/nerf.md
    lod_mode: str = "finest+random"  # all | random | finest+random | finest
    coarse_weight: float = 1.0  # weight of the LODs coarser than the finest in a step's loss (the finest: 1)
    prune_every: int = 50  # re-test the occupancy every N steps (0: never)
    prune_warmup: int = 100  # ... starting after this many steps
    prune_decay: float = 0.95
    early_stop_eps: float = 0.0  # drop training samples behind transmittance < this (0: keep all; see docs/benchmarks/nerf.md)
    octree: str = "auto"  # auto | depth | mask | density
    dilate: int = 1  # octree margin in finest cells
    density_steps: int = 400  # steps of the coarse density pass (octree="density")
    octree_from: str | None = None  # reuse the octree of this checkpoint / .vqad fit of the same capture
    max_minutes: float | None = None  # stop training after this long (the lr schedule follows time too)
    refine: int = 0  # Gauss–Newton index sweeps (vqad.refine) after the last step (codebook only; 0: none)
    refine_rays: int = 16384  # training rays each sweep sees
    seed: int = 0
    log_every: int = 25
    checkpoint_every: int = 1000

    def validate(self) -> None:
        if self.steps <= 0 or self.batch_rays <= 0:
            raise InputError("--steps and --batch-rays must be positive")
        if self.lod_mode not in LOD_MODES:
            raise InputError(f"unknown LOD mode {self.lod_mode!r}: choose one of {', '.join(LOD_MODES)}")
        if self.lr <= 0 or self.grid_lr_scale <= 0 or any(x is not None and x <= 0 for x in (self.logit_lr_scale,
                                                                                            self.codebook_lr_scale)):
            raise InputError("learning rates must be positive")
        if self.dilate < 0:
            raise InputError("the octree dilation must be >= 0")
        if not 0 < self.coarse_weight <= 1:
            raise InputError(f"--coarse-weight must be in (0, 1], got {self.coarse_weight}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise InputError("--minutes must be positive")
        if self.refine < 0 or self.refine_rays <= 0:
            raise InputError("--refine must be >= 0 and --refine-rays positive")
        if not 0.0 <= self.early_stop_eps < 1.0:
            raise InputError(f"--early-stop-eps must be in [0, 1), got {self.early_stop_eps}")


def nerf_refine_chunks(field: NeRFField, sampler: OccupancySampler, batcher: RayBatcher, n_rays: int,
                       background: torch.Tensor, generator: torch.Generator, chunk_rays: int = 1024) -> list[RefineChunk]:
    """The photometric loss of ``n_rays`` random training rays as :class:`~vqad.refine.RefineChunk` s.

    Each chunk holds one set of rays' packed samples (deterministic, mid-step positions); its residual
    is every LOD's rendered minus true colour ``(R, 3)``, and each sample's owner is its ray.
    """
    o, d, rgb, near, far = batcher.sample(n_rays, generator)
    chunks = []
    for a in range(0, n_rays, chunk_rays):
        sl = slice(a, a + chunk_rays)
        oc, dc, gt = o[sl], d[sl], rgb[sl]
        samples = sampler.march(oc, dc, near=near[sl], far=far[sl])
        if len(samples) == 0:
            continue
        x = samples.points(oc, dc)
        sh = sh_encode(dc[samples.ray_indices], field.nerf_cfg.sh_degree)

        def residuals(F, x=x, sh=sh, samples=samples, gt=gt):
            out = {}
            for lod, f in F.items():
                sigma, c = field._decode(x, f, sh, lod)
                r = volume_render(samples.t_starts, samples.t_ends, sigma, c, samples.ray_indices, gt.shape[0],
                                  background)
                out[lod] = r.rgb - gt
            return out

        chunks.append(RefineChunk(x, residuals, owner=samples.ray_indices))
    return chunks


def refine_nerf(field: NeRFField, sampler: OccupancySampler, batcher: RayBatcher, n_rays: int,
                background: torch.Tensor, generator: torch.Generator, quiet: bool = True, check: bool = True) -> list:
    """One Gauss–Newton index sweep (:func:`vqad.refine.refine_indices`) on ``n_rays`` random training
    rays; with ``check``, each level's moves are kept only if they lower the loss of as many other rays."""
    held_out = nerf_refine_chunks(field, sampler, batcher, n_rays, background, generator) if check else None
    stats = refine_indices(field.grid, nerf_refine_chunks(field, sampler, batcher, n_rays, background, generator),
                           check=held_out)
    if not quiet:
        tqdm.write(format_stats(stats))
    return stats


# -- the fit -------------------------------------------------------------------------------------
@dataclass
class NeRFFitResult:
    field: NeRFField
    sampler: OccupancySampler
    steps: int
    seconds: float  # training loop (and index refinement) only
    octree_seconds: float
    octree_method: str
    rays_per_second: float
    samples_per_ray: float
    final_loss: float
    final_psnr: float
    peak_memory_bytes: int
    history: list = dfield(default_factory=list)
    refine_seconds: float = 0.0  # Gauss–Newton index sweeps after the last step (in ``seconds``)
    skipped_steps: int = 0  # steps not applied because their loss or a gradient was not finite


AUTO_SAMPLES_PER_RAY = 20.0  # the marching budget that --step-ratio auto aims at (docs/benchmarks/nerf.md, fern)


@torch.no_grad()
def auto_step_ratio(octree, dataset: SceneDataset, device, budget: float = AUTO_SAMPLES_PER_RAY,
                    probe_rays: int = 4096, seed: int = 0) -> tuple[float, float]:
    """The marching step, in whole finest cells, that keeps the octree's samples per ray near ``budget``.

    ``probe_rays`` training rays are marched through the unpruned octree one finest cell per step;
    with ``n`` samples per ray on average, the step is ``n / budget`` cells, rounded, at least one.
    Thin octrees (carved from masks or depth; lego: n = 12.5) keep one cell; the thick ones a density
    pass leaves in front of forward-facing scenes (fern: n = 45.4) march two. Returns ``(step_ratio, n)``.
    """
    sampler = OccupancySampler(octree, step=2.0 / (1 << octree.max_level))
    batcher = RayBatcher(dataset.splits["train"], dataset, device)
    o, d, _, near, far = batcher.sample(min(probe_rays, batcher.num_rays), torch.Generator().manual_seed(seed))
    n = len(sampler.march(o, d, near=near, far=far)) / o.shape[0]
    return float(max(1, math.floor(n / budget + 0.5))), n  # halves round up (Python's round() would go to even)


def build_nerf_field(dataset: SceneDataset, grid_cfg: GridConfig, dec_cfg: DecoderConfig, nerf_cfg: NeRFConfig,
                     train_cfg: NeRFTrainConfig, device, quiet: bool = True) -> tuple[NeRFField, str]:
    """Octree (by ``train_cfg.octree``), grid and decoders on ``device``; returns the field and the octree method.

    ``nerf_cfg.step_ratio=None`` (``--step-ratio auto``) is resolved here from the octree by
    :func:`auto_step_ratio`; the field stores the resolved step, so it renders as it was trained."""
    from vqad.nerf.octree_build import octree_from_model

    grid_cfg.validate()
    if train_cfg.octree_from:
        octree = octree_from_model(train_cfg.octree_from, dataset, grid_cfg.base_level, grid_cfg.max_level, device)
        method = "reused"
    else:
        octree, method = _new_octree(dataset, grid_cfg, train_cfg, device, quiet)
    if nerf_cfg.step_ratio is None:
        ratio, n = auto_step_ratio(octree, dataset, device, seed=train_cfg.seed)
        nerf_cfg = replace(nerf_cfg, step_ratio=ratio)
        if not quiet:
            cells = f"{ratio:g} finest cell" + ("" if ratio == 1 else "s")
            print(f"marching step: {cells} (auto: {n:.1f} samples per ray at one cell, budget {AUTO_SAMPLES_PER_RAY:g})")
    torch.manual_seed(train_cfg.seed)
    grid = OctreeGrid.from_octree(octree, grid_cfg)
    field = NeRFField(grid, dec_cfg, nerf_cfg, dataset.normalization, dataset=dataset_info(dataset)).to(device)
    return field, method


def _new_octree(dataset: SceneDataset, grid_cfg: GridConfig, train_cfg: NeRFTrainConfig, device, quiet: bool):
    from vqad.nerf.octree_build import DensityPassConfig, build_octree

    kwargs = {}
    if train_cfg.octree in ("density", "auto"):
        kwargs = {"cfg": DensityPassConfig(steps=train_cfg.density_steps, early_stop_eps=train_cfg.early_stop_eps), "quiet": quiet, "seed": train_cfg.seed}
    return build_octree(dataset, train_cfg.octree, grid_cfg.base_level, grid_cfg.max_level, device,
                        dilate=train_cfg.dilate, **kwargs)


def fit_nerf(
    dataset: SceneDataset,
    grid_cfg: GridConfig,
    dec_cfg: DecoderConfig,
    train_cfg: NeRFTrainConfig,
    device: torch.device,
    out_dir: str | Path | None = None,
    resume: bool = False,
    quiet: bool = False,
    nerf_cfg: NeRFConfig | None = None,
) -> NeRFFitResult:
    """Fit a radiance field to ``dataset.splits["train"]``.

    With ``out_dir``, a checkpoint is written to ``out_dir/checkpoint`` every ``checkpoint_every``
    steps, at the end, and on Ctrl-C / SIGTERM (then :class:`KeyboardInterrupt` is re-raised after
    saving). ``resume`` continues from that checkpoint (same octree, weights, optimizer state and
    step; the pruned occupancy is recomputed from the model).

    With ``train_cfg.max_minutes``, training also stops once that much time has passed (in this
    call), and the cosine learning-rate schedule runs on ``max(step / steps, time / max_minutes)``,
    so a time-limited fit still ends with a decayed learning rate.
    """
    train_cfg.validate()
    if "train" not in dataset.splits or len(dataset.splits["train"]) == 0:
        raise InputError(f"dataset {dataset.name!r} has no training views")
    ckpt_dir = Path(out_dir) / "checkpoint" if out_dir is not None else None
    start = 0
    t_oct = time.perf_counter()
    if resume:
        if ckpt_dir is None or not (ckpt_dir / "config.json").is_file():
            raise InputError(f"--resume: no checkpoint in {ckpt_dir}; run without --resume first")
        field, cfg = load_checkpoint(ckpt_dir, device)
        if field.kind != "nerf":
            raise InputError(f"--resume: {ckpt_dir} holds a {field.kind!r} model, not a radiance field")
        field.train()
        start = int(cfg.get("step", 0))
        method = cfg.get("octree_method", "?")
        opts = make_optimizers(field, train_cfg.lr, train_cfg.grid_lr_scale, train_cfg.logit_lr_scale,
                                 train_cfg.codebook_lr_scale)
        load_optimizer_state(ckpt_dir, opts, cfg)
    else:
        field, method = build_nerf_field(dataset, grid_cfg, dec_cfg, nerf_cfg or NeRFConfig(), train_cfg, device, quiet)
        opts = make_optimizers(field, train_cfg.lr, train_cfg.grid_lr_scale, train_cfg.logit_lr_scale,
                                 train_cfg.codebook_lr_scale)
    octree_seconds = time.perf_counter() - t_oct
    base_lrs = T.initial_lrs(opts)
    for name, o in opts.items():
        for g, lr in zip(o.param_groups, base_lrs[name]):
            g.setdefault("initial_lr", lr)
    batcher = RayBatcher(dataset.splits["train"], dataset, device)
    background = torch.tensor(dataset.background, dtype=torch.float32, device=device)
    sampler = make_sampler(field)
    sigma_thr = prune_threshold(field, sampler)
    density_fn = lambda x: field.density(x)  # noqa: E731
    gen = torch.Generator().manual_seed(train_cfg.seed + start)
    if start >= train_cfg.prune_warmup and train_cfg.prune_every > 0:
        field.eval()
        sampler.prune(density_fn, sigma_thr)
        field.train()

    def save(step_done: int) -> None:
        if ckpt_dir is None:
            return
        extra = {"step": step_done, "train": to_dict(train_cfg), "octree_method": method}
        save_checkpoint(ckpt_dir, field, extra=extra, optimizers=opts)

    prog = T.Progress(train_cfg.steps, start, "rays", quiet=quiet)
    t0 = time.perf_counter()
    history: list = []
    loss_val, psnr = float("nan"), float("nan")
    total_samples, rays_done = 0, 0
    guard = T.DivergenceGuard(train_cfg.lr, train_cfg.grid_lr_scale, ckpt_dir)  # non-finite steps are skipped
    it = start
    try:
        with T.interrupt_guard():
            for it in range(start, train_cfg.steps):
                progress = T.progress_or_stop(it, train_cfg.steps, t0, train_cfg.max_minutes)
                if progress is None:
                    break
                T.cosine_lr(opts, base_lrs, int(progress * 100_000), 100_000)
                if prune_due(it, train_cfg.prune_every, train_cfg.prune_warmup):
                    sampler.prune(density_fn, sigma_thr, decay=train_cfg.prune_decay, generator=gen)
                lods = step_lods(field.lods, train_cfg.lod_mode, gen)
                per_lod, psnr, n_samples, stepped = train_step(
                    field, sampler, batcher, opts, train_cfg.batch_rays, lods, background, gen,
                    train_cfg.early_stop_eps, train_cfg.coarse_weight)
                guard.after(it, stepped)
                total_samples += n_samples
                rays_done += train_cfg.batch_rays
                if (it + 1) % train_cfg.log_every == 0 or it == start:
                    loss_val = float(per_lod.sum())
                    history.append({"step": it + 1, "loss": loss_val, "psnr": psnr, "lods": lods,
                                    "samples_per_ray": n_samples / train_cfg.batch_rays,
                                    "seconds": time.perf_counter() - t0})
                    prog.update(0, 0, loss=loss_val, psnr=f"{psnr:.2f}")
                prog.update(1, train_cfg.batch_rays)
                if ckpt_dir is not None and (it + 1) % train_cfg.checkpoint_every == 0 and it + 1 < train_cfg.steps:
                    save(it + 1)
            else:
                it = train_cfg.steps
    except KeyboardInterrupt:
        prog.close()
        save(it)
        if ckpt_dir is not None and not quiet:
            print(f"\ninterrupted at step {it}: checkpoint saved to {ckpt_dir}; continue with --resume")
        raise
    refine_seconds = 0.0
    if train_cfg.refine and it > start and has_codebook(field.grid):
        t_ref = time.perf_counter()
        field.eval()
        sampler.prune(density_fn, sigma_thr)  # sweep over the samples render / eval will see
        for _ in range(train_cfg.refine):
            refine_nerf(field, sampler, batcher, train_cfg.refine_rays, background, gen, quiet)
        field.train()
        refine_seconds = time.perf_counter() - t_ref
    prog.close()
    steps_done = it
    save(steps_done)
    seconds = time.perf_counter() - t0
    # the model's own deterministic pruning: what render / eval will use
    field.eval()
    sampler.prune(density_fn, sigma_thr)
    return NeRFFitResult(
        field=field,
        sampler=sampler,
        steps=steps_done,
        seconds=seconds,
        octree_seconds=octree_seconds,
        octree_method=method,
        rays_per_second=rays_done / max(seconds - refine_seconds, 1e-9),
        refine_seconds=refine_seconds,
        samples_per_ray=total_samples / max(rays_done, 1),
        final_loss=loss_val,
        final_psnr=psnr,
        peak_memory_bytes=peak_memory_bytes(device),
        history=history,
        skipped_steps=guard.skipped,
    )
