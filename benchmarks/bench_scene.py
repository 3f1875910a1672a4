"""Large scenes (issue 22): the generated object-in-a-room capture at aabb_scale 4 and 16, and the object alone.

For each capture (``vqad synth-capture``, ~135×240, 50 views):

1. the octree density pass alone, as ``fit-nerf`` runs it (400 steps, capped at ``--density-minutes``):
   its time and training rays per second (the issue's baseline: 1,047 rays/s; target ≥ 10×, ≤ 2 min);
2. ``vqad fit-nerf --minutes M`` with a dense grid and with a 4-bit codebook: the whole job's wall time
   against the cap, and the held-out PSNR per LOD.

Every fit gets the same ``--minutes``, one thread (``--threads``), one job at a time.
``--quick`` runs tiny captures and caps (a smoke test of the script, minutes in all).

    python benchmarks/bench_scene.py --out docs/benchmarks/scene.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

BASELINE_RAYS_PER_S = 1047.0  # issue 22: the density pass on a real aabb_scale 4 capture at 135x240


def scenes(quick: bool) -> list[tuple[str, int, bool]]:
    """(name, aabb_scale, background)."""
    return [("room, aabb_scale 4", 4, True), ("room, aabb_scale 16", 16, True), ("object alone", 1, False)]


def make_capture(root: Path, name: str, aabb: int, background: bool, size: str, views: int) -> Path:
    from vqad.app.cli import main as cli

    out = root / name.replace(" ", "").replace(",", "-")
    if not (out / "transforms.json").is_file():
        args = ["synth-capture", "-o", str(out), "--aabb-scale", str(aabb), "--size", size, "--views", str(views)]
        if not background:
            args.append("--no-background")
        if cli(args) != 0:
            sys.exit(f"bench_scene: synth-capture failed for {name}")
    return out


def density_pass(capture: Path, minutes: float, steps: int, levels: tuple[int, int]) -> dict:
    from vqad.nerf.formats import load_dataset
    from vqad.nerf.octree_build import DensityPassConfig, octree_from_density

    ds = load_dataset(str(capture), format="ngp")
    stats: dict = {}
    octree = octree_from_density(ds, levels[0], levels[1], torch.device("cpu"), stats=stats,
                                 cfg=DensityPassConfig(steps=steps, max_minutes=minutes))
    stats["cells"] = octree.num_cells(levels[1])
    stats["rays_per_second"] = stats["rays"] / stats["seconds"]
    return stats


def fit(capture: Path, out: Path, storage: str, minutes: float, levels: tuple[int, int], eval_views: int | None) -> dict:
    from vqad.app.cli import main as cli

    args = ["fit-nerf", str(capture), "--format", "ngp", "--grid", storage, "--levels", f"{levels[0]}:{levels[1]}",
            "--minutes", str(minutes), "--out", str(out), "--device", "cpu", "--quiet"]
    if storage == "codebook":
        args += ["--bits", "4"]
    if eval_views:
        args += ["--eval-max-views", str(eval_views)]
    t = time.perf_counter()
    rc = cli(args)
    wall = time.perf_counter() - t
    if rc != 0:
        sys.exit(f"bench_scene: fit-nerf failed on {capture} ({storage})")
    m = json.loads((out / "metrics.json").read_text())
    return {"wall_seconds": wall, "cap_seconds": minutes * 60, "octree_seconds": m["octree_seconds"],
            "steps": m["steps"], "psnr": {lod: v["psnr"] for lod, v in m["lods"].items()}}


def write_report(results: dict, args, path: Path) -> None:
    lines = ["# Large scenes: the generated room capture (issue 22)", "",
             f"`python benchmarks/bench_scene.py{' --quick' if args.quick else ''}`: captures of {args.size} px, "
             f"{args.views} views; every fit `--minutes {args.minutes:g}`, one thread.", "",
             f"## Density pass ({args.steps} steps, 2,048 rays each, capped at "
             f"{args.density_minutes:g} min)", "",
             f"| capture | seconds | steps | rays/s | × the issue's {BASELINE_RAYS_PER_S:,.0f} | finest cells |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        d = r["density"]
        lines.append(f"| {name} | {d['seconds']:.1f} | {d['steps']} | {d['rays_per_second']:,.0f} | "
                     f"{d['rays_per_second'] / BASELINE_RAYS_PER_S:.1f} | {d['cells']:,} |")
    lines += ["", "## Whole fit under the cap, held-out PSNR per LOD", "",
              "| capture | grid | wall s / cap s | octree s | steps | PSNR per LOD (dB) |", "|---|---|---:|---:|---:|---|"]
    for name, r in results.items():
        for storage, f in r["fits"].items():
            psnr = ", ".join(f"{lod}: {p:.2f}" for lod, p in sorted(f["psnr"].items(), key=lambda kv: int(kv[0])))
            lines.append(f"| {name} | {storage} | {f['wall_seconds']:.0f} / {f['cap_seconds']:.0f} | "
                         f"{f['octree_seconds']:.1f} | {f['steps']} | {psnr} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    path.with_suffix(".json").write_text(json.dumps(results, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/benchmarks/scene.md")
    ap.add_argument("--work", default="out/bench-scene", help="captures and fits go here")
    ap.add_argument("--minutes", type=float, default=8.0, help="--minutes of every fit")
    ap.add_argument("--density-minutes", type=float, default=2.0, help="cap of the separately timed density pass")
    ap.add_argument("--size", default="135x240")
    ap.add_argument("--views", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="tiny captures and caps: a smoke test of this script")
    args = ap.parse_args()
    torch.set_num_threads(1)
    steps, levels, eval_views = 400, (4, 7), None
    if args.quick:
        args.size, args.views, args.minutes, args.density_minutes = "24x40", 10, 0.3, 0.3
        steps, levels, eval_views = 100, (3, 5), 1  # fewer steps find no surface for the small object alone
    args.steps = steps
    work = Path(args.work)
    results = {}
    for name, aabb, background in scenes(args.quick):
        cap = make_capture(work / "captures", name, aabb, background, args.size, args.views)
        r = {"density": density_pass(cap, args.density_minutes, steps, levels), "fits": {}}
        for storage in ("dense", "codebook"):
            tag = "dense" if storage == "dense" else "4-bit"
            r["fits"][tag] = fit(cap, work / "fits" / f"{cap.name}-{storage}", storage, args.minutes, levels, eval_views)
        results[name] = r
        print(f"{name}: density pass {r['density']['seconds']:.1f} s, {r['density']['rays_per_second']:,.0f} rays/s", flush=True)
    write_report(results, args, Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
