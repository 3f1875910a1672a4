"""Baseline storages: low rank, post-hoc k-means (a baked codebook), hash; references, round trips, CLI."""

import json
import math

import numpy as np
import pytest
import torch
import trimesh

import vqad
from vqad.posthoc import posthoc
from vqad.storages.hash import HashStorage, spatial_hash
from vqad.storages.codebook import CodebookStorage
from vqad.storages.kmeans import codebook_from_dense, kmeans, kmeans_plus_plus
from vqad.storages.lowrank import LowRankStorage, pca
from vqad import fileformat as F
from vqad.checkpoint import load_checkpoint, save_checkpoint
from vqad.app.cli import main
from vqad.config import DecoderConfig, GridConfig
from vqad.errors import InputError
from vqad.sdf.field import SDFField
from vqad.grid import OctreeGrid
from vqad.octree import SparseOctree
from vqad.storages import STORAGES, make_storage
from vqad.storages.dense import DenseStorage

from test_fileformat import outputs  # the same probe of a field's outputs


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def shell_octree(levels=(2, 4), n_points=400, seed=0):
    """Octree of points on a sphere: the structure of a real surface."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n_points, 3, generator=g)
    return SparseOctree.from_points(0.7 * p / p.norm(dim=1, keepdim=True), *levels, dilate=0)


def dense_field(k=6, levels=(2, 4), kind="sdf", seed=0):
    """An SDF (or radiance) field with a dense grid whose features are far from zero ('trained')."""
    torch.manual_seed(seed)
    octree = shell_octree(levels)
    grid = OctreeGrid.from_octree(octree, GridConfig("dense", k, 4, *levels))
    if kind == "sdf":
        field = SDFField(grid, DecoderConfig(hidden=16))
    else:
        from vqad.nerf.field import NeRFConfig, NeRFField

        field = NeRFField(grid, DecoderConfig(hidden=16), NeRFConfig(geo_features=3, color_hidden=8, sh_degree=1))
    for s in field.grid.storages:
        # correlated features (a few strong directions plus noise), like a trained grid's
        mix = torch.randn(k, k) * torch.linspace(1.0, 0.05, k)[:, None]
        s.Z.data = torch.randn(s.m, k) @ mix
    return field


def baseline_field(name, kind="sdf"):
    """A baked field of each baseline: post-hoc from a dense field, or trained-form hash / low rank."""
    if name in ("kmeans", "lowrank-posthoc"):
        dense = dense_field(kind=kind)
        return posthoc(dense, "kmeans", bits=3) if name == "kmeans" else posthoc(dense, "lowrank", rank=2)
    torch.manual_seed(1)
    storage, extra = {"hash": ("hash", {"table_bits": 7}), "lowrank": ("lowrank", {"rank": 3})}[name]
    grid = OctreeGrid.from_octree(shell_octree(), GridConfig(storage, 6, 4, 2, 4, **extra))
    for s in grid.storages:  # features that matter to the output
        for p in s.parameters():
            p.data.normal_(0, 0.5)
    if kind == "sdf":
        field = SDFField(grid, DecoderConfig(hidden=16))
    else:
        from vqad.nerf.field import NeRFConfig, NeRFField

        field = NeRFField(grid, DecoderConfig(hidden=16), NeRFConfig(geo_features=3, color_hidden=8, sh_degree=1))
    field.bake(fp16=True)
    return field


def assert_same_outputs(a, b):
    x = torch.rand(2000, 3, generator=torch.Generator().manual_seed(3)) * 2 - 1
    assert a.lods == b.lods and type(a.grid.storages[0]) is type(b.grid.storages[0])
    for lod in a.lods:
        ta, tb = a.grid.storage(lod).export_tensors(), b.grid.storage(lod).export_tensors()
        assert ta.keys() == tb.keys() and all(torch.equal(ta[n], tb[n]) for n in ta)
        oa, ob = outputs(a, x, lod), outputs(b, x, lod)
        assert oa.abs().sum() > 0
        assert torch.equal(oa, ob), f"LOD {lod}: outputs differ"


BASELINES = ["kmeans", "lowrank-posthoc", "lowrank", "hash"]


# -- registration and round trips ---------------------------------------------------------------------
def test_registered_and_configurable():
    assert {"lowrank", "hash"} <= set(STORAGES) and "kmeans" not in STORAGES  # k-means makes a baked codebook
    GridConfig(storage="hash", table_bits=10).validate()
    GridConfig(storage="lowrank", features=8, rank=4).validate()
    GridConfig(storage="lowrank", features=8).validate()  # r = k // 2
    verts = shell_octree().vertices[3]
    s = make_storage("hash", verts.shape[0], 4, bits=9, rank=2, table_bits=5, vertices=verts)
    assert isinstance(s, HashStorage) and s.params() == {"table_bits": 5}
    s = make_storage("lowrank", 10, 4, bits=9, rank=3, table_bits=5, vertices=verts)
    assert isinstance(s, LowRankStorage) and s.params() == {"rank": 3}
    assert make_storage("lowrank", 10, 8).r == 4  # default r = k // 2


@pytest.mark.parametrize("kind", ["sdf", "nerf"])
@pytest.mark.parametrize("name", BASELINES)
def test_round_trip_checkpoint_and_file(tmp_path, name, kind):
    field = baseline_field(name, kind)
    assert field.baked
    for entropy in (False, True):
        back = F.load(F.to_bytes(field, entropy=entropy))
        assert_same_outputs(field, back)
    path = tmp_path / "m.vqad"
    F.save(field, path)
    assert_same_outputs(field, vqad.load(path))
    save_checkpoint(tmp_path / "ckpt", field)
    back, cfg = load_checkpoint(tmp_path / "ckpt")
    assert cfg["storage_params"] == [s.params() for s in field.grid.storages]
    assert_same_outputs(field, back)
    # every prefix LOD decodes to what the full model gives at that LOD (hash: indices from the prefix octree)
    sizes = F.lod_prefix_sizes(path)
    coarse = F.load(path, max_bytes=sizes[3])
    assert coarse.lods == [2, 3]
    x = torch.rand(500, 3, generator=torch.Generator().manual_seed(5)) * 2 - 1
    assert torch.equal(outputs(coarse, x, 3), outputs(field, x, 3))


def test_hash_training_checkpoint_resumes_with_recomputed_indices(tmp_path):
    """An unbaked hash grid is saved in its training form (table only) and rebuilt from the octree."""
    torch.manual_seed(0)
    grid = OctreeGrid.from_octree(shell_octree(), GridConfig("hash", 4, 4, 2, 4, table_bits=6))
    field = SDFField(grid, DecoderConfig(hidden=8))
    save_checkpoint(tmp_path / "ck", field)
    back, _ = load_checkpoint(tmp_path / "ck")
    assert not back.baked
    for a, b in zip(field.grid.storages, back.grid.storages):
        assert torch.equal(a.h, b.h) and torch.equal(a.table, b.table)
    x = torch.rand(300, 3) * 2 - 1
    field.eval(), back.eval()
    assert torch.equal(outputs(field, x, 4), outputs(back, x, 4))


@pytest.mark.parametrize("name", BASELINES)
def test_stored_bits_equal_layout_and_formula(name):
    field = baseline_field(name)
    for s in field.grid.storages:
        layout = type(s).stored_layout(s.m, s.k, **s.params())
        assert [lay.name for lay in layout] == list(s.export_tensors())
        assert sum(lay.stored_bits() for lay in layout) == s.stored_bits()
        m, k = s.m, s.k
        expected = {
            CodebookStorage: lambda: m * s.b + 16 * k * (1 << s.b),
            LowRankStorage: lambda: 16 * (m * s.r + s.r * k + k),
            HashStorage: lambda: 16 * k * (1 << s.T),
        }[type(s)]()
        assert s.stored_bits() == expected
    # the file's grid chunks are exactly those bits (rounded up to bytes per chunk)
    info = F.read_info(F.to_bytes(field))
    for lv in info.levels:
        assert lv.formula_bytes == field.grid.storage(lv.level).stored_bits() / 8
        assert 0 <= lv.grid_raw_bytes - lv.formula_bytes < len(layout)


# -- k-means against numpy ---------------------------------------------------------------------------
def numpy_lloyd(x, init, iters):
    """Plain Lloyd's algorithm: assign to the nearest centroid, move centroids to the means (empty: stay)."""
    c = init.copy()

    def assign(c):
        return ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)

    labels = assign(c)
    for _ in range(iters):
        for j in range(len(c)):
            if (labels == j).any():
                c[j] = x[labels == j].mean(0)
        new = assign(c)
        if (new == labels).all():
            break
        labels = new
    return c, labels, float(((x - c[labels]) ** 2).sum())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kmeans_matches_numpy_lloyd(dtype):
    g = torch.Generator().manual_seed(0)
    blobs = torch.randn(6, 3, generator=g, dtype=torch.float64) * 3
    x = (blobs[torch.randint(0, 6, (400,), generator=g)] + torch.randn(400, 3, generator=g, dtype=torch.float64)).to(dtype)
    init = kmeans_plus_plus(x, 8, seed=4)
    res = kmeans(x, 8, seed=4, iters=100, chunk_elements=64)  # tiny chunks: the chunked path is exercised
    c_ref, labels_ref, inertia_ref = numpy_lloyd(x.double().numpy(), init.double().numpy(), 100)
    assert res.converged and res.iterations > 1
    assert np.array_equal(res.labels.numpy(), labels_ref)
    np.testing.assert_allclose(res.centroids.double().numpy(), c_ref, rtol=1e-5, atol=1e-5)
    assert math.isclose(res.inertia, inertia_ref, rel_tol=1e-6)
    # the labels are each row's nearest centroid and the inertia their squared distances
    d = ((x.double()[:, None] - res.centroids.double()[None]) ** 2).sum(-1)
    assert torch.equal(d.argmin(1), res.labels)
    assert math.isclose(float(d.min(1).values.sum()), res.inertia, rel_tol=1e-9)


