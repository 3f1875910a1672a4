"""Gauss–Newton index refinement: a discrete descent step on the codebook indices V.

Straight-through training moves an index only when its logits' argmax flips, and the softmax
gradient that drives the flip is a weak, noisy signal (it is why VQ-AD trails a dense grid). This
module takes the direct route, the assignment step of k-means but in the metric of the training
loss rather than of feature space:

For a level L with codebook ``D (2^b, k)`` and current indices ``V (m,)``, and training samples
``x`` with targets, the loss is ``Σ_x Σ_l ρ_l(x)²`` with residuals ``ρ_l`` of every LOD l ≥ L (the
feature of level L enters every such LOD's summed feature). Changing vertex i's feature by
``Δ = D[j] − D[V_i]`` changes each residual by ``≈ w_i(x) J_l(x) Δ`` to first order, where ``w_i``
is the trilinear weight and ``J_l = ∂ρ_l/∂F_l (.., k)`` the Jacobian of the residual with respect to
the summed feature. So the loss changes by

    δ_ij ≈ 2 Δ·G_i + Δᵀ H_i Δ,   G_i = Σ_x w_i Σ_l J_lᵀ ρ_l  (k,),   H_i = Σ_x w_i² Σ_l J_lᵀ J_l  (k, k)

(Gauss–Newton: exact for a residual linear in the feature). Every vertex takes ``argmin_j δ_ij``
when it is negative. Two vertices of one cell interact through the samples they share, so the
vertices are split into the 8 parity classes of their integer coordinates: no two vertices of a
class share a cell, the per-vertex predictions within a class add up, and one class is updated at
a time, the residuals being moved through the linear model in between. A real forward pass then
checks each level, and a level whose real loss went up is put back.

:func:`refine_indices` works for any field whose loss is a sum of squared residuals, given as
:class:`RefineChunk` s: an SDF's residual is one sample's predicted minus true distance; a radiance
field's is one ray's rendered minus true colour (3 channels), fed by all the samples along the ray.
There several samples of one ray touch the same vertex, so their Jacobians are first summed per
(ray, vertex) pair, which keeps H exact for the pair.

**Rate-aware moves** (``bit_cost = μ > 0``, the entropy-constrained assignment of ECVQ): a move is
scored by its loss change plus ``μ`` times the change of the bits the level's indices will cost
under the coder's order-0 model, ``bits(j) = −log2 p(j)`` with ``p`` the level's current index
histogram (:func:`index_bits`, re-counted before each parity class), so a vertex whose loss barely
depends on its codeword moves to a frequent one. The undo check then compares loss + μ · the level's
coded bits (:func:`level_bits`, ``m · H(p)``). With ``μ = λ · N / Σ m`` (N residual rows, Σ m every
level's vertices) this is the training objective ``loss + λ · bits per vertex`` of
:func:`vqad.fit.rate_term` scaled by N.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class RefineChunk:
    """A piece of the loss: sample points and the residuals they feed.

    Attributes:
        x: ``(n, 3)`` sample points in unit-cube coordinates.
        residuals: ``F -> {lod: (R, c)}``: ``F`` maps each LOD l whose loss can change to the samples'
            summed feature ``(n, k)`` (Σ of the levels ≤ l); ``c`` channels (1 for an SDF, 3 for RGB).
        owner: ``(n,)`` the residual row each sample feeds (a radiance field: its ray); ``None``:
            sample i feeds row i (``R = n``, an SDF).
    """

    x: torch.Tensor
    residuals: Callable[[dict[int, torch.Tensor]], dict[int, torch.Tensor]]
    owner: torch.Tensor | None = None


@dataclass
class RefineStats:
    """What one refinement did at one level (losses: Σ of squared residuals of the LODs ≥ level)."""

    level: int
    changed: int  # indices that moved
    vertices: int  # m
    loss_before: float
    loss_after: float
    undone: int = 0  # 1 when the level's real loss (+ μ · bits) went up and its moves were put back
    bits_before: float = 0.0  # the level's index bits under its order-0 model, m · H(p) (with a rate cost)
    bits_after: float = 0.0


def vertex_parity(vertices: torch.Tensor) -> torch.Tensor:
    """``(m, 3)`` integer vertex coordinates -> ``(m,)`` class in 0..7; no two corners of a cell share one."""
    v = vertices.long() & 1
    return v[:, 0] * 4 + v[:, 1] * 2 + v[:, 2]


def index_bits(V: torch.Tensor, codes: int) -> torch.Tensor:
    """``(codes,)`` bits each codeword costs under the order-0 model of the indices ``V (m,)``:
    ``−log2 p(j)``, ``p(j) = (n_j + ½) / (m + ½·codes)`` (an unused codeword costs about
    ``log2(2m)``: what a symbol seen once costs, not infinity)."""
    n = torch.bincount(V, minlength=codes).to(torch.float64)
    return -torch.log2((n + 0.5) / (V.shape[0] + 0.5 * codes))


def level_bits(V: torch.Tensor, codes: int) -> float:
    """Coded bits of the indices ``V (m,)`` under their own order-0 model: ``m · H(p)``, ``p`` the
    empirical histogram (what the range coder spends, less its frequency table)."""
    n = torch.bincount(V, minlength=codes).to(torch.float64)
    n = n[n > 0]
    return float(-(n * torch.log2(n / V.shape[0])).sum()) if V.numel() else 0.0


def rate_bit_cost(grid, rate_weight: float, n: int) -> float:
    """The bit cost μ that makes a sweep minimise a fit's objective ``loss + λ · R`` (R: index bits per
    vertex of the whole grid, :func:`vqad.fit.rate_term`): a sweep's loss is the *sum* over its
    residual entries where training takes their mean, so ``μ = λ · n / Σ_L m_L``, ``n`` the entries the
    training loss averages over that the sweep sums (an SDF: its samples; a radiance field: rays × 3
    channels), ``Σ m_L`` the vertices of every level with indices. 0 when ``rate_weight`` is 0."""
    total_m = sum(s.m for s in grid.storages if s.discrete)
    return rate_weight * n / total_m if rate_weight > 0 and total_m else 0.0


def gauss_newton_scores(G: torch.Tensor, H: torch.Tensor, D: torch.Tensor, V: torch.Tensor,
                        chunk: int = 1 << 14) -> torch.Tensor:
    """Predicted loss change of giving each vertex each codeword.

    Args:
        G: ``(m, k)`` first-order terms; H: ``(m, k, k)`` Gauss–Newton second-order terms.
        D: ``(2^b, k)`` codebook; V: ``(m,)`` current indices.
    Returns:
        ``(m, 2^b)`` with ``δ_ij = 2 (D_j − D_{V_i})·G_i + (D_j − D_{V_i})ᵀ H_i (D_j − D_{V_i})``
        (zero at ``j = V_i``).
    """
    out = []
    for s in range(0, G.shape[0], chunk):
        g, h, dc = G[s:s + chunk], H[s:s + chunk], D[V[s:s + chunk]]  # (n, k), (n, k, k), (n, k)
        delta = D[None] - dc[:, None]  # (n, 2^b, k)
        hd = torch.einsum("nab,njb->nja", h, delta)  # H_i Δ_j
        out.append(2 * (delta * g[:, None]).sum(-1) + (delta * hd).sum(-1))
    return torch.cat(out) if out else G.new_zeros(0, D.shape[0])


def summed_features(grid, x: torch.Tensor, level: int) -> dict[int, torch.Tensor]:
    """Summed features ``F_l (n, k)`` of every LOD l ≥ ``level`` (Σ of the levels ≤ l)."""
    lods = [lod for lod in grid.lods if lod >= level]
    return dict(zip(lods, grid.multi_lod_features(x, lods)))


def has_codebook(grid) -> bool:
    """Whether any level of ``grid`` holds indices into a codebook (``discrete``: something to refine)."""
    return any(s.discrete for s in grid.storages)


def format_stats(stats: list[RefineStats]) -> str:
    """One line for a progress log: indices moved and loss before → after, per level."""
    def one(s: RefineStats) -> str:
        bits = (f", bits/index {s.bits_before / s.vertices:.2f} → {s.bits_after / s.vertices:.2f}"
                if s.bits_before else "")
        return f"L{s.level} {s.changed:,}/{s.vertices:,} (loss {s.loss_before:.4g} → {s.loss_after:.4g}{bits})"

    return "index refinement: moved " + ", ".join(one(s) for s in stats)


@dataclass
class _Linearized:
    """The residuals linearized in one level's feature, as rows of (vertex-group, residual).

    ``J (n, L, c, k)``: per row, ∂ρ/∂(feature) for L LODs and c channels; ``res_id (n,)`` the
    residual row it belongs to in ``rho (R, L, c)``; ``vid (n, K)`` and ``w (n, K)`` the vertices the
    row's feature interpolates (SDF: a sample's 8 corners; radiance field: one (ray, vertex) pair,
    K = 1, w = 1, its J already summed over the ray's samples with their weights).
    """

    J: torch.Tensor
    res_id: torch.Tensor
    rho: torch.Tensor
    vid: torch.Tensor
    w: torch.Tensor
    loss: float


def _linearize(grid, level: int, chunks: list[RefineChunk]) -> _Linearized:
    m = grid.storage(level).m
    Js, res_ids, rhos, vids, ws = [], [], [], [], []
    loss, offset = 0.0, 0
    for ch in chunks:
        with torch.no_grad():
            F = summed_features(grid, ch.x, level)
        # each LOD's summed feature a leaf of its own, so one backward gives every J_l = ∂ρ_l/∂F_l
        F = {lod: f.clone().requires_grad_(True) for lod, f in F.items()}
        res = ch.residuals(F)
        c = next(iter(res.values())).shape[1]
        per_ch = []
        for j in range(c):  # a sample feeds one residual row, so these gradients are Jacobian rows
            per_ch.append(torch.autograd.grad(sum(r[:, j].sum() for r in res.values()), list(F.values()),
                                              retain_graph=j + 1 < c, allow_unused=True))
        per_ch = [[torch.zeros_like(f) if g is None else g for g, f in zip(gs, F.values())] for gs in per_ch]
        J = torch.stack([torch.stack(g, dim=1) for g in per_ch], dim=2)  # (n, L, c, k)
        rho = torch.stack([r.detach() for r in res.values()], dim=1)  # (R, L, c)
        loss += float((rho ** 2).sum())
        q = grid.octree.interpolation(ch.x, level)
        Jv = J[q.valid]
        if ch.owner is None:
            Js.append(Jv)
            res_ids.append(q.valid.nonzero().squeeze(1) + offset)
            vids.append(q.vertex_ids)
            ws.append(q.weights)
        else:  # sum per (residual, vertex) pair: A = Σ_samples w J
            own = ch.owner[q.valid]
            key = (own[:, None] * m + q.vertex_ids).reshape(-1)
            uniq, inv = torch.unique(key, return_inverse=True)
            contrib = (q.weights.reshape(-1)[:, None, None, None] * Jv.repeat_interleave(8, dim=0))
            A = Jv.new_zeros((uniq.shape[0],) + tuple(Jv.shape[1:])).index_add_(0, inv, contrib)
            Js.append(A)
            res_ids.append(uniq // m + offset)
            vids.append((uniq % m)[:, None])
            ws.append(A.new_ones(uniq.shape[0], 1))
        rhos.append(rho)
        offset += rho.shape[0]
    return _Linearized(torch.cat(Js), torch.cat(res_ids), torch.cat(rhos), torch.cat(vids), torch.cat(ws), loss)


@torch.no_grad()
def _total_loss(grid, level: int, chunks: list[RefineChunk]) -> float:
    return sum(float(sum((r ** 2).sum() for r in ch.residuals(summed_features(grid, ch.x, level)).values()))
               for ch in chunks)


@torch.no_grad()
def _accumulate(lin: _Linearized, m: int, k: int, select: torch.Tensor | None = None, chunk: int = 1 << 15):
    """G ``(m, k)`` and H ``(m, k, k)``; ``select (n, K)`` bool: only those (row, vertex) slots."""
    G = lin.J.new_zeros(m, k)
    H = lin.J.new_zeros(m, k, k)
    for a in range(0, lin.vid.shape[0], chunk):
        b = min(a + chunk, lin.vid.shape[0])
        J, rho = lin.J[a:b], lin.rho[lin.res_id[a:b]]
        g = torch.einsum("nlck,nlc->nk", J, rho)  # Σ_l J_lᵀ ρ_l
        h = torch.einsum("nlca,nlcb->nab", J, J)  # Σ_l J_lᵀ J_l
        sel = torch.ones_like(lin.vid[a:b], dtype=torch.bool) if select is None else select[a:b]
        r, sl = sel.nonzero(as_tuple=True)
        v, w = lin.vid[a:b][r, sl], lin.w[a:b][r, sl]
        G.index_add_(0, v, w[:, None] * g[r])
        H.index_add_(0, v, (w ** 2)[:, None, None] * h[r])
    return G, H


@torch.no_grad()
def _refine_level(lin: _Linearized, D: torch.Tensor, V: torch.Tensor, parity: torch.Tensor, classes: int,
                  chunk: int = 1 << 15, bit_cost: float = 0.0) -> torch.Tensor:
    """Gauss–Newton coordinate descent on the linearized residuals, one parity class at a time.

    Returns the new indices ``(m,)``. For an SDF every sample has exactly one corner in a class,
    so the predicted changes of a class add up exactly; after a class moves, the residuals are
    updated through the linear model (``ρ += Σ w J Δ``) before the next class is scored.
    ``bit_cost`` μ > 0: each move also pays ``μ (bits(j) − bits(V_i))`` (:func:`index_bits`).
    """
    m, k = V.shape[0], D.shape[1]
    V = V.clone()
    n = lin.vid.shape[0]
    if n == 0:
        return V
    cls_of = parity[lin.vid] if classes == 8 else torch.zeros_like(lin.vid)  # (n, K)
    for cls in range(classes):
        G, H = _accumulate(lin, m, k, cls_of == cls, chunk)
        in_cls = (parity == cls) if classes == 8 else torch.ones(m, dtype=torch.bool, device=V.device)
        rows = (in_cls & (H.flatten(1).abs().sum(1) > 0)).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        scores = gauss_newton_scores(G[rows], H[rows], D, V[rows])
        if bit_cost > 0:
            scores = scores + bit_cost * _rate_change(V, rows, D.shape[0], D.dtype)
        best, j = scores.min(dim=-1)
        move = best < 0
        rows, j = rows[move], j[move]
        if rows.numel() == 0:
            continue
        delta = D.new_zeros(m, k)
        delta[rows] = D[j] - D[V[rows]]
        V[rows] = j
        for a in range(0, n, chunk):  # ρ += Σ_slots w J Δ through the linear model
            b = min(a + chunk, n)
            dz = (lin.w[a:b, :, None] * delta[lin.vid[a:b]]).sum(1)  # (n, k)
            lin.rho.index_add_(0, lin.res_id[a:b], torch.einsum("nlck,nk->nlc", lin.J[a:b], dz))
    return V


def _rate_change(V: torch.Tensor, rows: torch.Tensor, codes: int, dtype: torch.dtype) -> torch.Tensor:
    """``(r, codes)``: bits(j) − bits(V_i) for each vertex of ``rows`` (:func:`index_bits` of ``V``)."""
    bits = index_bits(V, codes)
    return (bits[None, :] - bits[V[rows]][:, None]).to(dtype)


@torch.no_grad()
def _refine_level_exact(grid, level: int, chunks: list[RefineChunk], lin: _Linearized, D: torch.Tensor,
                        V: torch.Tensor, parity: torch.Tensor, candidates: int, bit_cost: float = 0.0) -> torch.Tensor:
    """Coordinate descent with *measured* moves, one parity class at a time (SDF chunks only).

    The Gauss–Newton scores only rank the codewords: each vertex of the class tries its
    ``candidates`` best-ranked ones, and the change of the real loss is measured for every vertex
    and candidate at once. That is exact because every sample has exactly one corner in a class:
    giving each vertex of the class its t-th candidate changes each sample's summed features
    ``F_l (l ≥ level)`` by ``w (D_j − D_{V_i})`` of its one corner in the class, so one decoder pass
    gives every sample's new loss, and the per-vertex sums are the per-vertex loss changes. A vertex
    moves to its best candidate only where that lowers the real loss. The residuals of the pass it
    took (real ones, not the linear model's) are kept for ranking the next class.
    ``bit_cost`` μ > 0: ranking and the measured change both add ``μ (bits(j) − bits(V_i))``.
    Returns the new indices ``(m,)``.
    """
    m, k = V.shape[0], D.shape[1]
    V = V.clone()
    # per chunk: summed features (n, L, k) of the LODs ≥ level, the interpolation at this level, its loss
    cache, offset = [], 0
    for ch in chunks:
        F = summed_features(grid, ch.x, level)
        q = grid.octree.interpolation(ch.x, level)
        n = ch.x.shape[0]
        cache.append({"F": F, "q": q, "offset": offset, "n": n})
        offset += n
    lods = list(cache[0]["F"]) if cache else []

    def sample_loss(ch: RefineChunk, F: dict) -> tuple[torch.Tensor, torch.Tensor]:
        res = ch.residuals(F)
        rho = torch.stack([res[lod] for lod in lods], dim=1)  # (n, L, c)
        return (rho ** 2).sum(dim=(1, 2)), rho

    def corner(c: dict, cls: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per valid sample of a chunk: its row, its corner vertex in class ``cls`` and that weight."""
        q = c["q"]
        slot = parity[q.vertex_ids] == cls  # (nv, 8), one True per row
        r, sl = slot.nonzero(as_tuple=True)
        return q.valid.nonzero().squeeze(1)[r], q.vertex_ids[r, sl], q.weights[r, sl]

    def shifted(F: dict, rows: torch.Tensor, w: torch.Tensor, dfeat: torch.Tensor) -> dict:
        out = {}
        for lod, f in F.items():
            f = f.clone()
            f[rows] += w[:, None] * dfeat
            out[lod] = f
        return out

    for ch, c in zip(chunks, cache):
        c["loss"], _ = sample_loss(ch, c["F"])
    for cls in range(8):
        G, H = _accumulate(lin, m, k, parity[lin.vid] == cls)
        rows = ((parity == cls) & (H.flatten(1).abs().sum(1) > 0)).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        scores = gauss_newton_scores(G[rows], H[rows], D, V[rows])
        rate = bit_cost * _rate_change(V, rows, D.shape[0], D.dtype) if bit_cost > 0 else None
        scores = scores if rate is None else scores + rate
        scores[torch.arange(rows.numel()), V[rows]] = float("inf")  # the current codeword is no candidate
        cand = scores.topk(min(candidates, D.shape[0] - 1), dim=1, largest=False).indices  # (r, t)
        gain = torch.zeros(m, cand.shape[1], dtype=D.dtype, device=D.device)  # measured loss change
        trials = [[] for _ in chunks]  # per chunk and candidate: the samples' losses and residuals
        corners = [corner(c, cls) for c in cache]
        for t in range(cand.shape[1]):
            new = V.clone()
            new[rows] = cand[:, t]
            for ch, c, tr, (r, v, w) in zip(chunks, cache, trials, corners):
                loss_t, rho_t = sample_loss(ch, shifted(c["F"], r, w, D[new[v]] - D[V[v]]))
                gain[:, t].index_add_(0, v, loss_t[r] - c["loss"][r])
                tr.append((loss_t[r], rho_t[r]))
        gain_r = gain[rows] if rate is None else gain[rows] + rate.gather(1, cand)
        best, t_best = gain_r.min(dim=1)
        move = best < 0
        if not move.any():
            continue
        t_of = torch.full((m,), -1, dtype=torch.long, device=V.device)  # the candidate each vertex takes
        t_of[rows[move]] = t_best[move]
        new = V.clone()
        new[rows[move]] = cand[move.nonzero().squeeze(1), t_best[move]]
        for c, tr, (r, v, w) in zip(cache, trials, corners):  # apply: features, losses, residuals of the measured passes
            c["F"] = shifted(c["F"], r, w, D[new[v]] - D[V[v]])
            rho = lin.rho[c["offset"]:c["offset"] + c["n"]]
            for t, (loss_t, rho_t) in enumerate(tr):
                took = t_of[v] == t
                c["loss"][r[took]] = loss_t[took]
                rho[r[took]] = rho_t[took]
        V = new
    return V


def refine_indices(grid, chunks: list[RefineChunk], levels: list[int] | None = None,
                   classes: int = 8, check: list[RefineChunk] | None = None,
                   measured: int = 0, bit_cost: float = 0.0) -> list[RefineStats]:
    """One Gauss–Newton sweep over the codebook indices of ``levels`` (default: all), coarse to fine.

    Per level: one forward and backward pass linearizes the residuals in that level's feature; the
    indices then descend on that model one parity class at a time; a real forward pass checks the
    result, and a level whose real loss went up is put back as it was.

    Args:
        grid: an :class:`~vqad.grid.OctreeGrid`; its ``discrete`` storages (codebooks) are refined,
            each changed index set by ``storage.set_indices`` (in training: the argmax of the row's
            logits C is moved by swapping two logits; baked: V is written).
        chunks: the loss, see :class:`RefineChunk` (the same chunks serve every level).
        classes: 8 (one parity class at a time, see the module docstring) or 1 (all at once).
        check: other chunks of the same loss on which each level's moves must lower the loss to be
            kept (held-out samples guard against fitting ``chunks`` alone); default ``chunks``.
            The losses reported are then those of ``check``.
        measured: 0: move each vertex to the codeword the Gauss–Newton model predicts best. ``c > 0``
            (SDF chunks, one residual per sample): try each vertex's ``c`` best-predicted codewords
            and keep the best whose *measured* loss change is negative
            (:func:`_refine_level_exact`; c decoder passes per class).
        bit_cost: μ ≥ 0, the loss (Σ of squared residuals of ``chunks``) one coded index bit is worth:
            each move pays ``μ`` × the change of the bits its level's indices cost under their order-0
            model, and the undo check compares loss + μ · the level's coded bits (module docstring).
            0: loss alone. ``check`` chunks must then hold as many residual rows as ``chunks``.
    Returns:
        a :class:`RefineStats` per refined level.
    """
    if classes not in (1, 8):
        raise ValueError(f"classes must be 1 or 8, got {classes}")
    if not 0 <= bit_cost < float("inf"):
        raise ValueError(f"bit_cost must be a finite number >= 0, got {bit_cost}")
    if measured and (classes != 8 or any(ch.owner is not None for ch in chunks)):
        raise ValueError("measured moves need one residual row per sample (SDF chunks) and the 8 parity classes")
    stats = []
    if not chunks:  # nothing to fit (e.g. no ray met an occupied cell)
        return stats
    levels = [lv for lv in (levels or grid.lods) if grid.storage(lv).discrete]
    was_training = grid.training
    grid.eval()  # hard features in the forward pass, no straight-through softmax
    try:
        for level in levels:
            s = grid.storage(level)
            lin = _linearize(grid, level, chunks)
            before = lin.loss if check is None else _total_loss(grid, level, check)
            V0 = s.indices().clone()
            parity = vertex_parity(grid.octree.vertices[level])
            codes = s.codebook().shape[0]
            if measured:
                V1 = _refine_level_exact(grid, level, chunks, lin, s.codebook(), V0, parity, measured, bit_cost)
            else:
                V1 = _refine_level(lin, s.codebook(), V0, parity, classes, bit_cost=bit_cost)
            del lin.J
            rows = (V1 != V0).nonzero().squeeze(1)
            s.set_indices(rows, V1[rows])
            after = _total_loss(grid, level, chunks if check is None else check)
            bits0, bits1 = (level_bits(V0, codes), level_bits(V1, codes)) if bit_cost > 0 else (0.0, 0.0)
            undone = 0
            if after + bit_cost * bits1 > before + bit_cost * bits0:  # the linear model (or the samples) misled us: put the level back
                s.set_indices(rows, V0[rows])
                after, bits1, undone = before, bits0, 1
            stats.append(RefineStats(level, 0 if undone else int(rows.numel()), s.m, before, after, undone, bits0, bits1))
    finally:
        grid.train(was_training)
    return stats
