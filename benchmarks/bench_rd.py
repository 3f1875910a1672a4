"""make bench-rd: rate–distortion sweeps (`vqad sweep`) on lego and armadillo, targets checked.

Scenes (from ``$VQAD_DATA`` or ``../shared/data``):

* lego (NeRF-synthetic) at ``--downscale 4`` (200×200), trained on the train split, PSNR / SSIM on
  the first 20 val views; levels 4:7, k = 8, 6000 steps capped at ``--minutes`` (27) per fit;
* armadillo (mesh): levels 3:7, k = 16, 3000 steps × 16,384 points; Chamfer-L1 / normal
  consistency / IoU; plus Draco of the input mesh and of the dense field's marching-cubes mesh.

Methods: dense; VQ-AD at b = 1, 2, 4, 6, 8 and then 10 (last: the most memory); hash at
T = 10, 12, 14, 16; post-hoc k-means at b = 4, 6 and low rank at r = k/4, k/2 from the one dense
fit; Draco at q = 8, 10, 12, 14 (armadillo). Each sweep runs in ``--work``/<scene> and resumes
there: run the same command again after an interruption. Results are copied to
``--out``/rd-<scene>.{csv,md,png}, and ``--out``/rd.md states the targets and checks each one from
the CSVs (``--check-only`` redoes just that).

Armadillo's VQ-AD fits end with the SDF fit's default index refinement (``vqad.refine``), which no
baseline gets; ``--methods ... codebook-norefine:4`` adds the same fits without it (armadillo only),
and rd.md says which points were refined.
Rate-aware VQ-AD points: ``--methods ... codebook-rate:4,6,8 --rate-weights 3e-4,3e-3
[--rate-context]`` (vqad sweep's options; one point per b and λ, no index refinement).

    python benchmarks/bench_rd.py --out docs/benchmarks [--only lego,armadillo] [--steps N]
        [--minutes M] [--device cpu] [--threads 2] [--levels A:B] [--methods SPEC ...]
        [--rate-weights L1,L2,...] [--rate-context] [--check-only]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py, also when loaded by path
import common  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

SCENES = {
    "lego": {
        "path": "nerf_synthetic/lego",
        "options": {"format": "blender", "downscale": 4, "eval_views": "val", "eval_max_views": 20, "levels": "4:7",
                    "features": 8, "steps": 6000, "batch": 4096},
        "methods": ["dense", "kmeans", "lowrank", "codebook:1,2,4,6,8", "hash", "codebook:10"],
    },
    "armadillo": {
        "path": "meshes/armadillo.obj",
        "options": {"levels": "3:7", "features": 16, "steps": 3000, "batch": 16384, "mc_resolution": 256,
                    "draco_mc_resolution": 128},
        "methods": ["draco-input", "dense", "kmeans", "lowrank", "draco-mc", "codebook:1,2,4,6,8", "hash", "codebook:10"],
    },
}
KMEANS_MARGIN_DB = 3.0  # lego: VQ-AD 4-bit ≥ k-means 4-bit + 3 dB
MEMORY_LIMIT = 8 * 2**30  # 8- and 10-bit codebooks train within 8 GiB
RATE_GAIN_DB = 1.0  # lego: rate-aware VQ-AD ≥ plain 4-bit + 1 dB at plain 4-bit's bytes
RATE_CHAMFER_FACTOR = 0.8  # armadillo: ... ≥ 20 % lower Chamfer-L1 there
RATE_BITS_FRACTION, RATE_LOSS_DB = 0.7, 0.2  # lego, b = 6: ≤ 0.7·b coded bits per index, ≤ 0.2 dB below λ = 0


def data_dir() -> Path:
    return common.data_dir("bench-rd")


# ================================================================================================
# targets, checked from results.csv rows (vqad.sweep.read_csv)
# ================================================================================================
QUALITY = {"nerf": ("psnr", True), "sdf": ("chamfer_l1", False)}  # metric, higher is better


def kind_of(rows: list[dict]) -> str:
    return "nerf" if rows and "psnr" in rows[0] else "sdf"


def points(rows: list[dict], method: str) -> list[dict]:
    """Finished points of ``method`` with a quality value, by bytes."""
    q = QUALITY[kind_of(rows)][0]
    ok = [r for r in rows if r["method"] == method and r.get(q) is not None and not math.isnan(r[q])]
    return sorted(ok, key=lambda r: r["bytes"])


def point(rows: list[dict], method: str, setting: int) -> dict | None:
    return next((r for r in points(rows, method) if r["setting"] == setting), None)


def better_or_equal(a: float, b: float, higher: bool) -> bool:
    return a >= b if higher else a <= b


def kb(r: dict) -> str:
    return f"{r['bytes'] / 1e3:,.1f} kB"


def qtext(r: dict, kind: str) -> str:
    return f"{r['psnr']:.2f} dB" if kind == "nerf" else f"Chamfer {r['chamfer_l1']:.5f}"


def interp_log_bytes(curve: list[dict], nbytes: float, q: str) -> float | None:
    """Quality of a ``curve`` (points sorted by bytes) at ``nbytes``, linear in log(bytes); None
    outside the curve's byte range."""
    xs = [math.log(r["bytes"]) for r in curve]
    x = math.log(nbytes)
    if not curve or x < xs[0] or x > xs[-1]:
        return None
    for (x0, r0), (x1, r1) in zip(zip(xs, curve), zip(xs[1:], curve[1:])):
        if x0 <= x <= x1:
            t = 0.0 if x1 == x0 else (x - x0) / (x1 - x0)
            return r0[q] + t * (r1[q] - r0[q])
    return curve[0][q]  # a single point, at exactly its size