def test_kmeans_plus_plus_is_deterministic_and_handles_few_rows():
    x = torch.randn(200, 4, generator=torch.Generator().manual_seed(1))
    a, b, c = kmeans_plus_plus(x, 16, seed=3), kmeans_plus_plus(x, 16, seed=3), kmeans_plus_plus(x, 16, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    rows = {tuple(r) for r in x.tolist()}
    assert all(tuple(r) in rows for r in a.tolist()) and len({tuple(r) for r in a.tolist()}) == 16
    # m < K: every row becomes a centroid, the rest repeat one of them; k-means is then exact
    few = x[:5]
    init = kmeans_plus_plus(few, 16, seed=0)
    assert {tuple(r) for r in init.tolist()} == {tuple(r) for r in few.tolist()}
    res = kmeans(few, 16, seed=0)
    assert res.inertia == 0.0 and torch.equal(res.centroids[res.labels], few)
    # duplicated rows: fewer distinct rows than K
    dup = x[:3].repeat(10, 1)
    res = kmeans(dup, 8, seed=0)
    assert res.inertia == 0.0 and len(set(res.labels.tolist())) == 3


def test_kmeans_codebook_from_dense():
    torch.manual_seed(0)
    dense = DenseStorage(300, 4)
    dense.Z.data = torch.randn(300, 4)
    s1, s2 = codebook_from_dense(dense, 3, seed=7), codebook_from_dense(dense, 3, seed=7)
    assert torch.equal(s1.D, s2.D) and torch.equal(s1.V, s2.V)  # deterministic given the seed
    assert s1.kind == "codebook" and s1.params() == {"bits": 3}  # the one stored form D[V]
    assert s1.baked and s1.D.shape == (8, 4) and s1.V.shape == (300,) and int(s1.V.max()) < 8
    assert torch.equal(s1.D, s1.D.half().float())  # stored in fp16 ...
    d = ((dense.Z.detach()[:, None] - s1.D[None]) ** 2).sum(-1)
    assert torch.equal(s1.V, d.argmin(1))  # ... and V is optimal for the stored codebook
    ids = torch.randint(0, 300, (10, 8))
    assert torch.equal(s1(ids), s1.D[s1.V[ids]])
    # m < 2^b: every vertex gets its own (fp16) centroid, the error is that of fp16 rounding only
    small = DenseStorage(5, 4)
    small.Z.data = torch.randn(5, 4).half().float()
    s = codebook_from_dense(small, 4)
    assert s.reconstruction_error == 0.0 and torch.equal(s(torch.arange(5)), small.Z.detach())


# -- low rank against numpy SVD ------------------------------------------------------------------------
def test_pca_matches_numpy_svd():
    x = dense_field(k=6).grid.storages[1].Z.detach().double()
    Zc = (x - x.mean(0)).numpy()
    U, S, Vt = np.linalg.svd(Zc, full_matrices=False)
    for r in (1, 3, 5):
        A, Bm, mean = pca(x, r)
        assert A.shape == (x.shape[0], r) and Bm.shape == (r, 6) and mean.shape == (6,)
        recon = (A @ Bm + mean).numpy()
        ref = (U[:, :r] * S[:r]) @ Vt[:r] + x.mean(0).numpy()
        np.testing.assert_allclose(recon, ref, atol=1e-9)
        err = float(((recon - x.numpy()) ** 2).sum())
        assert math.isclose(err, float((S[r:] ** 2).sum()), rel_tol=1e-9)
        np.testing.assert_allclose(np.abs(Bm.numpy()), np.abs(Vt[:r]), atol=1e-9)  # same basis up to sign
        np.testing.assert_allclose((Bm @ Bm.T).numpy(), np.eye(r), atol=1e-12)


def test_lowrank_from_dense_fp16():
    dense = dense_field(k=6).grid.storages[2]
    Z = dense.Z.detach().double()
    S = np.linalg.svd((Z - Z.mean(0)).numpy(), compute_uv=False)
    for r in (2, 4):
        s = LowRankStorage.from_dense(dense, r)
        assert s.baked and s.params() == {"rank": r}
        for t in (s.A, s.B, s.mean):
            assert torch.equal(t, t.half().float())
        ids = torch.arange(s.m)
        err = float(((s(ids).double() - Z) ** 2).sum())
        optimum = float((S[r:] ** 2).sum())
        assert optimum <= err <= optimum * 1.001 + 1e-6 * float((Z ** 2).sum())  # fp16 costs almost nothing
        assert math.isclose(s.reconstruction_error, err / float((Z ** 2).sum()), rel_tol=1e-4)


def test_lowrank_trains_with_sparse_coefficients():
    torch.manual_seed(0)
    s = LowRankStorage(50, 6, rank=2)
    ids = torch.randint(0, 25, (30, 8))
    s(ids).pow(2).sum().backward()
    assert s.A.grad.is_sparse and s.B.grad is not None and s.mean.grad is not None
    g = s.A.grad.to_dense()
    assert g[25:].abs().sum() == 0 and g[:25].abs().sum() > 0
    assert s.sparse_parameters() == [s.A]


# -- hash ----------------------------------------------------------------------------------------------
def test_spatial_hash_is_instant_ngp():
    g = torch.Generator().manual_seed(0)
    xyz = torch.randint(0, 1 << 16, (1000, 3), generator=g)
    a = xyz.numpy().astype(np.uint32)
    ref = (a[:, 0] * np.uint32(1)) ^ (a[:, 1] * np.uint32(2654435761)) ^ (a[:, 2] * np.uint32(805459861))  # wraps mod 2^32
    for T in (1, 10, 19, 24):
        assert np.array_equal(spatial_hash(xyz, T).numpy(), (ref & np.uint32((1 << T) - 1)).astype(np.int64))
    assert spatial_hash(torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0]]), 8).tolist() == [0, 1, 177]


