"""Lens models (vqad.nerf.lens): OpenCV's radial-tangential (rational) and fisheye models against
formulas written out here, their inverse and Jacobian, and the readers that give them to the rays
(COLMAP's fisheye and FULL_OPENCV cameras, a transforms.json's is_fisheye / camera_model / k3)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from vqad.errors import InputError
from vqad.nerf.formats import load_dataset
from vqad.nerf.lens import (LENS_FISHEYE, LENS_OPENCV, _distort_jacobian, distort, distort_within, distortion_fit,
                            image_radius2, lens_rows, lens_summary, undistort)
from vqad.nerf.rays import camera_rays, project

FISHEYE = [LENS_FISHEYE, 0.05, -0.02, 0.0, 0.0, 0.004, -0.001, 0.0, 0.0]  # k1, k2, k3, k4 in columns 1, 2, 5, 6
RATIONAL = [LENS_OPENCV, -0.12, 0.03, 0.001, -0.002, 0.004, 0.05, 0.01, -0.003]  # FULL_OPENCV


def _fisheye_theta_d(theta, k1, k2, k3, k4):
    t2 = theta * theta
    return theta * (1 + k1 * t2 + k2 * t2 ** 2 + k3 * t2 ** 3 + k4 * t2 ** 4)


def _reference_fisheye_directions(K, lens, uv):
    """OpenGL camera directions through pixel coordinates ``uv (N, 2)`` of a fisheye camera, by
    bisection on θ (no Newton, no normalised pinhole coordinates: valid up to 90° and beyond)."""
    fx, fy, cx, cy = K
    k1, k2, k3, k4 = lens[1], lens[2], lens[5], lens[6]
    xd, yd = (uv[:, 0] - cx) / fx, (uv[:, 1] - cy) / fy
    out = []
    for a, b in zip(xd.tolist(), yd.tolist()):
        rd = math.hypot(a, b)
        lo, hi = 0.0, math.pi / 2 - 1e-9
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if _fisheye_theta_d(mid, k1, k2, k3, k4) < rd else (lo, mid)
        th = 0.5 * (lo + hi)
        s = math.sin(th) / rd if rd > 0 else 0.0
        out.append([s * a, -s * b, -math.cos(th)])
    return torch.tensor(out, dtype=torch.float64)


# -- the models against formulas written out here ----------------------------------------------
def test_fisheye_distortion_is_the_equidistant_model_of_the_direction():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(3000, 3, generator=gen, dtype=torch.float64)
    X[:, 2] = X[:, 2].abs() + 0.05  # in front, up to ~87° off axis
    r = X[:, :2].norm(dim=-1)
    th = torch.atan2(r, X[:, 2])
    thd = _fisheye_theta_d(th, FISHEYE[1], FISHEYE[2], FISHEYE[5], FISHEYE[6])
    expected = X[:, :2] / r[:, None] * thd[:, None]
    xy = X[:, :2] / X[:, 2:3]
    assert torch.allclose(distort(xy, torch.tensor(FISHEYE, dtype=torch.float64)), expected, atol=1e-12)
    # the centre: no 0 / 0, the direction stays put
    zero = torch.zeros(1, 2, dtype=torch.float64)
    assert torch.equal(distort(zero, torch.tensor(FISHEYE, dtype=torch.float64)), zero)
    # a fisheye with every coefficient zero is still a fisheye (θ_d = θ), not a pinhole
    plain = torch.tensor([LENS_FISHEYE] + [0.0] * 8, dtype=torch.float64)
    assert torch.allclose(distort(torch.tensor([[1.0, 0.0]], dtype=torch.float64), plain),
                          torch.tensor([[math.pi / 4, 0.0]], dtype=torch.float64))


def test_rational_distortion_is_opencvs_full_model():
    gen = torch.Generator().manual_seed(1)
    xy = (torch.rand(1000, 2, generator=gen, dtype=torch.float64) - 0.5) * 1.4
    _, k1, k2, p1, p2, k3, k4, k5, k6 = RATIONAL
    x, y = xy[:, 0], xy[:, 1]
    r2 = x * x + y * y
    R = (1 + k1 * r2 + k2 * r2 ** 2 + k3 * r2 ** 3) / (1 + k4 * r2 + k5 * r2 ** 2 + k6 * r2 ** 3)
    expected = torch.stack([x * R + 2 * p1 * x * y + p2 * (r2 + 2 * x * x),
                            y * R + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y], -1)
    assert torch.allclose(distort(xy, torch.tensor(RATIONAL, dtype=torch.float64)), expected, atol=1e-12)
    # four coefficients are OpenCV's k1, k2, p1, p2: the same as the row with k3..k6 = 0
    four = torch.tensor([k1, k2, p1, p2], dtype=torch.float64)
    assert torch.equal(distort(xy, four), distort(xy, torch.tensor([0, k1, k2, p1, p2, 0, 0, 0, 0], dtype=torch.float64)))
    assert lens_rows(four).tolist() == [0, k1, k2, p1, p2, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="lens parameters"):
        lens_rows(torch.zeros(5))


@pytest.mark.parametrize("lens", [FISHEYE, RATIONAL], ids=["fisheye", "rational"])
def test_jacobian_matches_finite_differences(lens):
    gen = torch.Generator().manual_seed(2)
    x, y = ((torch.rand(2, 400, generator=gen, dtype=torch.float64) - 0.5) * 1.6).unbind(0)
    x[:3] = torch.tensor([0.0, 1e-5, 3e-4])  # at and near the centre, where the fisheye's factor is a series
    y[:3] = torch.tensor([0.0, -2e-5, 1e-4])
    k = lens_rows(torch.tensor(lens, dtype=torch.float64), x.numel())
    xd, yd, a, b, d = _distort_jacobian(x, y, k)
    h = 1e-7
    xdx, ydx, *_ = _distort_jacobian(x + h, y, k)
    xdy, ydy, *_ = _distort_jacobian(x, y + h, k)
    assert torch.allclose((xdx - xd) / h, a, atol=1e-5)
    assert torch.allclose((ydx - yd) / h, b, atol=1e-5)
    assert torch.allclose((xdy - xd) / h, b, atol=1e-5)
    assert torch.allclose((ydy - yd) / h, d, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_undistort_inverts_a_wide_fisheye_and_the_rational_model(dtype, tol):
    gen = torch.Generator().manual_seed(3)
    theta = torch.rand(2000, generator=gen, dtype=torch.float64) * math.radians(84)
    phi = torch.rand(2000, generator=gen, dtype=torch.float64) * 2 * math.pi
    xy = torch.stack([torch.cos(phi), torch.sin(phi)], -1) * torch.tan(theta)[:, None]  # up to 84° off axis
    k = torch.tensor(FISHEYE, dtype=dtype)
    back = undistort(distort(xy.to(dtype), k), k)
    # compare angles (a wide ray's normalised radius is ~10: its relative error is what matters)
    got = torch.atan(back.double().norm(dim=-1))
    assert (got - theta).abs().max() < tol * 10
    xy = (torch.rand(2000, 2, generator=gen, dtype=torch.float64) - 0.5) * 1.2
    k = torch.tensor(RATIONAL, dtype=dtype)
    assert (undistort(distort(xy.to(dtype), k), k).double() - xy).abs().max() < tol * 10


def test_distortion_fit_accepts_a_wide_fisheye_and_refuses_a_folding_one():
    K = [300.0, 300.0, 320.0, 240.0]  # a 640×480 image whose corners are ~75° off axis through this lens
    fit = distortion_fit(K, FISHEYE, (480, 640))
    assert fit.ok and fit.error_px < 1e-6 and fit.branch_deg == pytest.approx(89.5)
    fold = [LENS_FISHEYE, -0.6, 0.0, 0, 0, 0.0, 0.0, 0, 0]  # θ_d turns back before the corners
    fit = distortion_fit(K, fold, (480, 640))
    assert not fit.ok and fit.reach > 1 and fit.branch_deg < 60


def test_projection_through_the_lens_lands_on_the_pixel_and_folds_are_not_seen():
    from vqad.nerf.data import Views

    H, W = 48, 64
    K = torch.tensor([[30.0, 30.0, 32.0, 24.0]], dtype=torch.float64)  # corners ~73° off axis
    views = Views(images=torch.zeros(1, H, W, 3, dtype=torch.uint8), c2w=torch.eye(4)[None],
                  intrinsics=K.float(), distortion=torch.tensor([FISHEYE]))
    gen = torch.Generator().manual_seed(4)
    uv = torch.rand(200, 2, generator=gen, dtype=torch.float64) * torch.tensor([W, H], dtype=torch.float64)
    dirs = _reference_fisheye_directions(K[0].tolist(), FISHEYE, uv)
    u, v, z = project(views, 0, (dirs * 2.5).float())
    assert torch.allclose(u.double(), uv[:, 0], atol=2e-3) and torch.allclose(v.double(), uv[:, 1], atol=2e-3)
    # a strong barrel lens: directions far outside the image fold back into it through the polynomial
    barrel, f = torch.tensor([LENS_OPENCV, -0.3, 0.0, 0, 0, 0, 0, 0, 0]), 80.0
    far_out = torch.tensor([[1.9, 0.0]])  # r² = 3.61: R = 1 − 0.3 r² = −0.083, mirrored onto the image
    assert 0 <= 32 + f * float(distort(far_out, barrel)[0, 0]) < W
    r2 = image_radius2(torch.tensor([f, f, 32.0, 24.0]), barrel, (H, W))
    assert r2 < 0.5 and torch.isinf(distort_within(far_out, barrel, r2)).all()
    assert torch.isfinite(distort_within(torch.tensor([[0.3, 0.2]]), barrel, r2)).all()


# -- the readers -------------------------------------------------------------------------------------
def _colmap_capture(root, c2w, hw, camera: str, params: list[float]):
    """A COLMAP text model of one camera for OpenGL poses ``c2w (N, 4, 4)`` with black images."""
    from PIL import Image
    from scipy.spatial.transform import Rotation

    (root / "images").mkdir(parents=True)
    (root / "sparse" / "0").mkdir(parents=True)
    lines = []
    for i, pose in enumerate(c2w.double().numpy()):
        Image.fromarray(np.zeros(hw + (3,), dtype=np.uint8)).save(root / "images" / f"im{i:03d}.png")
        cv = pose @ np.diag([1.0, -1.0, -1.0, 1.0])
        R = cv[:3, :3].T
        t = -R @ cv[:3, 3]
        x, y, z, w = Rotation.from_matrix(R).as_quat()
        lines.append(f"{i + 1} " + " ".join(repr(float(v)) for v in (w, x, y, z, *t)) + f" 1 im{i:03d}.png\n\n")
    (root / "sparse" / "0" / "cameras.txt").write_text(f"1 {camera} {hw[1]} {hw[0]} {' '.join(map(repr, params))}\n")
    (root / "sparse" / "0" / "images.txt").write_text("".join(lines))
    return root


def _ring(n=9):
    from vqad.nerf.scene_capture import SceneCaptureConfig, _cameras

    c2w, _ = _cameras(SceneCaptureConfig(width=8, height=8, views=n))
    return c2w


@pytest.mark.parametrize("camera,params,row", [
    ("OPENCV_FISHEYE", [20.0, 21.0, 16.0, 12.5, 0.05, -0.02, 0.004, -0.001], FISHEYE),
    ("SIMPLE_RADIAL_FISHEYE", [20.0, 16.0, 12.5, 0.05], [LENS_FISHEYE, 0.05, 0, 0, 0, 0, 0, 0, 0]),
    ("RADIAL_FISHEYE", [20.0, 16.0, 12.5, 0.05, -0.02], [LENS_FISHEYE, 0.05, -0.02, 0, 0, 0, 0, 0, 0]),
    ("FULL_OPENCV", [20.0, 21.0, 16.0, 12.5, -0.12, 0.03, 0.001, -0.002, 0.004, 0.05, 0.01, -0.003], RATIONAL),
])
def test_colmap_lenses_reach_the_rays(tmp_path, camera, params, row):
    hw = (25, 32)
    root = _colmap_capture(tmp_path / camera, _ring(), hw, camera, params)
    ds = load_dataset(root, format="colmap")
    views = ds.splits["train"]
    assert torch.allclose(views.distortion[0], torch.tensor(row, dtype=torch.float32))
    uv = torch.tensor([[0.5 + c, 0.5 + r] for r in range(hw[0]) for c in range(hw[1])], dtype=torch.float64)
    K = views.intrinsics[0].double().tolist()
    _, d = camera_rays(views, 0)
    R = views.c2w[0, :3, :3].double()
    if row[0] == LENS_FISHEYE:
        ref = _reference_fisheye_directions(K, row, uv) @ R.T
    else:  # the rational model: a pixel's ray, distorted again, lands on that pixel
        cam = d.double() @ R
        xy = torch.stack([cam[:, 0] / -cam[:, 2], -cam[:, 1] / -cam[:, 2]], -1)
        back = distort(xy, torch.tensor(row, dtype=torch.float64))
        assert torch.allclose(back[:, 0] * K[0] + K[2], uv[:, 0], atol=2e-3)
        assert torch.allclose(back[:, 1] * K[1] + K[3], uv[:, 1], atol=2e-3)
        return
    assert torch.linalg.cross(d.double(), ref).norm(dim=-1).max() < 2e-6  # sin of the angle between them


def _ngp_fisheye(tmp_path, name, **lens):
    from vqad.nerf.scene_capture import SceneCaptureConfig, write_capture

    path = write_capture(tmp_path / name, SceneCaptureConfig(width=16, height=12, views=3))
    meta = json.loads(path.read_text())
    if "is_fisheye" in lens and "camera_model" not in lens:
        del meta["camera_model"]  # the capture says OPENCV: is_fisheye true beside it would contradict it
    meta.update(lens)
    path.write_text(json.dumps(meta))
    return path.parent, meta


def test_ngp_fisheye_and_k3_reach_the_rays(tmp_path):
    root, meta = _ngp_fisheye(tmp_path, "fish", is_fisheye=True, k1=0.05, k2=-0.02, k3=0.004, k4=-0.001)
    views = load_dataset(root, format="ngp").splits["train"]
    assert torch.allclose(views.distortion[0], torch.tensor(FISHEYE))
    K = views.intrinsics[0].double().tolist()
    uv = torch.tensor([[0.5, 0.5], [15.5, 11.5], [8.0, 6.0], [3.5, 9.5]], dtype=torch.float64)
    from vqad.nerf.rays import rays_for_pixels

    _, d = rays_for_pixels(torch.eye(4), views.intrinsics[0], uv.float(), views.distortion[0])
    assert torch.allclose(d.double(), _reference_fisheye_directions(K, FISHEYE, uv), atol=1e-5)
    # nerfstudio's spelling, and a fisheye with no coefficients is a fisheye all the same
    root, _ = _ngp_fisheye(tmp_path, "ns", camera_model="OPENCV_FISHEYE")
    views = load_dataset(root, format="ngp").splits["train"]
    assert views.distortion[0].tolist() == [LENS_FISHEYE] + [0.0] * 8
    # k3 on a pinhole camera is OpenCV's r⁶ term (nerfstudio writes it)
    root, _ = _ngp_fisheye(tmp_path, "k3", k1=0.01, k3=0.002)
    views = load_dataset(root, format="ngp").splits["train"]
    assert torch.allclose(views.distortion[0], torch.tensor([LENS_OPENCV, 0.01, 0, 0, 0, 0.002, 0, 0, 0]))


@pytest.mark.parametrize("lens,match", [
    (dict(is_fisheye=True, p1=0.01), "a fisheye camera has no tangential terms"),
    (dict(camera_model="OPENCV_FISHEYE", k1=-0.6), r"turns back \(or meets its pole\) 42\.\d° off axis, inside the image"),
    (dict(is_fisheye=True, fl_x=2.0, fl_y=2.0), r"its image reaches past 89\.5° off the optical axis .* crop the images"),
    (dict(is_fisheye=True, fl_x=6.6, fl_y=6.6), r"its image corners look 8[6-9]\.\d° off the optical axis .* crop the"),
])
def test_ngp_fisheye_errors(tmp_path, lens, match):
    root, _ = _ngp_fisheye(tmp_path, "bad", **lens)
    with pytest.raises(InputError, match=match):
        load_dataset(root, format="ngp")


def test_generated_fisheye_capture_reads_back_as_it_was_rendered(tmp_path):
    """synth-capture --lens fisheye: every pixel (one ray each) is the scene's colour along the ray
    the reader gives it, and the transforms.json speaks both instant-ngp's and nerfstudio's keys."""
    from vqad.nerf.scene_capture import Environment, SceneCaptureConfig, write_capture

    cfg = SceneCaptureConfig(width=20, height=24, views=3, points=0, supersample=1, lens="fisheye")  # 120° by default
    path = write_capture(tmp_path / "fish", cfg)
    meta = json.loads(path.read_text())
    assert meta["is_fisheye"] is True and meta["camera_model"] == "OPENCV_FISHEYE" and "p1" not in meta
    ds = load_dataset(path.parent, format="ngp")
    views = ds.splits["train"]
    assert int(views.distortion[0, 0]) == LENS_FISHEYE
    env = Environment(ground_y=cfg.ground_y, dome_radius=cfg.dome_radius, checker=cfg.checker)
    o, d = camera_rays(views, 0)
    _, color, _ = env.raycast(o, d, True)
    got = views.images[0].reshape(-1, 3).float() / 255
    assert (got - color).abs().max() < 1.5 / 255
    # the image's top and bottom rows look 60° off axis (fov_y 120°), through the lens
    axis = -views.c2w[0, :3, 2]
    top = d.reshape(24, 20, 3)[0, 10]  # the pixel at the top edge's middle, half a pixel in
    assert abs(math.degrees(math.acos(float(top @ axis))) - 60.0) < 3.0
    with pytest.raises(InputError, match="lens must be one of"):
        SceneCaptureConfig(lens="fish").validate()


def test_views_hold_lens_rows_and_say_which():
    from vqad.nerf.data import Views

    def views(rows):
        return Views(images=torch.zeros(len(rows), 2, 2, 3, dtype=torch.uint8), c2w=torch.eye(4).repeat(len(rows), 1, 1),
                     intrinsics=torch.ones(len(rows), 4), distortion=torch.tensor(rows))

    v = views([[0.1, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])  # k1, k2, p1, p2 become OpenCV rows
    assert v.distortion.shape == (2, 9) and v.distortion[0, 1] == pytest.approx(0.1)
    assert lens_summary(v) == ", lenses: OpenCV radial-tangential (1 view)"
    assert lens_summary(views([FISHEYE, FISHEYE, RATIONAL])) == (", lenses: OpenCV fisheye (2 views), "
                                                                 "OpenCV radial-tangential (1 view)")
    with pytest.raises(ValueError, match="model must be one of"):
        views([[2.0] + [0.0] * 8])
    with pytest.raises(ValueError, match="lens rows of shape"):
        Views(images=torch.zeros(2, 2, 2, 3, dtype=torch.uint8), c2w=torch.eye(4).repeat(2, 1, 1),
              intrinsics=torch.ones(2, 4), distortion=torch.zeros(3, 9))


def test_fisheye_capture_fits_from_the_command_line(tmp_path, capsys):
    """synth-capture --lens fisheye → fit-nerf: the fit says which lens its rays undo and trains; a field
    of view the capture cannot have is refused before anything is written."""
    from vqad.app.cli import main as cli_main

    cap = tmp_path / "fish"
    assert cli_main(["synth-capture", "-o", str(cap), "--lens", "fisheye", "--size", "24x40", "--views", "10",
                     "--supersample", "1"]) == 0
    assert "fisheye lens, 120° tall" in capsys.readouterr().out
    out = tmp_path / "fit"
    assert cli_main(["fit-nerf", str(cap), "--format", "ngp", "--levels", "3:5", "--features", "4", "--steps", "30",
                     "--batch-rays", "256", "--out", str(out), "--device", "cpu", "--quiet", "--eval-max-views", "1"]) == 0
    text = capsys.readouterr().out
    assert "lenses: OpenCV fisheye (8 views)" in text and "LOD 5: PSNR" in text
    assert cli_main(["synth-capture", "-o", str(tmp_path / "wide"), "--lens", "fisheye", "--fov", "175"]) != 0
    assert "field of view must be in (0, 170)" in capsys.readouterr().err
    assert cli_main(["synth-capture", "-o", str(tmp_path / "wide"), "--lens", "fisheye", "--fov", "160",
                     "--size", "240x135"]) != 0  # its corners would look past 85°: a capture the readers refuse
    assert "more than 85° off its axis at the corners" in capsys.readouterr().err
    assert not (tmp_path / "wide").exists()


# -- hostile lenses (a helper's pass): every pixel's ray on the radial map's main branch -----------------
def _pixel_grid(h, w):
    return torch.tensor([[c + 0.5, r + 0.5] for r in range(h) for c in range(w)], dtype=torch.float64)


def _round_trip_px(K, row, uv):
    """Where each pixel's ray (float32, as training casts it) lands back through the lens, in pixels."""
    from vqad.nerf.rays import camera_directions

    d = camera_directions(torch.tensor(K, dtype=torch.float32), uv.float(), torch.tensor(row, dtype=torch.float32))
    xy = torch.stack([d[:, 0], -d[:, 1]], -1).double()  # z = −1
    back = distort(xy, torch.tensor(row, dtype=torch.float64))
    return torch.stack([back[:, 0] * K[0] + K[2], back[:, 1] * K[1] + K[3]], -1)


