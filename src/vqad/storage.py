"""Feature storages: how the k features of a level's m vertices are held.

Every storage has the same small interface, so the method (``codebook``, VQ-AD) and each baseline
(``dense`` here; ``lowrank``, ``kmeans`` and ``hash`` in :mod:`vqad.baselines`, registered in
:data:`STORAGES` when the package is imported) differ only in this object:

* ``create(m, k, **options)``: a fresh storage for training (:func:`make_storage` passes each kind
  the options it names in ``create_args``: ``bits``, ``rank``, ``table_bits``, ``vertices``);
* ``forward(vertex_ids)``: ``(...,) int64 -> (..., k)`` features of those vertices;
* ``bake(fp16=True)``: switch to the inference form that is written to a file (and, with
  ``fp16``, round every stored float to fp16 so that what is evaluated is what is stored);
* ``stored_bits()``: bits of the stored form (no container overhead);
* ``export_tensors()`` / ``from_export(m, k, tensors, vertices=..., **params)``: the stored form as
  named tensors, and back. ``vertices`` (the level's integer vertex coordinates, from the octree) is
  what a kind that derives data from vertex positions (``hash``) rebuilds it from; it is never stored.

Symbols follow the paper: m vertices, k features, b bits, codebook ``D (2^b, k)``, training logits
``C (m, 2^b)``, baked indices ``V (m,)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError

MIN_BITS, MAX_BITS = 1, 12


@dataclass(frozen=True)
class TensorLayout:
    """How one stored tensor of a storage is written to a .vqad file.

    ``encoding`` is ``"f16"`` (IEEE half floats, little-endian) or ``"uint"`` (unsigned integers in
    ``[0, 2^bits)``, bit-packed at exactly ``bits`` bits each, see :mod:`vqad.bitpack`).
    """

    name: str
    shape: tuple[int, ...]
    encoding: str  # "f16" | "uint"
    bits: int = 16

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n

    def stored_bits(self) -> int:
        return self.numel * self.bits


class FeatureStorage(nn.Module):
    """Base class: k features for each of m vertices."""

    kind: ClassVar[str] = ""
    #: the options of :func:`make_storage` that :meth:`create` takes (the others are for other kinds)
    create_args: ClassVar[tuple[str, ...]] = ("bits",)

    def __init__(self, m: int, k: int):
        super().__init__()
        if m <= 0 or k <= 0:
            raise InputError(f"a feature storage needs m > 0 vertices and k > 0 features, got m={m}, k={k}")
        self.m, self.k = int(m), int(k)
        self.baked = False

    def forward(self, vertex_ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def bake(self, fp16: bool = True) -> None:
        """Turn into the stored, inference-only form."""
        raise NotImplementedError

    def stored_bits(self) -> int:
        """Bits of the stored form, before any container or entropy coding."""
        raise NotImplementedError

    def dense_fp16_bits(self) -> int:
        """Bits of the uncompressed fp16 grid this storage replaces: 16·m·k."""
        return 16 * self.m * self.k

    def export_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @classmethod
    def from_export(cls, m: int, k: int, tensors: dict[str, torch.Tensor], **params) -> "FeatureStorage":
        """The baked storage of :meth:`export_tensors`' tensors and :meth:`params`.

        Callers (checkpoints, the .vqad reader) also pass ``vertices``: the level's ``(m, 3)`` int64
        vertex coordinates in vertex-id order (``octree.vertices[level]``). Kinds whose stored form
        does not depend on vertex positions ignore it.
        """
        raise NotImplementedError

    def params(self) -> dict:
        """Hyper-parameters needed to rebuild this storage (JSON-serialisable)."""
        return {}

    @classmethod
    def create(cls, m: int, k: int, bits: int = 4) -> "FeatureStorage":
        """A freshly initialised storage for training."""
        return cls(m, k)

    def sparse_parameters(self) -> list[nn.Parameter]:
        """Parameters whose gradients are sparse (only the rows a batch touches)."""
        return []

    def logit_parameters(self) -> list[nn.Parameter]:
        """Index logits (codebook C), which may train at their own rate (``logit_lr_scale``)."""
        return []

    def codebook_parameters(self) -> list[nn.Parameter]:
        """Learned codebooks (VQ-AD's D), which may train at their own rate (``codebook_lr_scale``)."""
        return []

    @classmethod
    def stored_layout(cls, m: int, k: int, **params) -> list["TensorLayout"]:
        """The tensors of :meth:`export_tensors`, in file order, and how each is written.

        ``params`` are those of :meth:`params`. The .vqad file writes one chunk per entry; their
        bits summed equal :meth:`stored_bits`.
        """
        raise NotImplementedError(
            f"storage {cls.kind!r} does not declare stored_layout(): add it so .vqad files can hold it"
        )


def _round_fp16(t: torch.Tensor) -> torch.Tensor:
    return t.detach().half().float()


class DenseStorage(FeatureStorage):
    """The uncompressed NGLOD-style grid: a float feature vector per vertex, ``Z (m, k)``."""

    kind = "dense"

    def __init__(self, m: int, k: int, init_std: float = 0.01):
        super().__init__(m, k)
        self.Z = nn.Parameter(torch.randn(m, k) * init_std)

    def forward(self, vertex_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(vertex_ids, self.Z, sparse=not self.baked)

    def bake(self, fp16: bool = True) -> None:
        if fp16:
            self.Z.data = _round_fp16(self.Z)
        self.Z.requires_grad_(False)
        self.baked = True

    def stored_bits(self) -> int:
        return 16 * self.m * self.k

    def export_tensors(self) -> dict[str, torch.Tensor]:
        return {"Z": self.Z.detach().half()}

    @classmethod
    def from_export(cls, m, k, tensors, **params):
        s = cls(m, k)
        s.Z.data = tensors["Z"].float().reshape(m, k).to(s.Z.device)
        s.bake(fp16=False)
        return s

    def sparse_parameters(self):
        return [] if self.baked else [self.Z]

    @classmethod
    def stored_layout(cls, m, k, **params):
        return [TensorLayout("Z", (m, k), "f16")]


class CodebookStorage(FeatureStorage):
    """VQ-AD: each vertex's feature is ``D[V[i]]``, a b-bit index into a learned codebook.

    Training holds logits ``C (m, 2^b)``. The forward pass uses the hard feature
    ``D[argmax C[i]]``; the backward pass the gradient of the soft one ``softmax(C[i]) · D``
    (straight-through). Only the unique vertices a batch touches get a softmax: the cost is
    ``U × 2^b`` per step for U touched vertices, never ``m × 2^b``, and C's gradient is sparse.
    After :meth:`bake`, C is dropped and only ``V = argmax C`` (m,) and D remain.
    """

    kind = "codebook"

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
            self.D.data = _round_fp16(self.D)
        self.D.requires_grad_(False)
        self.C = None  # the m × 2^b logits are training-only
        self.baked = True

    def stored_bits(self) -> int:
        """m·b index bits + the fp16 codebook 16·k·2^b."""
        return self.m * self.b + 16 * self.k * (1 << self.b)

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


STORAGES: dict[str, type[FeatureStorage]] = {"dense": DenseStorage, "codebook": CodebookStorage}


def check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise InputError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r} (e.g. --bits 4)")


def make_storage(kind: str, m: int, k: int, bits: int = 4, **options) -> FeatureStorage:
    """Build a fresh storage by name (``dense`` | ``codebook`` | ``hash`` | ``lowrank`` | ...).

    ``bits`` is b (quantized kinds); ``options`` may hold ``rank`` (r, ``lowrank``), ``table_bits``
    (T, ``hash``) and ``vertices`` (the level's ``(m, 3)`` int64 vertex coordinates, ``hash``).
    Each kind receives only the options its ``create_args`` names, so one grid config serves all.
    """
    if kind not in STORAGES:
        raise InputError(f"unknown grid storage {kind!r}: choose one of {', '.join(STORAGES)}")
    cls = STORAGES[kind]
    offered = {"bits": bits, **options}
    return cls.create(m, k, **{name: offered[name] for name in cls.create_args if name in offered})
