"""The built-in procedural scene: a few coloured analytic shapes, ray-cast by vqad itself.

It is the default scene of ``make demo`` and of most radiance-field tests: nothing to download,
exact ground truth (RGB, z-depth, masks, and the signed distance of every shape), deterministic,
and fast (the default 40 + 5 + 10 views at 64×64 render in well under a second on one CPU core).

The object floats in empty space (no ground plane), so its silhouette is a meaningful foreground
mask. Shading is Lambertian under two fixed world-space directional lights plus an ambient term, so
the radiance does not depend on the view direction and a perfect field reproduces every view.

Cameras sit on a sphere around the object (a Fibonacci spiral, so they cover it evenly, including
from below) and look at the origin; train, val and test use spirals with different phases, so the
held-out views are new viewpoints.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from vqad.nerf.data import SceneDataset, Views
from vqad.nerf.rays import pixel_centers, rays_for_pixels

_GOLDEN_ANGLE = math.pi * (3.0 - math.sqrt(5.0))


@dataclass(frozen=True)
class Sphere:
    center: tuple[float, float, float]
    radius: float
    color: tuple[float, float, float]  # albedo, sRGB in [0, 1]

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        c = torch.tensor(self.center)
        return c - self.radius, c + self.radius

    def sdf(self, x: torch.Tensor) -> torch.Tensor:
        """Signed distance ``(N, 3) -> (N,)`` (negative inside)."""
        return (x - torch.tensor(self.center, dtype=x.dtype)).norm(dim=-1) - self.radius

    def intersect(self, o: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """First hit ``t (R,)`` (``inf`` on a miss) and the outward unit normal ``(R, 3)`` there.

        ``o + t d`` with ``|d| = 1``: ``t = −b − √(b² − c)``, ``b = (o − c)·d``, ``c = |o − c|² − r²``.
        """
        oc = o - torch.tensor(self.center, dtype=o.dtype)
        b = (oc * d).sum(-1)
        c = (oc * oc).sum(-1) - self.radius ** 2
        disc = b * b - c
        t = -b - disc.clamp_min(0).sqrt()
        t = torch.where((disc >= 0) & (t > 0), t, torch.full_like(t, math.inf))
        n = oc + torch.nan_to_num(t, posinf=0.0)[:, None] * d
        return t, n / n.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@dataclass(frozen=True)
class Box:
    center: tuple[float, float, float]
    half: tuple[float, float, float]  # half extents, axis aligned
    color: tuple[float, float, float]

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        c, h = torch.tensor(self.center), torch.tensor(self.half)
        return c - h, c + h

    def sdf(self, x: torch.Tensor) -> torch.Tensor:
        """Signed distance ``(N, 3) -> (N,)`` of the box (exact, negative inside)."""
        q = (x - torch.tensor(self.center, dtype=x.dtype)).abs() - torch.tensor(self.half, dtype=x.dtype)
        return q.clamp_min(0).norm(dim=-1) + q.amax(-1).clamp_max(0)

    def intersect(self, o: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slab test: first hit ``t (R,)`` (``inf`` on a miss) and the face normal ``(R, 3)``."""
        lo, hi = (b.to(o.dtype) for b in self.bounds())
        inv = 1.0 / torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)
        t0, t1 = (lo - o) * inv, (hi - o) * inv
        tmin_axis = torch.minimum(t0, t1)
        t_enter, axis = tmin_axis.max(-1)
        t_exit = torch.maximum(t0, t1).amin(-1)
        hit = (t_enter <= t_exit) & (t_enter > 0)
        t = torch.where(hit, t_enter, torch.full_like(t_enter, math.inf))
        n = torch.zeros_like(o)
        n.scatter_(1, axis[:, None], -torch.sign(d.gather(1, axis[:, None])))
        return t, n


Shape = Sphere | Box


def default_shapes() -> tuple[Shape, ...]:
    """A red ball resting on a blue slab, with a yellow pillar and two small balls (world units)."""
    return (
        Sphere((0.0, 0.12, 0.0), 0.42, (0.85, 0.22, 0.16)),
        Box((0.0, -0.42, 0.0), (0.62, 0.12, 0.46), (0.22, 0.42, 0.85)),
        Box((-0.42, 0.08, -0.28), (0.14, 0.38, 0.14), (0.92, 0.78, 0.18)),
        Sphere((0.46, -0.12, 0.36), 0.18, (0.25, 0.75, 0.3)),
        Sphere((-0.3, 0.52, 0.32), 0.14, (0.62, 0.32, 0.78)),
    )


