"""``vqad fit-nerf`` and ``vqad eval``, and :func:`render_nerf` (``vqad render`` of a radiance field)."""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict
import sys
import time
from pathlib import Path

from vqad.errors import InputError
from vqad.app.commands.common import (NERF_EVAL_OUTPUTS, refuse_output_in_model, clear_earlier_fit, ensure_results_dir, evaluating, fit_seconds, run_rate, seconds_text, steps_text, already_complete, fit_output_dir, load_model, path_arg, add_rate_flags, checkpoint_overrides, add_device_arg, add_grid_args, add_run_args, config_flag, config_from, given,
                                      check_resumed_source, fresh_output_dir, grid_config, refuse, report_notes, report_skipped_steps, resumed_configs,
                                      refuse_sweep_sizes_without_sweeps, train_overrides)
from vqad.atomicio import write_atomic
from vqad.fit import Deadline

FORMATS = ["auto", "blender", "ngp", "llff", "rtmv", "colmap", "procedural"]


def _step_ratio(text: str) -> float | None:
    """``--step-ratio``: ``auto`` (None) or a positive number of finest cells."""
    if text == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    from vqad.nerf.field import STEP_RATIO_RANGE

    if not STEP_RATIO_RANGE[0] <= value <= STEP_RATIO_RANGE[1]:
        raise InputError(f"--step-ratio takes 'auto' or a number of finest cells in {STEP_RATIO_RANGE[0]:g}.."
                         f"{STEP_RATIO_RANGE[1]:g}, got {text!r}")
    return value


NERF_TRAIN_FLAGS = ("steps", "rate_weight", "rate_context", "batch_rays", "lr", "grid_lr_scale", "lr_floor", "logit_lr_scale", "codebook_lr_scale", "max_minutes",
                    "octree", "octree_from", "dilate", "density_steps", "density_minutes", "lod_mode", "coarse_weight",
                    "early_stop_eps", "distortion_weight", "depth_weight", "depth_from", "refine", "refine_rays", "recode",
                    "mlp_precision", "appearance", "seed")
INDEX_FLAGS = {"recode": "--no-recode", "rate_weight": "--rate-weight", "rate_context": "--rate-context", "refine": "--refine", "refine_rays": "--refine-rays", "logit_lr_scale": "--logit-lr-scale",
               "codebook_lr_scale": "--codebook-lr-scale"}
OCTREE_FLAGS = {"octree": "--octree", "octree_from": "--octree-from", "dilate": "--dilate",
                "density_steps": "--density-steps", "density_minutes": "--density-minutes"}