def test_hash_is_deterministic_and_spreads_vertices():
    octree = shell_octree(levels=(2, 7), n_points=20000)
    verts = octree.vertices[7]
    n = verts.shape[0]
    for T in (12, 14, 16):
        M = 1 << T
        s1 = HashStorage.create(n, 2, table_bits=T, vertices=verts)
        s2 = HashStorage.create(n, 2, table_bits=T, vertices=verts.clone())
        assert torch.equal(s1.h, s2.h) and int(s1.h.min()) >= 0 and int(s1.h.max()) < M
        counts = torch.bincount(s1.h, minlength=M).double()
        lam = n / M
        occupied = float((counts > 0).double().mean())
        expected = 1 - (1 - 1 / M) ** n  # occupancy of uniformly random indices
        assert abs(occupied - expected) < 0.02, (T, occupied, expected)
        chi2 = float(((counts - lam) ** 2 / lam).sum()) / M  # ≈ 1 for uniform
        assert 0.85 < chi2 < 1.2, (T, chi2)
        # no large collision clusters: the fullest row holds no more than a Poisson tail allows
        assert counts.max() <= lam + 6 * math.sqrt(lam) + 4, (T, counts.max(), lam)
    # a vertex's row depends on its position only, not on which other cells are occupied
    other = shell_octree(levels=(2, 7), n_points=5000, seed=9).vertices[7]
    h_all = spatial_hash(verts, 12)
    h_other = spatial_hash(other, 12)
    codes = {tuple(v): int(h) for v, h in zip(verts.tolist(), h_all.tolist())}
    shared = [(tuple(v), int(h)) for v, h in zip(other.tolist(), h_other.tolist()) if tuple(v) in codes]
    assert len(shared) > 100 and all(codes[v] == h for v, h in shared)


