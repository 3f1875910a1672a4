"""Index refinement ablation on an SDF: one fit per variant, the finest two LODs' geometry metrics.

    python benchmarks/bench_refine.py --name final3 --refine 3            # 3 sweeps after training
    python benchmarks/bench_refine.py --name gn3 --refine 3 --candidates 0  # ... Gauss–Newton moves only
    python benchmarks/bench_refine.py --name none --refine 0              # plain straight-through VQ-AD
    python benchmarks/bench_refine.py --name dense --grid dense

Each run appends one JSON line to ``--results`` (default out/bench-refine/results.jsonl); the table in
docs/benchmarks/sdf.md ("Index refinement") was made with these commands (levels 3:6, 600 steps,
one thread each, seed 0, marching cubes at 192^3).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common import data_dir  # noqa: E402  (benchmarks/common.py)

from vqad.config import DecoderConfig, GridConfig, parse_levels
from vqad.sdf.fit import SDFTrainConfig
from vqad.sdf.extract import extract_mesh
from vqad.sdf.mesh import SDFOracle, load_mesh
from vqad.sdf.metrics import geometry_metrics
from vqad.sdf.fit import fit_sdf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True)
    ap.add_argument("--mesh", default="armadillo")
    ap.add_argument("--grid", default="codebook")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--levels", default="3:6")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16384)
    ap.add_argument("--refine", type=int, default=3, help="sweeps after training")
    ap.add_argument("--during", type=int, default=0, help="sweeps spread over training")
    ap.add_argument("--tail", type=float, default=0.0, help="... over this last fraction, logits frozen there")
    ap.add_argument("--candidates", type=int, default=SDFTrainConfig.refine_candidates,
                    help="candidate codewords per vertex measured exactly per sweep (0: Gauss–Newton moves)")
    ap.add_argument("--band", type=float, default=0.0, help="sweep samples within this many finest cells of the surface")
    ap.add_argument("--mc", type=int, default=192)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", default="out/bench-refine/results.jsonl")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    mesh = load_mesh(data_dir("bench-refine", "meshes") / "meshes" / f"{a.mesh}.obj")
    base, top = parse_levels(a.levels)
    grid = GridConfig(storage=a.grid, bits=a.bits, features=16, base_level=base, max_level=top)
    lr = 5e-3 if a.grid == "codebook" else 2e-3
    train = SDFTrainConfig(steps=a.steps, batch=a.batch, lr=lr, refine=a.refine, refine_during=a.during,
                           refine_tail=a.tail, refine_band=a.band, refine_candidates=a.candidates, seed=a.seed)
    t0 = time.perf_counter()
    res = fit_sdf(mesh, grid, DecoderConfig(), train, torch.device("cpu"), quiet=False)
    out = {"name": a.name, "args": vars(a), "fit_seconds": time.perf_counter() - t0,
           "refine_seconds": res.refine_seconds, "final_loss": res.final_loss}
    field = res.field
    field.bake()
    oracle = SDFOracle(mesh)
    for lod in field.lods[-2:]:
        g = geometry_metrics(field, lod, mesh, extract_mesh(field, lod, resolution=a.mc), oracle).as_dict()
        out[str(lod)] = {k: round(v, 5) for k, v in g.items()}
    print(json.dumps(out), flush=True)
    path = Path(a.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
