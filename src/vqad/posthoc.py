"""Post-hoc baselines: convert every level of a trained dense field (low rank, k-means), decoder untouched."""

from __future__ import annotations

from dataclasses import replace

import torch

from vqad.config import check_seed
from vqad.errors import InputError
from vqad.storages.base import check_bits
from vqad.storages.dense import check_dense
from vqad.storages.kmeans import KMEANS_ITERS, codebook_from_dense
from vqad.storages.lowrank import LowRankStorage, check_rank

#: the post-hoc methods; each makes a storage of a registered kind (k-means: a baked ``codebook``)
POSTHOC_KINDS = ("lowrank", "kmeans")


POSTHOC_BITS = 4  # b of a post-hoc k-means codebook when none is given


def posthoc(field, kind: str, *, bits: int | None = None, rank: int | None = None, seed: int = 0,
            iters: int = KMEANS_ITERS, fp16: bool = True):
    """A trained dense field compressed after training: every level's ``Z`` → ``kind``, decoder kept.

    Args:
        field: a field (sdf, nerf, ...) whose grid storage is ``dense``, baked or not; it is not
            modified (the new field shares its octree).
        kind: ``"kmeans"`` (kmVQ: ``bits`` b, default 4; ``seed``; at most ``iters`` Lloyd rounds),
            stored as a baked ``codebook`` ``D[V]``; or ``"lowrank"`` (PCA: ``rank`` r, required,
            ``1 <= r < k``).
        fp16: round every stored float to fp16 (as a .vqad file stores it) and fit around that.
    Returns:
        a new baked field, whose ``grid.cfg.storage`` is the new storages' kind (``codebook`` with
        ``bits`` b, or ``lowrank`` with ``rank`` r); each storage's ``reconstruction_error`` holds
        its relative squared feature error ``||Z − Ẑ||² / ||Z||²``.
    """
    from vqad.field import field_config, field_from_config
    from vqad.grid import OctreeGrid

    if kind not in POSTHOC_KINDS:
        raise InputError(f"post-hoc compression makes one of {', '.join(POSTHOC_KINDS)}, not {kind!r}")
    grid = field.grid
    check_dense(grid.storages[0])
    if kind == "kmeans":
        if rank is not None:
            raise InputError("rank applies to post-hoc lowrank, not kmeans: pass bits instead")
        bits = POSTHOC_BITS if bits is None else bits
        check_bits(bits)
        check_seed(seed)
        storages = [codebook_from_dense(s, bits, seed=seed, iters=iters, fp16=fp16) for s in grid.storages]
    else:
        if bits is not None:
            raise InputError("bits applies to post-hoc kmeans, not lowrank: pass rank instead")
        if rank is None:
            raise InputError(f"post-hoc lowrank needs rank=r, fewer dimensions than k={grid.cfg.features} (e.g. rank=8)")
        check_rank(rank, grid.cfg.features)
        storages = [LowRankStorage.from_dense(s, rank, fp16=fp16) for s in grid.storages]
    cfg = replace(grid.cfg, storage=storages[0].kind, **storages[0].params())
    new_grid = OctreeGrid(grid.octree, storages, cfg)
    with torch.random.fork_rng(devices=[]):  # the new decoder's random init is overwritten: keep the caller's RNG
        new = field_from_config(field_config(field), new_grid).to(grid.octree.device)
    new.load_decoder_state({k: v.detach().clone() for k, v in field.decoder_state().items()})
    new.bake(fp16=fp16)
    return new


__all__ = ["posthoc", "POSTHOC_KINDS"]
