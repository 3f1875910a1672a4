"""Synthetic RGB-D sequences with known geometry, a depth-camera noise model, and writers.

* :class:`DepthNoise` — a structured-light (Kinect v1 / PrimeSense-like) depth noise model;
  :meth:`DepthNoise.none` gives exact depth.
* :func:`synth_sequence` — a mesh, scaled to an object of ``size`` metres, seen by cameras on a
  spiral over its upper hemisphere; exact z-depth ray-cast with Open3D, then noise, and a
  view-independent shaded colour. Returns the sequence and the ground-truth mesh in its frame.
* :func:`procedural_sequence` — the same for vqad's built-in analytic scene
  (:mod:`vqad.nerf.procedural`), ray-cast by vqad itself.
* :func:`write_tum`, :func:`write_redwood` — the real on-disk layouts, which
  :func:`vqad.tsdf.rgbd.read_tum` / :func:`~vqad.tsdf.rgbd.read_redwood` read back.

All cameras follow :mod:`vqad.tsdf.rgbd`'s conventions (OpenCV axes, pixel ``(col, row)`` centred
at ``(u, v) = (col, row)``, z-depth in metres, 0 = missing). Everything is seeded: frame ``i``'s
noise depends only on ``(seed, i)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vqad.errors import InputError
from vqad.tsdf.rgbd import (REDWOOD_DEPTH_SCALE, TUM_DEPTH_SCALE, RGBDSequence, matrix_to_quaternion,
                            parse_intrinsics, write_log_trajectory, write_open3d_intrinsics)

#: defaults of the synthetic sequences (and of ``vqad synth-rgbd``)
FRAMES = 100
WIDTH, HEIGHT = 320, 240
OBJECT_SIZE = 0.5  # metres, the longest side of a mesh's bounding box
SCENE_SIZE = 1.0  # metres, the longest side of the procedural scene's bounding box
ELEVATION_DEG = (-10.0, 70.0)  # camera elevation range above the object's equator
CAMERA = "primesense"  # intrinsics preset, scaled to the image size (:data:`vqad.tsdf.rgbd.CAMERA_PRESETS`)


# -- noise -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DepthNoise:
    """A structured-light depth camera (Kinect v1 / PrimeSense), after Nguyen, Izadi & Lovell,
    "Modeling Kinect Sensor Noise for Improved 3D Reconstruction and Tracking" (3DIMPVT 2012).

    With ``z`` the true z-depth (m) and ``θ`` the angle between the viewing ray and the surface
    normal, a valid pixel measures ``z + N(0, σ_z²)`` with the axial noise

        ``σ_z(z, θ) = a + b (z − z0)² + c / √z · θ² / (π/2 − θ)²``   (m; a = 0.0012, b = 0.0019, z0 = 0.4,
        c = 0.0001),

    read at a laterally displaced pixel ``(col + round(ε_x), row + round(ε_y))``,
    ``ε ~ N(0, σ_L²)``, ``σ_L(θ) = 0.8 + 0.035 θ / (π/2 − θ)`` pixels (so silhouettes and depth
    edges fray as in a real sensor; flat regions barely change). A pixel is missing (0) when
    ``θ > max_incidence_deg`` (the projector's pattern is not seen at grazing angles), when the
    measured depth is outside ``[min_range, max_range]``, or at random with probability ``dropout``.
    Finally depth is quantised to ``step`` metres (TUM's PNG step 1/5000 m; Redwood's 1 mm).
    """

    axial_a: float = 0.0012
    axial_b: float = 0.0019
    axial_z0: float = 0.4
    axial_angle: float = 0.0001
    lateral_px: float = 0.8  # σ_L at normal incidence, pixels (0: no lateral noise)
    lateral_angle: float = 0.035
    max_incidence_deg: float = 75.0
    min_range: float = 0.4
    max_range: float = 4.5
    dropout: float = 0.002
    step: float = 1.0 / TUM_DEPTH_SCALE

    def __post_init__(self) -> None:
        vals = {k: getattr(self, k) for k in self.__dataclass_fields__}
        if not all(isinstance(v, (int, float)) and not math.isnan(v) and v >= 0 for v in vals.values()):
            raise InputError(f"DepthNoise parameters must be non-negative numbers, got {vals}")
        if not 0 <= self.dropout < 1 or not 0 < self.max_incidence_deg <= 90 or self.min_range >= self.max_range:
            raise InputError("DepthNoise: dropout must be in [0, 1), max_incidence_deg in (0, 90], "
                             "min_range < max_range")

    @classmethod
    def none(cls) -> "DepthNoise":
        """Exact depth: no noise, no dropout, no range limits, no quantisation."""
        return cls(axial_a=0.0, axial_b=0.0, axial_angle=0.0, lateral_px=0.0, lateral_angle=0.0,
                   max_incidence_deg=90.0, min_range=0.0, max_range=math.inf, dropout=0.0, step=0.0)

    @classmethod
    def kinect(cls) -> "DepthNoise":
        """The defaults: a Kinect v1 / PrimeSense-like sensor."""
        return cls()

    def sigma_z(self, z: np.ndarray, theta: np.ndarray | float = 0.0) -> np.ndarray:
        """Axial standard deviation ``σ_z(z, θ)`` in metres; ``z`` (m) and ``θ`` (rad) broadcast."""
        z = np.asarray(z, np.float64)
        theta = np.minimum(np.asarray(theta, np.float64), math.pi / 2 - 1e-3)
        return (self.axial_a + self.axial_b * (z - self.axial_z0) ** 2
                + self.axial_angle / np.sqrt(np.maximum(z, 1e-6)) * theta ** 2 / (math.pi / 2 - theta) ** 2)

    def apply(self, z: np.ndarray, cos_incidence: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Measured depth of one frame.

        Args:
            z: ``(H, W)`` exact z-depth in metres, 0 (or inf) where no surface.
            cos_incidence: ``(H, W)`` ``|cos θ|`` between the viewing ray and the surface normal.
            rng: the frame's generator (the same draws happen whatever the parameters, so a frame's
                noise depends only on its seed).
        Returns:
            ``(H, W) float32`` measured z-depth, 0 where missing.
        """
        z = np.where(np.isfinite(z) & (z > 0), z, 0.0).astype(np.float64)
        theta = np.arccos(np.clip(np.abs(cos_incidence), 0.0, 1.0))
        h, w = z.shape
        eps = rng.standard_normal((2, h, w))
        noise = rng.standard_normal((h, w))
        drop = rng.random((h, w))
        if self.lateral_px > 0:
            # σ_L of the surface seen: a pixel past the incidence cut-off (or with no surface) would
            # otherwise jump tens of pixels
            th = np.where(z > 0, np.minimum(theta, math.radians(min(self.max_incidence_deg, 85.0))), 0.0)
            sigma_l = self.lateral_px + self.lateral_angle * th / (math.pi / 2 - th)
            rows = np.clip(np.arange(h)[:, None] + np.rint(eps[1] * sigma_l).astype(int), 0, h - 1)
            cols = np.clip(np.arange(w)[None, :] + np.rint(eps[0] * sigma_l).astype(int), 0, w - 1)
            z, theta = z[rows, cols], theta[rows, cols]
        valid = (z > 0) & (theta <= math.radians(self.max_incidence_deg))
        m = z + noise * self.sigma_z(np.where(valid, z, 1.0), theta)
        valid &= (m >= self.min_range) & (m <= self.max_range) & (drop >= self.dropout)
        if self.step > 0:
            m = np.rint(m / self.step) * self.step
        return np.where(valid & (m > 0), m, 0.0).astype(np.float32)


#: the noise models ``vqad synth-rgbd --noise`` offers
NOISE_MODELS = {"kinect": DepthNoise.kinect, "none": DepthNoise.none}


# -- cameras ---------------------------------------------------------------------------------------
def look_at_cv(eye, target=(0.0, 0.0, 0.0), up=(0.0, 1.0, 0.0)) -> np.ndarray:
    """Camera-to-world ``(4, 4)`` in OpenCV axes at ``eye (3,)`` looking at ``target``, image up ≈ ``up``:
    ``z = (target − eye)/|·|``, ``x = z × up / |·|``, ``y = z × x`` (so y points down)."""
    eye, target, up = (np.asarray(v, np.float64) for v in (eye, target, up))
    z = target - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, up)
    if np.linalg.norm(x) < 1e-9:  # looking along up: any sideways axis
        x = np.cross(z, np.roll(up, 1))
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = x, y, z, eye
    return m