def check_kmeans_margin(rows: list[dict], bits: int = 4, margin: float = KMEANS_MARGIN_DB) -> tuple[bool | None, str]:
    c, k = point(rows, "codebook", bits), point(rows, "kmeans", bits)
    if c is None or k is None:
        return None, f"not measured (needs codebook:{bits} and kmeans:{bits})"
    gap = c["psnr"] - k["psnr"]
    return gap >= margin, (f"VQ-AD {bits}-bit {c['psnr']:.2f} dB at {kb(c)} vs k-means {bits}-bit {k['psnr']:.2f} dB at "
                           f"{kb(k)} (same b and octree: file sizes ×{c['bytes'] / k['bytes']:.3f}): "
                           f"{gap:+.2f} dB, target ≥ +{margin:g} dB")


def check_beats_hash(rows: list[dict]) -> tuple[bool | None, str]:
    kind = kind_of(rows)
    q, higher = QUALITY[kind]
    pairs = [(c, h) for c in points(rows, "codebook") for h in points(rows, "hash") if h["bytes"] >= c["bytes"]]
    if not pairs:
        return None, "not measured (no hash point is at least as large as a VQ-AD point)"
    bad = [(c, h) for c, h in pairs if not (c[q] > h[q] if higher else c[q] < h[q])]
    text = f"{len(pairs) - len(bad)} of {len(pairs)} (VQ-AD, larger-or-equal hash) pairs won by VQ-AD"
    if bad:
        text += "; lost: " + "; ".join(f"b={c['setting']} {qtext(c, kind)} at {kb(c)} vs T={h['setting']} "
                                       f"{qtext(h, kind)} at {kb(h)}" for c, h in bad[:6])
        text += " ..." if len(bad) > 6 else ""
    return not bad, text


def compare_to_curve(c: dict, curve: list[dict]) -> tuple[bool | None, str]:
    """VQ-AD point ``c`` against a Draco curve at the same bytes (Chamfer, lower is better)."""
    q = "chamfer_l1"
    at = interp_log_bytes(curve, c["bytes"], q)
    if at is not None:
        return c[q] <= at, f"Chamfer {c[q]:.5f} at {kb(c)} vs Draco {at:.5f} interpolated at that size"
    lo, hi = curve[0], curve[-1]
    if c["bytes"] < lo["bytes"]:
        if c[q] <= lo[q]:
            return True, (f"Chamfer {c[q]:.5f} at {kb(c)}: smaller and better than the smallest Draco file "
                          f"(q={lo['setting']}, {lo[q]:.5f} at {kb(lo)})")
        return None, f"{kb(c)} is below Draco's smallest file ({kb(lo)}, q={lo['setting']}): not comparable"
    if c[q] > hi[q]:
        return False, (f"Chamfer {c[q]:.5f} at {kb(c)}: larger and worse than the largest Draco file "
                       f"(q={hi['setting']}, {hi[q]:.5f} at {kb(hi)})")
    return None, f"{kb(c)} is above Draco's largest file ({kb(hi)}): not comparable"


