"""RGB-D sequences (vqad.tsdf.rgbd) and synthetic scans (vqad.tsdf.synth).

Readers are tested on fixtures in each layout: a hand-written TUM folder (not produced by vqad's
writer), round trips through the writers, an RTMV folder cross-checked against vqad's radiance-field
reader, and the procedural scene against its analytic signed distance. Synthetic depth is checked
against analytic depth (plane, sphere); the noise model against its formula.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from vqad.errors import InputError
from vqad.sdf.mesh import Mesh
from vqad.tsdf.rgbd import (GL_TO_CV, RGBDSequence, check_pose, detect_sequence_format, matrix_to_quaternion,
                            quaternion_to_matrix, read_redwood, read_rtmv_sequence, read_tum)
from vqad.tsdf.sources import read_sequence
from vqad.tsdf.synth import (DepthNoise, look_at_cv, procedural_sdf, procedural_sequence, synth_sequence,
                             write_redwood, write_tum)
from conftest import need_open3d


def _backproject(seq: RGBDSequence, i: int) -> np.ndarray:
    """World points ``(M, 3)`` of frame ``i``'s valid depth pixels (OpenCV pixel centres at integers)."""
    z = seq.depth(i).astype(np.float64)
    rows, cols = np.nonzero(z > 0)
    K = seq.intrinsics
    zz = z[rows, cols]
    cam = np.stack([(cols - K[0, 2]) / K[0, 0] * zz, (rows - K[1, 2]) / K[1, 1] * zz, zz], -1)
    p = seq.poses[i]
    return cam @ p[:3, :3].T + p[:3, 3]


def _plane(half: float = 5.0) -> Mesh:
    """The square ``|x|, |y| ≤ half`` of the plane z = 0 (two triangles)."""
    v = np.array([[-half, -half, 0], [half, -half, 0], [half, half, 0], [-half, half, 0]], dtype=np.float64)
    return Mesh(v, np.array([[0, 1, 2], [0, 2, 3]]))


def _sphere(subdivisions: int = 5) -> Mesh:
    import trimesh

    s = trimesh.creation.icosphere(subdivisions)
    return Mesh(np.asarray(s.vertices, np.float64), np.asarray(s.faces, np.int64))


@pytest.fixture(scope="module")
def sphere_scan():
    """A small exact scan of a sphere with colour: ``(sequence, gt_mesh)``."""
    need_open3d("synthetic scans need open3d (pip install 'vqad[tsdf]')")
    return synth_sequence(_sphere(), n_frames=6, width=64, height=48, noise=DepthNoise.none())


@pytest.fixture(scope="module")
def noisy_scan():
    need_open3d("synthetic scans need open3d (pip install 'vqad[tsdf]')")
    return synth_sequence(_sphere(), n_frames=5, width=64, height=48, noise=DepthNoise(), seed=3)[0]


# -- poses and quaternions -------------------------------------------------------------------------
def test_quaternion_matrix_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(50):
        q = rng.standard_normal(4)
        q /= np.linalg.norm(q)
        r = quaternion_to_matrix(q)
        assert np.allclose(r.T @ r, np.eye(3), atol=1e-12) and np.linalg.det(r) > 0
        q2 = matrix_to_quaternion(r)
        assert np.allclose(q2, q if q[3] >= 0 else -q, atol=1e-12)
    # 90° about z: x → y
    s = math.sqrt(0.5)
    assert np.allclose(quaternion_to_matrix([0, 0, s, s]) @ [1, 0, 0], [0, 1, 0])


def test_check_pose_refuses_non_rigid():
    m = np.eye(4)
    check_pose(m, "ok")
    for bad, words in ((np.diag([2.0, 1, 1, 1]), "not rigid"), (np.diag([-1.0, 1, 1, 1]), "not rigid"),
                       (np.full((4, 4), np.nan), "non-finite"), (np.zeros((3, 4)), "4×4")):
        with pytest.raises(InputError, match=words):
            check_pose(bad, "pose 0")


def test_look_at_cv_is_opencv():
    p = look_at_cv([0, 0, -2], [0, 0, 0], up=[0, 1, 0])
    assert np.allclose(p[:3, 2], [0, 0, 1])  # z forward, towards the target
    assert np.allclose(p[:3, 1], [0, -1, 0])  # y down, against up
    assert np.isclose(np.linalg.det(p[:3, :3]), 1.0)


