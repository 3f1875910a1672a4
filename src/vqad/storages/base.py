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
from torch import nn

from vqad.errors import InputError

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
    #: whether features are b-bit indices V into a codebook D (what index refinement and the fit's
    #: per-storage defaults ask about; never test a storage's type or name for it)
    discrete: ClassVar[bool] = False

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

    def size_label(self) -> str:
        """How :meth:`stored_bits` is counted, for the size lines a fit prints."""
        return f"grid ({self.kind})"

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


def round_fp16(t: torch.Tensor) -> torch.Tensor:
    return t.detach().half().to(t.dtype)


def check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise InputError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r} (e.g. --bits 4)")



# ================================================================================================
# parameter checks (also used by GridConfig.validate and by the .vqad header reader)
# ================================================================================================
def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


