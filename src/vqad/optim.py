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
as the codebook storage produces them.
"""

from __future__ import annotations

import torch


class RowwiseSparseRMSprop(torch.optim.Optimizer):
    """RMSprop with one second moment per row, for sparse gradients of 2-D parameters."""

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
                g = p.grad.coalesce()
                rows, vals = g.indices()[0], g.values()  # (U,), (U, 2^b)
                v = state["v"][rows] * beta + (1 - beta) * vals.float().pow(2).mean(dim=1)
                t = state["t"][rows] + 1
                state["v"][rows] = v
                state["t"][rows] = t
                denom = (v / (1 - beta**t)).sqrt_().add_(eps)  # (U,)
                p.index_add_(0, rows, (vals / denom[:, None]).to(p.dtype), alpha=-lr)
        return loss



ROWWISE_MIN_CODES = 256  # logits with 2^b ≥ this many columns (b ≥ 8) use the O(m)-state optimizer


def make_optimizers(field: torch.nn.Module, lr: float, grid_lr_scale: float,
                    logit_lr_scale: float | None = None,
                    codebook_lr_scale: float | None = None) -> dict[str, torch.optim.Optimizer]:
    """Optimizers by parameter role (see the module docstring); ``logit_lr_scale=None`` and
    ``codebook_lr_scale=None``: the grid's.

    Codebook logits ``C (m, 2^b)`` with b ≥ 8 go to :class:`~vqad.optim.RowwiseSparseRMSprop`
    (state: two ``(m,)`` tensors) instead of SparseAdam (state: two more ``(m, 2^b)`` tensors), so
    training memory stays ≈ one copy of C whatever the bitrate.
    """
    sparse = [p for s in field.grid.storages for p in s.sparse_parameters()]
    sparse_ids = {id(p) for p in sparse}
    logits = [p for s in field.grid.storages for p in s.logit_parameters()]
    wide = [p for p in logits if p.shape[1] >= ROWWISE_MIN_CODES]
    wide_ids = {id(p) for p in wide}
    logit_ids = {id(p) for p in logits if id(p) not in wide_ids} if logit_lr_scale else set()
    logit_lr = lr * (logit_lr_scale or grid_lr_scale)
    codebooks = [p for s in field.grid.storages for p in s.codebook_parameters()] if codebook_lr_scale else []
    codebook_ids = {id(p) for p in codebooks}
    grid_dense = [p for p in field.grid.parameters()
                  if p.requires_grad and id(p) not in sparse_ids and id(p) not in codebook_ids]
    grid_ids = {id(p) for p in field.grid.parameters()}
    rest = [p for p in field.parameters() if p.requires_grad and id(p) not in grid_ids]
    opts: dict[str, torch.optim.Optimizer] = {}
    sparse_groups = [{"params": [p for p in sparse if id(p) not in logit_ids | wide_ids], "lr": lr * grid_lr_scale},
                     {"params": [p for p in sparse if id(p) in logit_ids], "lr": logit_lr}]
    sparse_groups = [g for g in sparse_groups if g["params"]]
    if sparse_groups:
        opts["sparse"] = torch.optim.SparseAdam(sparse_groups)
    if wide:
        opts["logits"] = RowwiseSparseRMSprop(wide, lr=logit_lr)
    groups = [{"params": rest, "lr": lr}]
    if grid_dense:
        groups.append({"params": grid_dense, "lr": lr * grid_lr_scale})
    if codebooks:
        groups.append({"params": codebooks, "lr": lr * codebook_lr_scale})
    opts["dense"] = torch.optim.Adam(groups)
    return opts
