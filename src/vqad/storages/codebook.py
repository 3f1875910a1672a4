"""VQ-AD: a b-bit index per vertex into a learned codebook, trained with a straight-through estimator."""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn
from vqad.storages.base import FeatureStorage, TensorLayout, check_bits, round_fp16



class CodebookStorage(FeatureStorage):
    """VQ-AD: each vertex's feature is ``D[V[i]]``, a b-bit index into a learned codebook.

    Training holds logits ``C (m, 2^b)``. The forward pass uses the hard feature
    ``D[argmax C[i]]``; the backward pass the gradient of the soft one ``softmax(C[i]) · D``
    (straight-through). Only the unique vertices a batch touches get a softmax: the cost is
    ``U × 2^b`` per step for U touched vertices, never ``m × 2^b``, and C's gradient is sparse.
    After :meth:`bake`, C is dropped and only ``V = argmax C`` (m,) and D remain.
    """

    kind = "codebook"
    discrete = True

    def __init__(self, m: int, k: int, bits: int = 4, codebook_std: float = 0.1, logit_std: float = 0.1):
        super().__init__(m, k)
        check_bits(bits)
        self.b = int(bits)
        self.D = nn.Parameter(torch.randn(1 << self.b, k) * codebook_std)
        self.C = nn.Parameter(torch.randn(m, 1 << self.b) * logit_std)
        self.register_buffer("V", torch.zeros(0, dtype=torch.long), persistent=False)

    @classmethod
    def create(cls, m: int, k: int, bits: int = 4) -> "CodebookStorage":
        return cls(m, k, bits=bits)

    def params(self) -> dict:
        return {"bits": self.b}

    def forward(self, vertex_ids: torch.Tensor) -> torch.Tensor:
        if self.baked:
            return self.D[self.V[vertex_ids]]
        flat = vertex_ids.reshape(-1)
        uniq, inv = torch.unique(flat, return_inverse=True)
        logits = F.embedding(uniq, self.C, sparse=True)  # (U, 2^b): only the touched rows
        hard = self.D[logits.argmax(dim=-1)]  # (U, k)
        if torch.is_grad_enabled() and self.training:
            soft = torch.softmax(logits, dim=-1) @ self.D  # (U, k)
            # forward value is exactly `hard` (soft - soft is exactly 0), gradient is soft's
            feat = hard + (soft - soft.detach())
        else:
            feat = hard
        return feat[inv].reshape(*vertex_ids.shape, self.k)

    def indices(self) -> torch.Tensor:
        """V = argmax C, shape (m,)."""
        return self.V if self.baked else self.C.detach().argmax(dim=-1)

    def bake(self, fp16: bool = True) -> None:
        self.V = self.indices().clone()
        if fp16:
            self.D.data = round_fp16(self.D)
        self.D.requires_grad_(False)
        self.C = None  # the m × 2^b logits are training-only
        self.baked = True

    def stored_bits(self) -> int:
        """m·b index bits + the fp16 codebook 16·k·2^b."""
        return self.m * self.b + 16 * self.k * (1 << self.b)

    def size_label(self) -> str:
        return f"compressed grid (m·b + 16·k·2^b bits, b={self.b}, k={self.k})"

    def export_tensors(self) -> dict[str, torch.Tensor]:
        return {"D": self.D.detach().half(), "V": self.indices().to(torch.int32)}

    @classmethod
    def from_export(cls, m, k, tensors, bits: int = 4, **params):
        s = cls(1, k, bits=bits)
        s.m = int(m)
        s.D.data = tensors["D"].float().reshape(1 << bits, k)
        s.C = None
        s.V = tensors["V"].long().reshape(m)
        s.D.requires_grad_(False)
        s.baked = True
        return s

    def sparse_parameters(self):
        return [] if self.baked else [self.C]

    def logit_parameters(self):
        return [] if self.baked else [self.C]

    def codebook_parameters(self):
        return [] if self.baked else [self.D]

    @classmethod
    def stored_layout(cls, m, k, bits: int = 4, **params):
        """Codebook ``D (2^b, k)`` in fp16, then indices ``V (m,)`` at b bits each."""
        return [TensorLayout("D", (1 << bits, k), "f16"), TensorLayout("V", (m,), "uint", bits)]
