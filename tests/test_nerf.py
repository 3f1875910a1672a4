"""Radiance fields: volume rendering against hand computations and a per-ray loop, the three octree
builders against the procedural scene's surface, a short fit with a PSNR floor, checkpoints, the
CLI's bad-input cases. All on the built-in procedural scene (no downloaded data)."""

import json
import math

import pytest
import torch

from vqad.checkpoint import load_checkpoint
from vqad.app.cli import main as cli_main
from vqad.config import DecoderConfig, GridConfig
from vqad.errors import InputError
from vqad.grid import OctreeGrid
from vqad.nerf.formats import load_dataset
from vqad.nerf.evaluate import evaluate_nerf, view_stems
from vqad.nerf.field import NeRFConfig, NeRFField, sh_encode
from vqad.nerf.octree_build import (DensityPassConfig, backproject_depth, octree_from_density, octree_from_depth,
                                    octree_from_masks)
from vqad.nerf.render import (OccupancySampler, accumulate_along_rays, render_rays, render_weight_from_density,
                              volume_render)
from vqad.nerf.fit import NeRFTrainConfig, fit_nerf
from vqad.nerf.render import model_sampler
from vqad.octree import SparseOctree

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def scene():
    return load_dataset("procedural")


def _surface_points(ds, split="test"):
    """Unit-cube points on the scene's surface, back-projected from held-out views' depth."""
    views = ds.splits[split]
    pts = torch.cat([backproject_depth(views, i) for i in range(len(views))])
    return ds.normalization.to_unit(pts)


# -- volume rendering -------------------------------------------------------------------------------
def test_weights_match_hand_computation():
    t0 = torch.tensor([0.0, 0.5, 1.0, 0.2, 0.7])
    t1 = torch.tensor([0.5, 1.0, 1.5, 0.7, 1.2])
    sig = torch.tensor([0.4, 2.0, 1.0, 3.0, 0.0])
    ri = torch.tensor([0, 0, 0, 1, 1])
    w = render_weight_from_density(t0, t1, sig, ri, 2)
    a = [1 - math.exp(-0.4 * 0.5), 1 - math.exp(-2.0 * 0.5), 1 - math.exp(-1.0 * 0.5)]
    expect0 = [a[0], (1 - a[0]) * a[1], (1 - a[0]) * (1 - a[1]) * a[2]]
    b = 1 - math.exp(-3.0 * 0.5)
    expect = torch.tensor(expect0 + [b, 0.0])
    torch.testing.assert_close(w, expect, rtol=1e-6, atol=1e-7)


def test_packed_rendering_equals_per_ray_loop():
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([3, 0, 7, 1, 12, 5])
    n_rays = counts.numel()
    ri = torch.repeat_interleave(torch.arange(n_rays), counts)
    S = int(counts.sum())
    dt = torch.rand(S, generator=g) * 0.2 + 0.01
    t_starts = torch.zeros(S)
    t_ends = torch.zeros(S)
    for r in range(n_rays):  # increasing, non-overlapping intervals, some with gaps between them
        m = ri == r
        gaps = torch.rand(int(m.sum()), generator=g) * 0.1
        starts = torch.cumsum(gaps + dt[m], 0) - dt[m]
        t_starts[m], t_ends[m] = starts, starts + dt[m]
    sig = torch.rand(2, S, generator=g) * 8  # two LODs at once
    rgb = torch.rand(2, S, 3, generator=g)
    bg = torch.tensor([0.2, 0.5, 0.9])
    out = volume_render(t_starts, t_ends, sig, rgb, ri, n_rays, bg)
    for b in range(2):
        for r in range(n_rays):
            T, c, depth, opa = 1.0, torch.zeros(3), 0.0, 0.0
            for i in (ri == r).nonzero().flatten().tolist():
                alpha = 1 - math.exp(-float(sig[b, i]) * float(t_ends[i] - t_starts[i]))
                w = T * alpha
                c += w * rgb[b, i]
                depth += w * 0.5 * float(t_starts[i] + t_ends[i])
                opa += w
                T *= 1 - alpha
            torch.testing.assert_close(out.rgb[b, r], c + (1 - opa) * bg, rtol=1e-5, atol=1e-6)
            assert out.depth[b, r].item() == pytest.approx(depth, abs=1e-5)
            assert out.opacity[b, r].item() == pytest.approx(opa, abs=1e-6)
    # empty rays show the background, and accumulate_along_rays sums weights per ray
    torch.testing.assert_close(out.rgb[:, 1], bg.expand(2, 3))
    torch.testing.assert_close(accumulate_along_rays(out.weights, None, ri, n_rays), out.opacity)


@pytest.mark.parametrize("batch", [(), (2,), (2, 3)])
@pytest.mark.parametrize("channels", [None, 3])
def test_accumulate_along_rays_equals_one_hot_sums_with_gradients(batch, channels):
    """Σ_{i in ray r} w_i v_i against a one-hot matrix product, values and gradients, for any leading batch."""
    g = torch.Generator().manual_seed(3)
    counts = torch.tensor([4, 0, 1, 9, 2])
    ri = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    S, R = int(counts.sum()), counts.numel()
    w = torch.rand(*batch, S, generator=g, dtype=torch.float64, requires_grad=True)
    v = None if channels is None else torch.rand(*batch, S, channels, generator=g, dtype=torch.float64, requires_grad=True)
    got = accumulate_along_rays(w, v, ri, R)
    onehot = torch.nn.functional.one_hot(ri, R).to(torch.float64)  # (S, R)
    src = w.unsqueeze(-1) * (torch.ones(*batch, S, 1, dtype=torch.float64) if v is None else v)
    want = torch.einsum("...sc,sr->...rc", src, onehot)
    want = want.squeeze(-1) if v is None else want
    assert got.shape == want.shape
    torch.testing.assert_close(got, want)
    up = torch.rand(want.shape, generator=g, dtype=torch.float64)
    inputs = [w] + ([] if v is None else [v])
    for a, b in zip(torch.autograd.grad((got * up).sum(), inputs), torch.autograd.grad((want * up).sum(), inputs)):
        torch.testing.assert_close(a, b)


