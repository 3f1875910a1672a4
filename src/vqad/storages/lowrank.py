"""Low-rank features ``Z ≈ A·B + μ`` (the paper's low-rank baseline, by PCA of a dense grid; also trainable)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vqad.errors import InputError
from vqad.storages.base import FeatureStorage, ParamGroup, TensorLayout, is_int, round_fp16
from vqad.storages.dense import DenseStorage, check_dense


def default_rank(k: int) -> int:
    """r used when a low-rank grid is configured without one: ``max(1, k // 2)``."""
    return max(1, k // 2)


def check_rank(rank, k: int) -> None:
    """Raise :class:`InputError` unless ``1 <= rank < k`` (a low-rank grid has fewer dims than k)."""
    if k < 2:
        raise InputError(f"a low-rank grid needs k >= 2 features to project to r < k dimensions, got k={k}")
    if not is_int(rank) or not 1 <= rank < k:
        raise InputError(
            f"rank (r) must be an integer in 1..{k - 1}, fewer dimensions than the k={k} features; got {rank!r} "
            f"(e.g. --rank {default_rank(k)})"
        )


# ================================================================================================
# low rank
# ================================================================================================
def pca(Z: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-r affine approximation ``Z ≈ A·B + μ`` (principal component analysis), in float64.

    ``μ`` is the mean row; B's rows are the r leading right singular vectors of the centred
    ``Z − μ`` (eigenvectors of the k×k scatter matrix, so memory stays O(m·k)), each with its
    largest-magnitude entry positive; ``A = (Z − μ)·Bᵀ``. The squared Frobenius error equals the sum
    of the discarded squared singular values of ``Z − μ`` (Eckart–Young).

    Args:
        Z: ``(m, k)`` features.
        rank: r, ``1 <= r < k``.
    Returns:
        ``A (m, r)``, ``B (r, k)``, ``μ (k,)``, float64, on Z's device.
    """
    check_rank(rank, Z.shape[1])
    Z = Z.detach().double()
    mean = Z.mean(dim=0)
    Zc = Z - mean
    evals, evecs = torch.linalg.eigh(Zc.T @ Zc)  # ascending
    B = evecs[:, torch.argsort(evals, descending=True)[:rank]].T.contiguous()  # (r, k)
    sign = torch.sign(B.gather(1, B.abs().argmax(dim=1, keepdim=True)))
    B = B * torch.where(sign == 0, torch.ones_like(sign), sign)
    return Zc @ B.T, B, mean


class LowRankStorage(FeatureStorage):
    """Low-rank features: ``Z[i] = A[i]·B + μ``, coefficients ``A (m, r)``, basis ``B (r, k)``, mean ``μ (k,)``.

    The paper's low-rank baseline is :meth:`from_dense` (PCA of a trained dense grid); the storage
    is also trainable (A with sparse gradients, B and μ dense). Stored in fp16:
    ``16·(m·r + r·k + k)`` bits.
    """

    kind = "lowrank"
    create_args = ("rank",)

    def __init__(self, m: int, k: int, rank: int | None = None, init_std: float = 0.01):
        super().__init__(m, k)
        rank = default_rank(k) if rank is None else rank
        check_rank(rank, k)
        self.r = int(rank)
        if init_std > 0:
            basis, _ = torch.linalg.qr(torch.randn(k, self.r))  # orthonormal rows: A·B keeps A's scale
            self.A = nn.Parameter(torch.randn(m, self.r) * init_std)
            self.B = nn.Parameter(basis.T.contiguous())
        else:  # overwritten at once (from_export, from_dense): consume no random numbers
            self.A = nn.Parameter(torch.zeros(m, self.r))
            self.B = nn.Parameter(torch.zeros(self.r, k))
        self.mean = nn.Parameter(torch.zeros(k))

    @classmethod
    def check_options(cls, cfg) -> None:
        if cfg.rank is not None:  # None: default_rank(k)
            check_rank(cfg.rank, cfg.features)

    @classmethod
    def create(cls, m: int, k: int, rank: int | None = None) -> "LowRankStorage":
        return cls(m, k, rank=rank)

    @classmethod
    def from_dense(cls, dense: DenseStorage, rank: int, fp16: bool = True) -> "LowRankStorage":
        """PCA of a trained dense storage's ``Z (m, k)`` to r dimensions (:func:`pca`), baked.

        With ``fp16``, B and μ are rounded first and A is then refitted by least squares against
        the rounded basis (``A = (Z − μ)·Bᵀ(B·Bᵀ)⁻¹``) before its own rounding, so the stored
        coefficients are the best ones for the stored basis.
        """
        check_dense(dense)
        check_rank(rank, dense.k)
        Z = dense.Z.detach().double()
        A, B, mean = pca(Z, rank)
        if fp16:
            B, mean = round_fp16(B), round_fp16(mean)
            A = torch.linalg.solve(B @ B.T, B @ (Z - mean).T).T  # (m, r)
            A = round_fp16(A)
        s = cls(dense.m, dense.k, rank=rank, init_std=0.0).to(dense.Z.device)
        s.A.data, s.B.data, s.mean.data = A.float(), B.float(), mean.float()
        s.bake(fp16=fp16)
        err = ((A @ B + mean) - Z).pow(2).sum()
        s.reconstruction_error = float(err / Z.pow(2).sum().clamp_min(1e-300))
        return s

    def params(self) -> dict:
        return {"rank": self.r}

    def forward(self, vertex_ids: torch.Tensor) -> torch.Tensor:
        """``(...,) int64 -> (..., k)``."""
        a = F.embedding(vertex_ids, self.A, sparse=not self.baked)  # (..., r)
        return a @ self.B + self.mean

    def bake(self, fp16: bool = True) -> None:
        for p in (self.A, self.B, self.mean):
            if fp16:
                p.data = round_fp16(p)
            p.requires_grad_(False)
        self.baked = True

    def stored_bits(self) -> int:
        """fp16 coefficients, basis and mean: ``16·(m·r + r·k + k)``."""
        return 16 * (self.m * self.r + self.r * self.k + self.k)

    def export_tensors(self) -> dict[str, torch.Tensor]:
        return {"A": self.A.detach().half(), "B": self.B.detach().half(), "mean": self.mean.detach().half()}

    @classmethod
    def from_export(cls, m, k, tensors, rank: int | None = None, **params):
        s = cls(1, k, rank=rank, init_std=0.0)
        s.m = int(m)
        s.A = nn.Parameter(tensors["A"].float().reshape(m, s.r), requires_grad=False)
        s.B.data = tensors["B"].float().reshape(s.r, k).to(s.A.device)
        s.mean.data = tensors["mean"].float().reshape(k).to(s.A.device)
        s.bake(fp16=False)
        return s

    def param_groups(self) -> list[ParamGroup]:
        """A (sparse gradients), then B and μ (dense), all at the grid rate."""
        return [] if self.baked else [ParamGroup((self.A,), "sparse"), ParamGroup((self.B, self.mean), "dense")]

    @classmethod
    def stored_layout(cls, m, k, rank: int | None = None, **params):
        """Coefficients ``A (m, r)``, basis ``B (r, k)`` and mean ``μ (k,)``, fp16."""
        check_rank(rank, k)
        return [TensorLayout("A", (m, rank), "f16"), TensorLayout("B", (rank, k), "f16"), TensorLayout("mean", (k,), "f16")]