def check_draco(rows: list[dict], method: str = "draco-input", bits: int = 4) -> tuple[bool | None, list[str]]:
    """Headline: the ``bits`` VQ-AD point (the paper's default); every VQ-AD point listed."""
    curve = points(rows, method)
    c = point(rows, "codebook", bits)
    if not curve or c is None:
        return None, [f"not measured (needs codebook:{bits} and {method} points)"]
    verdict, text = compare_to_curve(c, curve)
    lines = [f"b={bits}: {text}"]
    for o in points(rows, "codebook"):
        if o["setting"] != bits:
            v, t = compare_to_curve(o, curve)
            lines.append(f"b={o['setting']} ({status(v)}): {t}")
    return verdict, lines


def check_8_vs_6(rows: list[dict]) -> tuple[bool | None, str]:
    kind = kind_of(rows)
    q, higher = QUALITY[kind]
    c8, c6 = point(rows, "codebook", 8), point(rows, "codebook", 6)
    if c8 is None or c6 is None:
        return None, "not measured (needs codebook:6 and codebook:8)"
    return better_or_equal(c8[q], c6[q], higher), f"8-bit {qtext(c8, kind)} at {kb(c8)} vs 6-bit {qtext(c6, kind)} at {kb(c6)}"


def check_memory(rows: list[dict]) -> tuple[bool | None, str]:
    big = [r for r in points(rows, "codebook") if r["setting"] >= 8 and r.get("peak_memory_bytes")]
    if not big:
        return None, "not measured (no codebook point with b ≥ 8)"
    parts = [f"b={r['setting']}: peak {r['peak_memory_bytes'] / 2**30:.2f} GiB (naive logits C, m·2^b fp32: "
             f"{4 * r['vertices'] * 2 ** r['setting'] / 2**30:.2f} GiB, m = {r['vertices']:,})" for r in big]
    return all(r["peak_memory_bytes"] <= MEMORY_LIMIT for r in big), "; ".join(parts)


def rate_series(rows: list[dict], bits: int) -> list[dict]:
    """The b-bit rate-aware series by bytes: its ``codebook-rate`` points (λ > 0) and, as its λ = 0 end,
    the same fit without the rate term, ``codebook:b`` (a mesh's rate-aware fits end with the same index
    refinement, rate-aware; a radiance field's have none, like its ``codebook:b``)."""
    rated = [r for r in points(rows, "codebook-rate") if r["setting"] == bits]
    base = point(rows, "codebook", bits)
    return sorted(rated + ([base] if base is not None else []), key=lambda r: r["bytes"])


def check_rate_at_plain_bytes(rows: list[dict], bits: int = 4) -> tuple[bool | None, list[str]]:
    """The rate-aware series of every b against plain ``bits``-bit VQ-AD (the ``codebook`` point, as the
    product ships it) at that point's bytes, the series interpolated linearly in log(bytes): lego
    ≥ +RATE_GAIN_DB, armadillo Chamfer-L1 ≤ RATE_CHAMFER_FACTOR × plain. Met if some b meets it."""
    kind = kind_of(rows)
    q, _ = QUALITY[kind]
    plain = point(rows, "codebook", bits)
    series_bits = sorted({r["setting"] for r in points(rows, "codebook-rate")})
    if plain is None or not series_bits:
        return None, [f"not measured (needs codebook:{bits} and codebook-rate points)"]
    want = (f"≥ {plain['psnr'] + RATE_GAIN_DB:.2f} dB (+{RATE_GAIN_DB:g})" if kind == "nerf" else
            f"Chamfer ≤ {plain['chamfer_l1'] * RATE_CHAMFER_FACTOR:.5f} (×{RATE_CHAMFER_FACTOR:g})")
    lines, verdicts = [f"plain {bits}-bit: {qtext(plain, kind)} at {kb(plain)}; wanted there: {want}"], []
    for b in series_bits:
        curve = rate_series(rows, b)
        lams = ", ".join(f"λ = {r.get('rate_weight') or 0:g}: {qtext(r, kind)} at {kb(r)}" for r in curve)
        at = interp_log_bytes(curve, plain["bytes"], q)
        if at is None:
            side = "above" if plain["bytes"] > curve[-1]["bytes"] else "below"
            lines.append(f"b={b} (not measured: {kb(plain)} is {side} its points' range): {lams}")
            continue
        ok = at >= plain[q] + RATE_GAIN_DB if kind == "nerf" else at <= plain[q] * RATE_CHAMFER_FACTOR
        verdicts.append(ok)
        got = (f"{at:.2f} dB ({at - plain[q]:+.2f})" if kind == "nerf" else
               f"Chamfer {at:.5f} (×{at / plain[q]:.2f})")
        lines.append(f"b={b} ({status(ok)}): {got} interpolated at {kb(plain)}; {lams}")
    return (None if not verdicts else any(verdicts)), lines


