"""``make demo``: everything from built-in data, no download and no ../shared.

1. A VQ-AD signed distance field of a procedural shape: fit, per-LOD metrics, a mesh and renders.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .commands.common import ensure_writable_dir
from .config import DecoderConfig, GridConfig, SDFTrainConfig


def run_sdf_demo(out: Path, device: torch.device, quick: bool = False) -> dict:
    from .commands.sdf import evaluate_sdf
    from .extract import save_mesh
    from .sdf import fit_sdf, size_lines
    from .shapes import demo_mesh

    out = ensure_writable_dir(out)
    mesh = demo_mesh()
    save_mesh(mesh, out / "input_shape.ply")
    grid = GridConfig(storage="codebook", features=16, bits=4, base_level=2, max_level=6)
    train = SDFTrainConfig(steps=40 if quick else 1200, batch=8192, resample_every=400, pool_size=200_000, lr=5e-3)
    print(f"[sdf] fitting a {grid.bits}-bit VQ-AD SDF of the built-in shape, levels {grid.base_level}..{grid.max_level}")
    res = fit_sdf(mesh, grid, DecoderConfig(), train, device, out_dir=out, quiet=quick)
    for line in size_lines(res.field):
        print("[sdf] " + line)
    lods = evaluate_sdf(res.field, mesh, out, resolution=96 if quick else 160, device=device)
    summary = {
        "fit_seconds": res.seconds, "points_per_second": res.points_per_second,
        "size": res.field.size_report(), "lods": lods,
    }
    summary["mesh"] = str(out / f"mesh_lod{grid.max_level}.ply")
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def run_demo(out: Path, device: torch.device, quick: bool = False) -> dict:
    t0 = time.perf_counter()
    out = ensure_writable_dir(out)
    results = {"sdf": run_sdf_demo(out / "sdf", device, quick)}
    results["seconds"] = time.perf_counter() - t0
    (out / "summary.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"demo finished in {results['seconds']:.0f} s: outputs in {out}/")
    return results
