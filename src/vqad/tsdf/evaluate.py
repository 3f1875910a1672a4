"""Per-LOD evaluation of a TSDF field: meshes, renders, and surface metrics against the fusion's own
mesh and (when known) the ground-truth mesh, in the sequence's world frame and units."""

from __future__ import annotations

import time
from pathlib import Path

from vqad.fit import lod_meshes

#: the F-score threshold: this share of the reference mesh's bounding-box diagonal
FSCORE_SHARE = 0.01
#: surface samples per mesh for the metrics
TSDF_SAMPLES = 100_000


def fscore_threshold(mesh) -> float:
    """``τ`` = :data:`FSCORE_SHARE` × the diagonal of ``mesh``'s bounding box (world units)."""
    import numpy as np

    v = np.asarray(mesh.vertices)
    return FSCORE_SHARE * float(np.linalg.norm(v.max(0) - v.min(0)))


def compare(pred, refs: dict, samples: int = TSDF_SAMPLES) -> dict:
    """``{name: surface_metrics(pred, ref, τ_ref)}`` for each reference mesh in ``refs`` (None skipped)."""
    from vqad.sdf.metrics import surface_metrics

    return {name: surface_metrics(pred, ref, fscore_threshold(ref), n=samples) for name, ref in refs.items() if ref is not None}


def evaluate_tsdf(field, out: Path, fusion_mesh, gt_mesh=None, lods=None, renders: bool = True,
                  samples: int = TSDF_SAMPLES, deadline=None, quiet: bool = False) -> dict:
    """Per LOD: ``mesh_lodL.ply``, ``render_lodL.png`` (``renders``) and metrics ``vs_fusion`` /
    ``vs_gt`` (Chamfer-L1, normal consistency, F-score at 1 % of the reference's box diagonal).

    With a capped ``deadline`` the finest LOD goes first and coarser ones while time is left; a LOD
    left out reads ``{"skipped": reason}``.
    """
    from vqad.atomicio import save_image
    from vqad.sdf.extract import save_mesh
    from vqad.sdf.render import OrbitCamera, render_sdf
    from vqad.tsdf.extract import extract_tsdf_mesh

    field.eval()
    results = {}
    lods = field.lods if lods is None else lods
    refs = {"vs_fusion": fusion_mesh, "vs_gt": gt_mesh}
    for lod, m, t0 in lod_meshes(lods, deadline, lambda lod: extract_tsdf_mesh(field, lod), results, quiet):
        r = compare(m, refs, samples)
        if renders:
            save_mesh(m, out / f"mesh_lod{lod}.ply")
            save_image(render_sdf(field, lod, OrbitCamera(width=320, height=320)), out / f"render_lod{lod}.png")
        r["faces"] = int(len(m.faces))
        r["seconds"] = time.perf_counter() - t0
        results[lod] = r
        if not quiet:
            print(f"LOD {lod}: " + ("  ".join(
                f"{k}: Chamfer-L1 {v['chamfer_l1']:.5f} NC {v['normal_consistency']:.4f} F {v['fscore']:.4f}"
                for k, v in r.items() if isinstance(v, dict)) or f"{r['faces']:,} faces (no reference mesh to compare with)"))
    return dict(sorted(results.items()))
