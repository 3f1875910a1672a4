"""The one fit loop: every application (SDF, radiance field, the octree's density pass) trains through it.

:func:`run_fit` owns what every fit needs — the optimizers and their initial learning rates, resume,
the cosine schedule, the time cap, the progress bar, the non-finite-step guard, periodic and final
checkpoints, and Ctrl-C / SIGTERM — and a small :class:`FitTask` per application says what one step
computes: draw a batch, return the per-LOD losses, and optional hooks (index-refinement sweeps,
occupancy updates, sweeps after the last step).

Optimizer groups (:func:`vqad.optim.make_optimizers`): sparse grid rows go to SparseAdam (or, for
b ≥ 6 logits, :class:`~vqad.optim.RowwiseSparseRMSprop`), codebooks and MLPs to Adam, the grid at
``grid_lr_scale`` × the decoder's learning rate (×10 for SDFs, ×30 for radiance fields; the reference
uses ×100 with RMSprop, and Adam against RMSprop was never measured: docs/method.md, deviation 1);
logits C and codebooks D may have rates of their own.

With ``rate_weight = λ > 0`` every step's loss gains ``λ · R``, the grid's estimated index bits per
vertex (:func:`rate_term`: the entropy of the soft assignments of the vertices the step touched,
docs/method.md section 6.6), so a fit trades quality for coded bytes; at λ = 0 nothing is tracked.
The same λ weighs the bits in the fit's index-refinement sweeps (:func:`vqad.refine.rate_bit_cost`):
both minimise ``loss + λ · bits per vertex``.

The schedule follows ``progress = max(step / steps, elapsed / training budget)``, so a time-capped
fit still ends with a decayed learning rate: cosine from each group's initial rate to ``lr_floor`` × it
(by default 0.01 for codebook grids, 0.1 for continuous ones; docs/method.md §6.4 has the measurements).

**A time cap is a cap for the whole job** (:class:`Deadline`): what comes before training (loading,
a density pass), training, the work after it (index sweeps) and the evaluation that follows. Of the
time left when training starts, training gets what the work after it is predicted to leave, but
never less than :data:`MIN_TRAIN_SHARE`; :data:`EVAL_SHARE` of the cap is held back for evaluation
when one follows. Sweeps after training that no longer fit are shortened (fewer samples) or skipped,
and the fit says so in :attr:`LoopResult.notes`; a fit the cap stopped before its task's
``min_useful_steps`` warns loudly.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field as dfield, fields, replace
from typing import Callable, ClassVar, Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vqad.config import check_seed, check_types, is_real
from vqad.errors import InputError, Terminated, TrainingDivergedError, stdout_reader_gone
from vqad.optim import make_optimizers

#: the cosine schedule's final share of each initial learning rate: continuous grids (dense, hash, low-rank)
#: and grids with discrete indices (codebook), whose argmax keeps flipping at a higher final rate
#: (paired runs in docs/method.md §6.4: lower is better for codebooks, not for dense grids)
LR_FLOOR, LR_FLOOR_DISCRETE = 0.1, 0.01

#: steps in a row that may be skipped (non-finite) or find no sample (empty) before a fit stops
GUARD_LIMIT = 20


@dataclass
class TrainConfig:
    """What every fit has: the step budget, learning rates, time cap, seed and checkpoint cadence.

    Each application's config (:class:`~vqad.sdf.fit.SDFTrainConfig`,
    :class:`~vqad.nerf.fit.NeRFTrainConfig`) extends it and sets its own defaults.
    """

    steps: int = 3000
    lr: float | None = 2e-3  # decoder learning rate (None: the application's default for the grid)
    grid_lr_scale: float = 10.0  # grid (features Z, codebooks D) lr = lr × this
    logit_lr_scale: float | None = None  # codebook logits C lr = lr × this (None: the grid's)
    codebook_lr_scale: float | None = None  # codebooks D lr = lr × this (None: the grid's)
    lr_floor: float | None = None  # the cosine schedule ends at this × each group's initial lr (None: by grid, resolved)
    rate_weight: float = 0.0  # λ: loss += λ × estimated index bits per vertex (rate_term; 0: plain VQ-AD)
    rate_context: bool = False  # estimate the bits given the coarser level's index at floor(v/2) (the CONTEXT codec)
    max_minutes: float | None = None  # also stop after this long (the lr schedule follows time too)
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 1000  # steps between checkpoints ...
    checkpoint_minutes: float | None = 2.0  # ... or this many minutes since the last one, whichever comes first

    def validate(self) -> None:
        check_types(self, "train")
        if self.steps <= 0:
            raise InputError(f"--steps must be positive, got {self.steps}")
        rates = (self.lr, self.grid_lr_scale, self.logit_lr_scale, self.codebook_lr_scale)
        if any(r is not None and not 0 < r < math.inf for r in rates):
            raise InputError("learning rates must be positive finite numbers (--lr and the --*-lr-scale options)")
        if self.lr_floor is not None and not 0 < self.lr_floor <= 1:
            raise InputError(f"--lr-floor is the final lr as a share of the initial one: 0 < floor <= 1, got {self.lr_floor}")
        if not 0 <= self.rate_weight < math.inf:
            raise InputError(f"--rate-weight must be a finite number >= 0 (0: no rate term), got {self.rate_weight}")
        if self.rate_context and not self.rate_weight > 0:
            raise InputError("--rate-context changes the rate term's estimate: it needs --rate-weight > 0")
        if self.max_minutes is not None and not 0 < self.max_minutes < math.inf:
            raise InputError(f"--minutes must be a positive finite number (leave it out for no cap), got {self.max_minutes}")
        check_seed(self.seed)
        if self.log_every <= 0 or self.checkpoint_every <= 0:
            raise InputError("log_every and checkpoint_every must be positive")
        if self.checkpoint_minutes is not None and not (0 < self.checkpoint_minutes < math.inf):
            raise InputError(f"--checkpoint-every minutes must be positive, got {self.checkpoint_minutes}")

    #: fields a resumed fit may change (more steps, another time cap, quieter logs); every other one
    #: must match the checkpoint's, or the resumed run would not be the run it claims to continue
    RESUMABLE = ("steps", "max_minutes", "log_every", "checkpoint_every", "checkpoint_minutes",
                 "recode",  # radiance fields: work after the last step, not training
                 "mlp_precision")  # radiance fields: how this machine multiplies, not what is learned

    #: ``(continuous, discrete)``: the decoder lr where ``lr`` is None, by whether the grid has discrete
    #: indices (an application whose ``lr`` default is a number leaves this None)
    DEFAULT_LRS: ClassVar[tuple[float, float] | None] = None

    #: settings that act on discrete indices alone (the rate term, the codebook's logits C and codewords D;
    #: each application adds its index sweeps): with a grid that has none, each must keep its default or be off
    #: (what only sizes one of them, e.g. the sweeps' samples, is inert without it and not listed: a config
    #: shared by fits of several grids keeps it)
    INDEX_SETTINGS: ClassVar[tuple[str, ...]] = ("rate_weight", "rate_context", "logit_lr_scale", "codebook_lr_scale")

    def resolved(self, grid_cfg) -> "TrainConfig":
        """This config with what depends on ``grid_cfg``'s storage chosen where it is None (what a fit
        runs and records): ``lr_floor`` (:data:`LR_FLOOR_DISCRETE` for a grid with discrete indices,
        :data:`LR_FLOOR` otherwise; docs/method.md §6.4) and ``lr`` (:attr:`DEFAULT_LRS`). An
        :attr:`INDEX_SETTINGS` value other than its default or off (0, False, None) with a grid without
        discrete indices is refused: it would do nothing (the command line refuses its flag the same way)."""
        from vqad.storages import storage_class

        discrete = storage_class(grid_cfg.storage).discrete
        if not discrete:
            defaults = {f.name: f.default for f in fields(self)}
            for name in self.INDEX_SETTINGS:
                value = getattr(self, name)
                if value != defaults[name] and value not in (0, None):
                    keep = "0" if defaults[name] in (0, None) else f"its default ({defaults[name]!r})"
                    raise InputError(f"{type(self).__name__}.{name}={value!r} acts on discrete indices (a grid with "
                                     f"storage='codebook'); a {grid_cfg.storage!r} grid has none: leave it at {keep}")
        chosen = {}
        if self.lr_floor is None:
            chosen["lr_floor"] = LR_FLOOR_DISCRETE if discrete else LR_FLOOR
        if self.lr is None and self.DEFAULT_LRS is not None:
            chosen["lr"] = self.DEFAULT_LRS[discrete]
        return replace(self, **chosen) if chosen else self

    #: fields added after checkpoints were first written, with the value an older checkpoint (one
    #: without the field) was trained with, so that resuming it continues the same run
    ABSENT_MEANS = {"lr_floor": 0.1}


#: of the time left when training starts, training always gets at least this share
MIN_TRAIN_SHARE = 0.6
#: share of a whole-job cap held back for the evaluation after the fit (when one follows)
EVAL_SHARE = 0.1
#: of a capped job's time left, the octree's density pass of a radiance field takes at most this share
DENSITY_SHARE = 0.25
#: a sweep after training that fits the time cap only on fewer samples than this share is skipped
MIN_SWEEP_SHARE = 0.25


class Deadline:
    """A whole job's time cap: ``seconds`` from its creation on ``clock`` (``None``: no cap), of which
    ``reserve`` seconds are held back for what follows the fit (its evaluation).

    Every decision that depends on time (when training stops, whether a sweep fits, how much of the
    evaluation runs) asks the same deadline, so the parts of a job cannot each spend the whole cap.
    ``clock`` is injectable so tests can drive a slow job with a fake clock instead of by timing.
    """

    def __init__(self, seconds: float | None, reserve: float = 0.0, clock: Callable[[], float] = time.perf_counter):
        self.seconds, self.reserve, self.clock = seconds, reserve, clock
        self.start = clock()

    @classmethod
    def for_job(cls, max_minutes: float | None, evaluation: bool = False,
                clock: Callable[[], float] = time.perf_counter) -> "Deadline":
        """The cap of a job of ``max_minutes`` (``None``: none), reserving :data:`EVAL_SHARE` of it
        when an evaluation follows the fit."""
        seconds = None if not max_minutes else 60.0 * max_minutes
        return cls(seconds, EVAL_SHARE * seconds if seconds and evaluation else 0.0, clock)

    @property
    def capped(self) -> bool:
        return self.seconds is not None

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        """Seconds left of the whole cap (``inf`` without one)."""
        return math.inf if self.seconds is None else self.seconds - self.elapsed()

    def left_for_fit(self) -> float:
        """Seconds left for the fit: the cap less the evaluation's reserve."""
        return self.left() - self.reserve


