"""Scene contraction (vqad.nerf.contraction) and the contracted marcher, against brute force."""

import math

import pytest
import torch

from vqad.errors import InputError
from vqad.nerf.contraction import check_outer_scale, contract, grid_speed, slowest_speed, uncontract
from vqad.nerf.render import OccupancySampler
from vqad.octree import SparseOctree


@pytest.mark.parametrize("A", [2.0, 4.0, 16.0])
def test_contract_maps_the_outer_box_onto_the_cube_and_inverts(A):
    x = (torch.rand(2000, 3, dtype=torch.float64) * 2 - 1) * A
    g = contract(x, A)
    assert g.abs().max() <= 1 + 1e-12
    assert torch.allclose(uncontract(g, A), x, atol=1e-9)
    inside = x.abs().amax(-1) <= 1
    assert torch.allclose(g[inside], x[inside] / 2)
    corner = torch.tensor([[A, -A, A]], dtype=torch.float64)
    assert torch.allclose(contract(corner, A), torch.tensor([[1.0, -1.0, 1.0]], dtype=torch.float64))
    assert torch.equal(contract(x, 1.0), x)


def test_grid_speed_is_the_directional_derivative():
    A = 8.0
    x = (torch.rand(500, 3, dtype=torch.float64) * 2 - 1) * A
    d = torch.nn.functional.normalize(torch.randn(500, 3, dtype=torch.float64), dim=-1)
    eps = 1e-6
    fd = (contract(x + eps * d, A) - contract(x - eps * d, A)).norm(dim=-1) / (2 * eps)
    assert torch.allclose(grid_speed(x, d, A), fd, rtol=1e-5)
    # the slowest speed bounds every direction's from below
    slow = slowest_speed(contract(x, A), A)
    assert (grid_speed(x, d, A) >= slow * (1 - 1e-6)).all()


def test_contracted_march_cuts_rays_into_equal_grid_steps():
    """On a full octree every interval of every ray has grid length ``step`` (the first ``u · step``,
    the last clipped), the intervals tile each ray's segment in the outer box, and a ray's samples
    are contiguous and front to back."""
    A = 16.0
    sampler = OccupancySampler(SparseOctree.dense(2, 5), outer_scale=A)
    o = torch.tensor([[0.3, 0.2, 2.5], [0.3, 0.2, 2.5], [0.0, 0.5, 0.0], [-3.0, 1.0, 0.5]])
    d = torch.nn.functional.normalize(torch.tensor([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.3, 0.1, 1.0],
                                                    [1.0, -0.2, 0.1]]), dim=-1)
    u = torch.tensor([0.5, 0.25, 0.9, 0.5])
    p = sampler.march(o, d, jitter=u)
    assert torch.all(p.ray_indices[1:] >= p.ray_indices[:-1])
    for r in range(4):
        m = p.ray_indices == r
        ts, te = p.t_starts[m].double(), p.t_ends[m].double()
        assert torch.allclose(ts[1:], te[:-1])  # tiled, in order
        t_exit = float(((A * torch.sign(d[r]) - o[r]) / d[r]).abs().min())
        assert ts[0] == 0 and abs(float(te[-1]) - t_exit) < 1e-3
        a = contract(o[r].double() + ts[:, None] * d[r].double(), A)
        b = contract(o[r].double() + te[:, None] * d[r].double(), A)
        # the midpoint step keeps every full interval within 15 % of the step (where the L∞ norm switches axis, or far out where the
        # speed changes fastest; within 1 % near the box)
        length = (b - a).norm(dim=-1)
        assert abs(float(length[0]) / sampler.step - float(u[r])) < 0.05
        assert ((length[1:-1] / sampler.step - 1).abs() < 0.15).all()
    # points() are grid coordinates
    x = p.points(o, d)
    assert x.abs().max() <= 1