def register(sub) -> None:
    from vqad.nerf.fit import NERF_DECODER, NERF_FIELD, NERF_GRID
    from vqad.device import MLP_PRECISIONS
    from vqad.nerf.appearance import APPEARANCES
    from vqad.nerf.task import DEPTH_SOURCES, DEPTH_WEIGHT_CONTRACTED, LOD_MODES, OCTREE_CHOICES, NeRFTrainConfig

    p = sub.add_parser("fit-nerf", help="fit a VQ-AD (or dense) radiance field to posed images",
                       description="Fit a VQ-AD (or dense, hash) radiance field to posed images, every LOD jointly. "
                                   "A default run's 3000 steps take about 3 to 5 minutes on a 2-core laptop CPU at "
                                   "4,096 rays per step (lego at 200x200: 15,000 steps in 12.8 minutes with the fused CPU "
                                   "kernels, docs/benchmarks/nerf.md; a room-sized capture 2-3x longer per step), plus "
                                   "the octree pass and the evaluation; --minutes caps the whole job.")
    p.add_argument("dataset", help="dataset directory, or 'procedural' for the built-in scene")
    p.add_argument("--format", choices=FORMATS, default="auto", help="dataset layout (auto: detect)")
    p.add_argument("--downscale", type=int, default=1, help="shrink images by this integer factor")
    p.add_argument("--background", default="white", help="white, black or R,G,B in [0, 1] (images with alpha)")
    add_grid_args(p, NERF_GRID)
    T = NeRFTrainConfig
    config_flag(p, T, "steps", help="training steps of the field (the octree is built first, bounded by "
                                    "--density-steps / --density-minutes when it needs a density pass)")
    config_flag(p, T, "batch_rays", help="rays per step")
    config_flag(p, T, "max_minutes", flag="--minutes", type=float,
                help="cap the whole job at this many minutes: the density pass takes at most a quarter, training "
                     "at least 60%% of the rest (the lr schedule follows time too), sweeps after it are shortened or "
                     "skipped to fit, the evaluation has 10%%")
    config_flag(p, T, "octree", choices=list(OCTREE_CHOICES), type=str,
                help="how to find occupied space (auto: depth > masks > sparse SfM points > coarse density pass)")
    config_flag(p, T, "octree_from", metavar="CKPT_OR_FILE", type=str,
                help="reuse the octree of an earlier fit of the same capture (replaces --octree: no density pass)")
    config_flag(p, T, "dilate", help="octree margin in finest cells")
    config_flag(p, T, "density_steps", help="steps of the coarse density pass (--octree density)")
    config_flag(p, T, "density_minutes", type=float, help="time cap of the coarse density pass in minutes")
    config_flag(p, T, "lod_mode", choices=list(LOD_MODES), type=str, help="LODs rendered per training step")
    config_flag(p, T, "coarse_weight", help="weight of the coarser LODs' loss against the finest's (0 < w <= 1)")
    config_flag(p, T, "lr", type=float, help="decoder learning rate")
    config_flag(p, T, "grid_lr_scale", help="grid lr = lr × this")
    config_flag(p, T, "lr_floor", type=float, help="every learning rate decays on a cosine to this share of its initial "
                                                   "value (none: 0.01 for codebook grids, 0.1 for others)")
    config_flag(p, T, "logit_lr_scale", type=float, help="codebook logits C lr = lr × this (none or 0: same as the grid; codebook only)")
    add_rate_flags(p, T)
    config_flag(p, T, "codebook_lr_scale", type=float,
                help="codebooks D lr = lr × this (none or 0: same as the grid; faster rates speed up early training "
                     "but can kill every density, see docs/benchmarks/nerf.md; codebook only)")
    config_flag(p, T, "early_stop_eps", type=float, metavar="EPS",
                help="training skips samples behind transmittance below this (early ray termination; 0: off; "
                     "not given: 1e-4 in a contracted scene (ngp aabb_scale > 1, COLMAP bounds; on a room 1.28x faster "
                     "late steps, -0.07 to +0.23 dB), 0 elsewhere: on lego and fern its density-only pre-pass "
                     "cost more than it saved)")
    config_flag(p, T, "distortion_weight", help="λ of mip-NeRF 360's distortion loss (penalises weight spread along "
                                                 "a ray: fog, floaters; 0: off)")
    config_flag(p, T, "depth_weight", type=float, metavar="LAMBDA",
                help="λ of the depth loss: each training ray with a depth target keeps its weights near it "
                     f"(docs/method.md §6.2; 0: off; not given: {DEPTH_WEIGHT_CONTRACTED:g} in a contracted scene (ngp "
                     "aabb_scale > 1, COLMAP bounds) whose capture has sparse points, which then give targets outside "
                     "the central box; on a room +1.5 dB dense; 0 elsewhere: on the object alone every point a target "
                     "cost 2 dB)")
    config_flag(p, T, "depth_from", choices=list(DEPTH_SOURCES), type=str,
                help="the depth loss's targets: points (the capture's sparse points, nearest visible one per pixel), "
                     "capture (its depth maps), auto (depth maps where it has them, else points)")
    config_flag(p, T, "refine", help="Gauss–Newton index refinement sweeps after training (codebook only; 0: they "
                                     "did not raise test PSNR, see docs/benchmarks/nerf.md)")
    config_flag(p, T, "refine_rays", help="training rays each refinement sweep sees (codebook only)")
    p.add_argument("--no-recode", dest="recode", action="store_const", const=False, default=None,
                   help="keep the indices of the vertices no render reaches (by default they get their level's most "
                        "common codeword after training: the same renders, a smaller file; docs/method.md §8.2; "
                        "codebook only)")
    config_flag(p, T, "mlp_precision", choices=list(MLP_PRECISIONS), type=str,
                help="number format of the decoders' matrix products while training (bf16: autocast, for CPUs with "
                     "AMX tiles and recent GPUs; weights, grid and renders stay fp32; on a 2-core AMX CPU 1.18-1.28x "
                     "faster steps on a room-sized capture, 7%% slower on lego: docs/benchmarks/nerf.md)")
    config_flag(p, T, "appearance", choices=list(APPEARANCES), type=str,
                help="affine: learn each training photo's exposure and white balance (a gain and an offset per "
                     "colour channel) beside the field, for captures whose camera metered every photo anew (phones); "
                     "the field, its file and every render keep the photos' average appearance (docs/method.md §8.5); "
                     "none: the photos agree")
    config_flag(p, NERF_DECODER, "hidden", help="density MLP width")
    config_flag(p, NERF_FIELD, "color_hidden", help="colour MLP width")
    p.add_argument("--step-ratio", default=None, metavar="auto|S",
                   help="ray-marching step, in finest cells (default auto: whole cells that keep the octree near "
                        "20 samples per ray; 1 on thin octrees from masks or depth)")
    dec = p.add_mutually_exclusive_group()  # default (neither): auto, vqad.nerf.fit.auto_per_lod
    dec.add_argument("--per-lod-decoder", dest="per_lod", action="store_const", const=True, default=None,
                     help="one pair of MLPs per LOD (default auto: per LOD for a codebook grid in a contracted "
                          "scene, ngp aabb_scale > 1 or COLMAP bounds, where shared ones stall; shared otherwise)")
    dec.add_argument("--shared-decoder", dest="per_lod", action="store_const", const=False,
                     help="one pair of MLPs shared by every LOD (smaller file; see --per-lod-decoder)")
    add_run_args(p, T, "checkpoint, metrics, renders")
    p.add_argument("--eval-views", default=None, help="held-out split to evaluate (test, val, ...; default: test)")
    p.add_argument("--eval-max-views", type=int, default=None, help="evaluate only the first N held-out views")
    p.add_argument("--no-eval", action="store_true", help="skip the per-LOD evaluation and renders")
    p.set_defaults(func=cmd_fit_nerf, oom_hint="lower --levels' finest level, --dilate, --batch-rays or the images' size (--downscale)")

    p = sub.add_parser("eval", help="PSNR / SSIM per LOD of a radiance field on held-out views")
    p.add_argument("model", help="checkpoint directory or .vqad file")
    p.add_argument("--views", default="test",
                   help="dataset split to evaluate (train: a checkpoint fitted with --appearance scores each training "
                        "photo through its learned exposure; a .vqad file holds only the photos' average appearance)")
    p.add_argument("--lod", type=int, default=None,
                   help="one LOD of the whole model (default: every LOD); with --bytes, of that prefix")
    p.add_argument("--max-views", type=int, default=None, help="only the first N views")
    p.add_argument("--dataset", default=None, help="dataset path (default: the one stored with the model)")
    p.add_argument("--bytes", type=int, default=None, help=".vqad only: use just the first N bytes")
    p.add_argument("-o", "--out", type=path_arg, default=None, help="also write renders and metrics.json here")
    p.add_argument("--match-exposure", action="store_true",
                   help="also score each render after fitting its photo's exposure and white balance (a gain and an "
                        "offset per channel, least squares): for captures whose camera metered every photo anew "
                        "(on by default for held-out views of a checkpoint fitted with --appearance)")
    add_device_arg(p)
    p.set_defaults(func=cmd_eval, oom_hint="lower --max-views or the images' size (the fit's --downscale)")

    from vqad.nerf.scene_capture import FISHEYE_K, FOV_Y_DEG, LENSES, MAX_TRANSIENTS, SceneCaptureConfig

    S = SceneCaptureConfig()
    p = sub.add_parser("synth-capture", help="write a generated instant-ngp capture: an object inside a textured room",
                       description="Render the procedural object on a checkered ground inside a textured dome "
                                   "(several times the object's size), seen from a ring of cameras, and write it as an "
                                   "instant-ngp capture (transforms.json + images/). --no-background writes the same "
                                   "cameras and the object alone (RGBA, alpha = its mask), the comparison target. "
                                   "It also writes sparse_pc.ply (ply_file_path): simulated structure-from-motion "
                                   "points, for --octree points. 50 views at 135x240 take a few seconds.")
    p.add_argument("-o", "--out", type=path_arg, required=True, help="new (or empty) output folder")
    p.add_argument("--aabb-scale", type=int, default=S.aabb_scale,
                   help=f"instant-ngp's aabb_scale written to transforms.json (default: {S.aabb_scale})")
    p.add_argument("--size", default=f"{S.width}x{S.height}", metavar="WxH",
                   help=f"image size in pixels (default: {S.width}x{S.height})")
    p.add_argument("--views", type=int, default=S.views, help=f"cameras on the ring (default: {S.views})")
    p.add_argument("--no-background", action="store_true", help="the object alone (RGBA), no ground and no dome")
    p.add_argument("--points", type=int, default=S.points,
                   help=f"simulated structure-from-motion points in sparse_pc.ply (0: none; default: {S.points:,})")
    p.add_argument("--supersample", type=int, default=S.supersample, metavar="N",
                   help=f"each pixel averages N x N rays over its area, as a camera's pixel integrates light "
                        f"(1: the pixel centre alone, aliased edges; default: {S.supersample})")
    p.add_argument("--lens", choices=LENSES, default=S.lens,
                   help=f"the cameras' lens: a pinhole, or OpenCV's equidistant fisheye (k1..k4 = "
                        f"{', '.join(f'{k:g}' for k in FISHEYE_K)}; is_fisheye in transforms.json) (default: {S.lens})")
    p.add_argument("--depth", action="store_true",
                   help="also write each view's z-depth as a phone's depth sensor gives it (depth/NNNN.png, 16-bit "
                        "millimetres, depth_file_path in transforms.json, nerfstudio's layout): --octree auto then "
                        "builds the octree from depth")
    p.add_argument("--transients", type=int, default=S.transients, metavar="N",
                   help="paint N passers-by into each training view (not the held-out every 8th) and write loss masks "
                        "that leave them out (masks/NNNN.png, nerfstudio's mask_path), as a phone capture of a public "
                        f"place needs (0..{MAX_TRANSIENTS}; default: {S.transients})")
    p.add_argument("--exposure", type=float, default=S.exposure, metavar="STOPS",
                   help="meter every training photo anew, as a phone does: its exposure varies by this many stops "
                        "(standard deviation) and its white balance by half that per channel, clipped at white; the "
                        "held-out photos (every 8th) show the training photos' average (0..2; default: "
                        f"{S.exposure:g}; fit with --appearance affine)")
    p.add_argument("--fov", type=float, default=None, metavar="DEG",
                   help="field of view across the image's height, degrees (default: "
                        + ", ".join(f"{v:g} with --lens {k}" for k, v in FOV_Y_DEG.items()) + ")")
    p.set_defaults(func=cmd_synth_capture)