#: what a LOD that the job's time cap left out of an evaluation reads in metrics.json
CAP_SKIPPED = "the job's time cap (--minutes) was spent"


def evaluation_order(lods: list[int], deadline: "Deadline | None") -> Iterator[tuple[int, bool]]:
    """``(lod, skip)`` for each LOD an evaluation measures: in order, or finest first under a capped
    ``deadline``, where every LOD after the first is skipped once the cap is spent."""
    capped = deadline is not None and deadline.capped
    for i, lod in enumerate(sorted(lods, reverse=True) if capped else lods):
        yield lod, capped and i > 0 and deadline.left() <= 0


def lod_meshes(lods: list[int], deadline: "Deadline | None", extract: Callable[[int], object], results: dict,
               quiet: bool = False) -> Iterator[tuple[int, object, float]]:
    """``(lod, mesh, t0)`` for each LOD of :func:`evaluation_order` whose ``extract(lod)`` mesh could be made
    (``t0``: :func:`time.perf_counter` before it). A LOD the cap skips reads ``{"skipped": reason}`` in
    ``results`` and one whose extraction refused (:class:`InputError`: no surface) ``{"error": message}``;
    each is printed unless ``quiet``."""
    for lod, skip in evaluation_order(lods, deadline):
        if skip:
            results[lod] = {"skipped": CAP_SKIPPED}
            if not quiet:
                print(f"LOD {lod}: not evaluated ({CAP_SKIPPED})")
            continue
        t0 = time.perf_counter()
        try:
            mesh = extract(lod)
        except InputError as exc:
            results[lod] = {"error": str(exc)}
            if not quiet:
                print(f"LOD {lod}: not evaluated: {exc}")
            continue
        yield lod, mesh, t0


