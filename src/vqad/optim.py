"""An optimizer for codebook logits whose state stays O(m), not O(m · 2^b).

The VQ-AD logits ``C (m, 2^b)`` are the one training tensor that grows with the bitrate. Adam
(or SparseAdam) keeps two more tensors of that shape, so at b = 10 a level with m = 300k vertices
needs 3 × 1.2 GB. The paper stopped at 6 bits for this reason.

:class:`RowwiseSparseRMSprop` keeps one second-moment scalar per *row* (vertex) instead:

    v_i ← β v_i + (1 − β) · mean_j g_ij²        (only rows i the batch touched)
    C_ij ← C_ij − lr · g_ij / (√(v_i / (1 − β^t_i)) + ε)

with a per-row bias correction (``t_i`` = updates row i has had). RMSprop is what the reference code
trains the grid with; "row-wise" second moments are the standard trick for large embedding tables.
State: two ``(m,)`` tensors, whatever b is. Gradients must be sparse (``F.embedding(..., sparse=True)``),
as the codebook storage produces them. On the CPU the update is one fused pass over the touched rows
(:func:`vqad.kernels.sparse_rmsprop`; a row's mean square summed in double, so ``v`` may differ from the
PyTorch ops' in its last bits).
"""

from __future__ import annotations

import math

import torch

from vqad import kernels
from vqad.storages.base import unique_rows


