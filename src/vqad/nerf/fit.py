"""Radiance-field fitting: posed images → octree → VQ-AD (or dense, hash, ...) NeRF field, all LODs jointly.

:func:`fit_nerf` builds the octree (from depth, masks, a coarse density pass, or an earlier fit),
the field on it, and trains it with the radiance task (:class:`~vqad.nerf.task.RadianceTask`) of
the one fit loop (:func:`vqad.fit.run_fit`).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field as dfield, replace
from pathlib import Path

import torch

from vqad.config import DecoderConfig, GridConfig
from vqad.device import peak_memory_bytes
from vqad.errors import InputError
from vqad.fit import DENSITY_SHARE, Deadline, check_fit_call, check_resumable, check_resumed_fit, load_for_resume, run_fit
from vqad.grid import OctreeGrid
from vqad.nerf.depth_prior import depth_source, depth_targets, has_points
from vqad.nerf.appearance import ViewAppearance, require_views_to_learn
from vqad.nerf.data import SceneDataset, dataset_info, require_training_pixels
from vqad.nerf.field import STEP_RATIO_RANGE, NeRFConfig, NeRFField
from vqad.nerf.rays import RayBatcher
from vqad.nerf.recode import RecodeStats
from vqad.nerf.render import OccupancySampler, make_sampler, prune_by_model
from vqad.nerf.task import NeRFTrainConfig, RadianceTask, auto_depth_weight, auto_early_stop, psnr_of
from vqad.storages import storage_class

#: the radiance-field defaults of ``vqad fit-nerf`` and :func:`fit_nerf` (k = 8, levels 4..7, ψ_σ of width
#: 64 on the features alone, shared or per-LOD decoders by :func:`auto_per_lod`, the marching step chosen
#: from the octree)
NERF_GRID = GridConfig(features=8, base_level=4, max_level=7)
NERF_DECODER = DecoderConfig(hidden=64, layers=1, position_input=False, per_lod=None)
NERF_FIELD = NeRFConfig(step_ratio=None, outer_scale=None)

__all__ = ["NERF_GRID", "NERF_DECODER", "NERF_FIELD", "NeRFTrainConfig", "NeRFFitResult", "fit_nerf", "build_nerf_field", "auto_step_ratio",
           "auto_per_lod"]


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
    refine_seconds: float = 0.0  # work after the last step: index sweeps, recoding (in ``seconds``)
    skipped_steps: int = 0  # steps not applied because their loss or a gradient was not finite
    train_cfg: NeRFTrainConfig | None = None  # the configuration that ran (on resume, the checkpoint's)
    notes: list[str] = dfield(default_factory=list)  # what the time cap cut (vqad.fit.LoopResult.notes)
    recode: RecodeStats | None = None  # the unreachable indices recoded after training (vqad.nerf.recode)
    steps_done: int = 0  # steps run by this call (``steps`` counts from 0, across --resume)
    after_training_resumed: bool = False  # no step left: only the work after training an interrupt stopped ran
    earlier_seconds: float | None = 0.0  # training time of the runs this one resumed (None: not known; ``seconds`` is this call's)
    appearance: ViewAppearance | None = None  # the training views' colour transforms (train_cfg.appearance)


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
    sampler = OccupancySampler(octree, step=2.0 / (1 << octree.max_level), outer_scale=dataset.outer_scale)
    batcher = RayBatcher(dataset.splits["train"], dataset, device)
    o, d, _, near, far = batcher.sample(min(probe_rays, batcher.num_valid), torch.Generator().manual_seed(seed))
    n = len(sampler.march(o, d, near=near, far=far)) / o.shape[0]
    step = min(max(1, math.floor(n / budget + 0.5)), STEP_RATIO_RANGE[1])  # halves round up (round() goes to even)
    return float(step), n


def auto_per_lod(dataset: SceneDataset, grid_cfg: GridConfig) -> bool:
    """Whether ``per_lod=None`` ('auto') means one decoder pair per LOD: for a quantised grid (codebook)
    in a scene with contracted space around its central box (``outer_scale > 1``: ngp ``aabb_scale``,
    COLMAP bounds), shared decoders otherwise.

    Measured (docs/benchmarks/scene.md, "Shared or per-LOD decoders"): on the generated room, a 4-bit
    grid with shared decoders stalls near 19–20 dB at every LOD (the coarse LODs' loss holds the shared
    MLPs in a foggy solution; dense grids and objects do not stall), and with one decoder pair per LOD
    it reaches 25.5–25.9 dB at LOD 7 in the same steps (two seeds, aabb_scale 4 and 16; with
    ``--levels 4:8`` it stalls too). On the object alone per-LOD decoders cost the
    coarsest LOD about 1 dB and gain 0.3 dB at LOD 7, so bounded scenes keep the smaller shared pair.
    """
    return bool(dataset.outer_scale > 1.0 and storage_class(grid_cfg.storage).discrete)


def build_nerf_field(dataset: SceneDataset, grid_cfg: GridConfig, dec_cfg: DecoderConfig, nerf_cfg: NeRFConfig,
                     train_cfg: NeRFTrainConfig, device, quiet: bool = True,
                     deadline: Deadline | None = None) -> tuple[NeRFField, str]:
    """Octree (by ``train_cfg.octree``), grid and decoders on ``device``; returns the field and the octree method.

    ``nerf_cfg.step_ratio=None`` (``--step-ratio auto``) is resolved here from the octree by
    :func:`auto_step_ratio`; the field stores the resolved step, so it renders as it was trained."""
    from vqad.nerf.octree_build import octree_from_model

    grid_cfg.validate()
    if nerf_cfg.outer_scale is None:
        nerf_cfg = replace(nerf_cfg, outer_scale=dataset.outer_scale)
    if nerf_cfg.outer_scale != dataset.outer_scale:
        raise InputError(f"the field's outer_scale {nerf_cfg.outer_scale:g} is not the dataset's {dataset.outer_scale:g}")
    if train_cfg.octree_from:
        octree = octree_from_model(train_cfg.octree_from, dataset, grid_cfg.base_level, grid_cfg.max_level, device)
        method = "reused"
    else:
        octree, method = _new_octree(dataset, grid_cfg, train_cfg, device, quiet, deadline)
    if nerf_cfg.step_ratio is None:
        ratio, n = auto_step_ratio(octree, dataset, device, seed=train_cfg.seed)
        nerf_cfg = replace(nerf_cfg, step_ratio=ratio)
        if not quiet:
            cells = f"{ratio:g} finest cell" + ("" if ratio == 1 else "s")
            print(f"marching step: {cells} (auto: {n:.1f} samples per ray at one cell, budget {AUTO_SAMPLES_PER_RAY:g})")
    if dec_cfg.per_lod is None:
        dec_cfg = replace(dec_cfg, per_lod=auto_per_lod(dataset, grid_cfg))
        if not quiet:
            print("decoders: " + ("one pair per LOD (auto: a quantised grid in a contracted scene)" if dec_cfg.per_lod
                                  else "shared by every LOD (auto)"))
    torch.manual_seed(train_cfg.seed)
    grid = OctreeGrid.from_octree(octree, grid_cfg)
    field = NeRFField(grid, dec_cfg, nerf_cfg, dataset.normalization, dataset=dataset_info(dataset)).to(device)
    return field, method


def _new_octree(dataset: SceneDataset, grid_cfg: GridConfig, train_cfg: NeRFTrainConfig, device, quiet: bool,
                deadline: Deadline | None = None):
    from vqad.nerf.octree_build import DensityPassConfig, build_octree

    kwargs = {}
    if train_cfg.octree in ("density", "auto"):
        minutes = train_cfg.density_minutes
        if deadline is not None and deadline.capped:  # the density pass is part of the job: at most its share
            share = max(DENSITY_SHARE * deadline.left_for_fit(), 1.0) / 60.0
            minutes = share if minutes is None else min(minutes, share)
        # 'auto' (None) leaves the pass's termination off: on the generated room (aabb_scale 4, 400 steps, one
        # thread) ε = 1e-4 made it slower, 27.5 s against 22.6-24.1, for the same octree (docs/benchmarks/scene.md)
        kwargs = {"cfg": DensityPassConfig(steps=train_cfg.density_steps, max_minutes=minutes,
                                           early_stop_eps=train_cfg.early_stop_eps or 0.0,
                                           mlp_precision=train_cfg.mlp_precision), "quiet": quiet, "seed": train_cfg.seed}
    return build_octree(dataset, train_cfg.octree, grid_cfg.base_level, grid_cfg.max_level, device,
                        dilate=train_cfg.dilate, **kwargs)


def resolve_depth_weight(train_cfg: NeRFTrainConfig, dataset: SceneDataset) -> NeRFTrainConfig:
    """``train_cfg`` with its depth weight resolved for ``dataset`` (:func:`~vqad.nerf.task.auto_depth_weight`);
    where the loss is on, a capture without the targets asked for is an :class:`InputError`
    (:func:`~vqad.nerf.depth_prior.depth_source`)."""
    if train_cfg.depth_from != "auto" and train_cfg.depth_weight != 0:
        depth_source(dataset, train_cfg.depth_from)  # the targets asked for must be there, whatever λ resolves to
    # 'auto' is measured with the sparse points' targets only: where the depth maps would give them, it stays off
    from_points = has_points(dataset) and (train_cfg.depth_from == "points" or (
        train_cfg.depth_from == "auto" and dataset.splits["train"].depth is None))
    weight = auto_depth_weight(train_cfg.depth_weight, dataset.outer_scale, from_points)
    if weight > 0:
        depth_source(dataset, train_cfg.depth_from)
    return replace(train_cfg, depth_weight=weight)


def _saved_number(resume_cfg: dict, key: str, ckpt_dir) -> float | None:
    """The number a resumed checkpoint's training config holds for ``key`` (an 'auto' setting it resolved;
    :attr:`NeRFTrainConfig.ABSENT_MEANS` for a checkpoint from before the setting; None: never resolved)."""
    saved = {**NeRFTrainConfig.ABSENT_MEANS, **resume_cfg.get("train", {})}[key]
    if saved is not None and (isinstance(saved, bool) or not isinstance(saved, (int, float))):
        raise InputError(f"{ckpt_dir}: the checkpoint's {key} {saved!r} is not a number")
    return saved


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
    deadline: Deadline | None = None,
) -> NeRFFitResult:
    """Fit a radiance field to ``dataset.splits["train"]``.

    With ``out_dir``, a checkpoint is written to ``out_dir/checkpoint`` every ``checkpoint_every``
    steps, at the end, and on Ctrl-C / SIGTERM (then :class:`KeyboardInterrupt` is re-raised after
    saving). ``resume`` continues from that checkpoint (same octree, weights, optimizer state and
    step; the pruned occupancy is recomputed from the model); its grid, decoder and training settings
    must match the ones given, except the step budget and time cap.

    ``deadline`` is the whole job's time cap (default: ``train_cfg.max_minutes`` from this call on):
    the octree's density pass takes at most :data:`~vqad.fit.DENSITY_SHARE` of it, training and the
    sweeps after it share the rest (:func:`vqad.fit.run_fit`), and the cosine learning-rate schedule
    runs on ``max(step / steps, time / training budget)``, so a time-limited fit still ends with a
    decayed rate.
    """
    device = check_fit_call("fit_nerf", dataset, SceneDataset, "vqad.nerf.formats.load_dataset(path)",
                            {"grid_cfg": (grid_cfg, GridConfig), "dec_cfg": (dec_cfg, DecoderConfig),
                             "train_cfg": (train_cfg, NeRFTrainConfig),
                             **({"nerf_cfg": (nerf_cfg, NeRFConfig)} if nerf_cfg is not None else {})}, device)
    grid_cfg.validate()
    deadline = deadline if deadline is not None else Deadline.for_job(train_cfg.max_minutes)
    train_cfg = train_cfg.resolved(grid_cfg)
    train_cfg.validate()
    dec_cfg.validate()
    if "train" not in dataset.splits or len(dataset.splits["train"]) == 0:
        raise InputError(f"dataset {dataset.name!r} has no training views")
    require_training_pixels(dataset.splits["train"])
    if train_cfg.appearance != "none":
        require_views_to_learn(dataset.splits["train"])
    ckpt_dir = Path(out_dir) / "checkpoint" if out_dir is not None else None
    start, resume_cfg = 0, None
    t_oct = time.perf_counter()
    depth_auto = train_cfg.depth_weight is None
    if not resume:  # before the octree: a capture without the depth targets asked for fails at once
        train_cfg = resolve_depth_weight(train_cfg, dataset)
    if resume:
        field, resume_cfg, start = load_for_resume(ckpt_dir, "nerf", device)
        if train_cfg.early_stop_eps is None:  # 'auto' continues with what the checkpoint resolved it to
            saved = _saved_number(resume_cfg, "early_stop_eps", ckpt_dir)
            # null: a run that never resolved it (a task run by hand) -- the rule, from the field's own scene
            train_cfg = replace(train_cfg, early_stop_eps=auto_early_stop(saved, field.nerf_cfg.outer_scale))
            train_cfg.validate()
            if saved is None:  # what that run did, as its task resolved it
                resume_cfg.setdefault("train", {})["early_stop_eps"] = train_cfg.early_stop_eps
        if depth_auto:  # 'auto' continues with what the checkpoint resolved it to (null: the rule)
            train_cfg = replace(train_cfg, depth_weight=_saved_number(resume_cfg, "depth_weight", ckpt_dir))
        train_cfg = resolve_depth_weight(train_cfg, dataset)
        train_cfg.validate()
        if dec_cfg.per_lod is None:  # 'auto' matches whatever the checkpoint resolved it to
            dec_cfg = replace(dec_cfg, per_lod=bool(resume_cfg["decoder"].get("per_lod", False)))
        check_resumed_fit(ckpt_dir, resume_cfg, grid_cfg, dec_cfg, train_cfg)
        if nerf_cfg is not None:  # the field's own settings; an 'auto' step matches whatever it resolved to
            given = {k: v for k, v in asdict(nerf_cfg).items() if not (k in ("step_ratio", "outer_scale") and v is None)}
            check_resumable(ckpt_dir, resume_cfg.get("nerf", {}), given, "radiance-field")
        method = resume_cfg.get("octree_method", "?")
    else:
        try:
            field, method = build_nerf_field(dataset, grid_cfg, dec_cfg, nerf_cfg or NERF_FIELD, train_cfg, device,
                                             quiet, deadline=deadline)
        except KeyboardInterrupt:
            if not quiet:
                print("interrupted while building the octree (a density pass is not saved): nothing to resume; run "
                      "the command again without --resume", file=sys.stderr, flush=True)
            raise
        auto = train_cfg.early_stop_eps is None  # auto_early_stop, from the scene
        train_cfg = replace(train_cfg, early_stop_eps=auto_early_stop(train_cfg.early_stop_eps, dataset.outer_scale))
        if not quiet and train_cfg.early_stop_eps > 0:
            print(f"early ray termination in training: ε = {train_cfg.early_stop_eps:g}"
                  + (" (auto: a contracted scene)" if auto else ""))
    octree_seconds = time.perf_counter() - t_oct
    batcher = RayBatcher(dataset.splits["train"], dataset, device)
    targets = None
    if train_cfg.depth_weight > 0:
        targets = depth_targets(dataset, train_cfg.depth_from, octree=field.grid.octree)
        if len(targets) == 0 and not resume:  # a resumed fit keeps the λ its checkpoint recorded
            if not depth_auto:
                raise InputError(f"--depth-weight {train_cfg.depth_weight:g}: no training pixel gets a depth target "
                                 f"from this capture (--depth-from {train_cfg.depth_from}: no usable depth, or no sparse "
                                 f"point outside the central box in front of a training camera), so the loss cannot "
                                 f"apply; leave --depth-weight out (auto) or give 0")
            # 'auto' with nothing to pull toward (e.g. an object alone in a contracted box: no point outside it):
            # off, and recorded so, rather than a loss of 0 every step
            train_cfg, targets = replace(train_cfg, depth_weight=0.0), None
            if not quiet:
                print("depth loss: off (auto: no sparse point outside the central box gives a training pixel a target)")
    if targets is not None:
        targets.give_to(batcher)
        if not quiet:
            share = len(targets) / batcher.num_valid
            source = "depth maps" if depth_source(dataset, train_cfg.depth_from) == "capture" else "sparse points"
            print(f"depth loss: λ = {train_cfg.depth_weight:g} on {share:.1%} of the training pixels, from the capture's "
                  f"{source}" + (" (auto: a contracted scene with sparse points)" if depth_auto else ""))
    del targets  # the batcher holds its own copy: a depth map's host copy is 4 bytes a pixel
    sampler = make_sampler(field)
    task = RadianceTask(field, sampler, batcher, train_cfg, quiet=quiet, octree_method=method)
    res = run_fit(task, train_cfg, device, ckpt_dir, resume_cfg=resume_cfg, start=start, quiet=quiet, deadline=deadline)
    # the model's own deterministic pruning: what render / eval will use
    prune_by_model(field, sampler)
    field.eval()
    if task.appearance is not None and not quiet:
        print(task.appearance.summary())
    return NeRFFitResult(
        field=field,
        sampler=sampler,
        steps=res.steps,
        seconds=res.seconds,
        octree_seconds=octree_seconds,
        octree_method=method,
        rays_per_second=task.rays / max(res.seconds - res.extra_seconds, 1e-9),
        refine_seconds=res.extra_seconds,
        samples_per_ray=task.total_samples / max(task.rays, 1),
        final_loss=res.final_loss,
        final_psnr=psnr_of(res.last_per_lod) if res.last_per_lod is not None else float("nan"),
        peak_memory_bytes=peak_memory_bytes(device),
        history=res.history,
        skipped_steps=res.skipped_steps,
        train_cfg=train_cfg,
        notes=res.notes,
        recode=task.recode_stats,
        steps_done=res.steps_done,
        after_training_resumed=res.after_training_resumed, earlier_seconds=res.earlier_seconds,
        appearance=task.appearance,
    )
