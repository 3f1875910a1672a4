"""Feature storages: how the k features of a level's m vertices are held.

Every storage has the same small interface, so the method (``codebook``, VQ-AD) and each baseline
(``dense``, ``lowrank`` and ``hash``, one module each in this package, all registered in
:data:`STORAGES` below; post-hoc k-means of a dense grid, :mod:`.kmeans`, makes a baked ``codebook``)
differ only in this object. What the rest of vqad needs to know about a kind, the kind declares
(nothing outside this package tests a storage's type or name):

* ``create_args`` (class): the :class:`~vqad.config.GridConfig` options the kind uses (``bits``,
  ``rank``, ``table_bits``; :func:`options_of`), plus ``vertices`` (the level's integer vertex
  coordinates) for a kind that derives data from vertex positions (``hash``);
  ``check_options(cfg)`` (class) validates those options of a grid config;
* ``create(m, k, **options)``: a fresh storage for training (:func:`make_storage` passes each kind
  exactly the options its ``create_args`` names);
* ``forward(vertex_ids)``: ``(...,) int64 -> (..., k)`` features of those vertices;
* ``param_groups()``: every trainable parameter as a :class:`ParamGroup`: which optimizer
  (``sparse`` SparseAdam, ``rowwise`` RowwiseSparseRMSprop, ``dense`` Adam) and which learning-rate
  scale (``grid``, ``logit``, ``codebook``); :func:`vqad.optim.make_optimizers` builds the optimizers
  from these alone. ``sparse_parameters()``, ``logit_parameters()`` and ``codebook_parameters()``
  read them back by role;
* ``discrete`` (class): whether features are b-bit indices V into a codebook D; if so ``indices()``
  (V, ``(m,)``), ``codebook()`` (D, ``(2^b, k)``) and ``set_indices(rows, values)`` (in the
  training form through the logits C, in the baked form V itself) work (index refinement uses them);
* ``bake(fp16=True)``: switch to the inference form that is written to a file (and, with
  ``fp16``, round every stored float to fp16 so that what is evaluated is what is stored);
* ``stored_bits()``: bits of the stored form (no container overhead); ``size_label()`` its formula;
* ``export_tensors()`` / ``from_export(m, k, tensors, vertices=..., **params)`` / ``params()`` /
  ``stored_layout(m, k, **params)`` (class): the stored form as named tensors and how each is
  written to a .vqad file, and back. ``vertices`` is what ``hash`` rebuilds its indices from; it is
  never stored, and callers pass it only to kinds that list it in ``create_args``
  (:func:`vqad.grid.octree_args`).

A storage name that older files and checkpoints used for a form now held by another kind is in
:data:`RENAMED` (``kmeans`` → ``codebook``); :meth:`vqad.config.GridConfig.from_stored` maps it.

Symbols follow the paper: m vertices, k features, b bits, codebook ``D (2^b, k)``, training logits
``C (m, 2^b)``, baked indices ``V (m,)``.
"""

from __future__ import annotations

from vqad.errors import InputError
from vqad.storages.base import (MAX_BITS, MIN_BITS, OCTREE_ARGS, FeatureStorage, ParamGroup, TensorLayout,
                                check_bits)
from vqad.storages.codebook import CodebookStorage
from vqad.storages.dense import DenseStorage
from vqad.storages.hash import HashStorage
from vqad.storages.lowrank import LowRankStorage

STORAGES: dict[str, type[FeatureStorage]] = {
    cls.kind: cls for cls in (DenseStorage, CodebookStorage, LowRankStorage, HashStorage)
}

#: storage names of older files and checkpoints -> the kind that holds the same stored form now
#: (post-hoc k-means was a kind of its own; its ``D (2^b, k)`` fp16 + ``V (m,)`` b-bit form is a baked codebook's)
RENAMED: dict[str, str] = {"kmeans": "codebook"}


def storage_class(kind: str) -> type[FeatureStorage]:
    """The storage class registered as ``kind``; an unknown name is an :class:`InputError`."""
    if kind in STORAGES:
        return STORAGES[kind]
    if kind in RENAMED:
        raise InputError(
            f"{kind!r} is not a grid storage to train: post-hoc k-means of a trained dense grid is a baked "
            f"{RENAMED[kind]!r} grid (fit with --grid dense, then vqad compress CKPT --to kmeans; "
            "vqad.posthoc.posthoc in Python)"
        )
    raise InputError(f"unknown grid storage {kind!r}: choose one of {', '.join(STORAGES)}")


def options_of(kind: str) -> tuple[str, ...]:
    """The :class:`~vqad.config.GridConfig` options a kind uses, e.g. ``("bits",)`` for ``codebook``,
    ``()`` for ``dense`` (its ``create_args`` without what the octree supplies)."""
    return tuple(a for a in storage_class(kind).create_args if a not in OCTREE_ARGS)


def make_storage(kind: str, m: int, k: int, bits: int = 4, **options) -> FeatureStorage:
    """Build a fresh storage by name (``dense`` | ``codebook`` | ``hash`` | ``lowrank``).

    ``bits`` is b (``codebook``); ``options`` may hold ``rank`` (r, ``lowrank``), ``table_bits``
    (T, ``hash``) and ``vertices`` (the level's ``(m, 3)`` int64 vertex coordinates, ``hash``).
    Each kind receives only the options its ``create_args`` names, so one grid config serves all.
    """
    cls = storage_class(kind)
    offered = {"bits": bits, **options}
    return cls.create(m, k, **{name: offered[name] for name in cls.create_args if name in offered})


__all__ = [
    "STORAGES", "RENAMED", "storage_class", "options_of", "make_storage", "FeatureStorage", "ParamGroup",
    "TensorLayout", "CodebookStorage", "DenseStorage", "HashStorage", "LowRankStorage", "check_bits",
    "MIN_BITS", "MAX_BITS", "OCTREE_ARGS",
]
