"""Dataset readers, scene normalisation, camera rays and the built-in procedural scene.

Blender and LLFF run on the real data in ``shared/data`` when it is present (skipped otherwise), and
also on small fixtures written here, so the readers are tested without the data. There is no real
RTMV or instant-ngp scene available offline: those readers are tested **only on fixtures** that these
tests write (rendered from the procedural scene, in each format's documented layout).
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch
from PIL import Image

from vqad.errors import InputError
from vqad.field import Normalization
from vqad.nerf.data import SceneDataset
from vqad.nerf.formats import detect_format, load_dataset
from vqad.nerf.formats.common import downscale_depth, linear_to_srgb, near_far_from_box, normalization_from_box, srgb_to_linear, unit_cube_box
from vqad.nerf.procedural import ProceduralConfig, ProceduralScene, procedural_dataset, render_views, sphere_cameras
from vqad.nerf.lens import distort, undistort
from vqad.nerf.rays import backproject, camera_directions, camera_rays, pixel_centers, rays_for_pixels


# -- fixtures ----------------------------------------------------------------------------------------
def _scene_views(n: int = 6, res: int = 24, fov_deg: float = 45.0, radius: float = 3.0):
    """Ground truth rendered from the procedural scene: Views plus the exact ray distances ``(n, H, W)``."""
    scene = ProceduralScene()
    c2w = sphere_cameras(n, radius, phase=0.4)
    f = 0.5 * res / math.tan(math.radians(fov_deg) / 2)
    intr = torch.tensor([[f, f, res / 2, res / 2]]).expand(n, 4).contiguous()
    views = render_views(scene, c2w, intr, res, res, background=(0.0, 0.0, 0.0))
    uv = pixel_centers(res, res)
    t = []
    for i in range(n):
        o, d = rays_for_pixels(c2w[i], intr[i], uv)
        ti, _, hit = scene.raycast(o, d)
        t.append(torch.where(hit, ti, torch.zeros_like(ti)).reshape(res, res))
    return scene, views, torch.stack(t)


def _write_png_rgba(path, rgb: np.ndarray, alpha: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate([rgb, alpha[..., None]], -1), "RGBA").save(path)


def _write_blender(root, views, splits=("train", "val"), counts=None, angle=True):
    """A NeRF-synthetic folder: transforms_<split>.json + <split>/r_i.png (RGBA, alpha = mask)."""
    counts = counts or {"train": 4, "val": 2, "test": 2}
    start = 0
    for split in splits:
        frames = []
        for k in range(counts[split]):
            i = start + k
            _write_png_rgba(root / split / f"r_{k}.png", views.images[i].numpy(), views.masks[i].numpy())
            frames.append({"file_path": f"./{split}/r_{k}", "transform_matrix": views.c2w[i].tolist()})
        start += counts[split]
        w = views.hw[1]
        fx = float(views.intrinsics[0, 0])
        meta = {"camera_angle_x": 2 * math.atan(0.5 * w / fx), "frames": frames}
        (root / f"transforms_{split}.json").write_text(json.dumps(meta))
    return root


def _write_exr(path, channels: dict) -> None:
    import OpenEXR

    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
    OpenEXR.File(header, {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in channels.items()}).write(str(path))


def _write_rtmv(root, views, ray_t, depth=True):
    """An RTMV scene folder in RTMV's layout: NNNNN.exr (linear RGBA, straight alpha),
    NNNNN.depth.exr (distance along the ray; background = 1e10) and NNNNN.json with camera_data
    (cam2world stored transposed, translation in the last row)."""
    root.mkdir(parents=True, exist_ok=True)
    h, w = views.hw
    for i in range(len(views)):
        mask = views.masks[i].numpy() > 0
        lin = srgb_to_linear(views.images[i].numpy().astype(np.float32) / 255.0) * mask[..., None]
        rgba = np.concatenate([lin, mask[..., None].astype(np.float32)], -1)
        _write_exr(root / f"{i:05d}.exr", {"RGBA": rgba})
        if depth:
            t = np.where(mask, ray_t[i].numpy(), 1e10).astype(np.float32)
            _write_exr(root / f"{i:05d}.depth.exr", {"R": t, "G": t, "B": t})
        fx, fy, cx, cy = views.intrinsics[i].tolist()
        cam = {"cam2world": views.c2w[i].double().numpy().T.tolist(),
               "intrinsics": {"fx": fx, "fy": fy, "cx": cx, "cy": cy},
               "width": w, "height": h,
               "scene_min_3d_box": [-1.0, -1.0, -1.0], "scene_max_3d_box": [1.0, 1.0, 1.0]}
        (root / f"{i:05d}.json").write_text(json.dumps({"camera_data": cam, "objects": []}))
    return root


def _write_llff(root, n=9, h=12, w=16, factor=2, full_f=40.0):
    """A tiny LLFF capture: forward-facing cameras on a line, images in images_<factor>/."""
    root.mkdir(parents=True)
    rows = []
    for i in range(n):
        c2w_gl = np.eye(4)
        c2w_gl[:3, 3] = [0.1 * i, 0.0, 0.0]
        right, up, back = c2w_gl[:3, 0], c2w_gl[:3, 1], c2w_gl[:3, 2]
        P = np.stack([-up, right, back, c2w_gl[:3, 3], [h * factor, w * factor, full_f]], axis=1)  # [down right back t hwf]
        rows.append(np.concatenate([P.reshape(-1), [2.0, 10.0]]))
    np.save(root / "poses_bounds.npy", np.stack(rows))
    d = root / f"images_{factor}"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"IMG_{i:03d}.png")
    return root


# -- rays --------------------------------------------------------------------------------------------
def _random_pose(gen) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.det(q))
    m = torch.eye(4, dtype=torch.float64)
    m[:3, :3], m[:3, 3] = q, torch.randn(3, generator=gen, dtype=torch.float64)
    return m


def test_principal_point_ray_looks_down_minus_z():
    gen = torch.Generator().manual_seed(0)
    for dist in (None, torch.tensor([-0.2, 0.05, 0.01, -0.02])):
        c2w = _random_pose(gen).float()
        K = torch.tensor([80.0, 90.0, 31.5, 20.25])
        o, d = rays_for_pixels(c2w, K, torch.tensor([[31.5, 20.25]]), dist)
        assert torch.allclose(d[0], -c2w[:3, 2], atol=1e-6)
        assert torch.allclose(o[0], c2w[:3, 3])


def test_rays_follow_opengl_pixel_convention():
    K = torch.tensor([10.0, 10.0, 2.0, 2.0])  # a 4×4 image
    uv = pixel_centers(4, 4)
    assert uv[0].tolist() == [0.5, 0.5] and uv[5].tolist() == [1.5, 1.5]
    _, d = rays_for_pixels(torch.eye(4), K, uv)
    assert torch.allclose(d.norm(dim=-1), torch.ones(16))
    assert d[0, 0] < 0 and d[0, 1] > 0  # top-left pixel: left (−x) and up (+y)
    assert d[15, 0] > 0 and d[15, 1] < 0  # bottom-right: right and down


def test_undistortion_inverts_distortion():
    gen = torch.Generator().manual_seed(1)
    xy = torch.rand(2000, 2, generator=gen) * 1.2 - 0.6
    dist = torch.tensor([-0.28, 0.09, 0.002, -0.0015])
    back = undistort(distort(xy, dist), dist)
    assert (back - xy).abs().max() < 1e-5
    # a distorted pixel's ray, projected through the distortion model, lands on that pixel
    K = torch.tensor([100.0, 110.0, 64.0, 48.0])
    uv = torch.rand(500, 2, generator=gen) * torch.tensor([128.0, 96.0])
    dirs = camera_directions(K, uv, dist)
    xy_u = torch.stack([dirs[:, 0], -dirs[:, 1]], -1)  # z = −1 → normalised coordinates
    xy_d = distort(xy_u, dist)
    assert torch.allclose(xy_d[:, 0] * K[0] + K[2], uv[:, 0], atol=1e-3)
    assert torch.allclose(xy_d[:, 1] * K[1] + K[3], uv[:, 1], atol=1e-3)


def test_backproject_and_camera_rays_agree():
    _, views, ray_t = _scene_views(n=3, res=16)
    o, d = camera_rays(views, [0, 2])
    assert o.shape == (2 * 256, 3)
    z = views.depth[2].float().reshape(-1)
    x = backproject(views.c2w[2], views.intrinsics[2], pixel_centers(16, 16), z)
    t = ray_t[2].reshape(-1)
    hit = z > 0
    assert torch.allclose(x[hit], (o[256:] + d[256:] * t[:, None])[hit], atol=5e-3)


# -- procedural scene -----------------------------------------------------------------------------------
def test_procedural_scene_is_fast_deterministic_and_complete():
    t0 = time.perf_counter()
    ds = load_dataset("procedural")
    elapsed = time.perf_counter() - t0
    assert elapsed < 2.0, f"the built-in scene took {elapsed:.2f}s to generate"
    assert isinstance(ds, SceneDataset) and ds.format == "procedural"
    assert {s: len(v) for s, v in ds.splits.items()} == {"train": 40, "val": 5, "test": 10}
    tr = ds.splits["train"]
    assert tr.images.dtype == torch.uint8 and tr.images.shape == (40, 64, 64, 3)
    assert tr.depth.dtype == torch.float16 and tr.masks.dtype == torch.uint8
    again = load_dataset("builtin:procedural")
    assert torch.equal(again.splits["test"].images, ds.splits["test"].images)
    # held-out cameras are new viewpoints
    cams = lambda s: ds.splits[s].c2w[:, :3, 3]  # noqa: E731
    assert torch.cdist(cams("test"), cams("train")).min() > 0.05
    # every split sees foreground and background; masks and depth agree
    for v in ds.splits.values():
        fg = v.masks > 0
        assert torch.equal(fg, v.depth > 0)
        assert 0.1 < fg.float().mean() < 0.8
        assert (v.images[~fg] == 255).all()  # white background
    # near / far bound every depth
    z = tr.depth[tr.depth > 0].float()
    assert ds.near <= z.min() and z.max() <= ds.far


def test_procedural_depth_lies_on_the_shapes():
    """A point o + d·t, with t from the stored z-depth, is on the surface of one analytic shape."""
    ds = procedural_dataset(ProceduralConfig(resolution=48, n_train=12, n_val=1, n_test=1))
    scene = ProceduralScene()
    tr = ds.splits["train"]
    h, w = tr.hw
    uv = pixel_centers(h, w)
    worst = 0.0
    for i in range(len(tr)):
        z = tr.depth[i].float().reshape(-1)
        hit = z > 0
        o, d = rays_for_pixels(tr.c2w[i], tr.intrinsics[i], uv)
        t = z * camera_directions(tr.intrinsics[i], uv).norm(dim=-1)  # z-depth → ray distance
        p = (o + d * t[:, None])[hit]
        on_surface = torch.stack([s.sdf(p) for s in scene.shapes]).abs().amin(0)
        worst = max(worst, float(on_surface.max()))
        # rays of background pixels miss every shape
        _, _, rc_hit = scene.raycast(o[~hit], d[~hit])
        assert not rc_hit.any()
    assert worst < 5e-3, f"a depth point is {worst:.4f} off the surface"
    # the unit cube holds the whole object, the cameras are outside it
    lo, hi = scene.bounds()
    corners = torch.stack([lo, hi])
    assert (ds.normalization.to_unit(corners).abs() < 1).all()
    assert (ds.normalization.to_unit(tr.c2w[:, :3, 3]).abs().amax(-1) > 1).all()


def test_procedural_downscale_and_split_limit():
    ds = load_dataset("procedural", downscale=2, split_limit={"train": 7}, background=(0.0, 0.0, 0.0))
    assert ds.splits["train"].hw == (32, 32) and len(ds.splits["train"]) == 7 and len(ds.splits["test"]) == 10
    full = load_dataset("procedural", split_limit=1)
    assert torch.allclose(ds.splits["train"].intrinsics[0] * 2, full.splits["train"].intrinsics[0])
    # a factor beyond the image is refused as for a capture's images (it gave a 1-pixel scene)
    with pytest.raises(InputError, match="--downscale 65 is larger than the image"):
        load_dataset("procedural", downscale=65)
    with pytest.raises(InputError, match=r"--downscale must be an integer in 1\.\.1024"):
        load_dataset("procedural", downscale=5000)


def test_a_model_fitted_at_a_large_downscale_keeps_a_record_that_loads():
    """Any --downscale a capture accepts is a valid record of the model (records refused 65 and above, so a
    model of 4000-pixel photos fitted at --downscale 100 could not be loaded)."""
    from vqad.nerf.data import MAX_DOWNSCALE, check_dataset_info

    assert check_dataset_info({"downscale": 100})["downscale"] == 100
    assert check_dataset_info({"downscale": MAX_DOWNSCALE})["downscale"] == MAX_DOWNSCALE
    with pytest.raises(InputError, match="downscale must be in"):
        check_dataset_info({"downscale": MAX_DOWNSCALE + 1})


# -- normalisation -----------------------------------------------------------------------------------------
def test_normalization_round_trip_and_box():
    lo, hi = np.array([-2.0, 0.5, 1.0]), np.array([4.0, 1.5, 2.0])
    norm = normalization_from_box(lo, hi)
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(1000, 3, generator=gen, dtype=torch.float64) * 10 - 5
    assert torch.allclose(norm.to_world(norm.to_unit(x)), x, atol=1e-12)
    u = norm.to_unit(torch.tensor(np.stack([lo, hi])))
    assert torch.allclose(u[:, 0], torch.tensor([-1.0, 1.0], dtype=torch.float64))  # the long axis spans the cube
    assert (u.abs() <= 1 + 1e-12).all()
    back = Normalization.from_dict(norm.to_dict())
    assert back == norm
    blo, bhi = unit_cube_box(norm)
    assert torch.allclose(norm.to_unit(blo), -torch.ones(3, dtype=torch.float64))
    with pytest.raises(InputError):
        normalization_from_box([0, 0, 0], [0, 0, 0])


def test_near_far_bound_the_box():
    cams = sphere_cameras(10, 4.0)
    near, far = near_far_from_box(cams, [-1, -1, -1], [1, 1, 1])
    assert 4.0 - math.sqrt(3) - 1e-6 <= near <= 3.0 + 1e-6 and 5.0 - 1e-6 <= far <= 4.0 + math.sqrt(3) + 1e-6


# -- blender --------------------------------------------------------------------------------------------
def test_blender_fixture_composites_alpha_and_falls_back_to_val(tmp_path):
    _, views, _ = _scene_views(n=6, res=24)
    root = _write_blender(tmp_path / "scene", views)
    assert detect_format(root) == "blender"
    ds = load_dataset(root, background=(0.0, 0.0, 1.0))
    assert ds.format == "blender" and len(ds.splits["train"]) == 4 and len(ds.splits["val"]) == 2
    assert ds.splits["test"] is ds.splits["val"]
    assert "no transforms_test.json" in ds.split_sources["test"]
    tr = ds.splits["train"]
    fg = views.masks[:4] > 0
    assert torch.equal(tr.masks, views.masks[:4])
    assert torch.equal(tr.images[fg], views.images[:4][fg])
    assert (tr.images[~fg] == torch.tensor([0, 0, 255], dtype=torch.uint8)).all()
    assert torch.allclose(tr.c2w, views.c2w[:4])
    assert torch.allclose(tr.intrinsics, views.intrinsics[:4], rtol=1e-5)
    assert ds.normalization.center == (0.0, 0.0, 0.0) and ds.normalization.scale == pytest.approx(1 / 1.5)


def test_blender_fixture_downscale_is_an_area_average(tmp_path):
    _, views, _ = _scene_views(n=6, res=24)
    root = _write_blender(tmp_path / "scene", views)
    bg = np.array([0.2, 0.4, 0.6])
    ds = load_dataset(root, downscale=2, background=tuple(bg))
    tr = ds.splits["train"]
    assert tr.hw == (12, 12)
    assert torch.allclose(tr.intrinsics, views.intrinsics[:4] / 2, rtol=1e-5)
    rgb = views.images[:4].numpy().astype(np.float64) / 255
    a = views.masks[:4].numpy().astype(np.float64)[..., None] / 255
    prem = (rgb * a).reshape(4, 12, 2, 12, 2, 3).mean((2, 4))
    abar = a.reshape(4, 12, 2, 12, 2, 1).mean((2, 4))
    expected = (prem + bg * (1 - abar)) * 255
    assert np.abs(tr.images.numpy() - expected).max() <= 2.0
    assert np.abs(tr.masks.numpy() - abar[..., 0] * 255).max() <= 1.0


def test_blender_real_lego(data_dir):
    root = data_dir / "nerf_synthetic" / "lego"
    if not root.is_dir():
        pytest.skip(f"{root} not found")
    ds = load_dataset(root, downscale=8, split_limit=3)
    assert ds.format == "blender"
    tr = ds.splits["train"]
    assert tr.images.shape == (3, 100, 100, 3) and tr.masks is not None and tr.depth is None
    assert ds.splits["test"] is ds.splits["val"] and "test = val" in ds.split_sources["test"]
    meta = json.loads((root / "transforms_train.json").read_text())
    fx = 0.5 * 800 / math.tan(0.5 * meta["camera_angle_x"]) / 8
    assert torch.allclose(tr.intrinsics[0], torch.tensor([fx, fx, 50.0, 50.0]), rtol=1e-5)
    assert torch.allclose(tr.c2w[1], torch.tensor(meta["frames"][1]["transform_matrix"]), atol=1e-6)
    # the object is inside the [-1.5, 1.5]^3 box: every camera's principal ray passes near the origin
    o, d = tr.c2w[:, :3, 3], -tr.c2w[:, :3, 2]
    closest = o + d * (-(o * d).sum(-1, keepdim=True))
    assert closest.norm(dim=-1).max() < 1.0
    fg = tr.masks > 127
    assert 0.05 < fg.float().mean() < 0.6 and (tr.images[~(tr.masks > 0)] == 255).all()


# -- instant-ngp -------------------------------------------------------------------------------------
def test_ngp_fixture_intrinsics_distortion_aabb(tmp_path):
    """instant-ngp transforms.json written by the test (no real ngp scene is available offline)."""
    _, views, _ = _scene_views(n=10, res=24)
    root = tmp_path / "ngp"
    (root / "images").mkdir(parents=True)
    frames = []
    for i in range(10):
        ext = ".png" if i % 2 else ""  # file_path with and without extension
        Image.fromarray(views.images[i].numpy()).save(root / "images" / f"f{i}.png")
        fr = {"file_path": f"images/f{i}{ext}", "transform_matrix": views.c2w[i].tolist()}
        if i == 3:
            fr.update({"fl_x": 20.0, "fl_y": 21.0, "cx": 11.0, "cy": 13.0})  # per-frame intrinsics
        frames.append(fr)
    meta = {"fl_x": 48.0, "fl_y": 50.0, "cx": 23.0, "cy": 25.0, "w": 48, "h": 48,  # for 48×48: images are 24×24
            "k1": -0.05, "k2": 0.01, "p1": 0.001, "p2": -0.002, "aabb_scale": 4, "frames": frames}
    (root / "transforms.json").write_text(json.dumps(meta))
    assert detect_format(root) == "ngp"
    ds = load_dataset(root)
    assert ds.format == "ngp"
    # every 8th frame held out: frames 0 and 8 → test (and val)
    assert ds.splits["test"].names == ["images/f0", "images/f8"] and ds.splits["val"] is ds.splits["test"]
    tr = ds.splits["train"]
    assert len(tr) == 8 and tr.masks is None
    assert torch.allclose(tr.intrinsics[0], torch.tensor([24.0, 25.0, 11.5, 12.5]))  # frame 1, scaled 48 → 24
    assert torch.allclose(tr.intrinsics[2], torch.tensor([10.0, 10.5, 5.5, 6.5]))  # frame 3's own, scaled
    assert torch.allclose(tr.distortion[0], torch.tensor([0, -0.05, 0.01, 0.001, -0.002, 0, 0, 0, 0]))  # OpenCV lens row
    assert torch.allclose(tr.c2w, views.c2w[[1, 2, 3, 4, 5, 6, 7, 9]])
    # aabb_scale 4 around ngp's default scale 0.33 / offset 0.5: the central box (aabb_scale 1, world
    # [-1.52, 1.52]^3) is the unit cube, and the scene out to 4x that box is contracted into it
    assert ds.normalization.center == pytest.approx((0.0, 0.0, 0.0))
    assert ds.normalization.scale == pytest.approx(0.33 * 2)
    assert ds.outer_scale == 4.0
    # the distortion reaches the rays: they differ from the pinhole rays away from the centre
    o, d = camera_rays(tr, 0)
    _, d0 = rays_for_pixels(tr.c2w[0], tr.intrinsics[0], pixel_centers(24, 24))
    assert o.shape == (24 * 24, 3) and (d - d0).norm(dim=-1).max() > 1e-3
    # a split limit on test alone does not shrink val (they share frames but not the limit)
    lim = load_dataset(root, split_limit={"test": 1})
    assert len(lim.splits["test"]) == 1 and len(lim.splits["val"]) == 2


def test_ngp_camera_angle_fallback_and_offset(tmp_path):
    _, views, _ = _scene_views(n=3, res=16)
    root = tmp_path / "ngp2"
    root.mkdir()
    for i in range(3):
        Image.fromarray(views.images[i].numpy()).save(root / f"{i}.jpg", quality=95)
    meta = {"camera_angle_x": 0.8, "scale": 0.5, "offset": [0.5, 1.0, 0.0],
            "frames": [{"file_path": f"{i}", "transform_matrix": views.c2w[i].tolist()} for i in range(3)]}
    (root / "transforms.json").write_text(json.dumps(meta))
    ds = load_dataset(root / "transforms.json")
    f = 0.5 * 16 / math.tan(0.4)
    assert torch.allclose(ds.splits["train"].intrinsics[0], torch.tensor([f, f, 8.0, 8.0]))
    assert ds.normalization.center == pytest.approx((0.0, -1.0, 1.0))  # (0.5 − offset) / scale
    assert ds.normalization.scale == pytest.approx(1.0)  # half extent 0.5 · 1 / 0.5
    # an angle in degrees (40 trained as a 131° camera: tan(20 rad) > 0), or focal lengths 10^28 apart, are refused
    for change, match in (({"camera_angle_x": 40.0}, r"camera_angle_x = 40 is not a field of view in radians .*0\.6981"),
                          ({"camera_angle_x": -0.5}, "camera_angle_x = -0.5 is not a field of view in radians"),
                          ({"fl_x": 1e30, "fl_y": 64.0}, "differ more than 4×")):
        (root / "transforms.json").write_text(json.dumps({**meta, **change}))
        with pytest.raises(InputError, match=match):
            load_dataset(root / "transforms.json")


# -- LLFF ------------------------------------------------------------------------------------------------
def test_llff_fixture_poses_and_holdout(tmp_path):
    root = _write_llff(tmp_path / "llff", n=9, h=12, w=16, factor=2, full_f=40.0)
    assert detect_format(root) == "llff"
    ds = load_dataset(root)
    assert len(ds.splits["train"]) == 7 and len(ds.splits["test"]) == 2 and ds.splits["val"] is ds.splits["test"]
    tr = ds.splits["train"]
    assert torch.allclose(tr.c2w[0, :3, :3], torch.eye(3))  # [down, right, back] → OpenGL identity
    assert torch.allclose(tr.intrinsics[0], torch.tensor([20.0, 20.0, 8.0, 6.0]))  # f scaled 32 → 16 px
    assert ds.near == pytest.approx(1.8) and ds.far == pytest.approx(11.0)
    # every frustum point between the bounds is inside the unit cube (the cameras, nearer, are not)
    corners = torch.tensor([[0.0, 0.0], [16.0, 12.0], [0.0, 12.0], [16.0, 0.0]])
    for i in range(len(tr)):
        for z in (2.0, 10.0):
            x = backproject(tr.c2w[i], tr.intrinsics[i], corners, torch.full((4,), z))
            assert (ds.normalization.to_unit(x.double()).abs() <= 1 + 1e-6).all()
    ds2 = load_dataset(root, downscale=2)
    assert ds2.splits["train"].hw == (6, 8) and ds2.downscale == 2


def test_llff_real_fern(data_dir):
    root = data_dir / "llff" / "fern"
    if not root.is_dir():
        pytest.skip(f"{root} not found")
    ds = load_dataset(root)
    assert ds.format == "llff"
    assert len(ds.splits["train"]) == 17 and len(ds.splits["test"]) == 3
    te = ds.splits["test"]
    assert te.hw == (378, 504) and te.names[1].endswith(sorted(p.name for p in (root / "images_8").iterdir())[8])
    pb = np.load(root / "poses_bounds.npy")
    P = pb[8, :15].reshape(3, 5)
    assert torch.allclose(te.c2w[1, :3, 0], torch.tensor(P[:, 1]).float(), atol=1e-6)  # right
    assert torch.allclose(te.c2w[1, :3, 1], torch.tensor(-P[:, 0]).float(), atol=1e-6)  # up = −down
    assert torch.allclose(te.c2w[1, :3, 3], torch.tensor(P[:, 3]).float(), atol=1e-5)
    assert te.intrinsics[0, 0] == pytest.approx(P[2, 4] * 504 / P[1, 4], rel=1e-5)
    assert ds.near == pytest.approx(0.9 * pb[:, 15].min()) and ds.far == pytest.approx(1.1 * pb[:, 16].max())
    # forward-facing: all cameras look the same way (+z of the file's world here)
    fwd = -ds.splits["train"].c2w[:, :3, 2]
    assert (fwd @ fwd.mean(0) > 0.9 * fwd.mean(0).norm()).all()
    small = load_dataset(root, downscale=4, split_limit={"train": 2})
    assert small.splits["train"].hw == (94, 126) and len(small.splits["train"]) == 2
    assert small.splits["train"].intrinsics[0, 0] == pytest.approx(float(te.intrinsics[0, 0]) / 4, rel=1e-5)


# -- RTMV --------------------------------------------------------------------------------------------------
def test_rtmv_reader_on_written_fixture(tmp_path):
    """RTMV is tested only on this fixture (RTMV itself cannot be downloaded here): EXR colour,
    EXR ray-distance depth and camera_data JSON in RTMV's layout, rendered from the procedural scene."""
    scene, views, ray_t = _scene_views(n=7, res=24)
    root = _write_rtmv(tmp_path / "rtmv", views, ray_t)
    assert detect_format(root) == "rtmv"
    ds = load_dataset(root, background=(1.0, 1.0, 1.0))
    assert ds.format == "rtmv"
    # 7 views: ⌊14/3⌋ = 4 train, ⌊7/30⌋ = 0 val (→ test), 3 test
    assert len(ds.splits["train"]) == 4 and len(ds.splits["test"]) == 3 and ds.splits["val"] is ds.splits["test"]
    tr = ds.splits["train"]
    assert torch.allclose(tr.c2w, views.c2w[:4], atol=1e-6)
    assert torch.allclose(tr.intrinsics, views.intrinsics[:4])
    assert torch.equal(tr.masks, views.masks[:4])
    fg = views.masks[:4] > 0
    assert (tr.images.int() - views.images[:4].int())[fg].abs().max() <= 1  # linear → sRGB round trip
    assert (tr.images[~fg] == 255).all()
    # ray distance → z-depth: equals the procedural scene's own z-depth
    assert torch.equal(tr.depth > 0, fg)
    assert torch.allclose(tr.depth.float(), views.depth[:4].float(), atol=4e-3)
    # the unit cube comes from the depth: it holds every depth point, and hugs the object
    lo, hi = (torch.tensor(b) for b in ds.bbox)
    slo, shi = scene.bounds()
    assert (lo <= slo + 0.05).all() and (hi >= shi - 0.05).all()
    assert float((hi - lo).amax()) < float((shi - slo).amax()) * 1.2
    z = tr.depth[tr.depth > 0].float()
    assert ds.near <= z.min() and z.max() <= ds.far
    # downscale 2: intrinsics halved, depth kept only where the block is mostly surface
    ds2 = load_dataset(root, downscale=2)
    assert ds2.splits["train"].hw == (12, 12)
    assert torch.allclose(ds2.splits["train"].intrinsics, views.intrinsics[:4] / 2)
    assert ds2.splits["train"].depth.dtype == torch.float16