def cmd_synth_capture(args) -> int:
    from vqad.app.commands.rgbd import parse_size
    from vqad.nerf.scene_capture import SceneCaptureConfig, write_capture

    width, height = parse_size(args.size)
    cfg = SceneCaptureConfig(width=width, height=height, views=args.views, aabb_scale=args.aabb_scale, points=args.points,
                             supersample=args.supersample, lens=args.lens, fov_y_deg=args.fov, transients=args.transients,
                             exposure=args.exposure)
    cfg.validate()
    out = Path(args.out)
    interrupted = out.is_dir() and (out / "images").is_dir() and not (out / "transforms.json").exists()
    hint = (" (it looks like a killed capture, images without transforms.json: delete it and run again)"
            if interrupted else "")
    with fresh_output_dir(out, "capture", hint):  # a failed or interrupted run leaves nothing behind
        rays = cfg.views * width * height * cfg.supersample ** 2
        if rays > 50_000_000:  # ~1.4M rays/s on one core of a laptop: say what is coming
            minutes = max(1, round(rays / 1.4e6 / 60))
            print(f"rendering {rays:,} rays ({cfg.views} views × {width}x{height} px × {cfg.supersample}² rays a pixel): "
                  f"about {minutes} minute{'s' if minutes > 1 else ''} on one core", flush=True)
        path = write_capture(out, cfg, background=not args.no_background, on_view=_view_progress(PROGRESS_SECONDS),
                             depth=args.depth)
    print(f"wrote {path} ({cfg.views} views, {width}x{height}, aabb_scale {cfg.aabb_scale}, "
          f"{'object alone' if args.no_background else 'object in a textured room'}, {cfg.points:,} sparse points, "
          f"{cfg.supersample}x{cfg.supersample} rays a pixel, {cfg.lens} lens, {cfg.fov_y_deg:g}° tall"
          f"{', depth maps' if args.depth else ''}"
          f"{f', {cfg.transients} passers-by a training view with loss masks' if cfg.transients else ''}"
          f"{f', exposure varying by {cfg.exposure:g} stops' if cfg.exposure else ''})")
    # masks mark no room (the depth maps do: their octree is the default then)
    hint = " --octree density" if args.no_background and cfg.aabb_scale > 1 and not args.depth else ""
    print(f"next: vqad fit-nerf {shlex.quote(str(out))} --format ngp{hint}")
    return 0


