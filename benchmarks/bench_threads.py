"""How many threads per job: concurrent SDF training jobs with 1 or 2 threads each, on this machine.

Each job is a separate process that builds a 4-bit armadillo SDF field (levels 3..7, batch 16,384),
waits for a common start time, then runs training steps for a fixed wall time and reports its steps.
Layouts: one job × all cores, and ``jobs`` concurrent jobs × 1 thread vs × all cores (oversubscribed).
The result (steps per second summed over jobs) is written to docs/benchmarks/threads.md.

    python benchmarks/bench_threads.py --out docs/benchmarks/threads.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import data_dir  # noqa: E402


def worker(threads: int, start_at: float, seconds: float, levels: str) -> None:
    """One job: set up, wait for ``start_at``, step for ``seconds``; prints a JSON line."""
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_speed as B
    from vqad.optim import make_optimizers
    from vqad.sdf.fit import SDFTask, build_sdf_field
    from vqad.sdf.mesh import SDFOracle, load_mesh
    from vqad.config import DecoderConfig

    base, top = (int(v) for v in levels.split(":"))
    sz = B.Sizes(sdf_levels=(base, top))
    mesh = load_mesh(str(data_dir("bench_threads", "meshes") / "meshes" / "armadillo.obj"))
    grid_cfg = B.sdf_grid(sz, "codebook")
    field = build_sdf_field(mesh, grid_cfg, DecoderConfig(), "cpu")
    cfg = B.sdf_train_cfg(sz, grid_cfg, steps=10 ** 6)
    task = SDFTask(field, SDFOracle(mesh), cfg, rng_seed=0, device="cpu")
    opts = make_optimizers(field, cfg.lr, cfg.grid_lr_scale, cfg.logit_lr_scale, cfg.codebook_lr_scale)
    step = B.fit_step_fn(task, opts, torch.Generator().manual_seed(0))
    for _ in range(3):
        step()
    time.sleep(max(start_at - time.time(), 0.0))
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    print(json.dumps({"threads": threads, "steps": n, "seconds": time.perf_counter() - t0}), flush=True)


def run_layout(jobs: int, threads: int, seconds: float, levels: str) -> dict:
    start_at = time.time() + 40.0  # every job set up before the clock starts
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(threads), str(start_at), str(seconds), levels],
                              stdout=subprocess.PIPE, text=True, env=env) for _ in range(jobs)]
    outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    rate = sum(o["steps"] / o["seconds"] for o in outs)
    return {"jobs": jobs, "threads": threads, "steps_per_s": rate,
            "per_job_ms": [1e3 * o["seconds"] / max(o["steps"], 1) for o in outs]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/benchmarks/threads.md")
    ap.add_argument("--seconds", type=float, default=30.0, help="timed wall time per layout")
    ap.add_argument("--jobs", type=int, default=2, help="concurrent jobs")
    ap.add_argument("--levels", default="3:7")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(int(a.worker[0]), float(a.worker[1]), float(a.worker[2]), a.worker[3])
        return
    cores = len(os.sched_getaffinity(0))
    layouts = [(1, cores), (a.jobs, max(cores // a.jobs, 1)), (a.jobs, cores)]
    res = []
    for jobs, threads in layouts:
        r = run_layout(jobs, threads, a.seconds, a.levels)
        print(f"{jobs} job(s) x {threads} thread(s): {r['steps_per_s']:.2f} steps/s in all, "
              f"{', '.join(f'{v:.0f}' for v in r['per_job_ms'])} ms per step per job", flush=True)
        res.append(r)
    best = max(res, key=lambda r: r["steps_per_s"])
    lines = ["# Threads per job (`python benchmarks/bench_threads.py`)", "",
             f"SDF training steps (armadillo, codebook 4-bit, levels {a.levels}, batch 16,384), each job its own "
             f"process, {a.seconds:.0f} s of stepping after a common start, {cores} cores, "
             f"{time.strftime('%Y-%m-%d')}.", "",
             "| layout | steps/s, all jobs | ms per step, each job |", "|---|---|---|"]
    for r in res:
        lines.append(f"| {r['jobs']} job(s) × {r['threads']} thread(s) | {r['steps_per_s']:.2f} | "
                     f"{', '.join(f'{v:.0f}' for v in r['per_job_ms'])} |")
    over, fair = res[2], res[1]
    lines += ["", f"{a.jobs} jobs × {cores} threads (oversubscribed) make {over['steps_per_s'] / fair['steps_per_s']:.2f}× "
              f"the throughput of {a.jobs} jobs × {fair['threads']} thread(s); the best layout here is "
              f"{best['jobs']} job(s) × {best['threads']} thread(s). Hence the default: one job uses every core "
              "the process may use (`--threads`, `$VQAD_THREADS`, `$OMP_NUM_THREADS` override it), and a job "
              "runner gives each of its concurrent jobs `cores / jobs` threads."]
    out = Path(a.out)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
