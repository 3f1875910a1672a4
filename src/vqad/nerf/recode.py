"""Recoding the indices no render reaches (docs/method.md §8.2).

A radiance field is rendered only inside the cells its occupancy keeps (:class:`~vqad.nerf.render.OccupancySampler`):
every sample lies in an occupied cell of the sampler's grid (level ``lo = min(l, 8)`` of a model whose finest
LOD is ``l``), and its features at level ``L`` interpolate the 8 corners of the level-``L`` octree cell that holds
it. The occupancy of a model comes from its own densities (:func:`~vqad.nerf.render.prune_by_model`): the whole
model's from its finest LOD, used to render every LOD, and a prefix of the progressive file, decoded up to LOD
``l``, prunes with LOD ``l`` on its own level-``l`` cells. A vertex that is a corner of no level-``L`` cell
overlapping an occupied cell, under any of these occupancies, never reaches a pixel. Training never touches it
either (its cells were pruned), so its index is still its random initial codeword and costs the full b bits:
38 % of lego's vertices (45 % of the finest level's); recoding them made a 6-bit lego file 35 % smaller
(docs/benchmarks/rd-rate.md).

:func:`recode_unreachable` gives each such vertex its level's most common reachable codeword. The new codewords
change the density inside empty cells, so a cell could become occupied: every occupancy is computed again, and
the recoded corners of any cell that became occupied are put back, until none does. With every occupancy as it
was, every render (the whole model at any LOD, every prefix) is bit for bit what it was; only the file shrinks.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field as dfield

import torch

from vqad.nerf.render import make_sampler, prune_by_model
from vqad.octree import SparseOctree, morton_encode
from vqad.refine import level_bits

#: rounds of "compute every occupancy, put back the corners of cells that became occupied" before giving up
#: (and putting every vertex back); one or two suffice on every scene measured
MAX_ROUNDS = 8


@dataclass
class RecodeStats:
    """What :func:`recode_unreachable` did, per level of the grid (coarsest first)."""

    levels: list[int]
    vertices: list[int]  # m per level
    unreachable: list[int]  # vertices no render reaches
    recoded: list[int]  # ... whose index changed (and stayed changed)
    put_back: int = 0  # recoded vertices put back because a cell they bound became occupied
    rounds: int = 0  # occupancy checks run
    seconds: float = 0.0
    bits_before: float = 0.0  # order-0 bits per index over the whole grid (refine.level_bits)
    bits_after: float = 0.0
    notes: list[str] = dfield(default_factory=list)

    def summary(self) -> str:
        share = sum(self.recoded) / max(sum(self.vertices), 1)
        return (f"recoded {sum(self.recoded):,} of {sum(self.vertices):,} indices no render reaches ({share:.0%}) "
                f"to their level's most common codeword: order-0 {self.bits_before:.2f} -> {self.bits_after:.2f} "
                f"bits per index, renders unchanged ({self.rounds} occupancy checks, {self.seconds:.1f} s)")


def applies(field) -> bool:
    """Whether ``field`` has indices to recode: a radiance field whose grid stores discrete indices."""
    return hasattr(field, "nerf_cfg") and all(s.discrete for s in field.grid.storages)


def _prefix_octree(octree: SparseOctree, lod: int) -> SparseOctree:
    """The octree a prefix of the file decoded up to ``lod`` holds (the same cells and vertex ids up to it)."""
    if lod == octree.max_level:
        return octree
    return SparseOctree.from_codes(octree.codes[lod], octree.base_level, lod)


@torch.no_grad()
def occupied_cells(field, lod: int) -> tuple[int, torch.Tensor]:
    """``(level, codes (n,))``: the sampler's level and the sorted Morton codes of its occupied cells when
    the model decoded up to LOD ``lod`` is rendered (its own deterministic pruning, as render and eval do)."""
    sampler = prune_by_model(field, make_sampler(field, _prefix_octree(field.grid.octree, lod)), lod)
    idx = sampler.occupancy.nonzero().squeeze(-1)
    r = sampler.res
    ijk = torch.stack([idx // (r * r), (idx // r) % r, idx % r], dim=-1)
    return sampler.level, torch.sort(morton_encode(ijk, bits=max(sampler.level, 1))).values


def _corners_over(octree: SparseOctree, level: int, lo: int, codes: torch.Tensor) -> torch.Tensor:
    """``(8n,)`` vertex ids: the corners of the ``n`` level-``level`` octree cells that overlap a level-``lo``
    cell of ``codes`` (repeats included)."""
    cells = octree.codes[level]
    if level >= lo:
        over = torch.isin(cells >> (3 * (level - lo)), codes)
    else:
        over = torch.isin(cells, torch.unique(codes >> (3 * (lo - level))))
    return octree.corners[level][over].reshape(-1)


def reachable_vertices(field, occupancies: dict[int, tuple[int, torch.Tensor]] | None = None) -> list[torch.Tensor]:
    """Per level (coarsest first), ``(m_L,)`` bool: the vertices some render reads — corners of a level-``L``
    cell overlapping an occupied cell of the whole model's occupancy or of a prefix's (``occupancies``:
    :func:`occupied_cells` per LOD, computed when not given)."""
    octree = field.grid.octree
    if occupancies is None:
        occupancies = {lod: occupied_cells(field, lod) for lod in field.lods}
    out = [torch.zeros(octree.num_vertices(L), dtype=torch.bool, device=octree.device) for L in octree.levels]
    for lod, (lo, codes) in occupancies.items():
        for i, L in enumerate(octree.levels):
            if L > lod:
                break
            out[i][_corners_over(octree, L, lo, codes)] = True
    return out


def target_codewords(V: list[torch.Tensor], live: list[torch.Tensor], n_codes: list[int]) -> list[torch.Tensor]:
    """Per level, the codeword the unreachable vertices get: the most common among the reachable ones (all of
    the level's if none is), so the histogram the coder models peaks on it. ``V``, ``live``: ``(m_L,)`` each."""
    return [torch.bincount(v[r] if bool(r.any()) else v, minlength=c).argmax() for v, r, c in zip(V, live, n_codes)]


def _grid_bits(V: list[torch.Tensor], codes: list[int]) -> float:
    return sum(level_bits(v, c) for v, c in zip(V, codes)) / max(sum(v.numel() for v in V), 1)


def _assign(fields: list, V: list[torch.Tensor]) -> None:
    for f in fields:
        for s, v in zip(f.grid.storages, V):
            rows = (s.indices() != v).nonzero().squeeze(1)
            if rows.numel():
                s.set_indices(rows, v.index_select(0, rows))


def _fp16_exact(t: torch.Tensor) -> bool:
    return bool(torch.equal(t.detach().half().float(), t.detach().float()))


def stored_forms(field) -> list:
    """``field``, and the form its ``.vqad`` file holds (baked, fp16-rounded codebooks and decoders) where that
    differs: a render of either reads its own densities, so both must keep their occupancy."""
    exact = field.baked and all(_fp16_exact(s.codebook()) for s in field.grid.storages) and all(
        _fp16_exact(p) for d in field.decoders() for p in d.parameters())
    if exact:
        return [field]
    # a baked copy without copying the training logits C first (m × 2^b floats: 1 GB for lego at b = 10)
    memo = {id(s.C): None for s in field.grid.storages if getattr(s, "C", None) is not None}
    stored = copy.deepcopy(field, memo)
    for s, c in zip(field.grid.storages, stored.grid.storages):
        if not s.baked:
            c.V, c.baked = s.indices().clone(), True
    stored.bake(fp16=True)
    return [field, stored]


@torch.no_grad()
def recode_unreachable(field) -> RecodeStats:
    """Give every vertex no render reaches its level's most common reachable codeword (module docstring),
    keeping every occupancy, hence every render, exactly as it was: of ``field`` and of the file it is
    written to (:func:`stored_forms`). Works on a training or a baked field. On any error or interrupt
    every index is put back before it propagates."""
    if not applies(field):
        raise ValueError("recode_unreachable needs a radiance field whose grid stores discrete indices (codebook)")
    t0 = time.perf_counter()
    was_training = field.training
    field.eval()
    octree = field.grid.octree
    V0 = [s.indices().clone() for s in field.grid.storages]
    n_codes = [s.codebook().shape[0] for s in field.grid.storages]
    stats = RecodeStats(levels=list(octree.levels), vertices=[v.numel() for v in V0], unreachable=[], recoded=[])
    stats.bits_before = _grid_bits(V0, n_codes)
    forms = [field]
    try:
        forms = stored_forms(field)
        before = {(i, lod): occupied_cells(f, lod) for i, f in enumerate(forms) for lod in field.lods}
        live = [torch.zeros_like(v, dtype=torch.bool) for v in V0]  # reachable in any form
        for i, f in enumerate(forms):
            for j, r in enumerate(reachable_vertices(f, {lod: before[(i, lod)] for lod in field.lods})):
                live[j] |= r
        V = [torch.where(r, v, c) for v, r, c in zip(V0, live, target_codewords(V0, live, n_codes))]
        stats.unreachable = [int((~r).sum()) for r in live]
        _assign(forms, V)
        while True:
            if stats.rounds == MAX_ROUNDS:
                _assign(forms, V0)
                V = V0
                stats.notes.append(f"cells kept becoming occupied after {MAX_ROUNDS} rounds: every index put back")
                break
            stats.rounds += 1
            grown = False
            for (i, lod), (lo, was) in before.items():
                lo_now, now = occupied_cells(forms[i], lod)
                if lo_now != lo or not bool(torch.isin(was, now).all()):  # impossible by construction: be safe
                    raise RuntimeError(f"recoding emptied occupied cells of LOD {lod}, which it must never do (a bug: "
                                       "please report it); every index was put back")
                new = now[~torch.isin(now, was)]
                if new.numel() == 0:
                    continue
                grown = True
                for j, L in enumerate(octree.levels):
                    if L > lod:
                        break
                    ids = _corners_over(octree, L, lo, new).unique()
                    ids = ids[V[j].index_select(0, ids) != V0[j].index_select(0, ids)]
                    stats.put_back += ids.numel()
                    V[j][ids] = V0[j][ids]
                _assign(forms, V)
            if not grown:
                break
    except BaseException:
        _assign(forms, V0)
        field.train(was_training)
        raise
    field.train(was_training)
    stats.recoded = [int((v != v0).sum()) for v, v0 in zip(V, V0)]
    stats.bits_after = _grid_bits(V, n_codes)
    stats.seconds = time.perf_counter() - t0
    return stats
