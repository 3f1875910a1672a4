"""Quality metrics: geometry (Chamfer-L1, normal consistency, IoU) and images (PSNR, SSIM).

Geometry metrics are computed in the model's unit-cube frame (the input mesh centred and scaled so
the longest side of its bounding box spans 1.8, i.e. the cube [-1, 1]^3 with a 10% margin), so they
are comparable across meshes of any size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .mesh import Mesh, SDFOracle, sample_surface

CHAMFER_SAMPLES = 100_000
IOU_SAMPLES = 500_000


@dataclass
class GeometryMetrics:
    chamfer_l1: float  # mean of the two directed mean nearest-neighbour distances (unit-cube units)
    normal_consistency: float  # mean |n_a · n_b| of nearest neighbours, both directions
    iou: float  # volumetric IoU from uniform points in the cube

    def as_dict(self) -> dict:
        return {"chamfer_l1": self.chamfer_l1, "normal_consistency": self.normal_consistency, "iou": self.iou}


def chamfer_and_normals(a: Mesh, b: Mesh, n: int = CHAMFER_SAMPLES, seed: int = 0) -> tuple[float, float]:
    """Symmetric Chamfer-L1 and normal consistency between two meshes.

    Chamfer-L1 ``= 0.5 (mean_{p ∈ S_a} dist(p, B) + mean_{q ∈ S_b} dist(q, A))`` with ``n``
    area-weighted samples ``S`` per mesh and *exact point-to-surface* distances (pysdf), so the
    value has no sampling floor: two identical meshes give 0. Normal consistency is the mean
    ``|n_p · n_q|`` of nearest sample neighbours, both directions. Same units as the meshes.
    """
    from pysdf import SDF
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(seed)
    pa, na = sample_surface(a, n, rng)
    pb, nb = sample_surface(b, n, rng)

    def dist_to(mesh: Mesh, pts: np.ndarray) -> np.ndarray:
        f = SDF(np.ascontiguousarray(mesh.vertices, dtype=np.float32), np.ascontiguousarray(mesh.faces, dtype=np.uint32), robust=False)
        return np.abs(f(np.ascontiguousarray(pts, dtype=np.float32)))

    chamfer = 0.5 * (dist_to(b, pa).mean() + dist_to(a, pb).mean())
    _, ia = cKDTree(pb).query(pa, workers=-1)
    _, ib = cKDTree(pa).query(pb, workers=-1)
    nc = 0.5 * (np.abs((na * nb[ia]).sum(1)).mean() + np.abs((nb * na[ib]).sum(1)).mean())
    return float(chamfer), float(nc)


@torch.no_grad()
def volumetric_iou(field, lod: int, oracle: SDFOracle, n: int = IOU_SAMPLES, seed: int = 0, chunk: int = 1 << 17) -> float:
    """IoU of the insides (sdf < 0) of the field and the mesh over ``n`` uniform points in the cube."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=(n, 3)).astype(np.float32)
    world = x / field.normalization.scale + np.asarray(field.normalization.center)
    gt = oracle(world) < 0
    device = field.grid.octree.device
    xt = torch.from_numpy(x).to(device)
    pred = torch.cat([field(xt[s : s + chunk], lod) for s in range(0, n, chunk)]).cpu().numpy() < 0
    union = np.logical_or(gt, pred).sum()
    return float(np.logical_and(gt, pred).sum() / max(union, 1))


def geometry_metrics(field, lod: int, mesh_world: Mesh, extracted_world: Mesh, oracle: SDFOracle) -> GeometryMetrics:
    """All geometry metrics at one LOD, in the unit-cube frame."""
    to_unit = lambda v: field.normalization.to_unit(torch.from_numpy(v)).numpy()  # noqa: E731
    ch, nc = chamfer_and_normals(mesh_world.transformed(to_unit), extracted_world.transformed(to_unit))
    return GeometryMetrics(ch, nc, volumetric_iou(field, lod, oracle))


def psnr(pred: torch.Tensor, gt: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1]: ``-10 log10(MSE)``."""
    mse = torch.mean((pred.float() - gt.float()) ** 2).clamp_min(1e-12)
    return float(-10.0 * torch.log10(mse))


def ssim(pred: torch.Tensor, gt: torch.Tensor) -> float:
    """SSIM (Gaussian window 11, σ 1.5) of ``(H, W, 3)`` images in [0, 1], via pytorch-msssim."""
    from pytorch_msssim import ssim as _ssim

    a = pred.float().permute(2, 0, 1)[None].clamp(0, 1)
    b = gt.float().permute(2, 0, 1)[None]
    return float(_ssim(a, b, data_range=1.0, size_average=True, win_size=11, win_sigma=1.5))