def test_marching_keeps_only_occupied_cells_and_covers_the_ray():
    pts = torch.tensor([[0.3, 0.1, -0.2], [-0.5, -0.5, 0.5]])
    octree = SparseOctree.from_points(pts, 2, 5, dilate=1)
    sampler = OccupancySampler(octree)
    g = torch.Generator().manual_seed(1)
    o = torch.tensor([[-3.0, 0.1, -0.2], [0.3, 3.0, -0.2], [2.0, 2.0, 2.0]])
    d = torch.tensor([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.0]])
    s = sampler.march(o, d, jitter=torch.rand(3, generator=g))
    x = s.points(o, d)
    assert len(s) > 0 and octree.contains(x).all()
    assert (s.ray_indices[1:] >= s.ray_indices[:-1]).all()  # packed, sorted by ray
    assert (s.ray_indices != 2).all()  # the third ray misses the cube
    # a brute-force dense march of the first ray finds exactly the occupied stretch
    t = torch.arange(0, 6, 1e-3)
    xs = o[0] + t[:, None] * d[0]
    occupied = octree.contains(xs)
    ts = s.t_starts[s.ray_indices == 0]
    te = s.t_ends[s.ray_indices == 0]
    assert ts.min() <= t[occupied].min() + sampler.step and te.max() >= t[occupied].max() - sampler.step


@pytest.mark.parametrize("max_candidates,threads", [(1 << 22, 1), (1 << 22, 3), (5000, 2)])
def test_marching_kernel_gives_the_pytorch_samples_bit_for_bit(monkeypatch, max_candidates, threads):
    """The CPU kernel (vqad.kernels.march_uniform) and the PyTorch ops give the same packed samples, bit
    for bit: jitter, a near plane, rays that miss the cube, pruned cells, one to three threads, and
    batches cut into chunks; no rays give no samples, and a negative count is refused before any write."""
    from vqad import kernels

    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # the kernels' thread count (vqad.kernels._threads)

    if not kernels.applies(torch.zeros(1)):
        pytest.skip(f"the C kernels are not in use here: {kernels.status()}")
    g = torch.Generator().manual_seed(0)
    octree = SparseOctree.from_points(torch.rand(400, 3, generator=g) * 2 - 1, 2, 6, dilate=1)
    sampler = OccupancySampler(octree, step=2.0 / 64)
    sampler.occupancy[torch.rand(sampler.occupancy.shape, generator=g) < 0.3] = False  # as pruning leaves it
    n = 1501
    o = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1) * 3
    d = torch.nn.functional.normalize(-o + torch.randn(n, 3, generator=g) * 0.5, dim=-1)
    d[:40] = -d[:40]  # heading away from the cube: no samples
    u, near = torch.rand(n, generator=g), torch.rand(n, generator=g)
    got = sampler.march(o, d, near=near, jitter=u, max_candidates=max_candidates)
    with kernels.disabled():
        want = sampler.march(o, d, near=near, jitter=u, max_candidates=max_candidates)
    assert len(want) > 1000 and not (got.ray_indices < 40).any()
    for a, b in zip((got.t_starts, got.t_ends, got.ray_indices), (want.t_starts, want.t_ends, want.ray_indices)):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert len(sampler.march(o[:0], d[:0])) == 0
    with pytest.raises(ValueError, match="negative"):
        kernels.march_uniform(o[:2], d[:2], near[:2], near[:2] + 1, u[:2], torch.tensor([3, -1]), sampler.occupancy,
                              sampler.level, sampler.step)


def test_sh_encoding_is_orthonormal():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(200_000, 3, generator=g)
    d = d / d.norm(dim=-1, keepdim=True)
    Y = sh_encode(d, 3)
    gram = 4 * math.pi * (Y.T @ Y) / d.shape[0]  # Monte-Carlo ∫ Y_i Y_j dω
    torch.testing.assert_close(gram, torch.eye(16), atol=0.03, rtol=0)


# -- octrees ----------------------------------------------------------------------------------------
def test_octree_from_depth_contains_surface(scene):
    octree = octree_from_depth(scene, 2, 6, CPU, dilate=1)
    pts = _surface_points(scene)
    assert octree.contains(pts).float().mean() > 0.999
    # and it is a shell, not the whole cube
    assert octree.num_cells(6) < 0.25 * 64 ** 3


def test_auto_step_ratio_keeps_samples_per_ray_near_the_budget(scene):
    from vqad.nerf.fit import AUTO_SAMPLES_PER_RAY, auto_step_ratio, build_nerf_field
    from vqad.nerf.rays import RayBatcher

    octree = octree_from_depth(scene, 2, 5, CPU, dilate=1)
    ratio, n = auto_step_ratio(octree, scene, CPU)
    # brute force: march the same probe rays one finest cell per step and count
    batcher = RayBatcher(scene.splits["train"], scene, CPU)
    o, d, _, near, far = batcher.sample(4096, torch.Generator().manual_seed(0))
    counts = OccupancySampler(octree, step=2.0 / 32).march(o, d, near=near, far=far).ray_indices.bincount(minlength=4096)
    assert n == pytest.approx(counts.float().mean().item())
    assert 0 < n < AUTO_SAMPLES_PER_RAY * 1.5 and ratio == 1.0  # a thin shell keeps one cell
    assert auto_step_ratio(octree, scene, CPU, budget=n / 3)[0] == 3.0  # a thick one marches round(n / budget)
    assert auto_step_ratio(octree, scene, CPU, budget=n * 10)[0] == 1.0  # never below one cell
    # build_nerf_field resolves step_ratio=None ("auto") and the field keeps the number
    grid = GridConfig(storage="dense", features=4, base_level=2, max_level=5)
    train = NeRFTrainConfig(steps=1, octree="depth")
    field, _ = build_nerf_field(scene, grid, DecoderConfig(hidden=16, position_input=False), NeRFConfig(step_ratio=None),
                                train, CPU)
    assert field.nerf_cfg.step_ratio == 1.0
    with pytest.raises(InputError, match="marching step"):
        NeRFField(field.grid, DecoderConfig(hidden=16, position_input=False), NeRFConfig(step_ratio=None))


def test_octree_from_masks_contains_surface(scene):
    octree = octree_from_masks(scene, 2, 6, CPU, dilate=1)
    assert octree.contains(_surface_points(scene)).float().mean() > 0.999
    assert octree.num_cells(6) < 0.5 * 64 ** 3
    # carving is conservative: the depth shell lies inside the visual hull
    depth = octree_from_depth(scene, 2, 6, CPU, dilate=0)
    centers = depth.vertex_positions(6)  # vertices of depth cells lie in or on hull cells
    assert octree.contains(centers.clamp(-0.999, 0.999)).float().mean() > 0.95