def orbit_poses(n: int, distance: float, elevation_deg: tuple[float, float] = ELEVATION_DEG, turns: float = 2.0,
                up=(0.0, 1.0, 0.0), target=(0.0, 0.0, 0.0)) -> np.ndarray:
    """``n`` cameras ``(n, 4, 4)`` (camera-to-world, OpenCV) on a continuous spiral at ``distance``
    from ``target``, looking at it: ``turns`` times around ``up`` while the elevation sweeps
    ``elevation_deg`` up and down three times, so the sides and the top are all seen, from varied
    angles, by consecutive frames that overlap like a hand-held scan."""
    up = np.asarray(up, np.float64) / np.linalg.norm(up)
    a = np.cross(up, [1.0, 0.0, 0.0]) if abs(up[0]) < 0.9 else np.cross(up, [0.0, 0.0, 1.0])
    a /= np.linalg.norm(a)
    b = np.cross(a, up)
    lo, hi = (math.radians(e) for e in elevation_deg)
    out = []
    for i in range(n):
        t = i / max(n, 1)
        az = 2 * math.pi * turns * t
        el = lo + (hi - lo) * 0.5 * (1 - math.cos(2 * math.pi * 3 * t))
        d = math.cos(el) * (math.cos(az) * a + math.sin(az) * b) + math.sin(el) * up
        out.append(look_at_cv(np.asarray(target) + distance * d, target, up))
    return np.stack(out) if out else np.zeros((0, 4, 4))


