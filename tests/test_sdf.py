"""Meshes, signed distances, a short fit, checkpoints and resume."""

import numpy as np
import pytest
import torch
import trimesh

from vqad import fit as trainer
from vqad.checkpoint import load_checkpoint
from vqad.config import DecoderConfig, GridConfig
from vqad.sdf.fit import SDFTrainConfig
from vqad.sdf.extract import evaluate_grid, evaluate_grid_sparse, extract_mesh
from vqad.sdf.mesh import Mesh, SDFOracle, fit_normalization, load_mesh
from vqad.sdf.metrics import chamfer_and_normals
from vqad.sdf.fit import fit_sdf


def _sphere_mesh(radius=0.6, subdiv=4):
    s = trimesh.creation.icosphere(subdivisions=subdiv, radius=radius)
    return Mesh(np.asarray(s.vertices, dtype=np.float64), np.asarray(s.faces, dtype=np.int64))


def test_sphere_sdf_sign_and_value():
    oracle = SDFOracle(_sphere_mesh(0.6))
    pts = np.array([[0, 0, 0], [0.3, 0, 0], [0.9, 0, 0], [0, -1.5, 0]], dtype=np.float32)
    d = oracle(pts)
    assert d[0] < 0 and d[1] < 0 and d[2] > 0 and d[3] > 0
    np.testing.assert_allclose(d, [-0.6, -0.3, 0.3, 0.9], atol=5e-3)


def test_bunny_sign_is_robust_to_holes(data_dir):
    mesh = load_mesh(data_dir / "meshes" / "bunny.obj")
    tm = mesh.to_trimesh()
    assert not tm.is_watertight
    oracle = SDFOracle(mesh)
    # reference: inside test on a hole-filled copy
    filled = tm.copy()
    trimesh.repair.fill_holes(filled)
    rng = np.random.default_rng(0)
    lo, hi = tm.bounds
    pts = rng.uniform(lo, hi, size=(4000, 3))
    d = oracle(pts)
    ref_inside = filled.contains(pts) if filled.is_watertight else None
    if ref_inside is not None:
        far = np.abs(d) > 0.003  # ignore points right at the surface
        agree = ((d < 0) == ref_inside)[far].mean()
        assert agree > 0.99
    # points below the holes, just under the base, must be outside; the body centre inside
    base = np.array([[tm.centroid[0], lo[1] - 0.01, tm.centroid[2]]])
    assert oracle(base)[0] > 0
    assert oracle(np.array([tm.centroid]))[0] < 0


def test_load_mesh_merges_duplicates_and_normalises(tmp_path):
    s = trimesh.creation.box(extents=(2.0, 1.0, 0.5))
    unmerged = trimesh.Trimesh(s.vertices[s.faces].reshape(-1, 3), np.arange(len(s.faces) * 3).reshape(-1, 3), process=False)
    p = tmp_path / "box.obj"
    unmerged.export(p)
    mesh = load_mesh(p)
    assert len(mesh.vertices) == 8
    norm = fit_normalization(mesh)
    unit = norm.to_unit(torch.from_numpy(mesh.vertices))
    assert abs(float(unit.abs().max()) - 0.9) < 1e-9
    back = norm.to_world(unit).numpy()
    np.testing.assert_allclose(back, mesh.vertices, atol=1e-12)


def test_short_fit_reaches_chamfer_bound(tmp_path):
    mesh = _sphere_mesh(0.6, subdiv=3)
    grid = GridConfig(storage="codebook", features=8, bits=4, base_level=2, max_level=5)
    train = SDFTrainConfig(steps=250, batch=4096, pool_size=60000, resample_every=125, lr=5e-3)
    res = fit_sdf(mesh, grid, DecoderConfig(hidden=64), train, torch.device("cpu"), quiet=True)
    out = extract_mesh(res.field, 5, resolution=96)
    dense = extract_mesh(res.field, 5, resolution=96, sparse=False)  # every lattice point evaluated
    np.testing.assert_array_equal(out.faces, dense.faces)
    np.testing.assert_allclose(out.vertices, dense.vertices, rtol=0, atol=1e-12)
    to_unit = lambda v: res.field.normalization.to_unit(torch.from_numpy(v)).numpy()  # noqa: E731
    ch, nc = chamfer_and_normals(mesh.transformed(to_unit), out.transformed(to_unit), n=20000)
    assert ch < 0.01, ch  # unit-cube units; the sphere spans 1.8
    assert nc > 0.95
    # outputs come back in the mesh's own coordinates
    r = np.linalg.norm(out.vertices, axis=1)
    assert abs(np.median(r) - 0.6) < 0.02