def test_octree_from_density_contains_surface(scene):
    octree = octree_from_density(scene, 2, 6, CPU, dilate=1, cfg=DensityPassConfig(level=5, steps=120, batch_rays=1024,
                                                                                     probe_rays=40_000))
    assert octree.contains(_surface_points(scene)).float().mean() > 0.97
    assert octree.num_cells(6) < 0.6 * 64 ** 3


def test_density_pass_loop_prunes_empty_space_but_keeps_the_surface(scene):
    """The radiance task re-tests the occupancy as it trains: empty cells go, surface cells stay."""
    from vqad.fit import run_fit
    from vqad.nerf.rays import RayBatcher
    from vqad.nerf.task import RadianceTask

    torch.manual_seed(0)
    octree = SparseOctree.dense(2, 4, device=CPU)
    grid = OctreeGrid.from_octree(octree, GridConfig(storage="dense", features=8, base_level=2, max_level=4))
    field = NeRFField(grid, DecoderConfig(hidden=32, layers=1, position_input=False),
                      NeRFConfig(geo_features=7, color_hidden=32, sh_degree=2), scene.normalization)
    sampler = OccupancySampler(octree)
    batcher = RayBatcher(scene.splits["train"], scene, CPU)
    cfg = NeRFTrainConfig(steps=80, batch_rays=1024, lr=5e-3, grid_lr_scale=10.0, lod_mode="finest",
                          prune_every=10, prune_warmup=40)
    res = run_fit(RadianceTask(field, sampler, batcher, cfg), cfg, CPU, quiet=True)
    assert res.steps == 80 and res.skipped_steps == 0 and res.empty_steps == 0
    occupied = sampler.occupancy.float().mean()
    assert occupied < 0.8  # empty space was pruned
    surface = _surface_points(scene)
    assert sampler.occupancy[sampler._flat_index(surface)].float().mean() > 0.95  # the surface was not


def _tiny_trainable(scene, **cfg):
    from vqad.nerf.rays import RayBatcher
    from vqad.nerf.task import RadianceTask

    torch.manual_seed(0)
    octree = SparseOctree.dense(2, 4, device=CPU)
    grid = OctreeGrid.from_octree(octree, GridConfig(storage="codebook", features=4, bits=3, base_level=2,
                                                     max_level=4))
    field = NeRFField(grid, DecoderConfig(hidden=16, position_input=False),
                      NeRFConfig(color_hidden=16, step_ratio=1.0), scene.normalization)
    train_cfg = NeRFTrainConfig(**{"batch_rays": 128, "lr": 5e-3, "grid_lr_scale": 30.0, **cfg})
    return RadianceTask(field, OccupancySampler(octree), RayBatcher(scene.splits["train"], scene, CPU), train_cfg)


def test_coarse_weight_scales_only_the_coarser_lods_loss(scene):
    """grad(Σ w_l MSE_l) on LODs {2, 4} = w · grad(MSE_2) + grad(MSE_4), on the same rays and jitter."""

    def grads(lods, w):
        task = _tiny_trainable(scene, coarse_weight=w)
        task.lods = lods
        task.field.zero_grad(set_to_none=True)
        task.step(0, 0.0, torch.Generator().manual_seed(3)).loss.backward()
        return torch.cat([(p.grad.to_dense() if p.grad.is_sparse else p.grad).flatten()
                          if p.grad is not None else torch.zeros(p.numel()) for p in task.field.parameters()])

    both = grads([2, 4], 0.25)
    expected = 0.25 * grads([2], 1.0) + grads([4], 1.0)
    assert both.abs().max() > 0
    torch.testing.assert_close(both, expected, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(both, grads([2, 4], 1.0))


def test_auto_decoders_are_per_lod_only_for_quantised_grids_in_contracted_scenes(scene):
    """per_lod=None ('auto', fit-nerf's default) resolves by the scene and storage; a built field
    never holds 'auto' (a file or checkpoint that says null is refused)."""
    from dataclasses import replace
    from types import SimpleNamespace

    from vqad.nerf.fit import NERF_DECODER, auto_per_lod

    assert NERF_DECODER.per_lod is None
    room, bounded = SimpleNamespace(outer_scale=4.0), SimpleNamespace(outer_scale=1.0)
    assert auto_per_lod(room, GridConfig(storage="codebook", bits=4))
    assert not auto_per_lod(room, GridConfig(storage="dense"))
    assert not auto_per_lod(bounded, GridConfig(storage="codebook", bits=4))
    assert not auto_per_lod(scene, GridConfig(storage="codebook", bits=4))  # the built-in scene is bounded
    oct_ = SparseOctree.from_points(torch.rand(50, 3) * 2 - 1, 1, 3)
    grid = OctreeGrid.from_octree(oct_, GridConfig(features=4, base_level=1, max_level=3, storage="codebook", bits=4))
    with pytest.raises(InputError, match="per_lod must be true or false"):
        NeRFField(grid, replace(NERF_DECODER, per_lod=None), NeRFConfig(step_ratio=1.0, outer_scale=1.0))
    field = NeRFField(grid, replace(NERF_DECODER, per_lod=True), NeRFConfig(step_ratio=1.0, outer_scale=1.0))
    assert len(field.decoder.mlps) == len(field.color.mlps) == 3


def test_auto_early_stop_is_on_only_in_contracted_scenes(scene):
    """early_stop_eps=None ('auto', fit-nerf's default) means ε = 1e-4 where space is contracted, 0 elsewhere; a
    number is kept; the task resolves it from its sampler, so a task built by hand runs the same rule."""
    from vqad.nerf.task import EARLY_STOP_CONTRACTED, RadianceTask, auto_early_stop

    assert NeRFTrainConfig().early_stop_eps is None
    assert auto_early_stop(None, 4.0) == EARLY_STOP_CONTRACTED == 1e-4
    assert auto_early_stop(None, 1.0) == 0.0
    assert auto_early_stop(0.0, 16.0) == 0.0 and auto_early_stop(1e-2, 1.0) == 1e-2
    NeRFTrainConfig(early_stop_eps=None).validate()
    for bad in (-1e-3, 1.0, float("nan")):
        with pytest.raises(InputError, match="--early-stop-eps must be in"):
            NeRFTrainConfig(early_stop_eps=bad).validate()
    task = _tiny_trainable(scene)
    assert task.early_stop_eps == 0.0  # the built-in scene is bounded
    assert _tiny_trainable(scene, early_stop_eps=1e-3).early_stop_eps == 1e-3
    contracted = RadianceTask(task.field, OccupancySampler(task.sampler.octree, outer_scale=4.0), task.batcher,
                              NeRFTrainConfig())
    assert contracted.early_stop_eps == EARLY_STOP_CONTRACTED


def test_a_step_with_a_non_finite_gradient_is_skipped(scene):
    """A NaN gradient anywhere leaves every parameter as it was (instead of poisoning the model); the
    loop counts the step as skipped and the next good step applies."""
    from vqad.fit import run_fit

    task = _tiny_trainable(scene, steps=1, lod_mode="all")
    field = task.field
    before = [p.detach().clone() for p in field.parameters()]
    hook = field.color.mlps[0].net[0].weight.register_hook(lambda g: g * float("nan"))
    res = run_fit(task, task.cfg, CPU, quiet=True)
    assert res.steps == 1 and res.skipped_steps == 1 and math.isfinite(res.final_loss)
    for a, b in zip(before, field.parameters()):
        assert torch.equal(a, b.detach())
    hook.remove()
    res = run_fit(task, task.cfg, CPU, quiet=True)
    assert res.skipped_steps == 0
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, field.parameters()))


