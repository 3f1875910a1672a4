"""The radiance-field training objective: rays → packed samples → volume rendering → per-LOD photometric loss."""

from __future__ import annotations

import math

import torch

from vqad import fit as T
from vqad.nerf.field import NeRFField
from vqad.nerf.render import OccupancySampler, render_rays
from vqad.nerf.rays import RayBatcher
from vqad.optim import make_optimizers

LOD_MODES = ("all", "random", "finest+random", "finest")


# -- one step ------------------------------------------------------------------------------------
def step_lods(lods: list[int], mode: str, generator: torch.Generator) -> list[int]:
    """The LODs one training step renders (ascending)."""
    if mode == "all" or len(lods) == 1:
        return list(lods)
    if mode == "finest":
        return [lods[-1]]
    if mode == "random":
        return [lods[int(torch.randint(0, len(lods), (1,), generator=generator))]]
    return [lods[int(torch.randint(0, len(lods) - 1, (1,), generator=generator))], lods[-1]]


def train_step(field: NeRFField, sampler: OccupancySampler, batcher: RayBatcher, opts, batch: int, lods: list[int],
               background: torch.Tensor, generator: torch.Generator,
               early_stop_eps: float = 0.0, coarse_weight: float = 1.0) -> tuple[torch.Tensor, float, int, bool]:
    """One optimisation step on ``Σ_LOD w_LOD · MSE_LOD``, ``w = 1`` for the field's finest LOD and
    ``coarse_weight`` for the coarser ones. Returns the per-LOD MSE ``(len(lods),)``, the finest
    rendered LOD's PSNR on the batch, the number of samples evaluated (after early ray termination at
    transmittance ``early_stop_eps``, see :func:`render_rays`) and whether the parameters were updated:
    a step whose loss or any gradient is not finite is skipped, so one bad batch cannot turn the model
    into NaN."""
    o, d, rgb, near, far = batcher.sample(batch, generator)
    jitter = torch.rand(batch, generator=generator).to(batcher.device)
    T.zero_grad(opts)
    out, n_samples = render_rays(field, sampler, o, d, lods, background, near=near, far=far, jitter=jitter,
                                 early_stop_eps=early_stop_eps)
    per_lod = ((out.rgb - rgb[None]) ** 2).mean(dim=(1, 2))  # (n_lods,)
    if out.rgb.requires_grad:
        finest = field.lods[-1]
        w = [1.0 if lod == finest else coarse_weight for lod in lods]
        loss = (per_lod * per_lod.new_tensor(w)).sum()
        loss.backward()
        stepped = T.safe_step(opts, loss)
    else:
        stepped = False
    mse_last = float(per_lod[-1].detach())
    return per_lod.detach(), -10.0 * math.log10(max(mse_last, 1e-12)), n_samples, stepped


def make_sampler(field: NeRFField) -> OccupancySampler:
    """The field's sampler: marching step ``step_ratio`` finest cells (from the field's config)."""
    octree = field.grid.octree
    return OccupancySampler(octree, step=field.nerf_cfg.step_ratio * 2.0 / (1 << octree.max_level))


def prune_threshold(field: NeRFField, sampler: OccupancySampler) -> float:
    """σ below which a cell is empty: one marching step there absorbs less than ``prune_alpha``,
    ``1 − exp(−σ · step) < prune_alpha``."""
    return -math.log1p(-field.nerf_cfg.prune_alpha) / sampler.step


def prune_due(it: int, every: int, warmup: int) -> bool:
    """Whether training step ``it`` re-tests the occupancy (every ``every`` steps from ``warmup``; 0: never)."""
    return every > 0 and it >= warmup and it % every == 0


@torch.no_grad()
def model_sampler(field: NeRFField) -> OccupancySampler:
    """The sampler render / eval use: the octree pruned by the model's own densities (deterministic)."""
    sampler = make_sampler(field)
    was_training = field.training
    field.eval()
    sampler.prune(lambda x: field.density(x), prune_threshold(field, sampler))
    field.train(was_training)
    return sampler


def train_steps(field: NeRFField, sampler: OccupancySampler, batcher: RayBatcher, steps: int, batch: int,
                lr: float, grid_lr_scale: float, lod_mode: str = "all", seed: int = 0, quiet: bool = True,
                desc: str = "", prune_every: int = 0, prune_warmup: int = 100, prune_decay: float = 0.95,
                early_stop_eps: float = 0.0) -> float:
    """A plain fit without checkpoints (the octree density pass uses it). Returns the last PSNR.

    With ``prune_every > 0`` the sampler's occupancy is re-tested every that many steps after
    ``prune_warmup`` (as in :func:`fit_nerf`), so empty space stops costing samples."""
    opts = make_optimizers(field, lr, grid_lr_scale)
    base_lrs = T.initial_lrs(opts)
    gen = torch.Generator().manual_seed(seed)
    bg = torch.tensor(batcher.background, dtype=torch.float32, device=batcher.device)
    prog = T.Progress(steps, 0, "rays", quiet=quiet)
    if desc and not quiet:
        prog.bar.set_description(desc)
    field.train()
    psnr = float("nan")
    sigma_thr = prune_threshold(field, sampler)
    for it in range(steps):
        T.cosine_lr(opts, base_lrs, it, steps)
        if prune_due(it, prune_every, prune_warmup):
            sampler.prune(field.density, sigma_thr, decay=prune_decay, generator=gen)
        lods = step_lods(field.lods, lod_mode, gen)
        _, psnr, _, _ = train_step(field, sampler, batcher, opts, batch, lods, bg, gen, early_stop_eps)
        prog.update(1, batch, psnr=psnr)
    prog.close()
    return psnr