def test_interrupt_saves_and_resume_continues(tmp_path, monkeypatch):
    mesh = _sphere_mesh(0.5, subdiv=2)
    grid = GridConfig(storage="codebook", features=4, bits=2, base_level=2, max_level=4)
    train = SDFTrainConfig(steps=30, batch=512, pool_size=5000, resample_every=10, checkpoint_every=1000)
    real_step = trainer.step
    calls = {"n": 0}

    def flaky_step(opts):
        calls["n"] += 1
        if calls["n"] == 12:
            raise KeyboardInterrupt
        real_step(opts)

    monkeypatch.setattr(trainer, "step", flaky_step)
    with pytest.raises(KeyboardInterrupt):
        fit_sdf(mesh, grid, DecoderConfig(hidden=16), train, torch.device("cpu"), out_dir=tmp_path, quiet=True)
    field, cfg = load_checkpoint(tmp_path / "checkpoint")
    assert cfg["step"] == 11
    assert not (tmp_path / "checkpoint.tmp").exists()
    before = cfg["train_seconds"]
    assert before > 0
    monkeypatch.setattr(trainer, "step", real_step)
    res = fit_sdf(mesh, grid, DecoderConfig(hidden=16), train, torch.device("cpu"), out_dir=tmp_path, resume=True, quiet=True)
    assert res.steps == 30
    _, cfg = load_checkpoint(tmp_path / "checkpoint")
    assert cfg["step"] == 30
    # the training time runs across the interrupt too: the resumed call's is added to the first run's
    assert res.earlier_seconds == before and before < cfg["train_seconds"] <= before + res.seconds
    # the loss log runs across the interrupt (the resumed fit's used to start at its own first step)
    assert [h["step"] for h in res.history] == [1, 12] and cfg["history"] == res.history
    # the resumed fit continued the saved optimizer state: Adam's step count runs on from the 11 steps
    # before the interrupt (30 in all), it does not restart at the 19 steps of the resumed call
    assert _adam_steps(tmp_path / "checkpoint", "dense") == {30}
    assert _adam_steps(tmp_path / "checkpoint", "sparse") == {30}


def test_sweeps_an_interrupt_stopped_run_on_resume(tmp_path, monkeypatch):
    """Ctrl-C during the index sweeps after the last step: the checkpoint says they are pending and how many
    were done, and a resume with no step left runs the rest (it used to call the fit complete without them,
    then to run them all again on top of the ones done); the next resume finds nothing left to do."""
    from vqad.sdf import fit as sdf_fit

    mesh = _sphere_mesh(0.5, subdiv=2)
    grid = GridConfig(storage="codebook", features=4, bits=2, base_level=2, max_level=4)
    train = SDFTrainConfig(steps=12, batch=512, pool_size=5000, checkpoint_every=1000, refine=3, refine_samples=1000)
    real_sweep = sdf_fit.SDFTask._sweep
    sweeps: list[int] = []

    def sweep(self, gen, samples=None):
        sweeps.append(samples)
        if len(sweeps) == 2 and samples is not None:  # the second sweep after training
            raise KeyboardInterrupt
        real_sweep(self, gen, samples)

    monkeypatch.setattr(sdf_fit.SDFTask, "_sweep", sweep)
    with pytest.raises(KeyboardInterrupt):
        fit_sdf(mesh, grid, DecoderConfig(hidden=16), train, torch.device("cpu"), out_dir=tmp_path, quiet=True)
    _, cfg = load_checkpoint(tmp_path / "checkpoint")
    assert cfg["step"] == 12 and cfg["after_training"] == "pending" and cfg["step_seconds"] > 0
    assert cfg["sweeps_done"] == 1
    res = fit_sdf(mesh, grid, DecoderConfig(hidden=16), train, torch.device("cpu"), out_dir=tmp_path, resume=True,
                  quiet=True)
    # the two sweeps left: 3 in all, as asked (the interrupted one left valid indices and counts for nothing)
    assert res.steps_done == 0 and res.after_training_resumed and len(sweeps) == 4 and res.refine_seconds > 0
    _, cfg = load_checkpoint(tmp_path / "checkpoint")
    assert "after_training" not in cfg and "sweeps_done" not in cfg
    res = fit_sdf(mesh, grid, DecoderConfig(hidden=16), train, torch.device("cpu"), out_dir=tmp_path, resume=True,
                  quiet=True)
    assert not res.after_training_resumed and len(sweeps) == 4


