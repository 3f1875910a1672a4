"""The interface every feature storage implements (see :mod:`vqad.storages` for the whole list).

Symbols follow the paper: m vertices, k features, b bits, codebook ``D (2^b, k)``, training logits
``C (m, 2^b)``, baked indices ``V (m,)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from vqad import kernels
from vqad.errors import InputError

MIN_BITS, MAX_BITS = 1, 12

#: the arguments of :meth:`FeatureStorage.create` that come from the octree, not from the user's options
OCTREE_ARGS = ("vertices",)
#: how a group of parameters is optimized (:func:`vqad.optim.make_optimizers` maps these to optimizers):
#: ``sparse`` SparseAdam (sparse gradients), ``rowwise`` RowwiseSparseRMSprop (sparse gradients of a wide
#: 2-D tensor, one second moment per row), ``dense`` Adam
OPTIMIZERS = ("sparse", "rowwise", "dense")
#: which learning-rate scale applies to a group: ``grid`` (``grid_lr_scale``), ``logit``
#: (``logit_lr_scale``) and ``codebook`` (``codebook_lr_scale``), each of the last two the grid's when unset
RATES = ("grid", "logit", "codebook")


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


@dataclass(frozen=True)
class ParamGroup:
    """Training parameters of one storage that share an optimizer and a learning rate.

    ``optimizer`` is one of :data:`OPTIMIZERS`, ``rate`` one of :data:`RATES`.
    """

    params: tuple[nn.Parameter, ...]
    optimizer: str
    rate: str = "grid"

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS or self.rate not in RATES:
            raise ValueError(f"ParamGroup optimizer must be one of {OPTIMIZERS} and rate one of {RATES}, "
                             f"got {self.optimizer!r}, {self.rate!r}")


class FeatureStorage(nn.Module):
    """Base class: k features for each of m vertices."""

    kind: ClassVar[str] = ""
    #: the arguments :meth:`create` takes from :func:`~vqad.storages.make_storage`: the
    #: :class:`~vqad.config.GridConfig` options this kind uses (``bits``, ``rank``, ``table_bits``),
    #: plus ``vertices`` (:data:`OCTREE_ARGS`) for a kind that derives data from vertex positions
    create_args: ClassVar[tuple[str, ...]] = ()
    #: whether features are b-bit indices V into a codebook D (:meth:`indices`, :meth:`codebook` and
    #: :meth:`set_indices` then work; index refinement and the fit's per-storage defaults ask this)
    discrete: ClassVar[bool] = False

    def __init__(self, m: int, k: int):
        super().__init__()
        if m <= 0 or k <= 0:
            raise InputError(f"a feature storage needs m > 0 vertices and k > 0 features, got m={m}, k={k}")
        self.m, self.k = int(m), int(k)
        self.baked = False
        #: ``||Z − Ẑ||² / ||Z||²`` of a storage converted after training from a dense ``Z`` (post hoc)
        self.reconstruction_error: float | None = None

    # -- options --------------------------------------------------------------------------------
    @classmethod
    def check_options(cls, cfg) -> None:
        """Raise :class:`InputError` unless ``cfg`` (a :class:`~vqad.config.GridConfig`) holds valid
        values of the options this kind uses (those in :attr:`create_args`)."""

    @classmethod
    def create(cls, m: int, k: int) -> "FeatureStorage":
        """A freshly initialised storage for training (keyword arguments: :attr:`create_args`)."""
        return cls(m, k)

    # -- features -------------------------------------------------------------------------------
    def forward(self, vertex_ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def rows(self, vertex_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The features of ``vertex_ids`` ``(N, 8)`` as a table and row indices into it: ``T (R, k)`` and
        ``ids (N, 8)`` with ``T[ids] == self(vertex_ids)``, gradients included. What the grid's fused
        interpolation (one ``embedding_bag``) reads, so a storage whose features are rows of a small
        table (a codebook D, a hash table) hands over that table instead of ``8 N`` copied rows. This
        default looks every feature up (``R = 8 N``)."""
        f = self(vertex_ids).reshape(-1, self.k)
        return f, torch.arange(f.shape[0], device=f.device).reshape(vertex_ids.shape)

    def bake(self, fp16: bool = True) -> None:
        """Turn into the stored, inference-only form."""
        raise NotImplementedError

    # -- training -------------------------------------------------------------------------------
    def param_groups(self) -> list[ParamGroup]:
        """Every trainable parameter, by optimizer and learning rate; ``[]`` once baked.

        :func:`vqad.optim.make_optimizers` builds the optimizers from these alone (and refuses a
        trainable grid parameter that no group declares).
        """
        return []

    def _declared(self, optimizers: tuple[str, ...] = OPTIMIZERS, rates: tuple[str, ...] = RATES) -> list[nn.Parameter]:
        return [p for g in self.param_groups() if g.optimizer in optimizers and g.rate in rates for p in g.params]

    def sparse_parameters(self) -> list[nn.Parameter]:
        """Parameters whose gradients are sparse (only the rows a batch touches)."""
        return self._declared(optimizers=("sparse", "rowwise"))

    def logit_parameters(self) -> list[nn.Parameter]:
        """Index logits (codebook C), which may train at their own rate (``logit_lr_scale``)."""
        return self._declared(rates=("logit",))

    def codebook_parameters(self) -> list[nn.Parameter]:
        """Learned codebooks (VQ-AD's D), which may train at their own rate (``codebook_lr_scale``)."""
        return self._declared(rates=("codebook",))

    # -- discrete indices (``discrete`` kinds only) ---------------------------------------------
    def indices(self) -> torch.Tensor:
        """``V (m,)`` int64: each vertex's codeword."""
        raise NotImplementedError(f"a {self.kind!r} storage has no indices (discrete is False)")

    def codebook(self) -> torch.Tensor:
        """``D (2^b, k)``, detached: the codewords :meth:`indices` point into."""
        raise NotImplementedError(f"a {self.kind!r} storage has no codebook (discrete is False)")

    def set_indices(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Give vertices ``rows (n,)`` the codewords ``values (n,)``, in whichever form is held."""
        raise NotImplementedError(f"a {self.kind!r} storage has no indices (discrete is False)")

    # -- rate (``learns_rate`` kinds only) -----------------------------------------------------
    #: whether training can estimate, differentiably, the coded bits of the stored indices
    #: (:meth:`track_rate`, :meth:`rate_bits`; the fit's ``rate_weight`` needs it)
    learns_rate: ClassVar[bool] = False

    def track_rate(self, on: bool, contexts: bool = False) -> None:
        """Start (clearing what was recorded) or stop recording what :meth:`rate_bits` needs
        (``contexts``: the rate will be asked for by context)."""
        raise NotImplementedError(f"a {self.kind!r} storage has no rate estimate (learns_rate is False)")

    def rate_bits(self) -> torch.Tensor | None:
        """Estimated bits per index of the vertices touched since :meth:`track_rate`, a scalar with a
        gradient; None if no vertex was touched."""
        raise NotImplementedError(f"a {self.kind!r} storage has no rate estimate (learns_rate is False)")

    # -- size and stored form -------------------------------------------------------------------
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

        Callers (checkpoints, the .vqad reader, through :func:`vqad.grid.octree_args`) pass ``vertices``,
        the level's ``(m, 3)`` int64 vertex coordinates in vertex-id order (``octree.vertices[level]``),
        only to kinds whose ``create_args`` name it: a kind whose stored form depends on vertex positions
        must declare it there.
        """
        raise NotImplementedError

    def params(self) -> dict:
        """Hyper-parameters needed to rebuild this storage (JSON-serialisable)."""
        return {}

    @classmethod
    def stored_layout(cls, m: int, k: int, **params) -> list["TensorLayout"]:
        """The tensors of :meth:`export_tensors`, in file order, and how each is written.

        ``params`` are those of :meth:`params`. The .vqad file writes one chunk per entry; their
        bits summed equal :meth:`stored_bits`.
        """
        raise NotImplementedError(
            f"storage {cls.kind!r} does not declare stored_layout(): add it so .vqad files can hold it"
        )


def unique_rows(ids: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.unique(ids, return_inverse=True)`` for row ids in ``0..m-1``: ``(E,) -> (U,), (E,)``.

    When ``m`` is not much larger than ``E`` it marks the rows in an ``(m,)`` table and numbers them
    with a cumulative sum: linear time, no sort. The result is the same: sorted unique ids and, for
    each entry, the position of its id among them.
    """
    if m > 16 * ids.numel():
        return torch.unique(ids, return_inverse=True)
    if kernels.applies(ids):  # the same, in one C pass (vqad.kernels)
        return kernels.unique_rows(ids, m)
    mark = torch.zeros(m, dtype=torch.bool, device=ids.device)
    mark[ids] = True
    uniq = mark.nonzero().squeeze(1)
    pos = torch.cumsum(mark, 0, dtype=torch.int64) - 1  # (m,): the rank of each marked row
    return uniq, pos.index_select(0, ids)


class _GatherUniqueRows(torch.autograd.Function):
    """``param[rows]`` for sorted, distinct ``rows``, whose gradient is a sparse tensor with exactly those
    rows (coalesced in fact; autograd drops the flag, :func:`vqad.optim.summed_rows` checks the order):
    the optimizer then needs no sort and no scratch to sum it."""

    @staticmethod
    def forward(ctx, param: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows)
        ctx.shape = param.shape
        return param.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (rows,) = ctx.saved_tensors
        g = torch.sparse_coo_tensor(rows[None], grad.contiguous(), ctx.shape, is_coalesced=True,
                                    check_invariants=False)  # rows are sorted and distinct by contract
        return g, None


def gather_unique_rows(param: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``param[rows]`` ``(U, ...)`` for sorted distinct ``rows`` ``(U,)`` (as :func:`unique_rows` gives),
    with a sparse, coalesced gradient for ``param`` (SparseAdam-style optimizers take it as is)."""
    return _GatherUniqueRows.apply(param, rows)


def round_fp16(t: torch.Tensor) -> torch.Tensor:
    return t.detach().half().to(t.dtype)


def check_bits(bits: int) -> None:
    if not is_int(bits) or not MIN_BITS <= bits <= MAX_BITS:
        raise InputError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r} (e.g. --bits 4)")


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
