"""Helpers shared by the CLI command modules."""

from __future__ import annotations

import math
import os
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

from vqad.atomicio import write_target
from vqad.errors import InputError, ShortPrefixWarning
from vqad.sdf.extract import check_resolution as check_mc_resolution  # --resolution / --mc-resolution


def path_arg(text: str) -> str:
    """argparse ``type`` of a path flag: an empty one (``--out ''``) would mean the current folder."""
    if not text.strip():
        import argparse

        raise argparse.ArgumentTypeError("an empty path: give a file or folder name")
    return text


def ensure_writable_dir(path: str | Path) -> Path:
    """Create ``path`` (and parents) or raise a one-line :class:`InputError`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"output path exists and is not a directory: {path}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create output directory {path}: {exc.strerror}") from exc
    if not os.access(path, os.W_OK):
        raise InputError(f"output directory is not writable: {path}")
    try:  # access() says yes to root even where nothing can be created (/proc, read-only mounts): try
        fd, probe = tempfile.mkstemp(prefix=".vqad-write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(f"cannot write files in output directory {path}: {exc.strerror}") from exc
    return path


def ensure_results_dir(path: str | Path, flag: str = "-o") -> Path:
    """A folder for ``vqad eval`` / ``render`` results: :func:`ensure_writable_dir`, but never a checkpoint
    (its next save would refuse a folder with images in it) nor a fit's own ``--out`` (its ``metrics.json``
    and renders would be replaced by these)."""
    path = Path(path)
    from vqad.checkpoint import is_checkpoint

    if is_checkpoint(path):
        raise InputError(f"{flag} {path} is a checkpoint: write the results beside it, not among its tensors")
    if (path / "checkpoint").is_dir():
        raise InputError(f"{flag} {path} is a fit's folder: its metrics.json and renders would be replaced; "
                         "give another folder")
    refuse_inside_checkpoint(path, flag)
    return ensure_writable_dir(path)


def refuse_inside_checkpoint(path: str | Path, flag: str) -> None:
    """Refuse an output inside a checkpoint folder (``-o fit/checkpoint/renders``): the fit's next save, which
    replaces the folder whole, would refuse a folder holding anything but a checkpoint's files."""
    from vqad.checkpoint import is_checkpoint

    for folder in Path(os.path.abspath(path)).parents:
        if is_checkpoint(folder):
            raise InputError(f"{flag} {path} is inside the checkpoint {folder}: its next save would refuse a folder "
                             "with other files in it; write beside the checkpoint")


def refuse_foreign_dir(path: Path, markers: tuple[str, ...], what: str, kind: str) -> None:
    """Refuse an existing, non-empty folder that holds none of ``markers`` (the files an earlier vqad
    ``kind`` leaves there): the job would write, replace and delete among someone else's files. ``what``
    names the folder in the message."""
    if path.is_dir() and not any((path / m).exists() for m in markers):
        other = sorted(p.name for p in path.iterdir())
        if other:
            raise InputError(f"{what} already holds other files ({', '.join(other[:3])}{', ...' if len(other) > 3 else ''}) "
                             f"and no earlier vqad {kind}: give a new or empty folder")


@contextmanager
def fresh_output_dir(path: str | Path, what: str, hint: str = ""):
    """A generator's ``--out``: a new or empty folder, created writable; if the job fails or is interrupted
    (Ctrl-C or SIGTERM, from the moment the folder is made), what it wrote is removed (the folder too when the
    job created it, and the parents it created), so the retry is not refused."""
    import shutil

    from vqad.fit import interrupt_guard

    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise InputError(f"--out {path} exists and is not an empty folder: write the {what} to a new folder{hint}")
    existed = path.exists()
    created = path  # the outermost folder this creates (parents included): what a failure removes
    while not created.parent.exists() and created.parent != created:
        created = created.parent
    with interrupt_guard():  # SIGTERM too: a killed run removes what it wrote, as Ctrl-C does
        try:
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise InputError(f"cannot create --out {path}: {exc.strerror or exc}") from None
            ensure_writable_dir(path)
            yield path
        except BaseException:
            if existed and path.is_dir():
                for child in path.iterdir():
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            else:
                shutil.rmtree(created, ignore_errors=True)
            raise