def capped_sweeps(deadline: "Deadline", n: int, predicted: float, sweep: Callable[[float], None],
                  notes: list[str], what: str = "index sweeps after training", done: int = 0,
                  on_done: Callable[[int], None] | None = None) -> int:
    """Run sweeps ``done + 1 .. n`` (``done`` of the ``n`` ran before an interrupt), ``sweep(share)`` on that
    share of their samples, within ``deadline``'s fit time; ``on_done(k)`` after the k-th completes.

    A sweep predicted (``predicted`` seconds, then each one's measured time) not to fit runs on the
    share of its samples that fits, down to :data:`MIN_SWEEP_SHARE`; below it, it and the rest are
    skipped. What was cut is appended to ``notes``. Returns the sweeps run in all.
    """
    shortened, skipped = [], None
    while done < n:
        share = 1.0
        if deadline.capped:
            left = deadline.left_for_fit()
            share = min(1.0, left / max(predicted, 1e-9))
            if share < MIN_SWEEP_SHARE:
                skipped = (f"{n - done} of {n} {what} skipped: the time cap left {max(left, 0):.0f} s and a sweep "
                           f"takes about {predicted:.0f} s")
                break
            if share < 1.0:
                shortened.append(f"{share:.0%}")
        t = deadline.clock()
        sweep(share)
        predicted = (deadline.clock() - t) / share
        done += 1
        if on_done is not None:
            on_done(done)
    if shortened:
        notes.append(f"{len(shortened)} of {n} {what} shortened to {', '.join(shortened)} of their samples to keep "
                     f"the time cap")
    if skipped:
        notes.append(skipped)
    return done


@dataclass
class StepLoss:
    """What a task's step returns.

    ``loss`` is the scalar to minimise (``None``: the batch had no sample, nothing to learn from);
    ``per_lod`` the unweighted loss of each LOD the step evaluated ``(n_lods,)``; ``items`` the
    points or rays the step consumed; ``log`` extra history entries, computed only on log steps.
    """

    loss: torch.Tensor | None
    per_lod: torch.Tensor
    items: int
    log: Callable[[], dict] = dfield(default=lambda: {})


class FitTask:
    """One application's part of a fit. ``field`` is the model being trained."""

    unit = "items"  # what ``StepLoss.items`` counts, for the progress bar (pts, rays)
    #: a fit the time cap stops before this many steps is undertrained: it warns loudly
    min_useful_steps = 0
    extra_seconds = 0.0  # seconds spent outside training steps (index sweeps), if the task counts them
    field: torch.nn.Module
    deadline: Deadline  # the job's time cap, set by run_fit before begin()
    step_seconds: float = 0.0  # mean training step time on the deadline's clock, set before after_training
    notes: list[str]  # what the task had to cut to keep the cap, for the user (set by run_fit)
    sweeps_done: int = 0  # index sweeps after training completed (a resume of an interrupted one starts here)

    def run_sweeps(self, n: int, sweep_seconds: float, sweep: Callable[[float], None]) -> int:
        """The ``n`` index sweeps after training (:func:`capped_sweeps`), counting each completed one in
        :attr:`sweeps_done`, so an interrupt's checkpoint says how many are left: a resume runs only those."""
        def count(k: int) -> None:
            self.sweeps_done = k
        return capped_sweeps(self.deadline, n, sweep_seconds, sweep, self.notes, done=min(self.sweeps_done, n),
                             on_done=count)

    def begin(self, start: int, gen: torch.Generator) -> None:
        """Before the first step (``start`` > 0 on resume)."""

    def after_training_seconds(self, step_seconds: float) -> float:
        """Predicted seconds of the work after training (:meth:`after_training`), given the mean step
        time so far; training leaves them that much of the cap (down to :data:`MIN_TRAIN_SHARE`)."""
        return 0.0

    def before_step(self, it: int, progress: float, gen: torch.Generator) -> None:
        """Hooks before step ``it``: resampling, index sweeps, occupancy updates."""

    def step(self, it: int, progress: float, gen: torch.Generator) -> StepLoss:
        """Draw a batch and compute its loss (gradients are zeroed before, applied after)."""
        raise NotImplementedError

    def after_backward(self, progress: float) -> None:
        """After ``loss.backward()``, before the optimizers step (e.g. drop gradients that must not apply)."""

    def after_training(self, it: int, start: int, gen: torch.Generator) -> None:
        """Work after the last step (e.g. index sweeps); its time is reported as ``extra_seconds``.
        It must fit in ``self.deadline.left_for_fit()``: shorten or skip what does not, and say so
        in ``self.notes``."""

    def checkpoint_extra(self) -> dict:
        """What the task stores in the checkpoint's config beside the step and the train config."""
        return {}

    def extra_optimizers(self, lr: float) -> dict[str, torch.optim.Optimizer]:
        """Optimizers of the task's own parameters outside the field (per-view appearance), given the
        decoders' learning rate; they follow the schedule, the guard and the checkpoint as the field's do."""
        return {}

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The task's own parameters outside the field, saved in the checkpoint beside the model."""
        return {}

    def load_checkpoint_tensors(self, tensors: dict[str, torch.Tensor], config: dict, where: str) -> None:
        """On resume, before the first step: what :meth:`checkpoint_tensors` saved (read back from the checkpoint
        ``where``, whose config dict is ``config``), to validate and restore."""

    def loss_weights(self) -> dict[str, float]:
        """The weights of the task's own extra loss terms, by flag (``{"--depth-weight": 0.03}``), for the
        divergence message: a weight too large is as likely a cause as the learning rate."""
        return {}


