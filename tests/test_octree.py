"""Octree queries, corner tables and interpolation against brute-force references."""

import itertools

import pytest
import torch

from vqad.config import GridConfig
from vqad.grid import OctreeGrid
from vqad.octree import SparseOctree, morton_decode, morton_encode, trilinear_weights


def test_morton_roundtrip_and_order():
    ijk = torch.randint(0, 1 << 10, (1000, 3))
    assert torch.equal(morton_decode(morton_encode(ijk)), ijk)
    # a parent's code is its child's code >> 3
    assert torch.equal(morton_encode(ijk >> 1), morton_encode(ijk) >> 3)


def _brute_cells(points, level):
    res = 1 << level
    ijk = ((points + 1) * 0.5 * res).floor().long().clamp(0, res - 1)
    return {tuple(c) for c in ijk.tolist()}


def test_query_matches_dense_reference():
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(300, 3, generator=g) * 1.6 - 0.8
    octree = SparseOctree.from_points(pts, base_level=2, max_level=4, dilate=0)
    q = torch.rand(4000, 3, generator=g) * 2.2 - 1.1  # includes points outside the cube
    for level in octree.levels:
        occupied = {c for p in _brute_cells(pts, 4) for c in [tuple(v >> (4 - level) for v in p)]}
        sorted_cells = sorted(occupied, key=lambda c: int(morton_encode(torch.tensor(c))))
        index = {c: i for i, c in enumerate(sorted_cells)}
        got = octree.query(q, level)
        res = 1 << level
        for x, idx in zip(q.tolist(), got.tolist()):
            inside = all(-1 <= v <= 1 for v in x)
            c = tuple(min(max(int((v + 1) * 0.5 * res // 1), 0), res - 1) for v in x)
            want = index.get(c, -1) if inside else -1
            assert idx == want
        assert octree.num_cells(level) == len(occupied)


def test_dilation_adds_neighbours():
    pts = torch.tensor([[0.01, 0.01, 0.01]])
    octree = SparseOctree.from_points(pts, 1, 3, dilate=1)
    assert octree.num_cells(3) == 27


def test_corner_table_and_unique_vertices():
    g = torch.Generator().manual_seed(1)
    pts = torch.rand(200, 3, generator=g) * 2 - 1
    octree = SparseOctree.from_points(pts, 1, 4)
    for level in octree.levels:
        cells = morton_decode(octree.codes[level])
        corners = octree.vertices[level][octree.corners[level]]  # (n, 8, 3)
        offs = torch.tensor(list(itertools.product([0, 1], repeat=3)))
        assert torch.equal(corners - cells[:, None, :], offs[None].expand_as(corners))
        # vertex ids are unique lattice points, and each is used
        assert torch.unique(octree.vertices[level], dim=0).shape[0] == octree.num_vertices(level)
        assert torch.equal(torch.unique(octree.corners[level]), torch.arange(octree.num_vertices(level)))


@pytest.mark.parametrize("numpy_on_cpu", [True, False])  # False: the torch path a GPU takes
def test_child_masks_rebuild_every_level(monkeypatch, numpy_on_cpu):
    import vqad.octree as O

    monkeypatch.setattr(O, "NUMPY_ON_CPU", numpy_on_cpu)
    pts = torch.rand(500, 3) * 2 - 1
    octree = SparseOctree.from_points(pts, 2, 5)
    codes = torch.zeros(1, dtype=torch.long)  # the root
    for level in range(1, 6):
        codes = SparseOctree.codes_from_child_masks(codes, octree.child_masks(level))
        if level >= 2:
            assert torch.equal(codes, octree.codes[level])


def test_trilinear_reproduces_linear_function_exactly():
    pts = torch.rand(400, 3) * 1.8 - 0.9
    octree = SparseOctree.from_points(pts, 2, 4)
    grid = OctreeGrid.from_octree(octree, GridConfig(storage="dense", features=2, base_level=2, max_level=4))
    a, b = torch.tensor([0.3, -1.2, 0.7]), 0.25
    with torch.no_grad():
        for level in octree.levels:
            v = octree.vertex_positions(level).double()
            s = grid.storage(level)
            # only the finest level carries the linear function; the others are zero
            val = (v @ a.double() + b) if level == octree.max_level else torch.zeros(v.shape[0], dtype=torch.double)
            s.Z.data = torch.stack([val, 2 * val], -1).float()
    x = pts + (torch.rand_like(pts) - 0.5) * 0.01  # near the occupied cells
    inside = octree.contains(x)
    f = grid.features(x[inside])
    want = x[inside] @ a + b
    torch.testing.assert_close(f[:, 0], want, atol=1e-5, rtol=0)
    torch.testing.assert_close(f[:, 1], 2 * want, atol=1e-5, rtol=0)


def test_trilinear_weights_sum_to_one_and_hit_corners():
    x = torch.tensor([[-1.0, -1.0, -1.0], [0.0, 0.0, 0.0]])
    ijk = torch.tensor([[0, 0, 0], [2, 2, 2]])
    w = trilinear_weights(x, ijk, level=2)
    torch.testing.assert_close(w.sum(-1), torch.ones(2))
    assert w[0, 0] == 1.0 and w[1, 0] == 1.0


def test_empty_cells_contribute_nothing():
    octree = SparseOctree.from_points(torch.tensor([[0.5, 0.5, 0.5]]), 1, 3, dilate=0)
    grid = OctreeGrid.from_octree(octree, GridConfig(storage="dense", features=4, base_level=1, max_level=3))
    far = torch.tensor([[-0.9, -0.9, -0.9]])
    assert torch.all(grid.features(far) == 0)


def test_padded_and_compact_queries_agree_bit_for_bit():
    """The sync-free padded form (inference on a GPU) equals the compact one, outside the cube and
    with non-finite features too."""
    g = torch.Generator().manual_seed(2)
    pts = torch.rand(300, 3, generator=g) * 1.6 - 0.8
    octree = SparseOctree.from_points(pts, 2, 5, dilate=1)
    x = torch.cat([torch.rand(3000, 3, generator=g) * 2.4 - 1.2, pts, torch.tensor([[1.0, 1.0, 1.0], [-1.0, 0.0, 1.0]])])
    grid = OctreeGrid.from_octree(octree, GridConfig(storage="dense", features=3, base_level=2, max_level=5))
    with torch.no_grad():
        for s in grid.storages:
            s.Z.copy_(torch.randn(s.Z.shape, generator=g))
            s.Z[::7] = float("inf")
            s.Z[1::7] = float("nan")
    for level in octree.levels:
        q, p = octree.interpolation(x, level), octree.padded_interpolation(x, level)
        assert torch.equal(q.valid, p.valid) and torch.equal(q.valid, octree.contains(x, level))
        assert torch.equal(q.rows, q.valid.nonzero().squeeze(1)) and p.rows is None
        assert torch.equal(p.vertex_ids[q.rows], q.vertex_ids) and torch.equal(p.weights[q.rows], q.weights)
        assert torch.all(p.weights[~q.valid] == 0)
        with torch.no_grad():
            compact = grid._compact_level_features(x, level)
            padded = grid._padded_level_features(x, level)
        assert torch.equal(compact.isnan(), padded.isnan())
        assert torch.equal(compact.nan_to_num(), padded.nan_to_num())
        assert torch.all(padded[~q.valid] == 0)
    # the cumulative features (compact on the CPU) equal the sums of the padded levels, bit for bit
    with torch.no_grad():
        got = grid.multi_lod_features(x, octree.levels)
        acc = None
        for level, g_lod in zip(octree.levels, got):
            f = grid._padded_level_features(x, level)
            acc = f if acc is None else acc + f
            assert torch.equal(g_lod.isnan(), acc.isnan())
            assert torch.equal(g_lod.nan_to_num(), acc.nan_to_num())


def test_codes_at_gives_the_ancestors_above_the_base_level():
    octree = SparseOctree.from_points(torch.rand(200, 3) * 2 - 1, 3, 5)
    assert torch.equal(octree.codes_at(0), torch.zeros(1, dtype=torch.long))  # the root cell
    for level in range(0, 6):
        want = torch.unique(octree.codes[5] >> (3 * (5 - level)))
        assert torch.equal(octree.codes_at(level), want)


@pytest.mark.parametrize("path", ["kernel", "numpy", "torch"])  # torch: the path a GPU takes
@pytest.mark.parametrize("spread", [0.8, 1.0])  # 1.0: cells on the cube's far faces (vertices at 2^L)
def test_corner_tables_dense_and_sorted_paths_agree(monkeypatch, spread, path):
    """The dense-table corner tables (levels <= 8: a C bitmap, NumPy or torch) equal the sort-based ones
    (finer levels), and both equal a brute force: every corner's vertex has its lattice position,
    vertices in Morton order."""
    import vqad.octree as O
    from vqad import kernels

    if path == "kernel" and not kernels.applies(torch.zeros(1)):
        pytest.skip(f"vqad's C kernels are not built here: {kernels.status()}")
    monkeypatch.setattr(O, "NUMPY_ON_CPU", path == "numpy")
    if path != "kernel":
        monkeypatch.setattr(kernels, "_forced_off", 1)
    torch.manual_seed(0)
    octree = SparseOctree.from_points((torch.rand(5000, 3) * 2 - 1) * spread, 2, 5)
    for level in octree.levels:
        codes = octree.codes[level]
        dense = O.corner_tables(codes, level)
        monkeypatch.setattr(O, "DENSE_TABLE_MAX_LEVEL", -1)
        sorted_ = O.corner_tables(codes, level)
        monkeypatch.setattr(O, "DENSE_TABLE_MAX_LEVEL", 8)
        assert all(torch.equal(a, b) for a, b in zip(dense, sorted_, strict=True))
        corners, vkeys = dense
        vertices = O._vertices_of_keys(vkeys, level)
        ijk = morton_decode(codes, bits=level)
        for c in range(8):
            off = torch.tensor([(c >> 2) & 1, (c >> 1) & 1, c & 1])
            assert torch.equal(vertices[corners[:, c]], ijk + off)
        keys = morton_encode(vertices, bits=level + 1)
        assert torch.equal(vkeys, keys) and vkeys.dtype == torch.long
        assert bool((keys[1:] > keys[:-1]).all())  # Morton order, each vertex once
        assert torch.equal(torch.unique(corners), torch.arange(vertices.shape[0]))  # every vertex is a corner
    assert (int(vertices.max()) == 1 << level) == (spread == 1.0)  # the finest level: far faces exercised or not


def test_empty_levels_is_the_coarsest_empty_ancestor():
    """empty_levels(L) against a brute force over every cell: the coarsest level base..L whose cell
    holding it is empty, or OCCUPIED_LEVEL; and octrees own their tables (not the caller's codes)."""
    from vqad.octree import OCCUPIED_LEVEL

    torch.manual_seed(0)
    octree = SparseOctree.from_points(torch.rand(300, 3) * 1.2 - 0.9, 2, 5, dilate=0)
    for level in (3, 5):
        table = octree.empty_levels(level)
        res = 1 << level
        r = torch.arange(res)
        ijk = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
        x = (ijk.float() + 0.5) * (2.0 / res) - 1.0
        want = torch.full((res ** 3,), OCCUPIED_LEVEL, dtype=torch.int8)
        for lv in range(level, octree.base_level - 1, -1):
            want[~octree.contains(x, lv)] = lv
        assert torch.equal(table, want)
    codes = octree.codes[5].clone()
    rebuilt = SparseOctree.from_codes(codes, 2, 5)
    codes[0] = codes[-1]
    assert not torch.equal(rebuilt.codes[5], codes)


def test_octree_from_given_tables_equals_built_and_refuses_mismatches():
    """An octree handed every level's (codes, corners, keys), as the file reader does, holds exactly the
    tables it would build from its finest codes; tables for other levels, finest codes that are not
    the tables' own, or corner rows that do not match the codes are refused."""
    torch.manual_seed(2)
    built = SparseOctree.from_points(torch.rand(400, 3) * 1.8 - 0.9, 2, 5)
    tables = {lv: (built.codes[lv].clone(), built.corners[lv].clone(), built.vertex_keys[lv].clone()) for lv in built.levels}
    given = SparseOctree(tables[5][0], 2, 5, tables=tables)
    for lv in built.levels:
        assert torch.equal(given.codes[lv], built.codes[lv])
        assert torch.equal(given.corners[lv], built.corners[lv])
        assert torch.equal(given.vertex_keys[lv], built.vertex_keys[lv])
        assert given.num_vertices(lv) == built.num_vertices(lv)
    with pytest.raises(ValueError, match="tables cover levels"):
        SparseOctree(tables[5][0], 3, 5, tables=tables)
    with pytest.raises(ValueError, match="finest_codes itself"):
        SparseOctree(tables[5][0].clone(), 2, 5, tables=tables)
    bad = {**tables, 4: (tables[4][0], tables[4][1][:-1], tables[4][2])}
    with pytest.raises(ValueError, match="level 4"):
        SparseOctree(bad[5][0], 2, 5, tables=bad)


@pytest.mark.parametrize("dense_table", [True, False])  # a table of level L - 1's keys, or a sorted search
def test_coarser_vertices_is_floor_half_brute_force(monkeypatch, dense_table):
    """Every vertex's coarser vertex sits at floor(v / 2), far-face vertices (coordinate 2^L) included."""
    import vqad.octree as O

    if not dense_table:
        monkeypatch.setattr(O, "DENSE_TABLE_MAX_LEVEL", -1)
    torch.manual_seed(1)
    octree = SparseOctree.from_points(torch.rand(3000, 3) * 2 - 1, 2, 5)
    assert int(octree.vertices[5].max()) == 32  # the far faces are there
    for L in (3, 4, 5):
        up = octree.coarser_vertices(L)
        assert up.dtype == torch.long
        assert torch.equal(octree.vertices[L - 1][up], octree.vertices[L] // 2)
        assert torch.equal(octree.vertex_keys[L], morton_encode(octree.vertices[L], bits=L + 1))


def test_dilation_one_axis_at_a_time_equals_the_cube_of_shifts():
    """dilate_codes against the brute force: every cell shifted by each of the (2d+1)^3 offsets, clamped
    to the grid, cells on the borders included."""
    from vqad.octree import dilate_codes, morton_decode, morton_encode

    g = torch.Generator().manual_seed(0)
    for level, d in ((3, 1), (4, 2), (4, 3), (5, 1)):
        res = 1 << level
        ijk = torch.randint(0, res, (40, 3), generator=g)
        ijk[:4] = torch.tensor([[0, 0, 0], [res - 1, res - 1, res - 1], [0, res - 1, 3 % res], [res - 1, 0, 0]])
        codes = torch.unique(morton_encode(ijk, bits=level))
        r = torch.arange(-d, d + 1)
        offs = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
        cells = morton_decode(codes, bits=level)
        brute = torch.unique(torch.cat([morton_encode((cells + o).clamp(0, res - 1), bits=level) for o in offs]))
        assert torch.equal(dilate_codes(codes, level, d), brute), (level, d)