# -- a hand-written TUM fixture --------------------------------------------------------------------
def _write_hand_tum(root, *, depth_mode="I;16", drop_file=False, bad_quat=False, nan_pose=False, camera=True):
    """A TUM RGB-D folder as TUM publishes it (comments, rgb/depth time stamps ~10 ms apart, ground
    truth at 100 Hz starting after the first depth frame), 8×6 images, depth 1.0/1.2/1.4 m × 5000."""
    root.mkdir(parents=True)
    (root / "rgb").mkdir()
    (root / "depth").mkdir()
    d_ts = [10.000, 10.033, 10.067, 10.100]
    c_ts = [10.011, 10.042, 10.077, 10.108]
    dl = ["# depth maps", "# file: 'rgbd_dataset_freiburg1_xyz.bag'", "# timestamp filename"]
    cl = ["# color images", "# file: 'rgbd_dataset_freiburg1_xyz.bag'", "# timestamp filename"]
    for k, (td, tc) in enumerate(zip(d_ts, c_ts)):
        z = np.full((6, 8), 5000 + 1000 * k, np.uint16)
        z[0, 0] = 0  # a missing pixel
        img = Image.fromarray(z) if depth_mode == "I;16" else Image.fromarray((z // 100).astype(np.uint8))
        if not (drop_file and k == 2):
            img.save(root / "depth" / f"{td:.6f}.png")
        Image.fromarray(np.full((6, 8, 3), 40 * k, np.uint8)).save(root / "rgb" / f"{tc:.6f}.png")
        dl.append(f"{td:.6f} depth/{td:.6f}.png")
        cl.append(f"{tc:.6f} rgb/{tc:.6f}.png")
    s = math.sqrt(0.5)
    gl = ["# ground truth trajectory", "# timestamp tx ty tz qx qy qz qw"]
    for j in range(15):  # 10.025 .. 10.165 at 100 Hz: none within 0.02 s of the first depth frame
        t = 10.025 + 0.01 * j
        q = (0, 0, s, s) if not bad_quat else (0, 0, 1, 1)
        tx = "nan" if nan_pose and j == 1 else f"{0.1 * j:.4f}"
        gl.append(f"{t:.4f} {tx} 0.5 1.0 {q[0]:.6f} {q[1]:.6f} {q[2]:.6f} {q[3]:.6f}")
    (root / "depth.txt").write_text("\n".join(dl) + "\n")
    (root / "rgb.txt").write_text("\n".join(cl) + "\n")
    (root / "groundtruth.txt").write_text("\n".join(gl) + "\n")
    if camera:
        (root / "camera.txt").write_text("# fx fy cx cy\n10.0 10.0 3.5 2.5\n")
    return root


def test_tum_reader_on_a_hand_written_fixture(tmp_path):
    root = _write_hand_tum(tmp_path / "seq")
    assert detect_sequence_format(root) == "tum"
    seq = read_sequence(root)
    # depth 10.000 has no pose within 0.02 s (the first is 10.025): dropped; the rest pair up
    assert len(seq) == 3 and (seq.width, seq.height) == (8, 6) and seq.has_color
    assert seq.note == "1 of 4 depth frames left out: no ground-truth pose or colour frame within 0.02 s"
    assert np.allclose(seq.intrinsics, [[10, 0, 3.5], [0, 10, 2.5], [0, 0, 1]])
    for i, k in enumerate((1, 2, 3)):
        z = seq.depth(i)
        assert z.dtype == np.float32 and z.shape == (6, 8)
        assert z[0, 0] == 0 and np.allclose(z[1:], (5000 + 1000 * k) / 5000)
        assert (seq.color(i) == 40 * k).all()  # the rgb frame of the same capture, not a neighbour's
    # nearest ground truth: 10.033 → 10.035 (j = 1), 10.067 → 10.065 (j = 4), 10.100 → 10.105 (j = 8)
    # (10.095 and 10.105 are equally near 10.100 in decimal but not in binary: accept either)
    assert np.isclose(seq.poses[0, 0, 3], 0.1) and np.isclose(seq.poses[1, 0, 3], 0.4)
    assert np.isclose(seq.poses[2, 0, 3], 0.7) or np.isclose(seq.poses[2, 0, 3], 0.8)
    assert np.allclose(seq.poses[:, :3, 3][:, 1:], [0.5, 1.0])
    assert np.allclose(seq.poses[0, :3, :3] @ [1, 0, 0], [0, 1, 0], atol=1e-6)  # 90° about z


def test_tum_intrinsics_from_the_folder_name_or_refused(tmp_path):
    root = _write_hand_tum(tmp_path / "nocam", camera=False)
    with pytest.raises(InputError, match="unknown camera"):
        read_tum(root)
    # fr1's calibration, but these 8×6 images are not 640×480: refused
    fr1 = _write_hand_tum(tmp_path / "rgbd_dataset_freiburg1_xyz", camera=False)
    with pytest.raises(InputError, match="intrinsics are for another image size .*freiburg1 calibration is for "
                       "640×480 images: if these are its images resized, pass --intrinsics fr1"):
        read_tum(fr1)
    seq = read_tum(root, K=(10.0, 10.0, 3.5, 2.5))
    assert len(seq) == 3
    # a preset named explicitly scales to the images: fr1 at 8×6 is fx = 517.3 / 80
    assert np.isclose(read_tum(fr1, K="fr1").intrinsics[0, 0], 517.3 / 80)


@pytest.mark.parametrize("kind,words", [
    ("missing", "listed in depth.txt but is missing on disk"),
    ("8bit", "8-bit greyscale, not a 16-bit depth PNG"),
    ("quat", "quaternion"),
    ("nan", "non-finite"),
    ("scale_far", "wrong depth scale\\? pass --depth-scale"),
    ("scale_near", "wrong depth scale\\? pass --depth-scale"),
    ("nofolder", "not found"),
])
def test_tum_bad_inputs(tmp_path, kind, words):
    kw = {"missing": {"drop_file": True}, "8bit": {"depth_mode": "L"}, "quat": {"bad_quat": True},
          "nan": {"nan_pose": True}}.get(kind, {})
    root = _write_hand_tum(tmp_path / "seq", **kw)
    scale = {"scale_far": 50.0, "scale_near": 5e6}.get(kind)
    with pytest.raises(InputError, match=words) as e:
        read_tum(tmp_path / "elsewhere" if kind == "nofolder" else root, depth_scale=scale)
    assert "\n" not in str(e.value)


def test_tum_lists_that_repeat_a_time_stamp_or_are_not_text_are_refused(tmp_path):
    """A repeated time stamp would let one line hide the other (a NaN pose behind a good one)."""
    root = _write_hand_tum(tmp_path / "dup")
    gt = (root / "groundtruth.txt").read_text().splitlines()
    (root / "groundtruth.txt").write_text("\n".join(gt + [gt[3].replace(gt[3].split()[1], "nan", 1)]) + "\n")
    with pytest.raises(InputError, match="lines 4 and 18 have the same time stamp"):
        read_tum(root)
    root = _write_hand_tum(tmp_path / "links")  # a listed frame that is a device or a dangling link: said so
    depth = sorted((root / "depth").iterdir())
    depth[1].unlink()
    depth[1].symlink_to("/dev/zero")
    with pytest.raises(InputError, match="listed in depth.txt but is not a regular file \\(a device, pipe or socket\\)"):
        read_tum(root)
    depth[1].unlink()
    depth[1].symlink_to(tmp_path / "gone.png")
    with pytest.raises(InputError, match="listed in depth.txt but is a broken symbolic link"):
        read_tum(root)
    root = _write_hand_tum(tmp_path / "bytes")
    (root / "depth.txt").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(InputError, match="not UTF-8 text"):
        read_tum(root)


def test_tum_without_overlapping_time_stamps(tmp_path):
    root = _write_hand_tum(tmp_path / "seq")
    gt = (root / "groundtruth.txt").read_text().replace("10.", "99.")
    (root / "groundtruth.txt").write_text(gt)
    with pytest.raises(InputError, match="time stamps do not overlap"):
        read_tum(root)


# -- round trips through the writers ---------------------------------------------------------------
@pytest.mark.parametrize("layout", ["tum", "redwood"])
def test_round_trip(tmp_path, noisy_scan, layout):
    seq = noisy_scan
    writer, step = (write_tum, 1 / 5000) if layout == "tum" else (write_redwood, 1 / 1000)
    root = writer(seq, tmp_path / layout)
    assert detect_sequence_format(root) == layout
    back = read_sequence(root)
    assert len(back) == len(seq) and (back.width, back.height) == (seq.width, seq.height)
    assert np.allclose(back.intrinsics, seq.intrinsics, atol=1e-9)
    assert np.abs(back.poses - seq.poses).max() < 1e-6
    for i in range(len(seq)):
        a, b = seq.depth(i), back.depth(i)
        assert np.array_equal(a > 0, b > 0)
        assert np.abs(a - b).max() <= step / 2 + 1e-6
        assert np.array_equal(back.color(i), seq.color(i))
    with pytest.raises(InputError, match="not an empty folder"):
        writer(seq, root)


def test_round_trip_keeps_a_custom_depth_scale_and_depth_only(tmp_path, sphere_scan):
    seq = sphere_scan[0]
    depth_only = RGBDSequence(seq.name, seq.intrinsics, seq.poses, seq.width, seq.height, seq.load_depth)
    back = read_redwood(write_redwood(depth_only, tmp_path / "r", depth_scale=4000))
    assert not back.has_color
    assert np.abs(back.depth(2) - seq.depth(2)).max() <= 1 / 8000 + 1e-6  # the recorded scale, not 1000
    with pytest.raises(InputError, match="does not fit a 16-bit PNG"):
        write_tum(depth_only, tmp_path / "t", depth_scale=2e5)
    with pytest.raises(InputError, match="units must be one of m, mm, cm, scene, got 'inch'"):  # at once, not at the fit's end
        RGBDSequence(seq.name, seq.intrinsics, seq.poses, seq.width, seq.height, seq.load_depth, units="inch")


def test_points_are_the_backprojected_depth(sphere_scan):
    seq = sphere_scan[0]
    assert np.allclose(seq.points(1), _backproject(seq, 1))
    sub = seq.points(1, stride=3)
    assert 0 < len(sub) < len(seq.points(1)) / 4
    full = {tuple(p) for p in seq.points(1).round(9)}
    assert all(tuple(p) in full for p in sub.round(9))  # a subset of the full-resolution points


def test_subset(sphere_scan):
    seq = sphere_scan[0]
    sub = seq.subset([4, 1])
    assert len(sub) == 2 and np.array_equal(sub.poses[0], seq.poses[4])
    assert np.array_equal(sub.depth(1), seq.depth(1)) and np.array_equal(sub.color(0), seq.color(4))
    with pytest.raises(InputError, match="frame indices"):
        seq.subset([6])


# -- Redwood bad inputs ----------------------------------------------------------------------------
def test_redwood_bad_inputs(tmp_path, sphere_scan):
    seq = sphere_scan[0]
    root = write_redwood(seq, tmp_path / "r")
    log = (root / "trajectory.log").read_text().splitlines()
    # one pose fewer than depth images
    (root / "trajectory.log").write_text("\n".join(log[:-5]) + "\n")
    with pytest.raises(InputError, match="5 poses but depth/ has 6 images"):
        read_redwood(root)
    # a scaled (non-rigid) pose
    rows = [ln.split() for ln in log]
    rows[1] = [str(2 * float(rows[1][0]))] + rows[1][1:]
    (root / "trajectory.log").write_text("\n".join(" ".join(r) for r in rows) + "\n")
    with pytest.raises(InputError, match="not rigid"):
        read_redwood(root)
    (root / "trajectory.log").write_text("\n".join(log) + "\n")
    read_redwood(root)
    # intrinsics for another image size
    meta = json.loads((root / "camera_intrinsic.json").read_text())
    (root / "camera_intrinsic.json").write_text(json.dumps({**meta, "width": 640, "height": 480}))
    with pytest.raises(InputError, match="for 640×480|intrinsics are for another image size"):
        read_redwood(root)
    (root / "camera_intrinsic.json").unlink()
    with pytest.raises(InputError, match="no intrinsics JSON"):
        read_redwood(root)
    assert len(read_redwood(root, K=seq.intrinsics)) == 6
    # Redwood's own name for the trajectory of its synthetic scenes
    (root / "trajectory.log").rename(root / "livingroom1-traj.txt")
    assert detect_sequence_format(root) == "redwood" and len(read_redwood(root, K="primesense")) == 6
    # a colour frame missing
    sorted((root / "color").iterdir())[0].unlink()
    with pytest.raises(InputError, match="6 depth images but 5 in color/"):
        read_redwood(root, K=seq.intrinsics)


def test_readers_refuse_what_a_fuzz_pass_slipped_past_them(tmp_path, sphere_scan):
    """Each was a traceback, a hang, a memory blow-up or a frame silently dropped: a PNG whose header claims
    60000² pixels, a non-UTF-8 camera.txt, a 400-digit depth_scale, a FIFO or /dev/zero where a text file
    is read, a camera 1e20 units away (its block coordinates overflowed), a skewed or non-square K."""
    import os

    seq = sphere_scan[0]
    root = write_redwood(seq, tmp_path / "r")
    depth0 = sorted((root / "depth").iterdir())[0]
    data = bytearray(depth0.read_bytes())  # IHDR width/height at bytes 16..24, its CRC after
    data[16:24] = (60000).to_bytes(4, "big") * 2
    import zlib

    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    good = depth0.read_bytes()
    depth0.write_bytes(bytes(data))
    with pytest.raises(InputError, match="cannot read the image .*decompression bomb"):
        read_redwood(root)
    depth0.write_bytes(good)
    os.mkfifo(root / "notes.json")  # an intrinsics candidate that is no file: skipped, not read (it blocked)
    (root / "extra.json").symlink_to("/dev/zero")
    assert len(read_redwood(root)) == 6
    log = root / "trajectory.log"
    text = log.read_text()
    log.unlink()
    log.symlink_to("/dev/zero")
    with pytest.raises(InputError, match="the trajectory .* is not a regular file"):
        read_redwood(root)
    log.unlink()
    rows = text.splitlines()
    rows[1] = " ".join(rows[1].split()[:3] + ["1e20"])
    log.write_text("\n".join(rows) + "\n")
    with pytest.raises(InputError, match="the camera is 1e\\+20 units from the origin"):
        read_redwood(root)
    log.write_text(text)
    meta = json.loads((root / "camera_intrinsic.json").read_text())
    (root / "camera_intrinsic.json").write_text(json.dumps(meta)[:-1] + ', "depth_scale": ' + "9" * 400 + "}")
    with pytest.raises(InputError, match="depth_scale must be a positive number below 1e12"):
        read_redwood(root)
    for change, words in (({1: 1e5}, "have a skew"), ({4: meta["intrinsic_matrix"][0] * 3}, "fy = .* against fx")):
        m = list(meta["intrinsic_matrix"])
        for i, v in change.items():
            m[i] = v  # (column-major: m[1] is K[1, 0], m[4] is fy)
        (root / "camera_intrinsic.json").write_text(json.dumps({**meta, "intrinsic_matrix": m}))
        with pytest.raises(InputError, match=words):
            read_redwood(root)
    tum = _write_hand_tum(tmp_path / "tum")
    for rgb in (tum / "rgb").iterdir():  # 16-bit: converting clipped it to white
        Image.fromarray(np.full((6, 8), 40000, np.uint16)).save(rgb)
    with pytest.raises(InputError, match="16-bit or float pixels"):
        read_sequence(tum).color(0)
    (tum / "camera.txt").write_bytes(b"10.0 10.0 \xff 2.5\n")
    with pytest.raises(InputError, match="cannot read the camera file .* not UTF-8"):
        read_sequence(tum)


# -- detection -------------------------------------------------------------------------------------
def test_detection_and_its_errors(tmp_path):
    assert detect_sequence_format("procedural") == "procedural"
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="looked for depth.txt .*\\*.log.*depth.exr"):
        read_sequence(tmp_path / "empty")
    with pytest.raises(InputError, match="not found"):
        read_sequence(tmp_path / "nothing")
    with pytest.raises(InputError, match="unknown RGB-D format"):
        read_sequence(tmp_path / "empty", format="kinectfusion")
    with pytest.raises(InputError, match=r"depth_scale \(--depth-scale\) does not apply to a procedural sequence"):
        read_sequence("procedural", depth_scale=1000)


# -- RTMV: cross-checked against vqad's radiance-field reader --------------------------------------
def _write_exr(path, channels: dict) -> None:
    import OpenEXR

    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
    OpenEXR.File(header, {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in channels.items()}).write(str(path))


def test_rtmv_sequence_matches_the_nerf_reader(tmp_path):
    """RTMV's layout (EXR *ray distance*, OpenGL cam2world stored transposed, pixel centres at ½)
    written from an exact scan (the procedural scene's: no Open3D needed, so this runs everywhere):
    the RGB-D reader gives back its z-depth and OpenCV poses, agrees with vqad.nerf's RTMV reader (an
    independent conversion) on depth and poses, and fit-tsdf reads it."""
    from vqad.nerf.formats.common import srgb_to_linear
    from vqad.nerf.formats.rtmv import read_rtmv
    from vqad.tsdf.synth import procedural_sequence

    seq = procedural_sequence(n_frames=6, width=64, height=48, noise=DepthNoise.none())
    K = seq.intrinsics
    root = tmp_path / "rtmv"
    root.mkdir()
    u, v = np.meshgrid(np.arange(seq.width), np.arange(seq.height))
    ray_len = np.sqrt(1 + ((u - K[0, 2]) / K[0, 0]) ** 2 + ((v - K[1, 2]) / K[1, 1]) ** 2)
    for i in range(len(seq)):
        z = seq.depth(i)
        t = np.where(z > 0, z * ray_len, 1e10)
        _write_exr(root / f"{i:05d}.depth.exr", {"R": t, "G": t, "B": t})
        lin = srgb_to_linear(seq.color(i).astype(np.float32) / 255)
        _write_exr(root / f"{i:05d}.exr", {"RGBA": np.concatenate([lin, (z > 0)[..., None]], -1)})
        c2w_gl = seq.poses[i] @ GL_TO_CV
        cam = {"cam2world": c2w_gl.T.tolist(), "width": seq.width, "height": seq.height,
               "intrinsics": {"fx": K[0, 0], "fy": K[1, 1], "cx": K[0, 2] + 0.5, "cy": K[1, 2] + 0.5}}
        (root / f"{i:05d}.json").write_text(json.dumps({"camera_data": cam}))
    assert detect_sequence_format(root) == "rtmv"
    back = read_sequence(root)
    assert back.units == "scene" and np.allclose(back.intrinsics, K)
    assert np.abs(back.poses - seq.poses).max() < 1e-6
    for i in range(len(seq)):
        assert np.abs(back.depth(i) - seq.depth(i)).max() < 1e-5
        fg = seq.depth(i) > 0
        assert np.abs(back.color(i).astype(int) - seq.color(i))[fg].max() <= 1
    nerf = read_rtmv(root).splits["train"]  # the first 4 of 6 views
    assert np.allclose(nerf.c2w.double().numpy(), back.poses[:4] @ GL_TO_CV, atol=1e-6)
    assert np.allclose(nerf.depth.float().numpy(), np.stack([back.depth(i) for i in range(4)]), atol=2e-3)
    with pytest.raises(InputError, match=r"depth_scale \(--depth-scale\) does not apply to a rtmv sequence: its depth is stored as floats"):
        read_sequence(root, depth_scale=1000.0)
    from vqad.app.cli import main

    out = tmp_path / "fit"
    assert main(["fit-tsdf", str(root), "--out", str(out), "--steps", "3", "--batch", "256", "--levels", "2:3",
                 "--refine", "0", "--no-eval", "--threads", "1", "--quiet"]) == 0  # the CLI's path to the reader
    assert (out / "model.vqad").exists()
    from vqad.nerf.formats.common import exr_depth

    t = root / "00001.depth.exr"
    depth1 = read_rtmv_sequence(root).depth(1)
    _write_exr(t, {"Depth.V": exr_depth(t)})  # one channel of another name: it is the depth
    assert np.array_equal(read_rtmv_sequence(root).depth(1), depth1)
    _write_exr(t, {"NORMAL.X": np.ones((seq.height, seq.width)), "NORMAL.W": np.ones((seq.height, seq.width))})
    with pytest.raises(InputError, match="00001.depth.exr has the EXR channels W, X, none of which is depth"):
        read_rtmv_sequence(root).depth(1)
    (root / "00002.exr").unlink()  # one colour EXR missing: read without colour, and said so
    with pytest.warns(UserWarning, match="1 of 6 views have no colour EXR"):
        assert not read_rtmv_sequence(root).has_color
    (root / "00003.depth.exr").unlink()
    with pytest.raises(InputError, match="00003.depth.exr not found"):
        read_rtmv_sequence(root)


# -- synthetic depth against analytic depth --------------------------------------------------------
def test_plane_depth_is_analytic(tmp_path):
    """Exact depth of the plane z = 0 from tilted cameras equals the ray–plane intersection."""
    need_open3d("synthetic scans need open3d (pip install 'vqad[tsdf]')")
    poses = np.stack([look_at_cv([0.3, -0.2, -1.2], [0.1, 0.05, 0], up=[0, 1, 0]),
                      look_at_cv([-0.5, 0.4, -0.8], [0, 0, 0], up=[1, 0, 0])])
    seq, gt = synth_sequence(_plane(), width=40, height=30, noise=DepthNoise.none(), size=10.0, poses=poses,
                             color=False)
    assert np.allclose(gt.vertices[:, :2].max(0), 5.0) and not seq.has_color
    K = seq.intrinsics
    v, u = np.meshgrid(np.arange(30.0), np.arange(40.0), indexing="ij")
    for i, p in enumerate(poses):
        d = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1) @ p[:3, :3].T
        z_true = -p[2, 3] / d[..., 2]  # o_z + z · d_z = 0, with d scaled so camera z = 1
        z = seq.depth(i)
        assert (z > 0).all()
        assert np.abs(z - z_true).max() < 1e-5 * z_true.max()


