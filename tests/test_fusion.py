"""Sparse TSDF fusion (vqad.tsdf.fusion) against analytic scenes, brute force and Open3D."""

import struct
import zlib

import numpy as np
import pytest
import torch

from vqad.errors import InputError
from vqad.tsdf import fusion
from vqad.tsdf.fusion import FusedTSDF, default_voxel, from_dense, fuse
from vqad.tsdf.rgbd import RGBDSequence
from vqad.tsdf.synth import look_at_cv
from conftest import need_open3d


# -- analytic scenes, rendered by ray casting in numpy -----------------------------------------


def intrinsics(W, H, f):
    return np.array([[f, 0, (W - 1) / 2], [0, f, (H - 1) / 2], [0, 0, 1.0]])


def rays(K, W, H):
    """``(H, W, 3)`` camera rays through the pixel centres, z = 1."""
    u, v = np.meshgrid(np.arange(W, dtype=np.float64), np.arange(H, dtype=np.float64))
    return np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1)


def look_at(eye, target=(0.0, 0.0, 0.0)):
    """Camera-to-world pose (OpenCV axes) at ``eye`` looking at ``target``, world y up in the image."""
    return look_at_cv(eye, target, up=(0.0, -1.0, 0.0))  # x = z × (0, -1, 0)


def sphere_depth(K, W, H, pose, center=(0.0, 0.0, 0.0), radius=0.1):
    """``(H, W) float32`` z-depth of a sphere, 0 where the ray misses it."""
    d = rays(K, W, H) @ pose[:3, :3].T
    o = pose[:3, 3] - np.asarray(center)
    a = (d * d).sum(-1)
    b = 2 * (d * o).sum(-1)
    disc = b * b - 4 * a * (o @ o - radius ** 2)
    t = (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a)  # along d, whose z in the camera is 1: t is z-depth
    return np.where(disc > 0, t, 0).astype(np.float32)


def sphere_seq(n=4, W=48, H=36, f=60.0, dist=0.35, radius=0.1, noise=0.0, color=False, seed=0):
    K = intrinsics(W, H, f)
    angles = np.linspace(0, 2 * np.pi, n, endpoint=False)
    # the small offsets keep voxel centres off exact pixel boundaries (ties that float rounding breaks)
    poses = np.stack([look_at([dist * np.cos(a) + 0.0013, 0.05 * np.sin(2 * a) + 0.0021, dist * np.sin(a) + 0.0007],
                              (0.0011, -0.0017, 0.0005)) for a in angles])
    rng = np.random.default_rng(seed)
    depths = []
    for p in poses:
        d = sphere_depth(K, W, H, p, radius=radius)
        if noise:
            d = np.where(d > 0, d + rng.normal(0, noise, d.shape), 0).astype(np.float32)
        depths.append(d)
    load_color = (lambda i: np.full((H, W, 3), (10 * i, 100, 200), np.uint8)) if color else None
    return RGBDSequence("sphere", K, poses, W, H, lambda i: depths[i], load_color)


def wall_seq(W=40, H=30, f=50.0, z=1.0):
    K = intrinsics(W, H, f)
    return RGBDSequence("wall", K, np.eye(4)[None], W, H, lambda i: np.full((H, W), z, np.float32))


# -- fusion -------------------------------------------------------------------------------------


def test_wall_tsdf_is_one_minus_z(one_thread):
    seq = wall_seq()
    t = fuse(seq, voxel=0.01, trunc=0.04, device="cpu")
    c = t.centers()
    assert t.units == "m" and t.block == 8 and t.color is None
    # every observed voxel is in front of or within trunc behind the wall, and inside the frustum
    assert c[:, 2].max() <= 1.0 + 0.04 + 1e-9
    np.testing.assert_allclose(t.tsdf, np.clip(1.0 - c[:, 2], -0.04, 0.04), atol=1e-5)
    assert (t.weight == 1).all()
    # voxels right at the wall within a voxel, the band fully allocated near the optical axis
    near_axis = (np.abs(c[:, 0]) < 0.1) & (np.abs(c[:, 1]) < 0.1)
    z_near = np.unique(np.round(c[near_axis, 2], 4))
    assert np.all(np.isin(np.round(np.arange(0.965, 1.04, 0.01), 4), z_near))
    m = t.mesh()
    assert len(m.faces) > 0
    np.testing.assert_allclose(m.vertices[:, 2], 1.0, atol=1e-5)


