"""``vqad fit-tsdf``: RGB-D frames → fused TSDF → VQ-AD (or dense, hash) TSDF field, every LOD."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from vqad.app.commands.common import (clear_earlier_fit, evaluating, fit_seconds, seconds_text, steps_text, already_complete, add_rate_flags, add_grid_args, add_run_args, check_finite, config_flag,
                                      ensure_fit_dir, refuse,
                                      check_resumed_source, report_notes, report_skipped_steps,
                                      resumed_configs)
from vqad.atomicio import write_atomic
from vqad.errors import InputError
from vqad.fit import Deadline

TSDF_TRAIN_FLAGS = ("steps", "rate_weight", "rate_context", "batch", "lr", "grid_lr_scale", "lr_floor", "logit_lr_scale", "codebook_lr_scale", "max_minutes",
                    "refine", "refine_samples", "refine_candidates", "seed", "color_weight", "color")
#: flags that shape the fusion; a resumed fit reads OUT/fused.tsdf instead and refuses them
FUSION_FLAGS = {"format": "--format", "depth_scale": "--depth-scale", "intrinsics": "--intrinsics", "trajectory": "--trajectory", "voxel": "--voxel", "trunc": "--trunc",
                "max_depth": "--max-depth", "stride": "--stride", "max_frames": "--max-frames"}
FUSED_NAME = "fused.tsdf"


def register(sub) -> None:
    from vqad.config import DecoderConfig, GridConfig
    from vqad.tsdf.fit import TSDFTrainConfig

    p = sub.add_parser("fit-tsdf", help="fuse RGB-D frames into a TSDF and fit a VQ-AD (or dense) TSDF field to it",
                       description="Fuse posed depth (and colour) frames into a sparse TSDF (the uncompressed baseline, "
                                   "written as OUT/fused.tsdf with its mesh), fit a VQ-AD (or dense, hash) field to it "
                                   "at every LOD jointly, write the progressive OUT/model.vqad and evaluate each LOD "
                                   "against the fusion's mesh (and --gt). Meshes and metrics are in the sequence's "
                                   "own world frame and units.")
    p.add_argument("source", help="an RGB-D folder (TUM RGB-D, Redwood / Open3D, RTMV), 'procedural' (the built-in "
                                  "scene), or a fused .tsdf file written by an earlier run")
    p.add_argument("--format", default=None, choices=["auto", "tum", "redwood", "rtmv", "procedural"],
                   help="layout of SOURCE (default: auto)")
    p.add_argument("--depth-scale", type=float, default=None,
                   help="depth image units per metre (default: the layout's: TUM 5000, Redwood 1000)")
    p.add_argument("--intrinsics", default=None,
                   help="pinhole intrinsics when the layout does not record them: 'fx,fy,cx,cy' in pixels, a preset "
                        "(fr1, fr2, fr3, primesense), or (Redwood / Open3D) which of the folder's intrinsics JSON "
                        "files to read (default: the layout's own file)")
    p.add_argument("--trajectory", default=None,
                   help="Redwood / Open3D: which of the folder's *.log trajectories to read (default: its only one)")
    p.add_argument("--voxel", type=float, default=None, help="fusion voxel size in the sequence's units, metres for TUM and Redwood (default: from the depth range)")
    p.add_argument("--trunc", type=float, default=None, help="truncation distance in the sequence's units (default: 4 voxels)")
    p.add_argument("--max-depth", type=float, default=None, help="ignore depth beyond this distance, in the sequence's units (default: none)")
    p.add_argument("--stride", type=int, default=None, help="fuse every Nth frame (default: 1)")
    p.add_argument("--max-frames", type=int, default=None, help="fuse at most this many frames (default: all)")
    p.add_argument("--gt", default=None, help="ground-truth mesh in the sequence's world frame (adds metrics against it)")
    add_grid_args(p, GridConfig())
    T = TSDFTrainConfig
    config_flag(p, T, "steps", help="training steps")
    config_flag(p, T, "batch", help="samples per step")
    config_flag(p, T, "lr", type=float, help="decoder learning rate (none: 5e-3 for codebook grids, else 2e-3)")
    config_flag(p, T, "grid_lr_scale", help="grid lr = lr × this")
    config_flag(p, T, "lr_floor", type=float, help="every learning rate decays on a cosine to this share of its initial "
                                                   "value (none: 0.01 for codebook grids, 0.1 for others)")
    config_flag(p, T, "logit_lr_scale", help="codebook logits C lr = lr × this (0: same as the grid; codebook only)")
    add_rate_flags(p, T)
    config_flag(p, T, "codebook_lr_scale", type=float, help="codebooks D lr = lr × this (codebook only)")
    config_flag(p, T, "max_minutes", flag="--minutes", type=float, help="cap the whole job (fusion, fit, evaluation) at this many minutes")
    config_flag(p, T, "refine", help="Gauss–Newton index sweeps after training (codebook only; 0: off)")
    config_flag(p, T, "refine_samples", help="samples each sweep sees (codebook only)")
    config_flag(p, T, "refine_candidates", help="codewords per vertex each sweep measures (codebook only)")
    config_flag(p, T, "color_weight", help="weight of the colour loss (with --color only)")
    p.add_argument("--color", dest="color", action="store_const", const=True, default=None,
                   help="fit the fused colour too, with a second MLP on the same features (default: geometry only; "
                        "colour costs geometry at 4 bits, see docs/benchmarks/tsdf.md)")
    D = DecoderConfig()
    config_flag(p, D, "hidden", help="decoder width")
    config_flag(p, D, "layers", help="decoder hidden layers")
    add_run_args(p, T, "fused.tsdf, fusion_mesh.ply, checkpoint, model.vqad, metrics, meshes, renders")
    p.add_argument("--no-eval", action="store_true", help="skip per-LOD meshes, renders and metrics")
    p.set_defaults(func=cmd_fit_tsdf, oom_hint="use a coarser --voxel, a smaller --trunc, fewer --levels or a smaller --batch")


def fit_tsdf_configs(args, saved: dict | None = None):
    """Every ``fit-tsdf`` flag checked before anything touches the disk: grid, decoder and training configs."""
    from vqad.app.commands.sdf import _configs
    from vqad.tsdf.fit import TSDFTrainConfig

    for name in ("voxel", "trunc", "max_depth", "depth_scale"):
        v = getattr(args, name)
        check_finite(v, "--" + name.replace("_", "-"))
        refuse(v is not None and v <= 0, f"--{name.replace('_', '-')} must be positive, got {v}")
    for name in ("stride", "max_frames"):
        v = getattr(args, name)
        refuse(v is not None and v <= 0, f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    if args.voxel is not None and args.trunc is not None and args.trunc < args.voxel:
        raise InputError(f"--trunc ({args.trunc:g}) must be at least one --voxel ({args.voxel:g})")
    grid, dec, train = _configs(args, saved, TSDFTrainConfig, TSDF_TRAIN_FLAGS)
    refuse(args.color_weight is not None and not train.color, "--color-weight weighs the colour loss: it applies with --color only")
    return grid, dec, train


#: an earlier fit's outputs, removed when a new fit (not --resume) replaces it: its model, its checkpoint (which
#: a later --resume would otherwise continue on the new fusion) and its evaluation
STALE_OUTPUTS = ("model.vqad", "checkpoint/", "metrics.json", "fusion_mesh.ply", "mesh_lod*.ply", "render_lod*.png")
#: how far a --gt mesh's box may differ in size from the fusion's (a partial scan of a larger model is fine;
#: millimetres against metres is not)
GT_SIZE_RATIO = 20.0
#: a fused scene fewer voxels across than this is warned about (a --voxel near the scene's size)
MIN_SPAN_VOXELS = 16


def check_gt_frame(gt, fused, name: str) -> None:
    """Refuse a ground-truth mesh that cannot be in the fusion's units and frame: its bounding box misses the
    fused voxels' box, or its size differs by more than :data:`GT_SIZE_RATIO` (before any distance is measured:
    a mesh far from every point makes the exact distances cost all points × all triangles)."""
    if len(fused.ijk) == 0:
        return  # nothing fused: the fit refuses it with its own message
    from vqad.tsdf.fit import fused_box

    lo_f, hi_f = fused_box(fused)
    v = np.asarray(gt.vertices, dtype=np.float64)
    lo_g, hi_g = v.min(0), v.max(0)
    size_f, size_g = float(np.linalg.norm(hi_f - lo_f)), float(np.linalg.norm(hi_g - lo_g))
    overlap = bool((lo_g <= hi_f).all() and (lo_f <= hi_g).all())
    ratio = size_g / max(size_f, 1e-12)
    if not overlap or not 1 / GT_SIZE_RATIO <= ratio <= GT_SIZE_RATIO:
        raise InputError(f"--gt {name}: its box ({_box(lo_g, hi_g)}) {'misses' if not overlap else 'is'} "
                         + (f"the fused scene's ({_box(lo_f, hi_f)})" if not overlap else
                            f"{ratio:,.3g}× the size of the fused scene's ({_box(lo_f, hi_f)})")
                         + f": is it in the sequence's units ({fused.units}) and world frame?")


def _against(baseline: int, n: int) -> str:
    """``n`` bytes against the fusion's ``baseline``: "12x smaller than", or "3.2x larger than"."""
    return f"{baseline / n:,.0f}x smaller than" if baseline >= n else f"{n / baseline:,.1f}x larger than"