def test_sphere_scan_lies_on_the_sphere(sphere_scan):
    seq, gt = sphere_scan
    r = np.linalg.norm(gt.vertices, axis=1).mean()  # size 0.5: r ≈ 0.25
    assert abs(r - 0.25) < 0.01
    for i in range(len(seq)):
        p = _backproject(seq, i)
        assert len(p) > 200
        # an icosphere of 5 subdivisions is within 0.05 % of r of the true sphere
        assert np.abs(np.linalg.norm(p, axis=1) - r).max() < 1e-3 * r
    # the pixel grid is OpenCV's: the sphere's centre projects to (cx, cy) in every view
    z0 = seq.depth(0)
    K = seq.intrinsics
    assert z0[int(round(K[1, 2])), int(round(K[0, 2]))] > 0
    assert len(seq) == 6 and seq.color(0).dtype == np.uint8 and (seq.color(0)[z0 == 0] == 0).all()


def test_procedural_sequence_lies_on_the_analytic_surface():
    seq = read_sequence("procedural", n_frames=4, width=48, height=36)
    sdf = procedural_sdf()
    for i in range(len(seq)):
        p = _backproject(seq, i)
        assert len(p) > 100
        assert np.abs(sdf(p)).max() < 1e-4  # metres; float32 ray casting in a 1 m scene
        fg = seq.depth(i) > 0
        assert (seq.color(i)[fg].astype(int).sum(-1) > 0).all() and (seq.color(i)[~fg] == 0).all()
    noisy = procedural_sequence(n_frames=2, width=48, height=36, noise=DepthNoise(), seed=1)
    again = procedural_sequence(n_frames=2, width=48, height=36, noise=DepthNoise(), seed=1)
    assert np.array_equal(noisy.depth(1), again.depth(1)) and not np.array_equal(noisy.depth(1), seq.depth(1))


