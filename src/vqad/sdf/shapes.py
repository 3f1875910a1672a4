"""Built-in procedural shapes (no download): analytic SDFs turned into meshes by marching cubes."""

from __future__ import annotations

import numpy as np

from vqad.sdf.mesh import Mesh


def _smooth_union(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b * (1 - h) + a * h - k * h * (1 - h)


def demo_sdf(p: np.ndarray) -> np.ndarray:
    """A torus blended with a sphere and a rounded box, minus a hole: ``(N, 3) -> (N,)``.

    Features of every scale (a thin ring, a sharp-ish box edge, a hole), so LODs differ visibly.
    """
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    torus = np.sqrt((np.sqrt(x**2 + z**2) - 0.55) ** 2 + (y + 0.15) ** 2) - 0.14
    sphere = np.sqrt(x**2 + (y - 0.2) ** 2 + z**2) - 0.38
    q = np.abs(p - np.array([0.0, -0.45, 0.0])) - np.array([0.32, 0.12, 0.32])
    box = np.linalg.norm(np.maximum(q, 0), axis=1) + np.minimum(q.max(axis=1), 0) - 0.03
    d = _smooth_union(_smooth_union(torus, sphere, 0.12), box, 0.08)
    hole = np.sqrt(x**2 + z**2) - 0.12  # a vertical hole through the sphere
    return np.maximum(d, -hole)


def demo_mesh(resolution: int = 160) -> Mesh:
    """The demo shape as a watertight triangle mesh (marching cubes of :func:`demo_sdf`)."""
    from skimage.measure import marching_cubes

    r = np.linspace(-1, 1, resolution)
    g = np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    vol = demo_sdf(g).reshape(resolution, resolution, resolution)
    step = 2.0 / (resolution - 1)
    verts, faces, _, _ = marching_cubes(vol, level=0.0, spacing=(step,) * 3)
    return Mesh((verts - 1.0).astype(np.float64), faces.astype(np.int64))