def test_sphere_mesh_on_surface(one_thread):
    seq = sphere_seq(n=6)
    t = fuse(seq, voxel=0.004, device="cpu")
    assert t.trunc == pytest.approx(fusion.TRUNC_VOXELS * 0.004)
    m = t.mesh()
    assert len(m.faces) > 500
    r = np.linalg.norm(m.vertices, axis=1)
    assert np.abs(r - 0.1).max() < 0.004  # within a voxel, noise-free
    tri = m.vertices[m.faces]
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    assert ((normals * tri.mean(1)).sum(1) > 0).mean() > 0.99  # outwards, towards positive TSDF
    # the sample() field agrees: zero on the surface, +/- a voxel outside/inside
    dirs = m.vertices[:200] / r[:200, None]
    for off, sign in ((0.0, 0), (0.004, 1), (-0.004, -1)):
        vals, ok = t.sample(dirs * (0.1 + off))
        assert ok.mean() > 0.9
        if sign == 0:  # projective distances: a pixel's depth stands for its whole footprint
            assert np.quantile(np.abs(vals[ok]), 0.95) < 0.004 and np.abs(vals[ok]).max() < 0.008
        else:
            assert (np.sign(vals[ok]) == sign).mean() > 0.95


def test_sphere_with_noise(one_thread):
    sigma = 0.002
    t = fuse(sphere_seq(n=6, noise=sigma), voxel=0.004, device="cpu")
    r = np.linalg.norm(t.mesh().vertices, axis=1)
    # averaging over frames shrinks the noise; bound by the single-frame 3 sigma plus a voxel
    assert np.abs(r - 0.1).mean() < sigma
    assert np.quantile(np.abs(r - 0.1), 0.99) < 3 * sigma + 0.004


def test_colour_average(one_thread):
    seq = sphere_seq(n=3, color=True)
    t = fuse(seq, voxel=0.005, device="cpu")
    assert t.color is not None and t.color.shape == (len(t), 3)
    assert (t.color[:, 1] == 100).all() and (t.color[:, 2] == 200).all()
    # red is 0, 10, 20 by frame: each voxel has the mean over the frames that saw it
    assert set(np.unique(t.color[:, 0])) <= {0, 5, 10, 15, 20}
    assert (t.color[t.weight == 1, 0] % 10 == 0).all() and set(np.unique(t.color[t.weight == 2, 0])) <= {5, 10, 15}


def test_block_size_does_not_change_values(one_thread):
    seq = sphere_seq(n=3)
    a = fuse(seq, voxel=0.005, device="cpu", block=8)
    b = fuse(seq, voxel=0.005, device="cpu", block=3)
    # the allocated band may differ at its edges; the common voxels agree exactly
    ka, kb = fusion._pack(a.ijk), fusion._pack(b.ijk)
    common, ia, ib = np.intersect1d(ka, kb, return_indices=True)
    assert len(common) > 0.9 * min(len(ka), len(kb))
    # a voxel allocated one frame later under one block size misses that frame's free-space update
    same = a.weight[ia] == b.weight[ib]
    assert same.mean() > 0.99
    np.testing.assert_allclose(a.tsdf[ia][same], b.tsdf[ib][same], atol=1e-6)


def test_default_voxel_and_trunc(one_thread):
    seq = wall_seq(z=2.56)
    assert default_voxel(seq) == pytest.approx(2.56 / fusion.VOXELS_PER_MEDIAN_DEPTH)
    t = fuse(seq, device="cpu")
    assert t.voxel == pytest.approx(0.01) and t.trunc == pytest.approx(0.04)