def _adam_steps(ckpt, name: str) -> set:
    """Every parameter's ``step`` in optimizer ``name`` of a checkpoint (tensors or JSON scalars)."""
    import json

    from safetensors.torch import load_file

    tensors = load_file(str(ckpt / "optim.safetensors"))
    scalars = json.loads((ckpt / "config.json").read_text())["optimizers"][name]["scalars"]
    steps = {int(v) for k, v in tensors.items() if k.startswith(name + ".") and k.endswith(".step")}
    steps |= {int(v) for k, v in scalars.items() if k.endswith(".step")}
    assert steps, f"no step counts saved for optimizer {name}"
    return steps


def test_time_cap_stops_early_and_records_steps_done(tmp_path):
    mesh = _sphere_mesh(0.5, subdiv=2)
    grid = GridConfig(storage="codebook", features=4, bits=2, base_level=2, max_level=4)
    train = SDFTrainConfig(steps=100_000, batch=512, pool_size=5000, resample_every=10, max_minutes=0.02)
    res = fit_sdf(mesh, grid, DecoderConfig(hidden=16), train, torch.device("cpu"), out_dir=tmp_path, quiet=True)
    assert 0 < res.steps < 100_000
    assert res.seconds < 30
    _, cfg = load_checkpoint(tmp_path / "checkpoint")
    assert cfg["step"] == res.steps


@pytest.mark.parametrize("resolution", [61, 64])
def test_sparse_grid_evaluation_matches_dense_near_the_surface(resolution):
    """Two spheres and a torus (an exact SDF): the sparse lattice keeps every sign, equals the dense
    lattice wherever a block may hold the surface, and evaluates well under half of it."""

    def sdf(x):
        a = (x - torch.tensor([0.3, 0.0, 0.0])).norm(dim=-1) - 0.35
        b = (x + torch.tensor([0.4, 0.2, 0.0])).norm(dim=-1) - 0.2
        q = torch.stack([(x[:, :2].norm(dim=-1) - 0.6), x[:, 2]], -1)
        torus = q.norm(dim=-1) - 0.08
        return torch.minimum(torch.minimum(a, b), torus)

    calls = []
    dense = evaluate_grid(sdf, resolution, "cpu")
    sparse, frac = evaluate_grid_sparse(lambda x: calls.append(len(x)) or sdf(x), resolution, "cpu")
    assert np.array_equal(np.sign(dense), np.sign(sparse))
    near = np.abs(dense) < 2.0 / (resolution - 1)  # every lattice point next to a crossing
    np.testing.assert_array_equal(sparse[near], dense[near])
    far = sparse != dense
    assert far.any() and frac < 0.5
    assert sum(calls) < 0.6 * resolution ** 3  # coarse lattice + the evaluated blocks


