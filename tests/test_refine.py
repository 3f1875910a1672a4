"""Gauss–Newton index refinement (vqad.refine) against brute force on small grids."""

import math

import pytest
import torch

from vqad.config import DecoderConfig, GridConfig
from vqad.errors import InputError
from vqad.grid import OctreeGrid
from vqad.octree import SparseOctree
from vqad.refine import (RefineChunk, _accumulate, _linearize, _total_loss, gauss_newton_scores, index_bits, level_bits,
                         refine_indices, summed_features, vertex_parity)
from vqad.sdf.fit import refine_sdf


def _grid(seed=0, bits=3, k=4, levels=(1, 3)):
    torch.manual_seed(seed)
    pts = torch.rand(400, 3) * 1.2 - 0.6
    octree = SparseOctree.from_points(pts, *levels, dilate=0)
    return OctreeGrid.from_octree(octree, GridConfig(storage="codebook", bits=bits, features=k,
                                                     base_level=levels[0], max_level=levels[1])), pts


def _linear_chunks(x, target, A, chunk=64):
    """ρ_l = F_l A_l − t: linear in the feature, so Gauss–Newton is exact."""

    def res(t):
        return lambda F: {lod: f @ A[lod] - (t[lod] if isinstance(t, dict) else t) for lod, f in F.items()}

    out = []
    for a in range(0, x.shape[0], chunk):
        t = {lod: v[a:a + chunk] for lod, v in target.items()} if isinstance(target, dict) else target[a:a + chunk]
        out.append(RefineChunk(x[a:a + chunk], res(t)))
    return out


def _loss(grid, chunks, level):
    return _total_loss(grid, level, chunks)


def test_vertex_parity_separates_the_corners_of_every_cell():
    grid, _ = _grid()
    for level in grid.lods:
        par = vertex_parity(grid.octree.vertices[level])
        corners = grid.octree.corners[level]  # (cells, 8)
        assert all(len(set(row.tolist())) == 8 for row in par[corners])


def test_scores_equal_the_exact_loss_change_for_a_linear_residual():
    grid, x = _grid(seed=1)
    level = 2
    torch.manual_seed(2)
    A = {lod: torch.randn(4, 2, dtype=torch.float64) for lod in grid.lods}
    t = torch.randn(x.shape[0], 2, dtype=torch.float64)
    # in float64: the exact change is the difference of two sums of ~10^3, which float32 rounds to ~3e-5
    # in an order that depends on the CPU's vector width
    grid, x = grid.double(), x.double()
    fn = _linear_chunks(x, t, A)
    grid.eval()
    s = grid.storage(level)
    lin = _linearize(grid, level, fn)
    loss0 = lin.loss
    G, H = _accumulate(lin, s.m, s.k, None, chunk=50)
    assert loss0 == pytest.approx(_loss(grid, fn, level), rel=1e-5)
    V = s.indices()
    scores = gauss_newton_scores(G, H, s.D.detach(), V, chunk=7)
    assert torch.allclose(scores[torch.arange(s.m), V], torch.zeros_like(scores[:, 0]), atol=1e-9)
    touched = (G.abs().sum(1) > 0).nonzero().squeeze(1)
    for i in touched[:6].tolist():
        for j in range(1 << s.b):
            C = s.C.data
            saved = C[i].clone()
            C[i] = -10.0
            C[i, j] = 10.0  # vertex i now uses codeword j
            exact = _loss(grid, fn, level) - loss0
            C[i] = saved
            assert scores[i, j].item() == pytest.approx(exact, rel=1e-6, abs=1e-9)


def test_refine_never_raises_the_loss_and_recovers_planted_indices():
    grid, x = _grid(seed=3, bits=2)
    torch.manual_seed(4)
    A = {lod: torch.randn(4, 1) for lod in grid.lods}
    # targets made by the grid itself with other, random indices: zero loss is reachable
    grid.eval()
    with torch.no_grad():
        for s in grid.storages:
            s.C.data = torch.randn_like(s.C) * 5
        F = summed_features(grid, x, grid.lods[0])
        t = {lod: f @ A[lod] for lod, f in F.items()}
        for s in grid.storages:
            s.C.data = torch.randn_like(s.C)
    fn = _linear_chunks(x, t, A, chunk=128)
    before = _loss(grid, fn, grid.lods[0])
    grid.train()
    for _ in range(3):
        stats = refine_indices(grid, fn)
        for st in stats:
            assert st.loss_after <= st.loss_before + 1e-6
    after = _loss(grid, fn, grid.lods[0])
    assert after < 0.2 * before
    assert grid.training  # the train/eval mode is restored