def test_hash_table_larger_than_vertices_still_hashes():
    octree = shell_octree(levels=(2, 3), n_points=100)
    verts = octree.vertices[3]
    s = HashStorage.create(verts.shape[0], 4, table_bits=16, vertices=verts)  # 2^16 rows >> m
    assert s.stored_bits() > s.dense_fp16_bits()
    assert torch.equal(s.h, spatial_hash(verts, 16))
    ids = torch.arange(s.m)
    assert torch.equal(s(ids), s.table[s.h].detach())


def test_hash_trains_with_sparse_adam():
    from vqad import fit as T
    from vqad.optim import make_optimizers

    torch.manual_seed(0)
    grid = OctreeGrid.from_octree(shell_octree(), GridConfig("hash", 4, 4, 2, 4, table_bits=8))
    field = SDFField(grid, DecoderConfig(hidden=8))
    opts = make_optimizers(field, 1e-2, 10.0)
    assert "sparse" in opts and {id(p) for p in opts["sparse"].param_groups[0]["params"]} == {id(s.table) for s in grid.storages}
    before = [s.table.detach().clone() for s in grid.storages]
    x = torch.rand(256, 3) * 1.6 - 0.8
    T.zero_grad(opts)
    (field.all_lods(x) - (x.norm(dim=1) - 0.7)).pow(2).mean(1).sum().backward()
    assert all(s.table.grad.is_sparse for s in grid.storages)
    touched = grid.storages[-1].table.grad.coalesce().indices()[0]
    T.step(opts)
    after = grid.storages[-1].table.detach()
    changed = (after != before[-1]).any(dim=1)
    assert changed.any() and set(torch.nonzero(changed)[:, 0].tolist()) <= set(touched.tolist())