@contextmanager
def evaluating(out: Path, res):
    """A fit's evaluation, after its final checkpoint (``res``: the fit's result): stopped there (Ctrl-C,
    SIGTERM), it says what the checkpoint holds and what the same command with ``--resume`` does: evaluate a
    fit that ran every step without training it, or continue one its time cap stopped, then evaluate."""
    try:
        yield
    except KeyboardInterrupt:
        asked = res.train_cfg.steps
        then = ("evaluates it again (nothing is trained again)" if res.steps >= asked else
                f"continues its training ({res.steps} of {asked} steps done), then evaluates it")
        print(f"\ninterrupted during the evaluation: the fit is saved in {out}/checkpoint; the same command with "
              f"--resume {then}", file=sys.stderr, flush=True)
        raise


@contextmanager
def fit_output_dir(path: str | Path):
    """A fit's ``--out`` (:func:`ensure_fit_dir`) around the fit's first steps: if they are refused (an
    :class:`InputError`: the capture's octree is empty, ...) or are interrupted (a density pass saves nothing)
    and leave the folder this created empty, it goes too. Anything else (a checkpoint written) stays: nothing
    a long run did is lost."""
    path = Path(path)
    created = not path.exists()
    out = ensure_fit_dir(path)
    try:
        yield out
    except (InputError, KeyboardInterrupt):
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


#: descriptors of the output folders this command holds (:func:`hold_output_dir`; the CLI releases them at its end)
_HELD: list[int] = []


def hold_output_dir(path: Path) -> None:
    """Hold the folder ``path`` for the rest of this command (a ``flock`` on the folder itself: no file is
    added), so that a second fit writing the same ``--out`` at once is refused in one line instead of the two
    replacing each other's checkpoint (one died with a safetensors traceback)."""
    fd = lock_folder(path)
    if fd is None:
        raise InputError(f"another vqad fit is writing {path} right now: wait for it to finish, or give this one "
                         "another --out")
    _HELD.append(fd)


def lock_folder(path: Path, wait: bool = False) -> int | None:
    """An exclusive ``flock`` on the folder ``path`` itself (no file added): the open descriptor that holds it (close
    it to let go), or None when another process holds it; with ``wait``, once that process lets it go."""
    import fcntl

    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError:
        os.close(fd)
        return None
    return fd


def release_output_dirs() -> None:
    """Let go of every folder :func:`hold_output_dir` holds (the end of a command)."""
    while _HELD:
        os.close(_HELD.pop())


def ensure_fit_dir(path: str | Path, markers: tuple[str, ...] = ("checkpoint", "metrics.json")) -> Path:
    """A fit's ``--out``: new, empty, or an earlier fit's (it holds one of ``markers``, ``checkpoint/`` or
    ``metrics.json`` by default, which the new fit replaces); a folder of other files (the capture's images,
    a home directory) is refused (:func:`refuse_foreign_dir`). Then :func:`ensure_writable_dir`."""
    from vqad.checkpoint import check_checkpoint_target

    path = Path(path)
    refuse_inside_checkpoint(path, "--out")
    refuse_foreign_dir(path, markers, f"--out {path}", "fit")
    check_checkpoint_target(path / "checkpoint")  # (a folder of that name holding other files: never replaced)
    path = ensure_writable_dir(path)
    hold_output_dir(path)
    return path


#: what a fit's evaluation writes into its --out: a fresh fit there removes them (a fit on other levels would
#: leave an earlier fit's finer meshes and renders beside its own, looking like its results); its checkpoint
#: stays until the new fit's first save replaces it
SDF_EVAL_OUTPUTS = ("metrics.json", "mesh_lod*.ply", "render_lod*.png")
NERF_EVAL_OUTPUTS = ("metrics.json", "*_lod[0-9]*/")


def clear_earlier_fit(out: Path, patterns: tuple[str, ...]) -> None:
    """Before a fresh (not resumed) fit into ``out``: remove what an earlier fit left there that would describe
    it, not the new one (``patterns``; one ending in ``/`` matches folders only), and say so."""
    import shutil

    old = [p for pattern in patterns for p in out.glob(pattern.rstrip("/"))
           if not pattern.endswith("/") or (p.is_dir() and not p.is_symlink())]
    for p in old:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
    shown = [p.name for p in old if p.name != "metrics.json"]
    if shown:
        print(f"replacing the earlier fit in {out}: removed its {', '.join(sorted(shown)[:4])}"
              f"{', ...' if len(shown) > 4 else ''}", file=sys.stderr)