def test_max_depth_and_frames(one_thread):
    seq = sphere_seq(n=4)
    with pytest.raises(InputError, match="no voxel"):
        fuse(seq, voxel=0.005, max_depth=0.1)
    one = fuse(seq, voxel=0.005, frames=[2], device="cpu")
    assert (one.weight == 1).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(voxel=0.0), "voxel must be"),
    (dict(voxel=-0.01), "voxel must be"),
    (dict(voxel=float("nan")), "voxel must be"),
    (dict(voxel=float("inf")), "voxel must be"),
    (dict(voxel="a"), "must be numbers"),
    (dict(voxel=0.01, trunc=0.005), "at least one voxel"),
    (dict(voxel=0.01, trunc=float("inf")), "at least one voxel"),
    (dict(voxel=0.01, block=0), "block must be"),
    (dict(voxel=0.01, block=17), "block must be"),
    (dict(voxel=0.01, block=True), "block must be"),
    (dict(voxel=0.01, frames=[]), "frames is empty"),
    (dict(voxel=0.01, frames=[5]), "not a frame index"),
    (dict(voxel=0.01, frames=[0.5]), "not a frame index"),
    (dict(voxel=0.01, max_depth=-1), "max_depth"),
    (dict(voxel=0.01, max_depth=float("nan")), "max_depth"),
    (dict(voxel=0.01, device="nonsense"), "unknown device"),
    (dict(voxel=1e-9), "larger voxel"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(InputError, match=match):
        fuse(wall_seq(W=8, H=6), **kwargs)


def test_no_valid_depth():
    K = intrinsics(8, 6, 10.0)
    seq = RGBDSequence("empty", K, np.eye(4)[None], 8, 6, lambda i: np.zeros((6, 8), np.float32))
    with pytest.raises(InputError, match="no valid depth"):
        fuse(seq)
    with pytest.raises(InputError, match="no voxel"):
        fuse(seq, voxel=0.01)
    bad = RGBDSequence("bad", K, np.eye(4)[None], 8, 6, lambda i: np.ones((5, 8), np.float32))
    with pytest.raises(InputError, match="depth must be a \\(6, 8\\) array of numbers, got ndarray float32 \\[5, 8\\]"):
        fuse(bad, voxel=0.01)
    with pytest.raises(InputError, match="non-finite"):  # a sequence checks its poses when it is built
        RGBDSequence("nan", K, np.full((1, 4, 4), np.nan), 8, 6, lambda i: np.ones((6, 8), np.float32))


# -- Open3D ------------------------------------------------------------------------------------


def test_agrees_with_open3d_uniform_volume(one_thread):
    o3d = need_open3d("no reference to compare with")
    # narrow field of view: Open3D's sdf is along the ray (our z-difference × sqrt(1 + x'² + y'²));
    # here that factor is below 1 + 2e-3, so both conventions agree to 2e-3 × trunc
    W, H, f = 32, 24, 300.0
    K = intrinsics(W, H, f)
    poses = np.stack([look_at([0.6 * np.cos(a), 0.1, 0.6 * np.sin(a)]) for a in (0.0, 0.4, 0.8)])
    depths = [sphere_depth(K, W, H, p) for p in poses]
    seq = RGBDSequence("sphere", K, poses, W, H, lambda i: depths[i])
    vox, tr, res = 0.005, 0.02, 64
    ours = fuse(seq, voxel=vox, trunc=tr, device="cpu")
    vol = o3d.pipelines.integration.UniformTSDFVolume(
        length=res * vox, resolution=res, sdf_trunc=tr,
        color_type=o3d.pipelines.integration.TSDFVolumeColorType.NoColor, origin=np.full(3, -res / 2 * vox))
    intr = o3d.camera.PinholeCameraIntrinsic(W, H, K[0, 0], K[1, 1], K[0, 2], K[1, 2])
    for i in range(len(seq)):
        rgbd = o3d.geometry.RGBDImage.create_from_color_and_depth(
            o3d.geometry.Image(np.zeros((H, W, 3), np.uint8)), o3d.geometry.Image(depths[i]),
            depth_scale=1.0, depth_trunc=10.0, convert_rgb_to_intensity=False)
        vol.integrate(rgbd, intr, np.linalg.inv(poses[i]))  # Open3D wants world-to-camera
    ref = np.asarray(vol.extract_volume_tsdf()).reshape(res, res, res, 2)  # [tsdf / trunc, weight], x-major
    idx = ours.ijk + res // 2
    inside = np.all((idx >= 0) & (idx < res), 1)
    assert inside.mean() > 0.99
    o_t, o_w = ref[tuple(idx[inside].T)].T
    t, w = ours.tsdf[inside], ours.weight[inside]
    seen = o_w > 0
    assert seen.mean() > 0.99  # Open3D observes (almost) every voxel we do; it also carves more free space
    same = seen & (o_w == w)
    assert same.mean() > 0.99  # weights differ only where a voxel projects onto the image border
    ray_factor = np.sqrt(1 + ((W / 2) / f) ** 2 + ((H / 2) / f) ** 2)
    np.testing.assert_allclose(t[same], o_t[same] * tr, atol=(ray_factor - 1) * tr + 2e-6)


# -- the stored form ---------------------------------------------------------------------------


def tiny(block=2, color=False):
    ijk = np.array([[0, 0, 0], [1, 1, 0], [-1, 0, 1]])
    col = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]]) if color else None
    return FusedTSDF(0.5, 1.0, "m", ijk, [0.25, -0.5, 1.0], [1, 2, 3], col, block)