def test_an_empty_octree_stops_with_its_own_error_not_a_divergence(scene):
    """Batches with no sample (every cell pruned) are not non-finite steps: after 20 in a row the fit
    stops with an error about the occupied space, not one telling the user to lower the learning rate."""
    from vqad.errors import TrainingDivergedError
    from vqad.fit import GUARD_LIMIT, run_fit

    task = _tiny_trainable(scene, steps=100, prune_every=0)
    task.sampler.occupancy.zero_()
    with pytest.raises(TrainingDivergedError, match="no sample in occupied space") as err:
        run_fit(task, task.cfg, CPU, quiet=True)
    assert "lower --lr" not in str(err.value) and f"step {GUARD_LIMIT}:" in str(err.value)


def test_huge_raw_densities_stay_finite_and_never_empty_the_octree(scene):
    from vqad.nerf.field import trunc_exp

    x = torch.tensor([0.0, 15.0, 100.0, 1e4], requires_grad=True)
    y = trunc_exp(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert y[0] == 1.0 and y[2] == y[1]  # exp below the clamp, e^15 above it
    sampler = OccupancySampler(SparseOctree.dense(2, 3, device=CPU))
    kept = sampler.prune(lambda p: torch.full((p.shape[0],), float("nan")), 0.01, decay=0.95,
                         generator=torch.Generator().manual_seed(0))
    assert kept == 1.0 and sampler.occupancy.any()


def test_a_fit_whose_steps_keep_failing_stops_with_a_clear_error(scene, tmp_path, monkeypatch):
    """Every step's loss is NaN (the colour head's bias is): steps are skipped, then the fit stops."""
    from vqad.errors import TrainingDivergedError

    def nan_colour_head(field):
        with torch.no_grad():
            field.color.mlps[0].net[-1].bias.fill_(float("nan"))

    monkeypatch.setattr(NeRFField, "_init_density_bias", lambda self: nan_colour_head(self))
    grid = GridConfig(storage="codebook", features=4, bits=3, base_level=2, max_level=4)
    cfg = NeRFTrainConfig(steps=100, batch_rays=64, octree="depth", prune_every=0)
    with pytest.raises(TrainingDivergedError, match=r"diverged at step 20: 20 steps in a row.*lower --lr"):
        fit_nerf(scene, grid, DecoderConfig(hidden=16, position_input=False), cfg, CPU, out_dir=tmp_path / "run",
                 quiet=True, nerf_cfg=NeRFConfig(step_ratio=1.0))


def test_empty_octrees_are_input_errors(scene):
    from dataclasses import replace

    views = scene.splits["train"]
    blank = replace(scene, splits={**scene.splits, "train": replace(views, masks=torch.zeros_like(views.masks),
                                                                     depth=torch.zeros_like(views.depth))})
    with pytest.raises(InputError, match="empty"):
        octree_from_masks(blank, 2, 5, CPU)
    with pytest.raises(InputError, match="empty"):
        octree_from_depth(blank, 2, 5, CPU)


# -- the field, a short fit, checkpoints --------------------------------------------------------------
def _small_field(storage="codebook"):
    octree = SparseOctree.from_points(torch.rand(500, 3) * 1.2 - 0.6, 2, 4, dilate=1)
    grid = OctreeGrid.from_octree(octree, GridConfig(storage=storage, features=4, bits=3, base_level=2, max_level=4))
    return NeRFField(grid, DecoderConfig(hidden=16, position_input=False), NeRFConfig(color_hidden=16))


def test_all_lods_match_single_lod_and_render_is_differentiable():
    field = _small_field()
    x = torch.rand(100, 3) * 1.2 - 0.6
    d = torch.nn.functional.normalize(torch.randn(100, 3), dim=-1)
    sig, rgb = field.all_lods(x, d, [2, 3, 4])
    for i, lod in enumerate([2, 3, 4]):
        s1, c1 = field(x, d, lod)
        torch.testing.assert_close(sig[i], s1)
        torch.testing.assert_close(rgb[i], c1)
    sampler = OccupancySampler(field.grid.octree)
    o = torch.tensor([[0.0, 0.0, -3.0]]).repeat(16, 1) + torch.randn(16, 3) * 0.1
    dirs = torch.nn.functional.normalize(-o + torch.randn(16, 3) * 0.05, dim=-1)
    out, n = render_rays(field, sampler, o, dirs, [4], torch.ones(3))
    assert n > 0
    out.rgb.sum().backward()
    assert field.grid.storages[-1].C.grad is not None and field.decoder.mlps[0].net[0].weight.grad is not None


def test_mlp_precision_resolves_by_device_and_is_validated():
    from vqad.device import native_bf16_matmul, resolve_mlp_precision

    assert NeRFTrainConfig().mlp_precision == "fp32"
    assert resolve_mlp_precision("fp32", CPU) is None
    assert resolve_mlp_precision("bf16", CPU) is torch.bfloat16  # asked for: given, native or not
    assert isinstance(native_bf16_matmul(CPU), bool) and not native_bf16_matmul(torch.device("meta"))
    for bad in ("fp16", "auto", "BF16"):
        with pytest.raises(InputError, match=f"unknown MLP precision '{bad}'"):
            resolve_mlp_precision(bad, CPU)
    with pytest.raises(InputError, match="--mlp-precision"):
        NeRFTrainConfig(mlp_precision="half").validate()


def test_bf16_decoders_stay_close_to_fp32_and_leave_the_field_fp32():
    """Inside ``mlp_precision(bf16)`` the decoders' products round to bf16 (8-bit mantissa): σ and RGB come
    out float32 and within bf16's error of the fp32 values; the gradients reach the fp32 parameters
    pointing the same way; outside the block the field is bit for bit its fp32 self again."""
    torch.manual_seed(0)
    field = _small_field()
    x = torch.rand(2000, 3) * 1.2 - 0.6
    d = torch.nn.functional.normalize(torch.randn(2000, 3), dim=-1)

    def run(dtype):
        field.zero_grad(set_to_none=True)
        with field.mlp_precision(dtype):
            sig, rgb = field.all_lods(x, d, [3, 4])
        (sig.mean() + rgb.square().mean()).backward()
        grads = torch.cat([p.grad.flatten() for p in field.decoders()[0].parameters()] +
                          [p.grad.flatten() for p in field.decoders()[1].parameters()])
        return sig.detach(), rgb.detach(), grads

    s32, c32, g32 = run(None)
    s16, c16, g16 = run(torch.bfloat16)
    assert s16.dtype == c16.dtype == g16.dtype == torch.float32
    assert not torch.equal(c16, c32)  # the products did run in bf16
    torch.testing.assert_close(c16, c32, rtol=0, atol=0.02)
    torch.testing.assert_close(s16, s32, rtol=0.05, atol=1e-3)
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.99
    s_again, c_again, _ = run(None)
    assert torch.equal(s_again, s32) and torch.equal(c_again, c32)
    assert field._mlp_dtype is None


def test_a_training_step_multiplies_in_the_resolved_precision(scene):
    """The radiance task runs its decoders in ``mlp_precision``'s dtype and leaves the field fp32."""
    seen = []
    for name in ("fp32", "bf16"):
        task = _tiny_trainable(scene, mlp_precision=name)
        decode = task.field._decode

        def spy(*a, decode=decode, field=task.field):
            seen.append(field._mlp_dtype)
            return decode(*a)

        task.field._decode = spy
        task.lods = [4]
        loss = task.step(0, 0.0, torch.Generator().manual_seed(3)).loss
        loss.backward()
        assert loss.dtype == torch.float32 and task.field._mlp_dtype is None
    assert seen == [None, torch.bfloat16]


def test_fit_nerf_says_when_bf16_is_emulated(tmp_path, capsys, monkeypatch):
    import vqad.device

    monkeypatch.setattr(vqad.device, "native_bf16_matmul", lambda device: False)
    out = tmp_path / "run"
    assert cli_main(["fit-nerf", "procedural", "--levels", "2:4", "--steps", "3", "--batch-rays", "128", "--octree", "mask",
                     "--features", "4", "--out", str(out), "--device", "cpu", "--quiet", "--no-eval",
                     "--mlp-precision", "bf16"]) == 0
    captured = capsys.readouterr()
    assert "slower than fp32" in captured.err and "MLPs in bf16" in captured.out
    assert json.loads((out / "metrics.json").read_text())["train"]["mlp_precision"] == "bf16"


def test_early_ray_termination_drops_only_samples_behind_the_surface():
    field = _small_field("dense")
    with torch.no_grad():
        field.decoder.mlps[0].net[-1].bias[0] += 5.0  # thick medium: most rays saturate early
    sampler = OccupancySampler(field.grid.octree)
    g = torch.Generator().manual_seed(4)
    o = torch.tensor([[0.0, 0.0, -3.0]]).repeat(64, 1) + torch.randn(64, 3, generator=g) * 0.2
    dirs = torch.nn.functional.normalize(-o + torch.randn(64, 3, generator=g) * 0.1, dim=-1)
    bg = torch.tensor([0.3, 0.6, 0.9])
    lods = [3, 4]
    full, n_full = render_rays(field, sampler, o, dirs, lods, bg)
    eps = 1e-3
    cut, n_cut = render_rays(field, sampler, o, dirs, lods, bg, early_stop_eps=eps)
    assert 0 < n_cut < 0.7 * n_full  # a real saving on this scene
    # every colour differs by less than eps (the dropped samples' total weight is below T < eps)
    diff = (cut.rgb - full.rgb).abs().max()
    assert 0 < diff < eps
    # and the kept samples are exactly each ray's first ones: brute force, ray by ray
    samples = sampler.march(o, dirs)
    x = samples.points(o, dirs)
    with torch.no_grad():
        sig = torch.stack([field.density(x, lod) for lod in lods])
    kept = 0
    for r in range(64):
        idx = (samples.ray_indices == r).nonzero().flatten()
        for i, j in enumerate(idx.tolist()):
            tau = (sig[:, idx[:i]] * (samples.t_ends[idx[:i]] - samples.t_starts[idx[:i]])).sum(-1)
            kept += int(bool((torch.exp(-tau) >= eps).any()))
    assert kept == n_cut


def test_early_termination_by_lod_decodes_each_lod_on_its_own_samples():
    """terminate_rays' per-LOD rows are exactly the samples where that LOD's transmittance is ≥ ε (brute force);
    all_lods with them decodes those rows only and gives the render and the gradients of decoding every kept
    sample with σ = 0 at the others."""
    from vqad.nerf.render import render_transmittance_from_density, terminate_rays

    octree = SparseOctree.from_points(torch.rand(500, 3) * 1.2 - 0.6, 2, 4, dilate=1)
    grid = OctreeGrid.from_octree(octree, GridConfig(storage="codebook", features=4, bits=3, base_level=2, max_level=4))
    field = NeRFField(grid, DecoderConfig(hidden=16, position_input=False, per_lod=True), NeRFConfig(color_hidden=16))
    with torch.no_grad():  # a thick medium at LOD 4, a thinner one at LOD 2: the finest saturates first
        field.decoder.mlps[2].net[-1].bias[0] += 5.0
        field.decoder.mlps[0].net[-1].bias[0] += 2.0
    sampler = OccupancySampler(field.grid.octree)
    g = torch.Generator().manual_seed(5)
    o = torch.tensor([[0.0, 0.0, -3.0]]).repeat(64, 1) + torch.randn(64, 3, generator=g) * 0.2
    dirs = torch.nn.functional.normalize(-o + torch.randn(64, 3, generator=g) * 0.1, dim=-1)
    lods, eps = [2, 4], 1e-3
    marched = sampler.march(o, dirs)
    samples, rows = terminate_rays(field, marched, o, dirs, lods, eps)
    with torch.no_grad():
        T, _ = render_transmittance_from_density(marched.t_starts, marched.t_ends,
                                                 field.densities(marched.points(o, dirs), lods),
                                                 marched.ray_indices, marched.n_rays)
    union = (T >= eps).any(dim=0)
    assert len(samples) == int(union.sum())
    assert rows[1] is not None and 0 < len(rows[1]) < 0.7 * len(samples)  # the finest LOD keeps far fewer
    for b in range(len(lods)):
        want = (T[b] >= eps)[union].nonzero().squeeze(1)
        assert torch.equal(rows[b] if rows[b] is not None else torch.arange(len(samples)), want)
    x = samples.points(o, dirs)
    dd = dirs.index_select(0, samples.ray_indices)
    bg = torch.tensor([0.3, 0.6, 0.9])
    outs, grads = [], []
    for by_lod in (True, False):
        field.zero_grad(set_to_none=True)
        sig, rgb = field.all_lods(x, dd, lods, rows=rows if by_lod else None)
        if not by_lod:
            mask = torch.stack([torch.zeros(len(samples), dtype=torch.bool).index_fill(0, r, True) if r is not None
                                else torch.ones(len(samples), dtype=torch.bool) for r in rows])
            sig, rgb = sig * mask, rgb * mask[..., None]
        else:
            for b, r in enumerate(rows):
                if r is not None:
                    off = torch.ones(len(samples), dtype=torch.bool).index_fill(0, r, False)
                    assert (sig[b][off] == 0).all() and (rgb[b][off] == 0).all()
        out = volume_render(samples.t_starts, samples.t_ends, sig, rgb, samples.ray_indices, samples.n_rays, bg)
        out.rgb.square().sum().backward()
        outs.append(out.rgb.detach())
        grads.append([p.grad.clone() for p in field.parameters() if p.grad is not None])
    torch.testing.assert_close(outs[0], outs[1])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a.to_dense() if a.is_sparse else a, b.to_dense() if b.is_sparse else b)
    # a LOD opaque before every kept sample decodes nothing; the row lists must match the LODs
    with torch.no_grad():
        sig, rgb = field.all_lods(x, dd, lods, rows=[torch.zeros(0, dtype=torch.long), None])
        full_sig, full_rgb = field.all_lods(x, dd, lods)
    assert not sig[0].any() and not rgb[0].any()
    torch.testing.assert_close(sig[1], full_sig[1])
    torch.testing.assert_close(rgb[1], full_rgb[1])
    with pytest.raises(ValueError, match="1 row lists for 2 LODs"):
        field.query_lods(x, dd, lods, rows=[None])
    with pytest.raises(InputError, match=r"one entry per LOD \(2\), got 1"):
        field.all_lods(x, dd, lods, rows=[None])
    # render_rays hands each LOD its rows (the same render as above); one LOD needs none
    seen = []
    decode = field.query_lods

    def spy(*a, rows=None, **k):
        seen.append(rows)
        return decode(*a, rows=rows, **k)

    field.query_lods = spy
    with torch.no_grad():
        render_rays(field, sampler, o, dirs, lods, bg, early_stop_eps=eps)
        render_rays(field, sampler, o, dirs, [4], bg, early_stop_eps=eps)
    assert seen[1] == [None] and seen[0][0] is None and torch.equal(seen[0][1], rows[1])
    for bad in (-1e-3, 1.0, float("nan")):
        with pytest.raises(ValueError, match="early_stop_eps must be in"):
            render_rays(field, sampler, o, dirs, lods, bg, early_stop_eps=bad)
        if bad == bad and bad > 0:
            with pytest.raises(ValueError, match="eps must be in"):
                terminate_rays(field, marched, o, dirs, lods, bad)