PROGRESS_SECONDS = 5.0  # a long job says where it is at most this often


def _view_progress(every: float):
    """``on_view(done, total)`` that prints the views written, the time so far and an estimate of the
    rest, at most once every ``every`` seconds (a short capture prints nothing)."""
    start = last = time.perf_counter()

    def on_view(done: int, total: int) -> None:
        nonlocal last
        now = time.perf_counter()
        if now - last < every or done == total:
            return
        last = now
        left = (now - start) / done * (total - done)
        print(f"  {done}/{total} views in {now - start:.0f} s, about {left:.0f} s left", flush=True)

    return on_view


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


def _configs(args, saved: dict | None = None):
    """Grid, decoder, field and training configs: the radiance-field defaults (or, with ``saved``, a
    resumed checkpoint's settings) overridden by the flags given; a flag that cannot apply is refused."""
    from dataclasses import replace

    from vqad.config import DecoderConfig, GridConfig
    from vqad.nerf.data import check_downscale
    from vqad.nerf.fit import NERF_DECODER, NERF_FIELD, NERF_GRID
    from vqad.nerf.field import NeRFConfig
    from vqad.nerf.task import NeRFTrainConfig

    grid = grid_config(args, config_from(GridConfig, saved and saved["grid"], NERF_GRID))
    check_downscale(args.downscale)  # (before anything is read: batch checks a whole job this way)
    over = train_overrides(args, NERF_TRAIN_FLAGS, INDEX_FLAGS, grid.storage)
    over.update(checkpoint_overrides(args))
    refuse(args.octree_from is not None and any(getattr(args, n) is not None for n in OCTREE_FLAGS if n != "octree_from"),
           "--octree-from reuses an earlier fit's octree: --octree, --dilate and --density-* cannot apply with it")
    refuse(args.octree is not None and args.octree in ("depth", "mask")
           and (args.density_steps is not None or args.density_minutes is not None),
           f"--density-steps / --density-minutes bound the density pass, which --octree {args.octree} does not run")
    if saved is not None:
        for name, flag in {**OCTREE_FLAGS, "step_ratio": "--step-ratio", "color_hidden": "--color-hidden"}.items():
            refuse(getattr(args, name) is not None,
                   f"--resume keeps the checkpoint's octree and field: {flag} cannot apply (start a new fit to change it)")
    dec_over = given(args, ("hidden", "per_lod"))
    dec = replace(config_from(DecoderConfig, saved and saved["decoder"], NERF_DECODER), **dec_over)
    refuse(dec.hidden <= 0 or (args.color_hidden is not None and args.color_hidden <= 0),
           "--hidden and --color-hidden must be positive")
    nerf = config_from(NeRFConfig, saved and saved.get("nerf", {}), NERF_FIELD)
    if args.color_hidden is not None:
        nerf = replace(nerf, color_hidden=args.color_hidden)
    if args.step_ratio is not None:
        nerf = replace(nerf, step_ratio=_step_ratio(args.step_ratio))
    nerf.validate()
    dec.validate()
    train = config_from(NeRFTrainConfig, saved and saved.get("train"), NeRFTrainConfig())
    if saved is not None:  # the checkpoint's own settings first: a value the user did not give is not their flag's fault
        try:
            train.validate()
        except InputError as exc:
            raise InputError(f"--resume: the checkpoint's training settings are not valid ({exc}): it is damaged, or "
                             f"from another vqad version; start a new fit") from None
    train = replace(train, **over)
    train.validate()
    refuse_sweep_sizes_without_sweeps(args, train, {"refine_rays": "--refine-rays"}, resumed=saved is not None)
    refuse(args.depth_from is not None and train.depth_weight == 0,
           "--depth-from picks the depth loss's targets: it applies with --depth-weight > 0")
    refuse(args.coarse_weight is not None and (train.lod_mode == "finest" or grid.base_level == grid.max_level),
           "--coarse-weight weighs the coarser LODs' loss: it cannot apply when only the finest LOD trains "
           "(--lod-mode finest, or a single level)")
    single = grid.base_level == grid.max_level
    refuse(single and args.per_lod is True, "--per-lod-decoder gives each LOD its own MLPs: with a single level "
                                            "(--levels L:L) there is one LOD; leave it out")
    refuse(single and args.lod_mode is not None, "--lod-mode picks which LODs a step trains: with a single level "
                                                 "(--levels L:L) there is one LOD; leave it out")
    if args.eval_max_views is not None and args.eval_max_views <= 0:
        raise InputError("--eval-max-views must be positive")
    return grid, dec, nerf, train