@dataclass
class LoopResult:
    steps: int  # the step training stopped at, counted from 0 across resumes
    steps_done: int  # steps run by this call
    after_training_resumed: bool  # no step left: this call only ran the work after training an interrupt had stopped
    seconds: float  # training steps and after_training, in this call
    extra_seconds: float  # after_training (and refinement sweeps during training) alone
    items_per_second: float
    final_loss: float
    last_per_lod: torch.Tensor | None
    history: list
    skipped_steps: int  # not applied: non-finite loss or gradient
    empty_steps: int  # not applied: the batch had no sample
    notes: list[str] = dfield(default_factory=list)  # what the time cap cut (sweeps skipped, too few steps)
    earlier_seconds: float | None = 0.0  # the same time in the runs this one resumed (0: a fresh fit; None: not known)


def resumed_sweeps(resume_cfg: dict) -> int:
    """The index sweeps after training that an interrupted fit had completed (``sweeps_done``; read from a file:
    anything but a non-negative integer counts as none done, and the sweeps run again)."""
    done = resume_cfg.get("sweeps_done")
    return done if isinstance(done, int) and not isinstance(done, bool) and done >= 0 else 0


def check_fit_call(fit: str, data, data_type: type, how: str, configs: dict, device) -> torch.device:
    """The arguments of a Python fit call (``fit_sdf``, ``fit_nerf``, ``fit_tsdf``), checked before any work: its
    data (``how``: how to make one), its configs (``{name: (value, class)}``) and its device, resolved
    (:func:`vqad.device.resolve_device`: a string works as on the command line). A mistake is one clear
    :class:`InputError`, not an AttributeError deep inside, nor one after the whole fit has run."""
    from vqad.device import resolve_device

    if not isinstance(data, data_type):
        raise InputError(f"{fit}: the data must be a {data_type.__name__} ({how}), got a {type(data).__name__}")
    for name, (value, cls) in configs.items():
        if not isinstance(value, cls):
            raise InputError(f"{fit}: {name} must be a {cls.__name__}, got a {type(value).__name__}")
    return resolve_device(device)


def stored_seconds(value) -> float | None:
    """A time read from a checkpoint: ``value`` if it is a finite non-negative number, else None (not known)."""
    return float(value) if is_real(value) and 0 <= value < math.inf else None


def earlier_train_seconds(resume_cfg: dict | None) -> float | None:
    """The training time of the runs before a resumed one, as its checkpoint records it (``train_seconds``):
    0 for a fresh fit, None where it is not known (a checkpoint written before it was recorded, or a value that
    is not a time)."""
    return 0.0 if resume_cfg is None else stored_seconds(resume_cfg.get("train_seconds"))