def check_rate_b6(rows: list[dict], bits: int = 6) -> tuple[bool | None, str]:
    """Coded index cost ≤ RATE_BITS_FRACTION·b bits per index at b = ``bits`` with at most RATE_LOSS_DB
    below the λ = 0 fit (radiance fields: PSNR). The best such rate-aware point is reported."""
    base = point(rows, "codebook", bits)
    rated = [r for r in points(rows, "codebook-rate") if r["setting"] == bits and r.get("coded_index_bits") is not None]
    if base is None or not rated:
        return None, f"not measured (needs codebook:{bits} and codebook-rate:{bits} points)"
    limit = RATE_BITS_FRACTION * bits
    cheap = [r for r in rated if r["coded_index_bits"] <= limit]
    every = "; ".join(f"λ = {r.get('rate_weight') or 0:g}: {r['coded_index_bits']:.2f} bits/index, {r['psnr']:.2f} dB"
                      for r in sorted(rated, key=lambda r: r["coded_index_bits"]))
    head = f"λ = 0: {base.get('coded_index_bits') or float('nan'):.2f} bits/index, {base['psnr']:.2f} dB; {every}"
    if not cheap:
        return False, f"no b={bits} point at ≤ {limit:g} bits/index; {head}"
    best = max(cheap, key=lambda r: r["psnr"])
    loss = base["psnr"] - best["psnr"]
    return loss <= RATE_LOSS_DB, (f"best at ≤ {limit:g} bits/index: λ = {best.get('rate_weight'):g}, "
                                  f"{loss:.2f} dB below λ = 0 (target ≤ {RATE_LOSS_DB:g}); {head}")


def status(v: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "not measured"}[v]


def targets(results: dict[str, list[dict]]) -> list[str]:
    """The issue's targets, one table row each: (target, scene, result, numbers)."""
    L = ["| target | scene | result | numbers |", "|---|---|---|---|"]

    def add(target, scene, verdict, text):
        L.append(f"| {target} | {scene} | {status(verdict)} | {text} |")

    lego, arm = results.get("lego"), results.get("armadillo")
    if lego is not None:
        add(f"VQ-AD 4-bit ≥ k-means 4-bit + {KMEANS_MARGIN_DB:g} dB at equal bytes", "lego", *check_kmeans_margin(lego))
    for scene, rows in results.items():
        add("every VQ-AD point beats every hash point of equal or larger file size", scene, *check_beats_hash(rows))
    if arm is not None:
        v, lines = check_draco(arm, "draco-input")
        add("VQ-AD Chamfer-L1 at its file size ≤ the Draco input mesh's at that size (log-bytes interpolation)",
            "armadillo", v, "<br>".join(lines))
        v, lines = check_draco(arm, "draco-mc")
        add("(for reference) the same against Draco of the dense field's marching-cubes mesh", "armadillo", v,
            "<br>".join(lines))
    for scene, rows in results.items():
        add("8-bit codebook at least as good as 6-bit", scene, *check_8_vs_6(rows))
    for scene, rows in results.items():
        v, lines = check_rate_at_plain_bytes(rows)
        gain = f"≥ {RATE_GAIN_DB:g} dB better" if scene == "lego" else f"≥ {100 * (1 - RATE_CHAMFER_FACTOR):.0f} % lower Chamfer-L1"
        add(f"rate-aware VQ-AD (`codebook-rate`) {gain} than plain 4-bit at its bytes", scene, v, "<br>".join(lines))
    if lego is not None:
        add(f"rate-aware b = 6: coded indices ≤ {RATE_BITS_FRACTION:g}·b bits with ≤ {RATE_LOSS_DB:g} dB loss against λ = 0",
            "lego", *check_rate_b6(lego))
    for scene, rows in results.items():
        add(f"8- and 10-bit codebooks train within {MEMORY_LIMIT / 2**30:g} GiB peak memory", scene, *check_memory(rows))
    return L