def load_nerf_dataset(source: str, fmt: str, downscale: int, background):
    from vqad.nerf.formats import load_dataset

    return load_dataset(source, format=fmt, downscale=downscale, background=background)


def fit_nerf_configs(args, saved: dict | None = None):
    """Every ``fit-nerf`` flag of ``args`` checked, before anything touches the disk (``args.eval_views``
    gets its default): the grid, decoder, field and training configs and the background colour.
    ``vqad batch`` checks each asset with it."""
    refuse(args.no_eval and (args.eval_views is not None or args.eval_max_views is not None),
           "--eval-views and --eval-max-views set the evaluation: they cannot apply with --no-eval")
    args.eval_views = args.eval_views or "test"
    grid_cfg, dec_cfg, nerf_cfg, train_cfg = _configs(args, saved)
    return grid_cfg, dec_cfg, nerf_cfg, train_cfg, parse_background(args.background)


def check_nerf_dataset(args, dataset, train_cfg, resumed: bool) -> None:
    """The checks of ``fit-nerf``'s flags that need the capture itself: density-pass bounds when its
    octree comes from depth or masks, and the evaluation split."""
    from vqad.nerf.data import require_training_pixels
    from vqad.nerf.evaluate import require_scorable

    require_training_pixels(dataset.splits["train"])  # before the octree: the masks emptied the depth maps too
    if train_cfg.appearance != "none":
        from vqad.nerf.appearance import require_views_to_learn

        require_views_to_learn(dataset.splits["train"])
    if not resumed and train_cfg.octree_from is None:
        from vqad.nerf.octree_build import resolve_method

        method = resolve_method(dataset, train_cfg.octree)
        refuse(method != "density" and (args.density_steps is not None or args.density_minutes is not None),
               f"--density-steps / --density-minutes bound the density pass, but this capture's octree comes from "
               f"its {method} maps (--octree {train_cfg.octree})")
    if not resumed:
        from vqad.nerf.fit import resolve_depth_weight

        weight = resolve_depth_weight(train_cfg, dataset).depth_weight  # fails now on a capture without the targets
        refuse(args.depth_from is not None and weight == 0,
               "--depth-from picks the depth loss's targets, which is off here (auto: on in a contracted scene, with "
               "its sparse points' targets); give --depth-weight to turn it on")
    if not args.no_eval:  # fail now, not after the fit
        require_scorable(dataset, args.eval_views, args.eval_max_views,
                         fix="evaluate other views (--eval-views, --eval-max-views), check the masks, or give --no-eval")


