"""Index refinement on a radiance field, paired: fit a codebook field once without sweeps, evaluate,
then run sweeps on it and evaluate after each (so every difference is the sweeps' alone).

    python benchmarks/bench_refine_nerf.py --sweeps 3 --rays 16384 --no-check   # moves kept on the rays swept
    python benchmarks/bench_refine_nerf.py --sweeps 2 --rays 32768              # ... only if held-out rays agree
    python benchmarks/bench_refine_nerf.py --sweeps 0 --logit-lr-scale 200      # other logit learning rates

The built-in scene, the demo's grid (k = 8, 4 bits, levels 3..6), 1500 steps × 2048 rays, one thread;
results in docs/benchmarks/nerf.md ("Index refinement").
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from vqad.config import DecoderConfig, GridConfig
from vqad.nerf.formats import load_dataset
from vqad.nerf.evaluate import evaluate_nerf
from vqad.nerf.field import NeRFConfig
from vqad.nerf.fit import NeRFTrainConfig, fit_nerf
from vqad.nerf.task import refine_nerf
from vqad.nerf.rays import RayBatcher
from vqad.nerf.render import model_sampler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--sweeps", type=int, default=2)
    ap.add_argument("--rays", type=int, default=32768)
    ap.add_argument("--no-check", action="store_true", help="keep moves that lower the swept rays' loss alone")
    ap.add_argument("--logit-lr-scale", type=float, default=None)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cpu = torch.device("cpu")
    ds = load_dataset("procedural")
    grid = GridConfig(storage="codebook", features=8, bits=4, base_level=3, max_level=6)
    train = NeRFTrainConfig(steps=a.steps, batch_rays=2048, octree="depth", prune_warmup=100, refine=0,
                            logit_lr_scale=a.logit_lr_scale)
    res = fit_nerf(ds, grid, DecoderConfig(hidden=64, position_input=False), train, cpu, quiet=True, nerf_cfg=NeRFConfig())

    def psnr() -> dict:
        ev = evaluate_nerf(res.field, ds, "test", sampler=model_sampler(res.field), save_images=False)
        return {lod: round(v["psnr"], 3) for lod, v in ev.items()}

    out = {"args": vars(a), "fit_seconds": res.seconds, "before": psnr()}
    print(json.dumps(out), flush=True)
    batcher = RayBatcher(ds.splits["train"], ds, cpu)
    bg = torch.tensor(ds.background, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    for i in range(a.sweeps):
        t0 = time.perf_counter()
        stats = refine_nerf(res.field, model_sampler(res.field), batcher, a.rays, bg, gen, check=not a.no_check)
        out[f"sweep{i + 1}"] = {"seconds": round(time.perf_counter() - t0, 1), "psnr": psnr(),
                                "moved": {s.level: s.changed for s in stats}}
        print(json.dumps(out[f"sweep{i + 1}"]), flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
