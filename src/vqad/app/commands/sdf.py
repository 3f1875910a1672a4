"""``vqad fit-sdf``, ``vqad mesh``, ``vqad render`` and ``vqad demo``."""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

from vqad.errors import InputError
from vqad.app.commands.common import (SDF_EVAL_OUTPUTS, refuse_output_in_model, clear_earlier_fit, evaluating, fit_seconds, run_rate, seconds_text, steps_text, already_complete, fit_output_dir, path_arg, add_rate_flags, checkpoint_overrides, add_device_arg, add_grid_args, add_run_args, check_finite, check_image_side, check_resolution,
                                      config_flag, config_from,
                                      ensure_writable_file, given, grid_config, load_model, refuse, train_overrides,
                                      check_resumed_source, report_notes, report_skipped_steps,
                                      refuse_sweep_sizes_without_sweeps, resumed_configs)
from vqad.atomicio import write_atomic
from vqad.fit import Deadline
from vqad.sdf.evaluate import evaluate_sdf
from vqad.sdf.extract import MESH_SUFFIXES
from vqad.sdf.render import IMAGE_SUFFIXES


SDF_TRAIN_FLAGS = ("steps", "rate_weight", "rate_context", "batch", "lr", "grid_lr_scale", "lr_floor", "logit_lr_scale", "codebook_lr_scale", "max_minutes", "truncation", "refine",
                   "refine_samples", "refine_candidates", "seed")
DECODER_FLAGS = ("hidden", "layers", "per_lod")
INDEX_FLAGS = {"rate_weight": "--rate-weight", "rate_context": "--rate-context", "refine": "--refine", "refine_samples": "--refine-samples", "refine_candidates": "--refine-candidates",
                "logit_lr_scale": "--logit-lr-scale", "codebook_lr_scale": "--codebook-lr-scale"}


MC_RESOLUTION = 256
RENDER_SIZE, RENDER_AZIMUTH, RENDER_ELEVATION = 384, 35.0, 20.0
SDF_RENDER_FLAGS = {"size": "--size", "azimuth": "--azimuth", "elevation": "--elevation"}
NERF_RENDER_FLAGS = {"views": "--views", "dataset": "--dataset"}


