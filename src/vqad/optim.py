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
