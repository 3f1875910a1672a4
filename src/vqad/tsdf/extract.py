"""Meshes of truncated distance fields: marching cubes that never crosses unobserved space.

A TSDF knows nothing outside the voxels a camera saw; a mesh through a cube with an unobserved
corner would invent a surface (the classic artefact at the band's edges and behind the surface).
:func:`masked_marching_cubes` keeps only the triangles of cubes whose 8 corners are all observed, as
a fusion's own mesh extraction does.
"""

from __future__ import annotations

import numpy as np
import torch

from vqad.errors import InputError
from vqad.octree import morton_decode
from vqad.sdf.mesh import Mesh

#: dense lattice points a TSDF mesh may allocate (R^3 float32 + bool); a finer one is refused
MAX_LATTICE = 1 << 28


def masked_marching_cubes(vol: np.ndarray, observed: np.ndarray, spacing: float, origin, level: float = 0.0,
                          allow_degenerate: bool = True) -> Mesh:
    """The ``level`` set of ``vol (X, Y, Z)`` where all 8 corners of a cube are ``observed (X, Y, Z)``.

    Lattice point ``(i, j, k)`` lies at ``origin + (i, j, k) · spacing``. Unobserved values are
    ignored (they may be anything finite). Returns an empty mesh when no observed cube holds a crossing.
    The one masked marching cubes of vqad: a field's mesh (:func:`extract_tsdf_mesh`) and a fusion's
    (:meth:`vqad.tsdf.fusion.FusedTSDF.mesh`, tile by tile). ``allow_degenerate``: as skimage's.
    """
    from skimage.measure import marching_cubes

    if vol.shape != observed.shape or vol.ndim != 3 or min(vol.shape) < 2:
        raise ValueError(f"vol {vol.shape} and observed {observed.shape} must be equal 3D shapes of at least 2 points")
    v = np.where(observed, vol, level + 1.0).astype(np.float32)
    if not (v.min() < level < v.max()):
        return Mesh(np.zeros((0, 3)), np.zeros((0, 3), np.int64))
    verts, faces, _, _ = marching_cubes(v, level=level, allow_degenerate=allow_degenerate)
    cube_ok = observed[:-1, :-1, :-1].copy()
    for di in (0, 1):
        for dj in (0, 1):
            for dk in (0, 1):
                cube_ok &= observed[di:di + observed.shape[0] - 1, dj:dj + observed.shape[1] - 1, dk:dk + observed.shape[2] - 1]
    # each triangle lies in one cube: the floor of its centroid (vertices sit on that cube's edges)
    cube = np.floor(verts[faces].mean(1)).astype(np.int64)
    cube = np.minimum(cube, np.array(cube_ok.shape) - 1)
    keep = cube_ok[cube[:, 0], cube[:, 1], cube[:, 2]]
    faces = faces[keep]
    used = np.unique(faces)
    remap = np.full(len(verts), -1, np.int64)
    remap[used] = np.arange(len(used))
    return Mesh(verts[used].astype(np.float64) * spacing + np.asarray(origin, np.float64), remap[faces])


def extract_tsdf_mesh(field, lod: int | None = None, per_cell: int | None = None, world: bool = True,
                      chunk: int = 1 << 18) -> Mesh:
    """Zero level set of a TSDF field at ``lod`` inside its observed space (the finest occupied cells).

    The lattice has ``per_cell`` points per finest cell edge (default 2 up to level 7, else 1); only
    lattice points in occupied cells are evaluated. World coordinates by default.
    """
    octree = field.grid.octree
    lod = field.check_lod(lod)  # (None: the finest)
    L = octree.max_level
    s = per_cell or (2 if L <= 7 else 1)
    if not 1 <= s <= 8:
        raise InputError(f"--per-cell must be in 1..8, got {s}")
    R = s * (1 << L) + 1
    if R ** 3 > MAX_LATTICE:
        raise InputError(f"a {R}^3 lattice is too large to mesh here: use fewer points per cell")
    device = octree.device
    ijk = morton_decode(octree.codes[L], bits=L).to(device)  # (C, 3) occupied finest cells
    r = torch.arange(s + 1, device=device)
    offs = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    obs = torch.zeros(R ** 3, dtype=torch.bool, device=device)
    cells = max(chunk // offs.shape[0], 1)  # cells per chunk
    for a in range(0, ijk.shape[0], cells):
        lat = (ijk[a:a + cells, None] * s + offs[None]).reshape(-1, 3)
        obs[(lat[:, 0] * R + lat[:, 1]) * R + lat[:, 2]] = True
    idx = obs.nonzero().squeeze(1)
    vol = torch.ones(R ** 3, dtype=torch.float32, device=device)
    step = 2.0 / (R - 1)
    with torch.no_grad():
        for a in range(0, idx.shape[0], chunk):
            n = idx[a:a + chunk]
            p = torch.stack([n // (R * R), (n // R) % R, n % R], -1).float() * step - 1.0
            vol[n] = field.query(p, lod).float()
    mesh = masked_marching_cubes(vol.reshape(R, R, R).cpu().numpy(), obs.reshape(R, R, R).cpu().numpy(), step, (-1.0, -1.0, -1.0))
    if len(mesh.faces) == 0:
        raise InputError(f"the field at LOD {lod} has no zero crossing in its observed space: nothing to mesh (is the model trained?)")
    if world:
        mesh = mesh.transformed(lambda v: field.normalization.to_world(torch.from_numpy(v)).numpy())
    return mesh