def register(sub) -> None:
    from vqad.config import DecoderConfig, GridConfig
    from vqad.sdf.fit import SDFTrainConfig

    p = sub.add_parser("fit-sdf", help="fit a VQ-AD (or dense) signed distance field to a mesh",
                       description="Fit a VQ-AD (or dense, hash) signed distance field to a mesh, every LOD jointly, "
                                   "then evaluate each LOD. A default run (4-bit codebook, levels 3:7, 3000 steps, "
                                   "10 index sweeps, evaluation at 256^3) takes 4 to 8 minutes on a 2-core laptop "
                                   "CPU (armadillo: 4 min 15 s, of which 2 min of steps, 1 min 40 s of sweeps, with "
                                   "the fused CPU kernels; a 6-sweep run took about 4.5 min with PyTorch ops only; see "
                                   "docs/benchmarks/speed.md and sdf.md); "
                                   "--minutes caps the whole job.")
    p.add_argument("mesh", help="OBJ / PLY / OFF / STL / GLB triangle mesh")
    add_grid_args(p, GridConfig())
    T = SDFTrainConfig
    config_flag(p, T, "steps", help="training steps")
    config_flag(p, T, "batch", help="points per step")
    config_flag(p, T, "lr", type=float, help="decoder learning rate (none: 5e-3 for grids with discrete indices "
                                             "(codebook), whose argmax needs larger steps to move; 2e-3 otherwise)")
    config_flag(p, T, "grid_lr_scale", help="grid lr = lr × this")
    config_flag(p, T, "lr_floor", type=float, help="every learning rate decays on a cosine to this share of its initial "
                                                   "value (none: 0.01 for codebook grids, 0.1 for others)")
    config_flag(p, T, "logit_lr_scale", help="codebook logits C lr = lr × this (0: same as the grid; codebook only)")
    add_rate_flags(p, T)
    config_flag(p, T, "codebook_lr_scale", type=float, help="codebooks D lr = lr × this (none or 0: same as the grid; "
                                                           "codebook only)")
    config_flag(p, T, "max_minutes", flag="--minutes", type=float,
                help="cap the whole job at this many minutes: training keeps at least 60%% (the lr schedule "
                     "follows time too), sweeps after it are shortened or skipped to fit, the evaluation has 10%%")
    config_flag(p, T, "truncation", help="clamp distances to ±this in the loss, unit-cube units (0: no clamp)")
    config_flag(p, T, "refine", help="Gauss–Newton index refinement sweeps after training (codebook only; 0: off; "
                                     "see docs/benchmarks/sdf.md)")
    config_flag(p, T, "refine_samples", help="samples each refinement sweep sees (codebook only)")
    config_flag(p, T, "refine_candidates", help="codewords per vertex whose real loss change each sweep measures "
                                                "(0: take the Gauss–Newton prediction, faster, a little worse; codebook only)")
    D = DecoderConfig()
    config_flag(p, D, "hidden", help="decoder width")
    config_flag(p, D, "layers", help="decoder hidden layers")
    config_flag(p, D, "per_lod", flag="--per-lod-decoder", action="store_true",
                help="one decoder per LOD instead of a shared one")
    add_run_args(p, T, "checkpoint, metrics, mesh, render")
    p.add_argument("--no-eval", action="store_true", help="skip per-LOD metrics, mesh and render")
    p.add_argument("--mc-resolution", type=int, default=None,
                   help=f"marching-cubes grid for meshes and metrics (default: {MC_RESOLUTION})")
    p.set_defaults(func=cmd_fit_sdf, oom_hint="lower --levels' finest level or --batch")

    p = sub.add_parser("mesh", help="marching-cubes mesh of an SDF model at a LOD")
    p.add_argument("model", help="checkpoint directory or .vqad file")
    p.add_argument("--lod", type=int, default=None, help="level of detail (default: finest available)")
    p.add_argument("--bytes", type=int, default=None, help=".vqad only: use just the first N bytes")
    p.add_argument("--resolution", type=int, default=None,
                   help=f"marching-cubes grid points per axis (8..2048; SDF only; default: {MC_RESOLUTION})")
    p.add_argument("-o", "--out", type=path_arg, default=None, help="output mesh (.ply/.obj/.stl/.off/.glb; default mesh_lodL.ply)")
    add_device_arg(p)
    p.set_defaults(func=cmd_mesh, oom_hint="lower --resolution or --lod")

    p = sub.add_parser("render", help="render a model at a LOD (SDF: sphere tracing; NeRF: dataset views)")
    p.add_argument("model", help="checkpoint directory or .vqad file")
    p.add_argument("--lod", type=int, default=None)
    p.add_argument("--bytes", type=int, default=None, help=".vqad only: use just the first N bytes")
    p.add_argument("-o", "--out", type=path_arg, default=None, help="SDF: output PNG; NeRF: output directory")
    p.add_argument("--size", type=int, default=None, help=f"SDF: image size in pixels (default: {RENDER_SIZE})")
    p.add_argument("--azimuth", type=float, default=None, help=f"SDF: camera azimuth in degrees (default: {RENDER_AZIMUTH})")
    p.add_argument("--elevation", type=float, default=None,
                   help=f"SDF: camera elevation in degrees (default: {RENDER_ELEVATION})")
    p.add_argument("--views", default=None, help="NeRF: dataset split to render (default: test)")
    p.add_argument("--dataset", default=None, help="NeRF: dataset path (default: the one stored with the model)")
    add_device_arg(p)
    p.set_defaults(func=cmd_render, oom_hint="lower --size (SDF) or --lod")

    p = sub.add_parser("demo", help="the built-in demo: fit, compress and render built-in scenes")
    p.add_argument("--out", type=path_arg, default="out/demo",
                   help="folder for the demo's outputs: sdf/ and nerf/ (default: out/demo)")
    p.add_argument("--quick", action="store_true", help="a few steps only (for tests)")
    add_device_arg(p)
    p.set_defaults(func=cmd_demo)