class DivergenceGuard:
    """Counts skipped steps; after ``limit`` non-finite steps in a row the fit stops with a
    :class:`~vqad.errors.TrainingDivergedError` that names the learning rates to lower, and after
    ``limit`` empty batches in a row with one that says the occupied space is gone."""

    def __init__(self, lr: float, grid_lr_scale: float, ckpt_dir=None, limit: int = GUARD_LIMIT,
                 loss_weights: dict[str, float] | None = None):
        self.lr, self.grid_lr_scale, self.ckpt_dir, self.limit = lr, grid_lr_scale, ckpt_dir, limit
        self.loss_weights = {flag: w for flag, w in (loss_weights or {}).items() if w > 0}
        self.in_a_row = self.empty_in_a_row = 0
        self.skipped = self.empty = 0

    def _where(self) -> str:
        saved = self.ckpt_dir is not None and (Path(self.ckpt_dir) / "config.json").is_file()
        return f"; the last periodic checkpoint is in {self.ckpt_dir}" if saved else ""

    def _weights(self) -> str:
        if not self.loss_weights:
            return ""
        return ", or the extra loss terms' weights (" + ", ".join(f"{flag} now {w:g}" for flag, w in self.loss_weights.items()) + ")"

    def after(self, it: int, stepped: bool | None) -> None:
        """Record step ``it`` (0-based): applied (True), non-finite (False) or empty (None)."""
        self.empty_in_a_row = self.empty_in_a_row + 1 if stepped is None else 0
        self.empty += stepped is None
        self.in_a_row = self.in_a_row + 1 if stepped is False else 0
        self.skipped += stepped is False
        if self.in_a_row >= self.limit:
            raise TrainingDivergedError(
                f"training diverged at step {it + 1}: {self.in_a_row} steps in a row had a non-finite loss or "
                f"gradient and were skipped; lower --lr (now {self.lr:g}) or --grid-lr-scale (now "
                f"{self.grid_lr_scale:g}){self._weights()}{self._where()}")
        if self.empty_in_a_row >= self.limit:
            raise TrainingDivergedError(
                f"training stopped at step {it + 1}: {self.empty_in_a_row} batches in a row had no sample in "
                f"occupied space (the octree holds nothing the training rays or points reach: was every cell "
                f"pruned as empty? check the capture's bounds and --octree){self._where()}")


# -- rate term -----------------------------------------------------------------------------------
def rate_storages(field) -> list:
    """The storages of ``field``'s grid whose index bits training can estimate (``learns_rate``);
    a rate term on a grid without one is an :class:`InputError`."""
    storages = [s for s in field.grid.storages if s.learns_rate and not s.baked]
    if not storages:
        kinds = sorted({s.kind for s in field.grid.storages})
        raise InputError(f"--rate-weight applies to grids with learned indices (--grid codebook), not {', '.join(kinds)}")
    return storages


def rate_term(storages, coarser: dict[int, torch.Tensor] | None = None) -> torch.Tensor | None:
    """Estimated index bits per vertex of the whole grid, differentiable: ``R = Σ_L m_L · R_L / Σ_L m_L``
    over the levels a step touched, ``R_L`` each level's :meth:`~vqad.storages.base.FeatureStorage.rate_bits`
    (so ``R × Σ m_L`` estimates the coded bits of every index). None if no level was touched.

    With ``coarser`` (``storages`` being every level's, coarsest first, and ``coarser[i]`` the
    ``(m_i,)`` ids of the level-``i - 1`` vertex at ``floor(v/2)`` for each ``i ≥ 1``,
    :meth:`~vqad.octree.SparseOctree.coarser_vertices`), each level above the base is estimated given its
    context, the coarser level's current hard index there (the CONTEXT codec's model)."""
    total, weight = None, 0
    for i, s in enumerate(storages):
        if coarser is not None and i > 0:
            up = storages[i - 1]
            r = s.rate_bits(up.indices().index_select(0, coarser[i]), up.codebook().shape[0])
        else:
            r = s.rate_bits()
        if r is not None:
            total = s.m * r if total is None else total + s.m * r
            weight += s.m
    return None if total is None else total / weight


# -- optimizer helpers ---------------------------------------------------------------------------
def zero_grad(opts: dict[str, torch.optim.Optimizer]) -> None:
    for o in opts.values():
        o.zero_grad(set_to_none=True)


def step(opts: dict[str, torch.optim.Optimizer]) -> None:
    for o in opts.values():
        o.step()


def grads_finite(opts: dict[str, torch.optim.Optimizer], *tensors: torch.Tensor) -> bool:
    """Whether every gradient the optimizers would apply (sparse gradients: their values), and every
    one of ``tensors``, is finite. One host synchronisation however many parameters there are.

    Each tensor is checked through its sum, one pass over it (``isfinite(t).all()`` made five on the CPU,
    ~24 ms of a 6-bit radiance-field step's 400 ms): a NaN or an infinity anywhere makes the sum NaN or
    infinite. The sum of finite values can overflow only past ~3e38 in float32, and a step with such a
    gradient is skipped too, which is what a guard against a bad batch should do with it."""
    grads = [p.grad for o in opts.values() for g in o.param_groups for p in g["params"] if p.grad is not None]
    sums = [(v._values() if v.is_sparse else v).sum(dtype=torch.float32) for v in list(tensors) + grads]
    return bool(torch.isfinite(torch.stack(sums)).all()) if sums else True


def safe_step(opts: dict[str, torch.optim.Optimizer], loss: torch.Tensor) -> bool:
    """Apply the optimizers if ``loss`` and every gradient are finite; otherwise clear the gradients
    and leave the parameters as they are (one bad batch must not turn the model into NaN).
    Returns whether the step was applied."""
    if grads_finite(opts, loss):
        step(opts)
        return True
    zero_grad(opts)
    return False


def cosine_lr(opts: dict[str, torch.optim.Optimizer], base_lrs: dict, it: int, total: int, *, floor: float) -> None:
    """Cosine decay from each group's initial lr to ``floor`` × it over ``total`` steps."""
    f = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(it, total) / max(total, 1)))
    for name, o in opts.items():
        for g, base in zip(o.param_groups, base_lrs[name]):
            g["lr"] = base * f


def progress_or_stop(it: int, steps: int, elapsed: float, budget: float | None, resumed_at: float = 0.0) -> float | None:
    """Fraction of training done, ``max(it / steps, p0 + (1 − p0) · elapsed / budget)``, for the lr schedule, where
    ``p0`` (``resumed_at``) is where a resumed fit's schedule had got to; ``None`` once the training budget
    (seconds, if any) is spent and training should stop."""
    progress = it / max(steps, 1)
    if budget is not None:
        if elapsed >= budget:
            return None
        progress = max(progress, resumed_at + (1.0 - resumed_at) * elapsed / budget)
    return progress