def test_views_of_the_nerf_procedural_scene_as_a_sequence():
    """vqad.nerf's own rendering (OpenGL poses, pixel centres at ½, float16 z-depth) converted by
    sequence_from_views lands on the scene's analytic surface: the conventions agree."""
    import torch

    from vqad.nerf.procedural import ProceduralScene, render_views, sphere_cameras
    from vqad.tsdf.rgbd import sequence_from_views

    scene = ProceduralScene()
    views = render_views(scene, sphere_cameras(3, 3.0), torch.tensor([[40.0, 40.0, 24.0, 18.0]]).expand(3, 4), 36, 48)
    seq = sequence_from_views(views, "procedural-nerf")
    assert np.allclose(seq.intrinsics[:2, 2], [23.5, 17.5])
    for i in range(len(seq)):
        p = _backproject(seq, i)
        assert len(p) > 100
        assert np.abs(scene.sdf(torch.from_numpy(p)).numpy()).max() < 4e-3  # float16 depth near 3
        assert np.array_equal(seq.color(i), views.images[i].numpy())


# -- the noise model -------------------------------------------------------------------------------
def test_noise_sigma_at_one_metre_on_a_plane():
    """A fronto-parallel plane at 1 m: σ_z = 0.0012 + 0.0019 · 0.6² = 1.884 mm (Nguyen et al.)."""
    noise = DepthNoise()
    assert np.isclose(noise.sigma_z(1.0), 0.0012 + 0.0019 * 0.36)
    z = np.ones((240, 320))
    m = noise.apply(z, np.ones_like(z), np.random.default_rng(0)).astype(np.float64)
    valid = m > 0
    assert 0.99 < valid.mean() <= 1 - noise.dropout + 0.003
    assert abs(m[valid].std() / noise.sigma_z(1.0) - 1) < 0.03
    assert abs(m[valid].mean() - 1.0) < 1e-4
    assert np.allclose(m[valid] / noise.step, np.rint(m[valid] / noise.step), atol=1e-3)  # quantised
    # deterministic per seed
    assert np.array_equal(m, noise.apply(z, np.ones_like(z), np.random.default_rng(0)))
    # exact depth stays exact
    assert np.array_equal(DepthNoise.none().apply(z, np.ones_like(z), np.random.default_rng(0)), z.astype(np.float32))