def _configs(args, saved: dict | None = None, train_cls=None, train_flags=SDF_TRAIN_FLAGS):
    """Grid, decoder and training configs: the defaults (or, with ``saved``, a resumed checkpoint's
    settings) overridden by the flags given; a flag that cannot apply is refused. ``train_cls`` /
    ``train_flags``: the training config and its flags (default the SDF's; ``fit-tsdf`` passes its own)."""
    from dataclasses import replace

    from vqad.config import DecoderConfig, GridConfig
    from vqad.sdf.fit import SDFTrainConfig

    train_cls = train_cls or SDFTrainConfig
    grid = grid_config(args, config_from(GridConfig, saved and saved["grid"], GridConfig()))
    over = train_overrides(args, train_flags, INDEX_FLAGS, grid.storage)
    over.update(checkpoint_overrides(args))
    dec = replace(config_from(DecoderConfig, saved and saved["decoder"], DecoderConfig()), **given(args, DECODER_FLAGS))
    train = replace(config_from(train_cls, saved and saved.get("train"), train_cls()), **over)
    if saved is None:
        train = train.resolved(grid)
    train.validate()
    refuse_sweep_sizes_without_sweeps(args, train, {"refine_samples": "--refine-samples",
                                                    "refine_candidates": "--refine-candidates"}, resumed=saved is not None)
    dec.validate()
    refuse(grid.base_level == grid.max_level and getattr(args, "per_lod", None) is True,
           "--per-lod-decoder gives each LOD its own MLP: with a single level (--levels L:L) there is one LOD; leave it out")
    refuse(dec.layers == 0 and getattr(args, "hidden", None) is not None,
           "--hidden is the width of the decoder's hidden layers: with --layers 0 it has none (remove --hidden)")
    candidates = getattr(args, "refine_candidates", None)
    if candidates is not None and grid.storage == "codebook" and train.refine:
        refuse(candidates > 2 ** grid.bits - 1, f"--refine-candidates {candidates}: a {grid.bits}-bit codebook has "
               f"{2 ** grid.bits - 1} codewords besides a vertex's own; give at most that")
    return grid, dec, train


def fit_sdf_configs(args, saved: dict | None = None):
    """Every ``fit-sdf`` flag of ``args`` checked, before anything touches the disk: the grid,
    decoder and training configs (see :func:`_configs`). ``vqad batch`` checks each asset with it."""
    refuse(args.no_eval and args.mc_resolution is not None, "--mc-resolution sets the evaluation's meshes: it cannot apply with --no-eval")
    check_resolution(args.mc_resolution, "--mc-resolution")
    return _configs(args, saved)


def fit_sdf_summary(mesh_path: str, res) -> dict:
    """The ``metrics.json`` record of a finished SDF fit (:class:`~vqad.sdf.fit.FitResult`): the
    configuration that ran, steps, timings and sizes (the per-LOD metrics are added by the caller)."""
    field = res.field
    return {
        "mesh": str(mesh_path), "grid": asdict(field.grid_cfg), "decoder": asdict(field.decoder_cfg),
        "train": asdict(res.train_cfg), "steps": res.steps, **fit_seconds(res),
        "points_per_second": run_rate(res, res.points_per_second), "refine_seconds": res.refine_seconds,
        "skipped_steps": res.skipped_steps,
        "step_points_per_second": run_rate(res, res.steps_done * res.train_cfg.batch / max(res.seconds - res.refine_seconds, 1e-9)),
        "peak_memory_bytes": res.peak_memory_bytes,
        "size": field.size_report(), "notes": res.notes, "history": res.history,
    }


def cmd_fit_sdf(args) -> int:

    from vqad.device import resolve_device
    from vqad.sdf.mesh import load_mesh
    from vqad.sdf.fit import fit_sdf

    out = Path(args.out)
    saved = resumed_configs(out, "sdf") if args.resume else None
    grid_cfg, dec_cfg, train_cfg = fit_sdf_configs(args, saved)  # validate everything before touching the disk
    deadline = Deadline.for_job(train_cfg.max_minutes, evaluation=not args.no_eval)  # --minutes caps the whole job
    device = resolve_device(args.device)
    mesh = load_mesh(args.mesh)
    if saved is not None:
        note = check_resumed_source(saved.get("mesh"), Path(args.mesh).resolve(), "the mesh",
                                    "fit another mesh in a new --out")
        if note:
            print(note, file=sys.stderr)
    with fit_output_dir(out) as out:
        if saved is None:  # a fresh fit must not leave an old result that looks complete; a resumed one keeps its
            clear_earlier_fit(out, SDF_EVAL_OUTPUTS)  # last result (its "steps" say what it describes) until replaced
        res = fit_sdf(mesh, grid_cfg, dec_cfg, train_cfg, device, out_dir=out, resume=args.resume,
                      quiet=args.quiet, mesh_path=str(Path(args.mesh).resolve()), deadline=deadline)
    field = res.field
    print(already_complete(res) or
          f"fit: {steps_text(res)} in {seconds_text(res)}, {res.points_per_second:,.0f} points/s, final loss {res.final_loss:.3g}")
    report_skipped_steps(res.skipped_steps)
    report_notes(res.notes)
    for line in field.size_lines():
        print(line)
    summary = fit_sdf_summary(args.mesh, res)
    if not args.no_eval:
        with evaluating(out, res):
            summary["lods"] = evaluate_sdf(field, mesh, out, args.mc_resolution or MC_RESOLUTION, device,
                                           deadline=deadline)
    summary["job_seconds"] = deadline.elapsed()
    write_atomic(out / "metrics.json", json.dumps(summary, indent=2, default=str), "metrics")
    print(f"wrote {out}/ (checkpoint/, metrics.json{'' if args.no_eval else ', mesh_lod*.ply, render_lod*.png'})")
    return 0