def test_refine_moves_a_baked_codebook_as_it_moves_a_training_one():
    """Indices are set through the storage: logits in training, V itself once baked; same moves."""
    from vqad.refine import has_codebook

    grid, x = _grid(seed=5, bits=2)
    torch.manual_seed(6)
    A = {lod: torch.randn(4, 1) for lod in grid.lods}
    fn = _linear_chunks(x, torch.randn(x.shape[0], 1), A, chunk=128)
    baked, _ = _grid(seed=5, bits=2)
    baked.load_state_dict(grid.state_dict())
    baked.bake(fp16=False)
    assert has_codebook(grid) and has_codebook(baked)
    a, b = refine_indices(grid, fn), refine_indices(baked, fn)
    assert a == b and sum(st.changed for st in a) > 0
    assert all(torch.equal(s.indices(), t.indices()) for s, t in zip(grid.storages, baked.storages))
    dense = OctreeGrid.from_octree(grid.octree, GridConfig(storage="dense", features=4, base_level=1, max_level=3))
    assert not has_codebook(dense) and refine_indices(dense, fn) == []

def test_refine_sdf_lowers_the_loss_of_a_trained_sphere(one_thread):
    import numpy as np
    import trimesh

    from vqad.sdf.fit import SDFTrainConfig
    from vqad.sdf.mesh import Mesh, SampleMix, SDFOracle, draw_sdf_samples
    from vqad.sdf.fit import fit_sdf

    s = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    mesh = Mesh(np.asarray(s.vertices, dtype=np.float64), np.asarray(s.faces, dtype=np.int64))
    grid = GridConfig(storage="codebook", features=4, bits=3, base_level=2, max_level=4)
    train = SDFTrainConfig(steps=60, batch=2048, pool_size=20000, lr=5e-3, refine=0)
    field = fit_sdf(mesh, grid, DecoderConfig(hidden=32), train, torch.device("cpu"), quiet=True).field
    x, d = draw_sdf_samples(SDFOracle(mesh), field.normalization, 20000, np.random.default_rng(1), SampleMix())
    stats = refine_sdf(field, x, d)
    assert [st.level for st in stats] == [2, 3, 4]
    assert sum(st.changed for st in stats) > 0
    assert all(st.loss_after <= st.loss_before for st in stats)
    assert stats[0].loss_after < stats[0].loss_before
    # the moved indices are what a baked field uses
    V = [st.indices().clone() for st in field.grid.storages]
    field.bake()
    assert all(torch.equal(v, st.V) for v, st in zip(V, field.grid.storages))


def test_fit_with_refinement_sweeps_runs_them(one_thread, monkeypatch):
    import numpy as np
    import trimesh

    import vqad.sdf.fit as sdf_mod
    from vqad.sdf.fit import SDFTrainConfig
    from vqad.sdf.mesh import Mesh

    calls = []
    real = sdf_mod.refine_sdf
    monkeypatch.setattr(sdf_mod, "refine_sdf", lambda *a, **k: calls.append(1) or real(*a, **k))
    s = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    mesh = Mesh(np.asarray(s.vertices, dtype=np.float64), np.asarray(s.faces, dtype=np.int64))
    grid = GridConfig(storage="codebook", features=4, bits=2, base_level=2, max_level=3)
    train = SDFTrainConfig(steps=40, batch=1024, pool_size=8000, refine=1, refine_during=2, refine_samples=4000)
    sdf_mod.fit_sdf(mesh, grid, DecoderConfig(hidden=16), train, torch.device("cpu"), quiet=True)
    assert len(calls) == 3
    calls.clear()
    grid = GridConfig(storage="dense", features=4, base_level=2, max_level=3)
    with pytest.raises(InputError, match="refine=1 acts on discrete indices"):  # nothing to refine in a dense grid
        sdf_mod.fit_sdf(mesh, grid, DecoderConfig(hidden=16), train, torch.device("cpu"), quiet=True)
    assert calls == []


