"""Sphere tracing of SDF fields to shaded images (CPU or CUDA)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class OrbitCamera:
    """A pinhole camera on a sphere around the origin of the unit cube, looking at the origin."""

    azimuth_deg: float = 35.0
    elevation_deg: float = 20.0
    distance: float = 3.2
    fov_deg: float = 40.0
    width: int = 320
    height: int = 320

    def rays(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Origins and unit directions, ``(H*W, 3)`` each, in unit-cube coordinates (y up)."""
        az, el = math.radians(self.azimuth_deg), math.radians(self.elevation_deg)
        eye = torch.tensor(
            [self.distance * math.cos(el) * math.sin(az), self.distance * math.sin(el), self.distance * math.cos(el) * math.cos(az)],
            device=device,
        )
        fwd = -eye / eye.norm()
        right = torch.linalg.cross(fwd, torch.tensor([0.0, 1.0, 0.0], device=device))
        right = right / right.norm()
        up = torch.linalg.cross(right, fwd)
        f = 0.5 * self.height / math.tan(math.radians(self.fov_deg) / 2)
        j, i = torch.meshgrid(torch.arange(self.height, device=device), torch.arange(self.width, device=device), indexing="ij")
        u = (i.float() + 0.5 - self.width / 2) / f
        v = -(j.float() + 0.5 - self.height / 2) / f
        d = fwd[None] + u.reshape(-1, 1) * right[None] + v.reshape(-1, 1) * up[None]
        d = d / d.norm(dim=-1, keepdim=True)
        return eye.expand_as(d).contiguous(), d


def ray_box(o: torch.Tensor, d: torch.Tensor, lo: float = -1.0, hi: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Entry and exit distances of rays with the box [lo, hi]^3 (``t_near > t_far`` means a miss)."""
    inv = 1.0 / torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)
    t0, t1 = (lo - o) * inv, (hi - o) * inv
    return torch.minimum(t0, t1).amax(-1).clamp_min(0.0), torch.maximum(t0, t1).amin(-1)


@torch.no_grad()
def sphere_trace(sdf, o: torch.Tensor, d: torch.Tensor, max_steps: int = 128, eps: float = 1e-3,
                 step_scale: float = 0.9, chunk: int = 1 << 16) -> tuple[torch.Tensor, torch.Tensor]:
    """March ``t += step_scale · sdf(o + t d)`` inside the unit cube until ``|sdf| < eps``.

    Args:
        sdf: ``(N, 3) -> (N,)`` signed distance (unit-cube units).
        o, d: ``(R, 3)`` ray origins and unit directions.
    Returns:
        ``hit (R,)`` bool and ``t (R,)`` distances of the hits.
    """
    t, t_far = ray_box(o, d)
    hit = torch.zeros_like(t, dtype=torch.bool)
    active = t < t_far
    for _ in range(max_steps):
        idx = active.nonzero().squeeze(-1)
        if idx.numel() == 0:
            break
        x = o[idx] + t[idx, None] * d[idx]
        dist = torch.cat([sdf(x[s : s + chunk]) for s in range(0, idx.numel(), chunk)])
        done = dist.abs() < eps
        hit[idx[done]] = True
        t[idx] = t[idx] + step_scale * dist.clamp_min(-0.05)  # a slight overshoot steps back
        escaped = t[idx] > t_far[idx]
        active[idx[done | escaped]] = False
    return hit, t


@torch.no_grad()
def sdf_normals(sdf, x: torch.Tensor, h: float = 1.5e-3) -> torch.Tensor:
    """Unit normals by central differences: ``(N, 3) -> (N, 3)``."""
    offs = torch.eye(3, device=x.device) * h
    g = torch.stack([sdf(x + offs[a]) - sdf(x - offs[a]) for a in range(3)], -1)
    return g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def render_sdf(field, lod: int | None = None, camera: OrbitCamera | None = None,
               background=(1.0, 1.0, 1.0), base_color=(0.72, 0.78, 0.86)) -> np.ndarray:
    """Shaded image of an SDF field at ``lod``: ``(H, W, 3)`` uint8.

    Two-light Lambertian plus ambient shading on sphere-traced hits; misses get ``background``.
    """
    camera = camera or OrbitCamera()
    device = field.grid.octree.device
    lod = field.grid.octree.max_level if lod is None else lod
    fn = lambda x: field(x, lod)  # noqa: E731
    o, d = camera.rays(device)
    hit, t = sphere_trace(fn, o, d)
    img = torch.tensor(background, device=device).repeat(o.shape[0], 1)
    if hit.any():
        x = o[hit] + t[hit, None] * d[hit]
        n = torch.cat([sdf_normals(fn, x[s : s + 65536]) for s in range(0, x.shape[0], 65536)])
        lights = torch.tensor([[0.5, 0.8, 0.6], [-0.6, 0.3, -0.4]], device=device)
        lights = lights / lights.norm(dim=-1, keepdim=True)
        diffuse = (n @ lights.T).clamp_min(0) @ torch.tensor([0.75, 0.3], device=device)
        rim = (1 - (n * -d[hit]).sum(-1).clamp(0, 1)) ** 3 * 0.15
        shade = (0.22 + diffuse + rim).clamp(0, 1.2)
        img[hit] = (torch.tensor(base_color, device=device)[None] * shade[:, None]).clamp(0, 1)
    img = img.reshape(camera.height, camera.width, 3)
    return (img.cpu().numpy() * 255 + 0.5).astype(np.uint8)


def save_png(img: np.ndarray, path) -> None:
    from PIL import Image

    Image.fromarray(img).save(str(path))