# -- bad parameters ------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, needle", [
    (lambda: GridConfig(storage="lowrank", features=4, rank=4).validate(), "rank"),
    (lambda: GridConfig(storage="lowrank", features=4, rank=0).validate(), "rank"),
    (lambda: LowRankStorage(10, 4, rank=7), "rank"),
    (lambda: LowRankStorage(10, 1), "k >= 2"),
    (lambda: LowRankStorage.stored_layout(10, 4, rank=4), "rank"),
    (lambda: GridConfig(storage="hash", table_bits=0).validate(), "table_bits"),
    (lambda: GridConfig(storage="hash", table_bits=25).validate(), "table_bits"),
    (lambda: HashStorage.stored_layout(10, 4, table_bits=30), "table_bits"),
    (lambda: spatial_hash(torch.zeros(2, 3, dtype=torch.long), 0), "table_bits"),
    (lambda: HashStorage.create(5, 4, table_bits=8), "vertices"),
    (lambda: HashStorage.create(5, 4, table_bits=8, vertices=torch.zeros(4, 3, dtype=torch.long)), "vertices"),
    (lambda: make_storage("kmeans", 10, 4, bits=4), "vqad compress"),
    (lambda: OctreeGrid.from_octree(shell_octree(), GridConfig("kmeans", 4, 4, 2, 4)), "post"),
    (lambda: CodebookStorage.stored_layout(10, 4, bits=13), "bits"),
    (lambda: posthoc(baseline_field("hash"), "kmeans", bits=4), "dense"),
    (lambda: posthoc(dense_field(), "lowrank"), "rank"),
    (lambda: posthoc(dense_field(), "lowrank", rank=6), "rank"),
    (lambda: posthoc(dense_field(), "kmeans", bits=0), "bits"),
    (lambda: posthoc(dense_field(), "kmeans", rank=2), "rank"),
    (lambda: posthoc(dense_field(), "hash"), "post-hoc"),
    (lambda: codebook_from_dense(LowRankStorage(10, 4), 3), "dense"),
])
def test_bad_parameters(make, needle):
    with pytest.raises(InputError, match=needle):
        make()