@pytest.fixture(scope="module")
def fitted(scene, tmp_path_factory):
    out = tmp_path_factory.mktemp("nerf_fit")
    grid = GridConfig(storage="codebook", features=8, bits=4, base_level=3, max_level=6)
    train = NeRFTrainConfig(steps=250, batch_rays=2048, octree="depth", prune_warmup=100)
    res = fit_nerf(scene, grid, DecoderConfig(hidden=64, position_input=False), train, CPU, out_dir=out, quiet=True,
                   nerf_cfg=NeRFConfig(step_ratio=1.0))
    return res, out


def test_short_fit_passes_psnr_floor(scene, fitted):
    res, _ = fitted
    metrics = evaluate_nerf(res.field, scene, "test", sampler=res.sampler)
    assert metrics[6]["psnr"] > 22.0, metrics
    assert metrics[6]["ssim"] > 0.8, metrics
    # the coarsest LOD is worse than the finest, but already a picture
    assert metrics[3]["psnr"] < metrics[6]["psnr"] and metrics[3]["psnr"] > 17.0
    r = res.field.size_report()
    assert r["grid_ratio"] > 20


def test_checkpoint_round_trip(scene, fitted):
    res, out = fitted
    field, cfg = load_checkpoint(out / "checkpoint", CPU)
    assert field.kind == "nerf" and cfg["step"] == 250
    assert cfg["dataset"]["format"] == "procedural" and cfg["dataset"]["background"] == [1.0, 1.0, 1.0]
    a = evaluate_nerf(res.field, scene, "test", lods=[4, 6], max_views=2, sampler=model_sampler(res.field))
    b = evaluate_nerf(field, scene, "test", lods=[4, 6], max_views=2)
    for lod in (4, 6):
        assert a[lod]["psnr"] == pytest.approx(b[lod]["psnr"], abs=1e-4)
    # a baked copy (indices, fp16) renders nearly the same
    field.bake(fp16=True)
    c = evaluate_nerf(field, scene, "test", lods=[6], max_views=2)
    assert c[6]["psnr"] == pytest.approx(b[6]["psnr"], abs=0.3)