def ensure_writable_file(path: str | Path, suffixes: tuple[str, ...] | None = None, what: str = "output") -> Path:
    """``path`` as a file that can be written (its directory created), with one of ``suffixes`` if given;
    otherwise a one-line :class:`InputError`."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"cannot write {what} {path}: it is a folder; give a file name"
                         + (f" ({', '.join(suffixes)})" if suffixes else ""))
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise InputError(f"{what} {path}: unsupported file type {path.suffix or '(none)'!r}; use one of "
                         f"{', '.join(suffixes)}")
    refuse_inside_checkpoint(path, what)
    ensure_writable_dir(path.parent if str(path.parent) else Path("."))
    write_target(path, what)  # not a folder, a device, a pipe or a socket (before the work, not at its end)
    return path


def check_resolution(value: int | None, flag: str) -> None:
    """Refuse a marching-cubes resolution outside ``MC_MIN..MC_MAX``, or one whose extraction would not fit this
    machine's free memory (:func:`vqad.sdf.extract.check_resolution`): one line, before any work."""
    if value is not None:
        check_mc_resolution(value, flag)


def check_finite(value: float | None, flag: str) -> None:
    """Refuse a float flag that is NaN or infinite."""
    if value is not None and not math.isfinite(value):
        raise InputError(f"{flag} must be a finite number, got {value}")


#: the longest side, in pixels, of an image `vqad render --size` / `vqad view --size` draws
MAX_IMAGE_SIDE = 8192


def check_image_side(value: int | None, flag: str) -> None:
    """Refuse an image side outside ``1..MAX_IMAGE_SIDE`` (one line, before any work)."""
    if value is not None and not 1 <= value <= MAX_IMAGE_SIDE:
        raise InputError(f"{flag} must be 1..{MAX_IMAGE_SIDE} pixels, got {value}")


def report_skipped_steps(n: int) -> None:
    """The fit's line about steps skipped for a non-finite loss or gradient (nothing when there were none)."""
    if n:
        print(f"skipped {n} steps with a non-finite loss or gradient (a sign of too high a learning rate)")


def steps_text(res) -> str:
    """The steps a fit's call ran, for its summary line: ``"243 steps (steps 758..1000, resumed)"`` after a
    ``--resume``, so the rate beside it is this call's."""
    if res.steps_done == res.steps:
        return f"{res.steps} steps"
    return f"{res.steps_done} steps (steps {res.steps - res.steps_done + 1}..{res.steps}, resumed)"


def fit_seconds(res) -> dict:
    """A fit's training time for its metrics: ``fit_seconds`` is the whole fit's, across every --resume (None
    when a checkpoint from before it was recorded was resumed), and a resumed call adds its own as
    ``fit_seconds_this_run`` (the rates beside them are this call's)."""
    if res.steps_done == res.steps and not res.after_training_resumed:
        return {"fit_seconds": res.seconds}
    total = None if res.earlier_seconds is None else res.earlier_seconds + res.seconds
    return {"fit_seconds": total, "fit_seconds_this_run": res.seconds}


def run_rate(res, value: float) -> float | None:
    """A throughput of this call for ``metrics.json``: None when it trained no step (a --resume of a complete
    fit), where the rate would read 0 as though the fit had crawled."""
    return value if res.steps_done > 0 else None


def seconds_text(res) -> str:
    """This call's training time for the summary line, with the whole fit's after a --resume."""
    total = fit_seconds(res)["fit_seconds"]
    return f"{res.seconds:.1f} s" + (f" ({total:.1f} s in all)" if total is not None and total != res.seconds else "")


def report_notes(notes: list[str]) -> None:
    """What a time cap cut from the job (sweeps skipped or shortened, too few steps), one line each."""
    for note in notes:
        print(f"note: {note}")