def test_a_lens_with_a_pole_beyond_the_image_gives_main_branch_rays_and_one_inside_is_refused():
    """FULL_OPENCV R = (1 + k2 r⁴) / (1 + k4 r²): the map is one-to-one up to its pole at r = 1/√−k4, and
    Newton from the distorted corner settled beyond the pole (18° off); each ray must be the main branch's."""
    K, row = [20.0, 20.0, 16.0, 12.5], [LENS_OPENCV, 0, -0.7041, 0, 0, 0, -1.0658, 0, 0]
    fit = distortion_fit(K, row, (25, 32))
    assert fit.ok and fit.reach <= 1
    uv = _pixel_grid(25, 32)
    assert (_round_trip_px(K, row, uv) - uv).norm(dim=-1).max() < 1e-3
    from vqad.nerf.rays import camera_directions

    d = camera_directions(torch.tensor(K), uv.float(), torch.tensor(row)).double()
    assert float((d[:, :2].norm(dim=-1) / d[:, 2].abs()).max()) < 1.0 / math.sqrt(1.0658)  # inside the pole
    # k4 = −1 alone: the corner's one preimage lies below the pole (a valid lens, refused before as a fold)
    assert distortion_fit(K, [LENS_OPENCV, 0, 0, 0, 0, 0, -1.0, 0, 0], (25, 32)).ok
    # P = Q = 1 − 2 r²: 0 / 0 on a circle inside the image (NaN rays there before): refused
    bad = distortion_fit([20.0, 20.0, 15.5, 12.5], [LENS_OPENCV, -2.0, 0, 0, 0, 0, -2.0, 0, 0], (25, 32))
    assert not bad.ok and bad.reach > 1


