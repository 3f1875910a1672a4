"""Geometry metrics: Chamfer-L1, normal consistency, F-score between meshes; volumetric IoU of an SDF field."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vqad.sdf.mesh import Mesh, SDFOracle, sample_surface

CHAMFER_SAMPLES = 100_000
IOU_SAMPLES = 500_000
#: the most samples either metric takes: both hold all their points at once (10 M: ~0.5 GB, and ~30 s of
#: exact distances per LOD at pysdf's ~350 k points/s); more is a mistake, not a better estimate
MAX_METRIC_SAMPLES = 10_000_000


@dataclass
class GeometryMetrics:
    chamfer_l1: float  # mean of the two directed mean nearest-neighbour distances (unit-cube units)
    normal_consistency: float  # mean |n_a · n_b| of nearest neighbours, both directions
    iou: float  # volumetric IoU from uniform points in the cube

    def as_dict(self) -> dict:
        return {"chamfer_l1": self.chamfer_l1, "normal_consistency": self.normal_consistency, "iou": self.iou}


def _bounding_radius(tris: np.ndarray) -> np.ndarray:
    """``(F, 3, 3) -> (F,)``: the largest distance from each triangle's centroid to its corners."""
    return np.linalg.norm(tris - tris.mean(1, keepdims=True), axis=2).max(1)


def _split_large(tris: np.ndarray, max_radius: float, rounds: int = 10) -> np.ndarray:
    """Midpoint-split (1 → 4) every triangle whose bounding radius exceeds ``max_radius``. The pieces
    cover exactly the same surface, so distances to them are distances to the mesh."""
    keep = []
    for _ in range(rounds):
        big = _bounding_radius(tris) > max_radius
        keep.append(tris[~big])
        tris = tris[big]
        if not len(tris):
            break
        a, b, c = tris[:, 0], tris[:, 1], tris[:, 2]
        ab, bc, ca = (a + b) / 2, (b + c) / 2, (c + a) / 2
        tris = np.concatenate([np.stack(t, 1) for t in ((a, ab, ca), (ab, b, bc), (ca, bc, c), (ab, bc, ca))])
    return np.concatenate(keep + [tris])


#: (point, triangle) pairs one k-d tree query of :func:`point_mesh_distance` holds at once (a few hundred MB with
#: the candidates' temporaries); a point whose ball holds more triangles than this is queried alone
QUERY_BUDGET = 4_000_000