def test_noise_drops_grazing_angles_and_out_of_range():
    noise = DepthNoise()
    z = np.full((100, 100), 1.5)
    rng = np.random.default_rng(1)
    kept = lambda deg: (noise.apply(z, np.full_like(z, math.cos(math.radians(deg))), rng) > 0).mean()  # noqa: E731
    assert kept(30) > 0.99 and kept(60) > 0.99
    assert kept(80) == 0.0 and kept(85) == 0.0
    assert noise.apply(np.full((50, 50), 6.0), np.ones((50, 50)), rng).max() == 0  # beyond 4.5 m
    assert noise.apply(np.full((50, 50), 0.2), np.ones((50, 50)), rng).max() == 0  # nearer than 0.4 m
    assert noise.sigma_z(1.0, math.radians(70)) > 1.5 * noise.sigma_z(1.0, 0.0)  # grazing angles are noisier
    with pytest.raises(InputError):
        DepthNoise(dropout=1.5)


def test_noise_on_a_rendered_tilted_plane():
    """Rendered planes at 1 m: seen head-on nearly every pixel is measured, with σ_z(1 m); seen at
    80° (the image spans ±31° horizontally), pixels are missing exactly where the ray meets the
    plane beyond 75° (give or take the lateral jitter's pixel)."""
    need_open3d("synthetic scans need open3d (pip install 'vqad[tsdf]')")
    head_on = look_at_cv([0, 0, -1.0], [0, 0, 0])
    a = math.radians(80)
    tilted = look_at_cv([math.sin(a), 0, -math.cos(a)], [0, 0, 0])
    seq, _ = synth_sequence(_plane(), width=64, height=48, noise=DepthNoise(), size=10.0,
                            poses=np.stack([head_on, tilted]), color=False)
    assert (seq.depth(0) > 0).mean() > 0.99
    assert abs(seq.depth(0)[seq.depth(0) > 0].std() / DepthNoise().sigma_z(1.0) - 1) < 0.1
    K = seq.intrinsics
    v, u = np.meshgrid(np.arange(48.0), np.arange(64.0), indexing="ij")
    d = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1) @ tilted[:3, :3].T
    theta = np.degrees(np.arccos(np.abs(d[..., 2]) / np.linalg.norm(d, axis=-1)))  # plane normal: z
    z_true = np.where(d[..., 2] > 0, -tilted[2, 3] / np.maximum(d[..., 2], 1e-12), np.inf)
    hit = tilted[:3, 3] + z_true[..., None] * d
    on_plane = (np.abs(hit[..., :2]) < 4.9).all(-1)
    seen = (z_true > 0.45) & (z_true < 4.0) & on_plane  # clearly within the sensor's range
    valid = seq.depth(1) > 0
    assert not valid[(z_true < 0.35) | (z_true > 4.6)].any()
    assert (seen & (theta > 78)).sum() > 300 and valid[seen & (theta > 78)].mean() < 0.01
    assert (seen & (theta < 72)).sum() > 100 and valid[seen & (theta < 72)].mean() > 0.97