def test_rtmv_fixture_without_depth_uses_the_scene_box(tmp_path):
    _, views, ray_t = _scene_views(n=4, res=16)
    root = _write_rtmv(tmp_path / "rtmv", views, ray_t, depth=False)
    ds = load_dataset(root, format="rtmv")
    assert ds.splits["train"].depth is None
    assert ds.bbox == ((-1.0, -1.0, -1.0), (1.0, 1.0, 1.0))


def test_downscale_depth_never_blends_across_silhouettes():
    z = np.array([[0, 0, 1, 2], [0, 5, 0, 3], [4, 1, 7, 7], [0, 0, 7, 7]], dtype=np.float32)
    out = downscale_depth(z, 2)
    assert out.tolist() == [[0.0, 2.0], [1.0, 7.0]]  # 1/4 valid → 0; lower median of {1,2,3}; of {1,4}; of {7}


def test_srgb_round_trip():
    x = np.linspace(0, 1, 101)
    assert np.allclose(linear_to_srgb(srgb_to_linear(x)), x, atol=1e-9)


# -- bad input ---------------------------------------------------------------------------------------------
def test_bad_inputs_give_one_clear_error(tmp_path):
    _, views, ray_t = _scene_views(n=6, res=16)
    # unknown format / nothing recognisable / missing path
    with pytest.raises(InputError, match="unknown dataset format"):
        load_dataset("procedural", format="nerfstudio")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(InputError, match="no recognisable dataset"):
        load_dataset(tmp_path / "empty")
    with pytest.raises(InputError, match="not found"):
        load_dataset(tmp_path / "nope")
    with pytest.raises(InputError, match="downscale"):
        load_dataset("procedural", downscale=0)
    # missing image
    root = _write_blender(tmp_path / "b1", views)
    (root / "train" / "r_1.png").unlink()
    with pytest.raises(InputError, match="image not found.*r_1"):
        load_dataset(root)
    # non-finite pose
    root = _write_blender(tmp_path / "b2", views)
    meta = json.loads((root / "transforms_train.json").read_text())
    meta["frames"][2]["transform_matrix"][0][3] = float("nan")
    (root / "transforms_train.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="non-finite"):
        load_dataset(root)
    # images of different sizes
    root = _write_blender(tmp_path / "b3", views)
    Image.new("RGBA", (8, 8)).save(root / "train" / "r_3.png")
    with pytest.raises(InputError, match="different sizes"):
        load_dataset(root)
    # pose count ≠ image count (LLFF, RTMV)
    root = _write_llff(tmp_path / "l1", n=5)
    next((root / "images_2").iterdir()).unlink()
    with pytest.raises(InputError, match="5 poses but .* 4 images"):
        load_dataset(root)
    root = _write_llff(tmp_path / "l2", n=5)
    pb = np.load(root / "poses_bounds.npy")
    pb[3, 3] = np.inf
    np.save(root / "poses_bounds.npy", pb)
    with pytest.raises(InputError, match="non-finite"):
        load_dataset(root)
    pb[3, 3], pb[3, 16] = 0.0, 1e30  # a far bound of 1e30: an internal normalisation message before
    np.save(root / "poses_bounds.npy", pb)
    with pytest.raises(InputError, match="a depth range over 1e\\+06×: .* fix the bounds"):
        load_dataset(root)
    root = _write_rtmv(tmp_path / "r1", views, ray_t)
    (root / "00002.exr").unlink()
    with pytest.raises(InputError, match="6 camera files .* 5 colour images"):
        load_dataset(root)
    # a broken JSON file
    root = _write_blender(tmp_path / "b4", views)
    (root / "transforms_val.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_dataset(root)


# -- generated capture with a background (vqad.nerf.scene_capture) --------------------------------------
def test_scene_capture_room_and_object_alone(tmp_path):
    """The room capture reads back as an ngp scene: central box = the aabb_scale 1 box, outer_scale = aabb_scale; every pixel
    sees something; the object-alone capture has the same cameras and its alpha is the object's mask."""
    from vqad.nerf.scene_capture import SceneCaptureConfig, write_capture

    for scale in (4, 16):
        cfg = SceneCaptureConfig(width=20, height=36, views=9, aabb_scale=scale)
        write_capture(tmp_path / f"room{scale}", cfg)
        ds = load_dataset(tmp_path / f"room{scale}", format="ngp")
        assert len(ds.splits["train"]) == 7 and len(ds.splits["test"]) == 2
        assert ds.splits["train"].hw == (36, 20) and ds.splits["train"].masks is None
        lo, hi = ds.bbox
        assert np.allclose(hi, 0.5 / 0.33) and np.allclose(lo, -0.5 / 0.33) and ds.outer_scale == scale
    img = ds.splits["train"].images.float()
    assert (img.std(dim=(1, 2)) > 10).all()  # textured: not a flat background anywhere
    write_capture(tmp_path / "object", SceneCaptureConfig(width=20, height=36, views=9, aabb_scale=1), background=False)
    obj = load_dataset(tmp_path / "object", format="ngp")
    assert torch.equal(obj.splits["train"].c2w, ds.splits["train"].c2w)
    m = obj.splits["train"].masks
    assert m is not None and 0.05 < (m > 127).float().mean() < 0.6
    # the object looks the same in both captures where the mask is solid
    solid = (m == 255)
    diff = (obj.splits["train"].images.float() - img).abs().amax(-1)
    assert diff[solid].max() <= 1


def test_scene_capture_written_in_ray_chunks_equals_the_whole_render(tmp_path, monkeypatch):
    """write_capture renders one view at a time in RAY_CHUNK pieces: its PNGs are render_capture's pixels
    (a chunk that splits rows included), and sizes past the bounds are input errors before any memory is taken."""
    from PIL import Image

    from vqad.nerf import scene_capture as sc

    cfg = sc.SceneCaptureConfig(width=20, height=36, views=3, aabb_scale=4)
    rgba, _, _ = sc.render_capture(cfg)
    monkeypatch.setattr(sc, "RAY_CHUNK", 37)  # not a multiple of the width
    sc.write_capture(tmp_path / "room", cfg)
    for i in range(3):
        png = np.asarray(Image.open(tmp_path / "room" / "images" / f"{i:04d}.png"))
        assert np.array_equal(png, rgba[i, ..., :3].numpy())
    for bad in (dict(width=100_000, height=100_000), dict(views=1), dict(views=100_000), dict(width=0)):
        with pytest.raises(InputError, match="image sides"):
            sc.write_capture(tmp_path / "bad", sc.SceneCaptureConfig(**bad))
    assert not (tmp_path / "bad").exists()


def test_scene_capture_pixels_box_filter_their_rays():
    """supersample n: each pixel is the mean of the n × n rays at (i + ½)/n across its square, the same
    as rendering n times the resolution (intrinsics × n) and averaging n × n blocks; n = 1 is the pixel
    centre alone. The object alone's alpha is the share of rays that hit it (fractional on its edges),
    its colour straight; where every ray hits, it is the room's pixel. Bad values are input errors."""
    from vqad.nerf import scene_capture as sc

    def render(cfg, background, scale=1):
        env = sc._environment(cfg)
        c2w, intr = sc._cameras(cfg)
        big = sc.SceneCaptureConfig(width=cfg.width * scale, height=cfg.height * scale, views=cfg.views, supersample=1)
        return sc._render_view(env, big if scale > 1 else cfg, c2w[1], tuple(v * scale for v in intr), background)

    for n in (2, 3):
        cfg = sc.SceneCaptureConfig(width=20, height=36, views=3, supersample=n)
        for background in (True, False):
            got = render(cfg, background).numpy().astype(np.float64)
            fine = render(cfg, background, scale=n).numpy().astype(np.float64) / 255  # pixel centres, quantised
            a = fine[..., 3:].reshape(36, n, 20, n, 1).mean((1, 3))
            prem = (fine[..., :3] * fine[..., 3:]).reshape(36, n, 20, n, 3).mean((1, 3))
            want = np.concatenate([np.where(a > 0, prem / np.maximum(a, 1e-12), 0.0), a], -1) * 255
            assert np.abs(got - want).max() <= 1.0  # the reference averages 8-bit values
            if not background:
                alpha = got[..., 3]
                assert ((alpha > 0) & (alpha < 255)).sum() > 10  # antialiased edges
                room = render(cfg, True).numpy()
                solid = alpha == 255
                assert np.abs(got[solid][:, :3] - room[solid][:, :3]).max() <= 1
    one = sc.SceneCaptureConfig(width=20, height=36, views=3, supersample=1)
    env, (c2w, intr) = sc._environment(one), sc._cameras(one)
    o, d = sc.rays_for_pixels(c2w[1], torch.tensor(intr), sc.pixel_centers(36, 20))
    _, color, _ = env.raycast(o, d, True)
    ref = (color * 255 + 0.5).clamp(0, 255).to(torch.uint8).reshape(36, 20, 3)
    assert torch.equal(render(one, True)[..., :3], ref)
    for bad in (0, 17, 2.5, True):
        with pytest.raises(InputError, match="supersample"):
            sc.SceneCaptureConfig(supersample=bad).validate()


# -- COLMAP sparse models ----------------------------------------------------------------------------------
def _write_colmap(root, c2w, images, camera_lines, binary: bool):
    """A COLMAP model of OpenGL poses ``c2w (N, 4, 4)``: images/ + sparse/0/{cameras,images}.{txt,bin}.
    ``camera_lines``: ``[(model_id, name, w, h, params)]``, image i uses camera ``i % len + 1``."""
    import struct

    from PIL import Image
    from scipy.spatial.transform import Rotation

    (root / "images").mkdir(parents=True)
    model = root / "sparse" / "0"
    model.mkdir(parents=True)
    poses = []
    for i, (pose, img) in enumerate(zip(c2w.double().numpy(), images)):
        Image.fromarray(img.numpy()).save(root / "images" / f"im{i:03d}.png")
        cv = pose @ np.diag([1.0, -1.0, -1.0, 1.0])
        R = cv[:3, :3].T
        t = -R @ cv[:3, 3]
        x, y, z, w = Rotation.from_matrix(R).as_quat()
        poses.append((i + 1, (w, x, y, z), t, i % len(camera_lines) + 1, f"im{i:03d}.png"))
    if binary:
        with open(model / "cameras.bin", "wb") as f:
            f.write(struct.pack("<Q", len(camera_lines)))
            for cid, (mid, _, w, h, params) in enumerate(camera_lines, 1):
                f.write(struct.pack("<iiQQ", cid, mid, w, h) + struct.pack(f"<{len(params)}d", *params))
        with open(model / "images.bin", "wb") as f:
            f.write(struct.pack("<Q", len(poses)))
            for iid, q, t, cid, name in poses:
                f.write(struct.pack("<i7di", iid, *q, *t, cid) + name.encode() + b"\0")
                f.write(struct.pack("<Q", 1) + struct.pack("<ddq", 1.0, 2.0, -1))
    else:
        (model / "cameras.txt").write_text("# Camera list\n" + "".join(
            f"{cid} {name} {w} {h} {' '.join(repr(float(p)) for p in params)}\n"
            for cid, (_, name, w, h, params) in enumerate(camera_lines, 1)))
        (model / "images.txt").write_text("# Image list\n" + "".join(
            f"{iid} {' '.join(repr(float(v)) for v in q)} {' '.join(repr(float(v)) for v in t)} {cid} {name}\n1.0 2.0 -1\n"
            for iid, q, t, cid, name in poses))
    return root


@pytest.mark.parametrize("binary", [False, True])
def test_colmap_model_reads_poses_intrinsics_and_distortion(tmp_path, binary):
    from vqad.nerf.scene_capture import SceneCaptureConfig, render_capture

    cfg = SceneCaptureConfig(width=20, height=36, views=9)
    rgba, c2w, (fx, fy, cx, cy) = render_capture(cfg)
    cams = [(1, "PINHOLE", 20, 36, [fx, fy, cx, cy]), (2, "SIMPLE_RADIAL", 20, 36, [fx, cx, cy, 0.01]),
            (4, "OPENCV", 20, 36, [fx, fy, cx, cy, 0.02, -0.01, 0.001, 0.002])]
    root = _write_colmap(tmp_path / "cap", c2w, rgba[..., :3], cams, binary)
    ds = load_dataset(root)  # auto-detected
    assert ds.format == "colmap" and ds.outer_scale == 16.0
    train, test = ds.splits["train"], ds.splits["test"]
    assert len(train) == 7 and len(test) == 2 and test.names == ["im000.png", "im008.png"]
    keep = [i for i in range(9) if i % 8]
    assert torch.allclose(train.c2w, c2w[keep], atol=1e-5)
    assert torch.allclose(train.intrinsics[0], torch.tensor([fx, fy, cx, cy]), atol=1e-4)
    # image i has camera i % 3: im001 SIMPLE_RADIAL, im002 OPENCV, im003 PINHOLE
    assert torch.allclose(train.distortion[0], torch.tensor([0, 0.01, 0.0, 0.0, 0.0, 0, 0, 0, 0]))  # lens rows
    assert torch.allclose(train.distortion[1], torch.tensor([0, 0.02, -0.01, 0.001, 0.002, 0, 0, 0, 0]))
    assert torch.equal(train.distortion[2], torch.zeros(9))
    # the central box is centred where the ring's optical axes meet (the origin), 0.375 × their distance
    lo, hi = ds.bbox
    assert np.allclose(np.add(lo, hi) / 2, 0.0, atol=0.05)
    d = float(c2w[:, :3, 3].norm(dim=-1).mean())
    assert np.allclose(np.subtract(hi, lo) / 2, 0.375 * d, rtol=0.02)


def test_colmap_bad_models_are_input_errors(tmp_path):
    from vqad.nerf.scene_capture import SceneCaptureConfig, render_capture

    rgba, c2w, (fx, fy, cx, cy) = render_capture(SceneCaptureConfig(width=8, height=8, views=3))
    root = _write_colmap(tmp_path / "fov", c2w, rgba[..., :3], [(7, "FOV", 8, 8, [fx, fy, cx, cy, 0.5])], True)
    with pytest.raises(InputError, match="FOV is not supported"):
        load_dataset(root, format="colmap")
    root = _write_colmap(tmp_path / "prism", c2w, rgba[..., :3],
                         [(10, "THIN_PRISM_FISHEYE", 8, 8, [fx, fy, cx, cy] + [0.0] * 8)], False)
    with pytest.raises(InputError, match="THIN_PRISM_FISHEYE is not supported"):
        load_dataset(root, format="colmap")
    root = _write_colmap(tmp_path / "cut", c2w, rgba[..., :3], [(1, "PINHOLE", 8, 8, [fx, fy, cx, cy])], True)
    data = (root / "sparse" / "0" / "images.bin").read_bytes()
    (root / "sparse" / "0" / "images.bin").write_bytes(data[:-30])
    with pytest.raises(InputError, match="truncated"):
        load_dataset(root, format="colmap")
    root = _write_colmap(tmp_path / "txt", c2w, rgba[..., :3], [(1, "PINHOLE", 8, 8, [fx, fy, cx, cy])], False)
    (root / "sparse" / "0" / "cameras.txt").write_text("1 PINHOLE 8 8 nan 1 2 3\n")
    with pytest.raises(InputError, match="non-finite|PINHOLE"):
        load_dataset(root, format="colmap")


def test_a_tiny_fit_of_the_background_scene_runs_end_to_end_within_its_cap(tmp_path, capsys):
    """synth-capture (aabb_scale 4) → fit-nerf --minutes (density pass, training, evaluation) → the
    .vqad file renders what the fitted model renders; the whole job keeps to its cap."""
    import time

    import vqad
    from vqad.app.cli import main as cli_main
    from vqad.nerf.formats import load_dataset
    from vqad.nerf.render import render_rays_chunked
    from vqad.nerf.rays import RayBatcher
    from vqad.nerf.render import model_sampler

    cap = tmp_path / "room"
    assert cli_main(["synth-capture", "-o", str(cap), "--aabb-scale", "4", "--size", "24x40", "--views", "10"]) == 0
    out = tmp_path / "fit"
    minutes = 0.4
    t = time.perf_counter()
    rc = cli_main(["fit-nerf", str(cap), "--format", "ngp", "--levels", "3:5", "--features", "4", "--grid", "codebook",
                   "--bits", "4", "--minutes", str(minutes), "--batch-rays", "512", "--out", str(out), "--device", "cpu",
                   "--quiet", "--eval-max-views", "1", "--octree", "density"])
    seconds = time.perf_counter() - t
    assert rc == 0
    assert seconds < minutes * 60 * 1.15 + 5, seconds  # the cap holds for the whole job (+ start-up)
    m = json.loads((out / "metrics.json").read_text())
    assert m["octree_method"] == "density" and m["nerf"]["outer_scale"] == 4.0
    assert m["decoder"]["per_lod"] is True  # auto: a codebook grid in a contracted scene
    assert m["train"]["early_stop_eps"] == 1e-4  # auto: early ray termination in a contracted scene
    err = capsys.readouterr().err
    # only the final fit may call itself undertrained: the density pass is meant to stop early
    assert err.count("undertrained") <= 1, err
    path = tmp_path / "room.vqad"
    assert cli_main(["export", str(out / "checkpoint"), "-o", str(path), "--entropy"]) == 0
    field, back = vqad.load(out / "checkpoint"), vqad.load(path)
    assert back.nerf_cfg.outer_scale == 4.0
    ds = load_dataset(str(cap), format="ngp")
    o, d, _, near, far = RayBatcher(ds.splits["test"], ds, "cpu").sample(400, torch.Generator().manual_seed(0))
    bg = torch.tensor([1.0, 1.0, 1.0])
    field.bake(fp16=True)  # what the file stores
    a = render_rays_chunked(field, model_sampler(field), o, d, [3, 5], bg, near=near, far=far)
    b = render_rays_chunked(back, model_sampler(back), o, d, [3, 5], bg, near=near, far=far)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# -- sparse structure-from-motion points -----------------------------------------------------------------
def _points3d(path, xyz, binary: bool):
    import struct

    if binary:
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(xyz)))
            for i, p in enumerate(xyz):
                track = [(1, 0), (2, 5)][: i % 3]  # tracks of 0, 1 and 2 observations
                f.write(struct.pack("<Q3d3Bd", i + 1, *p, 10, 20, 30, 0.5) + struct.pack("<Q", len(track)))
                for image_id, idx in track:
                    f.write(struct.pack("<ii", image_id, idx))
    else:
        path.write_text("# 3D point list\n" + "".join(f"{i + 1} {float(p[0])!r} {float(p[1])!r} {float(p[2])!r} 10 20 30 "
                                                        "0.5 1 0 2 5\n" for i, p in enumerate(xyz)))