def resumed_progress(resume_cfg: dict | None, steps: int) -> float:
    """Where the lr schedule of the time-capped fit a checkpoint holds had got to (``progress``, in [0, 1]): resumed
    with the same ``steps``, it goes on from there over its new cap, not from the top (a high learning rate late in a
    fit). 0 (the schedule of the steps and the new cap alone) for a fresh fit, a fit that was not capped, one resumed
    with other ``steps`` (another schedule asked for), or a checkpoint written before it was recorded."""
    if resume_cfg is None:
        return 0.0
    value, train = resume_cfg.get("progress"), resume_cfg.get("train")
    capped = isinstance(train, dict) and train.get("max_minutes") is not None and train.get("steps") == steps
    return float(value) if capped and is_real(value) and 0 <= value <= 1 else 0.0


def training_budget(left: float, after_seconds: float) -> float | None:
    """Seconds training may take of the ``left`` it started with (``inf``: no cap) when the work after
    it is predicted to take ``after_seconds``: the rest, but at least :data:`MIN_TRAIN_SHARE` of it."""
    if math.isinf(left):
        return None
    left = max(left, 0.0)
    return min(max(left - after_seconds, MIN_TRAIN_SHARE * left), left)


def initial_lrs(opts: dict[str, torch.optim.Optimizer]) -> dict:
    return {name: [g.get("initial_lr", g["lr"]) for g in o.param_groups] for name, o in opts.items()}


class Progress:
    """tqdm bar showing loss, a quality figure, throughput (items/s), steps/s and ETA."""

    def __init__(self, total: int, start: int, unit_name: str, quiet: bool = False, desc: str = ""):
        self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, disable=quiet, smoothing=0.1,
                        desc=desc or None)
        self.unit_name = unit_name
        self.t0 = time.perf_counter()
        self.items = 0

    def update(self, n_steps: int, n_items: int, **metrics) -> None:
        self.items += n_items
        dt = max(time.perf_counter() - self.t0, 1e-9)
        post = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in metrics.items()}
        post[f"{self.unit_name}/s"] = f"{self.items / dt:,.0f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(n_steps)

    def close(self) -> None:
        self.bar.close()

    @property
    def items_per_second(self) -> float:
        return self.items / max(time.perf_counter() - self.t0, 1e-9)


def _say_stopped(exc: BaseException, what: str) -> None:
    """Say why a fit stopped and what was saved: on stdout after Ctrl-C or SIGTERM, on stderr when stdout's
    reader is gone (``| head``: the BrokenPipeError)."""
    if isinstance(exc, BrokenPipeError):
        why = "stdout's reader closed" if stdout_reader_gone() else f"a pipe broke ({exc})"
        print(f"\n{why} {what}", file=sys.stderr)
    else:
        print(f"\ninterrupted {what}")


@contextmanager
def interrupt_guard():
    """Turn SIGTERM into KeyboardInterrupt too, so a killed fit saves its checkpoint."""

    def _raise(signum, frame):
        raise Terminated

    try:
        old = signal.signal(signal.SIGTERM, _raise)
    except ValueError:  # not in the main thread
        old = None
    try:
        yield
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


# -- resume --------------------------------------------------------------------------------------
def check_resumable(ckpt_dir: Path, saved: dict, given: dict, what: str = "training") -> None:
    """Refuse to resume ``ckpt_dir`` with a configuration that contradicts the checkpoint's.

    ``saved`` and ``given`` are config dicts (``dataclasses.asdict``); keys in
    :attr:`TrainConfig.RESUMABLE` may differ, any other difference is an :class:`InputError` that
    names the options."""
    diff = [k for k in given if k not in TrainConfig.RESUMABLE and k in saved and saved[k] != given[k]]
    if diff:
        pairs = ", ".join(f"{k}: checkpoint {saved[k]!r}, now {given[k]!r}" for k in diff[:4])
        raise InputError(f"--resume: {ckpt_dir} was written with other {what} settings ({pairs}); resume with the "
                         f"checkpoint's settings, or start a new fit in another --out")


def check_resumed_fit(ckpt_dir: Path, saved: dict, grid_cfg, dec_cfg, train_cfg: TrainConfig) -> None:
    """:func:`check_resumable` for the grid, decoder and training configs a fit resumes with, and its step
    count: a ``steps`` below the steps the checkpoint has trained is refused (the fit would record fewer steps
    than it ran, and its learning-rate schedule would be past its end)."""
    done = int(saved.get("step", 0))
    if train_cfg.steps < done:
        raise InputError(f"--steps {train_cfg.steps}: this fit has trained {done} steps already; --resume trains on up "
                         f"to a larger --steps (leave it out to finish the {saved.get('train', {}).get('steps', done)} "
                         f"steps it was started with)")
    check_resumable(ckpt_dir, saved["grid"], asdict(grid_cfg), "grid")
    check_resumable(ckpt_dir, saved["decoder"], asdict(dec_cfg), "decoder")
    check_resumable(ckpt_dir, {**type(train_cfg).ABSENT_MEANS, **saved.get("train", {})}, asdict(train_cfg))


