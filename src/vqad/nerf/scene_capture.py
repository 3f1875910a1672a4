"""A generated phone-style capture: the procedural object inside a textured room, in instant-ngp format.

Real captures are not objects floating in empty space: the object sits in the middle of a room or a
garden several times its size, and every pixel sees something. This module renders such a scene with
exact ground truth and writes it as an instant-ngp capture (``transforms.json`` + PNGs), so tests and
benchmarks exercise the large-scene path (``aabb_scale`` > 1) end to end:

* the object: the built-in procedural shapes (:mod:`vqad.nerf.procedural`), about 1.3 world units
  across, centred near the origin;
* a ground plane under it (``y = ground_y``, the bottom of the object's slab) with a two-scale
  checker texture;
* an enclosing dome (a sphere of radius ``dome_radius`` around the origin, seen from inside),
  unlit and textured by direction (latitude / longitude bands over a sky gradient).

Cameras stand on a ring around the object (radius ``camera_radius``, heights oscillating around
``camera_height``), all looking at the origin, portrait images of ``width × height`` pixels. The
ngp box: ``scale`` 0.33, ``offset`` 0.5, so ``aabb_scale`` 1 is the world box [-1.5, 1.5]^3 (the
object with a margin) and ``aabb_scale`` 4 is [-6, 6]^3 (the dome of radius 5.5 fits inside).

``transients = n`` paints ``n`` passers-by into each training view (not the frames the readers hold out,
every :data:`~vqad.nerf.formats.common.HOLD_EVERY`-th): upright striped ellipses of random colours
standing 0.6–1.8 units in front of the camera, somewhere else in every view (what a phone capture of
a public place records), and writes nerfstudio loss masks (``masks/NNNN.png``, ``mask_path``: 0
where a passer-by is) for every frame, so a fit can be measured with and without them.

``exposure = σ`` meters every training photo anew, as a phone does: its colours are multiplied by
``2^(e + w_c)`` per channel ``c``, an exposure ``e ~ N(0, σ²)`` stops and a white balance
``w_c ~ N(0, (σ/2)²)``, clipped at white (:func:`photo_gains`). The training photos' gains have a geometric
mean of 1 per channel and the held-out frames keep gain 1, so the held-out photos show the training
photos' average appearance: what a fit that learns each photo's appearance renders for a view without one.

``background=False`` writes the same cameras and the object alone, as RGBA PNGs whose alpha is the
object's mask (the comparison target: what a fit of the object alone reaches).

Each pixel is the mean of ``supersample × supersample`` rays through a regular grid of points in its
square (a box filter, as a camera integrates the light over a pixel's area and as Blender's renders
of NeRF-synthetic are antialiased); ``supersample = 1`` takes the pixel centre alone, whose hard,
jagged edges depend on where the pixel grid falls in each view (aliasing). The object-alone capture's
alpha is then the share of a pixel's rays that hit the object, its colour straight (not
premultiplied), as PNG stores it.

Shading is Lambertian (view-independent), so a perfect field reproduces every view up to that
pixel filter.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from vqad.errors import InputError
from vqad.nerf.procedural import ProceduralScene, _one_thread, look_at
from vqad.nerf.formats.common import DEPTH_UNIT_SCALE, HOLD_EVERY, MAX_RAY_ANGLE
from vqad.nerf.formats.points import write_ply_points
from vqad.nerf.lens import LENS_FISHEYE, distorted_radius
from vqad.nerf.rays import pixel_centers, rays_for_pixels

NGP_SCALE = 0.33  # instant-ngp's default: world · scale + offset is ngp space, whose unit cube is aabb_scale 1
NGP_OFFSET = (0.5, 0.5, 0.5)
MAX_SIDE = 8192  # pixels per image side: a generated capture is a test scene, not a poster
MAX_VIEWS = 2000
RAY_CHUNK = 1 << 18  # rays raycast at once: bounds the memory of a large image to ~100 MB
MAX_POINTS = 10_000_000
MAX_SUPERSAMPLE = 16  # rays per pixel side
LENSES = ("pinhole", "fisheye")
#: the fisheye capture's OpenCV fisheye k1, k2, k3, k4 (a mild equidistant lens, as a calibration finds)
FISHEYE_K = (0.04, -0.012, 0.002, 0.0)
#: each lens's default field of view across the image's height, degrees
FOV_Y_DEG = {"pinhole": 50.0, "fisheye": 120.0}
MAX_TRANSIENTS = 8  # passers-by a view
#: a passer-by's half height as a share of the image's height, its half width as a share of its half height,
#: and its distance in front of the camera (world units): the object stands 3 units away
TRANSIENT_HALF_HEIGHT = (0.1, 0.25)
TRANSIENT_ASPECT = (0.3, 0.5)
TRANSIENT_DEPTH = (0.6, 1.8)
MAX_EXPOSURE = 2.0  # stops: the spread of the photos' exposure (a phone's auto exposure moves well under one)


@dataclass(frozen=True)
class SceneCaptureConfig:
    """The generated capture's cameras, images and environment (world units)."""

    width: int = 135
    height: int = 240
    views: int = 50
    fov_y_deg: float | None = None  # across the image's height; None: FOV_Y_DEG of the lens
    camera_radius: float = 3.0
    camera_height: float = 0.9  # mean camera height above the origin (the object's middle)
    camera_height_swing: float = 0.35  # heights vary by ± this around the ring (better conditioned than one height)
    aabb_scale: int = 4
    ground_y: float = -0.54  # the bottom of the object's slab
    dome_radius: float = 5.5
    checker: float = 0.5  # ground checker period
    # simulated structure-from-motion points written as sparse_pc.ply (0: none): what a COLMAP run on
    # the views would triangulate, idealised (every surface is textured), with noise and outliers
    points: int = 30_000
    point_noise: float = 0.01  # world units, Gaussian per axis
    point_outliers: float = 0.01  # share of points uniform in the aabb_scale box
    seed: int = 0
    supersample: int = 4  # n: each pixel averages n × n rays over its square (1: the pixel centre alone)
    # "pinhole", or "fisheye": OpenCV's equidistant fisheye with FISHEYE_K, fov_y_deg across the image's height
    lens: str = "pinhole"
    transients: int = 0  # passers-by painted into each training view, with loss masks (0: none, no masks)
    exposure: float = 0.0  # σ, stops: each training photo's exposure (and white balance, σ/2) jitter (photo_gains)

    def __post_init__(self):
        if self.fov_y_deg is None:  # the lens's own default, recorded as the number it resolved to
            object.__setattr__(self, "fov_y_deg", FOV_Y_DEG.get(self.lens, FOV_Y_DEG["pinhole"]))

    def validate(self) -> None:
        if not (1 <= self.width <= MAX_SIDE and 1 <= self.height <= MAX_SIDE and 2 <= self.views <= MAX_VIEWS):
            raise InputError(f"the capture needs image sides in 1..{MAX_SIDE} px and 2..{MAX_VIEWS} views, got "
                             f"{self.width}x{self.height}, {self.views} views")
        if self.aabb_scale not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise InputError(f"aabb_scale must be a power of two in 1..128 (as instant-ngp takes it), got {self.aabb_scale}")
        if not (0 <= self.points <= MAX_POINTS and self.point_noise >= 0 and 0 <= self.point_outliers < 1):
            raise InputError(f"the capture's sparse points must number 0..{MAX_POINTS:,}, with noise >= 0 and an "
                             f"outlier share in [0, 1), got {self.points}, {self.point_noise}, {self.point_outliers}")
        n = self.supersample
        if isinstance(n, bool) or not (isinstance(n, int) and 1 <= n <= MAX_SUPERSAMPLE):
            raise InputError(f"supersample must be a whole number of rays per pixel side in 1..{MAX_SUPERSAMPLE}, "
                             f"got {n!r}")
        if not (0 < self.fov_y_deg < 170 and self.camera_radius < self.dome_radius and self.dome_radius > 0):
            raise InputError("the field of view must be in (0, 170) degrees and the cameras inside the dome")
        t = self.transients
        if isinstance(t, bool) or not (isinstance(t, int) and 0 <= t <= MAX_TRANSIENTS):
            raise InputError(f"transients must be a whole number of passers-by a view in 0..{MAX_TRANSIENTS}, got {t!r}")
        e = self.exposure
        if isinstance(e, bool) or not (isinstance(e, (int, float)) and 0 <= e <= MAX_EXPOSURE):
            raise InputError(f"exposure is the spread of the photos' exposure in stops, 0..{MAX_EXPOSURE:g}, got {e!r}")
        if self.lens not in LENSES:
            raise InputError(f"the capture's lens must be one of {', '.join(LENSES)}, got {self.lens!r}")
        corner = math.hypot(1.0, self.width / self.height)  # the corner's normalised radius / the top edge's
        lens = capture_lens(self)
        if distorted_radius(lens, math.radians(self.fov_y_deg) / 2) * corner > distorted_radius(lens, math.radians(MAX_RAY_ANGLE)):
            raise InputError(f"a {self.fov_y_deg:g}° {self.lens} view of {self.width}x{self.height} px would look more than "
                             f"{MAX_RAY_ANGLE:g}° off its axis at the corners, which a capture may not: lower the field "
                             f"of view or make the image taller than wide")