def check_resumed_nerf(saved: dict, dataset) -> None:
    """A resumed fit continues on the images it was trained on: the same capture, read the same way (format,
    --downscale, --background). (Its --steps is checked with the rest of its settings: vqad.fit.check_resumed_fit.)"""
    from vqad.nerf.data import capture_changes, dataset_info

    was, now = saved.get("dataset") or {}, dataset_info(dataset)
    hint = "fit it in a new --out (--octree-from CHECKPOINT reuses this fit's octree)"
    if was.get("format") not in (None, "procedural") and now["format"] != "procedural":
        note = check_resumed_source(was.get("source"), now["source"], "the capture", hint)
        if note:
            print(note, file=sys.stderr)
    for key, flag in (("format", "--format"), ("downscale", "--downscale"), ("background", "--background")):
        if key in was and was[key] != now[key]:
            raise InputError(f"--resume: this fit was trained on {was.get('name', 'its capture')!r} with {key} {was[key]}, "
                             f"not {now[key]} ({flag}); {hint}")
    changed = capture_changes(was, dataset)  # the same path, other images (regenerated, replaced)
    outer = (saved.get("nerf") or {}).get("outer_scale")
    if isinstance(outer, (int, float)) and not isinstance(outer, bool) and abs(outer - dataset.outer_scale) > 1e-6:
        changed.append(f"a scene box {outer:g} times the central one then, {dataset.outer_scale:g} now")
    if changed:
        raise InputError(f"--resume: {now['source'] or now['name']} is not the capture this fit was trained on "
                         f"({'; '.join(changed)}); {hint}")