def test_non_finite_steps_are_skipped_then_the_fit_stops_with_a_clear_error(monkeypatch):
    """A step with a non-finite gradient leaves the model alone; twenty in a row stop the fit."""
    from vqad.errors import TrainingDivergedError

    mesh = _sphere_mesh(0.5, subdiv=2)
    grid = GridConfig(storage="codebook", features=4, bits=2, base_level=2, max_level=4)
    train = SDFTrainConfig(steps=60, batch=512, pool_size=5000, resample_every=10, lr=3e-3, grid_lr_scale=50)
    seen = {"n": 0}

    def bad_grads(opts, *tensors):
        seen["n"] += 1
        return False

    monkeypatch.setattr(trainer, "grads_finite", bad_grads)
    with pytest.raises(TrainingDivergedError, match=r"diverged at step 20: .*lower --lr \(now 0.003\) or "
                                                    r"--grid-lr-scale \(now 50\)"):
        fit_sdf(mesh, grid, DecoderConfig(hidden=16), train, torch.device("cpu"), quiet=True)
    assert seen["n"] == 20


def test_safe_step_applies_only_finite_steps():
    w = torch.nn.Parameter(torch.ones(3))
    opts = {"dense": torch.optim.SGD([w], lr=0.5)}
    (w.sum() * float("inf")).backward()
    assert not trainer.safe_step(opts, torch.tensor(float("inf")))
    assert torch.equal(w.detach(), torch.ones(3)) and w.grad is None
    w.sum().backward()
    assert trainer.safe_step(opts, torch.tensor(1.0))
    torch.testing.assert_close(w.detach(), torch.full((3,), 0.5))


def test_an_occasional_bad_step_is_skipped_and_counted(monkeypatch):
    mesh = _sphere_mesh(0.5, subdiv=2)
    grid = GridConfig(storage="codebook", features=4, bits=2, base_level=2, max_level=4)
    train = SDFTrainConfig(steps=30, batch=512, pool_size=5000, resample_every=10)
    calls = {"n": 0}
    real = trainer.grads_finite

    def every_third_bad(opts, *tensors):
        calls["n"] += 1
        return real(opts, *tensors) and calls["n"] % 3 != 0

    monkeypatch.setattr(trainer, "grads_finite", every_third_bad)
    res = fit_sdf(mesh, grid, DecoderConfig(hidden=16), train, torch.device("cpu"), quiet=True)
    assert res.steps == 30 and res.skipped_steps == 10


def test_grads_finite_sees_sparse_gradients():
    emb = torch.nn.Embedding(10, 2, sparse=True)
    opts = {"sparse": torch.optim.SparseAdam(list(emb.parameters()), lr=0.1)}
    emb(torch.tensor([1, 1, 3])).sum().backward()
    assert emb.weight.grad.is_sparse and trainer.grads_finite(opts)
    trainer.zero_grad(opts)
    (emb(torch.tensor([1, 3])) * torch.tensor([[1.0, 1.0], [float("nan"), 1.0]])).sum().backward()
    assert not trainer.grads_finite(opts)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), None])