@dataclass(frozen=True)
class Environment:
    """The room around the object: a checkered ground and a textured, unlit dome."""

    ground_y: float = -0.54
    dome_radius: float = 5.5
    checker: float = 0.5
    ground_colors: tuple = ((0.78, 0.74, 0.62), (0.36, 0.42, 0.30))
    object: ProceduralScene = field(default_factory=ProceduralScene)

    def _ground(self, o: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hit distance ``(R,)`` (``inf`` on a miss) and shaded colour ``(R, 3)`` of the ground plane."""
        dy = d[:, 1]
        t = (self.ground_y - o[:, 1]) / torch.where(dy.abs() < 1e-9, torch.full_like(dy, -1e-9), dy)
        t = torch.where((dy < 0) & (o[:, 1] > self.ground_y) & (t > 0), t, torch.full_like(t, math.inf))
        p = o + torch.nan_to_num(t, posinf=0.0)[:, None] * d
        big = (torch.floor(p[:, 0] / self.checker) + torch.floor(p[:, 2] / self.checker)) % 2
        fine = (torch.floor(p[:, 0] / (0.2 * self.checker)) + torch.floor(p[:, 2] / (0.2 * self.checker))) % 2
        a, b = (torch.tensor(c, dtype=o.dtype) for c in self.ground_colors)
        albedo = torch.where(big[:, None] > 0, a, b) * (0.85 + 0.15 * fine)[:, None]
        n = torch.tensor([0.0, 1.0, 0.0], dtype=o.dtype)
        shade = torch.full_like(t, self.object.ambient)
        for direction, intensity in self.object.lights:
            l = torch.tensor(direction, dtype=o.dtype)
            shade = shade + intensity * float((n * l / l.norm()).sum().clamp_min(0))
        return t, (albedo * shade[:, None]).clamp(0, 1)

    def _dome(self, o: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exit distance ``(R,)`` from inside the dome and its texture ``(R, 3)`` (unlit)."""
        b = (o * d).sum(-1)
        c = (o * o).sum(-1) - self.dome_radius ** 2
        t = -b + (b * b - c).clamp_min(0).sqrt()  # o inside: c < 0, the far root is the exit
        p = (o + t[:, None] * d) / self.dome_radius
        lat = torch.asin(p[:, 1].clamp(-1, 1))
        lon = torch.atan2(p[:, 2], p[:, 0])
        sky = torch.stack([0.45 + 0.25 * p[:, 1], 0.6 + 0.2 * p[:, 1], 0.85 + 0.1 * p[:, 1]], -1)
        bands = (torch.floor(lon * 12 / math.pi) + torch.floor(lat * 12 / math.pi)) % 2
        stripe = 0.5 + 0.5 * torch.sin(lon * 5.0)[:, None] * torch.tensor([0.3, -0.2, 0.1], dtype=o.dtype)
        color = sky * (0.75 + 0.25 * bands)[:, None] * stripe * 1.4
        return torch.where(c < 0, t, torch.full_like(t, math.inf)), color.clamp(0, 1)

    def raycast(self, o: torch.Tensor, d: torch.Tensor, background: bool = True):
        """Nearest hit of rays ``o, d (R, 3)`` (``|d| = 1``): ``t (R,)``, colour ``(R, 3)``, and the
        object mask ``(R,)`` (True where the object, not the room, is hit first)."""
        t_obj, c_obj, hit_obj = self.object.raycast(o, d)
        if not background:
            return t_obj, c_obj, hit_obj
        t_g, c_g = self._ground(o, d)
        t_d, c_d = self._dome(o, d)
        t = torch.minimum(torch.minimum(t_obj, t_g), t_d)
        color = torch.where((t == t_d)[:, None], c_d, c_g)
        color = torch.where((t == t_obj)[:, None] & hit_obj[:, None], c_obj, color)
        return t, color, hit_obj & (t_obj <= t)


def ring_cameras(cfg: SceneCaptureConfig) -> torch.Tensor:
    """``(views, 4, 4)`` OpenGL poses on a ring around the origin, looking at it."""
    out = []
    for i in range(cfg.views):
        phi = 2 * math.pi * i / cfg.views
        y = cfg.camera_height + cfg.camera_height_swing * math.sin(3 * phi)
        eye = torch.tensor([cfg.camera_radius * math.cos(phi), y, cfg.camera_radius * math.sin(phi)])
        out.append(look_at(eye))
    return torch.stack(out)


def _cameras(cfg: SceneCaptureConfig) -> tuple[torch.Tensor, tuple[float, float, float, float]]:
    """Poses ``(N, 4, 4)`` and intrinsics ``fx, fy, cx, cy`` of the capture (through its lens,
    :func:`capture_lens`, the image's height spans ``fov_y_deg``)."""
    fy = 0.5 * cfg.height / distorted_radius(capture_lens(cfg), math.radians(cfg.fov_y_deg) / 2)
    return ring_cameras(cfg), (fy, fy, cfg.width / 2, cfg.height / 2)


def capture_lens(cfg: SceneCaptureConfig) -> torch.Tensor | None:
    """The capture's lens row (:mod:`vqad.nerf.lens`), or None for a pinhole."""
    if cfg.lens == "pinhole":
        return None
    k1, k2, k3, k4 = FISHEYE_K
    return torch.tensor([LENS_FISHEYE, k1, k2, 0.0, 0.0, k3, k4, 0.0, 0.0])


def _render_view(env: Environment, cfg: SceneCaptureConfig, pose: torch.Tensor, intr, background: bool) -> torch.Tensor:
    """One view: ``rgba (H, W, 4) uint8``, each pixel the box-filtered mean of its ``n × n`` rays
    (``n = cfg.supersample``; points ``(i + ½) / n`` across the pixel's square), raycast about
    :data:`RAY_CHUNK` rays at a time. Alpha is the share of the rays that hit (1 with the room), the colour
    straight: the hits' mean colour."""
    n = cfg.supersample
    centers = pixel_centers(cfg.height, cfg.width)  # (P, 2)
    off = (torch.arange(n, dtype=centers.dtype) + 0.5) / n - 0.5
    du, dv = torch.meshgrid(off, off, indexing="xy")
    sub = torch.stack([du.reshape(-1), dv.reshape(-1)], dim=-1)  # (n², 2)
    out = torch.empty(centers.shape[0], 4, dtype=torch.uint8)
    per_chunk = max(1, RAY_CHUNK // (n * n))  # pixels
    intr = torch.tensor(intr)
    for a in range(0, centers.shape[0], per_chunk):
        uv = (centers[a:a + per_chunk, None, :] + sub).reshape(-1, 2)  # (p · n², 2), each pixel's rays together
        o, d = rays_for_pixels(pose, intr, uv, capture_lens(cfg))
        _, color, hit = env.raycast(o, d, background)
        alpha = torch.ones_like(color[:, 0]) if background else hit.to(color.dtype)
        a_px = alpha.reshape(-1, n * n).mean(1)  # (p,)
        prem = (color * alpha[:, None]).reshape(-1, n * n, 3).mean(1)  # (p, 3)
        rgb = torch.where(a_px[:, None] > 0, prem / a_px.clamp_min(1e-12)[:, None], 0.0)
        rgba = torch.cat([rgb, a_px[:, None]], -1)
        out[a:a + per_chunk] = (rgba * 255 + 0.5).clamp(0, 255).to(torch.uint8)
    return out.reshape(cfg.height, cfg.width, 4)


def _depth_view(env: Environment, cfg: SceneCaptureConfig, pose: torch.Tensor, intr, background: bool) -> torch.Tensor:
    """One view's z-depth ``(H, W)`` float64 in world units along its pixel-centre rays (0: nothing hit)."""
    uv = pixel_centers(cfg.height, cfg.width, dtype=torch.float64)
    o, d = rays_for_pixels(pose.double(), torch.tensor(intr, dtype=torch.float64), uv, capture_lens(cfg))
    t, _, on_object = env.raycast(o, d, background)
    hit = torch.isfinite(t) if background else torch.isfinite(t) & on_object
    z = t * -(d @ pose[:3, 2].double())  # t · cos θ: the camera looks down −z
    return torch.where(hit, z, torch.zeros_like(z)).reshape(cfg.height, cfg.width)


def sparse_points(cfg: SceneCaptureConfig, env: Environment, c2w: torch.Tensor, intr, background: bool) -> torch.Tensor:
    """``(N, 3)`` world points as structure from motion would give them: the first hit of random pixels'
    rays (each seen by its view), plus Gaussian noise of ``point_noise``, and a ``point_outliers``
    share spread uniformly over the aabb_scale box (mismatched features). Deterministic (``seed``)."""
    g = torch.Generator().manual_seed(cfg.seed)
    n_out = int(round(cfg.points * cfg.point_outliers))
    n_in = cfg.points - n_out
    found, have = [torch.zeros(0, 3)], 0
    with _one_thread():
        for _ in range(1000):  # bounded: a capture whose views see nothing yields no surface points
            if have >= n_in:
                break
            views = torch.randint(0, c2w.shape[0], (RAY_CHUNK // 16,), generator=g)  # every view, pixel by pixel
            uv = torch.rand(views.shape[0], 2, generator=g) * torch.tensor([cfg.width, cfg.height])
            o, d = rays_for_pixels(c2w[views], torch.tensor(intr), uv, capture_lens(cfg))
            d = d / d.norm(dim=-1, keepdim=True)
            t, _, on_object = env.raycast(o, d, background)
            hit = torch.isfinite(t) if background else torch.isfinite(t) & on_object
            found.append(o[hit] + t[hit, None] * d[hit])
            have += int(hit.sum())
    pts = torch.cat(found)[:n_in]
    pts = pts + cfg.point_noise * torch.randn(pts.shape, generator=g)
    half = 0.5 * cfg.aabb_scale / NGP_SCALE  # the aabb_scale box in world units, around the ngp centre
    centre = (0.5 - torch.tensor(NGP_OFFSET)) / NGP_SCALE
    outliers = centre + half * (2 * torch.rand(n_out, 3, generator=g) - 1)
    return torch.cat([pts, outliers])


def passers_by(cfg: SceneCaptureConfig, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """View ``index``'s passers-by (``cfg.transients`` of them; none in a held-out frame): where they are
    ``(H, W) bool``, their colours ``(H, W, 3) uint8`` and their z-depth ``(H, W)`` float64 (world units),
    nearer ones over farther ones. Deterministic in ``(cfg.seed, index)``."""
    h, w = cfg.height, cfg.width
    where, rgb, z = np.zeros((h, w), bool), np.zeros((h, w, 3), np.uint8), np.zeros((h, w))
    if index % HOLD_EVERY == 0:
        return where, rgb, z
    rng = np.random.default_rng((cfg.seed, index))
    rows, cols = np.mgrid[0:h, 0:w] + 0.5
    people = [(rng.uniform(*TRANSIENT_DEPTH), rng.uniform(0, w), rng.uniform(0, h), rng.uniform(*TRANSIENT_HALF_HEIGHT),
               rng.uniform(*TRANSIENT_ASPECT), rng.uniform(0.15, 1.0, 3), rng.uniform(3, 8)) for _ in range(cfg.transients)]
    for depth, cx, cy, half_h, aspect, colour, stripes in sorted(people, key=lambda p: -p[0]):  # far ones first
        ry = max(1.5, half_h * h)
        rx = max(1.5, aspect * ry)
        inside = ((cols - cx) / rx) ** 2 + ((rows - cy) / ry) ** 2 <= 1.0
        band = 0.75 + 0.25 * np.sign(np.sin((rows - cy) / ry * stripes * np.pi))  # clothes: horizontal bands
        shade = np.clip(band * (1.0 - 0.3 * (cols - cx) / rx), 0, 1)  # lit from the left
        rgb[inside] = np.clip(np.rint(255 * shade[inside, None] * colour), 0, 255).astype(np.uint8)
        z[inside] = depth
        where |= inside
    return where, rgb, z


def photo_gains(cfg: SceneCaptureConfig) -> np.ndarray:
    """``(N, 3)`` each photo's colour gain per channel: ``2^(e_i + w_ic)`` with exposure ``e_i ~ N(0, σ²)``
    and white balance ``w_ic ~ N(0, (σ/2)²)`` stops, σ = ``cfg.exposure``, for the training photos, whose
    gains are then divided by their geometric mean per channel; 1 for the held-out frames (every
    :data:`~vqad.nerf.formats.common.HOLD_EVERY`-th) and everywhere at σ = 0. Deterministic in ``cfg.seed``."""
    gains = np.ones((cfg.views, 3))
    train = np.arange(cfg.views) % HOLD_EVERY != 0
    if cfg.exposure == 0 or not train.any():
        return gains
    rng = np.random.default_rng((cfg.seed, 0xE7))
    stops = rng.normal(0, cfg.exposure, (cfg.views, 1)) + rng.normal(0, cfg.exposure / 2, (cfg.views, 3))
    stops = stops[train] - stops[train].mean(0)
    gains[train] = np.exp2(stops)
    return gains


def _environment(cfg: SceneCaptureConfig) -> Environment:
    return Environment(ground_y=cfg.ground_y, dome_radius=cfg.dome_radius, checker=cfg.checker)


def render_capture(cfg: SceneCaptureConfig, background: bool = True):
    """Every view of the capture: ``rgba (N, H, W, 4) uint8`` (alpha 255 everywhere with the room,
    the object mask without), poses ``(N, 4, 4)`` and intrinsics ``fx, fy, cx, cy``: the static scene, without
    the passers-by of ``cfg.transients`` (:func:`passers_by`). All in memory: :func:`write_capture` renders and
    writes one view at a time instead."""
    cfg.validate()
    env = _environment(cfg)
    c2w, intr = _cameras(cfg)
    with _one_thread():
        images = [_render_view(env, cfg, pose, intr, background) for pose in c2w]
    return torch.stack(images), c2w, intr


def write_capture(out_dir, cfg: SceneCaptureConfig | None = None, background: bool = True,
                  on_view: Callable[[int, int], None] | None = None, depth: bool = False) -> Path:
    """Render the capture and write it in instant-ngp layout: ``out_dir/transforms.json`` and
    ``out_dir/images/NNNN.png``, ``transforms.json`` last (a folder without it is an interrupted
    capture). With ``cfg.transients``, also every frame's loss mask, ``out_dir/masks/NNNN.png`` (:func:`passers_by`).
    With ``depth``, also each view's z-depth as nerfstudio writes a phone's depth sensor:
    ``out_dir/depth/NNNN.png``, 16-bit, in :data:`DEPTH_UNIT_SCALE` world units (0: nothing hit), named by the
    frames' ``depth_file_path``. ``on_view(done, total)`` is called after each view is written. Returns
    the path of ``transforms.json``."""
    from PIL import Image

    cfg = cfg or SceneCaptureConfig()
    cfg.validate()
    env = _environment(cfg)
    c2w, (fx, fy, cx, cy) = _cameras(cfg)
    out = Path(out_dir)
    try:
        (out / "images").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create --out {out}: {e.strerror or e}") from e
    frames = []
    gains = photo_gains(cfg)
    with _one_thread():
        for i, pose in enumerate(c2w):  # one view in memory at a time
            name = f"images/{i:04d}.png"
            arr = _render_view(env, cfg, pose, (fx, fy, cx, cy), background).numpy()
            people, people_rgb, people_z = passers_by(cfg, i)
            arr[people, :3], arr[people, 3] = people_rgb[people], 255
            if cfg.exposure:  # the camera meters the whole photo, passers-by included
                arr[..., :3] = np.clip(np.rint(arr[..., :3] * gains[i]), 0, 255).astype(np.uint8)
            Image.fromarray(arr if not background else arr[..., :3], "RGBA" if not background else "RGB").save(out / name)
            frames.append({"file_path": name, "transform_matrix": pose.tolist()})
            if cfg.transients:  # nerfstudio wants a mask on every frame or none: white = train on the pixel
                (out / "masks").mkdir(exist_ok=True)
                Image.fromarray(np.where(people, 0, 255).astype(np.uint8), "L").save(out / f"masks/{i:04d}.png")
                frames[-1]["mask_path"] = f"masks/{i:04d}.png"
            if depth:
                (out / "depth").mkdir(exist_ok=True)
                z = _depth_view(env, cfg, pose, (fx, fy, cx, cy), background).numpy()
                z = np.rint(np.where(people, people_z, z) / DEPTH_UNIT_SCALE)  # a depth sensor sees them too
                Image.fromarray(np.clip(z, 0, 65535).astype(np.uint16)).save(out / f"depth/{i:04d}.png")
                frames[-1]["depth_file_path"] = f"depth/{i:04d}.png"
            if on_view is not None:
                on_view(i + 1, len(c2w))
    if cfg.lens == "fisheye":  # instant-ngp reads is_fisheye, nerfstudio camera_model
        lens = {"camera_model": "OPENCV_FISHEYE", "is_fisheye": True, **dict(zip(("k1", "k2", "k3", "k4"), FISHEYE_K))}
    else:
        lens = {"camera_model": "OPENCV", "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0}
    meta = {**lens, "fl_x": fx, "fl_y": fy, "cx": cx, "cy": cy, "w": cfg.width, "h": cfg.height,
            "aabb_scale": cfg.aabb_scale, "scale": NGP_SCALE,
            "offset": list(NGP_OFFSET), **({"depth_unit_scale_factor": DEPTH_UNIT_SCALE} if depth else {}), "frames": frames,
            "vqad_scene": {"background": background, **asdict(cfg)}}
    if cfg.points:
        write_ply_points(out / "sparse_pc.ply", sparse_points(cfg, env, c2w, (fx, fy, cx, cy), background).numpy())
        meta["ply_file_path"] = "sparse_pc.ply"
    path = out / "transforms.json"
    path.write_text(json.dumps(meta, indent=1) + "\n")
    return path