def test_renders_into_a_used_folder_replace_the_earlier_runs_and_nothing_else(scene, fitted, tmp_path):
    res, _ = fitted
    lod = res.field.lods[0]
    evaluate_nerf(res.field, scene, "test", lods=[lod], out_dir=tmp_path, max_views=3)
    folder = tmp_path / f"test_lod{lod}"
    stems = view_stems(scene.splits["test"])
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{s}{x}.png" for s in stems[:3] for x in ("", "_depth", "_opacity"))
    (folder / "notes.txt").write_text("mine")
    (folder / "cover.png").write_bytes(b"mine")
    # a second run that renders fewer views (a time cap, Ctrl-C, --max-views) leaves none of the first run's
    evaluate_nerf(res.field, scene, "test", lods=[lod], out_dir=tmp_path, max_views=1)
    assert sorted(p.name for p in folder.iterdir()) == sorted(["notes.txt", "cover.png"] + [f"{stems[0]}{x}.png" for x in
                                                                                            ("", "_depth", "_opacity")])


def test_views_whose_image_names_collide_get_renders_of_their_own():
    class Views:
        def __init__(self, names, n):
            self.names = names
            self.n = n

        def __len__(self):
            return self.n

    assert view_stems(Views(["a/001.png", "b/001.png", "c/002.jpg"], 3)) == ["000_001", "001_001", "002"]
    assert view_stems(Views(["x.png", ""], 3)) == ["x", "001", "002"]
    assert view_stems(Views(["a/IMG.png", "b/img.png"], 2)) == ["000_IMG", "001_img"]


