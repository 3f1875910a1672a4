"""Per-LOD evaluation of an SDF field against its mesh: metrics, the finest mesh and a render per LOD."""

from __future__ import annotations

import time
from pathlib import Path

from vqad.fit import lod_meshes


def evaluate_sdf(field, mesh, out: Path, resolution: int, device, lods=None, quiet: bool = False,
                 chamfer_samples: int | None = None, iou_samples: int | None = None, renders: bool = True,
                 deadline=None) -> dict:
    """Per-LOD metrics, and (``renders``) a mesh of the finest LOD and a render per LOD written into ``out``.

    ``chamfer_samples`` / ``iou_samples``: surface samples per side for Chamfer-L1 and uniform points
    for IoU (None: :data:`~vqad.sdf.metrics.CHAMFER_SAMPLES`, :data:`~vqad.sdf.metrics.IOU_SAMPLES`).
    With a capped ``deadline`` (:class:`vqad.fit.Deadline`) the finest LOD is evaluated first and
    coarser ones while its time lasts; a LOD left out reads ``{"skipped": reason}``.
    """
    from vqad.atomicio import save_image
    from vqad.sdf.extract import extract_mesh, save_mesh
    from vqad.sdf.mesh import SDFOracle
    from vqad.sdf.metrics import CHAMFER_SAMPLES, IOU_SAMPLES, geometry_metrics
    from vqad.sdf.render import OrbitCamera, render_sdf

    field.eval()
    oracle = SDFOracle(mesh)
    results = {}
    lods = field.lods if lods is None else lods
    for lod, m, t0 in lod_meshes(lods, deadline, lambda lod: extract_mesh(field, lod, resolution=resolution), results, quiet):
        gm = geometry_metrics(field, lod, mesh, m, oracle, chamfer_samples or CHAMFER_SAMPLES,
                              iou_samples or IOU_SAMPLES).as_dict()
        if renders:
            if lod == field.grid.octree.max_level:
                save_mesh(m, out / f"mesh_lod{lod}.ply")
            save_image(render_sdf(field, lod, OrbitCamera(width=320, height=320)), out / f"render_lod{lod}.png")
        gm["seconds"] = time.perf_counter() - t0
        results[lod] = gm
        if not quiet:
            print(f"LOD {lod}: Chamfer-L1 {gm['chamfer_l1']:.5f}  normal consistency {gm['normal_consistency']:.4f}  IoU {gm['iou']:.4f}")
    return dict(sorted(results.items()))
