"""make bench-format: the progressive .vqad file of a VQ-AD armadillo SDF, measured as real bytes.

Fits armadillo (codebook, 4-bit, k = 16, levels 3:7) for a short run, or takes a trained checkpoint
with --ckpt; bakes it (fp16), writes it with and without entropy coding and reports:

* file bytes vs the paper's formula (grid m·b + 16·k·2^b bits per level, plus the fp16 decoder), with
  the overhead broken down (octree structure, header, decoder directory, framing, padding);
* cumulative bytes per LOD, i.e. the stream prefix each LOD needs (target: coarsest LOD ≤ 10 kB);
* entropy-coded size and saving (target ≥ 10%; issue 20: ≥ 25%), chunk kind by chunk kind;
  ``--rate-weight λ`` fits the model rate-aware (fit-sdf --rate-weight: its index sweeps trade
  loss for bits), so the saving can be read beside the quality it costs (Chamfer-L1 at the finest LOD);
* full decode time on one CPU core (target ≤ 0.5 s), and that the decoded model equals the
  in-memory one bit for bit.

    python benchmarks/bench_format.py --out docs/benchmarks/format.md [--ckpt DIR] [--steps 600]
    python benchmarks/bench_format.py --out docs/benchmarks/format-rate.md --rate-weight 1e-6 --work out/bench-format-rate
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TARGET_COARSE_BYTES = 10_000
TARGET_ENTROPY_SAVING = 0.10
TARGET_RATE_SAVING = 0.25  # issue 20: whole-file entropy-coded saving
TARGET_DECODE_SECONDS = 0.5


def data_dir() -> Path:
    env = os.environ.get("VQAD_DATA")
    d = Path(env) if env else REPO.parent / "shared" / "data"
    if not (d / "meshes").is_dir():
        sys.exit(f"bench-format: meshes not found in {d}/meshes: set VQAD_DATA to the shared data directory")
    return d


def get_field(args):
    """The baked field: from --ckpt, or a short fit (checkpoint kept in --work for reuse)."""
    from vqad.checkpoint import load_checkpoint

    if args.ckpt:
        field, cfg = load_checkpoint(args.ckpt, "cpu")
        source = f"checkpoint `{args.ckpt}` ({cfg.get('step', '?')} steps)"
    else:
        from vqad.config import DecoderConfig, GridConfig, parse_levels
        from vqad.sdf.fit import SDFTrainConfig
        from vqad.sdf.mesh import load_mesh
        from vqad.sdf.fit import fit_sdf

        base, top = parse_levels(args.levels)
        grid = GridConfig(storage="codebook", features=args.features, bits=args.bits, base_level=base, max_level=top)
        train = SDFTrainConfig(steps=args.steps, batch=args.batch, pool_size=200_000, resample_every=200, seed=0,
                               rate_weight=args.rate_weight)
        rate = f", rate-aware at λ = {args.rate_weight:g}" if args.rate_weight else ""
        print(f"fitting {args.mesh}: codebook {args.bits}-bit, k={args.features}, levels {args.levels}, "
              f"{args.steps} steps of {args.batch} points{rate} ...", flush=True)
        t0 = time.perf_counter()
        res = fit_sdf(load_mesh(data_dir() / "meshes" / f"{args.mesh}.obj"), grid, DecoderConfig(), train,
                      torch.device("cpu"), out_dir=Path(args.work) / "fit", quiet=True)
        field = res.field
        source = (f"a short fit made by this script: {args.steps} steps × {args.batch} points{rate} "
                  f"({time.perf_counter() - t0:.0f} s, final loss {res.final_loss:.3g})")
    field.bake(fp16=True)
    return field, source


def chamfer_at_finest(field, args) -> float:
    """Chamfer-L1 of the baked field's finest LOD against the input mesh (sweep's measurement)."""
    from vqad.sdf.extract import extract_mesh
    from vqad.sdf.mesh import SDFOracle, load_mesh
    from vqad.sdf.metrics import geometry_metrics

    mesh = load_mesh(data_dir() / "meshes" / f"{args.mesh}.obj")
    lod = max(field.lods)
    got = extract_mesh(field, lod, resolution=args.mc_resolution)
    return geometry_metrics(field, lod, mesh, got, SDFOracle(mesh)).chamfer_l1


def decode_seconds(data: bytes, repeats: int) -> tuple[float, float]:
    """Median wall time of a full decode (bytes -> baked field) and of its octree build alone."""
    from vqad import fileformat as F
    from vqad.octree import SparseOctree

    F.load(data)  # warm-up (imports, allocator)
    times, octree_times = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        field = F.load(data)
        times.append(time.perf_counter() - t0)
        codes = field.grid.octree.codes[field.grid.octree.max_level]
        t0 = time.perf_counter()
        SparseOctree.from_codes(codes, field.grid.octree.base_level, field.grid.octree.max_level)
        octree_times.append(time.perf_counter() - t0)
    return statistics.median(times), statistics.median(octree_times)


def check_exact(field, data: bytes) -> bool:
    from vqad import fileformat as F

    back = F.load(data)
    x = torch.rand(50_000, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        return all(torch.equal(field(x, lod), back(x, lod)) for lod in field.lods)


def kb(n: float) -> str:
    return f"{n / 1e3:,.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/benchmarks/format.md")
    ap.add_argument("--ckpt", default=None, help="a trained checkpoint directory (skips the short fit)")
    ap.add_argument("--mesh", default="armadillo")
    ap.add_argument("--levels", default="3:7")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--features", type=int, default=16)
    ap.add_argument("--steps", type=int, default=600, help="short fit length when no --ckpt is given")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=7, help="decode timing repeats (median)")
    ap.add_argument("--work", default="out/bench-format")
    ap.add_argument("--rate-weight", type=float, default=0.0,
                    help="λ of the short fit (fit-sdf --rate-weight; 0: plain VQ-AD); not with --ckpt")
    ap.add_argument("--mc-resolution", type=int, default=256, help="marching cubes of the Chamfer-L1 measurement")
    args = ap.parse_args()
    if args.ckpt and args.rate_weight:
        ap.error("--rate-weight applies to the short fit: a --ckpt model was fitted already")
    if not 0 <= args.rate_weight < float("inf"):
        ap.error(f"--rate-weight must be a finite number >= 0, got {args.rate_weight}")
    torch.set_num_threads(1)  # every number here is for one CPU core

    from vqad import fileformat as F
    from vqad.fileformat import ChunkType, Codec

    field, source = get_field(args)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    raw = F.to_bytes(field)
    ent = F.to_bytes(field, entropy=True)
    (work / "model.vqad").write_bytes(raw)
    (work / "model-entropy.vqad").write_bytes(ent)
    info, einfo = F.read_info(raw), F.read_info(ent)
    exact = check_exact(field, raw) and check_exact(field, ent)
    t_raw, t_oct = decode_seconds(raw, args.repeats)
    t_ent, _ = decode_seconds(ent, args.repeats)
    chamfer = chamfer_at_finest(field, args)

    cfg = info.config["grid"]
    k, b = cfg["features"], cfg["bits"]
    dec_bytes = 2 * info.decoder_params
    formula_grid = sum(lv.formula_bytes for lv in info.levels)
    formula_total = formula_grid + dec_bytes
    tree = sum(lv.tree_bytes for lv in info.levels)
    padding = sum(lv.grid_bytes - lv.formula_bytes for lv in info.levels)
    coarse = info.levels[0]
    saving = 1 - len(ent) / len(raw)

    res = {
        "source": source, "grid": cfg, "file_bytes": len(raw), "entropy_file_bytes": len(ent),
        "formula_grid_bytes": formula_grid, "decoder_fp16_bytes": dec_bytes, "formula_total_bytes": formula_total,
        "overhead": {"octree": tree, "header": info.header_bytes, "decoder_directory": info.decoder_bytes - dec_bytes,
                     "framing": info.framing_bytes, "padding": padding},
        "lod_prefix_bytes": {lv.level: lv.prefix_bytes for lv in info.levels},
        "lod_prefix_bytes_entropy": {lv.level: lv.prefix_bytes for lv in einfo.levels},
        "decode_seconds": t_raw, "decode_seconds_entropy": t_ent, "octree_build_seconds": t_oct,
        "exact": exact, "entropy_saving": saving, "rate_weight": args.rate_weight, "chamfer_l1": chamfer,
    }

    L = [
        "# .vqad file format benchmark (`make bench-format`)",
        "",
        f"Command: `python benchmarks/bench_format.py {' '.join(sys.argv[1:])}`  ",
        f"Model: {args.mesh}, codebook {b}-bit, k = {k}, levels {cfg['base_level']}..{cfg['max_level']}, decoder "
        f"{info.decoder_params:,} parameters; {source}. Chamfer-L1 at LOD {cfg['max_level']} (marching cubes "
        f"{args.mc_resolution}³, unit cube): **{chamfer:.5f}**.  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU threads, timings on **one** "
        "thread (`torch.set_num_threads(1)`), median of "
        f"{args.repeats} decodes. Files: `{work}/model.vqad`, `{work}/model-entropy.vqad`.",
        "",
        "## File vs formula",
        "",
        "| | bytes |",
        "|---|---|",
        f"| formula: grid Σ(m·b + 16·k·2^b)/8 | {formula_grid:,.0f} |",
        f"| formula: decoder weights, fp16 | {dec_bytes:,} |",
        f"| **formula total** | **{formula_total:,.0f}** |",
        f"| overhead: octree structure (1 byte per occupied parent cell) | {tree:,} |",
        f"| overhead: header JSON | {info.header_bytes:,} |",
        f"| overhead: decoder directory (names, shapes) | {info.decoder_bytes - dec_bytes:,} |",
        f"| overhead: framing (12-byte preamble + 12 bytes × {len(info.chunks)} chunks, incl. CRC32) | {info.framing_bytes:,} |",
        f"| overhead: bit-packing padding (< 1 byte per index chunk) | {padding:,.2f} |",
        f"| **file** (= formula + overhead) | **{len(raw):,}** ({len(raw) / formula_total:.3f} × formula, overhead "
        f"{100 * (len(raw) - formula_total) / len(raw):.1f}% of the file) |",
        "",
        "## Bytes per level of detail (stream prefix needed to decode each LOD)",
        "",
        "| LOD | vertices m | cells | prefix kB | prefix kB, entropy-coded | grid kB (cumul.) | dense fp16 grid kB (cumul.) | dense / grid | formula ratio 16mk/(mb+16k2^b) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    cg = cd = cf = 0.0
    for lv, elv in zip(info.levels, einfo.levels):
        cg += lv.grid_bytes
        cd += lv.dense_fp16_bytes
        cf += lv.formula_bytes
        L.append(f"| {lv.level} | {lv.vertices:,} | {lv.cells:,} | {kb(lv.prefix_bytes)} | {kb(elv.prefix_bytes)} | "
                 f"{kb(cg)} | {kb(cd)} | {cd / cg:.1f}x | {cd / cf:.1f}x |")
    L += [
        "",
        f"Coarsest LOD ({coarse.level}) decodes from the first **{coarse.prefix_bytes:,} bytes** "
        f"({einfo.levels[0].prefix_bytes:,} entropy-coded); target ≤ {TARGET_COARSE_BYTES:,}: "
        f"**{'met' if coarse.prefix_bytes <= TARGET_COARSE_BYTES else 'NOT met'}**. Most of it is the decoder "
        f"({info.decoder_bytes:,} bytes), which every LOD shares.",
        "",
        "## Entropy coding (lossless)",
        "",
        "| chunks | raw bytes | coded bytes | saving |",
        "|---|---|---|---|",
    ]
    for name, ctype, slot in (("octree masks (TREE)", ChunkType.TREE, None), ("indices V (GRID uint)", ChunkType.GRID, 1),
                              ("codebooks D (GRID f16, never coded)", ChunkType.GRID, 0)):
        sel = [c for c in einfo.chunks if c.type == ctype and (slot is None or c.slot == slot)]
        r = sum(c.raw_length for c in sel)
        c_ = sum(c.length for c in sel)
        L.append(f"| {name} | {r:,} | {c_:,} | {100 * (1 - c_ / r):.1f}% |")
    L.append(f"| **whole file** | **{len(raw):,}** | **{len(ent):,}** | **{100 * saving:.1f}%** |")
    L += ["", "Per chunk (codec chosen per chunk: RAW unless coding makes it at least 2 % smaller, `MIN_CODED_SAVING`):", "",
          "| chunk | codec | raw bytes | coded bytes |", "|---|---|---|---|"]
    for c in einfo.chunks:
        if c.type in (ChunkType.TREE, ChunkType.GRID) and not (c.type == ChunkType.GRID and c.slot == 0):
            L.append(f"| {c.name} | {Codec(c.codec).name.lower()} | {c.raw_length:,} | {c.length:,} |")
    L += [
        "",
        f"Target ≥ {100 * TARGET_ENTROPY_SAVING:.0f}% smaller: **{'met' if saving >= TARGET_ENTROPY_SAVING else 'NOT met'}** "
        f"({100 * saving:.1f}%); issue 20's ≥ {100 * TARGET_RATE_SAVING:.0f}%: "
        f"**{'met' if saving >= TARGET_RATE_SAVING else 'NOT met'}**. Decoded outputs equal the in-memory baked model's bit for bit at every LOD "
        f"(50k random points, both files): **{exact}**.",
        "",
        "## Decode time (bytes → baked field, whole file, one core)",
        "",
        "| file | seconds | of which octree build (`SparseOctree.from_codes`) |",
        "|---|---|---|",
        f"| raw | {t_raw:.3f} | {t_oct:.3f} |",
        f"| entropy-coded | {t_ent:.3f} | {t_oct:.3f} |",
        "",
        f"Target ≤ {TARGET_DECODE_SECONDS} s: **{'met' if max(t_raw, t_ent) <= TARGET_DECODE_SECONDS else 'NOT met'}**.",
    ]
    text = "\n".join(L) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2, default=str))
    print(text)


if __name__ == "__main__":
    main()