def test_resume_continues_from_checkpoint(scene, tmp_path):
    grid = GridConfig(storage="dense", features=4, bits=4, base_level=3, max_level=5)
    dec = DecoderConfig(hidden=16, position_input=False)
    train = NeRFTrainConfig(steps=20, batch_rays=256, octree="depth", prune_warmup=10, prune_every=5)
    fit_nerf(scene, grid, dec, train, CPU, out_dir=tmp_path, quiet=True)
    train.steps = 30
    res = fit_nerf(scene, grid, dec, train, CPU, out_dir=tmp_path, resume=True, quiet=True)
    steps = [h["step"] for h in res.history]  # the first call's log, then the resumed one's (from step 21)
    assert steps[0] == 1 and 21 in steps and steps == sorted(set(steps)) and steps[-1] <= 30
    _, cfg = load_checkpoint(tmp_path / "checkpoint", CPU)
    assert cfg["step"] == 30 and cfg["train"]["early_stop_eps"] == 0.0  # auto, resolved: a bounded scene
    # a checkpoint that recorded 'auto' unresolved (a task run by hand) resumes with the rule, from the field's
    # scene; one whose value is not a number is refused
    import json

    cfg_path = tmp_path / "checkpoint" / "config.json"
    for saved, steps in ((None, 32), ("1e-3", 34)):
        raw = json.loads(cfg_path.read_text())
        raw["train"]["early_stop_eps"] = saved
        cfg_path.write_text(json.dumps(raw))
        train.steps = steps
        if saved is None:
            fit_nerf(scene, grid, dec, train, CPU, out_dir=tmp_path, resume=True, quiet=True)
            _, cfg = load_checkpoint(tmp_path / "checkpoint", CPU)
            assert cfg["step"] == 32 and cfg["train"]["early_stop_eps"] == 0.0
        else:
            with pytest.raises(InputError, match="early_stop_eps '1e-3' is not a number"):
                fit_nerf(scene, grid, dec, train, CPU, out_dir=tmp_path, resume=True, quiet=True)


def test_octree_from_an_earlier_fit_is_reused_and_checked(scene, fitted, tmp_path):
    res, out = fitted
    grid = GridConfig(storage="dense", features=4, bits=4, base_level=4, max_level=6)  # another base level
    dec = DecoderConfig(hidden=16, position_input=False)
    train = NeRFTrainConfig(steps=3, batch_rays=128, octree_from=str(out / "checkpoint"))
    res2 = fit_nerf(scene, grid, dec, train, CPU, quiet=True)
    assert res2.octree_method == "reused"
    a, b = res.field.grid.octree, res2.field.grid.octree
    assert b.base_level == 4 and torch.equal(a.codes[6], b.codes[6]) and torch.equal(a.codes[4], b.codes[4])
    with pytest.raises(InputError, match="finest level 6"):
        fit_nerf(scene, GridConfig(storage="dense", features=4, base_level=3, max_level=5), dec, train, CPU, quiet=True)
    other = load_dataset("procedural", downscale=2)
    with pytest.raises(InputError, match="other images"):
        fit_nerf(other, grid, dec, train, CPU, quiet=True)


