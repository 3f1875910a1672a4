"""``vqad compress``: a trained dense model compressed after training (post-hoc k-means or low rank)."""

from __future__ import annotations

from pathlib import Path

from vqad.errors import InputError
from vqad.app.commands.common import path_arg, add_device_arg, refuse_inside_checkpoint, refuse_output_in_model


def register(sub) -> None:
    from vqad.storages.kmeans import KMEANS_ITERS
    from vqad.posthoc import POSTHOC_KINDS

    p = sub.add_parser(
        "compress",
        help="compress a trained dense model after training: k-means (the paper's kmVQ) or low rank (PCA)",
        description="Every level's dense features Z are replaced by k-means centroids and indices (--to kmeans) "
                    "or a rank-r PCA (--to lowrank); the decoder is kept as is (no fine-tuning). The result is "
                    "written as a baked checkpoint directory: vqad export OUT -o model.vqad writes its file.",
    )
    p.add_argument("model", help="checkpoint directory (or .vqad file) of a model fitted with --grid dense")
    p.add_argument("--to", required=True, choices=list(POSTHOC_KINDS), help="the post-hoc storage")
    p.add_argument("--bits", type=int, default=None, help="kmeans: b, 2^b centroids per level (1..12, default 4)")
    p.add_argument("--rank", type=int, default=None, help="lowrank: r, dimensions kept (1..k-1, required)")
    p.add_argument("--seed", type=int, default=None, help="kmeans: k-means++ seed (default: 0)")
    p.add_argument("--iters", type=int, default=None, help=f"kmeans: Lloyd iterations at most (default: {KMEANS_ITERS})")
    p.add_argument("--out", type=path_arg, required=True, help="output checkpoint directory")
    add_device_arg(p)
    p.set_defaults(func=cmd_compress)


def cmd_compress(args) -> int:
    import shlex
    import time

    from vqad.api import load
    from vqad.posthoc import posthoc
    from vqad.checkpoint import check_checkpoint_target, save_checkpoint
    from vqad.config import check_seed
    from vqad.device import resolve_device

    if args.to == "kmeans" and args.rank is not None:
        raise InputError("--rank applies to --to lowrank; k-means takes --bits")
    if args.to == "lowrank":
        given = [flag for flag, v in (("--bits", args.bits), ("--seed", args.seed), ("--iters", args.iters)) if v is not None]
        if given:
            raise InputError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to --to kmeans; --to lowrank takes "
                             f"--rank R only")
        if args.rank is None:
            raise InputError("--to lowrank needs --rank R (fewer dimensions than the model's k features)")
    if args.seed is not None:
        check_seed(args.seed)  # (posthoc checks it too; here before the model is read)
    out = Path(args.out)
    refuse_output_in_model(args.model, out)
    refuse_inside_checkpoint(out, "--out")
    try:
        check_checkpoint_target(out)  # now, before the work: a folder of other files is never replaced
    except InputError as exc:
        raise InputError(f"--out {out}: {exc}") from None
    _refuse_other_checkpoint(out)
    field = load(args.model, device=resolve_device(args.device))
    t0 = time.perf_counter()
    if args.to == "kmeans":
        params = {k: v for k, v in (("bits", args.bits), ("seed", args.seed), ("iters", args.iters)) if v is not None}
    else:
        params = {"rank": args.rank}
    new = posthoc(field, args.to, **params)
    seconds = time.perf_counter() - t0
    save_checkpoint(out, new, extra={"posthoc": {"from": str(args.model), "kind": args.to, **params, "seconds": seconds}})
    r = new.size_report()
    import inspect

    from vqad.field import ratio_text
    from vqad.posthoc import POSTHOC_BITS

    defaults = inspect.signature(posthoc).parameters  # what a flag left out ran with
    shown = ({"bits": POSTHOC_BITS, "seed": defaults["seed"].default, "iters": defaults["iters"].default, **params}
             if args.to == "kmeans" else params)
    print(f"{args.to} ({', '.join(f'{k}={v}' for k, v in shown.items())}) in {seconds:.1f} s: grid "
          f"{r['dense_fp16_bytes'] / 1e3:,.1f} kB (dense fp16) -> {r['grid_bytes'] / 1e3:,.1f} kB "
          f"({ratio_text(r['grid_ratio'])}), decoder {r['decoder_bytes'] / 1e3:,.1f} kB")
    for level, s in zip(new.lods, new.grid.storages):
        print(f"  LOD {level}: m={s.m:,}, relative feature error ||Z - Z'||^2 / ||Z||^2 = {s.reconstruction_error:.4g}")
    print(f"wrote {out}/ (baked checkpoint; vqad export {shlex.quote(str(out))} -o model.vqad writes the file)")
    return 0


def _refuse_other_checkpoint(out: Path) -> None:
    """An ``--out`` that holds a checkpoint compress did not write (a fit's, with its optimizer state, or a damaged
    one) is refused: compress replaces its --out whole, and only its own earlier output may go."""
    from vqad.checkpoint import read_config

    if not out.is_dir() or not any(out.iterdir()):
        return
    try:
        cfg = read_config(out)
    except InputError:
        cfg = {}
    if "posthoc" in cfg:
        return
    what = f"a fit's checkpoint (step {cfg['step']:,})" if "step" in cfg else "a checkpoint compress did not write"
    raise InputError(f"--out {out} holds {what}, and compress replaces its --out whole: choose another folder "
                     "(or remove that one first)")