def summed_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows a sparse gradient names and their summed values: ``(U,)`` sorted row ids, ``(U, n)``.

    What ``grad.coalesce()`` gives, without its sort when the parameter has few enough rows: the rows
    are numbered by :func:`~vqad.storages.base.unique_rows` and the values added into ``(U, n)``
    (``index_add_``); a row named with an all-zero value still counts, as in a coalesced gradient.
    """
    idx, vals = grad._indices()[0], grad._values()
    # autograd does not keep the coalesced flag, but strictly increasing rows are coalesced already
    # (gather_unique_rows' gradients are): one linear check instead of any summing
    if grad.is_coalesced() or idx.numel() < 2 or bool((idx[1:] > idx[:-1]).all()):
        return idx, vals
    rows, inv = unique_rows(idx, grad.shape[0])
    return rows, vals.new_zeros((rows.numel(),) + tuple(vals.shape[1:])).index_add_(0, inv, vals)


def _fused(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor, g: torch.Tensor) -> bool:
    """Whether a kernel (:func:`vqad.kernels.sparse_adam`, :func:`~vqad.kernels.sparse_rmsprop`) can update
    the parameter ``p`` and its two state tensors ``a``, ``b`` in place with the gradient rows ``g``:
    float32 on the CPU, the parameter and its state contiguous."""
    state = (p, a, b)
    return all(t.dtype == torch.float32 and t.is_contiguous() for t in state) and kernels.applies(*state, g)


class SparseRowAdam(torch.optim.SparseAdam):
    """:class:`torch.optim.SparseAdam`, the same update and state, without coalescing's sort.

    SparseAdam coalesces each sparse gradient (a sort of every index a batch touched) before its
    masked Adam update. This sums the gradient's rows with :func:`summed_rows` instead (repeated rows
    are added in another order, so a sum may differ in its last bits; a gradient that arrives coalesced,
    as the codebook and dense storages give it (rows strictly increasing), is used as is and the step
    is bit for bit SparseAdam's),
    then applies the same update to those rows: ``m ← m + (1 − β1)(g − m)``, ``v ← v + (1 − β2)(g² − v)``,
    ``p ← p − lr · √(1 − β2^t) / (1 − β1^t) · m / (√v + ε)`` (the step count ``t`` per parameter).

    On the CPU the update is one fused pass over the rows (:func:`vqad.kernels.sparse_adam`): the same
    operations in the same order, except that its ``√v`` is correctly rounded where PyTorch's vectorised
    ``sqrt`` may be one unit in the last place off, so ``p`` can differ from SparseAdam's by that much.
    """

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            eps, lr = group["eps"], float(group["lr"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError("SparseRowAdam needs sparse gradients (F.embedding(..., sparse=True))")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                rows, g = summed_rows(p.grad)
                if g.numel() == 0:
                    continue
                if group.get("maximize", False):
                    g = -g
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                t = state["step"]
                step_size = lr * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
                if _fused(p, exp_avg, exp_avg_sq, g):  # one pass over the rows (vqad.kernels)
                    kernels.sparse_adam(p, exp_avg, exp_avg_sq, rows, g, beta1, beta2, eps, step_size)
                    continue
                m_old, v_old = exp_avg.index_select(0, rows), exp_avg_sq.index_select(0, rows)
                m_new = g.sub(m_old).mul_(1 - beta1).add_(m_old)
                v_new = g.pow(2).sub_(v_old).mul_(1 - beta2).add_(v_old)
                exp_avg.index_copy_(0, rows, m_new)
                exp_avg_sq.index_copy_(0, rows, v_new)
                p.index_add_(0, rows, m_new.div_(v_new.sqrt_().add_(eps)).mul_(-step_size))  # SparseAdam's rounding, in place
        return loss


class RowwiseSparseRMSprop(torch.optim.Optimizer):
    """RMSprop with one second moment per row, for sparse gradients of 2-D parameters."""

    #: a parameter's state after its first step: ``v`` (its rows' second moments) and ``t`` (their step counts),
    #: one value per row each (what a checkpoint's state is checked against: vqad.checkpoint)
    STATE_KEYS = ("v", "t")
    ROW_STATE = True

    def __init__(self, params, lr: float = 1e-2, beta: float = 0.99, eps: float = 1e-8):
        if lr <= 0 or not 0.0 <= beta < 1.0 or eps <= 0:
            raise ValueError(f"invalid RowwiseSparseRMSprop settings: lr={lr}, beta={beta}, eps={eps}")
        super().__init__(params, dict(lr=lr, beta=beta, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, beta, eps = group["lr"], group["beta"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dim() != 2 or not p.grad.is_sparse:
                    raise RuntimeError("RowwiseSparseRMSprop needs 2-D parameters with sparse gradients")
                state = self.state[p]
                if not state:
                    state["v"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)  # (m,)
                    state["t"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)  # (m,)
                rows, vals = summed_rows(p.grad)  # (U,), (U, 2^b)
                if _fused(p, state["v"], state["t"], vals):  # one pass over the rows (vqad.kernels)
                    kernels.sparse_rmsprop(p, state["v"], state["t"], rows, vals, lr, beta, eps)
                    continue
                v = state["v"][rows] * beta + (1 - beta) * vals.float().pow(2).mean(dim=1)
                t = state["t"][rows] + 1
                state["v"][rows] = v
                state["t"][rows] = t
                denom = (v / (1 - beta**t)).sqrt_().add_(eps)  # (U,)
                p.index_add_(0, rows, (vals / denom[:, None]).to(p.dtype), alpha=-lr)
        return loss



#: the order of each optimizer's groups, by learning-rate scale (see :class:`~vqad.storages.ParamGroup`)
_RATE_ORDER = ("grid", "logit", "codebook")


def make_optimizers(field: torch.nn.Module, lr: float, grid_lr_scale: float,
                    logit_lr_scale: float | None = None,
                    codebook_lr_scale: float | None = None) -> dict[str, torch.optim.Optimizer]:
    """The optimizers of a field, from what each grid storage declares (``param_groups()``).

    * ``"sparse"``: :class:`SparseRowAdam` (SparseAdam without its sort) over the storages' ``sparse`` groups (dense Z, hash θ, low-rank A,
      codebook logits C up to b = 5), one group per learning rate;
    * ``"logits"``: :class:`RowwiseSparseRMSprop` over their ``rowwise`` groups (codebook logits C
      ``(m, 2^b)`` from b = 6 on (``storages.codebook.ROWWISE_MIN_CODES``): state two ``(m,)`` tensors
      instead of SparseAdam's two more ``(m, 2^b)``, so training memory stays ≈ one copy of C whatever the
      bitrate, and fewer passes over the touched rows per step);
    * ``"dense"``: Adam over the decoders (``lr``), then the storages' ``dense`` groups (low-rank B
      and μ, codebooks D).

    A group's learning rate is ``lr ×`` its scale: ``grid_lr_scale``, ``logit_lr_scale`` or
    ``codebook_lr_scale``; these last two, when ``None``, are the grid's, and their groups then merge
    into the grid's. Empty optimizers (and empty storage groups) are left out.
    """
    scales = {"grid": grid_lr_scale, "logit": logit_lr_scale, "codebook": codebook_lr_scale}
    buckets: dict[tuple[str, str], list[torch.nn.Parameter]] = {}
    declared = set()
    for s in field.grid.storages:
        for g in s.param_groups():
            rate = g.rate if scales[g.rate] else "grid"
            buckets.setdefault((g.optimizer, rate), []).extend(g.params)
            declared.update(id(p) for p in g.params)
    hidden = [n for n, p in field.grid.named_parameters() if p.requires_grad and id(p) not in declared]
    if hidden:
        raise RuntimeError(f"grid parameters {', '.join(hidden)} are trainable but no storage declares them "
                           "in param_groups(): every trainable storage parameter needs a group")

    def groups(optimizer: str) -> list[dict]:
        return [{"params": buckets[(optimizer, r)], "lr": lr * scales[r]} for r in _RATE_ORDER if buckets.get((optimizer, r))]

    grid_ids = {id(p) for p in field.grid.parameters()}
    rest = [p for p in field.parameters() if p.requires_grad and id(p) not in grid_ids]
    opts: dict[str, torch.optim.Optimizer] = {}
    if sparse := groups("sparse"):
        opts["sparse"] = SparseRowAdam(sparse)
    if rowwise := groups("rowwise"):
        opts["logits"] = RowwiseSparseRMSprop(rowwise)
    opts["dense"] = torch.optim.Adam([{"params": rest, "lr": lr}, *groups("dense")])
    return opts
