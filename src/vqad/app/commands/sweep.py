"""``vqad sweep``: a rate–distortion sweep of several storages and rates on one dataset."""

from __future__ import annotations

import argparse

from vqad.app.commands.common import path_arg
from vqad.app.commands.nerf import FORMATS  # the layouts fit-nerf reads, so the sweep reads each of them too

EPILOG = """\
examples:
  vqad sweep armadillo.obj --out runs/rd-armadillo                      # the default method set
  vqad sweep armadillo.obj --methods codebook:4,6 hash:12 kmeans:4 draco-input:10,12 --steps 1000 --out runs/rd
  vqad sweep armadillo.obj --methods codebook:2,4 codebook-norefine:2,4 dense --out runs/rd-refine   # ± refinement
  vqad sweep armadillo.obj --methods codebook:4,6 codebook-rate:6 --rate-weights 1e-7,3e-7,1e-6 --out runs/rd-rate
  vqad sweep data/nerf_synthetic/lego --downscale 4 --eval-views val --eval-max-views 20 --minutes 27 --out runs/rd-lego
  vqad sweep --config sweep.toml                                         # flags given too override the file

Every point is a real file in OUT/points/ measured by its bytes; results go to OUT/results.csv,
OUT/results.md and OUT/rd.png, rebuilt after each point. Run the same command again to resume:
finished points (OUT/points/<point>.json) are skipped and an interrupted fit continues from its
checkpoint. A config file (.json or .toml) holds the same options by their long names (paths
relative to the current directory), e.g.
  dataset = "armadillo.obj"
  out = "runs/rd"
  methods = ["codebook:1,2,4", "hash:12", "kmeans:4", "dense"]
  steps = 2000

Index refinement: on a mesh every codebook fit ends with fit-sdf's default Gauss–Newton sweeps over
its indices (vqad.refine), a step no baseline gets; codebook-norefine:b fits the same VQ-AD grids
without them, as a series of its own (table, CSV, plot), and the CSV's refine column gives each
point's sweeps. Radiance-field fits do not refine by default, so there codebook already is VQ-AD
without refinement.

Rate-aware points: codebook-rate:B1,B2,... fits VQ-AD to loss + λ × index bits (fit-sdf --rate-weight:
the rate term in training, and on a mesh the index-refinement sweeps, which then trade loss for bits
too) at every b given and every λ of --rate-weights (default: a mesh 1e-7,3e-7,1e-6; a radiance field,
not refined, 3e-4,1e-3,3e-3); codebook:b is their λ = 0. The plot draws one series per b; the CSV
gives rate_weight, index_bits and coded_index_bits. Like --methods, the λ values choose points:
resuming with other values adds their points to OUT. A record made when rate-aware points were not
refined is set aside (.stale) and refitted.
"""


