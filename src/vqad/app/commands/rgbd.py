"""``vqad synth-rgbd``: a synthetic RGB-D scan of a mesh (or of the built-in procedural scene),
written in TUM RGB-D or Redwood / Open3D layout for ``vqad fit-tsdf``."""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict
from pathlib import Path

from vqad.app.commands.common import path_arg, fresh_output_dir, refuse
from vqad.errors import InputError

#: the coarsest depth step (metres) a written sequence may store: 1 cm
MAX_DEPTH_STEP = 0.01


def register(sub) -> None:
    from vqad.tsdf import rgbd, synth

    p = sub.add_parser("synth-rgbd", help="render a synthetic RGB-D scan of a mesh or the procedural scene",
                       description="Render a depth-camera scan (depth, colour, ground-truth poses) of a mesh, scaled "
                                   "to --object-size metres, or of the built-in procedural scene, with cameras on a "
                                   "spiral over its upper hemisphere, and write it in TUM RGB-D or Redwood / Open3D "
                                   "layout (plus the ground-truth mesh, gt_mesh.ply). 100 frames at 320x240 take "
                                   "a few seconds. Needs Open3D for meshes (pip install 'vqad[tsdf]').")
    p.add_argument("source", metavar="MESH|procedural", help="mesh file (OBJ, PLY, ...) or 'procedural'")
    p.add_argument("-o", "--out", type=path_arg, required=True, help="new (or empty) output folder")
    p.add_argument("--layout", choices=sorted(synth.LAYOUTS), default="tum",
                   help="on-disk layout (default: tum)")
    p.add_argument("--frames", type=int, default=synth.FRAMES, help=f"number of frames (default: {synth.FRAMES})")
    p.add_argument("--size", default=f"{synth.WIDTH}x{synth.HEIGHT}", metavar="WxH",
                   help=f"image size in pixels (default: {synth.WIDTH}x{synth.HEIGHT}; the PrimeSense camera scaled to it)")
    p.add_argument("--noise", choices=sorted(synth.NOISE_MODELS), default="kinect",
                   help="depth noise: kinect (structured-light model of Nguyen et al. 2012, see "
                        "vqad.tsdf.synth.DepthNoise) or none (exact depth) (default: kinect)")
    p.add_argument("--seed", type=int, default=None, help="noise seed (default: 0; --noise kinect only)")
    p.add_argument("--object-size", type=float, default=None, metavar="METRES",
                   help=f"longest side of the object's bounding box (default: {synth.OBJECT_SIZE} for a mesh, "
                        f"{synth.SCENE_SIZE} for the procedural scene)")
    p.add_argument("--distance", type=float, default=None, metavar="METRES",
                   help="camera distance from the object's centre (default: the object just fills the view)")
    p.add_argument("--depth-scale", type=float, default=None,
                   help=f"depth PNG units per metre (default: {rgbd.TUM_DEPTH_SCALE:g} for tum, "
                        f"{rgbd.REDWOOD_DEPTH_SCALE:g} for redwood)")
    p.set_defaults(func=cmd_synth_rgbd)


def parse_size(text: str) -> tuple[int, int]:
    """``"WxH"`` → ``(W, H)``."""
    try:
        w, h = (int(x) for x in text.lower().replace("×", "x").split("x"))
    except ValueError:
        raise InputError(f"--size takes WxH in pixels (e.g. 320x240), got {text!r}") from None
    return w, h


def cmd_synth_rgbd(args) -> int:
    from vqad.tsdf import synth

    width, height = parse_size(args.size)
    noise = synth.NOISE_MODELS[args.noise]()
    refuse(args.seed is not None and args.noise == "none", "--seed seeds the depth noise: it does not apply to --noise none")
    refuse(args.seed is not None and not 0 <= args.seed < 2 ** 63, f"--seed must be a non-negative integer, got {args.seed}")
    seed = args.seed or 0
    writer = synth.LAYOUTS[args.layout]
    kw = dict(n_frames=args.frames, width=width, height=height, noise=noise, seed=seed, distance=args.distance)
    if args.object_size is not None:
        kw["size"] = args.object_size
    procedural = args.source == "procedural" and not Path(args.source).exists()
    if args.depth_scale is not None and args.depth_scale > 0 and 1.0 / args.depth_scale > MAX_DEPTH_STEP:
        raise InputError(f"--depth-scale {args.depth_scale:g} stores depth in steps of {1.0 / args.depth_scale:g} m: a "
                         f"depth image holds whole units, so give at least {1 / MAX_DEPTH_STEP:g} units per metre "
                         f"(1 cm steps; 1000: millimetres)")
    with fresh_output_dir(args.out, "sequence") as out:  # a failed or interrupted run leaves nothing behind
        if procedural:
            seq, gt = synth.procedural_sequence(**kw), None
        else:
            seq, gt = synth.synth_sequence(args.source, **kw)
        hits = sum(int((seq.depth(i) > 0).sum()) for i in range(len(seq)))
        if hits == 0:
            raise InputError(f"no frame has a depth sample: the scene is beyond what the depth sensor measures (--noise "
                             f"{args.noise}: {noise.min_range:g}..{noise.max_range:g} m), too small to hit or outside the "
                             f"views; set --distance within that range and --object-size to what the views can see, or "
                             f"use --noise none")
        scale = {} if args.depth_scale is None else {"depth_scale": args.depth_scale}
        writer(seq, out, **scale)
        if gt is not None:
            gt.to_trimesh().export(out / "gt_mesh.ply")
        record = {"source": args.source, "layout": args.layout, "frames": len(seq), "width": width, "height": height,
                  "seed": seed, "noise": asdict(noise),
                  "object_size": kw.get("size", synth.SCENE_SIZE if procedural else synth.OBJECT_SIZE),
                  "distance": args.distance}
        (out / "synth.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(f"wrote {out}: {seq.summary()}, {args.layout} layout, {args.noise} depth noise"
          + (", ground-truth mesh gt_mesh.ply" if gt is not None else ""))
    print(f"next: vqad fit-tsdf {shlex.quote(str(out))}")
    return 0