def _box(lo, hi) -> str:
    return "[" + ", ".join(f"{a:.3g}..{b:.3g}" for a, b in zip(lo, hi)) + "]"


def fusion_flags_given(args) -> str:
    """The fusion flags the user gave, comma-separated ("" when none)."""
    return ", ".join(f for n, f in FUSION_FLAGS.items() if getattr(args, n) is not None)


def fuse_source(args, device, color: bool = False):
    """``(FusedTSDF, description, fusion seconds)`` of ``args.source``: a fused .tsdf file is read as it
    is (fusion flags refused), anything else is read as an RGB-D sequence and fused. ``color``: the fit
    needs colour, so a source without it is refused before any fusion."""
    from vqad.tsdf.fusion import FusedTSDF, fuse
    from vqad.tsdf.rgbd import median_depth
    from vqad.tsdf.sources import read_sequence

    src = Path(args.source)
    if src.is_file():
        used = fusion_flags_given(args)
        refuse(bool(used), f"{used} cannot apply to an already fused TSDF ({src}): fusion flags set how frames are fused")
        fused = FusedTSDF.load(src)
        refuse(color and fused.color is None, f"--color: the fused TSDF {src} has no colour")
        return fused, f"fused TSDF {src}", 0.0
    kw = {} if args.depth_scale is None else {"depth_scale": args.depth_scale}
    if args.intrinsics is not None and args.intrinsics.lower().endswith(".json"):
        kw["intrinsics_file"] = args.intrinsics  # an Open3D PinholeCameraIntrinsic file (Redwood's reader)
    elif args.intrinsics is not None:
        kw["K"] = args.intrinsics
    if args.trajectory is not None:
        kw["trajectory"] = args.trajectory
    seq = read_sequence(args.source, format=args.format or "auto", **kw)
    refuse(color and not seq.has_color, f"--color: {seq.name} has no colour frames (fit its geometry without --color)")
    frames = range(0, len(seq), args.stride or 1)
    if args.max_frames is not None:
        frames = frames[: args.max_frames]
    t0 = time.perf_counter()
    fused = fuse(seq, voxel=args.voxel, trunc=args.trunc, device=device, frames=list(frames),
                 max_depth=args.max_depth, progress=not args.quiet)
    med = median_depth(seq)  # printed, so depth in the wrong units shows (a scene 5x too small is still plausible)
    what = (f"{seq.name}: {len(frames)} of {len(seq)} frames {seq.width}x{seq.height}"
            + (f", median depth {med:.3g} {seq.units}" if med is not None else "") + (f" ({seq.note})" if seq.note else ""))
    return fused, what, time.perf_counter() - t0