def register(sub) -> None:
    from vqad.app.sweep import METHOD_SPEC_HELP
    from vqad.nerf.appearance import APPEARANCES
    from vqad.nerf.task import OCTREE_CHOICES

    S = argparse.SUPPRESS  # options not given stay unset, so a config file can supply them
    p = sub.add_parser(
        "sweep", help="rate–distortion sweep: methods × settings on one dataset (CSV, table, plot)",
        description="Fit one dataset (a mesh: SDF; a capture directory or 'procedural': radiance field) with "
                    "several feature storages at several rates, write every point as a real file and measure "
                    "its bytes and quality. kmeans, lowrank and draco-mc come from the one dense fit. On a mesh, "
                    "codebook (VQ-AD) fits end with index refinement; codebook-norefine shows the same fits without it.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=S,
    )
    p.add_argument("dataset", nargs="?", help="mesh file (.obj/.ply/...), capture directory, or 'procedural'")
    p.add_argument("--config", help="a .json or .toml file of sweep options (long flag names as keys)")
    p.add_argument("--out", type=path_arg, help="output directory (required here or in the config)")
    p.add_argument("--methods", nargs="+", metavar="SPEC", help=METHOD_SPEC_HELP)
    p.add_argument("--levels", help="octree levels BASE:MAX (default 3:7 for meshes, 4:7 for radiance fields)")
    p.add_argument("--features", type=int, help="k: features per vertex (default 16 for meshes, 8 for radiance fields)")
    p.add_argument("--steps", type=int, help="training steps per fit (default 3000)")
    p.add_argument("--minutes", type=float, help="also stop each fit after this many minutes")
    p.add_argument("--batch", type=int, help="points (meshes, default 16384) or rays (default 4096) per step")
    p.add_argument("--hidden", type=int, help="decoder width (default 128 for meshes, 64 for radiance fields)")
    p.add_argument("--seed", type=int, help="seed of every fit and of k-means (default 0)")
    p.add_argument("--no-entropy", dest="entropy", action="store_false",
                   help="write raw .vqad files only (default: also entropy-coded ones, whose size is `bytes`)")
    p.add_argument("--stream-bits", type=int,
                   help="measure each LOD from a prefix of this VQ-AD point's file (default: 4 when codebook:4 is "
                        "swept; 0: none)")
    p.add_argument("--rate-weights", metavar="L1,L2,...",
                   help="λ values of the codebook-rate points, e.g. 3e-4,3e-3 (each b is fitted at each λ; λ > 0; "
                        "default: a mesh 1e-7,3e-7,1e-6, a radiance field 3e-4,1e-3,3e-3; only with codebook-rate in "
                        "--methods)")
    p.add_argument("--rate-context", action="store_true",
                   help="codebook-rate points estimate the rate given the coarser level's index (fit-sdf "
                        "--rate-context; only with codebook-rate in --methods)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    g = p.add_argument_group("meshes")
    g.add_argument("--mc-resolution", type=int, help="marching cubes for the quality metrics (default 256)")
    g.add_argument("--draco-mc-resolution", type=int, help="marching cubes of the dense field for draco-mc (default 128)")
    g.add_argument("--draco-level", type=int, help="Draco compression level 0..10 (default 10)")
    g = p.add_argument_group("radiance fields")
    g.add_argument("--format", choices=FORMATS, help="dataset layout (default auto: detect)")
    g.add_argument("--downscale", type=int, help="shrink images by this integer factor (default 1)")
    g.add_argument("--eval-views", help="held-out split to evaluate (default test)")
    g.add_argument("--eval-max-views", type=int, help="evaluate only the first N held-out views")
    g.add_argument("--background", help="white, black or R,G,B in [0, 1] (default white)")
    g.add_argument("--octree", choices=list(OCTREE_CHOICES), help="occupied space from (default auto)")
    g.add_argument("--appearance", choices=list(APPEARANCES),
                   help="affine: learn each training photo's exposure and white balance beside the field, as fit-nerf "
                        "--appearance does (default none)")
    p.add_argument("--device", help="auto (CUDA if present, the default), cpu or cuda[:N]")
    p.set_defaults(func=cmd_sweep)


def sweep_config(args):
    """The :class:`~vqad.sweep.SweepConfig` of a config file (``--config``) overridden by the flags given."""
    from vqad.app.sweep import SweepConfig, load_config_file

    # --threads is every command's (vqad.app.cli sets it for the process), not a sweep setting
    given = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config", "threads") and v is not None}
    values = load_config_file(args.config) if getattr(args, "config", None) else {}
    threads = values.pop("threads", None)  # a config's threads (the flag, given too, wins): for the process
    if threads is not None and getattr(args, "threads", None) is None:
        from vqad.device import set_threads

        set_threads(str(threads))
    values.update(given)
    return SweepConfig.from_mapping(values)


def cmd_sweep(args) -> int:
    import shlex
    import sys

    from vqad.app.sweep import Sweep

    sweep = Sweep(sweep_config(args))
    try:
        sweep.run()
    except KeyboardInterrupt:
        print(f"\nvqad sweep: stopped. Finished points are kept in {sweep.out / 'points'} and an interrupted fit its "
              f"checkpoint; to resume, run the same command again: {shlex.join(['vqad', *sys.argv[1:]])}",
              file=sys.stderr)
        raise
    return 0