@pytest.mark.parametrize("binary", [False, True])
def test_colmap_points3d_read_exactly_and_hostile_files_refused(tmp_path, binary):
    from vqad.nerf.formats.points import read_colmap_points

    xyz = np.random.default_rng(0).normal(size=(7, 3))
    name = "points3D.bin" if binary else "points3D.txt"
    _points3d(tmp_path / name, xyz, binary)
    assert np.array_equal(read_colmap_points(tmp_path), xyz)
    assert read_colmap_points(tmp_path / "nothing-here") is None
    data = (tmp_path / name).read_bytes()
    if binary:
        bad = {"truncated": data[:-9], "huge count": (10 ** 12).to_bytes(8, "little") + data[8:]}
    else:
        bad = {"nan": data.replace(repr(float(xyz[0, 0])).encode(), b"nan", 1),
               "short row": b"1 2 3\n"}
    for what, blob in bad.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(InputError):
            read_colmap_points(tmp_path)


def test_ply_points_ascii_and_binary_and_hostile_headers(tmp_path):
    from vqad.nerf.formats.points import read_ply_points, write_ply_points

    xyz = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
    write_ply_points(tmp_path / "b.ply", xyz)
    assert np.array_equal(read_ply_points(tmp_path / "b.ply"), xyz.astype(np.float64))
    # ascii, extra properties in another order, big-endian doubles with colours
    rows = "".join(f"{r} {g} {b} {p[2]} {p[0]} {p[1]}\n" for (r, g, b), p in zip([(1, 2, 3)] * 5, xyz.tolist()))
    (tmp_path / "a.ply").write_text("ply\nformat ascii 1.0\ncomment hi\nelement vertex 5\nproperty uchar red\n"
                                    "property uchar green\nproperty uchar blue\nproperty float z\nproperty float x\n"
                                    "property float y\nelement face 0\nproperty list uchar int vertex_indices\n"
                                    "end_header\n" + rows)
    assert np.allclose(read_ply_points(tmp_path / "a.ply"), xyz, atol=1e-6)
    rec = np.zeros(5, dtype=[("x", ">f8"), ("y", ">f8"), ("z", ">f8"), ("red", "u1")])
    rec["x"], rec["y"], rec["z"] = xyz.T
    (tmp_path / "be.ply").write_bytes(b"ply\nformat binary_big_endian 1.0\nelement vertex 5\nproperty double x\n"
                                      b"property double y\nproperty double z\nproperty uchar red\nend_header\n" + rec.tobytes())
    assert np.allclose(read_ply_points(tmp_path / "be.ply"), xyz, atol=1e-6)
    head = b"ply\nformat binary_little_endian 1.0\nelement vertex %d\nproperty float x\nproperty float y\nproperty float z\nend_header\n"
    for blob in (b"not a ply", head % 5 + b"\0" * 10, head % (10 ** 12), head.replace(b"binary_little_endian", b"weird") % 1,
                 b"ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nend_header\n1\n",
                 b"ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nproperty float y\nproperty float z\nend_header\n1 nan 2\n"):
        (tmp_path / "x.ply").write_bytes(blob)
        with pytest.raises(InputError):
            read_ply_points(tmp_path / "x.ply")