# -- CLI -------------------------------------------------------------------------------------------
def test_cli_synth_rgbd_writes_a_readable_sequence(tmp_path, capsys):
    from vqad.app.cli import main

    out = tmp_path / "scan"
    assert main(["synth-rgbd", "procedural", "--layout", "redwood", "--frames", "3", "--size", "40x30",
                 "--noise", "none", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "3 frames 40×30" in text and f"vqad fit-tsdf {out}" in text
    seq = read_sequence(out)
    assert len(seq) == 3 and seq.has_color and (seq.width, seq.height) == (40, 30)
    # errors are one line and exit 2: a non-empty output folder, a bad size, a missing mesh
    assert main(["synth-rgbd", "procedural", "--out", str(out)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert main(["synth-rgbd", "procedural", "--size", "40by30", "--out", str(tmp_path / "b")]) == 2
    assert main(["synth-rgbd", "procedural", "--noise", "none", "--seed", "3", "--out", str(tmp_path / "b")]) == 2
    assert "does not apply" in capsys.readouterr().err
    assert main(["synth-rgbd", str(tmp_path / "no.obj"), "--out", str(tmp_path / "c")]) == 2
    assert "mesh not found" in capsys.readouterr().err


def test_cli_synth_rgbd_mesh_tum(tmp_path, capsys):
    need_open3d("synthetic scans need open3d (pip install 'vqad[tsdf]')")
    import trimesh

    from vqad.app.cli import main

    mesh = tmp_path / "ball.ply"
    trimesh.creation.icosphere(3).export(mesh)
    out = tmp_path / "scan"
    assert main(["synth-rgbd", str(mesh), "--frames", "4", "--size", "64x48", "--seed", "2", "--out", str(out)]) == 0
    assert "gt_mesh.ply" in capsys.readouterr().out
    seq = read_tum(out)
    assert len(seq) == 4 and (out / "gt_mesh.ply").is_file()
    gt = trimesh.load(out / "gt_mesh.ply")
    assert np.isclose(np.ptp(gt.vertices, axis=0).max(), 0.5)


def test_redwood_frames_follow_their_numbers_and_the_cli_picks_a_trajectory_and_intrinsics(tmp_path):
    """Frames named 1.png … 11.png pair with the trajectory's poses in numeric order (not 1, 10, 11, 2, …);
    hidden ._NAME copies are no frames; --trajectory and --intrinsics FILE.json pick among several files."""
    import shutil

    from vqad.app.cli import main
    from vqad.tsdf.synth import procedural_sequence, write_redwood

    seq = procedural_sequence(n_frames=11, width=40, height=30, noise=DepthNoise.none())
    root = write_redwood(seq, tmp_path / "r")
    for sub in ("depth", "color"):
        for i in range(11):
            (root / sub / f"{i:06d}.png").rename(root / sub / f"{i + 1}.png")
        shutil.copy(root / sub / "2.png", root / sub / "._2.png")  # macOS metadata beside each frame
    back = read_redwood(root)
    assert len(back) == 11
    for i in (1, 2, 9, 10):  # 2.png is frame 1, 10.png frame 9: each with its own pose
        assert np.array_equal(back.poses[i], read_redwood(write_redwood(seq, tmp_path / f"p{i}")).poses[i])
        assert np.abs(back.depth(i) - seq.depth(i)).max() < 1e-3
    shutil.copy(root / "trajectory.log", root / "other.log")
    shutil.copy(root / "camera_intrinsic.json", root / "other.json")
    with pytest.raises(InputError, match=r"several \*.log files .*\(--trajectory NAME\)"):
        read_redwood(root)
    out = tmp_path / "fit"
    assert main(["fit-tsdf", str(root), "--trajectory", "other.log", "--intrinsics", "other.json", "--out", str(out),
                 "--steps", "2", "--batch", "256", "--levels", "2:3", "--refine", "0", "--no-eval", "--threads", "1",
                 "--quiet"]) == 0
    assert main(["fit-tsdf", "procedural", "--trajectory", "x.log", "--out", str(tmp_path / "f2"), "--steps", "2",
                 "--quiet"]) == 2  # only a Redwood folder has trajectories to choose from
    assert main(["fit-tsdf", str(root), "--format", "procedural", "--out", str(tmp_path / "f3"), "--steps", "2",
                 "--quiet"]) == 2  # the built-in scene is no folder


def test_intrinsics_in_other_units_or_row_major_are_refused_in_words(tmp_path):
    """A focal length that gives a field of view outside 1..170° is not in pixels of the images; an Open3D
    intrinsic_matrix written row by row is named as such (Open3D stores it column by column)."""
    from vqad.tsdf.rgbd import _check_size_vs_intrinsics, intrinsics_matrix, read_open3d_intrinsics

    _check_size_vs_intrinsics(intrinsics_matrix(525.0, 525.0, 319.5, 239.5), (640, 480), "ok")
    for fx in (1e-6, 1e9):
        with pytest.raises(InputError, match="field of view .* must be in pixels of these images"):
            _check_size_vs_intrinsics(intrinsics_matrix(fx, fx, 319.5, 239.5), (640, 480), "cam")
    path = tmp_path / "camera_intrinsic.json"
    path.write_text(json.dumps({"width": 640, "height": 480,
                                "intrinsic_matrix": [525.0, 0, 319.5, 0, 525.0, 239.5, 0, 0, 1]}))
    with pytest.raises(InputError, match="reads as row-major .* column by column"):
        read_open3d_intrinsics(path)
    path.write_text('{"width": ' + "9" * 5000 + ', "height": 480}')  # Python's JSON: a bare ValueError
    with pytest.raises(InputError, match="is not valid JSON"):
        read_open3d_intrinsics(path)