def resume_config(ckpt_dir: Path | None, kind: str) -> dict:
    """The config dict of the checkpoint a fit of ``kind`` resumes from, with clear errors."""
    from vqad.checkpoint import read_config, recover_checkpoint

    if ckpt_dir is not None:
        recover_checkpoint(ckpt_dir)  # a save killed between its renames leaves the checkpoint beside its place
    if ckpt_dir is None or not (Path(ckpt_dir) / "config.json").is_file():
        raise InputError(f"--resume: no checkpoint in {ckpt_dir}; run without --resume first")
    cfg = read_config(ckpt_dir)
    if cfg.get("kind") != kind:
        raise InputError(f"--resume: {ckpt_dir} holds a {cfg.get('kind')!r} model, not a {kind!r} one")
    if cfg.get("baked"):
        raise InputError(f"--resume: {ckpt_dir} holds a baked (inference-only) model: it cannot be trained further")
    return cfg


def load_for_resume(ckpt_dir: Path | None, kind: str, device):
    """``(field, checkpoint config, step)`` of the checkpoint a fit resumes from (:func:`resume_config`)."""
    from vqad.checkpoint import load_checkpoint

    resume_config(ckpt_dir, kind)
    field, cfg = load_checkpoint(ckpt_dir, device)
    field.train()
    return field, cfg, int(cfg.get("step", 0))