def test_points_level_coarsens_where_the_points_are_too_sparse():
    """Sparse points mark cells one level above the finest, but never finer than the level where they
    average POINTS_PER_CELL per occupied cell (a brute-force count on a plane of points)."""
    from vqad.nerf.octree_build import POINTS_PER_CELL, points_level

    g = torch.Generator().manual_seed(0)
    n = 4 * 4 ** 5  # on the plane z = 0: ~4 per level-5 cell (4^5 of them), < 2 per level-6 cell
    x = torch.cat([torch.rand(n, 2, generator=g) * 2 - 1, torch.zeros(n, 1)], dim=1)

    def mean_per_cell(level):
        ijk = torch.floor((x + 1) * (1 << level) / 2).long().clamp(0, (1 << level) - 1)
        return n / torch.unique(ijk, dim=0).shape[0]

    assert mean_per_cell(5) >= POINTS_PER_CELL > mean_per_cell(6)
    assert points_level(x, 8) == 5 and points_level(x, 7) == 5 and points_level(x, 6) == 5
    assert points_level(x, 5) == 4 and points_level(x, 2) == 1
    assert points_level(x[:2], 7) == 1  # two points: the coarsest level, never below 1


def test_octree_from_points_of_the_room_holds_its_surfaces(tmp_path):
    """synth-capture writes sparse_pc.ply (ply_file_path); --octree auto then picks points; the octree
    holds the cells of most true surface points, far fewer cells than the box, at the default levels
    and at levels finer than the points support; a capture without points refuses --octree points
    with what to do."""
    import json

    from vqad.nerf.contraction import contract
    from vqad.nerf.octree_build import build_octree
    from vqad.nerf.rays import RayBatcher
    from vqad.nerf.scene_capture import Environment, SceneCaptureConfig, write_capture

    cfg = SceneCaptureConfig(width=24, height=40, views=10, aabb_scale=4, points=20_000)
    write_capture(tmp_path / "room", cfg)
    meta = json.loads((tmp_path / "room" / "transforms.json").read_text())
    assert meta["ply_file_path"] == "sparse_pc.ply"
    ds = load_dataset(tmp_path / "room", format="ngp")
    assert ds.points.shape == (20_000, 3)
    octree, method = build_octree(ds, "auto", 3, 6, torch.device("cpu"))
    assert method == "points"
    assert octree.num_cells(6) < 0.25 * 8 ** 6
    # true first hits of the training pixels
    env = Environment(ground_y=cfg.ground_y, dome_radius=cfg.dome_radius, checker=cfg.checker)
    o, d, _, _, _ = RayBatcher(ds.splits["train"], ds, "cpu").rays_for(torch.arange(2000))
    ow, dw = ds.normalization.to_world(o), d / d.norm(dim=1, keepdim=True)
    t, _, _ = env.raycast(ow, dw, True)
    g = contract(ds.normalization.to_unit(ow + t[:, None] * dw), ds.outer_scale)
    assert octree.contains(g).float().mean() > 0.95
    # one level finer than these points support (level 7 would mark cells with < 3 points each): the
    # marks stay at level 6 instead of leaving holes (marking level 7 held 90 % of these surfaces)
    fine, _ = build_octree(ds, "points", 3, 8, torch.device("cpu"))
    assert fine.contains(g).float().mean() > 0.95
    # no points: a clear error; a missing ply is an input error too
    write_capture(tmp_path / "bare", SceneCaptureConfig(width=24, height=40, views=4, points=0))
    bare = load_dataset(tmp_path / "bare", format="ngp")
    assert bare.points is None
    with pytest.raises(InputError, match="no sparse points"):
        build_octree(bare, "points", 3, 6, torch.device("cpu"))
    meta["ply_file_path"] = "gone.ply"
    (tmp_path / "room" / "transforms.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="ply_file_path"):
        load_dataset(tmp_path / "room", format="ngp")


def test_sparse_point_readers_fuzzed_raise_only_input_errors(tmp_path):
    """Random byte flips, cuts and insertions in a PLY, a points3D.bin and a points3D.txt: each read
    either returns finite (N, 3) points or raises InputError, never anything else."""
    import random
    import struct

    from vqad.nerf.formats.points import read_ply_points, read_points3d_bin, read_points3d_txt, write_ply_points

    write_ply_points(tmp_path / "a.ply", np.random.default_rng(0).normal(size=(20, 3)))
    blobs = {
        "a.ply": ((tmp_path / "a.ply").read_bytes(), read_ply_points),
        "p.bin": (struct.pack("<Q", 5) + b"".join(struct.pack("<Q3d3BdQ", i, 1.0, 2.0, 3.0, 1, 2, 3, 0.5, 1)
                                                   + struct.pack("<ii", 1, 2) for i in range(5)), read_points3d_bin),
        "p.txt": ("".join(f"{i} 1.0 2.0 3.0 1 2 3 0.5 1 2\n" for i in range(5)).encode(), read_points3d_txt),
    }
    rnd = random.Random(0)
    for _ in range(400):
        for name, (blob, read) in blobs.items():
            x = bytearray(blob)
            for _ in range(rnd.randint(1, 6)):
                op = rnd.random()
                if op < 0.5 and x:
                    x[rnd.randrange(len(x))] = rnd.randrange(256)
                elif op < 0.75:
                    x = x[:rnd.randrange(len(x) + 1)]
                else:
                    a = rnd.randrange(len(x) + 1)
                    x[a:a] = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 8)))
            (tmp_path / name).write_bytes(bytes(x))
            try:
                out = read(tmp_path / name)
            except InputError:
                continue
            assert out.ndim == 2 and out.shape[1] == 3 and np.isfinite(out).all()