def test_a_rate_aware_fit_weighs_bits_in_its_sweeps_at_its_own_lambda(one_thread, monkeypatch):
    """fit-sdf --rate-weight λ: every sweep gets μ = λ · samples / Σ m (the same objective as the
    training term), and the sweeps lower the indices' bits against a plain fit's."""
    import numpy as np
    import trimesh

    import vqad.sdf.fit as sdf_mod
    from vqad.sdf.fit import SDFTrainConfig
    from vqad.sdf.mesh import Mesh

    costs, stats = [], []
    real = sdf_mod.refine_indices

    def spy(grid, chunks, **kw):
        costs.append((kw.get("bit_cost", 0.0), sum(ch.x.shape[0] for ch in chunks), sum(s.m for s in grid.storages)))
        stats.append(real(grid, chunks, **kw))
        return stats[-1]

    monkeypatch.setattr(sdf_mod, "refine_indices", spy)
    s = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    mesh = Mesh(np.asarray(s.vertices, dtype=np.float64), np.asarray(s.faces, dtype=np.int64))
    grid = GridConfig(storage="codebook", features=4, bits=4, base_level=2, max_level=4)
    bits = {}
    for lam in (0.0, 1e-3):
        costs.clear()
        train = SDFTrainConfig(steps=60, batch=1024, pool_size=8000, refine=2, refine_samples=4000, rate_weight=lam)
        res = sdf_mod.fit_sdf(mesh, grid, DecoderConfig(hidden=16), train, torch.device("cpu"), quiet=True)
        assert len(costs) == 2
        for mu, n, total_m in costs:
            assert mu == pytest.approx(lam * n / total_m)
        bits[lam] = sum(level_bits(st.indices(), 16) for st in res.field.grid.storages)
    assert bits[1e-3] < 0.9 * bits[0.0]


def test_scores_are_exact_when_several_samples_feed_one_residual():
    """Radiance-field layout: samples grouped into rays (``owner``), one residual per ray; the
    Jacobians are summed per (ray, vertex) pair, so H stays exact for a linear residual."""
    grid, x = _grid(seed=5)
    level = 3
    torch.manual_seed(6)
    n_rays = 37
    owner = torch.randint(0, n_rays, (x.shape[0],))
    A = {lod: torch.randn(4, 3, dtype=torch.float64) for lod in grid.lods}
    t = torch.randn(n_rays, 3, dtype=torch.float64)
    grid, x = grid.double(), x.double()  # float64: the exact change is a difference of two large sums

    def residuals(F):
        return {lod: torch.zeros(n_rays, 3, dtype=torch.float64).index_add(0, owner, f @ A[lod]) - t
                for lod, f in F.items()}

    chunks = [RefineChunk(x, residuals, owner=owner)]
    grid.eval()
    s = grid.storage(level)
    lin = _linearize(grid, level, chunks)
    assert lin.loss == pytest.approx(_loss(grid, chunks, level), rel=1e-5)
    G, H = _accumulate(lin, s.m, s.k)
    scores = gauss_newton_scores(G, H, s.D.detach(), s.indices())
    touched = (G.abs().sum(1) > 0).nonzero().squeeze(1)
    for i in touched[:5].tolist():
        for j in range(1 << s.b):
            saved = s.C.data[i].clone()
            s.C.data[i] = -10.0
            s.C.data[i, j] = 10.0
            exact = _loss(grid, chunks, level) - lin.loss
            s.C.data[i] = saved
            assert scores[i, j].item() == pytest.approx(exact, rel=1e-6, abs=1e-9)


def test_refine_nerf_lowers_the_photometric_loss(one_thread, monkeypatch):
    from vqad.nerf.formats import load_dataset
    from vqad.nerf.field import NeRFConfig
    from vqad.nerf.fit import NeRFTrainConfig, fit_nerf
    from vqad.nerf.task import refine_nerf
    from vqad.nerf.rays import RayBatcher

    ds = load_dataset("procedural")
    grid = GridConfig(storage="codebook", features=4, bits=3, base_level=2, max_level=4)
    train = NeRFTrainConfig(steps=40, batch_rays=512, octree="depth", prune_warmup=20, refine=0)
    res = fit_nerf(ds, grid, DecoderConfig(hidden=16, position_input=False), train, torch.device("cpu"), quiet=True,
                   nerf_cfg=NeRFConfig(color_hidden=16))
    batcher = RayBatcher(ds.splits["train"], ds, torch.device("cpu"))
    stats = refine_nerf(res.field, res.sampler, batcher, 2048, torch.ones(3), torch.Generator().manual_seed(0))
    assert [st.level for st in stats] == [2, 3, 4]
    assert all(st.loss_after <= st.loss_before for st in stats)
    assert sum(st.changed for st in stats) > 0
    # rate-aware: μ = λ · 3 channels · rays / Σ m, and no level's loss + μ · bits goes up
    import vqad.nerf.task as task_mod
    seen = []
    real = task_mod.refine_indices
    total_m = sum(s.m for s in res.field.grid.storages)
    monkeypatch.setattr(task_mod, "refine_indices", lambda grid, chunks, **kw: seen.append(kw["bit_cost"]) or real(grid, chunks, **kw))
    stats = refine_nerf(res.field, res.sampler, batcher, 2048, torch.ones(3), torch.Generator().manual_seed(1),
                        rate_weight=1e-3)
    assert seen == [pytest.approx(1e-3 * 3 * 2048 / total_m)]
    mu = seen[0]
    assert all(st.loss_after + mu * st.bits_after <= st.loss_before + mu * st.bits_before for st in stats)


