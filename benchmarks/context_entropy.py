"""How much could a context model save on a file's indices V? (issue 20, "consider same-level neighbours")

For each codebook level of a .vqad file, the cost in bits per index of coding V in the file's vertex
order (Morton order) with an adaptive frequency model (counts start at 1/2, as a Krichevsky–Trofimov
coder; it learns its statistics as it goes, so no table is paid for and small levels are not
flattered) under these contexts, each available to a decoder at that point of the stream:

* ``order-0``: none;
* ``coarser``: the co-located coarser-level index at ``floor(v / 2)`` (what ``Codec.CONTEXT`` uses);
* ``-x``: the same level's vertex at ``v - (1, 0, 0)`` (earlier in Morton order), or "none";
* ``-x,-y``: that and ``v - (0, 1, 0)``;
* ``coarser,-x``: both kinds.

    PYTHONPATH=src python benchmarks/context_entropy.py model.vqad [--markdown]
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch


def adaptive_bits(sym: np.ndarray, ctx: np.ndarray, K: int) -> float:
    """Mean bits per symbol of ``sym (n,)`` in ``[0, K)`` coded adaptively per context ``ctx (n,)``."""
    if sym.size == 0:
        return 0.0
    _, ctx = np.unique(ctx, return_inverse=True)
    counts = np.full((int(ctx.max()) + 1, K), 0.5)
    totals = counts.sum(1)
    bits = 0.0
    for s, c in zip(sym.tolist(), ctx.tolist()):
        bits -= math.log2(counts[c, s] / totals[c])
        counts[c, s] += 1.0
        totals[c] += 1.0
    return bits / sym.size


def neighbour_index(vertices: torch.Tensor, codes: torch.Tensor, V: np.ndarray, offset, level: int, none: int) -> np.ndarray:
    """``(m,)`` the index of each vertex's neighbour at ``vertex - offset`` on the same level, else ``none``."""
    from vqad.octree import morton_encode

    q = vertices - torch.tensor(offset)
    qc = morton_encode(q.clamp(min=0), bits=level + 1)
    pos = torch.searchsorted(codes, qc).clamp(max=codes.numel() - 1)
    ok = (codes[pos] == qc) & (q >= 0).all(1)
    return np.where(ok.numpy(), V[pos.numpy()], none)


def measure(path: str) -> list[dict]:
    import vqad
    from vqad.octree import morton_encode

    field = vqad.load(path)
    grid = field.grid
    octree = grid.octree
    rows, coarser_V = [], None
    for level, storage in zip(range(grid.cfg.base_level, grid.cfg.max_level + 1), grid.storages):
        if not hasattr(storage, "indices") or not hasattr(storage, "b"):
            raise SystemExit(f"{path}: level {level} is not a codebook storage ({type(storage).__name__})")
        V = storage.indices().cpu().numpy().reshape(-1).astype(np.int64)
        K = 1 << int(storage.b)
        vertices = octree.vertices[level].long().cpu()
        codes = morton_encode(vertices, bits=level + 1)
        nx = neighbour_index(vertices, codes, V, (1, 0, 0), level, K)
        ny = neighbour_index(vertices, codes, V, (0, 1, 0), level, K)
        if coarser_V is None:
            parent = np.zeros_like(V)
        else:
            parent = coarser_V[octree.coarser_vertices(level).cpu().numpy()]
        row = {"level": level, "m": int(V.size), "b": int(storage.b),
               "order-0": adaptive_bits(V, np.zeros_like(V), K),
               "coarser": adaptive_bits(V, parent, K),
               "-x": adaptive_bits(V, nx, K),
               "-x,-y": adaptive_bits(V, nx * (K + 1) + ny, K),
               "coarser,-x": adaptive_bits(V, parent * (K + 1) + nx, K)}
        rows.append(row)
        coarser_V = V
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file")
    args = ap.parse_args()
    rows = measure(args.file)
    keys = ["order-0", "coarser", "-x", "-x,-y", "coarser,-x"]
    print("| level | m | b | " + " | ".join(f"{k} bits/idx" for k in keys) + " |")
    print("|---|---:|---:|" + "---:|" * len(keys))
    total = sum(r["m"] for r in rows)
    for r in rows:
        print(f"| {r['level']} | {r['m']:,} | {r['b']} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |")
    print("| all | {:,} | | ".format(total)
          + " | ".join(f"{sum(r[k] * r['m'] for r in rows) / total:.3f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