def test_posthoc_keeps_the_decoder_and_the_source():
    dense = dense_field()
    before = {k: v.clone() for k, v in dense.decoder_state().items()}
    rng = torch.random.get_rng_state()
    new = posthoc(dense, "kmeans", bits=2, fp16=False)
    assert torch.equal(rng, torch.random.get_rng_state())  # the caller's RNG is left alone
    assert new.grid.cfg.storage == "codebook" and new.grid.cfg.bits == 2 and new.baked
    assert dense.grid.cfg.storage == "dense" and not dense.baked
    state = new.decoder_state()
    assert all(torch.equal(state[k], before[k]) for k in before)  # fp16=False: not even rounded
    # the features of the new grid are the centroids of the old ones: outputs differ, vertices agree
    x = torch.rand(300, 3) * 1.6 - 0.8
    s_old, s_new = dense.grid.storages[-1], new.grid.storages[-1]
    ids = torch.arange(s_old.m)
    with torch.no_grad():
        assert torch.equal(s_new(ids), s_new.D[s_new.V])
        err = float(((s_new(ids) - s_old.Z) ** 2).sum() / (s_old.Z ** 2).sum())
    assert math.isclose(err, s_new.reconstruction_error, rel_tol=1e-5) and 0 < err < 1
    assert outputs(new, x, 4).shape == (300,)



def test_old_kmeans_files_and_checkpoints_load_as_codebooks(tmp_path):
    """Files and checkpoints written when k-means was a storage kind of its own ("kmeans") hold
    exactly a baked codebook's D and V: they load as one."""
    field = baseline_field("kmeans")
    assert field.grid.cfg.storage == "codebook"
    field.grid.cfg.storage = "kmeans"  # what older vqad wrote, byte for byte otherwise
    old = F.to_bytes(field)
    assert b'"storage":"kmeans"' in old
    field.grid.cfg.storage = "codebook"
    back = F.load(old)
    assert back.grid.cfg.storage == "codebook" and F.read_info(old).config["grid"]["storage"] == "codebook"
    assert_same_outputs(field, back)
    save_checkpoint(tmp_path / "ck", field)
    cfg_path = tmp_path / "ck" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["grid"]["storage"] = "kmeans"
    cfg_path.write_text(json.dumps(cfg))
    back, _ = load_checkpoint(tmp_path / "ck")
    assert back.grid.cfg.storage == "codebook"
    assert_same_outputs(field, back)

