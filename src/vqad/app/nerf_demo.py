"""The radiance-field part of ``make demo``: a 4-bit VQ-AD NeRF of the built-in procedural scene.

Nothing is downloaded: the scene is ray-cast by :mod:`vqad.nerf.procedural`. The octree comes from
its depth maps (the paper's way); the fit trains every LOD, then each LOD is evaluated on the
held-out test views and rendered to PNG. Runs in about two minutes on two CPU cores (the fit is
capped at ``DEMO_NERF_MINUTES``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from vqad.app.commands.common import ensure_writable_dir
from vqad.atomicio import write_atomic
from vqad.config import GridConfig
from vqad.nerf.field import NeRFConfig

DEMO_NERF_MINUTES = 1.6  # the fit's time cap
DEMO_GRID = GridConfig(storage="codebook", features=8, bits=4, base_level=3, max_level=6)


def run_nerf_demo(out_dir: str | Path, device: torch.device, quick: bool = False, quiet: bool = False) -> dict:
    """Fit, evaluate and render the built-in scene into ``out_dir``; returns the metrics written to
    ``out_dir/metrics.json`` (per-LOD PSNR / SSIM, sizes, timings)."""
    from vqad.nerf.formats import load_dataset
    from vqad.nerf.evaluate import evaluate_nerf, metric_lines
    from vqad.nerf.fit import NERF_DECODER, NeRFTrainConfig, fit_nerf

    out = ensure_writable_dir(out_dir)
    (out / "metrics.json").unlink(missing_ok=True)
    t0 = time.perf_counter()
    dataset = load_dataset("procedural")
    grid = GridConfig(**DEMO_GRID.__dict__)
    # 1500 steps, capped at DEMO_NERF_MINUTES (≈ 850 steps on 2 CPU cores): the whole demo stays
    # under 5 minutes on a slower machine too
    train = NeRFTrainConfig(steps=30 if quick else 1500, batch_rays=2048, octree="depth", prune_warmup=100,
                            max_minutes=None if quick else DEMO_NERF_MINUTES)
    say = (lambda s: None) if quiet else (lambda s: print("[nerf] " + s, flush=True))
    say(f"fitting a {grid.bits}-bit VQ-AD radiance field of the built-in scene, levels {grid.base_level}..{grid.max_level}, "
        f"{train.steps} steps")
    res = fit_nerf(dataset, grid, NERF_DECODER, train, device, out_dir=out,
                   quiet=quiet or quick, nerf_cfg=NeRFConfig())
    say(f"fit in {res.seconds:.0f} s ({res.rays_per_second:,.0f} rays/s, {res.samples_per_ray:.1f} samples/ray)")
    for line in res.field.size_lines():
        say(line)
    lods = evaluate_nerf(res.field, dataset, "test", out_dir=out, sampler=res.sampler)
    for line in metric_lines(lods):
        say(line)
    summary = {
        "scene": "procedural", "grid": grid.__dict__, "steps": res.steps, "octree_method": res.octree_method,
        "fit_seconds": res.seconds, "rays_per_second": res.rays_per_second, "samples_per_ray": res.samples_per_ray,
        "size": res.field.size_report(), "lods": lods, "seconds": time.perf_counter() - t0,
        "note": "PSNR / SSIM (Gaussian window 11, sigma 1.5) on the test views; LPIPS needs network weights and is not computed",
    }
    write_atomic(out / "metrics.json", json.dumps(summary, indent=2, default=str))
    return summary