def add_run_args(p, train_cls, outputs: str) -> None:
    """What every fit command has: ``--seed``, ``--out``, ``--resume``, ``--quiet`` and ``--device``."""
    config_flag(p, train_cls, "seed", help="random seed")
    p.add_argument("--out", required=True, type=path_arg, help=f"output directory ({outputs})")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint with its settings (flags that contradict them are refused; "
                        "--steps and --minutes may change)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--checkpoint-every", default=None, metavar="N|Tm|Ts",
                   help=f"checkpoint cadence: every N steps (e.g. 500), or every T minutes (2m) or seconds (90s) "
                        f"with the default step cadence kept (default: every {train_cls.checkpoint_every} steps or "
                        f"{train_cls.checkpoint_minutes:g} minutes, whichever comes first), so a kill loses at most that much work")
    add_device_arg(p)


def checkpoint_overrides(args) -> dict:
    """The training-config fields ``--checkpoint-every`` sets: ``N`` steps (then no time cadence), or
    ``Tm`` / ``Ts`` minutes / seconds (the step cadence stays)."""
    text = getattr(args, "checkpoint_every", None)
    if text is None:
        return {}
    t = str(text).strip().lower()
    try:
        if t.endswith(("m", "s")):
            value = float(t[:-1]) / (60.0 if t.endswith("s") else 1.0)
            if not 0 < value < math.inf:
                raise ValueError
            return {"checkpoint_minutes": value}
        steps = int(t)
        if steps <= 0:
            raise ValueError
        return {"checkpoint_every": steps, "checkpoint_minutes": None}
    except ValueError:
        raise InputError(f"--checkpoint-every takes a positive number of steps (500), minutes (2m) or seconds "
                         f"(90s), got {text!r}") from None


def add_device_arg(p) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda[:N]")


TRAINABLE_GRIDS = ["dense", "codebook", "hash"]


# -- flags generated from the typed configs ------------------------------------------------------
# Every fit flag maps to one field of a config dataclass. Its default is read from that dataclass
# (or from the application's default instance), never typed here, and argparse stores None when the
# flag is not given, so a command knows which flags the user chose: those override the defaults
# (or, with --resume, the checkpoint's settings), and a flag that cannot apply is refused.
def config_flag(p, defaults, name: str, flag: str | None = None, help: str = "", **kw) -> None:
    """``--flag`` for field ``name`` of ``defaults`` (a config dataclass or instance), default None
    (= not given); the help shows the real default."""
    default = getattr(defaults, name)  # a dataclass's class attribute is its field's default
    if kw.get("action") == "store_true":
        p.add_argument(flag or "--" + name.replace("_", "-"), dest=name, default=None, help=help, **kw)
        return
    if flag and "metavar" not in kw:
        kw["metavar"] = flag.lstrip("-").upper().replace("-", "_")
    kind = kw.pop("type", None) or (type(default) if default is not None and not isinstance(default, bool) else float)
    shown = "none" if default is None else default
    p.add_argument(flag or "--" + name.replace("_", "-"), dest=name, type=kind, default=None,
                   help=f"{help} (default: {shown})" if help else f"default: {shown}", **kw)



def add_rate_flags(p, T) -> None:
    """``--rate-weight`` and ``--rate-context`` (issue 20's rate term), the same on every fit command."""
    config_flag(p, T, "rate_weight", help="λ: add λ × the estimated coded bits per index (entropy of the soft "
                                         "assignments, docs/method.md) to the loss, trading quality for bits; the index-refinement "
                                         "sweeps (--refine) then minimise the same loss + λ × bits (order-0), which moves far "
                                         "more bits per λ (a mesh: 1e-7..1e-6); codebook only")
    config_flag(p, T, "rate_context", action="store_true",
                help="estimate the rate given each index's coarser index at floor(v/2), the model of the "
                     "file's context codec, instead of order-0 (needs --rate-weight; codebook only)")