# -- the loop ------------------------------------------------------------------------------------
def run_fit(task: FitTask, cfg: TrainConfig, device: torch.device, ckpt_dir: Path | None = None,
            resume_cfg: dict | None = None, start: int = 0, gen: torch.Generator | None = None,
            quiet: bool = False, desc: str = "", deadline: Deadline | None = None) -> LoopResult:
    """Train ``task.field`` for ``cfg.steps`` steps (from ``start``), or until the time cap.

    Args:
        task: the application's step and hooks.
        cfg: the resolved training config (``cfg.lr`` set).
        ckpt_dir: where checkpoints go (every ``checkpoint_every`` steps, at the end, and on
            Ctrl-C / SIGTERM, after which :class:`KeyboardInterrupt` is re-raised); None: nowhere.
        resume_cfg: the config dict of the checkpoint being resumed (its optimizer state is loaded
            from ``ckpt_dir``), with ``start`` its step.
        gen: the CPU generator the task draws batches with (default: seeded ``cfg.seed + start``).
        deadline: the whole job's time cap (default: ``cfg.max_minutes`` from now, nothing reserved).
    """
    from vqad.checkpoint import load_optimizer_state, read_task_tensors, save_checkpoint

    field = task.field
    cfg = cfg.resolved(field.grid.cfg)  # callers resolve first (to record it); a pass that did not still gets the rule
    rated = rate_storages(field) if cfg.rate_weight > 0 else []
    coarser = None
    if cfg.rate_context:
        octree = field.grid.octree
        coarser = {i: octree.coarser_vertices(level) for i, level in enumerate(octree.levels) if i > 0}
    opts = make_optimizers(field, cfg.lr, cfg.grid_lr_scale, cfg.logit_lr_scale, cfg.codebook_lr_scale)
    own = task.extra_optimizers(cfg.lr)
    if set(own) & set(opts):
        raise ValueError(f"{type(task).__name__}.extra_optimizers: the names {sorted(set(own) & set(opts))} are the field's")
    opts.update(own)
    if resume_cfg is not None:
        task.load_checkpoint_tensors(read_task_tensors(ckpt_dir), resume_cfg, str(ckpt_dir))
        load_optimizer_state(ckpt_dir, opts, resume_cfg)
    base_lrs = initial_lrs(opts)
    for name, o in opts.items():
        for g, lr in zip(o.param_groups, base_lrs[name]):
            g.setdefault("initial_lr", lr)
    gen = gen if gen is not None else torch.Generator().manual_seed(cfg.seed + start)

    last_save = [time.perf_counter()]

    # the work after training (index sweeps) that an interrupt stopped: the checkpoint says so, and a resume with
    # no step left runs it (the fit would otherwise count as complete without it)
    pending = resume_cfg is not None and resume_cfg.get("after_training") == "pending"

    earlier = earlier_train_seconds(resume_cfg)
    resumed_at = resumed_progress(resume_cfg, cfg.steps)
    schedule = [max(resumed_at, start / max(cfg.steps, 1))]  # the lr schedule's progress, as the last step had it

    def save(step_done: int, after_training_pending: bool = False, time_capped: bool = False) -> None:
        if ckpt_dir is not None:
            extra = {"step": step_done, "train": asdict(cfg), "history": history,  # (train_seconds: None, not known)
                     "train_seconds": None if earlier is None else earlier + time.perf_counter() - t0,
                     "progress": schedule[0], **task.checkpoint_extra()}
            if after_training_pending:
                extra.update(after_training="pending", step_seconds=task.step_seconds, sweeps_done=task.sweeps_done)
            if time_capped:  # finished as asked, by its time cap (vqad export tells it from an interrupted fit)
                extra["time_capped"] = True
            save_checkpoint(ckpt_dir, field, extra=extra, optimizers=opts, task_tensors=task.checkpoint_tensors())
            last_save[0] = time.perf_counter()

    def save_due(step_done: int) -> bool:
        """Every ``checkpoint_every`` steps, or ``checkpoint_minutes`` after the last save (not at the end:
        the final save follows)."""
        if step_done >= cfg.steps:
            return False
        late = cfg.checkpoint_minutes is not None and time.perf_counter() - last_save[0] >= 60.0 * cfg.checkpoint_minutes
        return step_done % cfg.checkpoint_every == 0 or late

    deadline = deadline if deadline is not None else Deadline.for_job(cfg.max_minutes)
    task.deadline, task.notes = deadline, []
    task.begin(start, gen)
    prog = Progress(cfg.steps, start, task.unit, quiet=quiet, desc=desc)
    guard = DivergenceGuard(cfg.lr, cfg.grid_lr_scale, ckpt_dir, loss_weights={"--rate-weight": cfg.rate_weight,
                                                                               **task.loss_weights()})
    t0 = time.perf_counter()
    left0, c0 = deadline.left_for_fit(), deadline.clock()  # the training budget is a share of what is left now
    budget = training_budget(left0, 0.0)

    def mean_step_seconds(steps: int) -> float:
        """Mean time of this call's training steps on the deadline's clock (sweeps during training excluded)."""
        return (deadline.clock() - c0 - task.extra_seconds) / steps

    # the loss log of the whole fit: a resumed one continues the checkpoint's (it used to start again, so the
    # metrics of a resumed fit held only the steps after the interrupt)
    saved = resume_cfg.get("history") if resume_cfg is not None else None
    history: list = [e for e in saved if isinstance(e, dict)] if isinstance(saved, list) else []
    loss_val = float("nan")
    out = None
    it = start
    timed_out = False
    try:
        with interrupt_guard():
            for it in range(start, cfg.steps):
                if it > start and budget is not None:
                    budget = training_budget(left0, task.after_training_seconds(mean_step_seconds(it - start)))
                progress = progress_or_stop(it, cfg.steps, deadline.clock() - c0, budget, resumed_at)
                if progress is None:
                    timed_out = True
                    break
                schedule[0] = progress
                task.before_step(it, progress, gen)
                cosine_lr(opts, base_lrs, int(progress * 100_000), 100_000, floor=cfg.lr_floor)
                zero_grad(opts)
                for i, s in enumerate(rated):  # by context above the base level only (rate_term)
                    s.track_rate(True, contexts=coarser is not None and i > 0)
                out = task.step(it, progress, gen)
                rate = rate_term(rated, coarser) if rated else None
                if out.loss is None:
                    stepped = None
                else:
                    loss = out.loss if rate is None else out.loss + cfg.rate_weight * rate
                    loss.backward()
                    task.after_backward(progress)
                    stepped = safe_step(opts, loss)
                for s in rated:
                    s.track_rate(False)
                guard.after(it, stepped)
                if (it + 1) % cfg.log_every == 0 or it == start:
                    loss_val = float(out.per_lod.detach().sum())
                    entry = {"step": it + 1, "loss": loss_val, **out.log()}
                    if rate is not None:
                        entry["rate_bits"] = float(rate.detach())
                    history.append(entry)
                    prog.update(0, 0, loss=loss_val, **{k: v for k, v in entry.items() if k == "psnr"})
                prog.update(1, out.items)
                if save_due(it + 1):
                    save(it + 1)
            else:
                it = cfg.steps
    except (KeyboardInterrupt, BrokenPipeError) as exc:  # Ctrl-C, SIGTERM, or stdout's reader gone (| head)
        prog.close()
        save(it)
        if ckpt_dir is not None and not quiet:
            _say_stopped(exc, f"at step {it}: checkpoint saved to {ckpt_dir}; continue with --resume")
        raise
    if out is not None:  # the last step's loss, not the last logged one (the log holds every log_every-th)
        loss_val = float(out.per_lod.detach().sum())
    prog.close()  # the bar's time per step is the training steps' (the sweeps after them show their own)
    if it > start or pending:
        was = stored_seconds(resume_cfg.get("step_seconds")) if resume_cfg is not None else None
        task.step_seconds = mean_step_seconds(it - start) if it > start else (was or 0.0)
        task.sweeps_done = resumed_sweeps(resume_cfg) if pending and it == start else 0
        try:
            with interrupt_guard():
                task.after_training(it, start, gen)  # e.g. index sweeps: minutes of work after the last step
        except (KeyboardInterrupt, BrokenPipeError) as exc:
            save(it, after_training_pending=True)  # every training step is in it (a stopped sweep leaves valid indices)
            if ckpt_dir is not None and not quiet:
                _say_stopped(exc, f"after step {it}, in the work after training: checkpoint saved to {ckpt_dir}; "
                                  "--resume runs what is left of it"
                                  + (f" ({task.sweeps_done} index sweeps were done)" if task.sweeps_done else ""))
            raise
    items_per_second = prog.items_per_second  # over the whole call, sweeps after training included
    save(it, time_capped=timed_out)
    if timed_out and it < task.min_useful_steps:
        msg = (f"the time cap stopped training after {it} steps, fewer than the {task.min_useful_steps} a useful fit "
               f"needs: this model is undertrained; give the job more --minutes (or resume it with --resume)")
        task.notes.insert(0, msg)
        print(f"WARNING: {msg}", file=sys.stderr, flush=True)
    elif timed_out:
        task.notes.insert(0, f"the time cap (--minutes) stopped training after {it} of the {cfg.steps} steps asked")
    return LoopResult(
        steps=it, steps_done=it - start, after_training_resumed=pending and it == start,
        seconds=time.perf_counter() - t0, extra_seconds=task.extra_seconds,
        items_per_second=items_per_second, final_loss=loss_val,
        last_per_lod=None if out is None else out.per_lod.detach(), history=history,
        skipped_steps=guard.skipped, empty_steps=guard.empty, notes=list(task.notes), earlier_seconds=earlier)
