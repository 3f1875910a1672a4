"""Field → mesh: marching cubes on a regular grid over the unit cube, back in world coordinates."""

from __future__ import annotations

import numpy as np
import torch

from .errors import InputError
from .mesh import Mesh


@torch.no_grad()
def evaluate_grid(fn, resolution: int, device, chunk: int = 1 << 18) -> np.ndarray:
    """``fn`` at the ``resolution^3`` lattice points of [-1, 1]^3: returns ``(R, R, R)`` float32, x-major."""
    r = torch.linspace(-1, 1, resolution, device=device)
    out = torch.empty(resolution ** 3, device=device)
    # build coordinates chunk by chunk to bound memory at high resolution
    idx = torch.arange(resolution ** 3, device=device)
    for s in range(0, resolution ** 3, chunk):
        i = idx[s : s + chunk]
        x = torch.stack([r[i // (resolution * resolution)], r[(i // resolution) % resolution], r[i % resolution]], -1)
        out[s : s + chunk] = fn(x)
    return out.reshape(resolution, resolution, resolution).cpu().numpy()


def extract_mesh(field, lod: int | None = None, resolution: int = 256, world: bool = True) -> Mesh:
    """Zero level set of an SDF field at ``lod`` as a triangle mesh (world coordinates by default)."""
    from skimage.measure import marching_cubes

    lod = field.grid.octree.max_level if lod is None else lod
    if lod not in field.lods:
        raise InputError(f"LOD {lod} is not in this model: choose one of {field.lods}")
    device = field.grid.octree.device
    vol = evaluate_grid(lambda x: field(x, lod), resolution, device)
    if not (vol.min() < 0 < vol.max()):
        raise InputError(f"the field at LOD {lod} has no zero crossing: nothing to mesh (is the model trained?)")
    step = 2.0 / (resolution - 1)
    verts, faces, _, _ = marching_cubes(vol, level=0.0, spacing=(step, step, step))
    verts = verts - 1.0
    # with the field negative inside, skimage's winding already gives outward normals
    mesh = Mesh(verts.astype(np.float64), faces.astype(np.int64))
    if world:
        mesh = mesh.transformed(lambda v: field.normalization.to_world(torch.from_numpy(v)).numpy())
    return mesh


def save_mesh(mesh: Mesh, path) -> None:
    mesh.to_trimesh().export(str(path))