# -- CLI ----------------------------------------------------------------------------------------------
def _err(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vqad: error:"), err
    return err[0]


@pytest.mark.parametrize("extra, message", [
    (["--levels", "6:3"], "levels"),
    (["--levels", "abc"], "BASE:MAX"),
    (["--steps", "0"], "positive"),
    (["--bits", "20"], "bits"),
    (["--background", "pink"], "background"),
    (["--eval-views", "nope"], "no 'nope' views"),
    (["--logit-lr-scale", "-1"], "--logit-lr-scale must be >= 0"),
    (["--step-ratio", "0"], "'auto' or a number of finest cells in"),
    (["--step-ratio", "fast"], "'auto' or a number of finest cells in"),
    (["--coarse-weight", "0"], "--coarse-weight must be in (0, 1]"),
])
def test_fit_nerf_bad_arguments(tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert cli_main(["fit-nerf", "procedural", "--out", str(out), "--device", "cpu", "--steps", "5"] + extra) == 2
    assert message in _err(capsys)
    assert not out.exists()  # nothing half-written


def test_fit_nerf_bad_inputs(tmp_path, capsys):
    assert cli_main(["fit-nerf", str(tmp_path / "missing"), "--out", str(tmp_path / "a"), "--device", "cpu"]) == 2
    _err(capsys)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli_main(["fit-nerf", "procedural", "--out", str(blocker), "--steps", "1", "--device", "cpu"]) == 2
    assert "not a directory" in _err(capsys)
    assert cli_main(["fit-nerf", "procedural", "--out", str(tmp_path / "b"), "--resume", "--device", "cpu"]) == 2
    assert "--resume" in _err(capsys)
    assert cli_main(["eval", str(tmp_path / "nothing")]) == 2
    _err(capsys)


def test_cli_fit_eval_render(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli_main(["fit-nerf", "procedural", "--levels", "2:4", "--steps", "15", "--batch-rays", "256", "--octree", "mask",
                   "--features", "4", "--out", str(out), "--device", "cpu", "--quiet", "--eval-max-views", "2"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "ratio: grid" in text and "LOD 4: PSNR" in text
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["lods"]) == {"2", "3", "4"} and m["octree_method"] == "mask"
    assert m["nerf"]["step_ratio"] == 1.0  # --step-ratio auto, resolved (a thin mask octree) and recorded
    assert m["train"]["mlp_precision"] == "fp32" and "MLPs in fp32" in text  # the default, recorded and said
    assert (out / "test_lod4" / "test_000.png").is_file() and (out / "test_lod2" / "test_001_depth.png").is_file()
    assert cli_main(["eval", str(out / "checkpoint"), "--lod", "3", "--max-views", "1", "--views", "val"]) == 0
    assert "LOD 3: PSNR" in capsys.readouterr().out
    assert cli_main(["eval", str(out / "checkpoint"), "--lod", "9"]) == 2
    assert "LOD 9" in _err(capsys)
    r = tmp_path / "renders"
    assert cli_main(["render", str(out / "checkpoint"), "--lod", "4", "--views", "val", "-o", str(r)]) == 0
    assert len(list((r / "val_lod4").glob("*_opacity.png"))) == 5


def test_density_pass_probe_matches_a_full_render(scene):
    """probe_weights (density only, rays stopped once T < floor) keeps exactly the cells where a full
    render's weights reach the floor, and equals the full render's maxima wherever they do."""
    from vqad.nerf.octree_build import probe_weights
    from vqad.nerf.rays import RayBatcher

    torch.manual_seed(0)
    octree = SparseOctree.dense(2, 4, device=CPU)
    grid = OctreeGrid.from_octree(octree, GridConfig(storage="dense", features=4, base_level=2, max_level=4))
    field = NeRFField(grid, DecoderConfig(hidden=16, position_input=False),
                      NeRFConfig(geo_features=3, color_hidden=8, sh_degree=1, step_ratio=1.0), scene.normalization)
    for s in field.grid.storages:
        s.Z.data.normal_(0, 1.0)  # lumpy density: some rays stop early, some cross
    with torch.no_grad():
        field.decoder.mlps[0].net[-1].bias[0] = math.log(8.0)
    field.eval()
    sampler = OccupancySampler(octree, step=2.0 / 16)
    batcher = RayBatcher(scene.splits["train"], scene, CPU)
    floor = 0.02
    best = probe_weights(field, sampler, batcher, 4, 3000, floor, torch.Generator().manual_seed(5), chunk=1000)
    ref = torch.zeros_like(best)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _ in range(3):
            o, d, _, near, far = batcher.sample(1000, gen)
            p = sampler.march(o, d, near=near, far=far)
            x = p.points(o, d)
            w = render_weight_from_density(p.t_starts, p.t_ends, field.density(x, 4), p.ray_indices, p.n_rays)
            ref.scatter_reduce_(0, sampler._flat_index(x), w, reduce="amax")
    assert 0.05 < (ref >= floor).float().mean() < 0.95  # a test that can tell
    assert torch.equal(best >= floor, ref >= floor)
    hit = ref >= floor
    assert torch.allclose(best[hit], ref[hit], rtol=1e-4, atol=1e-6)


def test_distortion_loss_matches_brute_force_and_prefers_a_surface_to_fog():
    """distortion_loss (prefix sums) equals the O(n²) sum per ray, rays with no sample included, and it
    is smaller for one surface than for the same total weight spread along the ray."""
    from vqad.nerf.render import distortion_loss

    g = torch.Generator().manual_seed(0)
    counts = [3, 0, 5, 1, 7]
    ri = torch.cat([torch.full((c,), i) for i, c in enumerate(counts)])
    S = ri.numel()
    w = torch.rand(2, S, generator=g, dtype=torch.float64)
    s = torch.cumsum(torch.rand(S, generator=g, dtype=torch.float64), 0)
    delta = torch.rand(S, generator=g, dtype=torch.float64)
    ref = torch.zeros(2, dtype=torch.float64)
    for r in range(len(counts)):
        m = ri == r
        ww, ss, dd = w[:, m], s[m], delta[m]
        ref += (ww[:, :, None] * ww[:, None, :] * (ss[:, None] - ss[None, :]).abs()).sum((1, 2)) + (ww ** 2 * dd).sum(1) / 3
    assert torch.allclose(distortion_loss(w, s, delta, ri, len(counts)), ref / len(counts))
    # one ray of 20 samples: all weight in one sample vs spread evenly
    one = torch.zeros(20, dtype=torch.long)
    pos = torch.arange(20, dtype=torch.float64) * 0.1
    surface = torch.zeros(20, dtype=torch.float64)
    surface[12] = 0.9
    fog = torch.full((20,), 0.9 / 20, dtype=torch.float64)
    step = torch.full((20,), 0.1, dtype=torch.float64)
    assert distortion_loss(surface, pos, step, one, 1) < 0.2 * distortion_loss(fog, pos, step, one, 1)
    # gradients flow to the weights
    wg = fog.clone().requires_grad_(True)
    distortion_loss(wg, pos, step, one, 1).backward()
    assert wg.grad is not None and wg.grad.abs().sum() > 0


def test_distortion_weight_is_validated():
    """--distortion-weight must be finite and >= 0."""
    from vqad.nerf.task import NeRFTrainConfig

    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(InputError, match="distortion-weight"):
            NeRFTrainConfig(distortion_weight=bad).validate()
    NeRFTrainConfig(distortion_weight=0.01).validate()