def _colmap_txt(tmp_path, name: str, views: int = 4):
    from vqad.nerf.scene_capture import SceneCaptureConfig, render_capture

    rgba, c2w, (fx, fy, cx, cy) = render_capture(SceneCaptureConfig(width=8, height=8, views=views))
    root = _write_colmap(tmp_path / name, c2w, rgba[..., :3], [(1, "PINHOLE", 8, 8, [fx, fy, cx, cy])], False)
    return root, root / "sparse" / "0" / "images.txt"


def test_colmap_images_txt_lines_checked(tmp_path):
    """Each image takes two lines in images.txt: one without its POINTS2D line would shift every later
    image into the points' place (half the images dropped, silently). Ids and names are unique, and a
    zero quaternion is no rotation."""
    root, images = _colmap_txt(tmp_path, "ok")
    assert len(load_dataset(root, format="colmap").splits["train"]) == 3
    lines = images.read_text().splitlines()  # "# Image list", then pose / points pairs
    root, images = _colmap_txt(tmp_path, "nopoints")
    images.write_text("\n".join([lines[0]] + lines[1::2]) + "\n")  # the pose lines only
    with pytest.raises(InputError, match="not followed by its POINTS2D line"):
        load_dataset(root, format="colmap")
    root, images = _colmap_txt(tmp_path, "dupid")
    images.write_text("\n".join(lines[:5] + [lines[5].replace("3 ", "1 ", 1)] + lines[6:]) + "\n")
    with pytest.raises(InputError, match="image id 1 appears twice"):
        load_dataset(root, format="colmap")
    root, images = _colmap_txt(tmp_path, "dupname")
    images.write_text("\n".join(lines[:5] + [lines[5].replace("im002.png", "im000.png")] + lines[6:]) + "\n")
    with pytest.raises(InputError, match="are both 'im000.png'"):
        load_dataset(root, format="colmap")
    root, images = _colmap_txt(tmp_path, "zeroq")
    f = lines[3].split()
    images.write_text("\n".join(lines[:3] + [" ".join(f[:1] + ["0", "0", "0", "0"] + f[5:])] + lines[4:]) + "\n")
    with pytest.raises(InputError, match="quaternion is zero"):
        load_dataset(root, format="colmap")