@pytest.mark.parametrize("where", ["sparse", "dense", "loss"])
def test_grads_finite_finds_any_non_finite_value(bad, where):
    """One NaN or infinity anywhere (a sparse gradient's values, a dense gradient, the loss) fails the
    check, whatever else the tensors hold; large finite values and an infinity of each sign do not cancel."""
    emb = torch.nn.Embedding(1000, 8, sparse=True)
    lin = torch.nn.Linear(8, 1)
    opts = {"sparse": torch.optim.SparseAdam(list(emb.parameters()), lr=0.1),
            "dense": torch.optim.Adam(list(lin.parameters()), lr=0.1)}
    ids = torch.arange(0, 1000, 3)
    scale = torch.full((ids.numel(), 8), 1e30)  # gradients of 1e30: big, but their sum is finite in float32
    if bad is not None and where == "sparse":
        scale[ids.numel() // 2, 5] = bad
    loss = (emb(ids) * scale).sum() + lin(torch.ones(1, 8)).sum()
    loss.backward()
    if bad is not None and where == "dense":
        lin.weight.grad[0, 3] = bad
    loss_value = torch.tensor(bad if where == "loss" and bad is not None else 0.0)  # the gradients alone decide
    assert emb.weight.grad.is_sparse
    assert trainer.grads_finite(opts, loss_value) == (bad is None)
    if bad is not None and where == "sparse":  # +inf and -inf in one tensor do not cancel to a finite sum
        emb.weight.grad._values().view(-1)[7] = -bad if bad == bad else bad
        assert not trainer.grads_finite(opts)


class _AnalyticSphere(torch.nn.Module):
    """An exact sphere SDF (radius 0.6) behind the octree of its surface: what render_sdf needs of a field."""

    def __init__(self, levels=(3, 6)):
        super().__init__()
        from types import SimpleNamespace

        from vqad.octree import SparseOctree

        g = torch.randn(200_000, 3)
        surface = 0.6 * g / g.norm(dim=-1, keepdim=True)
        self.grid = SimpleNamespace(octree=SparseOctree.from_points(surface, *levels, dilate=1))
        self.calls = 0

    def forward(self, x, lod=None):
        self.calls += x.shape[0]
        return x.norm(dim=-1) - 0.6

    def query(self, x, lod):  # (render_sdf's unchecked entry)
        return self(x, lod)

    def check_lod(self, lod):
        return self.grid.octree.max_level if lod is None else lod


@pytest.mark.parametrize("lod", [4, 6])
def test_octree_accelerated_sphere_tracing_matches_plain_with_fewer_evaluations(lod):
    """Skipping the octree's empty space changes no hit: the same pixels hit as the plain march over
    the whole cube, at the analytic ray-sphere distances, with far fewer field evaluations."""
    from vqad.sdf.render import OrbitCamera, TraceStats, render_sdf, sphere_trace

    field = _AnalyticSphere()
    cam = OrbitCamera(width=64, height=64)
    o, d = cam.rays("cpu")
    fn = lambda x: field(x, lod)  # noqa: E731
    plain, fast = TraceStats(), TraceStats()
    hit_p, t_p, _ = sphere_trace(fn, o, d, stats=plain)
    hit_f, t_f, dist_f = sphere_trace(fn, o, d, octree=field.grid.octree, level=lod, stats=fast)
    # brute force: |o + t d| = 0.6
    b = (o * d).sum(-1)
    disc = b ** 2 - ((o * o).sum(-1) - 0.36)
    t_true = -b - disc.clamp_min(0).sqrt()
    clear = (disc > 1e-2) | (disc < -1e-2)  # away from the silhouette, where 1e-3 decides
    assert torch.equal(hit_f[clear], disc[clear] > 0) and torch.equal(hit_p[clear], disc[clear] > 0)
    x_f = o[hit_f] + t_f[hit_f, None] * d[hit_f]
    assert ((x_f.norm(dim=-1) - 0.6).abs() < 4e-3).all()  # on the surface
    assert torch.equal(dist_f[hit_f], x_f.norm(dim=-1) - 0.6)  # the distance returned is the one there
    head_on = hit_f & (disc > 0.1)  # away from grazing rays, t is the first intersection's
    assert (t_f[head_on] - t_true[head_on]).abs().max() < 2e-3
    assert fast.evaluations < 0.55 * plain.evaluations  # (the relaxed plain march is itself ~20 % cheaper)
    img_p = render_sdf(field, lod, cam, accelerate=False)
    img_f = render_sdf(field, lod, cam, accelerate=True)
    assert (np.abs(img_p.astype(int) - img_f.astype(int)).max(-1) > 8).mean() < 0.01


def test_a_render_in_tiles_is_the_render_in_one_and_marching_cubes_checks_memory(monkeypatch):
    """render_sdf traces TILE_RAYS rays at a time (a hostile pass: --size 8192 at once needed 23 GB and was
    killed): tiles give the same image and evaluation count. extract_mesh refuses a lattice that would not fit
    free memory, saying which resolution would (--resolution 2048 asked 240 GB and was killed)."""
    import vqad.device as device_mod
    import vqad.sdf.render as render_mod
    from vqad.errors import InputError
    from vqad.sdf.render import OrbitCamera, TraceStats, render_sdf

    field = _AnalyticSphere()
    cam = OrbitCamera(width=48, height=40)
    whole, tiled = TraceStats(), TraceStats()
    img = render_sdf(field, 6, cam, stats=whole)
    monkeypatch.setattr(render_mod, "TILE_RAYS", 500)  # 4 tiles, the last one short
    assert np.array_equal(render_sdf(field, 6, cam, stats=tiled), img)
    assert tiled.evaluations == whole.evaluations and tiled.iterations == whole.iterations
    assert tiled.hits == whole.hits > 0  # (vqad render warns when no ray met the surface)

    from vqad.grid import OctreeGrid
    from vqad.sdf.field import SDFField

    sdf_field = SDFField(OctreeGrid.from_octree(field.grid.octree, GridConfig("dense", 4, 4, 3, 6)),
                         DecoderConfig(hidden=8))
    monkeypatch.setattr(device_mod, "available_memory", lambda: 100 * 28 * 64 ** 3)
    with pytest.raises(InputError, match="resolution 512: marching cubes on 512³ points takes about 3.8 GB and this "
                                         "machine has 0.7 GB free; give at most 297"):
        extract_mesh(sdf_field, 6, resolution=512)


def test_grazing_hits_are_reported_where_their_distance_was_measured():
    """Rays still marching when the steps run out report the t at which their distance was measured, so
    the distance returned (and the normals' centre value) belongs to the returned point."""
    from vqad.sdf.render import OrbitCamera, sphere_trace

    field = _AnalyticSphere()
    o, d = OrbitCamera(width=48, height=48).rays("cpu")
    o, d = o.double(), d.double()  # float64 rays with a float32 field work too
    fn = lambda x: field(x.float(), 6)  # noqa: E731
    hit, t, dist = sphere_trace(fn, o, d, max_steps=12, octree=field.grid.octree)
    x = o[hit] + t[hit, None] * d[hit]
    torch.testing.assert_close(dist[hit], (x.norm(dim=-1) - 0.6).to(dist.dtype), rtol=0, atol=1e-6)


def test_relaxed_secant_march_keeps_hits_and_thin_parts_with_fewer_evaluations():
    """Over-relaxed steps with the secant refinement hit the same pixels as classic sphere tracing
    (``relax = step_scale``), at the analytic distances, with fewer evaluations; and a slab thinner
    than a relaxed step's overshoot is not jumped over (the overlap test sends the ray back)."""
    from vqad.sdf.render import OrbitCamera, TraceStats, sphere_trace

    field = _AnalyticSphere()
    o, d = OrbitCamera(width=64, height=64).rays("cpu")
    fn = lambda x: field(x, 6)  # noqa: E731
    classic, relaxed = TraceStats(), TraceStats()
    hit_c, t_c, _ = sphere_trace(fn, o, d, octree=field.grid.octree, relax=0.9, stats=classic)
    hit_r, t_r, _ = sphere_trace(fn, o, d, octree=field.grid.octree, stats=relaxed)
    b = (o * d).sum(-1)
    disc = b ** 2 - ((o * o).sum(-1) - 0.36)
    clear = disc.abs() > 1e-2
    assert torch.equal(hit_r[clear], hit_c[clear]) and torch.equal(hit_r[clear], disc[clear] > 0)
    head_on = hit_r & (disc > 0.1)
    t_true = -b - disc.clamp_min(0).sqrt()
    assert (t_r[head_on] - t_true[head_on]).abs().max() < 2e-3
    assert relaxed.evaluations < 0.95 * classic.evaluations

    # a slab |z| <= 0.004 seen head-on from z = 3: every relaxed step from far away would overshoot it
    def slab(x):
        return x[:, 2].abs() - 0.004

    n = 64
    xy = torch.rand(n, 2) * 1.2 - 0.6
    o2 = torch.cat([xy, torch.full((n, 1), 3.0)], dim=1)
    d2 = torch.tensor([[0.0, 0.0, -1.0]]).expand(n, 3)
    hit, t, _ = sphere_trace(slab, o2, d2, relax=1.9)
    assert hit.all() and ((t - (3.0 - 0.004)).abs() < 2e-3).all()