def test_a_fisheye_that_flattens_gives_every_pixel_its_ray():
    """θ_d = θ (1 − 0.7998 θ⁴ + 0.4592 θ⁶) rises monotonically to 85° but nearly flattens: Newton from the
    distorted point failed on pixels between distortion_fit's old 17 × 17 points (rays at 90°)."""
    K, row = [16.14, 16.14, 16.0, 12.5], [LENS_FISHEYE, 0, -0.7998, 0, 0, 0.4592, 0, 0, 0]
    assert distortion_fit(K, row, (25, 32)).ok
    uv = _pixel_grid(25, 32)
    assert (_round_trip_px(K, row, uv) - uv).norm(dim=-1).max() < 1e-2


def test_lens_keys_of_a_frame_decide_and_contradictions_are_refused(tmp_path):
    root, meta = _ngp_fisheye(tmp_path, "keys", is_fisheye=True, k1=0.05)
    meta["frames"][1].update(camera_model="PINHOLE", k1=0.0)  # this frame: a plain pinhole
    (root / "transforms.json").write_text(json.dumps(meta))
    ds = load_dataset(root, format="ngp")
    assert ds.splits["train"].distortion[0].tolist() == [0.0] * 9  # frame 1 is the first training view
    assert int(ds.splits["train"].distortion[1, 0]) == LENS_FISHEYE
    for keys, match in ((dict(camera_model="OPENCV_FISHEYE", is_fisheye=False), "contradict each other"),
                        (dict(camera_model=False), "camera_model must be a name")):
        root, _ = _ngp_fisheye(tmp_path, f"bad{len(match)}", **keys)
        with pytest.raises(InputError, match=match):
            load_dataset(root, format="ngp")


