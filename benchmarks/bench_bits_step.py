"""Cost of one codebook training step against b (forward, backward, optimizer step), one storage.

    python benchmarks/bench_bits_step.py [--m 200000] [--k 8] [--touched 50000] [--bits 6 8 10]

Uses the optimizer `vqad.trainer.make_optimizers` would pick: SparseAdam for b < 8, the row-wise
RMSprop (O(m) state) for b >= 8. Prints seconds per phase (the last of three repetitions).
"""

from __future__ import annotations

import argparse
import time

import torch

from vqad.optim import RowwiseSparseRMSprop
from vqad.storages.codebook import CodebookStorage
from vqad.optim import ROWWISE_MIN_CODES


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=200_000)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--touched", type=int, default=50_000, help="points per batch (8 corner ids each)")
    ap.add_argument("--bits", type=int, nargs="+", default=[6, 8, 10])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("| b | optimizer | forward s | backward s | optimizer step s |\n|---|---|---|---|---|")
    for b in args.bits:
        s = CodebookStorage(args.m, args.k, bits=b)
        wide = (1 << b) >= ROWWISE_MIN_CODES
        opt = RowwiseSparseRMSprop([s.C], lr=0.1) if wide else torch.optim.SparseAdam([s.C], lr=0.1)
        ids = torch.randint(0, args.m, (args.touched, 8))
        for _ in range(3):
            t0 = time.perf_counter()
            f = s(ids)
            t1 = time.perf_counter()
            f.pow(2).sum().backward()
            t2 = time.perf_counter()
            opt.step()
            opt.zero_grad()
            t3 = time.perf_counter()
        name = "row-wise RMSprop" if wide else "SparseAdam"
        print(f"| {b} | {name} | {t1 - t0:.2f} | {t2 - t1:.2f} | {t3 - t2:.2f} |", flush=True)


if __name__ == "__main__":
    main()
