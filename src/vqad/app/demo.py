"""``make demo``: everything from built-in data, no download and no ../shared.

1. A VQ-AD signed distance field of a procedural shape: fit, per-LOD metrics, a mesh and renders.
2. Its progressive file ``model.vqad`` and an image strip of every LOD decoded from a prefix of
   that file, each labelled with the bytes it needed.
3. A VQ-AD radiance field of the built-in procedural scene (renders per LOD, PSNR / SSIM, sizes).
"""

from __future__ import annotations

import json
import shlex
import time
import warnings
from pathlib import Path

import torch

from vqad.app.commands.common import ensure_writable_dir, refuse_foreign_dir
from vqad.atomicio import save_image, write_atomic
from vqad.config import DecoderConfig, GridConfig
from vqad.sdf.fit import SDFTrainConfig


DEMO_CHAMFER_SAMPLES = 20_000
DEMO_SDF_MINUTES = 1.5  # the SDF fit's time cap, sweeps included


def run_sdf_demo(out: Path, device: torch.device, quick: bool = False) -> dict:
    from vqad.sdf.evaluate import evaluate_sdf
    from vqad.sdf.extract import save_mesh
    from vqad.sdf.fit import fit_sdf
    from vqad.sdf.shapes import demo_mesh

    out = ensure_writable_dir(out)
    mesh = demo_mesh()
    save_mesh(mesh, out / "input_shape.ply")
    grid = GridConfig(storage="codebook", features=16, bits=4, base_level=2, max_level=6)
    # 300 steps and 2 measured index sweeps (the sweeps do most of the work: 900 steps gave the same
    # Chamfer), capped at DEMO_SDF_MINUTES with the sweeps so that the demo stays under 5 minutes
    train = SDFTrainConfig(steps=40 if quick else 300, batch=8192, resample_every=400, pool_size=200_000, lr=5e-3,
                           refine=1 if quick else 2, refine_samples=20_000 if quick else 100_000,
                           max_minutes=None if quick else DEMO_SDF_MINUTES)
    print(f"[sdf] fitting a {grid.bits}-bit VQ-AD SDF of the built-in shape, levels {grid.base_level}..{grid.max_level}")
    res = fit_sdf(mesh, grid, DecoderConfig(), train, device, out_dir=out, quiet=quick)
    for line in res.field.size_lines():
        print("[sdf] " + line)
    # 20k Chamfer samples per side (the benchmarks use 100k): the exact distances dominate the demo's time
    lods = evaluate_sdf(res.field, mesh, out, resolution=96 if quick else 160, device=device, chamfer_samples=DEMO_CHAMFER_SAMPLES)
    summary = {
        "fit_seconds": res.seconds, "points_per_second": res.points_per_second,
        "size": res.field.size_report(), "lods": lods, "chamfer_samples_per_side": DEMO_CHAMFER_SAMPLES,
    }
    summary["mesh"] = str(out / f"mesh_lod{grid.max_level}.ply")
    summary["file"] = write_progressive_strip(res.field, out)
    write_atomic(out / "metrics.json", json.dumps(summary, indent=2, default=str))
    return summary


def write_progressive_strip(field, out: Path) -> dict:
    """Bake ``field``, write ``out/model.vqad``, and render each LOD decoded from its prefix alone."""
    import numpy as np
    from PIL import Image, ImageDraw

    from vqad import fileformat
    from vqad.sdf.render import OrbitCamera, render_sdf

    field.bake(fp16=True)
    path = out / "model.vqad"
    total = fileformat.save(field, path)
    sizes = fileformat.lod_prefix_sizes(path)
    data = path.read_bytes()
    tiles = []
    for lod, nbytes in sorted(sizes.items()):
        with warnings.catch_warnings():  # a prefix is meant to end early: no "stream ended" warning here
            warnings.simplefilter("ignore", UserWarning)
            part = fileformat.load(data[:nbytes], device=field.grid.octree.device)
        img = Image.fromarray(render_sdf(part, lod, OrbitCamera(width=256, height=256)))
        ImageDraw.Draw(img).text((8, 8), f"LOD {lod} after {nbytes / 1e3:.1f} kB", fill=(20, 20, 20))
        tiles.append(np.asarray(img))
    save_image(np.concatenate(tiles, axis=1), out / "lod_strip.png")
    print(f"[sdf] wrote {path} ({total:,} bytes); prefix bytes per LOD: "
          + ", ".join(f"{lod}: {n:,}" for lod, n in sorted(sizes.items())))
    return {"path": str(path), "bytes": total, "prefix_bytes_per_lod": sizes}


def run_demo(out: Path, device: torch.device, quick: bool = False) -> dict:
    t0 = time.perf_counter()
    # an earlier demo's folder, or a new or empty one: never among someone's files (--out / wrote /sdf)
    refuse_foreign_dir(Path(out), ("summary.json", "sdf", "nerf"), f"--out {out}", "demo")
    out = ensure_writable_dir(out)
    for part in ("sdf", "nerf"):  # both parts' folders, before a minute of the first part's work
        ensure_writable_dir(out / part)
    results = {"sdf": run_sdf_demo(out / "sdf", device, quick)}
    from vqad.app.nerf_demo import run_nerf_demo

    results["nerf"] = run_nerf_demo(out / "nerf", device, quick=quick)
    results["seconds"] = time.perf_counter() - t0
    write_atomic(out / "summary.json", json.dumps(results, indent=2, default=str))
    print(f"demo finished in {results['seconds']:.0f} s: outputs in {out}/")
    # the last line: the one command that opens the model in the viewer (streamed, as a colleague would get it)
    print(f"Look at it: vqad view {shlex.quote(results['sdf']['file']['path'])} --bandwidth 1Mbit")
    return results