def cmd_fit_tsdf(args) -> int:
    from vqad import fileformat
    from vqad.device import resolve_device
    from vqad.sdf.extract import save_mesh
    from vqad.sdf.mesh import load_mesh
    from vqad.tsdf.evaluate import compare, evaluate_tsdf
    from vqad.tsdf.fit import FINE_CELL_WARNING, check_fusable, check_levels, finest_cell, fit_tsdf
    from vqad.tsdf.fusion import FusedTSDF

    out = Path(args.out)
    saved = resumed_configs(out, "tsdf") if args.resume else None
    refuse(args.no_eval and args.gt is not None, "--gt adds metrics to the evaluation: it cannot apply with --no-eval")
    grid_cfg, dec_cfg, train_cfg = fit_tsdf_configs(args, saved)
    deadline = Deadline.for_job(train_cfg.max_minutes, evaluation=not args.no_eval)
    device = resolve_device(args.device)
    gt = load_mesh(args.gt, closed=False) if args.gt is not None else None
    source = str(Path(args.source).resolve()) if Path(args.source).exists() else str(args.source)
    if args.resume:
        recorded = saved.get("source")  # the fusion is read back from OUT; the source must still be the same
        if recorded is not None and (recorded == "procedural") != (source == "procedural"):
            raise InputError(f"--resume: this fit was trained on {recorded}, not {args.source}; fit it in a new --out")
        if recorded is not None and recorded != "procedural":
            note = check_resumed_source(recorded, source, "the frames of", "fit them in a new --out")
            if note:
                print(note, file=sys.stderr)
        used = fusion_flags_given(args)
        refuse(bool(used), f"--resume reads the fusion from {out / FUSED_NAME}: {used} cannot apply")
        if not (out / FUSED_NAME).is_file():
            raise InputError(f"--resume: {out / FUSED_NAME} is missing; run without --resume to fuse again")
        fused, what, fuse_s = FusedTSDF.load(out / FUSED_NAME), f"fused TSDF {out / FUSED_NAME}", 0.0
    else:
        fused, what, fuse_s = fuse_source(args, device, color=train_cfg.color)
    check_fusable(fused)  # before anything is written
    check_levels(fused, grid_cfg)  # cells far finer than the voxel: memory for nothing
    if gt is not None:
        check_gt_frame(gt, fused, args.gt)
    # a folder holding only fused.tsdf is a fit that failed after fusing: it takes the rerun
    only_fusion = out.is_dir() and [p.name for p in out.iterdir()] == [FUSED_NAME]
    out = ensure_fit_dir(out, (FUSED_NAME,) if only_fusion else ("checkpoint", "metrics.json"))
    if not args.resume:
        clear_earlier_fit(out, STALE_OUTPUTS)  # none of it describes the new fit
        fused.save(out / FUSED_NAME)
    baseline = fused.nbytes(color=train_cfg.color)  # what the field holds: geometry, and colour with --color
    on_disk = (out / FUSED_NAME).stat().st_size
    u = fused.units
    print(f"fusion: {what}; {len(fused.tsdf):,} observed voxels of {fused.voxel:.4g} {u}, truncation "
          f"{fused.trunc:.4g} {u}, {baseline / 1e6:,.2f} MB stored (fp16 value + weight"
          + (" + colour" if train_cfg.color and fused.color is not None else "") + " per voxel, block structure)"
          + (f"; {FUSED_NAME} also holds its colour: {on_disk / 1e6:,.2f} MB" if on_disk != baseline else "")
          + (f", in {fuse_s:.1f} s" if fuse_s else ""))
    span = (fused.ijk.max(0) - fused.ijk.min(0) + 1).max()
    if span < MIN_SPAN_VOXELS:
        print(f"WARNING: the fused scene spans only {span} voxels of {fused.voxel:.3g} {u}: too coarse to hold its "
              f"shape, and the model may outweigh the fusion; give a --voxel under {fused.voxel * span / MIN_SPAN_VOXELS:.3g} "
              f"{u}", file=sys.stderr, flush=True)
    cell = finest_cell(fused, grid_cfg.max_level)
    if cell < FINE_CELL_WARNING * fused.voxel:
        print(f"WARNING: the finest level's cells ({cell:.3g} {u}) are finer than half the fused voxel "
              f"({fused.voxel:.3g} {u}): they add bytes, not detail the fusion holds; lower the finest --levels",
              file=sys.stderr, flush=True)
    res = fit_tsdf(fused, grid_cfg, dec_cfg, train_cfg, device, out_dir=out, resume=args.resume, quiet=args.quiet,
                   source=source, deadline=deadline)
    field = res.field
    print(already_complete(res) or
          f"fit: {steps_text(res)} in {seconds_text(res)}, {res.samples_per_second:,.0f} samples/s, final loss {res.final_loss:.3g}")
    report_skipped_steps(res.skipped_steps)
    report_notes(res.notes)
    field.bake(fp16=True)
    total = fileformat.save(field, out / "model.vqad", entropy=True)  # lossless; vqad info shows both sizes
    prefix = fileformat.lod_prefix_sizes(out / "model.vqad")
    print(f"model.vqad: {total:,} bytes; per LOD: " + ", ".join(
        f"L{lv} {n:,} B ({_against(baseline, n)} the fusion)" for lv, n in prefix.items()))
    summary = {
        "source": source, "fusion": {"what": what, "voxel": fused.voxel, "trunc": fused.trunc,
                                                "units": fused.units, "voxels": int(len(fused.tsdf)),
                                                "bytes": baseline, "file_bytes": on_disk, "seconds": fuse_s},
        "grid": asdict(field.grid_cfg), "decoder": asdict(field.decoder_cfg), "train": asdict(res.train_cfg),
        "steps": res.steps, **fit_seconds(res), "refine_seconds": res.refine_seconds,
        "skipped_steps": res.skipped_steps, "peak_memory_bytes": res.peak_memory_bytes, "notes": res.notes,
        "file_bytes": total, "lod_bytes": {str(k): v for k, v in prefix.items()},
        "lod_ratio": {str(k): baseline / v for k, v in prefix.items()}, "history": res.history,
    }
    if not args.no_eval:
        with evaluating(out, res):
            fmesh = fused.mesh()
            if len(fmesh.faces) == 0:  # observed voxels without a sign change between neighbours: no surface
                print("note: the fusion's own mesh is empty (no surface between its observed voxels): the LODs are "
                      "not compared with it", file=sys.stderr)
                fmesh = None
            else:
                save_mesh(fmesh, out / "fusion_mesh.ply")
            if gt is not None and fmesh is not None:
                summary["fusion"]["vs_gt"] = compare(fmesh, {"vs_gt": gt})["vs_gt"]
            summary["lods"] = evaluate_tsdf(field, out, fmesh, gt, deadline=deadline, quiet=args.quiet)
    summary["job_seconds"] = deadline.elapsed()
    write_atomic(out / "metrics.json", json.dumps(summary, indent=2, default=str), "metrics")
    evaluated = "" if args.no_eval else (", fusion_mesh.ply" if (out / "fusion_mesh.ply").exists() else "") + \
        ", mesh_lod*.ply, render_lod*.png"
    print(f"wrote {out}/ (fused.tsdf, checkpoint/, model.vqad, metrics.json{evaluated})")
    return 0