def fit_nerf_summary(res) -> dict:
    """The ``metrics.json`` record of a finished radiance-field fit (:class:`~vqad.nerf.fit.NeRFFitResult`):
    the configuration that ran, steps, timings and sizes (the per-LOD metrics are added by the caller)."""
    field = res.field
    return {
        "dataset": field.dataset, "grid": asdict(field.grid_cfg), "decoder": asdict(field.decoder_cfg),
        "nerf": asdict(field.nerf_cfg), "train": asdict(res.train_cfg),
        "steps": res.steps, **fit_seconds(res),
        "octree_method": res.octree_method, "octree_seconds": res.octree_seconds,
        "rays_per_second": run_rate(res, res.rays_per_second), "samples_per_ray": run_rate(res, res.samples_per_ray),
        "refine_seconds": res.refine_seconds, "skipped_steps": res.skipped_steps, "peak_memory_bytes": res.peak_memory_bytes, "size": field.size_report(), "notes": res.notes,
        "recode": asdict(res.recode) if res.recode is not None else None, "history": res.history,
        **({"appearance": res.appearance.summary()} if res.appearance is not None else {}),
    }


def cmd_fit_nerf(args) -> int:
    from vqad.device import native_bf16_matmul, resolve_device
    from vqad.nerf.appearance import appearance_scoring
    from vqad.nerf.evaluate import evaluate_nerf, metric_lines
    from vqad.nerf.fit import fit_nerf
    from vqad.nerf.data import mask_summary
    from vqad.nerf.lens import lens_summary

    out = Path(args.out)
    saved = resumed_configs(out, "nerf") if args.resume else None
    # validate everything before touching the disk
    grid_cfg, dec_cfg, nerf_cfg, train_cfg, background = fit_nerf_configs(args, saved)
    deadline = Deadline.for_job(train_cfg.max_minutes, evaluation=not args.no_eval)  # --minutes caps the whole job
    device = resolve_device(args.device)
    if train_cfg.mlp_precision == "bf16" and not native_bf16_matmul(device):
        print(f"note: --mlp-precision bf16 on a device without bf16 matrix units ({device}): the products are "
              "emulated, slower than fp32", file=sys.stderr, flush=True)
    dataset = load_nerf_dataset(args.dataset, args.format, args.downscale, background)
    check_nerf_dataset(args, dataset, train_cfg, resumed=saved is not None)
    if saved is not None:
        check_resumed_nerf(saved, dataset)
    with fit_output_dir(out) as out:
        if saved is None:  # a new fit must not leave an old result that looks complete; a resumed one keeps its
            clear_earlier_fit(out, NERF_EVAL_OUTPUTS)  # last result and renders until the new ones replace them
        print(f"dataset {dataset.name!r} ({dataset.format}): " + ", ".join(f"{k} {len(v)} views" for k, v in dataset.splits.items())
              + f", {dataset.splits['train'].hw[1]}x{dataset.splits['train'].hw[0]} px" + lens_summary(dataset.splits["train"])
              + mask_summary(dataset.splits["train"]))
        res = fit_nerf(dataset, grid_cfg, dec_cfg, train_cfg, device, out_dir=out, resume=args.resume, quiet=args.quiet,
                       nerf_cfg=nerf_cfg, deadline=deadline)
    field = res.field
    print(already_complete(res) or
          (f"octree from the checkpoint ({res.octree_method}); " if args.resume else
           f"octree from {res.octree_method} in {res.octree_seconds:.1f} s; ")
          + f"fit: {steps_text(res)} in {seconds_text(res)}, "
          f"{res.rays_per_second:,.0f} rays/s, {res.samples_per_ray:.1f} samples/ray, MLPs in {res.train_cfg.mlp_precision}, "
          f"final PSNR (batch) {res.final_psnr:.2f} dB")
    report_skipped_steps(res.skipped_steps)
    report_notes(res.notes)
    for line in field.size_lines():
        print(line)
    summary = fit_nerf_summary(res)
    if not args.no_eval:
        t0 = time.perf_counter()
        with evaluating(out, res):
            lods = evaluate_nerf(field, dataset, args.eval_views, out_dir=out, max_views=args.eval_max_views,
                                 sampler=res.sampler, quiet=args.quiet, deadline=deadline,
                                 **appearance_scoring(res.appearance is not None, args.eval_views, res.appearance))
        summary["eval_views"] = args.eval_views
        summary["lods"] = lods
        source = dataset.split_sources.get(args.eval_views, "")
        print(f"evaluation on {args.eval_views!r}" + (f" ({source})" if ": test = val" in source else "")
              + (" as their photos were exposed (the learned per-view appearance)"
                                                       if args.eval_views == "train" and res.appearance is not None else "")
              + f" in {time.perf_counter() - t0:.0f} s (LPIPS needs network weights: not computed)")
        for line in metric_lines(lods):
            print(line)
    summary["job_seconds"] = deadline.elapsed()
    write_atomic(out / "metrics.json", json.dumps(summary, indent=2, default=str), "metrics")
    print(f"wrote {out}/ (checkpoint/, metrics.json{'' if args.no_eval else f', {args.eval_views}_lod*/'})")
    return 0