def test_colmap_binary_records_of_the_wrong_length_are_refused(tmp_path):
    """model 5 (OPENCV_FISHEYE, 8 parameters) followed by 12: read shifted before, now refused."""
    import struct

    root = _colmap_capture(tmp_path / "bin", _ring(3), (25, 32), "OPENCV_FISHEYE", [20.0, 20.0, 16.0, 12.5, 0, 0, 0, 0])
    model = root / "sparse" / "0"
    (model / "cameras.txt").unlink()
    images = (model / "images.txt").read_text().split("\n")
    (model / "images.txt").unlink()
    with open(model / "images.bin", "wb") as f:
        f.write(struct.pack("<Q", 3))
        for line in images[::2][:3]:
            v = line.split()
            f.write(struct.pack("<i7di", int(v[0]), *map(float, v[1:8]), int(v[8])) + v[9].encode() + b"\0"
                    + struct.pack("<Q", 0))
    (model / "cameras.bin").write_bytes(struct.pack("<Q", 1) + struct.pack("<iiQQ", 1, 5, 32, 25)
                                        + struct.pack("<12d", 20.0, 20.0, 16.0, 12.5, 0.05, -0.02, 0.003, -0.002, 0, 0, 0, 0))
    with pytest.raises(InputError, match="32 bytes after its 1 cameras"):
        load_dataset(root, format="colmap")