# ================================================================================================
# running
# ================================================================================================
def sweep_config(scene: str, args):
    from vqad.app.sweep import METHODS, SweepConfig

    sc = SCENES[scene]
    nerf = "format" in sc["options"]
    values = dict(sc["options"], dataset=str(data_dir() / sc["path"]), out=str(Path(args.work) / scene),
                  methods=sc["methods"], device=args.device, quiet=args.quiet)
    if args.methods:  # Draco methods apply to the mesh only
        values["methods"] = [m for m in args.methods if not (nerf and METHODS[m.partition(":")[0]].sdf_only)]
    for name in ("steps", "levels"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if nerf and args.minutes:
        values["minutes"] = args.minutes
    if not nerf and args.mc_resolution:
        values["mc_resolution"] = args.mc_resolution
    if getattr(args, "rate_weights", None) is not None:  # the sweep refuses them without codebook-rate points
        values["rate_weights"] = args.rate_weights
    if getattr(args, "rate_context", False):
        values["rate_context"] = True
    return SweepConfig.from_mapping(values)


def read_runs(out: Path) -> dict:
    """``rd-runs.json``: per scene, the command, date and device that produced ``rd-<scene>.csv``."""
    path = out / "rd-runs.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def record_run(out: Path, scene: str, args) -> None:
    """Remember the command and date that produced ``rd-<scene>.csv``: with the commands that wrote into the
    same work directory before it (rd.md lists them all); a hand-written ``note`` is not carried over."""
    runs = read_runs(out)
    command = f"python benchmarks/bench_rd.py {' '.join(sys.argv[1:])}"
    old = runs.get(scene, {})
    # several processes may share one work directory (each its --methods, e.g. one thread each): keep all
    commands = [c for c in old.get("commands", []) if c != command] if old.get("work") == args.work else []
    runs[scene] = {"commands": commands + [command], "work": args.work,
                   "written": time.strftime("%Y-%m-%d %H:%M"), "device": args.device}
    (out / "rd-runs.json").write_text(json.dumps(runs, indent=2) + "\n")


def refinement_text(results: dict[str, list[dict]]) -> str:
    """Which scenes' VQ-AD points ended with index refinement (vqad.refine): none of the baselines did."""
    from vqad.app.sweep import codebook_sweeps, rate_sweeps

    parts, refined = [], []
    for scene, rows in results.items():
        if not any(r["method"] == "codebook" for r in rows):
            continue
        kind = kind_of(rows)
        n = " or ".join(map(str, codebook_sweeps(rows, kind)))
        refined += [scene] if n != "0" else []
        recorded = all(r.get("refine") is not None for r in rows if r["method"] == "codebook")
        what = "no index refinement" if n == "0" else f"{n} Gauss–Newton index-refinement sweeps after training"
        parts.append(f"{scene}'s VQ-AD points have {what} (the {'SDF' if kind == 'sdf' else 'radiance-field'} "
                     f"fit's default{'' if recorded else '; this run predates the CSV column that records it'})")
        if any(r["method"] == "codebook-norefine" for r in rows):
            parts[-1] += "; its *no index refinement* points are the same fits without them"
        if any(r["method"] == "codebook-rate" for r in rows):
            m = " or ".join(map(str, rate_sweeps(rows))) or "0"
            how = "none" if m == "0" else f"{m} (rate-aware: they minimise loss + λ × index bits)"
            parts[-1] += f"; its *VQ-AD + rate term* points (`codebook-rate`, one series per b, λ in the CSV) have {how}"
    if not parts:
        return ""
    unfair = (f", so every target below that sets VQ-AD against a baseline on {' and '.join(refined)} compares "
              "refined VQ-AD points with baselines that had no such step" if refined else "")
    return ("**Index refinement** (`vqad.refine`, not in the paper): " + "; ".join(parts) + ". No baseline (dense, "
            f"hash, k-means, low rank, Draco) gets a comparable step{unfair}. `codebook-norefine:b` adds the same VQ-AD fits "
            "without refinement as a series of their own (meshes only); each scene's table says which of its points "
            "were refined, and the `refine` column of its CSV, in runs that record it, gives each point's sweeps. "
            "The other departures from the paper: [method.md](../method.md).")


def write_summary(out: Path, args) -> str:
    """rd.md from every scene's CSV in ``out`` (scenes run separately keep each other's results)."""
    from vqad.app.sweep import read_csv

    results = {s: read_csv(out / f"rd-{s}.csv") for s in SCENES if (out / f"rd-{s}.csv").is_file()}
    runs = read_runs(out)
    refined = refinement_text(results)
    commands = [f"- {s}: " + " and ".join(f"`{c}`" for c in runs[s].get("commands") or [runs[s]["command"]])
                + f" (written {runs[s]['written']}, device `{runs[s]['device']}`"
                + (f"; {runs[s]['note']}" if runs[s].get("note") else "") + ")"
                for s in SCENES if s in results and s in runs]
    L = [
        "# Rate–distortion benchmark (`make bench-rd`)",
        "",
        "Commands (per scene; a scene's commands share its work directory, where its sweep resumes):",
        "",
        *(commands or [f"- `python benchmarks/bench_rd.py {' '.join(sys.argv[1:])}`"]),
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU threads.  ",
        "lego: NeRF-synthetic at downscale 4 (200×200), PSNR / SSIM on the first 20 val views, levels 4:7, k = 8, "
        "6000 steps × 4096 rays capped at --minutes per fit. armadillo: levels 3:7, k = 16, 3000 steps × 16,384 "
        "points, Chamfer-L1 in unit-cube units (marching cubes 256^3), Draco at compression level 10. "
        "Overrides of a run, if any, are in its command line above and in its scene's table header.  ",
        "Every point is a real file (`.vqad`, entropy-coded; Draco buffer) measured by its bytes; k-means and low rank "
        "are post hoc from the one dense fit. Checked automatically from the CSVs below.",
        *(["", refined] if refined else []),
        "",
        "## Targets",
        "",
    ] + targets(results)
    for s in SCENES:
        if s in results:
            L += ["", f"## {s}", "", f"![rate–distortion, {s}](rd-{s}.png)", "",
                  f"Full table: [rd-{s}.md](rd-{s}.md); one row per point: [rd-{s}.csv](rd-{s}.csv)."]
        else:
            L += ["", f"## {s}", "", "not run yet."]
    text = "\n".join(L) + "\n"
    (out / "rd.md").write_text(text)
    return text


def main() -> None:
    from vqad.app.sweep import METHOD_SPEC_HELP

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/benchmarks", help="where rd-<scene>.{csv,md,png} and rd.md go")
    ap.add_argument("--only", default="lego,armadillo", help="comma list of scenes (lego, armadillo)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per fit (default: lego 6000, armadillo 3000)")
    ap.add_argument("--minutes", type=float, default=27.0, help="lego: cap on each fit's training time; 0: no cap")
    ap.add_argument("--levels", default=None, help="octree levels BASE:MAX for every scene (default: lego 4:7, armadillo 3:7)")
    ap.add_argument("--methods", nargs="+", default=None, metavar="SPEC",
                    help="instead of the full set, for every scene (Draco ones: armadillo only): " + METHOD_SPEC_HELP)
    ap.add_argument("--rate-weights", default=None, metavar="L1,L2,...",
                    help="λ values of codebook-rate points in --methods (vqad sweep --rate-weights)")
    ap.add_argument("--rate-context", action="store_true", help="codebook-rate points: vqad sweep --rate-context")
    ap.add_argument("--mc-resolution", type=int, default=None, help="armadillo: marching cubes for the metrics (default 256)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--work", default="out/bench-rd", help="the sweeps' directories (files, checkpoints; resumable)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--check-only", action="store_true", help="only rewrite rd.md from the CSVs already in --out")
    args = ap.parse_args()
    scenes = [s.strip() for s in args.only.split(",") if s.strip()]
    for s in scenes:
        if s not in SCENES:
            sys.exit(f"bench-rd: unknown scene {s!r} (scenes: {', '.join(SCENES)})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.check_only:
        import torch

        from vqad.errors import VqadError
        from vqad.app.sweep import Sweep

        if args.threads:
            torch.set_num_threads(args.threads)
        for s in scenes:
            print(f"== {s}", flush=True)
            try:
                sweep = Sweep(sweep_config(s, args))
                sweep.run()
            except VqadError as exc:
                sys.exit(f"bench-rd: {s}: {exc}")
            for src, dst in (("results.csv", "csv"), ("results.md", "md"), ("rd.png", "png")):
                shutil.copyfile(sweep.out / src, out / f"rd-{s}.{dst}")
            record_run(out, s, args)
    print(write_summary(out, args))


if __name__ == "__main__":
    main()