def load_radiance_model(args):
    """The radiance field ``eval`` scores: LOD L of the whole model, or of the ``--bytes`` prefix (:func:`load_model`)."""
    field = load_model(args, whole=True)
    if field.kind != "nerf":
        fit = {"sdf": "fit-sdf reports an SDF's metrics", "tsdf": "fit-tsdf reports a TSDF's metrics"}.get(field.kind, "")
        raise InputError(f"this is a {field.kind!r} model; vqad eval measures radiance fields" + (f" ({fit})" if fit else ""))
    return field


def _lods(field, lod):
    if lod is None:
        return field.lods
    return [field.check_lod(lod)]


def cmd_eval(args) -> int:
    from vqad.nerf.appearance import checkpoint_scoring
    from vqad.nerf.evaluate import clear_other_lods, evaluate_nerf, load_scene, metric_lines, require_scorable

    if args.max_views is not None and args.max_views <= 0:
        raise InputError("--max-views must be positive")
    field = load_radiance_model(args)
    lods = _lods(field, args.lod)
    dataset = load_scene(field.dataset, args.dataset)
    require_scorable(dataset, args.views, args.max_views, fix="score other views (--views, --max-views), or check "
                                                              "the masks (vqad render renders them)")
    if args.out:
        refuse_output_in_model(args.model, args.out, "-o")
    out = ensure_results_dir(args.out, "--out") if args.out else None
    scoring = checkpoint_scoring(args.model, args.views, dataset.splits.get("train"))
    if args.match_exposure:
        scoring["match_exposure"] = True
    if out is not None:  # an earlier run's metrics.json, and renders of LODs this run leaves out: not beside its own
        if (out / "metrics.json").is_file() or (out / "metrics.json").is_symlink():
            (out / "metrics.json").unlink()
        clear_other_lods(out, dataset, args.views, lods)
    res = evaluate_nerf(field, dataset, args.views, lods=lods, out_dir=out, max_views=args.max_views, **scoring)
    print(f"{args.views!r} views of {dataset.name!r}" + (" as their photos were exposed (the checkpoint's per-view "
                                                           "appearance)" if scoring.get("appearance") else "")
          + " (LPIPS needs network weights: not computed)")
    for line in metric_lines(res):
        print(line)
    if out is not None:
        write_atomic(out / "metrics.json", json.dumps({"views": args.views, "lods": res}, indent=2))
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
    from vqad.sdf.render import IMAGE_SUFFIXES

    target = getattr(args, "out", None) or "render_nerf"
    refuse_output_in_model(args.model, target, "-o")
    refuse(Path(target).suffix.lower() in IMAGE_SUFFIXES,
           f"-o {target}: a radiance field's render writes a folder (colour, depth and opacity images per view): "
           "give a folder name")
    out = ensure_results_dir(target)
    res = evaluate_nerf(field, dataset, split, lods=lods, out_dir=out, require_scores=False)
    for lod, r in res.items():
        score = (f"PSNR {r['psnr']:.2f} dB" + (f" over {r['views']} scored" if r["views"] < r["rendered"] else "")
                 if r["psnr"] is not None else "not scored: their loss masks keep no pixel")
        print(f"wrote {out / f'{split}_lod{lod}'}/: {r['rendered']} views ({score})")
    return 0
