"""Field → mesh: marching cubes on a regular grid over the unit cube, back in world coordinates."""

from __future__ import annotations

import numpy as np
import torch

from vqad.atomicio import save_mesh_file
from vqad.errors import InputError
from vqad.sdf.mesh import Mesh


def _lattice_points(r: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """Coordinates ``(n, 3)`` of x-major flat indices ``flat (n,)`` of the ``R^3`` lattice on axis values ``r (R,)``."""
    R = r.shape[0]
    return torch.stack([r[flat // (R * R)], r[(flat // R) % R], r[flat % R]], -1)


@torch.no_grad()
def evaluate_grid(fn, resolution: int, device, chunk: int = 1 << 18) -> np.ndarray:
    """``fn`` at the ``resolution^3`` lattice points of [-1, 1]^3: returns ``(R, R, R)`` float32, x-major."""
    r = torch.linspace(-1, 1, resolution, device=device)
    out = torch.empty(resolution ** 3, device=device)
    # build coordinates chunk by chunk to bound memory at high resolution
    idx = torch.arange(resolution ** 3, device=device)
    for s in range(0, resolution ** 3, chunk):
        out[s : s + chunk] = fn(_lattice_points(r, idx[s : s + chunk]))
    return out.reshape(resolution, resolution, resolution).cpu().numpy()


def _upsample_axis(v: torch.Tensor, lo: torch.Tensor, t: torch.Tensor, dim: int) -> torch.Tensor:
    """Linear interpolation of ``v`` along ``dim`` between coarse nodes ``lo`` and ``lo + 1`` at ``t``."""
    shape = [1] * v.dim()
    shape[dim] = -1
    t = t.reshape(shape)
    return v.index_select(dim, lo) * (1 - t) + v.index_select(dim, lo + 1) * t


@torch.no_grad()
def evaluate_grid_sparse(fn, resolution: int, device, block: int = 4, margin: float = 1.0,
                         chunk: int = 1 << 18) -> tuple[np.ndarray, float]:
    """``fn`` (a signed distance) on the ``resolution^3`` lattice of [-1, 1]^3, evaluated only near
    its zero level set: returns ``(R, R, R)`` float32 (x-major, as :func:`evaluate_grid`) and the
    fraction of lattice points evaluated.

    ``fn`` is first evaluated at every ``block``-th lattice point. A block of ``block^3`` cells whose
    8 corners share a sign and all lie farther than ``margin`` × the block's diagonal from zero
    cannot hold a zero crossing of a distance-like field (a 1-Lipschitz one needs only 0.5 × the
    diagonal; the margin absorbs a learned field's slack), so its points get the trilinear
    interpolation of the corner values, which keeps that sign. Every other block is evaluated in
    full, so near the surface the values, and marching cubes' mesh, are those of the dense lattice.
    """
    R = resolution
    nb = max(-(-(R - 1) // block), 1)  # blocks per axis
    cidx = torch.clamp(torch.arange(nb + 1) * block, max=R - 1)  # coarse lattice indices (Rc,)
    r = torch.linspace(-1, 1, R)
    rc = r[cidx]
    Rc = nb + 1
    gx, gy, gz = torch.meshgrid(rc, rc, rc, indexing="ij")
    pts = torch.stack([gx, gy, gz], -1).reshape(-1, 3).to(device)
    vc = torch.cat([fn(pts[s:s + chunk]) for s in range(0, pts.shape[0], chunk)]).reshape(Rc, Rc, Rc).float().cpu()
    # corners of each block (nb, nb, nb, 8)
    corners = torch.stack([vc[i:i + nb, j:j + nb, k:k + nb] for i in (0, 1) for j in (0, 1) for k in (0, 1)], -1)
    diag = block * (2.0 / (R - 1)) * 3 ** 0.5
    same_sign = (corners > 0).all(-1) | (corners < 0).all(-1)
    active = ~(same_sign & (corners.abs().min(-1).values > margin * diag))  # (nb, nb, nb)
    # far from the surface: trilinear interpolation of the coarse values
    i = torch.arange(R)
    lo = torch.clamp(i // block, max=nb - 1)
    t = (i - cidx[lo]).float() / (cidx[lo + 1] - cidx[lo]).clamp_min(1).float()
    vol = _upsample_axis(_upsample_axis(_upsample_axis(vc, lo, t, 0), lo, t, 1), lo, t, 2)
    # a lattice point is evaluated if any block it belongs to (two where it lies on a block face) is active
    hi = torch.where((i % block == 0) & (i > 0), i // block - 1, lo)
    mask = torch.zeros(R, R, R, dtype=torch.bool)
    for bx in (lo, hi):
        for by in (lo, hi):
            for bz in (lo, hi):
                mask |= active[bx[:, None, None], by[None, :, None], bz[None, None, :]]
    todo = mask.reshape(-1).nonzero().squeeze(1)
    flat = vol.reshape(-1)
    for s in range(0, todo.shape[0], chunk):
        n = todo[s:s + chunk]
        flat[n] = fn(_lattice_points(r, n).to(device)).float().cpu()
    return flat.reshape(R, R, R).numpy(), float(todo.shape[0]) / R ** 3


#: marching-cubes grid points per axis that extract_mesh (and `vqad mesh --resolution`, `fit-sdf --mc-resolution`)
#: accept: fewer than 8 cannot show a shape, 2048³ is 8.6 G lattice points
MC_MIN, MC_MAX = 8, 2048


#: host bytes per lattice point of a mesh extraction at its peak (the volume, its sparsity mask, the upsampling's
#: temporaries, marching cubes): 24-35 measured (peak RSS, `vqad mesh` of a sphere at --resolution 256 and 512)
MC_BYTES_PER_POINT = 28


def check_resolution(resolution, what: str = "resolution") -> int:
    """``resolution`` if it is an integer in ``MC_MIN..MC_MAX`` whose extraction fits this machine's free memory
    (:data:`MC_BYTES_PER_POINT` per lattice point), else one :class:`InputError` naming ``what`` (a flag) and
    what to do: at 2048 the lattice needs ~240 GB, and the system killed the process without a word."""
    from vqad.device import available_memory

    if isinstance(resolution, bool) or not isinstance(resolution, int) or not MC_MIN <= resolution <= MC_MAX:
        raise InputError(f"{what} must be an integer in {MC_MIN}..{MC_MAX} (grid points per axis), got {resolution!r}")
    need, free = MC_BYTES_PER_POINT * resolution ** 3, available_memory()
    if free is not None and need > free:
        fits = int((free / MC_BYTES_PER_POINT) ** (1 / 3))
        raise InputError(f"{what} {resolution}: marching cubes on {resolution}³ points takes about {need / 1e9:,.1f} GB "
                         f"and this machine has {free / 1e9:,.1f} GB free; give at most {fits} (memory grows with "
                         "its cube)")
    return resolution


def extract_mesh(field, lod: int | None = None, resolution: int = 256, world: bool = True, sparse: bool = True) -> Mesh:
    """Zero level set of an SDF field at ``lod`` as a triangle mesh (world coordinates by default).

    ``sparse`` (default) evaluates the field only in blocks near its zero level set
    (:func:`evaluate_grid_sparse`; ~30–45 % of a 160³ lattice for the demo shape, whose
    surface fills much of the cube); ``sparse=False``
    evaluates every lattice point.
    """
    from skimage.measure import marching_cubes

    if getattr(field, "kind", None) != "sdf":  # a radiance field, a TSDF, a path: say what this meshes
        what = f"a {field.kind!r} field" if hasattr(field, "kind") else f"a {type(field).__name__}"
        raise InputError(f"extract_mesh meshes an SDF field (vqad.load(path) of an SDF model), not {what}"
                         + ("; a TSDF's mesh: vqad.tsdf.extract.extract_tsdf_mesh" if getattr(field, "kind", None) == "tsdf" else ""))
    check_resolution(resolution)
    lod = field.check_lod(lod)  # (None: the finest)
    device = field.grid.octree.device
    fn = lambda x: field(x, lod)  # noqa: E731
    vol = evaluate_grid_sparse(fn, resolution, device)[0] if sparse else evaluate_grid(fn, resolution, device)
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


#: the mesh files :func:`save_mesh` writes (by suffix)
MESH_SUFFIXES = (".ply", ".obj", ".stl", ".off", ".glb")


def save_mesh(mesh: Mesh, path) -> None:
    """Write ``mesh`` to ``path`` (a suffix of :data:`MESH_SUFFIXES`), atomically."""
    save_mesh_file(mesh.to_trimesh(), path)
