"""Feature storages: how the k features of a level's m vertices are held.

Every storage has the same small interface, so the method (``codebook``, VQ-AD) and each baseline
(``dense`` here; ``lowrank``, ``kmeans`` and ``hash`` in their own modules of this package, all registered in
:data:`STORAGES` below) differ only in this object:

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

from vqad.errors import InputError
from vqad.storages.base import MAX_BITS, MIN_BITS, FeatureStorage, TensorLayout, check_bits
from vqad.storages.codebook import CodebookStorage
from vqad.storages.dense import DenseStorage
from vqad.storages.hash import DEFAULT_TABLE_BITS, HashStorage, check_table_bits
from vqad.storages.kmeans import KMeansStorage
from vqad.storages.lowrank import LowRankStorage, check_rank


STORAGES: dict[str, type[FeatureStorage]] = {
    cls.kind: cls for cls in (DenseStorage, CodebookStorage, LowRankStorage, KMeansStorage, HashStorage)
}


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