def _ngp_capture(tmp_path, name: str):
    from vqad.nerf.scene_capture import SceneCaptureConfig, write_capture

    path = write_capture(tmp_path / name, SceneCaptureConfig(width=8, height=12, views=3, points=200))
    return path.parent, path, json.loads(path.read_text())


@pytest.mark.parametrize("key,value,match", [
    ("k1", "abc", "k1 must be a finite number"), ("k2", [0.1], "k2 must be a finite number"),
    ("p1", True, "p1 must be a finite number"), ("k3", "abc", "k3 must be a finite number"),
    ("k4", 0.1, "k4 = 0.1 on a pinhole camera"), ("is_fisheye", 1, "is_fisheye must be true or false"),
    ("camera_model", "EQUIRECTANGULAR", "is not supported"), ("w", -24, "w must be positive"),
    ("fl_y", 0, "fl_y must be positive"), ("aabb_scale", 1e9, "aabb_scale .* above the largest"),
    ("aabb_scale", "4", "aabb_scale must be a number"), ("scale", True, "scale must be a number"),
])
def test_ngp_values_of_the_wrong_kind_are_refused(tmp_path, key, value, match):
    root, path, meta = _ngp_capture(tmp_path, "cap")
    meta[key] = value
    path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match=match):
        load_dataset(root, format="ngp")


def test_readers_refuse_what_a_fuzz_pass_slipped_past_them(tmp_path):
    """An integer of 5,000 digits in transforms.json (Python's JSON raises a bare ValueError), a COLMAP quaternion
    component of 1e308 (its norm overflowed: the rotation became the identity), an LLFF header claiming 2^40 rows
    (it asked for 136 TiB, reported as the machine's fault) and a frame's file name too long for the file system
    (an OSError from the Python API) are each one InputError naming what is wrong."""
    root, path, meta = _ngp_capture(tmp_path, "bigint")
    path.write_text(json.dumps(meta).replace('"frames":', '"x": ' + "9" * 5000 + ', "frames":', 1))
    with pytest.raises(InputError, match="is not valid JSON .*4300"):
        load_dataset(root, format="ngp")
    root, path, meta = _ngp_capture(tmp_path, "longname")
    meta["frames"][0]["file_path"] = "a" * 5000 + ".png"
    path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match="cannot read the ngp capture .*too long"):
        load_dataset(root, format="ngp")

    from vqad.nerf.formats.colmap import ColmapImage

    q = ColmapImage(np.array([0.0, 0.0, 1e308, 0.0]), np.zeros(3), 1, "a.png")
    assert np.allclose(q.c2w("a.png")[:3, :3], ColmapImage(np.array([0.0, 0.0, 1.0, 0.0]), np.zeros(3), 1,
                                                              "a.png").c2w("a.png")[:3, :3])
    with pytest.raises(InputError, match="quaternion .* is not finite"):
        ColmapImage(np.array([1.0, np.inf, 0.0, 0.0]), np.zeros(3), 1, "a.png").c2w("a.png")

    root = _write_llff(tmp_path / "llff", n=9, h=12, w=16, factor=2, full_f=40.0)
    with open(root / "poses_bounds.npy", "wb") as f:  # a valid .npy header over 1 kB of data
        np.lib.format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": (2 ** 40, 17)})
        f.write(bytes(1024))
    with pytest.raises(InputError, match="cannot read .*poses_bounds.npy as an \\(N, 17\\) float array.*damaged"):
        load_dataset(root)


def test_ngp_not_utf8_and_16_bit_images_are_refused(tmp_path):
    root, path, meta = _ngp_capture(tmp_path, "bytes")
    path.write_bytes(b'{"frames": "\xff\xfe"}')
    with pytest.raises(InputError, match="not valid JSON .*not UTF-8"):
        load_dataset(root, format="ngp")
    root, path, meta = _ngp_capture(tmp_path, "deep")
    img = root / meta["frames"][1]["file_path"]
    a = np.asarray(Image.open(img).convert("L")).astype(np.uint16) * 257
    Image.fromarray(a).save(img)  # a 16-bit grey PNG: PIL's RGBA conversion would clip it to white
    assert Image.open(img).mode.startswith("I")
    with pytest.raises(InputError, match="16-bit or float pixels"):
        load_dataset(root, format="ngp")


@pytest.mark.parametrize("change,match", [
    (lambda m: m[:3, :3] * 2.0, "scaled or sheared"),
    (lambda m: m[:3, :3] @ np.array([[1.0, 0.3, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), "scaled or sheared"),
    (lambda m: m[:3, :3] @ np.diag([1.0, 1.0, -1.0]), "mirror"),
    (None, "last row"),
])
def test_ngp_poses_that_are_not_rigid_are_refused(tmp_path, change, match):
    root, path, meta = _ngp_capture(tmp_path, "cap")
    m = np.array(meta["frames"][2]["transform_matrix"])
    if change is None:
        m[3] = [0.0, 0.0, 0.5, 1.0]
    else:
        m[:3, :3] = change(m)
    meta["frames"][2]["transform_matrix"] = m.tolist()
    path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match=match):
        load_dataset(root, format="ngp")
    m[:3, :3] = np.eye(3) * (1 + 2e-4)  # within the tolerance of poses written with ~7 digits: accepted
    m[3] = [0.0, 0.0, 0.0, 1.0]
    meta["frames"][2]["transform_matrix"] = m.tolist()
    path.write_text(json.dumps(meta))
    assert len(load_dataset(root, format="ngp").splits["train"]) == 2


def test_colmap_stray_camera_and_ngp_duplicate_frames_are_refused(tmp_path):
    """One camera registered 1e30 away would make the scene box itself; one photo listed twice trains
    on a held-out view (or gives a photo two poses)."""
    root, images = _colmap_txt(tmp_path, "stray", views=6)
    lines = images.read_text().splitlines()
    f = lines[5].split()  # image 3's pose line
    images.write_text("\n".join(lines[:5] + [" ".join(f[:5] + ["1e30", "0", "0"] + f[8:])] + lines[6:]) + "\n")
    with pytest.raises(InputError, match="camera of 'im002.png' is .*failed registration"):
        load_dataset(root, format="colmap")
    root, path, meta = _ngp_capture(tmp_path, "dup")
    meta["frames"][2]["file_path"] = meta["frames"][0]["file_path"]
    path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match="frame 2 .* and frame 0 are both"):
        load_dataset(root, format="ngp")


def test_octree_from_an_output_folder_points_to_its_checkpoint(tmp_path):
    from vqad.checkpoint import read_config

    (tmp_path / "fit" / "checkpoint").mkdir(parents=True)
    (tmp_path / "fit" / "checkpoint" / "config.json").write_text("{}")
    with pytest.raises(InputError, match="holds checkpoint/: pass that"):
        read_config(tmp_path / "fit")


def test_colmap_capture_found_from_its_model_folder_or_files(tmp_path):
    """Users point at the capture, at sparse/0 or at a file in it: all read the same capture; a camera
    of focal length 0 is refused in COLMAP's terms."""
    root, images = _colmap_txt(tmp_path, "cap")
    whole = load_dataset(root)
    for p in (root / "sparse" / "0", root / "sparse" / "0" / "cameras.txt", root / "sparse" / "0" / "images.txt"):
        ds = load_dataset(p)
        assert ds.format == "colmap" and torch.equal(ds.splits["train"].c2w, whole.splits["train"].c2w)
    cams = root / "sparse" / "0" / "cameras.txt"
    f = cams.read_text().splitlines()[1].split()
    cams.write_text(" ".join(f[:4] + ["0"] + f[5:]) + "\n")
    with pytest.raises(InputError, match="focal length .* must be positive"):
        load_dataset(root)


@pytest.mark.parametrize("key,value,match", [
    ("fl_x", 1e-300, "must be finite, with fx, fy > 0"),  # finite in float64, 0 in the float32 the rays use
    ("fl_y", 1e-300, "differ more than 4×"),  # one focal length alone: pixels 10^300 times taller than wide
    ("cx", 1e300, "must be finite, with fx, fy > 0"),
    ("k2", 1e30, "squeezes a pixel into .* rad of the view"),
    ("k1", -2.0, "turns back .* inside the image"),
    ("p1", 5.0, "folds inside the image"),
    ("scale", 1e-300, "a scale in \\[1e-12, 1e\\+12\\]"),  # the world-to-unit-cube scale it gives
    ("w", 8e15, "off the optical axis"),  # with h at the same aspect: a focal length of ~1e-14 px
])
def test_ngp_numbers_that_break_the_float32_rays_are_refused(tmp_path, key, value, match):
    """Values that pass as finite float64 numbers but leave the rays non-finite, folded or 180° wide
    once stored as float32 (a fit would train on no sample and exit 0)."""
    root, path, meta = _ngp_capture(tmp_path, "cap")
    meta[key] = value
    if key == "w":
        meta["h"] = value * 1.5
    if key == "fl_x":  # both: square pixels, for the float32 check
        meta["fl_y"] = value
    path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match=match):
        load_dataset(root, format="ngp")