def given(args, names) -> dict:
    """The flags among ``names`` that the user gave (argparse stores None for the others)."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def refuse(condition: bool, message: str) -> None:
    """A flag that cannot apply is an error that says why (exit 2), never silently ignored."""
    if condition:
        raise InputError(message)


def add_grid_args(p, defaults) -> None:
    """``--grid``, ``--bits``, ``--table-bits``, ``--features`` and ``--levels`` of the fit commands,
    with the defaults of the application's :class:`~vqad.config.GridConfig` ``defaults``."""
    p.add_argument("--grid", choices=TRAINABLE_GRIDS, default=None,
                   help="feature storage: dense, codebook (VQ-AD) or hash (Instant-NGP random indices); "
                        f"for post-hoc kmeans / lowrank fit dense, then run vqad compress (default: {defaults.storage})")
    config_flag(p, defaults, "bits", help="b: codebook index bits (1..12; codebook only)")
    config_flag(p, defaults, "table_bits", help="T: hash table of 2^T rows per level (1..24; hash only)")
    config_flag(p, defaults, "features", help="k: features per vertex")
    p.add_argument("--levels", default=None,
                   help=f"octree levels BASE:MAX (LODs) (default: {defaults.base_level}:{defaults.max_level})")


GRID_OPTIONS = {"bits": "--bits", "table_bits": "--table-bits"}  # flags a storage takes only if it names them


def grid_config(args, base_cfg):
    """The validated :class:`~vqad.config.GridConfig`: ``base_cfg`` (the application's defaults, or a
    resumed checkpoint's grid) with the grid flags the user gave."""
    from dataclasses import replace

    from vqad.config import parse_levels
    from vqad.storages import STORAGES, options_of

    over = {}
    if args.grid is not None:
        over["storage"] = args.grid
    over.update(given(args, ["features", *GRID_OPTIONS]))
    if args.levels is not None:
        over["base_level"], over["max_level"] = parse_levels(args.levels)
    grid = replace(base_cfg, **over)
    takes = options_of(grid.storage)
    for name, flag in GRID_OPTIONS.items():
        refuse(getattr(args, name, None) is not None and name not in takes,
               f"{flag} does not apply to --grid {grid.storage} (it sets a parameter of "
               f"{', '.join(k for k in STORAGES if name in options_of(k))} grids)")
    grid.validate()
    return grid


def refuse_output_in_model(model, out, flag: str = "--out") -> None:
    """Refuse an output ``out`` that is the input ``model`` or lies inside it (a checkpoint folder): a file among
    its tensors makes its next save (``--resume``) refuse the folder, or lose the file."""
    model, where = Path(model).resolve(), Path(out).resolve()
    if where == model:
        raise InputError(f"{flag} {out} is the input model: write to another {'folder' if model.is_dir() else 'file'}")
    if model.is_dir() and model in where.parents:
        raise InputError(f"{flag} {out} is inside the checkpoint {model}: write it beside the checkpoint, not among "
                         "its tensors")


def load_model(args, whole: bool = False):
    """The model ``args.model`` (checkpoint or ``.vqad``) on ``args.device``: a ``.vqad`` decoded up to
    ``args.lod`` only, or with ``whole`` up to its end unless ``args.bytes`` asks for a prefix. A radiance
    field's render takes its samples from the occupancy of the finest LOD it holds, and a TSDF is meshed on its
    finest cells' lattice inside observed space, so ``eval``, ``render`` and a TSDF's ``mesh`` take LOD L of the
    whole model (``whole``), as the fit's own evaluation does; with ``--bytes`` the prefix, as a viewer shows it
    after those bytes."""
    from vqad.api import load
    from vqad.device import resolve_device

    nbytes = getattr(args, "bytes", None)
    if args.lod is not None and args.lod < 0:
        raise InputError(f"--lod must be a level of the model's octree (>= 0; vqad info lists them), got {args.lod}")
    if nbytes is not None and nbytes <= 0:
        raise InputError(f"--bytes must be a positive number of bytes (a prefix of the .vqad file), got {nbytes}")
    lod = None if whole and nbytes is None else args.lod
    with warnings.catch_warnings():  # a prefix without --lod's LOD: one error below, not a warning too
        warnings.simplefilter("ignore", ShortPrefixWarning)
        field = load(args.model, device=resolve_device(args.device), lod=lod, max_bytes=nbytes)
    if nbytes is not None and lod is not None and lod not in field.lods:
        raise InputError(f"--bytes {nbytes:,}: the first {nbytes:,} bytes of {args.model} hold LODs up to "
                         f"{max(field.lods)}, not LOD {lod}: give more --bytes, or --lod {max(field.lods)}")
    return field


