"""``vqad fit-nerf`` and ``vqad eval``, and :func:`render_nerf` (``vqad render`` of a radiance field)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from vqad.errors import InputError
from vqad.app.commands.common import add_device_arg, add_grid_args, ensure_writable_dir, grid_config, report_skipped_steps

FORMATS = ["auto", "blender", "ngp", "llff", "rtmv", "procedural"]


def _step_ratio(text: str) -> float | None:
    """``--step-ratio``: ``auto`` (None) or a positive number of finest cells."""
    if text == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise InputError(f"--step-ratio takes 'auto' or a positive number of finest cells, got {text!r}")
    return value


def register(sub) -> None:
    p = sub.add_parser("fit-nerf", help="fit a VQ-AD (or dense) radiance field to posed images")
    p.add_argument("dataset", help="dataset directory, or 'procedural' for the built-in scene")
    p.add_argument("--format", choices=FORMATS, default="auto", help="dataset layout (auto: detect)")
    p.add_argument("--downscale", type=int, default=1, help="shrink images by this integer factor")
    p.add_argument("--background", default="white", help="white, black or R,G,B in [0, 1] (images with alpha)")
    add_grid_args(p, default_features=8)
    p.add_argument("--levels", default="4:7", help="octree levels BASE:MAX (LODs)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-rays", type=int, default=4096, help="rays per step")
    p.add_argument("--minutes", type=float, default=None,
                   help="also stop training after this many minutes (the lr schedule follows time too)")
    p.add_argument("--octree", choices=["auto", "depth", "mask", "density"], default="auto",
                   help="how to find occupied space (auto: depth > masks > coarse density pass)")
    p.add_argument("--octree-from", default=None, metavar="CKPT_OR_FILE",
                   help="reuse the octree of an earlier fit of the same capture (replaces --octree: skips the "
                        "density pass)")
    p.add_argument("--dilate", type=int, default=1, help="octree margin in finest cells")
    p.add_argument("--lod-mode", choices=["all", "random", "finest+random", "finest"], default="finest+random",
                   help="LODs rendered per training step")
    p.add_argument("--coarse-weight", type=float, default=1.0,
                   help="weight of the coarser LODs' loss against the finest's (0 < w <= 1)")
    p.add_argument("--lr", type=float, default=5e-3, help="decoder learning rate")
    p.add_argument("--grid-lr-scale", type=float, default=30.0, help="grid lr = lr × this")
    p.add_argument("--logit-lr-scale", type=float, default=0.0,
                   help="codebook logits C lr = lr × this (0: same as the grid)")
    p.add_argument("--codebook-lr-scale", type=float, default=0.0,
                   help="codebooks D lr = lr × this (0: same as the grid; faster rates speed up early training "
                        "but can kill every density, see docs/benchmarks/nerf.md)")
    p.add_argument("--early-stop-eps", type=float, default=0.0,
                   help="training skips samples behind transmittance below this (early ray termination; default 0: "
                        "off, its density-only pre-pass cost more than it saved on lego and fern on a CPU)")
    p.add_argument("--refine", type=int, default=0,
                   help="Gauss–Newton index refinement sweeps after training (codebook only; default 0: they did "
                        "not raise test PSNR, see docs/benchmarks/nerf.md)")
    p.add_argument("--refine-rays", type=int, default=16384, help="training rays each refinement sweep sees")
    p.add_argument("--hidden", type=int, default=64, help="density MLP width")
    p.add_argument("--color-hidden", type=int, default=64, help="colour MLP width")
    p.add_argument("--step-ratio", default="auto", metavar="auto|S",
                   help="ray-marching step, in finest cells (default auto: whole cells that keep the octree near "
                        "20 samples per ray; 1 on thin octrees from masks or depth)")
    p.add_argument("--per-lod-decoder", action="store_true", help="one pair of MLPs per LOD instead of shared ones")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory (checkpoint, metrics, renders)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--eval-views", default="test", help="held-out split to evaluate (test, val, ...)")
    p.add_argument("--eval-max-views", type=int, default=None, help="evaluate only the first N held-out views")
    p.add_argument("--no-eval", action="store_true", help="skip the per-LOD evaluation and renders")
    p.add_argument("--quiet", action="store_true")
    add_device_arg(p)
    p.set_defaults(func=cmd_fit_nerf)

    p = sub.add_parser("eval", help="PSNR / SSIM per LOD of a radiance field on held-out views")
    p.add_argument("model", help="checkpoint directory or .vqad file")
    p.add_argument("--views", default="test", help="dataset split to evaluate")
    p.add_argument("--lod", type=int, default=None, help="one LOD (default: every LOD)")
    p.add_argument("--max-views", type=int, default=None, help="only the first N views")
    p.add_argument("--dataset", default=None, help="dataset path (default: the one stored with the model)")
    p.add_argument("--bytes", type=int, default=None, help=".vqad only: use just the first N bytes")
    p.add_argument("-o", "--out", default=None, help="also write renders and metrics.json here")
    add_device_arg(p)
    p.set_defaults(func=cmd_eval)


def parse_background(text: str) -> tuple[float, float, float]:
    named = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0)}
    if text in named:
        return named[text]
    try:
        rgb = tuple(float(c) for c in text.split(","))
    except ValueError:
        rgb = ()
    if len(rgb) != 3 or not all(0.0 <= c <= 1.0 for c in rgb):
        raise InputError(f"--background must be white, black or R,G,B in [0, 1], got {text!r}")
    return rgb


def _configs(args):
    from vqad.config import DecoderConfig, parse_levels
    from vqad.nerf.field import NeRFConfig
    from vqad.nerf.fit import NeRFTrainConfig

    base, top = parse_levels(args.levels)
    grid = grid_config(args, base, top)
    if args.downscale < 1:
        raise InputError(f"--downscale must be a positive integer, got {args.downscale}")
    if args.hidden <= 0 or args.color_hidden <= 0:
        raise InputError("--hidden and --color-hidden must be positive")
    dec = DecoderConfig(hidden=args.hidden, layers=1, per_lod=args.per_lod_decoder, position_input=False)
    nerf = NeRFConfig(color_hidden=args.color_hidden, step_ratio=_step_ratio(args.step_ratio))
    nerf.validate()
    train = NeRFTrainConfig(steps=args.steps, batch_rays=args.batch_rays, lr=args.lr, grid_lr_scale=args.grid_lr_scale,
                            logit_lr_scale=args.logit_lr_scale or None,
                            codebook_lr_scale=args.codebook_lr_scale or None, lod_mode=args.lod_mode, coarse_weight=args.coarse_weight, octree=args.octree, dilate=args.dilate, seed=args.seed,
                            max_minutes=args.minutes,
                            refine=args.refine, refine_rays=args.refine_rays,
                            early_stop_eps=args.early_stop_eps, octree_from=args.octree_from)
    train.validate()
    if args.eval_max_views is not None and args.eval_max_views <= 0:
        raise InputError("--eval-max-views must be positive")
    return grid, dec, nerf, train


def load_nerf_dataset(source: str, fmt: str, downscale: int, background):
    from vqad.nerf.formats import load_dataset

    return load_dataset(source, format=fmt, downscale=downscale, background=background)


def cmd_fit_nerf(args) -> int:
    from vqad.device import resolve_device
    from vqad.nerf.evaluate import evaluate_nerf, metric_lines, pick_split
    from vqad.nerf.fit import fit_nerf

    grid_cfg, dec_cfg, nerf_cfg, train_cfg = _configs(args)  # validate everything before touching the disk
    background = parse_background(args.background)
    device = resolve_device(args.device)
    out = Path(args.out)
    if args.resume and not (out / "checkpoint" / "config.json").is_file():
        raise InputError(f"--resume: no checkpoint in {out / 'checkpoint'}; run without --resume first")
    dataset = load_nerf_dataset(args.dataset, args.format, args.downscale, background)
    if not args.no_eval:
        pick_split(dataset, args.eval_views)  # fail now, not after the fit
    out = ensure_writable_dir(out)
    (out / "metrics.json").unlink(missing_ok=True)  # a new fit must not leave an old result that looks complete
    for old in out.glob(f"{args.eval_views}_lod*"):
        if old.is_dir():
            shutil.rmtree(old)
    print(f"dataset {dataset.name!r} ({dataset.format}): " + ", ".join(f"{k} {len(v)} views" for k, v in dataset.splits.items())
          + f", {dataset.splits['train'].hw[1]}x{dataset.splits['train'].hw[0]} px")
    res = fit_nerf(dataset, grid_cfg, dec_cfg, train_cfg, device, out_dir=out, resume=args.resume, quiet=args.quiet,
                   nerf_cfg=nerf_cfg)
    field = res.field
    print(f"octree from {res.octree_method} in {res.octree_seconds:.1f} s; fit: {res.steps} steps in {res.seconds:.1f} s, "
          f"{res.rays_per_second:,.0f} rays/s, {res.samples_per_ray:.1f} samples/ray, final PSNR (batch) {res.final_psnr:.2f} dB")
    report_skipped_steps(res.skipped_steps)
    for line in field.size_lines():
        print(line)
    summary = {
        "dataset": field.dataset, "grid": grid_cfg.__dict__, "nerf": dict(field.nerf_cfg.__dict__),
        "steps": res.steps, "fit_seconds": res.seconds,
        "octree_method": res.octree_method, "octree_seconds": res.octree_seconds,
        "rays_per_second": res.rays_per_second, "samples_per_ray": res.samples_per_ray,
        "refine_seconds": res.refine_seconds, "skipped_steps": res.skipped_steps, "peak_memory_bytes": res.peak_memory_bytes, "size": field.size_report(), "history": res.history,
    }
    if not args.no_eval:
        t0 = time.perf_counter()
        lods = evaluate_nerf(field, dataset, args.eval_views, out_dir=out, max_views=args.eval_max_views,
                             sampler=res.sampler, quiet=args.quiet)
        summary["eval_views"] = args.eval_views
        summary["lods"] = lods
        print(f"evaluation on {args.eval_views!r} in {time.perf_counter() - t0:.0f} s (LPIPS needs network weights: not computed)")
        for line in metric_lines(lods):
            print(line)
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"wrote {out}/ (checkpoint/, metrics.json{'' if args.no_eval else f', {args.eval_views}_lod*/'})")
    return 0


def _load_nerf(args):
    from vqad.api import load
    from vqad.device import resolve_device

    field = load(args.model, device=resolve_device(args.device), lod=args.lod, max_bytes=getattr(args, "bytes", None))
    if field.kind != "nerf":
        raise InputError(f"this is a {field.kind!r} model; vqad eval measures radiance fields (fit-sdf reports SDF metrics)")
    return field


def _lods(field, lod):
    if lod is None:
        return field.lods
    if lod not in field.lods:
        raise InputError(f"LOD {lod} is not available in this model: choose one of {field.lods}")
    return [lod]


def cmd_eval(args) -> int:
    from vqad.nerf.evaluate import evaluate_nerf, load_scene, metric_lines, pick_split

    if args.max_views is not None and args.max_views <= 0:
        raise InputError("--max-views must be positive")
    field = _load_nerf(args)
    lods = _lods(field, args.lod)
    dataset = load_scene(field.dataset, args.dataset)
    pick_split(dataset, args.views)
    out = ensure_writable_dir(args.out) if args.out else None
    res = evaluate_nerf(field, dataset, args.views, lods=lods, out_dir=out, max_views=args.max_views)
    print(f"{args.views!r} views of {dataset.name!r} (LPIPS needs network weights: not computed)")
    for line in metric_lines(res):
        print(line)
    if out is not None:
        (out / "metrics.json").write_text(json.dumps({"views": args.views, "lods": res}, indent=2))
        print(f"wrote {out}/")
    return 0


def render_nerf(field, args) -> int:
    """``vqad render`` for a radiance field: the dataset's ``args.views`` split rendered at
    ``args.lod`` (every LOD when None) into ``args.out`` (default ``render_nerf``) as PNGs
    (colour, depth, opacity per view; see :mod:`vqad.nerf.evaluate`)."""
    from vqad.nerf.evaluate import evaluate_nerf, load_scene, pick_split

    lods = _lods(field, getattr(args, "lod", None))
    dataset = load_scene(field.dataset, getattr(args, "dataset", None))
    split = getattr(args, "views", None) or "test"
    pick_split(dataset, split)
    out = ensure_writable_dir(getattr(args, "out", None) or "render_nerf")
    res = evaluate_nerf(field, dataset, split, lods=lods, out_dir=out)
    for lod, r in res.items():
        print(f"wrote {out / f'{split}_lod{lod}'}/: {r['views']} views (PSNR {r['psnr']:.2f} dB)")
    return 0