def _tanh_chunks(x, t, A, chunk=100):
    """ρ_l = tanh(F_l A_l) − t: not linear in the feature, so Gauss–Newton only predicts."""
    return [RefineChunk(x[a:a + chunk], (lambda tc: lambda F: {lod: torch.tanh(f @ A[lod]) - tc for lod, f in F.items()})(t[a:a + chunk]))
            for a in range(0, x.shape[0], chunk)]


def _descent_problem(linear: bool):
    """A small float64 grid (no float-level ties between brute force and refine) and a loss on level 2:
    residuals linear in the feature (Gauss–Newton exact) or through tanh. Returns the grid (eval mode),
    the chunks, the level, its touched vertices ``(m,)`` bool and their parity classes ``(m,)``."""
    grid, x = _grid(seed=5, bits=2, levels=(1, 2))
    grid, x = grid.double(), x.double()
    level = 2
    torch.manual_seed(6)
    A = {lod: torch.randn(4, 1, dtype=torch.float64) for lod in grid.lods}
    t = torch.randn(x.shape[0], 1, dtype=torch.float64) * 0.5
    fn = _linear_chunks(x, t, A) if linear else _tanh_chunks(x, t, A)
    grid.eval()
    touched = torch.zeros(grid.storage(level).m, dtype=torch.bool)
    touched[grid.octree.interpolation(x, level).vertex_ids.reshape(-1)] = True
    return grid, fn, level, touched, vertex_parity(grid.octree.vertices[level])


def _rate_descent(grid, fn, level, mu, touched, par):
    """Brute-force rate-aware coordinate descent by parity class: each touched vertex of a class takes
    the codeword that lowers loss + μ · (bits(j) − bits(V_i)) most, bits from the level's index
    histogram at the start of the class (one loss evaluation per (vertex, codeword))."""
    s = grid.storage(level)
    V = s.indices().clone()

    def set_all(V):
        s.C.data = torch.nn.functional.one_hot(V, s.C.shape[1]).to(s.C.dtype)

    with torch.no_grad():
        for cls in range(8):
            set_all(V)
            base = _loss(grid, fn, level)
            bits = index_bits(V, s.C.shape[1])
            new = V.clone()
            for v in (touched & (par == cls)).nonzero().squeeze(1).tolist():
                trial = V.clone()
                cost = []
                for j in range(s.C.shape[1]):
                    trial[v] = j
                    set_all(trial)
                    cost.append(_loss(grid, fn, level) - base + mu * float(bits[j] - bits[V[v]]))
                j = min(range(len(cost)), key=cost.__getitem__)
                if cost[j] < -1e-9 * abs(base):
                    new[v] = j
            V = new
    return V


def test_measured_moves_equal_brute_force_coordinate_descent():
    """With every codeword a candidate, the measured sweep of a level is exact coordinate descent by
    parity class: each vertex of a class takes the codeword that lowers the real loss most (others
    fixed), the class moves at once, then the next class. Checked against one loss evaluation per
    (vertex, codeword)."""
    grid, fn, level, touched, par = _descent_problem(linear=False)
    s = grid.storage(level)
    C0 = s.C.data.clone()
    V = _rate_descent(grid, fn, level, 0.0, touched, par)
    s.C.data = C0  # back to the start
    stats = refine_indices(grid, fn, levels=[level], measured=s.C.shape[1] - 1)
    got = s.indices()
    assert stats[0].loss_after < stats[0].loss_before
    agree = float((got == V)[touched].float().mean())
    assert agree == 1.0, agree
    assert stats[0].loss_after == pytest.approx(_loss(grid, fn, level), rel=1e-9)


def test_measured_moves_need_sdf_chunks():
    grid, x = _grid()
    chunks = [RefineChunk(x, lambda F: {lod: f[:1] for lod, f in F.items()}, owner=torch.zeros(x.shape[0], dtype=torch.long))]
    with pytest.raises(ValueError, match="one residual row per sample"):
        refine_indices(grid, chunks, measured=2)