def pixel_rays(K: np.ndarray, pose: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Rays through every pixel centre (OpenCV: ``(u, v) = (col, row)``), row-major.

    Returns ``origins (H·W, 3)`` and world directions ``(H·W, 3)`` scaled so the camera-space z is 1:
    a hit at ray parameter ``t`` has z-depth ``t``.
    """
    v, u = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
    d_cam = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1).reshape(-1, 3)
    d = d_cam @ pose[:3, :3].T
    return np.broadcast_to(pose[:3, 3], d.shape), d


def shade(normals: np.ndarray, hit: np.ndarray) -> np.ndarray:
    """View-independent colour ``(..., 3) uint8`` from world normals ``(..., 3)``: albedo
    ``(n + 1) / 2`` under one directional light, ``albedo · (0.35 + 0.65 max(0, n·l))``; black on a
    miss. A perfect colour fusion reproduces it from every view."""
    light = np.array([0.4, 0.8, 0.45]) / np.linalg.norm([0.4, 0.8, 0.45])
    n = normals / np.maximum(np.linalg.norm(normals, axis=-1, keepdims=True), 1e-12)
    rgb = (0.5 + 0.5 * n) * (0.35 + 0.65 * np.clip(n @ light, 0, None))[..., None]
    return np.where(hit[..., None], np.clip(np.rint(rgb * 255), 0, 255), 0).astype(np.uint8)


#: bytes a rendered frame holds per pixel until the sequence is written: float32 depth and 8-bit colour, twice
#: (the frames' list and the stacked copy of it, both alive while the stack is made)
FRAME_BYTES_PER_PIXEL = 2 * (4 + 3)


def _frames_sequence(name: str, K, poses, width, height, depths, colors) -> RGBDSequence:
    depths = np.stack(depths)
    colors = None if colors is None else np.stack(colors)
    return RGBDSequence(name=name, intrinsics=K, poses=poses, width=width, height=height,
                        load_depth=lambda i: depths[i].copy(),
                        load_color=None if colors is None else (lambda i: colors[i].copy()))


def _auto_distance(radius: float, K: np.ndarray, width: int, height: int, noise: DepthNoise) -> float:
    """The distance at which a sphere of ``radius`` just fits the narrower field of view, and stays
    beyond the noise model's minimum range."""
    half = math.atan(min(width / 2 / K[0, 0], height / 2 / K[1, 1]))
    return max(1.05 * radius / math.sin(half), radius + noise.min_range * 1.1)


def _check_common(n_frames: int, width: int, height: int, size: float, distance: float | None) -> None:
    if int(n_frames) < 1:
        raise InputError(f"the number of frames must be at least 1, got {n_frames}")
    if not (8 <= int(width) <= 4096 and 8 <= int(height) <= 4096):
        raise InputError(f"the image size must be 8..4096 pixels per side, got {width}×{height}")
    from vqad.device import MAX_MEMORY_ENV, default_max_memory

    per_frame = int(width) * int(height) * FRAME_BYTES_PER_PIXEL  # every frame is held until written
    need, limit = int(n_frames) * per_frame, default_max_memory()
    if need > limit:
        raise InputError(f"{n_frames:,} frames of {width}×{height} need {need / 2 ** 30:,.1f} GiB while they are rendered, "
                         f"more than the limit of {limit / 2 ** 30:.1f} GiB (${MAX_MEMORY_ENV}, default "
                         f"half the memory): render at most {max(1, limit // per_frame):,} frames at this size, or smaller frames")
    if not (math.isfinite(size) and size > 0):
        raise InputError(f"the object size must be a positive number of metres, got {size}")
    if distance is not None and not (math.isfinite(distance) and distance > 0):
        raise InputError(f"the camera distance must be a positive number of metres, got {distance}")


# -- meshes ----------------------------------------------------------------------------------------
def _open3d():
    try:
        import open3d as o3d
    except ModuleNotFoundError as e:
        raise InputError("rendering synthetic depth needs Open3D: pip install 'vqad[tsdf]' (open3d-cpu)") from e
    except ImportError as e:  # installed, but a library it links against is missing (e.g. libusb-1.0.so.0)
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise InputError(f"rendering synthetic depth needs Open3D, which is installed but cannot load ({first}): "
                         "install the missing system library (Debian/Ubuntu: apt install libusb-1.0-0 for "
                         "libusb-1.0.so.0) or reinstall open3d-cpu") from e
    return o3d


def synth_sequence(mesh, n_frames: int = FRAMES, width: int = WIDTH, height: int = HEIGHT,
                   noise: DepthNoise = DepthNoise(), seed: int = 0, size: float = OBJECT_SIZE,
                   distance: float | None = None, K=CAMERA, color: bool = True,
                   elevation_deg: tuple[float, float] = ELEVATION_DEG, poses: np.ndarray | None = None):
    """Render a depth-camera scan of a mesh.

    The mesh (a :class:`vqad.sdf.mesh.Mesh`, or a path :func:`vqad.sdf.mesh.load_mesh` reads) is
    centred on its bounding box and scaled so the box's longest side is ``size`` metres; ``n_frames``
    cameras (:func:`orbit_poses`, up = +y) at ``distance`` metres (default: the object just fills
    the view) ray-cast it with Open3D's ``RaycastingScene``; :class:`DepthNoise` ``noise`` is added
    with a generator seeded by ``(seed, i)``. ``K``: intrinsics as :func:`vqad.tsdf.rgbd.parse_intrinsics`
    takes them (default: the PrimeSense camera scaled to ``width × height``). ``poses (N, 4, 4)``
    (camera-to-world, OpenCV, in the scaled frame), when given, replace the orbit and ``n_frames``.

    Returns:
        ``(sequence, gt_mesh)``: an in-memory :class:`RGBDSequence` (metres, colour from
        :func:`shade` when ``color``) and the scaled :class:`~vqad.sdf.mesh.Mesh` in the same world
        frame as the poses.
    """
    from vqad.sdf.mesh import Mesh, load_mesh

    _check_common(n_frames, width, height, size, distance)
    name = "mesh"
    if not isinstance(mesh, Mesh):
        name = Path(mesh).stem
        mesh = load_mesh(mesh)
    lo, hi = mesh.vertices.min(0), mesh.vertices.max(0)
    scale = size / float((hi - lo).max())
    gt = Mesh((mesh.vertices - (lo + hi) / 2) * scale, mesh.faces.copy())
    K = parse_intrinsics(K, width, height)
    radius = float(np.linalg.norm(gt.vertices, axis=1).max())
    distance = distance if distance is not None else _auto_distance(radius, K, width, height, noise)
    if poses is None:
        poses = orbit_poses(int(n_frames), distance, elevation_deg)
    else:
        poses = RGBDSequence("poses", K, poses, width, height, lambda i: None).poses  # checks them

    o3d = _open3d()
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(o3d.core.Tensor(gt.vertices.astype(np.float32)), o3d.core.Tensor(gt.faces.astype(np.uint32)))
    import torch

    nthreads = torch.get_num_threads()  # vqad's one thread policy (--threads) holds for Open3D too
    depths, colors = [], [] if color else None
    for i, pose in enumerate(poses):
        o, d = pixel_rays(K, pose, width, height)
        hit = scene.cast_rays(o3d.core.Tensor(np.concatenate([o, d], 1).astype(np.float32)), nthreads=nthreads)
        t = hit["t_hit"].numpy().astype(np.float64)  # = z-depth: d has camera z = 1
        n = hit["primitive_normals"].numpy().astype(np.float64)
        ok = np.isfinite(t)
        cos = np.abs((n * d).sum(-1)) / np.linalg.norm(d, axis=-1)
        z = np.where(ok, t, 0.0).reshape(height, width)
        depths.append(noise.apply(z, cos.reshape(height, width), np.random.default_rng([seed, i])))
        if color:
            colors.append(shade(n.reshape(height, width, 3), ok.reshape(height, width)))
    return _frames_sequence(name, K, poses, width, height, depths, colors), gt


# -- the procedural scene --------------------------------------------------------------------------
def procedural_sequence(n_frames: int = FRAMES, width: int = WIDTH, height: int = HEIGHT,
                        noise: DepthNoise | None = None, seed: int = 0, size: float = SCENE_SIZE,
                        distance: float | None = None, K=CAMERA,
                        elevation_deg: tuple[float, float] = ELEVATION_DEG) -> RGBDSequence:
    """vqad's built-in analytic scene (:class:`vqad.nerf.procedural.ProceduralScene`) as an RGB-D scan.

    The scene is centred on its bounding box and scaled so the box's longest side is ``size``
    metres; cameras as in :func:`synth_sequence`; exact ray-cast z-depth, plus ``noise`` (default
    none: the exact depth the radiance-field datasets carry), and the scene's own Lambert-shaded
    colour (black where nothing is hit). The ground truth is the scene's analytic signed distance,
    :func:`procedural_sdf` in the sequence's metric frame.
    """
    import torch

    from vqad.nerf.procedural import ProceduralScene, _one_thread

    noise = DepthNoise.none() if noise is None else noise
    _check_common(n_frames, width, height, size, distance)
    scene = ProceduralScene()
    center, scale = procedural_transform(scene, size)
    K = parse_intrinsics(K, width, height)
    lo, hi = (b.numpy() for b in scene.bounds())
    radius = 0.5 * float(np.linalg.norm(hi - lo)) * scale
    distance = distance if distance is not None else _auto_distance(radius, K, width, height, noise)
    poses = orbit_poses(int(n_frames), distance, elevation_deg)
    depths, colors = [], []
    with _one_thread():
        for i, pose in enumerate(poses):
            o, d = pixel_rays(K, pose, width, height)
            dn = np.linalg.norm(d, axis=-1, keepdims=True)
            o_s = torch.from_numpy(o / scale + center).float()  # metres → scene units
            d_s = torch.from_numpy(d / dn).float()
            t, rgb, hit = scene.raycast(o_s, d_s)
            normal = torch.zeros_like(o_s)
            t_best = torch.full_like(t, math.inf)
            for s in scene.shapes:  # the normal of the nearest hit, for the noise model's incidence angle
                ts, ns = s.intersect(o_s, d_s)
                closer = ts < t_best
                t_best = torch.where(closer, ts, t_best)
                normal = torch.where(closer[:, None], ns, normal)
            ok = hit.numpy()
            z = np.where(ok, t.double().numpy() * scale / dn[:, 0], 0.0).reshape(height, width)
            cos = np.abs((normal.double().numpy() * (d / dn)).sum(-1)).reshape(height, width)
            depths.append(noise.apply(z, cos, np.random.default_rng([seed, i])))
            colors.append(np.clip(np.rint(rgb.numpy() * 255), 0, 255).astype(np.uint8).reshape(height, width, 3))
    return _frames_sequence("procedural", K, poses, width, height, depths, colors)


def procedural_transform(scene=None, size: float = SCENE_SIZE) -> tuple[np.ndarray, float]:
    """``(center (3,), scale)`` placing the procedural scene in a sequence's metric frame:
    ``x_metres = (x_scene − center) · scale``; its box's longest side becomes ``size`` metres."""
    from vqad.nerf.procedural import ProceduralScene

    scene = scene or ProceduralScene()
    lo, hi = (b.double().numpy() for b in scene.bounds())
    return (lo + hi) / 2, size / float((hi - lo).max())


def procedural_sdf(size: float = SCENE_SIZE):
    """The procedural scene's signed distance in :func:`procedural_sequence`'s metric frame:
    ``(N, 3) float → (N,) float64`` metres, negative inside (exact outside each shape, a bound inside),
    ``sdf(x) = scale · scene.sdf(x / scale + center)``."""
    import torch

    from vqad.nerf.procedural import ProceduralScene

    scene = ProceduralScene()
    center, scale = procedural_transform(scene, size)

    def sdf(x: np.ndarray) -> np.ndarray:
        xs = torch.from_numpy(np.asarray(x, np.float64).reshape(-1, 3) / scale + center)
        return scene.sdf(xs).numpy() * scale

    return sdf


# -- writers ---------------------------------------------------------------------------------------
def _depth_u16(z: np.ndarray, depth_scale: float, what: str) -> np.ndarray:
    q = np.rint(np.where(np.isfinite(z) & (z > 0), z, 0.0) * depth_scale)
    if q.max(initial=0) > 65535:
        raise InputError(f"{what}: depth {q.max() / depth_scale:.3g} m does not fit a 16-bit PNG at depth scale "
                         f"{depth_scale:g} (at most {65535 / depth_scale:.3g} m); use a smaller depth scale")
    return q.astype(np.uint16)


def _save_png(path: Path, a: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(a).save(path)


def _prepare(out, seq: RGBDSequence, depth_scale: float) -> Path:
    out = Path(out)
    if not (math.isfinite(depth_scale) and depth_scale > 0):
        raise InputError(f"the depth scale must be a positive number of depth units per metre, got {depth_scale}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out} exists and is not an empty folder: write the sequence to a new folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_tum(seq: RGBDSequence, out, depth_scale: float = TUM_DEPTH_SCALE, fps: float = 30.0) -> Path:
    """Write ``seq`` in TUM RGB-D's layout into the new (or empty) folder ``out``.

    ``depth/<t>.png`` (16-bit, ``metres × depth_scale``), ``rgb/<t>.png`` (when the sequence has
    colour, time-stamped 4 ms after its depth frame as a real capture's are), ``depth.txt``,
    ``rgb.txt``, ``groundtruth.txt`` (``t tx ty tz qx qy qz qw``) at ``fps``, and
    ``intrinsics.json`` (Open3D format plus ``depth_scale``), which :func:`~vqad.tsdf.rgbd.read_tum`
    reads first. Returns ``out``.
    """
    out = _prepare(out, seq, depth_scale)
    (out / "depth").mkdir()
    dl = ["# depth maps", f"# written by vqad: {seq.name}", "# timestamp filename"]
    cl = ["# color images", f"# written by vqad: {seq.name}", "# timestamp filename"]
    gl = ["# ground truth trajectory", f"# written by vqad: {seq.name}", "# timestamp tx ty tz qx qy qz qw"]
    if seq.has_color:
        (out / "rgb").mkdir()
    for i in range(len(seq)):
        t = 1.0 + i / fps
        name = f"{t:.6f}.png"
        _save_png(out / "depth" / name, _depth_u16(seq.depth(i), depth_scale, f"frame {i}"))
        dl.append(f"{t:.6f} depth/{name}")
        if seq.has_color:
            tc = t + 0.004
            _save_png(out / "rgb" / f"{tc:.6f}.png", seq.color(i))
            cl.append(f"{tc:.6f} rgb/{tc:.6f}.png")
        p = seq.poses[i]
        q = matrix_to_quaternion(p[:3, :3])
        gl.append(f"{t:.6f} " + " ".join(f"{x:.9f}" for x in (*p[:3, 3], *q)))
    (out / "depth.txt").write_text("\n".join(dl) + "\n")
    if seq.has_color:
        (out / "rgb.txt").write_text("\n".join(cl) + "\n")
    (out / "groundtruth.txt").write_text("\n".join(gl) + "\n")
    write_open3d_intrinsics(out / "intrinsics.json", seq.intrinsics, seq.width, seq.height, depth_scale)
    return out


def write_redwood(seq: RGBDSequence, out, depth_scale: float = REDWOOD_DEPTH_SCALE) -> Path:
    """Write ``seq`` in the Redwood / Open3D layout into the new (or empty) folder ``out``:
    ``depth/NNNNNN.png`` (16-bit, ``metres × depth_scale``: millimetres by default),
    ``color/NNNNNN.png`` (when it has colour), ``trajectory.log`` (camera-to-world) and
    ``camera_intrinsic.json`` (Open3D ``PinholeCameraIntrinsic``, plus ``depth_scale``). Returns ``out``."""
    out = _prepare(out, seq, depth_scale)
    (out / "depth").mkdir()
    if seq.has_color:
        (out / "color").mkdir()
    for i in range(len(seq)):
        _save_png(out / "depth" / f"{i:06d}.png", _depth_u16(seq.depth(i), depth_scale, f"frame {i}"))
        if seq.has_color:
            _save_png(out / "color" / f"{i:06d}.png", seq.color(i))
    write_log_trajectory(out / "trajectory.log", seq.poses)
    write_open3d_intrinsics(out / "camera_intrinsic.json", seq.intrinsics, seq.width, seq.height, depth_scale)
    return out


LAYOUTS = {"tum": write_tum, "redwood": write_redwood}