def point_mesh_distance(mesh: Mesh, points: np.ndarray, k: int = 16) -> np.ndarray:
    """Exact unsigned distance from each point ``(N, 3)`` to the surface of ``mesh``: ``(N,)`` float64.

    The closest point on a triangle is exact (Ericson's ``ClosestPtPointTriangle``,
    :func:`trimesh.triangles.closest_point`); the triangles tried per point come from a k-d tree of
    triangle centroids ``c_t`` with bounding radii ``R_t``. An upper bound ``d0`` (the distance to the
    triangles of the 4 nearest centroids) limits the search: a triangle closer than ``d0`` has
    ``|p − c_t| − R_t ≤ d0``, so its centroid lies within ``d0 + max R``, and only triangles that pass
    that test against the best distance so far are measured. The ``k`` nearest centroids are tried
    first, more (×4) while the ball may hold others. Large triangles are first split (exactly) so that
    ``max R`` stays small. Zero-area faces add no surface and are dropped.

    >>> tri = Mesh(np.array([[0., 0, 0], [1, 0, 0], [0, 1, 0]]), np.array([[0, 1, 2]]))
    >>> point_mesh_distance(tri, np.array([[0.25, 0.25, 0.5], [2.0, 0.0, 0.0]]))
    array([0.5, 1. ])
    """
    from scipy.spatial import cKDTree
    from trimesh.triangles import closest_point

    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    tris = np.asarray(mesh.vertices, dtype=np.float64)[mesh.faces]
    tris = tris[np.linalg.norm(np.cross(tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0]), axis=1) > 0]
    if not len(tris):
        raise ValueError("the mesh has no face of non-zero area: no surface to measure distances to")
    flat = tris.reshape(-1, 3)
    diag = float(np.linalg.norm(flat.max(0) - flat.min(0)))
    tris = _split_large(tris, max(2.0 * float(np.median(_bounding_radius(tris))), diag / 256))
    radius = _bounding_radius(tris)
    tree = cKDTree(tris.mean(1))

    def measure(pid: np.ndarray, tid: np.ndarray) -> np.ndarray:
        return np.linalg.norm(closest_point(tris[tid], points[pid]) - points[pid], axis=1)

    n = len(points)
    k0 = min(4, len(tris))
    _, near = tree.query(points, k=k0, workers=torch.get_num_threads())
    best = measure(np.repeat(np.arange(n), k0), near.reshape(-1)).reshape(n, k0).min(1)
    ball = best + float(radius.max())
    todo, kk = np.arange(n), min(k, len(tris))
    while len(todo):
        more = np.zeros(len(todo), bool)
        step = max(1, QUERY_BUDGET // kk)  # points a query takes at once: ~QUERY_BUDGET pairs (kk, past it)
        for at in range(0, len(todo), step):
            part = todo[at:at + step]
            dist, idx = tree.query(points[part], k=kk, workers=torch.get_num_threads())
            dist, idx = dist.reshape(len(part), kk), idx.reshape(len(part), kk)
            inside = dist <= ball[part, None]
            cand = inside & (dist - radius[idx] <= best[part, None])
            row, col = np.nonzero(cand)
            if len(row):
                d = measure(part[row], idx[row, col])
                np.minimum.at(best, part[row], d)
            if kk < len(tris):
                more[at:at + step] = inside[:, -1]
        todo, kk = todo[more], min(4 * kk, len(tris))
    return best


def chamfer_and_normals(a: Mesh, b: Mesh, n: int = CHAMFER_SAMPLES, seed: int = 0) -> tuple[float, float]:
    """Symmetric Chamfer-L1 and normal consistency between two meshes.

    Chamfer-L1 ``= 0.5 (mean_{p ∈ S_a} dist(p, B) + mean_{q ∈ S_b} dist(q, A))`` with ``n``
    area-weighted samples ``S`` per mesh and *exact point-to-surface* distances
    (:func:`point_mesh_distance`), so the value has no sampling floor: two identical meshes give 0.
    Normal consistency is the mean ``|n_p · n_q|`` of nearest sample neighbours, both directions.
    Same units as the meshes.
    """
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(seed)
    pa, na = sample_surface(a, n, rng)
    pb, nb = sample_surface(b, n, rng)
    chamfer = 0.5 * (point_mesh_distance(b, pa).mean() + point_mesh_distance(a, pb).mean())
    _, ia = cKDTree(pb).query(pa, workers=torch.get_num_threads())
    _, ib = cKDTree(pa).query(pb, workers=torch.get_num_threads())
    nc = 0.5 * (np.abs((na * nb[ia]).sum(1)).mean() + np.abs((nb * na[ib]).sum(1)).mean())
    return float(chamfer), float(nc)


def surface_metrics(pred: Mesh, ref: Mesh, tau: float, n: int = CHAMFER_SAMPLES, seed: int = 0) -> dict:
    """Chamfer-L1, normal consistency and F-score at distance ``tau`` of ``pred`` against ``ref``.

    One set of ``n`` area-weighted samples per mesh and exact point-to-surface distances
    (:func:`point_mesh_distance`): Chamfer-L1 and normal consistency as :func:`chamfer_and_normals`;
    precision = share of ``pred``'s samples within ``tau`` of ``ref``, recall = share of ``ref``'s
    samples within ``tau`` of ``pred``, F-score their harmonic mean. Same units as the meshes.
    """
    from scipy.spatial import cKDTree

    if not tau > 0:
        raise ValueError(f"the F-score threshold must be positive, got {tau}")
    rng = np.random.default_rng(seed)
    pa, na = sample_surface(pred, n, rng)
    pb, nb = sample_surface(ref, n, rng)
    da, db = point_mesh_distance(ref, pa), point_mesh_distance(pred, pb)
    _, ia = cKDTree(pb).query(pa, workers=torch.get_num_threads())
    _, ib = cKDTree(pa).query(pb, workers=torch.get_num_threads())
    precision, recall = float((da <= tau).mean()), float((db <= tau).mean())
    return {
        "chamfer_l1": float(0.5 * (da.mean() + db.mean())),
        "normal_consistency": float(0.5 * (np.abs((na * nb[ia]).sum(1)).mean() + np.abs((nb * na[ib]).sum(1)).mean())),
        "fscore": 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0,
        "precision": precision, "recall": recall, "tau": float(tau),
    }


@torch.no_grad()
def volumetric_iou(field, lod: int, oracle: SDFOracle, n: int = IOU_SAMPLES, seed: int = 0, chunk: int = 1 << 17) -> float:
    """IoU of the insides (sdf < 0) of the field and the mesh over ``n`` uniform points in the cube."""
    x, gt = oracle.uniform_inside(field.normalization, n, seed)
    device = field.grid.octree.device
    xt = torch.from_numpy(x).to(device)
    lod = field.check_lod(lod)
    pred = torch.cat([field.query(xt[s : s + chunk].float(), lod) for s in range(0, n, chunk)]).cpu().numpy() < 0
    union = np.logical_or(gt, pred).sum()
    return float(np.logical_and(gt, pred).sum() / max(union, 1))


def geometry_metrics(field, lod: int, mesh_world: Mesh, extracted_world: Mesh, oracle: SDFOracle,
                     chamfer_samples: int = CHAMFER_SAMPLES, iou_samples: int = IOU_SAMPLES) -> GeometryMetrics:
    """All geometry metrics at one LOD, in the unit-cube frame (Chamfer with ``chamfer_samples`` per side,
    IoU over ``iou_samples`` uniform points)."""
    to_unit = lambda v: field.normalization.to_unit(torch.from_numpy(v)).numpy()  # noqa: E731
    ch, nc = chamfer_and_normals(mesh_world.transformed(to_unit), extracted_world.transformed(to_unit), n=chamfer_samples)
    return GeometryMetrics(ch, nc, volumetric_iou(field, lod, oracle, n=iou_samples))