def test_a_training_batch_casts_through_its_prepared_lenses_as_through_the_rows():
    """RayBatcher prepares its lenses once (lens_table: no sort, table or host sync per step); its rays
    are those of the lens rows themselves, for views mixing a fisheye, a rational lens and a pinhole."""
    from vqad.nerf.data import Views
    from vqad.nerf.lens import LensBatch, lens_table
    from vqad.nerf.rays import pixel_rays

    rows = torch.tensor([FISHEYE, RATIONAL, [0.0] * 9, FISHEYE])
    table, which = lens_table(rows)
    assert table.rows.shape[0] == 3 and table.fisheye and torch.equal(table.rows[which], rows)
    gen = torch.Generator().manual_seed(5)
    xy = torch.rand(400, 2, generator=gen) - 0.5
    view = torch.randint(0, 4, (400,), generator=gen)
    assert torch.allclose(undistort(xy, LensBatch(table, which[view])), undistort(xy, rows[view]), atol=1e-6)
    c2w = torch.eye(4).repeat(400, 1, 1)
    K = torch.tensor([30.0, 30.0, 32.0, 24.0]).repeat(400, 1)
    px, py = torch.randint(0, 64, (400,), generator=gen), torch.randint(0, 48, (400,), generator=gen)
    a = pixel_rays(c2w, K, px, py, LensBatch(table, which[view]))
    b = pixel_rays(c2w, K, px, py, rows[view])
    assert all(torch.allclose(u, v, atol=1e-6) for u, v in zip(a, b))
    views = Views(images=torch.zeros(4, 48, 64, 3, dtype=torch.uint8), c2w=torch.eye(4).repeat(4, 1, 1),
                  intrinsics=torch.tensor([30.0, 30.0, 32.0, 24.0]).repeat(4, 1), distortion=rows)
    assert torch.equal(views.distortion, rows)