def test_distortion_fit_accepts_real_lenses_and_flags_folds():
    from vqad.nerf.lens import DISTORTION_TOL_PX, distortion_fit

    K = [100.0, 100.0, 67.5, 120.0]  # a wide 135×240 view: corners at r ≈ 1.4
    for k in ([0, 0, 0, 0], [-0.3, 0.1, 0, 0], [-0.25, 0.06, 1e-3, -1e-3], [0.5, 0.3, 0, 0]):
        fit = distortion_fit(K, k, (240, 135))
        assert fit.ok and fit.error_px < 1e-6 and fit.min_det > 0 and fit.reach <= 1, k
    for k in ([-0.5, 0, 0, 0], [-2, 0, 0, 0], [0, 0, 5, 0]):  # r (1 + k1 r²) turns back inside the image
        fit = distortion_fit(K, k, (240, 135))
        assert not fit.ok and (fit.min_det <= 0 or fit.error_px > DISTORTION_TOL_PX or fit.reach > 1), k


def test_capture_files_outside_the_capture_folder_are_refused(tmp_path):
    """A capture names the files vqad reads: an absolute path or '..' out of its folder is refused (not
    read: /etc/passwd would otherwise be opened as an image); a symbolic link inside it is followed."""
    outside = tmp_path / "outside.png"
    root, path, meta = _ngp_capture(tmp_path, "cap")
    Image.open(root / meta["frames"][0]["file_path"]).save(outside)
    for bad in ("../outside.png", str(outside), "../../../../../../etc/passwd"):
        m = json.loads(json.dumps(meta))
        m["frames"][1]["file_path"] = bad
        path.write_text(json.dumps(m))
        with pytest.raises(InputError, match="points outside the capture folder"):
            load_dataset(root, format="ngp")
    m = json.loads(json.dumps(meta))
    m["ply_file_path"] = str(tmp_path / "elsewhere.ply")
    path.write_text(json.dumps(m))
    with pytest.raises(InputError, match="ply_file_path .* points outside the capture folder"):
        load_dataset(root, format="ngp")
    (root / "linked").symlink_to(tmp_path)  # a link inside the capture: the user's own layout
    m = json.loads(json.dumps(meta))
    m["frames"][1]["file_path"] = "linked/outside.png"
    path.write_text(json.dumps(m))
    assert load_dataset(root, format="ngp").splits["train"].names[0] == "linked/outside.png"
    root, images = _colmap_txt(tmp_path, "col")
    lines = images.read_text().splitlines()
    images.write_text("\n".join(lines[:3] + [lines[3].replace("im001.png", "../../outside.png")] + lines[4:]) + "\n")
    with pytest.raises(InputError, match="image name '../../outside.png' points outside"):
        load_dataset(root, format="colmap")


def test_more_hostile_capture_files_are_one_line_errors(tmp_path):
    from vqad.nerf.formats.points import read_colmap_points, read_ply_points, write_ply_points

    root, path, meta = _ngp_capture(tmp_path, "deep")
    path.write_text("[" * 100_000)
    with pytest.raises(InputError, match="nested too deeply"):
        load_dataset(root, format="ngp")
    for key, value, match in [("offset", ["0.5", "0.5", "0.5"], "offset must be a list of 3 numbers"),
                              ("offset", [[0.5, 0.5, 0.5]], "offset must be a list of 3 numbers")]:
        root, path, meta = _ngp_capture(tmp_path, f"k{len(str(value))}")
        meta[key] = value
        path.write_text(json.dumps(meta))
        with pytest.raises(InputError, match=match):
            load_dataset(root, format="ngp")
    for pose, name in ((lambda m: [[str(v) for v in r] for r in m], "str"), (lambda m: [[True] * 4] * 4, "bool")):
        root, path, meta = _ngp_capture(tmp_path, name)
        meta["frames"][1]["transform_matrix"] = pose(meta["frames"][1]["transform_matrix"])
        path.write_text(json.dumps(meta))
        with pytest.raises(InputError, match="transform_matrix must be a 4×4"):
            load_dataset(root, format="ngp")
    root, path, meta = _ngp_capture(tmp_path, "same")
    for fr in meta["frames"]:
        fr["transform_matrix"] = meta["frames"][0]["transform_matrix"]
    path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match="has the same pose"):
        load_dataset(root, format="ngp")
    root, path, meta = _ngp_capture(tmp_path, "far")
    meta["frames"][1]["transform_matrix"][0][3] = 1e12
    path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match="scene-box half-sizes from the scene"):
        load_dataset(root, format="ngp")
    # points files whose counts under-claim their data, a property twice, points3D.bin a folder
    xyz = np.random.default_rng(2).normal(size=(6, 3))
    write_ply_points(tmp_path / "p.ply", xyz)
    data = (tmp_path / "p.ply").read_bytes()
    for blob, match in ((data.replace(b"vertex 6", b"vertex 2"), "bytes follow the 2 vertices"),
                        (data.replace(b"property float x\n", b"property float x\nproperty float x\n"), "declared more than once"),
                        (b"ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nproperty float y\nproperty float z\n"
                         b"end_header\n1 2 3\n4 5 6\n", "more vertex rows than")):
        (tmp_path / "x.ply").write_bytes(blob)
        with pytest.raises(InputError, match=match):
            read_ply_points(tmp_path / "x.ply")
    _points3d(tmp_path / "points3D.bin", xyz, True)
    data = (tmp_path / "points3D.bin").read_bytes()
    (tmp_path / "points3D.bin").write_bytes((2).to_bytes(8, "little") + data[8:])
    with pytest.raises(InputError, match="bytes follow the 2 points"):
        read_colmap_points(tmp_path)
    (tmp_path / "points3D.bin").unlink()
    (tmp_path / "points3D.bin").mkdir()
    with pytest.raises(InputError, match="is not a file"):
        read_colmap_points(tmp_path)
    # a COLMAP camera id twice: the second would replace the first for every image naming it
    root, images = _colmap_txt(tmp_path, "dupcam")
    cams = images.with_name("cameras.txt")
    cams.write_text(cams.read_text() + cams.read_text().splitlines()[1].replace("PINHOLE 8 8 ", "PINHOLE 8 8 999 999 ", 1)
                    .rsplit(" ", 2)[0] + "\n")
    with pytest.raises(InputError, match="camera id 1 appears twice"):
        load_dataset(root, format="colmap")


def test_nerfstudio_transforms_get_their_box_from_the_cameras(tmp_path):
    """A nerfstudio transforms.json (camera_model, no aabb_scale / scale / offset) is in its structure
    from motion's units: its box comes from the cameras as COLMAP's does, so the same capture at 20× the
    scale is the same scene in the unit cube. An instant-ngp file whose box its rays miss is warned about."""
    import copy
    import warnings

    from vqad.nerf.formats.common import CAMERA_BOX_OUTER
    from vqad.nerf.formats.ngp import is_nerfstudio

    root, path, meta = _ngp_capture(tmp_path, "cap")
    rays = {}
    for factor in (1.0, 20.0):
        m = {k: copy.deepcopy(v) for k, v in meta.items() if k not in ("aabb_scale", "scale", "offset", "ply_file_path")}
        m["camera_model"] = "OPENCV"
        for fr in m["frames"]:
            for r in range(3):
                fr["transform_matrix"][r][3] *= factor
        path.write_text(json.dumps(m))
        assert is_nerfstudio(m)
        ds = load_dataset(root, format="ngp")
        assert ds.outer_scale == CAMERA_BOX_OUTER and "the scene box from its cameras" in ds.split_sources["train"]
        o, d = camera_rays(ds.splits["train"], 0)
        rays[factor] = ds.normalization.to_unit(o), d
    assert torch.allclose(rays[1.0][0], rays[20.0][0], atol=1e-4) and torch.allclose(rays[1.0][1], rays[20.0][1], atol=1e-5)
    # an instant-ngp file (no camera_model) at 20×: its unit box is a speck in every view
    m = {k: copy.deepcopy(v) for k, v in meta.items()
         if k not in ("aabb_scale", "scale", "offset", "ply_file_path", "camera_model")}
    for fr in m["frames"]:
        for r in range(3):
            fr["transform_matrix"][r][3] *= 20.0
    path.write_text(json.dumps(m))
    assert not is_nerfstudio(m)
    with pytest.warns(UserWarning, match=r"the scene box covers 0\.\d% of the training pixels.*set aabb_scale"):
        load_dataset(root, format="ngp")
    path.write_text(json.dumps(meta))  # the capture as written: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_dataset(root, format="ngp")


@pytest.mark.parametrize("lens", ["pinhole", "fisheye"])
def test_depth_file_path_maps_back_project_onto_the_scene(tmp_path, lens):
    """synth-capture --depth writes nerfstudio-style depth (16-bit PNG, millimetres, depth_file_path): read
    back, every pixel's z-depth back-projected through the lens lands on the surface its ray hits."""
    from vqad.nerf.scene_capture import Environment, SceneCaptureConfig, write_capture

    cfg = SceneCaptureConfig(width=20, height=24, views=3, points=0, supersample=1, lens=lens)  # 50° / 120°
    path = write_capture(tmp_path / lens, cfg, depth=True)
    meta = json.loads(path.read_text())
    assert meta["depth_unit_scale_factor"] == 1e-3 and meta["frames"][0]["depth_file_path"] == "depth/0000.png"
    ds = load_dataset(path.parent, format="ngp")
    views = ds.splits["train"]
    assert views.depth is not None and bool((views.depth > 0).all())  # the room: every pixel hits something
    env = Environment(ground_y=cfg.ground_y, dome_radius=cfg.dome_radius, checker=cfg.checker)
    for i in range(len(views)):
        o, d = camera_rays(views, i)
        t, _, _ = env.raycast(o.double(), d.double(), True)
        x = backproject(views.c2w[i], views.intrinsics[i], pixel_centers(24, 20), views.depth[i].reshape(-1).float(),
                        views.distortion[i] if views.distortion is not None else None)
        assert torch.allclose(x.double(), o.double() + t[:, None] * d.double(), atol=5e-3)  # mm steps, float16


