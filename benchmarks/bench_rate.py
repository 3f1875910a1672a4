"""Rate-aware VQ-AD on armadillo: bits per index and quality for several --rate-weight λ.

Fits armadillo (codebook, k = 16, levels 3..7) for a short run per (b, λ), no index refinement
(sweeps minimise the reconstruction loss alone), then measures the indices' empirical entropy, the
bytes of the index chunks under order-0 (RANGE) and context (CONTEXT) coding, the whole entropy-coded
file, and quality at the finest LOD: Chamfer-L1 against the mesh (marching cubes at --mc) and the
mean |SDF error| on fresh samples. One thread, fits paired by seed.

    python benchmarks/bench_rate.py --bits 4 --lambdas 0 3e-4 3e-3 --steps 400 [--out docs/benchmarks/rd-rate.md]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def entropy_bits(V: np.ndarray, A: int) -> float:
    p = np.bincount(V, minlength=A) / len(V)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def run(args, bits: int, lam: float, mesh, oracle) -> dict:
    from vqad import entropy as E
    from vqad import fileformat as F
    from vqad.config import DecoderConfig, GridConfig, parse_levels
    from vqad.sdf.extract import extract_mesh
    from vqad.sdf.fit import SDFTrainConfig, fit_sdf
    from vqad.sdf.mesh import SampleMix, draw_sdf_samples
    from vqad.sdf.metrics import chamfer_and_normals

    base, top = parse_levels(args.levels)
    grid = GridConfig(storage="codebook", features=16, bits=bits, base_level=base, max_level=top)
    train = SDFTrainConfig(steps=args.steps, batch=args.batch, pool_size=200_000, resample_every=200, seed=args.seed,
                           refine=0, rate_weight=lam, rate_context=args.rate_context and lam > 0)
    t = time.perf_counter()
    res = fit_sdf(mesh, grid, DecoderConfig(), train, torch.device("cpu"), quiet=True)
    fit_s = time.perf_counter() - t
    field = res.field
    field.eval()
    octree = field.grid.octree
    H, order0, context, m_all = [], 0, 0, 0
    prev = None
    for L in field.lods:
        V = field.grid.storage(L).indices().cpu().numpy()
        A = 1 << bits
        H.append(entropy_bits(V, A))
        order0 += min(len(E.encode(V, A)), -(-len(V) * bits // 8))
        if prev is not None:
            ctx = prev[octree.coarser_vertices(L).numpy()]
            context += min(len(E.encode_context(V, ctx, A, A)), len(E.encode(V, A)), -(-len(V) * bits // 8))
        else:
            context += min(len(E.encode(V, A)), -(-len(V) * bits // 8))
        prev = V
        m_all += len(V)
    field.bake(fp16=True)
    raw = F.to_bytes(field)
    ent = F.to_bytes(field, entropy=True)
    rng = np.random.default_rng(123)
    x, d = draw_sdf_samples(oracle, field.normalization, 100_000, rng, SampleMix())
    with torch.no_grad():
        err = float((field(x, top) - d).abs().mean())
    out = extract_mesh(field, top, resolution=args.mc)
    to_unit = lambda v: field.normalization.to_unit(torch.from_numpy(v)).numpy()  # noqa: E731
    ch, nc = chamfer_and_normals(mesh.transformed(to_unit), out.transformed(to_unit), n=50_000)
    return dict(bits=bits, lam=lam, rate_context=args.rate_context and lam > 0, steps=res.steps, fit_s=round(fit_s, 1), final_loss=res.final_loss,
                H_per_level=[round(h, 3) for h in H], m=m_all,
                H_mean=sum(h * field.grid.storage(L).m for h, L in zip(H, field.lods)) / m_all,
                order0_bits=8 * order0 / m_all, context_bits=8 * context / m_all,
                file_raw=len(raw), file_entropy=len(ent), sdf_abs_err=err, chamfer_l1=ch, normal_consistency=nc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[4])
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 3e-4, 3e-3])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--levels", default="3:7")
    ap.add_argument("--mc", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rate-context", action="store_true", help="the rate term given the coarser index (λ > 0 points)")
    ap.add_argument("--json", default=None, help="append each result as a JSON line here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(REPO / "benchmarks"))
    from common import data_dir
    from vqad.sdf.mesh import SDFOracle, load_mesh

    mesh = load_mesh(str(data_dir("bench-rate", "meshes") / "meshes" / "armadillo.obj"))
    oracle = SDFOracle(mesh)
    for b in args.bits:
        for lam in args.lambdas:
            r = run(args, b, lam, mesh, oracle)
            print(json.dumps(r), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