# -- CLI -----------------------------------------------------------------------------------------------
@pytest.fixture
def sphere(tmp_path):
    p = tmp_path / "sphere.obj"
    trimesh.creation.icosphere(subdivisions=2, radius=0.5).export(p)
    return p


def test_cli_fit_hash_compress_and_export(tmp_path, capsys, sphere):
    common = ["--levels", "2:4", "--features", "4", "--steps", "4", "--batch", "512", "--no-eval", "--quiet", "--device", "cpu"]
    assert main(["fit-sdf", str(sphere), "--grid", "hash", "--table-bits", "7", "--out", str(tmp_path / "h"), *common]) == 0
    cfg = json.loads((tmp_path / "h" / "checkpoint" / "config.json").read_text())
    assert cfg["grid"]["storage"] == "hash" and cfg["storage_params"] == [{"table_bits": 7}] * 3
    assert main(["export", str(tmp_path / "h" / "checkpoint"), "-o", str(tmp_path / "h.vqad")]) == 0
    assert main(["info", str(tmp_path / "h.vqad")]) == 0
    assert "storage hash, k=4, T=7" in capsys.readouterr().out

    save_checkpoint(tmp_path / "dense", dense_field(k=4))  # a "trained" dense model (fit-sdf --grid dense writes the same)
    for to, extra in (("kmeans", ["--bits", "3"]), ("lowrank", ["--rank", "2"])):
        out = tmp_path / to
        assert main(["compress", str(tmp_path / "dense"), "--to", to, *extra, "--out", str(out)]) == 0
        assert "relative feature error" in capsys.readouterr().out
        field, cfg = load_checkpoint(out)
        stored = {"kmeans": "codebook"}.get(to, to)  # k-means is stored as a baked codebook
        assert cfg["baked"] and cfg["grid"]["storage"] == stored and cfg["posthoc"]["kind"] == to
        assert main(["export", str(out), "-o", str(tmp_path / f"{to}.vqad"), "--entropy"]) == 0
        assert_same_outputs(field, vqad.load(tmp_path / f"{to}.vqad"))
    capsys.readouterr()


def test_a_checkpoint_never_replaces_a_folder_of_other_files(tmp_path, capsys, sphere, monkeypatch):
    """compress --out, a fit's OUT/checkpoint and save_checkpoint itself refuse a folder holding anything but a
    checkpoint's files (a save replaces the whole folder: the user's files, a whole fit, `--out .` were deleted),
    before any work; a checkpoint's tensors get the permissions of its config.json, not safetensors' 0600."""
    import os
    import stat

    save_checkpoint(tmp_path / "dense", dense_field(k=4))
    mode = stat.S_IMODE(os.stat(tmp_path / "dense" / "config.json").st_mode)
    assert {stat.S_IMODE(os.stat(f).st_mode) for f in (tmp_path / "dense").iterdir()} == {mode}
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep")
    (mine / "sub" / "data.bin").write_text("keep")
    compress = ["compress", str(tmp_path / "dense"), "--to", "lowrank", "--rank", "2", "--out"]
    assert main(compress + [str(mine)]) == 2
    assert "holds files that are not a checkpoint's (notes.txt, sub)" in capsys.readouterr().err
    monkeypatch.chdir(mine)
    assert main(compress + ["."]) == 2 and "not a checkpoint's" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep" and (mine / "sub" / "data.bin").read_text() == "keep"
    with pytest.raises(InputError, match="not a checkpoint's"):
        save_checkpoint(mine, dense_field(k=4))
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt", "sub"]
    assert main(compress + [str(tmp_path / "c")]) == 0 and main(compress + [str(tmp_path / "c")]) == 0  # its own: replaced
    fit = tmp_path / "fit"
    (fit / "checkpoint").mkdir(parents=True)
    (fit / "checkpoint" / "model.vqad").write_text("an export put beside the tensors")
    argv = ["fit-sdf", str(sphere), "--levels", "2:4", "--steps", "2", "--batch", "512", "--no-eval", "--quiet",
            "--out", str(fit)]
    capsys.readouterr()
    assert main(argv) == 2 and "not a checkpoint's (model.vqad)" in capsys.readouterr().err
    assert (fit / "checkpoint" / "model.vqad").is_file()
    (fit / "checkpoint" / "model.vqad").unlink()
    (fit / "checkpoint").rmdir()
    (fit / "checkpoint").write_text("a file")
    assert main(argv) == 2 and "is a file, not a checkpoint folder" in capsys.readouterr().err