def test_depth_maps_smaller_than_their_images_and_bad_ones(tmp_path):
    """A phone's depth map is smaller than its photo: resized by nearest neighbour (nerfstudio's rule);
    a map of another aspect ratio, a colour image, a path outside the capture are refused; scale factors apply."""
    from PIL import Image

    root, path, meta = _ngp_capture(tmp_path, "cap")  # 8×12 images
    (root / "depth").mkdir()
    for i, fr in enumerate(meta["frames"]):
        Image.fromarray(np.full((6, 4), 1500 + i, dtype=np.uint16)).save(root / "depth" / f"{i}.png")  # half size
        fr["depth_file_path"] = f"depth/{i}.png"
    path.write_text(json.dumps(meta))
    views = load_dataset(root, format="ngp").splits["train"]
    assert views.depth.shape == (len(views), 12, 8)
    assert torch.allclose(views.depth[0].float(), torch.full((12, 8), 1.501), atol=1e-3)  # frame 1: 1501 mm
    meta["depth_unit_scale_factor"] = 0.01
    path.write_text(json.dumps(meta))
    assert torch.allclose(load_dataset(root, format="ngp").splits["train"].depth[0].float(), torch.full((12, 8), 15.01),
                          rtol=1e-3)
    for bad, match in ((np.zeros((5, 5), dtype=np.uint16), "must be the image's size or smaller with its aspect"),
                       (np.zeros((12, 8, 3), dtype=np.uint8), "depth needs one channel")):
        Image.fromarray(bad).save(root / "depth" / "0.png")
        with pytest.raises(InputError, match=match):
            load_dataset(root, format="ngp")
    meta["frames"][0]["depth_file_path"] = "../../elsewhere.png"
    path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match="points outside the capture folder"):
        load_dataset(root, format="ngp")
    meta["frames"][0]["depth_file_path"] = "depth/0.png"
    Image.fromarray(np.full((6, 4), 1500, dtype=np.uint16)).save(root / "depth" / "0.png")
    meta["depth_unit_scale_factor"] = -1
    path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match="depth_unit_scale_factor must be a positive number"):
        load_dataset(root, format="ngp")


# -- phone captures, hostile (a helper's pass on nerfstudio boxes and depth maps) ------------------------
def _depth_capture(tmp_path, name, factor=1.0, scale=1e-3, views=10):
    """A generated capture with depth maps as a nerfstudio file (no instant-ngp box), its poses and
    depths in units ``factor`` times the scene's."""
    from vqad.nerf.scene_capture import SceneCaptureConfig, write_capture

    path = write_capture(tmp_path / name, SceneCaptureConfig(width=24, height=40, views=views, points=0, supersample=1),
                         depth=True)
    meta = json.loads(path.read_text())
    for k in ("aabb_scale", "scale", "offset"):
        meta.pop(k)
    for fr in meta["frames"]:
        for r in range(3):
            fr["transform_matrix"][r][3] *= factor
    meta["depth_unit_scale_factor"] = scale * factor
    path.write_text(json.dumps(meta))
    return path.parent, path, meta


def test_depth_in_large_or_tiny_units_keeps_its_precision(tmp_path):
    """float16 holds depths to 65,504: poses in millimetres overflowed to inf; micro-units lost precision."""
    ref = load_dataset(_depth_capture(tmp_path, "one")[0], format="ngp").splits["train"].depth.float()
    for factor in (1e4, 1e-6):
        views = load_dataset(_depth_capture(tmp_path, f"f{factor:g}", factor)[0], format="ngp").splits["train"]
        assert views.depth.dtype == torch.float32 and bool(torch.isfinite(views.depth).all())
        assert torch.allclose(views.depth.double() / factor, ref.double(), rtol=1e-3)
    assert load_dataset(_depth_capture(tmp_path, "mm")[0], format="ngp").splits["train"].depth.dtype == torch.float16


def test_bad_depth_files_are_one_line_errors(tmp_path):
    from PIL import Image

    root, path, meta = _depth_capture(tmp_path, "cap")
    target = root / meta["frames"][1]["depth_file_path"]
    np.save(root / "empty.npy", np.zeros((0, 0)))
    (root / "nothing.npy").write_bytes(b"")
    np.savez(root / "arch.npz", a=np.ones((40, 24)))
    (root / "arch.npz").rename(root / "arch.npy")
    Image.fromarray(np.full((40, 24), 128, dtype=np.uint8)).save(root / "eight.png")
    (root / "folder.png").mkdir()
    for name, match in (("empty.npy", "non-empty 2-D array"), ("nothing.npy", "not a NumPy array file"),
                        ("arch.npy", "several arrays"), ("eight.png", "is a L image .* depth needs one channel of 16 bits"),
                        ("folder.png", "is not a regular file")):
        meta["frames"][1]["depth_file_path"] = name
        path.write_text(json.dumps(meta))
        with pytest.raises(InputError, match=match):
            load_dataset(root, format="ngp")
    np.save(root / "nan.npy", np.full((40, 24), np.nan))
    meta["frames"][1]["depth_file_path"] = "nan.npy"
    path.write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="1 of the 'train' views' depth maps hold no valid depth"):
        load_dataset(root, format="ngp")
    meta["frames"][1]["depth_file_path"] = target.relative_to(root).as_posix()
    for fr in meta["frames"][::2]:  # depth on some frames only (say, the held-out ones): refused, not ignored
        del fr["depth_file_path"]
    path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match="5 of its 10 frames name a depth_file_path"):
        load_dataset(root, format="ngp")


def test_exr_depth_prefers_its_z_channel_and_drops_the_background_value(tmp_path):
    from vqad.nerf.formats.common import DEPTH_BACKGROUND, _read_depth_values

    z = np.full((4, 5), 2.5, dtype=np.float32)
    z[0, 0] = 1e10  # Blender's background
    _write_exr(tmp_path / "d.exr", {"R": np.full((4, 5), 0.5), "G": np.zeros((4, 5)), "B": np.zeros((4, 5)), "Z": z})
    got = _read_depth_values(tmp_path / "d.exr")
    assert got[1, 1] == 2.5 and got[0, 0] >= DEPTH_BACKGROUND
    _write_exr(tmp_path / "layered.exr", {"ViewLayer.Combined.R": np.full((4, 5), 0.5), "ViewLayer.Depth.Z": z})
    assert _read_depth_values(tmp_path / "layered.exr")[1, 1] == 2.5


def test_forward_facing_nerfstudio_captures_get_the_box_of_their_points(tmp_path):
    """Cameras that look at no common point (parallel axes, or tilted by a degree): the box from the
    cameras sat on or behind them. The box of the back-projected depth holds the scene; without points
    or depth the capture is refused with what to give it."""
    from vqad.nerf.formats.common import capture_box
    from vqad.nerf.procedural import look_at

    root, path, meta = _depth_capture(tmp_path, "ff")
    for spread, name in ((0.0, "parallel"), (1.0, "diverging")):  # a row of cameras at z = 3 looking down −z
        for i, fr in enumerate(meta["frames"]):  # each turned 0° or 1° per step outward: their axes meet behind them
            x = -0.9 + 0.2 * i
            eye = torch.tensor([x, 0.3, 3.0])
            turn = math.tan(math.radians(spread * x / 0.9))
            fr["transform_matrix"] = look_at(eye, eye + torch.tensor([turn, 0.0, -1.0])).tolist()
        path.write_text(json.dumps(meta))
        ds = load_dataset(root, format="ngp")  # the depth maps do not match these poses: only the box matters here
        assert "the scene box from its points" in ds.split_sources["train"], name
        lo, hi = np.array(ds.bbox)
        assert ((np.array([0.0, 0.3, -1.0]) >= lo) & (np.array([0.0, 0.3, -1.0]) <= hi)).all(), name  # 4 in front
    poses = np.stack([np.array(fr["transform_matrix"]) for fr in meta["frames"]])
    with pytest.raises(InputError, match="do not look at a common point .* forward-facing"):
        capture_box(poses, "row")
    same = np.repeat(poses[:1], 4, axis=0)
    same[:, :3, 3] = [5.0, 1.0, -3.0]  # every camera at one point, not the origin
    with pytest.raises(InputError, match="every camera sits at one point"):
        capture_box(same, "one point")


def test_even_downscale_keeps_a_slope_depth_unbiased():
    from vqad.nerf.formats.common import downscale_depth

    z = np.add.outer(np.linspace(2.0, 3.0, 8), np.linspace(0.0, 0.4, 8)).astype(np.float32)  # a smooth slope
    for n in (2, 4):
        blocks = z.reshape(8 // n, n, 8 // n, n).mean(axis=(1, 3))
        assert np.allclose(downscale_depth(z, n), blocks, rtol=1e-5)  # a plane: the median is the mean
    rows = np.array([[2.0, 2.0], [2.2, 2.2]], dtype=np.float32)  # a slope along the rows: two pairs, one surface
    assert downscale_depth(rows, 2)[0, 0] == pytest.approx(2.1)
    edge = np.full((2, 2), 2.0, dtype=np.float32)
    edge[:, 1] = 6.0  # a silhouette: the nearer surface, not a depth between the two
    assert downscale_depth(edge, 2)[0, 0] == 2.0
    block = np.full((4, 4), 3.0, dtype=np.float32)
    block[:, 2:] = 4.0  # a 4 × 4 block split 8 / 8 by a silhouette a third deep: the nearer kept
    assert downscale_depth(block, 4)[0, 0] == pytest.approx(3.0)
    block[:, 2:] = 3.3  # a tenth deep: it cannot be told from a slope along the rows, and is averaged (documented)
    assert downscale_depth(block, 4)[0, 0] == pytest.approx(3.15)


def test_a_refused_fit_leaves_no_output_folder(tmp_path, capsys):
    from vqad.app.cli import main as cli_main

    root, path, meta = _depth_capture(tmp_path, "cap")
    meta["depth_unit_scale_factor"] = 1.0  # metres read as kilometres: no depth in the box
    path.write_text(json.dumps(meta))
    out = tmp_path / "fit"
    assert cli_main(["fit-nerf", str(root), "--format", "ngp", "--steps", "5", "--out", str(out), "--quiet"]) != 0
    assert "depth_unit_scale_factor" in capsys.readouterr().err
    assert not out.exists()


def test_depth_maps_in_other_units_than_the_poses_are_warned_about(tmp_path):
    """Moved between views by the poses, depth maps in the poses' units agree (0.4 % median on the
    generated room) and agree worse at any other scale; maps 2× off agree best at 0.5."""
    import warnings

    from vqad.nerf.formats.common import depth_agreement

    root, path, meta = _depth_capture(tmp_path, "cap", views=20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        views = load_dataset(root, format="ngp").splits["train"]
    assert depth_agreement(views) < 0.01 < depth_agreement(views, scale=0.71)
    for factor, scale in ((2.0, "0.5"), (0.5, "2"), (1e-3, "1000")):  # the last: metres read as millimetres
        meta["depth_unit_scale_factor"] = 1e-3 * factor
        path.write_text(json.dumps(meta))
        with pytest.warns(UserWarning, match=rf"agree with each other through the poses best when scaled by {scale} "):
            load_dataset(root, format="ngp")
    # any factor more than 10 % off (structure-from-motion poses and metric depth): the scale that fits, found
    for factor in (1.25, 0.8, 1.15, 3.3):
        meta["depth_unit_scale_factor"] = 1e-3 * factor
        path.write_text(json.dumps(meta))
        with pytest.warns(UserWarning, match="best when scaled by") as caught:
            load_dataset(root, format="ngp")
        said = next(str(w.message) for w in caught if "best when scaled by" in str(w.message))
        assert float(said.split("best when scaled by ")[1].split()[0]) == pytest.approx(1 / factor, rel=0.02)
    meta["depth_unit_scale_factor"] = 1e-3 * 1.05  # within 10 %: said nothing
    path.write_text(json.dumps(meta))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_dataset(root, format="ngp")