@pytest.mark.parametrize("finer_octree,threads", [(False, 1), (False, 3), (True, 2)])
def test_contracted_march_kernel_matches_the_pytorch_loop_in_double(monkeypatch, finer_octree, threads):
    """The CPU kernel (vqad.kernels.march_contracted, in double) gives the samples of the PyTorch loop
    run on float64 tensors: the same rays and intervals up to float32 rounding, with jitter, near
    planes, rays that miss the outer box, pruned cells, threads whose rays end in a partial group of
    eight and, where the occupancy grid is coarser than the octree, the octree's own check."""
    from vqad import kernels
    from vqad.nerf import render

    if not kernels.applies(torch.zeros(1)):
        pytest.skip(f"the C kernels are not in use here: {kernels.status()}")
    if finer_octree:  # an occupancy grid of level 3 under a level-5 octree: survivors are checked against it
        monkeypatch.setattr(render, "MAX_DENSE_OCCUPANCY_LEVEL", 3)
    gen = torch.Generator().manual_seed(0)
    A = 8.0
    octree = SparseOctree.from_points(torch.rand(300, 3, generator=gen) * 2 - 1, 2, 5, dilate=1)
    sampler = OccupancySampler(octree, step=2.0 / 32, outer_scale=A)
    assert sampler.level == (3 if finer_octree else 5)
    sampler.occupancy[torch.rand(sampler.occupancy.shape, generator=gen) < 0.2] = False  # as pruning leaves it
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # the kernels' thread count (vqad.kernels._threads)
    n = 2003
    o = (torch.rand(n, 3, generator=gen) * 2 - 1) * 1.5
    o[:50] = torch.tensor([2 * A, 0.0, 0.0])  # outside the outer box, heading away: no samples
    d = torch.nn.functional.normalize(torch.randn(n, 3, generator=gen), dim=-1)
    d[:50] = torch.tensor([1.0, 0.0, 0.0])
    u, near = torch.rand(n, generator=gen), torch.rand(n, generator=gen) * 0.3
    got = sampler.march(o, d, near=near, jitter=u)
    with kernels.disabled():
        ref = sampler.march(o.double(), d.double(), near=near.double(), jitter=u.double())
    assert got.t_starts.dtype == torch.float32 and got.ray_indices.dtype == torch.long and got.outer_scale == A
    assert len(ref) > 1000 and torch.equal(got.ray_indices, ref.ray_indices)
    assert not (got.ray_indices < 50).any()
    assert torch.allclose(got.t_starts.double(), ref.t_starts, rtol=1e-6, atol=1e-6)
    assert torch.allclose(got.t_ends.double(), ref.t_ends, rtol=1e-6, atol=1e-6)
    # a batch larger than one buffer's worth of rays is marched in pieces, with the same result
    t_in, t_out = render.ray_aabb(o, d, -A, A)
    max_iter = int(math.ceil(4.0 / sampler.step)) + 2
    pieces = sampler._march_contracted_kernel(o, d, torch.maximum(t_in, near), t_out, u, max_iter,
                                              max_entries=300 * max_iter)
    pieces = sampler._keep_occupied_points(pieces, o, d)  # march's check of the points (and the finer octree)
    for a, b in zip((pieces.t_starts, pieces.t_ends, pieces.ray_indices), (got.t_starts, got.t_ends, got.ray_indices)):
        assert torch.equal(a, b)
    none = sampler.march(o[:0], d[:0])  # no rays
    assert len(none) == 0 and none.n_rays == 0 and none.ray_indices.dtype == torch.long


def test_outer_scale_is_checked():
    for bad in (0.5, math.inf, float("nan"), True, "4"):
        with pytest.raises(InputError):
            check_outer_scale(bad)
    assert check_outer_scale(4) == 4.0


def test_jacobian_matches_finite_differences():
    from vqad.nerf.contraction import jacobian

    A = 8.0
    x = (torch.rand(200, 3, dtype=torch.float64) * 2 - 1) * A
    eps = 1e-6
    fd = torch.stack([(contract(x + eps * e, A) - contract(x - eps * e, A)) / (2 * eps)
                      for e in torch.eye(3, dtype=torch.float64)], -1)
    assert torch.allclose(jacobian(x, A), fd, atol=1e-6)


def _contracted_field(A=4.0, seed=0):
    """An untrained contracted radiance field with a visible density, baked (what a .vqad file holds)."""
    import math as m

    from vqad.config import DecoderConfig, GridConfig
    from vqad.grid import OctreeGrid
    from vqad.nerf.field import NeRFConfig, NeRFField

    torch.manual_seed(seed)
    octree = SparseOctree.from_points(torch.rand(300, 3) * 2 - 1, 2, 4, dilate=0)  # the shell as well as the centre
    grid = OctreeGrid.from_octree(octree, GridConfig("codebook", 4, 4, 2, 4))
    field = NeRFField(grid, DecoderConfig(hidden=16, position_input=False),
                      NeRFConfig(geo_features=3, color_hidden=8, sh_degree=1, step_ratio=1.0, outer_scale=A))
    with torch.no_grad():
        for mlp in field.decoder.mlps:
            mlp.net[-1].bias[0] = m.log(3.0)  # σ ≈ 3 per unit length: rays see several cells
    field.bake(fp16=True)
    return field.eval()


def test_a_contracted_field_round_trips_through_the_file_bit_for_bit(tmp_path):
    """outer_scale travels in the file header; the decoded field marches and renders the same rays
    (contracted marcher, model pruning) to the same bits at every LOD."""
    import vqad
    from vqad import fileformat as F
    from vqad.nerf.render import render_rays_chunked
    from vqad.nerf.render import model_sampler

    field = _contracted_field()
    path = tmp_path / "contracted.vqad"
    F.save(field, path, entropy=True)
    back = vqad.load(path)
    assert back.kind == "nerf" and back.nerf_cfg.outer_scale == 4.0 and back.nerf_cfg == field.nerf_cfg
    # cameras outside the central box looking at the object, and rays out towards the outer box
    g = torch.Generator().manual_seed(1)
    o = torch.nn.functional.normalize(torch.randn(300, 3, generator=g), dim=-1) * 2.5
    d = torch.nn.functional.normalize(-o + 0.5 * torch.randn(300, 3, generator=g), dim=-1)
    bg = torch.tensor([1.0, 1.0, 1.0])
    a = render_rays_chunked(field, model_sampler(field), o, d, [2, 3, 4], bg)
    b = render_rays_chunked(back, model_sampler(back), o, d, [2, 3, 4], bg)
    assert (a[2][-1] > 0.1).float().mean() > 0.5  # most rays do cross some density
    for x, y in zip(a, b):
        assert torch.equal(x, y)
