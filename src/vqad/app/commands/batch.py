"""``vqad batch``: fit, evaluate and export a catalogue of assets, in this process or on a Ray cluster."""

from __future__ import annotations

import argparse
import shlex
import sys

from vqad.app.commands.common import path_arg, add_device_arg
from vqad.errors import InputError, Terminated

EPILOG = """\
examples:
  vqad batch job.toml                                   # Ray if installed (a local Ray for the job), else --local
  vqad batch job.toml --local                           # one asset after another in this process
  vqad batch job.toml --ray auto --threads 1            # a local Ray: cores // threads fits at a time
  vqad batch job.toml --ray 10.0.0.5:6379               # a running cluster (same paths on every node)
  vqad batch meshes/ --out runs/meshes --steps 1000 --bits 4 --set refine=2   # a directory: every mesh / capture
  vqad batch job.toml --dry-run                         # check the job, say what would run; write nothing

A job file (.toml or .json; paths relative to it):
  out = "runs/catalogue"
  [defaults]                  # settings: the long flags of vqad fit-sdf / fit-nerf, and
  steps = 1000                # entropy, eval, renders, chamfer_samples, iou_samples
  bits = 4
  [defaults.nerf]             # only for captures ([defaults.sdf]: only for meshes)
  downscale = 4
  [[assets]]
  path = "meshes/*.obj"       # one asset per match
  [[assets]]
  path = "scans/lego"
  bits = 6                    # this asset's own value

Re-run the same command to resume: finished assets with unchanged settings are skipped, an
interrupted fit continues from its checkpoint, failed assets are tried again, and an asset whose
settings changed is fitted again. Exit status: 0 all done, 1 some assets failed (their errors are in
OUT/results.md), 2 a bad job (nothing written), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
"""

#: fit settings with a flag of their own here (each is --set NAME=VALUE)
SHORTCUTS = ("steps", "minutes", "grid", "bits", "levels", "seed")


def register(sub) -> None:
    from vqad.app.batch import RunConfig

    p = sub.add_parser(
        "batch", help="fit, evaluate and export many assets (a job file or a directory), locally or on a Ray cluster",
        description="Fit every asset of a job — mesh files (SDF) and capture folders (radiance fields) — evaluate "
                    "each LOD of its decoded .vqad file and write both into an output tree that mirrors the input; "
                    "results are recorded as each asset finishes, so an interrupted job resumes where it stopped.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job", help="a .toml / .json job file, or a directory whose mesh files and capture folders are the assets")
    p.add_argument("--out", type=path_arg, default=None, help="output folder (default: the job file's out)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--local", action="store_true",
                   help="fit the assets one after another in this process, with --threads threads (default: every core)")
    g.add_argument("--ray", default=None, metavar="auto|ADDRESS",
                   help="run each asset as a Ray task: 'auto' starts a local Ray for the job, ADDRESS (host:port) joins "
                        "a running cluster; each task declares --threads CPUs (default 1), so a node runs "
                        "cores // threads fits at a time (default without --local / --ray: Ray when installed)")
    p.add_argument("--threads", default=None, metavar="N",
                   help="CPU threads of each fit (default: --local every core this process may use, or $VQAD_THREADS / "
                        "$OMP_NUM_THREADS; Ray $VQAD_THREADS, else 1); fits with the same threads write the same files "
                        "bit for bit in either mode")
    p.add_argument("--retries", type=int, default=None,
                   help=f"Ray: times a task whose worker died is run again, from its checkpoint (default {RunConfig.RETRIES})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting for every asset that has it, over the job file's (e.g. --set refine=2, --set entropy=false)")
    for name in SHORTCUTS:
        p.add_argument(f"--{name}", dest=f"set_{name}", default=None, metavar=name.upper(), help=f"--set {name}={name.upper()}")
    add_device_arg(p)
    p.add_argument("--dry-run", action="store_true", help="check the job and say what would run; write nothing")
    p.add_argument("--quiet", action="store_true", help="no plan or progress bar: the summary line and failures only")
    p.set_defaults(func=cmd_batch, threads_per_fit=True)


def resume_command(args, out) -> str:
    """The command line that continues this job."""
    argv = ["vqad", "batch", str(args.job), "--out", str(out)]
    argv += ["--local"] if args.local else (["--ray", args.ray] if args.ray else [])
    argv += ["--threads", str(args.threads)] if args.threads else []
    argv += ["--device", args.device] if args.device != "auto" else []
    for name in SHORTCUTS:
        if getattr(args, f"set_{name}") is not None:
            argv += [f"--{name}", getattr(args, f"set_{name}")]
    for text in args.set:
        argv += ["--set", text]
    return shlex.join(argv)


def cmd_batch(args) -> int:
    from vqad.app.batch import (BatchRun, RunConfig, batch_running, check_override, load_job, parse_override,
                                parse_value, summary_line)
    from vqad.device import resolve_threads

    overrides, flag_of = {}, {}  # key -> value; key -> the flag that set it (named by errors)
    for text in args.set:
        key, value = parse_override(text)
        if key in overrides:
            raise InputError(f"--set {key} is given twice ({flag_of[key]} and --set {text}): give it once")
        overrides[key], flag_of[key] = value, f"--set {text}"
    for name in SHORTCUTS:
        text = getattr(args, f"set_{name}")
        if text is not None:
            if name in overrides:
                raise InputError(f"--{name} {text} and {flag_of[name]} both set {name}: give one")
            overrides[name], flag_of[name] = parse_value(text), f"--{name} {text}"
    for key, value in overrides.items():
        try:
            check_override(key, value)
        except InputError as exc:
            raise InputError(f"{flag_of[key]}: {exc}") from None
    run = RunConfig(local=args.local, ray=args.ray, threads=None if args.threads is None else resolve_threads(args.threads),
                    device=args.device, retries=args.retries, quiet=args.quiet)
    run.validate()
    job = load_job(args.job, args.out, overrides)  # every asset checked before anything is written
    batch = BatchRun(job, run)
    if args.dry_run:
        for line in batch.describe():
            print(line)
        for spec in job.assets:
            state = "skip" if spec not in batch.plan.run else "fit"
            print(f"  {state}: {spec.key} ({spec.application}) <- {spec.source}")
        print(f"dry run: nothing written; output would go to {job.out}")
        if batch_running(job.out):
            print(f"note: another vqad batch is running on {job.out} now: this one would be refused until it ends, "
                  "and what it finishes changes the plan above")
        return 0
    try:
        res = batch.execute()
    except KeyboardInterrupt as exc:
        how = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        print(f"\nvqad batch: {how}. Finished assets are recorded in {job.out / 'results.jsonl'} and interrupted "
              f"fits keep their checkpoints; to resume, run: {resume_command(args, job.out)}", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    print(summary_line(res, job.out))
    return res.exit_code
