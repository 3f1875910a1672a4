"""make bench-nerf: dense vs VQ-AD codebook (4 and 6 bit) radiance fields of real captures.

Scenes (from ``$VQAD_DATA`` or ``../shared/data``):

* lego (NeRF-synthetic, Blender format) at ``--downscale 4`` (200×200): trained on the train split,
  evaluated on the first 20 val views; octree from the alpha masks (``--octree auto``);
* fern (LLFF, ``images_8``, 504×378): every 8th image held out (the test split); octree from a
  coarse density pass (no depth, no masks).

For each scene and method: fit (all LODs jointly) in its own process (so peak memory is per fit),
then per LOD: PSNR and SSIM on the held-out views, grid bytes (cumulative up to the LOD) and the
ratio to an fp16 dense grid; plus fit time, training throughput (rays/s) and peak memory. Writes a
markdown report and a JSON beside it. LPIPS is not computed (it needs network weights, offline).
A scene whose octree comes from a density pass (fern) runs the pass once: the scene's first fit
computes it, its later fits in the same run reuse that octree (``--octree-from``).

    python benchmarks/bench_nerf.py --out docs/benchmarks/nerf.md [--device cpu] [--steps N]
        [--only lego,fern:dense,...] [--threads 2]
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
from vqad.storages import options_of  # noqa: E402  (which flags a grid takes)

REPO = Path(__file__).resolve().parents[1]
METHODS = {"dense": ("dense", 4), "codebook-4bit": ("codebook", 4), "codebook-6bit": ("codebook", 6)}
SCENES = {
    # path under the data dir, CLI options, held-out split and view count. step_ratio: the marching step in finest
    # cells; fern's density-pass octree is thick (~43 samples per ray at one cell per step, lego's mask octree ~8),
    # and two cells per step buy 2.5x the training steps in the same minutes (measured: docs/benchmarks/nerf.md)
    "lego": {"path": "nerf_synthetic/lego", "format": "blender", "downscale": 4, "eval_views": "val", "eval_max": 20,
             "levels": "4:7", "features": 8, "steps": 6000, "step_ratio": 1.0},
    "fern": {"path": "llff/fern", "format": "llff", "downscale": 1, "eval_views": "test", "eval_max": None,
             "levels": "4:7", "features": 8, "steps": 4000, "step_ratio": 2.0},
}
TARGET_MINUTES = 30


def data_dir() -> Path:
    return common.data_dir("bench-nerf")


def selected(only: str | None) -> list[tuple[str, str]]:
    """``--only lego,fern:dense`` → [(scene, method), ...]."""
    runs = [(s, m) for s in SCENES for m in METHODS]
    if not only:
        return runs
    keep = []
    for item in only.split(","):
        scene, _, method = item.strip().partition(":")
        if scene not in SCENES or (method and method not in METHODS):
            sys.exit(f"bench-nerf: unknown --only item {item!r} (scenes: {', '.join(SCENES)}; methods: {', '.join(METHODS)})")
        keep += [(s, m) for s, m in runs if s == scene and (not method or m == method)]
    return list(dict.fromkeys(keep))


def run_one(scene: str, method: str, args, octree_from: Path | None = None) -> dict:
    sc = SCENES[scene]
    storage, bits = METHODS[method]
    path = data_dir() / sc["path"]
    if not path.is_dir():
        sys.exit(f"bench-nerf: {path} is missing: set VQAD_DATA to the shared data directory")
    k = args.features or sc["features"]
    out = Path(args.work) / (f"{scene}-{method}" + (f"-k{k}" if args.features else ""))
    steps = args.steps or sc["steps"]
    cmd = [sys.executable, "-m", "vqad.app.cli", "fit-nerf", str(path), "--format", sc["format"],
           "--downscale", str(sc["downscale"]), "--grid", storage, *(["--bits", str(bits)] if "bits" in options_of(storage) else []),
           "--features", str(k), "--levels", sc["levels"], "--steps", str(steps),
           "--batch-rays", str(args.batch_rays), *(["--octree", "auto"] if octree_from is None else []),
           "--eval-views", sc["eval_views"],
           "--step-ratio", str(sc["step_ratio"]),
           "--out", str(out), "--device", args.device, "--quiet"]
    if args.minutes:
        cmd += ["--minutes", str(args.minutes)]
    if octree_from is not None:
        cmd += ["--octree-from", str(octree_from)]
    if sc["eval_max"]:
        cmd += ["--eval-max-views", str(sc["eval_max"])]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    print(f"== {scene} / {method}: {' '.join(cmd[3:])}", flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, env=env)
    m = json.loads((out / "metrics.json").read_text())
    m["wall_seconds"] = time.perf_counter() - t0
    m["steps_requested"] = steps  # m["steps"]: the steps actually run (a --minutes cap may stop earlier)
    m["command"] = f"python benchmarks/bench_nerf.py {' '.join(sys.argv[1:])}"
    m["date"] = time.strftime("%Y-%m-%d %H:%M")
    m["threads"] = args.threads or os.cpu_count()
    m["checkpoint"] = str(out / "checkpoint")
    if octree_from is not None:
        m["octree_from"] = str(octree_from)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/benchmarks/nerf.md")
    ap.add_argument("--only", default=None, help="comma list of SCENE or SCENE:METHOD (e.g. lego,fern:dense)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: per scene, sized for 30 min on 2 cores)")
    ap.add_argument("--minutes", type=float, default=27.0,
                    help="cap on each fit's training time (octree + training stay within 30 min); 0: no cap")
    ap.add_argument("--batch-rays", type=int, default=4096)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads per fit (OMP_NUM_THREADS)")
    ap.add_argument("--features", type=int, default=None,
                    help="k for every fit instead of the scene's (lego, fern: 8); write to another --out")
    ap.add_argument("--work", default="out/bench-nerf", help="where the fits' checkpoints and renders go")
    ap.add_argument("--no-share-octree", dest="share_octree", action="store_false",
                    help="run the coarse density pass in every fit of a scene (default: the first fit of this run "
                         "computes it, the others reuse its octree with --octree-from)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the results already in OUT's .json (runs of other scenes/methods) and add these")
    ap.add_argument("--report-only", action="store_true", help="rewrite OUT from its .json (and the fits' metrics)")
    args = ap.parse_args()
    prev = Path(args.out).with_suffix(".json")
    results = json.loads(prev.read_text()) if (args.merge or args.report_only) and prev.exists() else {}
    if args.report_only:
        for key in results:  # refresh from the fits' own metrics (e.g. the steps actually run)
            f = Path(args.work) / key.replace("/", "-") / "metrics.json"
            if f.exists():
                results[key].update({k: v for k, v in json.loads(f.read_text()).items() if k != "lods"})
        write_report(results, args)
        return
    shared: dict[str, Path] = {}  # scene -> the checkpoint whose density-pass octree later fits reuse
    for scene, method in selected(args.only):
        m = run_one(scene, method, args, shared.get(scene) if args.share_octree else None)
        results[f"{scene}/{method}"] = m
        if m.get("octree_method") == "density":
            shared.setdefault(scene, Path(m["checkpoint"]))
        write_report(results, args)  # after every fit, so a long run leaves partial results


def _cum_bytes(vertices: dict, storage: str, bits: int, k: int) -> tuple[dict, dict]:
    dense, stored, cd, cs = {}, {}, 0.0, 0.0
    for lod in sorted(vertices):
        m = vertices[lod]
        cd += 16 * m * k / 8
        cs += (m * bits + 16 * k * (1 << bits)) / 8 if storage == "codebook" else 16 * m * k / 8
        dense[lod], stored[lod] = cd, cs
    return dense, stored


NOTES_HEADING = "## Notes"
LEGACY_THREADS = 2  # rows written before runs recorded their thread count used both cores


def _threads(m: dict) -> int:
    return int(m.get("threads", LEGACY_THREADS))


def _step_ratio(m: dict) -> float:
    """The marching step in finest cells (rows written before fits recorded it marched one cell)."""
    return float(m.get("nerf", {}).get("step_ratio", 1.0))


def write_report(results: dict, args) -> None:
    dev = args.device
    lines = [
        "# Radiance-field benchmark (`make bench-nerf`)",
        "",
        f"Command (this run): `python benchmarks/bench_nerf.py {' '.join(sys.argv[1:])}`; each row's own command, "
        "date and threads are in the run table below (runs merged with `--merge`).  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU threads, device `{dev}`; {args.batch_rays} rays per step.  ",
        "lego: NeRF-synthetic at downscale 4 (200×200), train split, metrics on the first 20 val views, octree from the "
        "alpha masks. fern: LLFF images_8 (504×378), every 8th image held out, octree from a coarse density pass.  ",
        "*march step*: the ray-marching step in finest octree cells, used in training and in evaluation.  ",
        "PSNR over all pixels of a view, averaged over views; SSIM with an 11-pixel Gaussian window, σ 1.5 (pytorch-msssim). "
        "LPIPS is not reported: it needs pretrained network weights, which cannot be fetched offline.  ",
        "Bytes: *dense fp16* = 16·m·k bits summed over the levels up to the LOD; *grid* = the storage's own bits "
        "(codebook: m·b + 16·k·2^b); the shared decoders (density + colour MLPs, fp16) are listed separately.",
        "",
        "| scene | method | LOD | vertices (m) | dense fp16 kB | grid kB | ratio | PSNR | SSIM |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    summary = ["", "| scene | method | k | steps | fit min | rays/s | march step | samples/ray | octree | peak memory MB | "
               "decoder kB | grid + decoder kB | threads | run |",
               "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, m in results.items():
        scene, method = key.split("/")
        storage, bits = METHODS[method]
        k = int(m.get("grid", {}).get("features", SCENES[scene]["features"]))
        verts = {int(lv): v for lv, v in m["size"]["vertices"].items()}
        dense, stored = _cum_bytes(verts, storage, bits, k)
        for lod in sorted(verts):
            q = m.get("lods", {}).get(str(lod))
            qs = f"{q['psnr']:.2f} | {q['ssim']:.4f}" if q else "– | –"
            lines.append(f"| {scene} | {method} | {lod} | {verts[lod]:,} | {dense[lod] / 1e3:,.1f} | {stored[lod] / 1e3:,.1f} | "
                         f"{dense[lod] / stored[lod]:.1f}x | {qs} |")
        run = f"{m['date']}: `{m['command']}`" if m.get("command") else "–"
        octree = (f"{m['octree_method']} ({m['octree_seconds']:.0f} s)" if not m.get("octree_from")
                  else f"reused from {Path(m['octree_from']).parent.name} ({m['octree_seconds']:.0f} s)")
        summary.append(f"| {scene} | {method} | {k} | {m['steps']} | {m['fit_seconds'] / 60:.1f} | {m['rays_per_second']:,.0f} | "
                       f"{_step_ratio(m):g} | {m['samples_per_ray']:.1f} | {octree} | "
                       f"{m['peak_memory_bytes'] / 2**20:,.0f} | {m['size']['decoder_bytes'] / 1e3:.1f} | "
                       f"{m['size']['compressed_bytes'] / 1e3:,.1f} | {_threads(m)} | {run} |")
    lines += summary + ["", "## Targets", ""] + targets(results)
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    if out.exists() and NOTES_HEADING in out.read_text():  # hand-written notes survive a re-run
        text += "\n" + NOTES_HEADING + out.read_text().split(NOTES_HEADING, 1)[1]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=2, default=str))
    print(text, flush=True)


def _finest(m: dict) -> dict | None:
    lods = m.get("lods") or {}
    return lods[max(lods, key=int)] if lods else None


def targets(results: dict) -> list[str]:
    out = []
    d, c4 = results.get("lego/dense"), results.get("lego/codebook-4bit")
    if d and _finest(d):
        p = _finest(d)["psnr"]
        out.append(f"- lego dense ≥ 28 dB: {p:.2f} dB — {'met' if p >= 28 else 'NOT met'}")
    if d and c4 and _finest(d) and _finest(c4):
        gap = _finest(d)["psnr"] - _finest(c4)["psnr"]
        ratio = c4["size"]["grid_ratio"]
        out.append(f"- lego codebook 4-bit within 1.5 dB of dense: {gap:+.2f} dB — {'met' if gap <= 1.5 else 'NOT met'}; "
                   f"grid {ratio:.1f}x smaller than dense fp16 — {'met' if ratio >= 30 else 'NOT met'}")
    for key, m in results.items():
        mins = m["fit_seconds"] / 60
        if mins > TARGET_MINUTES:
            out.append(f"- {key}: fit took {mins:.1f} min (> {TARGET_MINUTES} min)")
    for scene in SCENES:
        dd = results.get(f"{scene}/dense")
        for method in ("codebook-4bit", "codebook-6bit"):
            cc = results.get(f"{scene}/{method}")
            if dd and cc and _threads(dd) != _threads(cc):
                out.append(f"- {scene} {method} step cost vs dense: not comparable here (dense ran with "
                           f"{_threads(dd)} threads, this with {_threads(cc)}; see Notes)")
            elif dd and cc:
                # per-step cost, normalised by samples so that differing occupancy does not count
                r = (dd["rays_per_second"] * dd["samples_per_ray"]) / max(cc["rays_per_second"] * cc["samples_per_ray"], 1e-9)
                out.append(f"- {scene} {method} step cost per sample vs dense: {r:.2f}x "
                           f"({'met' if r <= 2 else 'NOT met'}: ≤ 2x); rays/s {cc['rays_per_second']:,.0f} vs {dd['rays_per_second']:,.0f}")
    if all(m["fit_seconds"] / 60 <= TARGET_MINUTES for m in results.values()):
        out.append(f"- every fit ≤ {TARGET_MINUTES} min: met")
    return out


if __name__ == "__main__":
    main()