def test_index_bits_and_level_bits_are_the_order0_code_lengths():
    V = torch.tensor([0, 0, 0, 1, 1, 3])
    bits = index_bits(V, 4)
    n = torch.tensor([3.0, 2.0, 0.0, 1.0], dtype=torch.float64)
    assert torch.allclose(bits, -torch.log2((n + 0.5) / (6 + 2)))
    assert bits[2] > bits[3] > bits[1] > bits[0]  # an unused codeword costs most, not infinity
    assert torch.isfinite(bits).all()
    H = -(3 * math.log2(3 / 6) + 2 * math.log2(2 / 6) + math.log2(1 / 6))
    assert level_bits(V, 4) == pytest.approx(H)
    assert level_bits(torch.zeros(5, dtype=torch.long), 4) == 0.0  # one symbol: nothing to code


@pytest.mark.parametrize("measured", [0, 3])
def test_rate_aware_moves_equal_brute_force_coordinate_descent(measured):
    """With a bit cost μ, a sweep is coordinate descent on loss + μ · order-0 bits: the Gauss–Newton
    path on residuals linear in the feature (exact there), the measured path with every codeword a
    candidate on tanh residuals. Both against brute force; and the rate term must change the result
    and, from where the descent on the loss alone stops, trade loss for bits."""
    grid, fn, level, touched, par = _descent_problem(linear=not measured)
    s = grid.storage(level)
    C0 = s.C.data.clone()
    mu = 0.02 * _loss(grid, fn, level) / touched.sum().item()  # a bit worth ~2 % of a vertex's share of the loss
    expected = _rate_descent(grid, fn, level, mu, touched, par)
    s.C.data = C0.clone()
    plain = _rate_descent(grid, fn, level, 0.0, touched, par)
    s.C.data = C0.clone()
    stats = refine_indices(grid, fn, levels=[level], measured=measured, bit_cost=mu)
    got = s.indices()
    assert stats[0].undone == 0
    assert bool((got == expected)[touched].all())
    assert not bool((expected == plain).all())  # the rate term did something
    codes = s.C.shape[1]
    assert stats[0].bits_after == pytest.approx(level_bits(got, codes))
    assert stats[0].loss_after + mu * stats[0].bits_after < stats[0].loss_before + mu * stats[0].bits_before
    # from where the loss alone stops moving, the rate term still moves vertices, and only to cheaper codes
    s.C.data = torch.nn.functional.one_hot(plain, codes).double()
    for _ in range(50):  # sweep on the loss alone until no vertex moves
        if refine_indices(grid, fn, levels=[level], measured=measured)[0].changed == 0:
            break
    else:
        raise AssertionError("the descent on the loss alone did not settle")
    after = refine_indices(grid, fn, levels=[level], measured=measured, bit_cost=mu)[0]
    assert after.changed > 0 and after.bits_after < after.bits_before and after.loss_after > after.loss_before


def test_a_large_bit_cost_puts_touched_vertices_on_one_codeword_and_is_checked_on_the_objective():
    """When a bit costs far more than any loss change, every touched vertex moves to the most
    frequent codeword; the undo check weighs the same objective, so the level is kept although its
    loss went up. A negative or infinite bit cost is refused."""
    grid, x = _grid(seed=7, bits=3, levels=(1, 2))
    level = 2
    torch.manual_seed(8)
    A = {lod: torch.randn(4, 1) for lod in grid.lods}
    fn = _linear_chunks(x, torch.randn(x.shape[0], 1), A)
    s = grid.storage(level)
    s.D.data = torch.randn(s.D.shape)  # codewords far apart (the init's are within ~0.01 of each other)
    touched = torch.zeros(s.m, dtype=torch.bool)
    touched[grid.octree.interpolation(x, level).vertex_ids.reshape(-1)] = True
    for _ in range(50):  # from where the loss alone stops moving, one codeword for all can only cost loss
        if refine_indices(grid, fn, levels=[level])[0].changed == 0:
            break
    else:
        raise AssertionError("the descent on the loss alone did not settle")
    stats = refine_indices(grid, fn, levels=[level], bit_cost=1e6)
    V = s.indices()
    assert stats[0].undone == 0 and stats[0].loss_after > stats[0].loss_before
    assert V[touched].unique().numel() == 1
    assert stats[0].bits_after < stats[0].bits_before
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="bit_cost"):
            refine_indices(grid, fn, levels=[level], bit_cost=bad)