def test_byte_count_by_hand():
    # header 28 + units 1 + crc 4; two blocks ((0,0,0) and (-1,0,0)) of 12 bytes of coordinates and a
    # 1-byte mask (2³ bits); 3 voxels × (fp16 tsdf + fp16 weight) [+ 3 bytes colour]
    assert tiny().nbytes() == 28 + 1 + 4 + 2 * (12 + 1) + 3 * 4 == 71
    assert tiny(color=True).nbytes(color=True) == 71 + 9
    assert tiny(color=True).nbytes() == 71  # colour only when asked for
    assert tiny(block=8).nbytes() == 28 + 1 + 4 + 2 * (12 + 64) + 12
    assert tiny(block=3).nbytes() == 28 + 1 + 4 + 2 * (12 + 4) + 12  # 27 bits → 4 bytes


def test_round_trip_exact(tmp_path, one_thread):
    t = fuse(sphere_seq(n=3, color=True), voxel=0.005, device="cpu")
    data = t.to_bytes(color=True)
    u = FusedTSDF.from_bytes(data)
    assert u.to_bytes(color=True) == data
    np.testing.assert_array_equal(u.ijk, t.ijk)  # fuse gives the canonical order
    np.testing.assert_array_equal(u.tsdf, t.tsdf.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(u.weight, t.weight.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(u.color, t.color)
    assert (u.voxel, u.trunc, u.units, u.block) == (t.voxel, t.trunc, t.units, t.block)
    assert FusedTSDF.from_bytes(t.to_bytes()).color is None
    path = tmp_path / "scene.tsdf"
    assert t.save(path) == len(data) == t.nbytes(color=True)
    assert FusedTSDF.load(path).to_bytes(color=True) == data
    # a non-canonical order stores the same bytes
    perm = np.random.default_rng(0).permutation(len(t))
    shuffled = FusedTSDF(t.voxel, t.trunc, t.units, t.ijk[perm], t.tsdf[perm], t.weight[perm], t.color[perm], t.block)
    assert shuffled.to_bytes(color=True) == data


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def test_damaged_bytes_raise(tmp_path):
    data = tiny(color=True).to_bytes(color=True)
    for pos in range(len(data)):  # any flipped byte: CRC (or magic) catches it
        bad = bytearray(data)
        bad[pos] ^= 0x40
        with pytest.raises(InputError):
            FusedTSDF.from_bytes(bytes(bad))
    for n in (0, 10, 40, len(data) - 1):
        with pytest.raises(InputError):
            FusedTSDF.from_bytes(data[:n])
    body = data[:-4]
    # consistent CRC, impossible contents: each must still be refused
    head = fusion._HEAD.size + 1
    cases = {
        "trunc": body[:4 + 4 + 8] + struct.pack("<d", 0.1) + body[24:],  # trunc < voxel
        "version": body[:4] + bytes([9]) + body[5:],
        "flags": body[:5] + bytes([3]) + body[6:],
        "block": body[:6] + bytes([0]) + body[7:],
        "blocks": body[:24] + struct.pack("<I", 1000) + body[28:],
        "mask": body[:head + 24] + bytes([0]) + body[head + 25:],  # first block's mask emptied
        "order": body[:head] + body[head + 12:head + 24] + body[head:head + 12] + body[head + 24:],
        "value": body[:head + 26] + np.float16(np.inf).tobytes() + body[head + 28:],
        "weight": body[:head + 26 + 6] + np.float16(0).tobytes() + body[head + 26 + 8:],
        "extra": body + b"\0",
        "units": body[:fusion._HEAD.size] + b"k" + body[head:],  # a name no reader writes (one byte, as "m")
    }
    for name, b in cases.items():
        with pytest.raises(InputError):
            FusedTSDF.from_bytes(_with_crc(b))
    with pytest.raises(InputError, match="fused TSDF is in units 'k', which vqad does not know \\(m, mm, cm, scene\\)"):
        FusedTSDF.from_bytes(_with_crc(cases["units"]))
    (tmp_path / "bad.tsdf").write_bytes(b"nonsense")
    with pytest.raises(InputError, match="bad.tsdf"):
        FusedTSDF.load(tmp_path / "bad.tsdf")
    with pytest.raises(InputError, match="not found"):
        FusedTSDF.load(tmp_path / "missing.tsdf")


@pytest.mark.parametrize("tsdf, weight", [([2.0], [1]), ([np.nan], [1]), ([0.0], [0]), ([0.0], [-1]), ([0.0], [np.inf])])
def test_constructor_checks_values(tsdf, weight):
    with pytest.raises(InputError):
        FusedTSDF(0.5, 1.0, "m", [[0, 0, 0]], tsdf, weight)


@pytest.mark.parametrize("units", ["km", "", None, 1])
def test_constructor_checks_units(units):
    with pytest.raises(InputError, match="units must be one of"):
        FusedTSDF(0.5, 1.0, units, [[0, 0, 0]], [0.0], [1])


def test_duplicate_voxels_refused():
    t = FusedTSDF(0.5, 1.0, "m", [[0, 0, 0], [0, 0, 0]], [0, 0], [1, 1])
    with pytest.raises(InputError, match="twice"):
        t.to_bytes()


# -- queries -----------------------------------------------------------------------------------


def test_sample_against_brute_force_trilinear():
    rng = np.random.default_rng(1)
    X, Y, Z = 7, 6, 5
    vals = rng.uniform(-1, 1, (X, Y, Z)).astype(np.float32)
    w = (rng.uniform(size=(X, Y, Z)) > 0.15).astype(np.float32)
    origin = np.array([-3, 2, -1])
    t = from_dense(vals, w, voxel=0.1, trunc=1.0, origin=origin, block=4)
    pts = (rng.uniform(-1, [X, Y, Z], (400, 3)) + origin + 0.5) * 0.1
    got, ok = t.sample(pts)
    for p, g, o in zip(pts, got, ok):
        q = p / 0.1 - 0.5 - origin
        i0 = np.floor(q).astype(int)
        fr = q - i0
        acc, all_seen = 0.0, True
        for corner in np.ndindex(2, 2, 2):
            c = i0 + corner
            if np.any(c < 0) or np.any(c >= (X, Y, Z)) or w[tuple(c)] == 0:
                all_seen = False
                continue
            acc += np.prod(np.where(corner, fr, 1 - fr)) * vals[tuple(c)]
        assert o == all_seen
        if o:
            assert g == pytest.approx(acc, abs=1e-5)
        else:
            assert g == 0
    # at voxel centres sample() returns the stored values
    got, ok = t.sample(t.centers())
    np.testing.assert_allclose(got[ok], t.tsdf[ok], atol=1e-6)
    _, ok = t.sample(np.array([[np.nan, 0, 0], [1e9, 0, 0], [-1e300, 0, 0]]))
    assert not ok.any()


def test_mesh_only_over_observed_cubes(monkeypatch):
    # a plane x = 2.3 voxels through a 12³ block of voxels with a hole of unobserved voxels
    n = 12
    i = np.arange(n)
    vals = np.broadcast_to((i[:, None, None] - 2.3) * 0.1, (n, n, n)).astype(np.float32)
    w = np.ones((n, n, n), np.float32)
    w[:, 4:7, 5:8] = 0
    t = from_dense(vals, w, voxel=0.1, trunc=1.0, origin=(-5, 0, 3))
    m = t.mesh()
    assert len(m.faces)
    np.testing.assert_allclose(m.vertices[:, 0], (-5 + 2.3 + 0.5) * 0.1, atol=1e-6)
    observed = set(map(tuple, t.ijk.tolist()))
    g = m.vertices / 0.1 - 0.5  # voxel index units
    for face in m.faces:
        p = g[face]
        lo = np.floor(p.min(0) + 1e-9).astype(int)
        # the face's cube: its corners must all be observed (a face on a cube's upper face may
        # belong to the cube below, so try both where the minimum is a whole number)
        options = [[c] if abs(p.min(0)[a] - c) > 1e-9 else [c, c - 1] for a, c in enumerate(lo)]
        assert any(
            all(tuple(np.array(o) + corner) in observed for corner in np.ndindex(2, 2, 2))
            for o in np.array(np.meshgrid(*options, indexing="ij")).reshape(3, -1).T
        )
    # tiles: a tile smaller than the scene merges its seams into the same mesh
    monkeypatch.setattr(fusion, "MESH_TILE", 4)
    m4 = t.mesh()
    assert len(m4.faces) == len(m.faces) and len(m4.vertices) == len(m.vertices)
    np.testing.assert_allclose(np.sort(m4.vertices, axis=0), np.sort(m.vertices, axis=0), atol=1e-6)
    with pytest.raises(InputError, match="level"):
        t.mesh(level=2.0)


def test_mesh_empty_without_crossing():
    t = from_dense(np.ones((4, 4, 4)), np.ones((4, 4, 4)), voxel=0.1, trunc=1.0)
    m = t.mesh()
    assert m.vertices.shape == (0, 3) and m.faces.shape == (0, 3)


# -- devices -----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU"))])
def test_devices_agree(device, one_thread):
    seq = sphere_seq(n=3, color=True)
    ref = fuse(seq, voxel=0.005, device="cpu")
    got = fuse(seq, voxel=0.005, device=device)
    np.testing.assert_array_equal(got.ijk, ref.ijk)
    np.testing.assert_allclose(got.tsdf, ref.tsdf, atol=1e-5)
    np.testing.assert_array_equal(got.weight, ref.weight)
    assert np.abs(got.color.astype(int) - ref.color).max() <= 1


def test_stored_weight_capped_at_fp16_max():
    t = FusedTSDF(0.5, 1.0, "m", [[0, 0, 0]], [0.5], [1e6])
    assert FusedTSDF.from_bytes(t.to_bytes()).weight[0] == np.finfo(np.float16).max
    with pytest.raises(InputError, match="fp16"):
        FusedTSDF(1.0, 1e5, "mm", [[0, 0, 0]], [0.5], [1]).to_bytes()


def test_the_block_table_stops_at_the_memory_limit_and_the_band_is_allocated_in_chunks(monkeypatch, one_thread):
    """Found by a hostile pass: a fine voxel on noisy depth grew the block table without bound (8.5 GB asked), and
    the allocation pass built pixels × band samples points at once (3 GB for a megapixel frame)."""
    seq = sphere_seq(n=2)
    ref = fuse(seq, voxel=0.01, device="cpu")
    monkeypatch.setattr(fusion, "_CHUNK_VOXELS", 64)  # a few pixels at a time: the same blocks, the same voxels
    small = fuse(seq, voxel=0.01, device="cpu")
    assert small.to_bytes() == ref.to_bytes()
    monkeypatch.setenv("VQAD_MAX_MEMORY", "1M")
    with pytest.raises(InputError, match=r"would need .* GiB to grow, more than the limit .*VQAD_MAX_MEMORY.*larger --voxel"):
        fuse(seq, voxel=0.002, device="cpu")


def test_the_api_refuses_what_it_used_to_wrap_or_truncate():
    """Found by a hostile pass: float colour 300 became 44 and 0.5 became 0, ijk 2^40 became 0 and 0.7 became 0,
    voxel=True fused at 1.0; and a depth loader returning a string, frames=0, points of shape (2,) were tracebacks."""
    K = intrinsics(8, 6, 10.0)
    wall = np.ones((6, 8), np.float32)
    for colour in (np.full((6, 8, 3), 300.0), np.full((6, 8, 3), 0.5)):
        seq = RGBDSequence("c", K, np.eye(4)[None], 8, 6, lambda i: wall, lambda i, c=colour: c)
        with pytest.raises(InputError, match="colour must be a \\(6, 8, 3\\) array of whole numbers in 0..255"):
            fuse(seq, voxel=0.1)
    with pytest.raises(InputError, match="depth must be a \\(6, 8\\) array of numbers, got str"):
        fuse(RGBDSequence("s", K, np.eye(4)[None], 8, 6, lambda i: "abc"), voxel=0.1)
    seq = RGBDSequence("w", K, np.eye(4)[None], 8, 6, lambda i: wall)
    for bad, words in ((dict(voxel=True), "must be numbers"), (dict(voxel=0.1, frames=0), "frames must be a list")):
        with pytest.raises(InputError, match=words):
            fuse(seq, **bad)
    with pytest.raises(InputError, match="image size 200000×6 must be whole numbers of pixels in 1..65536"):
        RGBDSequence("big", K, np.eye(4)[None], 200_000, 6, lambda i: wall)
    with pytest.raises(InputError, match="2\\^20 voxels"):
        FusedTSDF(0.5, 1.0, "m", np.full((1, 3), 2 ** 40), [0.0], [1.0])
    with pytest.raises(InputError, match="whole voxel indices, got float64 values such as 0.7"):
        FusedTSDF(0.5, 1.0, "m", np.full((1, 3), 0.7), [0.0], [1.0])
    with pytest.raises(InputError, match="must have the shape \\(M, 3\\), got \\[2, 2\\]"):
        FusedTSDF(0.5, 1.0, "m", np.zeros((2, 2)), [0.0, 0.0], [1.0, 1.0])
    assert FusedTSDF(0.5, 1.0, "m", np.zeros((1, 3)), [0.0], [1.0]).ijk.dtype == np.int32  # whole floats are indices
    with pytest.raises(InputError, match="colour must be a \\(1, 3\\) array of whole numbers in 0..255"):
        FusedTSDF(0.5, 1.0, "m", [[0, 0, 0]], [0.0], [1.0], color=[[300, 0, 0]])
    assert FusedTSDF(0.5, 1.0, "m", [0, 0, 0], [0.0], [1.0], color=np.array([[7, 0, 0]], np.int64)).color.dtype == np.uint8
    # what a loader may give: a tensor or a list of depth, colour of whole numbers in another integer type
    import torch

    seq = RGBDSequence("t", K, np.eye(4)[None], 8.0, np.int64(6), lambda i: torch.ones(6, 8),
                       lambda i: np.full((6, 8, 3), 200, np.int64))
    assert seq.width == 8 and seq.depth(0).shape == (6, 8) and seq.color(0).dtype == np.uint8
    assert len(fuse(seq, voxel=0.1)) > 0
    t = FusedTSDF(0.5, 1.0, "m", [[0, 0, 0]], [0.0], [1.0])
    for pts in ([1, 2], "abc", np.zeros((2, 4))):
        with pytest.raises(InputError, match="takes world points of shape \\(N, 3\\)"):
            t.sample(pts)