def cmd_mesh(args) -> int:
    from vqad.sdf.extract import extract_mesh, save_mesh

    field = load_model(args)
    if field.kind == "tsdf" and getattr(args, "bytes", None) is None and not Path(args.model).is_dir():
        field = load_model(args, whole=True)  # a TSDF's LOD L is meshed on its finest cells' lattice, as its fit did
    if field.kind not in ("sdf", "tsdf"):
        raise InputError(f"vqad mesh needs an SDF or TSDF model; this one is a {field.kind!r} field (use vqad render)")
    lod = field.check_lod(args.lod)
    check_resolution(args.resolution, "--resolution")
    refuse(field.kind == "tsdf" and args.resolution is not None,
           "--resolution does not apply to a TSDF model: it is meshed on its octree's own lattice, inside observed space")
    out = ensure_writable_file(args.out or f"mesh_lod{lod}.ply", MESH_SUFFIXES, "mesh")
    refuse_output_in_model(args.model, out, "-o")
    if field.kind == "tsdf":
        from vqad.tsdf.extract import extract_tsdf_mesh

        mesh = extract_tsdf_mesh(field, lod)
    else:
        mesh = extract_mesh(field, lod, resolution=args.resolution or MC_RESOLUTION)
    save_mesh(mesh, out)
    print(f"wrote {out}: {len(mesh.vertices):,} vertices, {len(mesh.faces):,} faces (LOD {lod})")
    return 0


def cmd_render(args) -> int:
    field = load_model(args, whole=True)  # a radiance field's LOD L is the whole model's (load_model)
    lod = field.check_lod(args.lod)
    other = NERF_RENDER_FLAGS if field.kind in ("sdf", "tsdf") else SDF_RENDER_FLAGS
    for name, flag in other.items():
        refuse(getattr(args, name) is not None,
               f"{flag} does not apply to a {field.kind!r} model (it sets how a "
               f"{'radiance field' if field.kind != 'nerf' else 'signed distance field'} is rendered)")
    if field.kind == "nerf":
        from vqad.app.commands.nerf import render_nerf

        return render_nerf(field, args)
    from vqad.atomicio import save_image
    from vqad.sdf.render import OrbitCamera, TraceStats, render_sdf

    out = ensure_writable_file(args.out or f"render_lod{lod}.png", IMAGE_SUFFIXES, "image")
    refuse_output_in_model(args.model, out, "-o")
    size = RENDER_SIZE if args.size is None else args.size
    check_finite(args.azimuth, "--azimuth")
    check_finite(args.elevation, "--elevation")
    check_image_side(size, "--size")
    cam = OrbitCamera(azimuth_deg=RENDER_AZIMUTH if args.azimuth is None else args.azimuth,
                      elevation_deg=RENDER_ELEVATION if args.elevation is None else args.elevation, width=size, height=size)
    stats = TraceStats()
    save_image(render_sdf(field, lod, cam, stats=stats), out)
    print(f"wrote {out} (LOD {lod})")
    if stats.hits == 0:  # (vqad mesh refuses such a model: here the image is written, and said to be empty)
        warnings.warn(f"no ray met the surface at LOD {lod}: {out} shows the background only (is the model trained? "
                      "another --azimuth / --elevation?)")
    return 0


def cmd_demo(args) -> int:
    from vqad.app.demo import run_demo
    from vqad.device import resolve_device

    run_demo(Path(args.out), resolve_device(args.device), quick=args.quick)
    return 0
