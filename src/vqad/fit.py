"""What every fit shares: optimizer groups, the progress bar, checkpoints and Ctrl-C.

Parameters are grouped by identity (never by matching substrings of their names):

* sparse grid parameters (dense features Z, codebook logits C): only the rows a batch touched get
  a gradient, so they use :class:`torch.optim.SparseAdam`, which updates those rows alone;
* the other grid parameters (codebooks D) at the grid learning rate;
* the decoder at the base learning rate. The grid's rate is ``grid_lr_scale`` × the decoder's (the
  reference uses ×100 with RMSprop; ×10 with Adam works better here, see docs/benchmarks/sdf.md).
* codebook logits C may have their own rate, ``logit_lr_scale`` × the decoder's: an index only
  changes when its argmax flips, and a faster logit rate lets it flip sooner (for SDFs, ×200 gave a
  ~20 % lower Chamfer-L1 than the grid's ×10 in a 600-step armadillo test; see docs/benchmarks/sdf.md).
* codebooks D may also have their own rate, ``codebook_lr_scale`` × the decoder's: every step
  touches all 2^b rows, each shared by thousands of vertices (on lego a faster rate speeds early
  training but not the end result, and kills every density on the built-in scene: off by default,
  see docs/benchmarks/nerf.md).
"""

from __future__ import annotations

import math
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vqad.errors import TrainingDivergedError


def zero_grad(opts: dict[str, torch.optim.Optimizer]) -> None:
    for o in opts.values():
        o.zero_grad(set_to_none=True)


def step(opts: dict[str, torch.optim.Optimizer]) -> None:
    for o in opts.values():
        o.step()


def safe_step(opts: dict[str, torch.optim.Optimizer], loss: torch.Tensor) -> bool:
    """Apply the optimizers if ``loss`` and every gradient are finite; otherwise clear the gradients
    and leave the parameters as they are (one bad batch must not turn the model into NaN).
    Returns whether the step was applied."""
    if grads_finite(opts, loss):
        step(opts)
        return True
    zero_grad(opts)
    return False


class DivergenceGuard:
    """Counts the steps :func:`safe_step` skipped; after ``limit`` in a row the fit stops with a
    :class:`~vqad.errors.TrainingDivergedError` that names the learning rates to lower."""

    def __init__(self, lr: float, grid_lr_scale: float, ckpt_dir=None, limit: int = 20):
        self.lr, self.grid_lr_scale, self.ckpt_dir, self.limit = lr, grid_lr_scale, ckpt_dir, limit
        self.in_a_row = 0
        self.skipped = 0

    def after(self, it: int, stepped: bool) -> None:
        """Record step ``it`` (0-based)."""
        self.in_a_row = 0 if stepped else self.in_a_row + 1
        self.skipped += 0 if stepped else 1
        if self.in_a_row >= self.limit:
            saved = self.ckpt_dir is not None and (Path(self.ckpt_dir) / "config.json").is_file()
            where = f"; the last periodic checkpoint is in {self.ckpt_dir}" if saved else ""
            raise TrainingDivergedError(
                f"training diverged at step {it + 1}: {self.in_a_row} steps in a row had a non-finite loss or "
                f"gradient and were skipped; lower --lr (now {self.lr:g}) or --grid-lr-scale (now "
                f"{self.grid_lr_scale:g}){where}")


def grads_finite(opts: dict[str, torch.optim.Optimizer], *tensors: torch.Tensor) -> bool:
    """Whether every gradient the optimizers would apply (sparse gradients: their values), and every
    one of ``tensors``, is finite. One host synchronisation however many parameters there are."""
    grads = [p.grad for o in opts.values() for g in o.param_groups for p in g["params"] if p.grad is not None]
    checks = [torch.isfinite(v._values() if v.is_sparse else v).all()  # uncoalesced values: no sort needed
              for v in list(tensors) + grads]
    return bool(torch.stack(checks).all()) if checks else True


def cosine_lr(opts: dict[str, torch.optim.Optimizer], base_lrs: dict, it: int, total: int, floor: float = 0.1) -> None:
    """Cosine decay from each group's initial lr to ``floor`` × it over ``total`` steps."""
    f = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(it, total) / max(total, 1)))
    for name, o in opts.items():
        for g, base in zip(o.param_groups, base_lrs[name]):
            g["lr"] = base * f


def progress_or_stop(it: int, steps: int, t0: float, max_minutes: float | None) -> float | None:
    """Fraction of training done, ``max(it / steps, elapsed / budget)``, for the lr schedule; ``None``
    once the time budget (``max_minutes``, if any) is spent and training should stop."""
    progress = it / max(steps, 1)
    if max_minutes:
        elapsed = time.perf_counter() - t0
        if elapsed >= 60.0 * max_minutes:
            return None
        progress = max(progress, elapsed / (60.0 * max_minutes))
    return progress


def initial_lrs(opts: dict[str, torch.optim.Optimizer]) -> dict:
    return {name: [g.get("initial_lr", g["lr"]) for g in o.param_groups] for name, o in opts.items()}


class Progress:
    """tqdm bar showing loss, a quality figure, throughput (items/s), steps/s and ETA."""

    def __init__(self, total: int, start: int, unit_name: str, quiet: bool = False):
        self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, disable=quiet, smoothing=0.1)
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


@contextmanager
def interrupt_guard():
    """Turn SIGTERM into KeyboardInterrupt too, so a killed fit saves its checkpoint."""

    def _raise(signum, frame):
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, _raise)
    except ValueError:  # not in the main thread
        old = None
    try:
        yield
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