def check_resumed_source(recorded: str | None, given: str | Path, what: str, hint: str) -> str | None:
    """Refuse a ``--resume`` on other data than the checkpoint was trained on (``recorded``, a path):
    the fit would continue on it and record the old one. The same file or folder, or a file of the same
    bytes, passes. Returns a note when the recorded path is gone (the data moved: nothing to compare)."""
    import filecmp

    if recorded is None or recorded == "":
        return None
    if not isinstance(recorded, str):
        from vqad.checkpoint import DAMAGED

        raise InputError(f"--resume: the checkpoint records {what} as {recorded!r}, not a path: {DAMAGED}")
    old, new = Path(recorded), Path(given)
    try:
        if not old.exists():
            return f"note: this fit was trained on {what} {recorded}, which is not there any more; continuing on {given}"
        if os.path.samefile(old, new) or (old.is_file() and new.is_file() and filecmp.cmp(old, new, shallow=False)):
            return None
    except OSError:
        return None  # unreadable: the load of the given data reports it
    raise InputError(f"--resume: this fit was trained on {what} {recorded}, not {given}; {hint}")


def already_complete(res) -> str | None:
    """The line a resumed fit prints instead of its throughput when it had no step left to run."""
    if res.steps_done == 0 and res.steps > 0:
        if res.after_training_resumed:
            return (f"fit: training already complete at {res.steps} steps; ran the work after training (index sweeps) "
                    f"that an interrupt had stopped, in {res.refine_seconds:.1f} s")
        return f"fit: already complete at {res.steps} steps (nothing trained; give a larger --steps to train further)"
    return None


def resumed_configs(out, kind: str) -> dict:
    """The config dict of ``out/checkpoint`` for ``--resume`` (:func:`vqad.fit.resume_config`)."""
    from pathlib import Path

    from vqad.fit import resume_config

    return resume_config(Path(out) / "checkpoint", kind)


#: index settings whose 0 turns them off: given as 0, they apply to any grid (a script may pass --refine 0 always)
OFF_AT_ZERO = ("refine", "rate_weight")


def train_overrides(args, names, index_flags: dict[str, str], storage: str) -> dict:
    """The training flags among ``names`` the user gave. ``index_flags`` (name → flag) only apply to
    grids with discrete indices and are refused for others; a learning-rate scale of 0 means "the
    grid's" (None), a negative one is refused."""
    from vqad.storages import storage_class

    discrete = storage_class(storage).discrete
    for name, flag in index_flags.items():
        value = getattr(args, name)
        off = name in OFF_AT_ZERO and value == 0  # "none of it" applies to any grid
        refuse(value is not None and not discrete and not off,
               f"{flag} applies to grids with discrete indices (--grid codebook), not --grid {storage}")
        refuse(name.endswith("lr_scale") and value is not None and value < 0, f"{flag} must be >= 0 (0: same as the grid)")
    over = given(args, names)
    return {k: (None if k.endswith("lr_scale") and k != "grid_lr_scale" and v == 0 else v) for k, v in over.items()}


def refuse_sweep_sizes_without_sweeps(args, train, flags: dict[str, str], resumed: bool = False) -> None:
    """``flags`` (name → flag) size the index-refinement sweeps after training: refused where ``train.refine``
    is 0 (given, the checkpoint's, or the command's default), since they would do nothing."""
    named = [flag for name, flag in flags.items() if getattr(args, name, None) is not None]
    whose = "" if getattr(args, "refine", None) is not None else " (the checkpoint's)" if resumed else " (the default here)"
    refuse(bool(named) and train.refine == 0,
           f"{' and '.join(named)} {'size' if len(named) > 1 else 'sizes'} the index-refinement sweeps after training, "
           f"which --refine 0{whose} turns off: give --refine N to run them")


def config_from(cls, saved: dict | None, default):
    """``default`` (a config instance), or on resume the checkpoint's ``saved`` dict for ``cls``
    (unknown keys refused; missing ones from ``cls.ABSENT_MEANS`` where it names them, the value such an
    older checkpoint was trained with, else from ``default``)."""
    from dataclasses import asdict

    from vqad.config import from_dict

    if saved is None:
        return default
    return from_dict(cls, {**asdict(default), **getattr(cls, "ABSENT_MEANS", {}), **saved})