def test_export_writes_a_vqad_beside_the_checkpoint_and_says_when_the_fit_is_unfinished(tmp_path, capsys):
    ck = tmp_path / "ck"
    save_checkpoint(ck, dense_field(k=4), extra={"step": 5, "train": {"steps": 10}})
    for out, needle in ((tmp_path / "e.ply", "unsupported file type '.ply'"), (tmp_path / "e", "file type '(none)'"),
                        (ck / "model.safetensors", "unsupported file type"), (ck / "m.vqad", "is inside the checkpoint")):
        assert main(["export", str(ck), "-o", str(out)]) == 2 and needle in capsys.readouterr().err, out
    assert sorted(p.name for p in ck.iterdir()) == ["config.json", "model.safetensors"]
    assert main(["export", str(ck), "-o", str(tmp_path / "m.vqad")]) == 0
    assert "interrupted at step 5 of the 10 it asked" in capsys.readouterr().err
    for extra, warned in (({"step": 5, "train": {"steps": 10}, "time_capped": True}, False),
                          ({"step": 10, "train": {"steps": 10}}, False),
                          ({"step": 10, "train": {"steps": 10}, "after_training": "pending"}, True)):
        save_checkpoint(ck, dense_field(k=4), extra=extra)
        assert main(["export", str(ck), "-o", str(tmp_path / "m.vqad")]) == 0
        assert ("warning" in capsys.readouterr().err) == warned, extra


@pytest.mark.parametrize("argv, needle", [
    (["fit-sdf", "MESH", "--grid", "codebook", "--table-bits", "8"], "--table-bits"),
    (["fit-sdf", "MESH", "--grid", "hash", "--table-bits", "30"], "table_bits"),
    (["fit-nerf", "procedural", "--grid", "dense", "--table-bits", "8"], "--table-bits"),
    (["compress", "CKPT", "--to", "lowrank"], "needs --rank R"),
    (["compress", "CKPT", "--to", "lowrank", "--rank", "2", "--iters", "6", "--seed", "3"], "--seed, --iters apply to"),
    (["compress", "CKPT", "--to", "lowrank", "--rank", "2", "--bits", "4"], "--bits applies to --to kmeans"),
    (["compress", "CKPT", "--to", "kmeans", "--rank", "2"], "--rank"),
    (["compress", "CKPT", "--to", "kmeans"], "dense"),  # the checkpoint holds a hash grid
])
def test_cli_bad_baseline_arguments(tmp_path, capsys, sphere, argv, needle):
    if "CKPT" in argv:
        save_checkpoint(tmp_path / "ck", baseline_field("hash"))
    out = tmp_path / "out"
    argv = [{"MESH": str(sphere), "CKPT": str(tmp_path / "ck")}.get(a, a) for a in argv]
    assert main([*argv, "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vqad: error:") and needle in err[0], err
    assert not out.exists()
