"""Signed distance fitting: mesh → samples → VQ-AD (or dense) SDF field, all LODs jointly."""

from __future__ import annotations

import time
from dataclasses import dataclass, field as dfield
from pathlib import Path

import numpy as np
import torch

from vqad import fit as T
from vqad.checkpoint import load_checkpoint, load_optimizer_state, save_checkpoint
from vqad.config import DecoderConfig, GridConfig, SDFTrainConfig, to_dict
from vqad.device import peak_memory_bytes
from vqad.sdf.field import SDFField
from vqad.grid import OctreeGrid
from vqad.sdf.mesh import Mesh, SampleMix, SDFOracle, draw_sdf_samples, fit_normalization
from vqad.octree import SparseOctree
from vqad.refine import RefineChunk, format_stats, has_codebook, refine_indices
from vqad.storages.codebook import CodebookStorage
from tqdm.auto import tqdm
from vqad.optim import make_optimizers


def build_sdf_field(mesh: Mesh, grid_cfg: GridConfig, dec_cfg: DecoderConfig, device, seed: int = 0,
                    octree_samples: int = 2_000_000) -> SDFField:
    """Octree from surface samples at ``L_max`` (dilated by one cell), grid and decoder on ``device``."""
    grid_cfg.validate()
    norm = fit_normalization(mesh)
    rng = np.random.default_rng(seed)
    from vqad.sdf.mesh import sample_surface

    # dense enough that every finest cell the surface crosses gets a sample
    n = max(octree_samples, 40 * 4 ** grid_cfg.max_level)
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
    interrupted: bool = False
    refine_seconds: float = 0.0  # time in Gauss–Newton index sweeps (included in ``seconds``)
    steps_done: int = 0  # steps run by this call (``steps`` counts from 0, across --resume)
    history: list = dfield(default_factory=list)
    skipped_steps: int = 0  # steps not applied because their loss or a gradient was not finite


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
) -> FitResult:
    """Fit an SDF field to ``mesh``. Loss: Σ over LODs of the mean squared distance error.

    With ``out_dir``, a checkpoint is written there every ``checkpoint_every`` steps, at the end,
    and on Ctrl-C / SIGTERM (then :class:`KeyboardInterrupt` is re-raised after saving).
    ``resume`` continues from ``out_dir/checkpoint``.
    """
    ckpt_dir = Path(out_dir) / "checkpoint" if out_dir is not None else None
    start = 0
    if resume:
        field, cfg = load_checkpoint(ckpt_dir, device)
        field.train()
        start = int(cfg.get("step", 0))
        opts = make_optimizers(field, train_cfg.lr, train_cfg.grid_lr_scale, train_cfg.logit_lr_scale)
        load_optimizer_state(ckpt_dir, opts, cfg)
        rng_state = cfg.get("rng_seed", train_cfg.seed) + start
    else:
        field = build_sdf_field(mesh, grid_cfg, dec_cfg, device, seed=train_cfg.seed)
        opts = make_optimizers(field, train_cfg.lr, train_cfg.grid_lr_scale, train_cfg.logit_lr_scale)
        rng_state = train_cfg.seed
    base_lrs = T.initial_lrs(opts)
    for name, o in opts.items():
        for g, lr in zip(o.param_groups, base_lrs[name]):
            g.setdefault("initial_lr", lr)
    oracle = SDFOracle(mesh)
    rng = np.random.default_rng(rng_state)
    gen = torch.Generator(device="cpu").manual_seed(int(rng_state))
    lods = field.lods

    def save(step_done: int) -> None:
        if ckpt_dir is None:
            return
        extra = {"step": step_done, "train": to_dict(train_cfg), "rng_seed": train_cfg.seed, "mesh": mesh_path}
        save_checkpoint(ckpt_dir, field, extra=extra, optimizers=opts)

    # Gauss–Newton index sweeps (vqad.refine): ``refine_during`` at evenly spread fractions of
    # training (those already passed on --resume are skipped), then ``refine`` after the last step
    refining = has_codebook(field.grid)
    n_during = train_cfg.refine_during if refining else 0
    tail = train_cfg.refine_tail if n_during else 0.0
    span = tail if tail > 0 else 1.0  # at (1 - span) + span · i / (n + 1), i = 1..n
    refine_at = [(1 - span) + span * i / (n_during + 1) for i in range(1, n_during + 1)]
    refine_at = [f for f in refine_at if f > start / max(train_cfg.steps, 1)]

    def refine_from_pool(px: torch.Tensor, pd: torch.Tensor) -> float:
        """One sweep on pool samples (optionally only those near the surface); returns its seconds."""
        t_ref = time.perf_counter()
        # a band keeps the sweep on the surface, but lets coarse indices drift where no sample
        # looks (floaters: a worse Chamfer-L1 on armadillo), so by default every sample counts
        band = train_cfg.refine_band * 2.0 / (1 << field.grid.octree.max_level)
        near = (pd.abs() < band).nonzero().squeeze(1) if band > 0 else torch.arange(pd.shape[0], device=pd.device)
        sel = near[torch.randperm(near.shape[0], generator=gen)[: train_cfg.refine_samples].to(pd.device)]
        refine_sdf(field, px[sel], pd[sel], quiet, measured=train_cfg.refine_candidates)
        return time.perf_counter() - t_ref

    n_levels = len(field.lods)

    def budget_minutes(it: int) -> float | None:
        """``max_minutes`` less the time the sweeps after training will take, so that they fit in it
        too. A sweep costs about ``2 · levels · samples`` point evaluations, i.e. that many / batch
        training steps (armadillo, levels 3..7: predicted 33 s, measured 35 s)."""
        if not train_cfg.max_minutes or not train_cfg.refine or not refining or it <= start:
            return train_cfg.max_minutes
        step_s = (time.perf_counter() - t0 - refine_seconds) / (it - start)
        sweep_s = 2 * n_levels * min(train_cfg.refine_samples, train_cfg.pool_size) / train_cfg.batch * step_s
        # measured moves: c more decoder passes per class; armadillo 3..7 with c = 2 took 63 s a sweep
        # vs 35 s for a Gauss–Newton one (1.8×; the 0.25·c used before let a 9-min fit overrun by 50 s)
        sweep_s *= 1 + 0.4 * train_cfg.refine_candidates
        return max(train_cfg.max_minutes - train_cfg.refine * sweep_s / 60.0, 0.1 * train_cfg.max_minutes)

    prog = T.Progress(train_cfg.steps, start, "pts", quiet=quiet)
    t0 = time.perf_counter()
    loss_val = float("nan")
    history = []
    pool_x = pool_d = None
    refine_seconds = 0.0
    it = start
    interrupted = False
    guard = T.DivergenceGuard(train_cfg.lr, train_cfg.grid_lr_scale, ckpt_dir)  # non-finite steps are skipped
    try:
        with T.interrupt_guard():
            for it in range(start, train_cfg.steps):
                progress = T.progress_or_stop(it, train_cfg.steps, t0, budget_minutes(it))
                if progress is None:
                    break
                if pool_x is None or (it - start) % train_cfg.resample_every == 0:
                    pool_x, pool_d = draw_sdf_samples(oracle, field.normalization, train_cfg.pool_size, rng, SampleMix())
                    pool_x, pool_d = pool_x.to(device), pool_d.to(device)
                idx = torch.randint(0, pool_x.shape[0], (train_cfg.batch,), generator=gen).to(device)
                x, d = pool_x[idx], pool_d[idx]
                if refine_at and refine_at[0] <= progress:
                    refine_at.pop(0)
                    refine_seconds += refine_from_pool(pool_x, pool_d)
                T.cosine_lr(opts, base_lrs, int(progress * 100_000), 100_000)
                T.zero_grad(opts)
                pred = field.all_lods(x, lods)  # (n_lods, B)
                if train_cfg.truncation > 0:
                    tr = train_cfg.truncation
                    pred, d = pred.clamp(-tr, tr), d.clamp(-tr, tr)
                per_lod = ((pred - d[None]) ** 2).mean(dim=1)
                loss = per_lod.sum()
                loss.backward()
                if tail > 0 and progress >= 1 - tail:
                    for st in field.grid.storages:  # the tail: sweeps pick the indices, steps fit D and ψ
                        if isinstance(st, CodebookStorage) and not st.baked:
                            st.C.grad = None
                guard.after(it, T.safe_step(opts, loss))
                if (it + 1) % train_cfg.log_every == 0 or it == start:
                    loss_val = float(loss.detach())
                    history.append({"step": it + 1, "loss": loss_val, "per_lod": per_lod.detach().tolist()})
                    prog.update(0, 0, loss=loss_val)
                prog.update(1, train_cfg.batch)
                if ckpt_dir is not None and (it + 1) % train_cfg.checkpoint_every == 0 and it + 1 < train_cfg.steps:
                    save(it + 1)
            else:
                it = train_cfg.steps
    except KeyboardInterrupt:
        interrupted = True
        prog.close()
        save(it)
        if ckpt_dir is not None and not quiet:
            print(f"\ninterrupted at step {it}: checkpoint saved to {ckpt_dir}; continue with --resume")
        raise
    if refining and it > start and pool_x is not None:
        for _ in range(train_cfg.refine):  # the last sweeps: the indices that are kept
            refine_seconds += refine_from_pool(pool_x, pool_d)
    prog.close()
    save(it)
    seconds = time.perf_counter() - t0
    return FitResult(
        field=field,
        steps=it,
        seconds=seconds,
        points_per_second=prog.items_per_second,
        final_loss=loss_val,
        peak_memory_bytes=peak_memory_bytes(device),
        interrupted=interrupted,
        refine_seconds=refine_seconds,
        steps_done=it - start,
        history=history,
        skipped_steps=guard.skipped,
    )


def sdf_refine_chunks(field: SDFField, x: torch.Tensor, d: torch.Tensor, chunk: int = 1 << 15) -> list:
    """The SDF loss as :class:`vqad.refine.RefineChunk` s: predicted minus true distance, per LOD."""

    def residuals(xc, dc):
        return lambda F: {lod: (field._decode(xc, f, lod) - dc).unsqueeze(-1) for lod, f in F.items()}

    return [RefineChunk(x[a:a + chunk], residuals(x[a:a + chunk], d[a:a + chunk])) for a in range(0, x.shape[0], chunk)]


def refine_sdf(field: SDFField, x: torch.Tensor, d: torch.Tensor, quiet: bool = True, measured: int = 0) -> list:
    """One Gauss–Newton index sweep (:func:`vqad.refine.refine_indices`) on samples ``x (N, 3)``,
    ``d (N,)``; ``measured`` > 0: that many best-predicted codewords per vertex, measured exactly."""
    stats = refine_indices(field.grid, sdf_refine_chunks(field, x, d), measured=measured)
    if not quiet:
        tqdm.write(format_stats(stats))
    return stats
