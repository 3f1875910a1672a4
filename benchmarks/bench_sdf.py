"""make bench-sdf: dense vs VQ-AD codebook (4 and 6 bit) SDFs of real meshes.

For each mesh and method: fit (all LODs jointly), then per LOD: vertices, bytes (dense fp16 vs
stored), ratio, Chamfer-L1 (exact point-to-surface, 100k samples per side, unit-cube units),
normal consistency, IoU (500k uniform points); plus fit time, training throughput and peak memory.
Writes a markdown table (and a JSON beside it).

    python benchmarks/bench_sdf.py --out docs/benchmarks/sdf.md [--meshes armadillo spot] [--steps 3000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py, also when loaded by path
import common  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
METHODS = {"dense": ("dense", 4), "codebook-4bit": ("codebook", 4), "codebook-6bit": ("codebook", 6)}


def data_dir() -> Path:
    return common.data_dir("bench-sdf", "meshes")


def run_one(mesh: str, method: str, args) -> dict:
    """Each fit in its own process so peak memory is per fit."""
    storage, bits = METHODS[method]
    out = Path(args.work) / f"{mesh}-{method}"
    cmd = [sys.executable, "-m", "vqad.cli", "fit-sdf", str(data_dir() / "meshes" / f"{mesh}.obj"),
           "--grid", storage, "--bits", str(bits), "--features", "16", "--levels", args.levels,
           "--steps", str(args.steps), "--batch", str(args.batch), "--out", str(out),
           "--mc-resolution", str(args.mc_resolution), "--device", args.device, "--quiet"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    wall = time.perf_counter() - t0
    m = json.loads((out / "metrics.json").read_text())
    m["wall_seconds"] = wall
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="docs/benchmarks/sdf.md")
    ap.add_argument("--meshes", nargs="+", default=["armadillo", "spot"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--levels", default="3:7")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=16384)
    ap.add_argument("--mc-resolution", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", default="out/bench-sdf")
    ap.add_argument("--merge", action="store_true",
                    help="keep the results already in OUT's .json (other meshes/methods) and add these")
    args = ap.parse_args()
    prev = Path(args.out).with_suffix(".json")
    results = json.loads(prev.read_text()) if args.merge and prev.exists() else {}
    for mesh in args.meshes:
        for method in args.methods:
            print(f"== {mesh} / {method}", flush=True)
            results[f"{mesh}/{method}"] = run_one(mesh, method, args)
            write_report(results, args)  # after every fit, so a long run leaves partial results


def write_report(results: dict, args) -> None:
    lines = [
        "# SDF benchmark (`make bench-sdf`)",
        "",
        f"Command: `python benchmarks/bench_sdf.py --meshes {' '.join(args.meshes)} --steps {args.steps} --batch {args.batch} --levels {args.levels}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU threads, device `{args.device}`; k = 16 features, levels {args.levels}; "
        f"marching cubes at {args.mc_resolution}^3.  ",
        "Chamfer-L1: exact point-to-surface distances, 100k area-weighted samples per side, in unit-cube units "
        "(mesh scaled so its longest bounding-box side spans 1.8). IoU: 500k uniform points in [-1, 1]^3.  ",
        "Bytes: *dense fp16* = 16·m·k bits summed over levels up to the LOD; *stored* = the storage's own bits "
        "(codebook: m·b + 16·k·2^b) — the grid alone, the shared decoder is listed separately.",
        "",
        "| mesh | method | LOD | vertices (m) | dense fp16 kB | stored kB | ratio | Chamfer-L1 | normal cons. | IoU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    summary = ["", "| mesh | method | fit s | points/s | peak memory MB | decoder kB | total kB (grid + decoder) |", "|---|---|---|---|---|---|---|"]
    for key, m in results.items():
        mesh, method = key.split("/")
        storage, bits = METHODS[method]
        verts = {int(k): v for k, v in m["size"]["vertices"].items()}
        cum_dense = cum_stored = 0.0
        for lod in sorted(verts):
            mv = verts[lod]
            cum_dense += 16 * mv * 16 / 8
            cum_stored += (mv * bits + 16 * 16 * (1 << bits)) / 8 if storage == "codebook" else 16 * mv * 16 / 8
            g = m.get("lods", {}).get(str(lod), {})
            if "chamfer_l1" in g:
                q = f"{g['chamfer_l1']:.5f} | {g['normal_consistency']:.4f} | {g['iou']:.4f}"
            else:
                q = "– | – | –"
            lines.append(f"| {mesh} | {method} | {lod} | {mv:,} | {cum_dense / 1e3:,.1f} | {cum_stored / 1e3:,.1f} | "
                         f"{cum_dense / cum_stored:.1f}x | {q} |")
        summary.append(f"| {mesh} | {method} | {m['fit_seconds']:.0f} | {m['points_per_second']:,.0f} | "
                       f"{m['peak_memory_bytes'] / 2**20:,.0f} | {m['size']['decoder_bytes'] / 1e3:.1f} | "
                       f"{m['size']['compressed_bytes'] / 1e3:,.1f} |")
    text = "\n".join(lines + summary) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=2, default=str))
    print(text)


if __name__ == "__main__":
    main()