@dataclass(frozen=True)
class ProceduralScene:
    """Analytic shapes (their union) under fixed directional lights.

    ``color = albedo · (ambient + Σ_l intensity_l · max(0, n · l))``, clipped to [0, 1].
    """

    shapes: tuple[Shape, ...] = field(default_factory=default_shapes)
    lights: tuple[tuple[tuple[float, float, float], float], ...] = (((0.45, 0.8, 0.4), 0.65), ((-0.5, -0.6, -0.3), 0.25))
    ambient: float = 0.22

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """World-space AABB of the union: ``lo (3,), hi (3,)``."""
        lo, hi = zip(*(s.bounds() for s in self.shapes))
        return torch.stack(lo).amin(0), torch.stack(hi).amax(0)

    def sdf(self, x: torch.Tensor) -> torch.Tensor:
        """Signed distance to the union ``(N, 3) -> (N,)`` (exact outside each shape, a bound inside)."""
        return torch.stack([s.sdf(x) for s in self.shapes]).amin(0)

    def raycast(self, o: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Nearest hit of rays ``o + t d`` (``(R, 3)`` each, ``|d| = 1``).

        Returns:
            ``t (R,)`` ray distance (``inf`` on a miss), shaded colour ``(R, 3)`` in [0, 1] (0 on a
            miss) and ``hit (R,)`` bool.
        """
        t_best = torch.full(o.shape[:1], math.inf, dtype=o.dtype)
        normal = torch.zeros_like(o)
        albedo = torch.zeros_like(o)
        for s in self.shapes:
            t, n = s.intersect(o, d)
            closer = t < t_best
            t_best = torch.where(closer, t, t_best)
            normal = torch.where(closer[:, None], n, normal)
            albedo = torch.where(closer[:, None], torch.tensor(s.color, dtype=o.dtype), albedo)
        shade = torch.full_like(t_best, self.ambient)
        for direction, intensity in self.lights:
            l = torch.tensor(direction, dtype=o.dtype)
            shade = shade + intensity * (normal * (l / l.norm())).sum(-1).clamp_min(0)
        hit = torch.isfinite(t_best)
        color = (albedo * shade[:, None]).clamp(0, 1) * hit[:, None]
        return t_best, color, hit


def look_at(eye: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """OpenGL camera-to-world ``(4, 4)`` at ``eye (3,)`` looking at ``target`` (default origin), y up."""
    target = torch.zeros(3) if target is None else target
    fwd = target - eye
    fwd = fwd / fwd.norm()
    up = torch.tensor([0.0, 1.0, 0.0]) if abs(float(fwd[1])) < 0.999 else torch.tensor([0.0, 0.0, 1.0])
    right = torch.linalg.cross(fwd, up)
    right = right / right.norm()
    true_up = torch.linalg.cross(right, fwd)
    c2w = torch.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, true_up, -fwd, eye
    return c2w


def sphere_cameras(n: int, radius: float, phase: float = 0.0) -> torch.Tensor:
    """``n`` cameras on a Fibonacci spiral of the sphere of ``radius``, looking at the origin: ``(n, 4, 4)``."""
    out = []
    for i in range(n):
        y = 1.0 - 2.0 * (i + 0.5) / n
        r = math.sqrt(max(0.0, 1.0 - y * y))
        phi = i * _GOLDEN_ANGLE + phase
        out.append(look_at(radius * torch.tensor([r * math.cos(phi), y, r * math.sin(phi)])))
    return torch.stack(out) if out else torch.zeros(0, 4, 4)


@contextmanager
def _one_thread():
    """Run on one intra-op thread: the scene is ~50 cheap element-wise passes, and on a busy shared
    CPU each OpenMP wake-up of a second thread costs ~10 ms, which made generation 20× slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def render_views(scene: ProceduralScene, c2w: torch.Tensor, intrinsics: torch.Tensor, height: int, width: int,
                 background=(1.0, 1.0, 1.0), names: list[str] | None = None) -> Views:
    """Ray-cast every pixel centre of every camera.

    Args:
        c2w: ``(N, 4, 4)`` OpenGL poses; intrinsics ``(N, 4)`` fx, fy, cx, cy.
    Returns:
        :class:`Views` with images ``(N, H, W, 3) uint8`` (composited on ``background``), masks
        ``(N, H, W) uint8`` (255 where a ray hits) and z-depth ``(N, H, W) float16`` (0 on a miss).
    """
    n = c2w.shape[0]
    uv = pixel_centers(height, width)  # (H·W, 2)
    c2w = c2w.float()
    intrinsics = intrinsics.float()
    # all views in one batch: a few large tensor ops instead of many small ones
    with _one_thread():
        o, d = rays_for_pixels(c2w.repeat_interleave(uv.shape[0], 0), intrinsics.repeat_interleave(uv.shape[0], 0),
                               uv.repeat(n, 1))
        t, color, hit = scene.raycast(o, d)
        forward = (-c2w[:, :3, 2]).repeat_interleave(uv.shape[0], 0)
        z = torch.where(hit, t * (d * forward).sum(-1), torch.zeros_like(t))  # ray distance → z-depth
        rgb = torch.where(hit[:, None], color, torch.tensor(background, dtype=torch.float32))
    return Views(
        images=(rgb * 255 + 0.5).clamp(0, 255).to(torch.uint8).reshape(n, height, width, 3),
        c2w=c2w.contiguous(),
        intrinsics=intrinsics.contiguous(),
        masks=(hit.to(torch.uint8) * 255).reshape(n, height, width),
        depth=z.to(torch.float16).reshape(n, height, width),
        names=names or [f"view_{i:03d}" for i in range(n)],
    )


@dataclass(frozen=True)
class ProceduralConfig:
    """The built-in scene's cameras and resolution (``resolution`` is the image side in pixels)."""

    resolution: int = 64
    n_train: int = 40
    n_val: int = 5
    n_test: int = 10
    fov_deg: float = 40.0
    camera_radius: float = 3.0
    padding: float = 0.1  # the unit cube holds the shapes' box grown by this fraction


def procedural_dataset(cfg: ProceduralConfig | None = None, background=(1.0, 1.0, 1.0), downscale: int = 1,
                       scene: ProceduralScene | None = None) -> SceneDataset:
    """The built-in scene as a :class:`SceneDataset` (train / val / test, RGB + z-depth + masks).

    ``downscale`` renders at ``resolution // downscale`` pixels (intrinsics follow). The unit cube
    is the shapes' known AABB grown by ``cfg.padding``; ``near``/``far`` bound the z-depth of that
    box from every camera.
    """
    from vqad.nerf.formats.common import near_far_from_box, normalization_from_box, unit_cube_box

    cfg = cfg or ProceduralConfig()
    scene = scene or ProceduralScene()
    if cfg.resolution < 1 or downscale < 1 or min(cfg.n_train, cfg.n_val, cfg.n_test) < 0:
        raise ValueError("resolution, downscale and view counts must be positive")
    res = max(1, cfg.resolution // downscale)
    f = 0.5 * res / math.tan(math.radians(cfg.fov_deg) / 2)
    splits = {}
    for split, n, phase in (("train", cfg.n_train, 0.0), ("val", cfg.n_val, 1.3), ("test", cfg.n_test, 2.6)):
        c2w = sphere_cameras(n, cfg.camera_radius, phase)
        intr = torch.tensor([[f, f, res / 2, res / 2]]).expand(n, 4).contiguous()
        splits[split] = render_views(scene, c2w, intr, res, res, background, [f"{split}_{i:03d}" for i in range(n)])
    lo, hi = scene.bounds()
    pad = (hi - lo).amax() * cfg.padding / 2
    lo, hi = lo - pad, hi + pad
    norm = normalization_from_box(lo, hi)
    all_c2w = torch.cat([v.c2w for v in splits.values()])
    near, far = near_far_from_box(all_c2w, *unit_cube_box(norm))
    return SceneDataset(
        name="procedural", format="procedural", splits=splits, normalization=norm, near=near, far=far,
        background=tuple(float(c) for c in background), source="", downscale=int(downscale),
        split_sources={s: f"built-in, {len(v)} views on a sphere" for s, v in splits.items()},
        bbox=(tuple(lo.tolist()), tuple(hi.tolist())),
    )

