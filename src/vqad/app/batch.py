"""``vqad batch``: fit, evaluate and export a catalogue of assets, in this process or on a Ray cluster.

A **job** lists assets — mesh files (signed distance fields) and capture folders (radiance fields) —
with their settings, as a TOML or JSON file, or as a directory whose mesh files and capture folders
are the assets. Every asset becomes a fitted ``.vqad`` file, decoded again and measured per LOD,
in an output tree that mirrors the input::

    out = "runs/catalogue"        # optional; --out overrides it (relative paths: to this file)
    root = "."                    # optional: the input tree mirrored under out (default: this file's folder)

    [defaults]                    # every asset's settings unless it sets its own
    steps = 1000
    bits = 4
    levels = "3:6"

    [defaults.sdf]                # only for meshes
    mc_resolution = 128

    [defaults.nerf]               # only for captures
    downscale = 4

    [[assets]]
    path = "meshes/*.obj"         # a glob: one asset per match
    [[assets]]
    path = "scans/chair.ply"
    bits = 6                      # this asset's own value
    name = "furniture/chair"      # its output folder under out (default: its path under root, no suffix)

``assets`` may also be plain paths: ``assets = ["a.obj", "b.ply"]``. **Settings** are the long flags
of ``vqad fit-sdf`` / ``vqad fit-nerf`` (``steps``, ``minutes``, ``grid``, ``bits``, ``levels``,
``features``, ``hidden``, ``seed``, ``refine``, ``mc_resolution``, ``downscale``,
``checkpoint_every``, ...; ``-`` or ``_``; in JSON ``null`` means "not given"), with their defaults, plus :class:`AssetOptions`
(``entropy``, ``eval``, ``renders``, ``chamfer_samples``, ``iou_samples``). The application
(``sdf`` for a mesh file, ``nerf`` for a capture) follows from the input; an ``application`` key
must agree with it. Command-line ``--set KEY=VALUE`` (and ``--steps``, ``--bits``, ...) override
every asset. The whole job is checked before any fit starts: an unknown key, a value of the wrong
type or range, a setting that cannot apply to an asset (``bits`` with ``grid = "dense"``, a
radiance-field setting for a mesh), a missing input or two assets with one output folder is a
one-line error and nothing is written. What needs the data itself (a corrupt mesh) is that asset's
error at run time.

Output tree::

    OUT/results.jsonl          one record per finished (or failed) asset, appended as it finishes
    OUT/results.csv, results.md  the table: asset, bytes, ratio, quality per LOD, fit seconds, worker
    OUT/<asset>/<name>.vqad    the file (entropy-coded unless entropy = false)
    OUT/<asset>/metrics.json   the fit and the per-LOD quality of the decoded file; written last
    OUT/<asset>/log.txt        the asset's log (every attempt appends)
    OUT/<asset>/checkpoint/    the fit's checkpoint (resumable; kept for vqad mesh / render / export)
    OUT/<asset>/settings.json, worker.json   its settings fingerprint; the worker running it (host, pid)
    OUT/<asset>/mesh_lod*.ply, render_lod*.png, <split>_lod*/   the evaluation's meshes and images

**Nothing lost.** The driver appends each asset's record to ``results.jsonl`` as it finishes (one
fsync'ed write; see :func:`vqad.atomicio.append_record`). A re-run skips an asset whose latest
record is ``done`` with the same settings fingerprint (every setting that can change the result,
vqad's resolved defaults and the input's size and modification time; not threads, device or
checkpoint cadence) and whose file is there from a fit of those settings (the folder's settings.json: a
run with other settings that was stopped may have replaced it); an asset whose settings changed is fitted again from
scratch (the plan says which settings changed) unless only its export and evaluation settings did and its fit ran
every step (:func:`keeps_fit`: then the kept fit is exported and evaluated again), failed assets are tried again, and a
fit that was interrupted continues from its checkpoint. An asset that finished after the driver died is
recovered from its ``metrics.json``. A broken asset gets its one-line error in its record and does
not stop the others; the exit status is 1 when any asset failed. Ctrl-C (or SIGTERM) stops the
fits — each saves its checkpoint — and says how to resume.

**Execution** (:class:`RunConfig`): ``--local`` fits one asset after another in this process with
``--threads`` threads (default: every core, see :func:`vqad.device.resolve_threads`).
``--ray auto`` starts a local Ray for the job (``num_cpus`` = the cores this process may use) and
shuts it down after; ``--ray ADDRESS`` uses a running cluster. Each asset is one Ray task that
declares ``num_cpus`` = threads per fit (``--threads``, else ``$VQAD_THREADS``, else 1) and
``num_gpus = 1`` with ``--device cuda``, so Ray runs ``max(1, cores // threads)`` fits at a time on
each node and never oversubscribes it; a task whose worker dies is run again (``--retries``,
Ray's ``max_retries``) and resumes from the asset's checkpoint. Without a flag, Ray is used when it
is installed, else the job runs ``--local`` with a one-line note.

**Determinism.** A fit's floating-point reductions depend on its thread count, so the files of two
runs are the same bit for bit when their fits have the same threads, device and seed and are bounded
by ``steps`` (not ``minutes``) and not resumed: ``--local --threads 1`` and ``--ray auto`` (1 thread
per fit) write identical files; ``--local`` with 2 threads writes slightly different ones.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import glob
import hashlib
import io
import json
import math
import os
import re
import shutil
import socket
import sys
import time
import traceback
import unicodedata
import uuid
from dataclasses import asdict, dataclass, field as dfield, fields
from functools import lru_cache
from pathlib import Path, PurePosixPath

from vqad.app.outputs import BATCH_LOCK as LOCK, BATCH_RESULTS as RESULTS, capture_folder, input_stamp, is_output_folder
from vqad.atomicio import append_record, write_atomic
from vqad.device import release_freed_memory
from vqad.errors import InputError, VqadError
from vqad.fit import Deadline
from vqad.sdf.metrics import CHAMFER_SAMPLES, IOU_SAMPLES, MAX_METRIC_SAMPLES

BATCH_FORMAT = 1
RESULTS_CSV, RESULTS_MD = "results.csv", "results.md"
#: the output root's own files: no asset folder may take their names
RESERVED_NAMES = (RESULTS, RESULTS_CSV, RESULTS_MD, LOCK)
#: an asset folder's name, in UTF-8 bytes (file systems stop at 255; its files add a suffix such as ".vqad")
MAX_NAME_BYTES = 200
FIT_COMMANDS = {"sdf": "fit-sdf", "nerf": "fit-nerf"}
QUALITY = {"sdf": ("chamfer_l1", "Chamfer-L1 ↓"), "nerf": ("psnr", "PSNR dB ↑")}
JOB_KEYS = ("out", "root", "defaults", "assets")
#: fit flags a job does not set: batch gives them per asset (its paths, resume, --device, --quiet)
NOT_SETTINGS = ("mesh", "dataset", "out", "resume", "quiet", "device", "no_eval", "help")
#: settings that change how a fit runs, not what it computes: a re-run does not redo an asset for them
CADENCE_SETTINGS = ("checkpoint_every",)
#: fit-command settings that only the evaluation reads: a change to them (or to the asset options) keeps the fit
EVAL_ARGS = {"sdf": ("mc_resolution",), "nerf": ("eval_views", "eval_max_views")}
CADENCE_TRAIN = ("log_every", "checkpoint_every", "checkpoint_minutes")
#: how often the results table is rebuilt while a job runs (it is always rebuilt at the end)
REPORT_EVERY_S = 10.0
#: how long an interrupted Ray job waits for its cancelled fits to save their checkpoints
CANCEL_WAIT_S = 30.0


# ================================================================================================
# the job: assets and their settings
# ================================================================================================
@dataclass(frozen=True)
class AssetOptions:
    """What ``vqad batch`` does with an asset besides fitting it (job keys of the same names)."""

    entropy: bool = True  # range-code the .vqad file (lossless, smaller; vqad export --entropy)
    eval: bool = True  # decode the file and measure every LOD
    renders: bool = True  # write the evaluation's images (SDF: a render per LOD and the finest mesh)
    chamfer_samples: int = CHAMFER_SAMPLES  # SDF: surface samples per side for Chamfer-L1
    iou_samples: int = IOU_SAMPLES  # SDF: uniform points for IoU

    SDF_ONLY = ("chamfer_samples", "iou_samples")
    EVAL_ONLY = ("renders", "chamfer_samples", "iou_samples")

    @classmethod
    def from_settings(cls, values: dict) -> "AssetOptions":
        for name, value in values.items():
            want = type(getattr(cls, name))
            if want is bool and not isinstance(value, bool):
                raise InputError(f"{name} must be true or false, got {value!r}")
            if want is int and (isinstance(value, bool) or not isinstance(value, int)
                                or not 0 < value <= MAX_METRIC_SAMPLES):
                raise InputError(f"{name} must be an integer in 1..{MAX_METRIC_SAMPLES:,}, got {value!r}")
        if values.get("eval") is False:  # what only the evaluation uses cannot apply without it
            given = sorted(set(values) & set(cls.EVAL_ONLY))
            if given:
                raise InputError(f"{given[0]} does not apply with eval = false (nothing is evaluated): remove it")
        return cls(**values)


OPTION_NAMES = tuple(f.name for f in fields(AssetOptions))


@dataclass
class AssetSpec:
    """One asset, checked: all a worker needs to fit, export and evaluate it (sent to Ray tasks)."""

    key: str  # its folder under the output root, mirroring the input tree
    source: str  # the mesh file or capture folder (absolute), or a built-in scene's name
    application: str  # "sdf" | "nerf"
    args: dict  # the fit command's arguments (argparse dest -> value) for this asset
    options: AssetOptions
    settings: dict  # the settings given (by key), shown when a re-run finds them changed
    fingerprint: str  # everything the result depends on, hashed (see the module docstring)
    fit_fingerprint: str = ""  # ... and what its fit alone depends on (not the export or the evaluation)

    @property
    def name(self) -> str:
        return PurePosixPath(self.key).name

    @property
    def file(self) -> str:
        """The .vqad file, relative to the output root."""
        return f"{self.key}/{self.name}.vqad"

    def namespace(self, out_dir: Path, device: str) -> argparse.Namespace:
        """The ``fit-sdf`` / ``fit-nerf`` arguments of this asset, writing into ``out_dir``."""
        return fit_namespace(self.application, self.args, self.options, self.source, out_dir, device)


def fit_namespace(application: str, args: dict, options: AssetOptions, source: str, out_dir: Path,
                  device: str) -> argparse.Namespace:
    """What the fit command's parser would give for an asset: its settings ``args`` (dest → value),
    its input and output, and the flags batch sets itself."""
    src = "mesh" if application == "sdf" else "dataset"
    return argparse.Namespace(**args, **{src: source}, out=str(out_dir), resume=False, quiet=True, device=device,
                              no_eval=not options.eval)


@dataclass
class Job:
    source: Path  # the job file, or the directory of assets
    root: Path  # the input tree that the output mirrors
    out: Path
    assets: list[AssetSpec]


@lru_cache(maxsize=None)
def fit_flags(application: str) -> dict[str, argparse.Action]:
    """The settings of an ``application`` asset: the flags of its fit command, by long name with ``_``
    (``minutes``, ``per_lod_decoder``), as their argparse actions (type, choices and default)."""
    import importlib

    sub = argparse.ArgumentParser(add_help=False).add_subparsers()
    importlib.import_module(f"vqad.app.commands.{application}").register(sub)
    parser = sub.choices[FIT_COMMANDS[application]]
    flags = {}
    for a in parser._actions:
        if a.dest in NOT_SETTINGS or not a.option_strings:
            continue
        flags[max(a.option_strings, key=len).lstrip("-").replace("-", "_")] = a
    return flags


@lru_cache(maxsize=None)
def _fit_defaults(application: str) -> dict:
    return {a.dest: a.default for a in fit_flags(application).values()}


def _convert(key: str, value, action: argparse.Action):
    """A job value for the flag ``action``, checked as argparse would check the flag's text (a JSON
    ``null``: not given, the default)."""
    if value is None:
        return action.default
    if isinstance(action, argparse._StoreConstAction):  # --flag (store_true too): true gives its constant
        if not isinstance(value, bool):
            raise InputError(f"{key} must be true or false, got {value!r}")
        return action.const if value else action.default
    kind = action.type
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{key} must be an integer, got {value!r}")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{key} must be a number, got {value!r}")
        value = float(value)
    else:  # text flags (levels "3:7", background, checkpoint_every "2m"); a number stands for its text
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise InputError(f"{key} must be a string, got {value!r}")
    if action.choices is not None and value not in action.choices:
        raise InputError(f"{key} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return value


def check_override(key: str, value) -> None:
    """A command-line setting's value checked by itself (its type and choices, as each kind of asset that
    has it reads it), so that a wrong one is blamed on the flag, not on the first asset that takes it."""
    for app in FIT_COMMANDS:
        if key in fit_flags(app):
            _convert(key, value, fit_flags(app)[key])
    if key in OPTION_NAMES:
        AssetOptions.from_settings({key: value})


def _other(application: str) -> str:
    return "nerf" if application == "sdf" else "sdf"


def has_setting(application: str, key: str) -> bool:
    """Whether ``key`` is a setting of an ``application`` asset (a fit flag or a batch option)."""
    return key in fit_flags(application) or (key in OPTION_NAMES and not (application == "nerf" and key in AssetOptions.SDF_ONLY))


def _check_key(key: str, application: str) -> None:
    """Refuse a key that is not a setting of an ``application`` asset, saying whose setting it is."""
    if has_setting(application, key):
        return
    other = _other(application)
    if key in fit_flags(other) or key in AssetOptions.SDF_ONLY:
        kinds = {"sdf": "mesh (SDF)", "nerf": "capture (radiance-field)"}
        raise InputError(f"{key} does not apply to the {kinds[application]} asset: it is a setting of "
                         f"{kinds[other]} assets (in a job's defaults, put it under [defaults.{other}])")
    raise InputError(f"unknown setting {key!r}: settings are the long flags of vqad {FIT_COMMANDS[application]} "
                     f"(steps, minutes, grid, bits, levels, ...) and {', '.join(OPTION_NAMES)}")


@lru_cache(maxsize=1024)  # a catalogue shares a few settings among many assets
def resolve_settings(application: str, merged: tuple) -> tuple[dict, AssetOptions, list]:
    """``(args, options, configs)`` of an asset's merged settings ``((key, value), ...)``: the fit
    command's arguments (dest → value), the batch options, and the configs the fit will run with (as
    dicts, checkpoint cadence left out), checked by the fit command's own validation. Raises a
    one-line :class:`InputError` that the caller prefixes with the asset."""
    flags = fit_flags(application)
    args = dict(_fit_defaults(application))
    opts = {}
    for key, value in merged:
        _check_key(key, application)
        if key in OPTION_NAMES:
            if value is not None:
                opts[key] = value
        else:
            args[flags[key].dest] = _convert(key, value, flags[key])
    options = AssetOptions.from_settings(opts)
    ns = fit_namespace(application, args, options, "", Path("."), "cpu")
    if application == "sdf":
        from vqad.app.commands.sdf import fit_sdf_configs

        configs = fit_sdf_configs(ns)
    else:
        from vqad.app.commands.nerf import fit_nerf_configs

        configs = fit_nerf_configs(ns)[:4]
        args["eval_views"] = ns.eval_views
    return args, options, [{k: v for k, v in asdict(c).items() if k not in CADENCE_TRAIN} for c in configs]




#: settings added after batch results were first fingerprinted, with the value that means what a fit did before
#: them: a config holding that value hashes as it did then, so an upgrade does not refit a whole catalogue
ADDED_SINCE_FINGERPRINTS = {"appearance": "none"}


def _config_text(cfg):
    """A config's dataclass repr (what fingerprints have always hashed) without the settings of
    :data:`ADDED_SINCE_FINGERPRINTS` that hold their old-behaviour value."""
    if not hasattr(cfg, "__dataclass_fields__"):
        return cfg
    shown = [f for f in fields(cfg) if f.repr and not (f.name in ADDED_SINCE_FINGERPRINTS
                                                       and getattr(cfg, f.name) == ADDED_SINCE_FINGERPRINTS[f.name])]
    return f"{type(cfg).__qualname__}(" + ", ".join(f"{f.name}={getattr(cfg, f.name)!r}" for f in shown) + ")"


def _hash(application: str, stamp: list, args: dict, configs: list, drop: tuple[str, ...], **more) -> str:
    payload = {"batch": BATCH_FORMAT, "application": application, "input": stamp,
               "args": {k: v for k, v in args.items() if k not in CADENCE_SETTINGS and k not in drop},
               "configs": [_config_text(c) for c in configs], **more}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def fingerprint(application: str, stamp: list, args: dict, options: AssetOptions, configs: list) -> str:
    """A hash of everything an asset's result depends on (not threads, device or checkpoint cadence)."""
    return _hash(application, stamp, args, configs, (), options=asdict(options))


def fit_fingerprint(application: str, stamp: list, args: dict, options: AssetOptions, configs: list) -> str:
    """A hash of what an asset's fit depends on: :func:`fingerprint` less the export and evaluation settings
    (:data:`EVAL_ARGS`, the options), so that changing only those evaluates the kept fit again. Whether it is
    evaluated counts under a time cap: the evaluation's share of ``minutes`` is not the fit's."""
    capped = args.get("max_minutes") is not None  # (the dest of the fit commands' --minutes)
    return _hash(application, stamp, args, configs, EVAL_ARGS[application], fit=True,
                 **({"eval": options.eval} if capped else {}))


def _procedural_names() -> tuple[str, ...]:
    from vqad.nerf.formats import PROCEDURAL_NAMES

    return PROCEDURAL_NAMES


def application_of(source: str, where: str) -> str:
    """``"sdf"`` for a mesh file, ``"nerf"`` for a capture folder (or its transforms / poses file) or a
    built-in scene; a one-line error when the input does not exist."""
    from vqad.app.sweep import detect_kind

    try:
        return detect_kind(source)
    except VqadError as exc:
        raise InputError(f"{where}: {exc}") from None




def discover(root: Path, exclude: Path | None = None) -> list[Path]:
    """The assets of a directory job: mesh files and capture folders under ``root`` (sorted; hidden
    entries, ``exclude`` (this job's output folder) and every other batch or sweep output folder
    skipped, as their meshes are results, not inputs). A capture folder is one asset, not searched.

    Linked folders are searched once each (by their real path: a link back up the tree, or a second link to
    one folder, adds nothing); a file reached twice (a link beside it) is one asset, the file itself over a
    link to it. A mesh name that is a dangling link, or a link loop, is an :class:`InputError` naming it."""
    from vqad.nerf.formats import detect_format
    from vqad.sdf.mesh import MESH_SUFFIXES

    def is_capture(d: Path) -> bool:
        try:
            detect_format(d)
            return True
        except VqadError:
            return False

    order: dict[Path, int] = {}  # every candidate -> the order the walk met it
    seen: dict[Path, Path] = {}  # real path -> the entry kept
    folders: set[Path] = set()  # the real paths of the folders searched

    def real(p: Path) -> Path:
        try:
            return p.resolve(strict=True)
        except FileNotFoundError:
            raise InputError(f"{p} is a symbolic link to {os.readlink(p)}, which does not exist: fix or remove the "
                             "link") from None
        except (OSError, RuntimeError) as exc:  # a loop of links, or a part that cannot be read
            raise InputError(f"{p}: cannot follow it ({_one_line(exc)}): fix or remove it") from None

    def walk(d: Path) -> None:
        try:
            here = d.resolve(strict=True)
            entries = sorted(d.iterdir())
        except (OSError, RuntimeError) as exc:
            raise InputError(f"cannot list {d} ({getattr(exc, 'strerror', None) or exc}): check it and its "
                             "permissions") from None
        if here in folders:
            return
        folders.add(here)
        for p in entries:
            if p.name.startswith("."):
                continue
            is_dir = p.is_dir()
            if (exclude is not None and is_dir and p.resolve() == exclude) or (is_dir and is_output_folder(p)):
                continue
            if is_dir and not is_capture(p):
                walk(p)
            elif is_dir or p.suffix.lower() in MESH_SUFFIXES:
                r = real(p)
                order[p] = len(order)
                if r not in seen or (seen[r].is_symlink() and not p.is_symlink()):
                    seen[r] = p

    if is_capture(root):
        return [root]
    try:
        walk(root)
    except RecursionError:
        raise InputError(f"{root} holds folders nested too deep to search: give a job file listing the assets") from None
    return sorted(seen.values(), key=order.__getitem__)


def _asset_key(source: str, root: Path, name, where: str) -> str:
    """The asset's output folder under OUT: ``name``, else its path under ``root`` without the file's
    suffix (an input outside ``root``: its absolute path); a built-in scene: its name."""
    if name is not None:
        if not isinstance(name, str) or not name.strip() or "\\" in name:
            raise InputError(f"{where}: name must be a relative path such as \"chairs/c1\", got {name!r}")
        p = PurePosixPath(name.strip())
        if p.is_absolute() or ".." in p.parts or str(p) == ".":
            raise InputError(f"{where}: name must be a relative path inside the output folder, got {name!r}")
        return _checked_key(p.as_posix(), where)
    if source in _procedural_names():
        return _checked_key(source.replace(":", "-"), where)
    p = Path(source)
    try:
        rel = p.relative_to(root)
    except ValueError:
        rel = Path(*p.parts[1:])
    if p.is_file() and rel.suffix:
        rel = rel.with_suffix("")
    if str(rel) in ("", "."):
        rel = Path(p.stem if p.is_file() else p.name)
    return _checked_key(rel.as_posix(), where, "the input's path")


#: characters that reorder the text around them (a name could show as another one)
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _checked_key(key: str, where: str, what: str = "name") -> str:
    """``key`` if it can be an asset folder on any file system the outputs may go to: valid UTF-8, no control
    or text-reordering characters, no part longer than :data:`MAX_NAME_BYTES`, not one of the output root's own
    files (in any case)."""

    def fix(name: str) -> str:  # a name is changed in the job file; a path by renaming, or in a job file
        return f"give {name}" if what == "name" else 'rename the file, or list it in a job file with a name = "..."'

    name = 'a name = "..."'
    if any(0xD800 <= ord(c) <= 0xDFFF for c in key):  # a file name that is not UTF-8 (Python's surrogate escapes)
        raise InputError(f"{where}: {what} {key!r} is not valid UTF-8 text: " + fix(f"{name} in UTF-8"))
    bad = next((c for c in key if unicodedata.category(c) == "Cc" or c in _BIDI_CONTROLS), None)
    if bad is not None:
        raise InputError(f"{where}: {what} {key!r} holds the control character {bad!r}: " + fix(f"{name} without it"))
    long = next((part for part in key.split("/") if len(part.encode("utf-8")) > MAX_NAME_BYTES), None)
    if long is not None:
        raise InputError(f"{where}: {what} {key!r} has a part of {len(long.encode('utf-8'))} bytes; folder names stop "
                         f"at {MAX_NAME_BYTES}: " + fix('a shorter name = "..."'))
    if _folder_identity(key.split("/")[0]) in {_folder_identity(n) for n in RESERVED_NAMES}:
        raise InputError(f"{where}: {what} {key!r} is a file of the output folder itself "
                         f"({', '.join(RESERVED_NAMES)}): " + fix('another name = "..."'))
    return key


def parse_value(text: str):
    """A command-line value as TOML reads it (``6`` → 6, ``false``, ``0.5``), else the text itself
    (``3:6``, ``dense``)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except ValueError:
        return text


def parse_override(text: str) -> tuple[str, object]:
    """``--set KEY=VALUE`` → ``(key, value)``."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise InputError(f"--set takes KEY=VALUE (a fit setting or batch option, e.g. --set bits=6), got {text!r}")
    return key.strip().replace("-", "_"), parse_value(value.strip())


def _table(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise InputError(f"{where} must be a table of settings, got {value!r}")
    return {str(k).replace("-", "_"): v for k, v in value.items()}


def load_job(source: str | Path, out: str | Path | None = None, overrides: dict | None = None) -> Job:
    """Read and check a job (a .toml / .json file, or a directory of assets); nothing is written.

    ``overrides`` (key → value, from the command line) apply to every asset that has the setting;
    one that no asset has is an error. See the module docstring for the format.
    """
    source = Path(source)
    if source.exists() and not (source.is_dir() or source.is_file()):
        raise InputError(f"{source} is not a job file or folder (a device, pipe or socket): give a .toml / .json job "
                         "file or a directory of assets")
    if source.is_dir():
        base, data, name = source, {}, str(source)
    elif source.suffix.lower() in (".toml", ".json") or source.is_file():
        from vqad.app.sweep import load_config_file

        base, data, name = source.parent, load_config_file(source, "job file"), source.name
        unknown = sorted(set(data) - set(JOB_KEYS))
        if unknown:
            raise InputError(f"{name}: unknown key(s) {', '.join(map(repr, unknown))}: a job has {', '.join(JOB_KEYS)} "
                             "(settings go in [defaults] or an asset's table)")
    else:
        raise InputError(f"job not found: {source} (give a .toml / .json job file or a directory of assets)")
    for key in ("out", "root"):
        if key in data and (not isinstance(data[key], str) or not data[key]):
            raise InputError(f"{name}: {key} must be a path, got {data[key]!r}")
    root = (base / data.get("root", ".")).resolve()
    if not root.is_dir():
        raise InputError(f"{name}: root {root} is not a directory")
    if out is None and "out" not in data:
        raise InputError(f"{name}: no output folder: give --out OUT" + ("" if source.is_dir() else " (or out = \"...\" in the job file)"))
    out_dir = Path(out).resolve() if out is not None else (base / data["out"]).resolve()
    _check_out_dir(out_dir, name)
    defaults = _table(data.get("defaults", {}), f"{name}: [defaults]")
    per_app = {app: _table(defaults.pop(app, {}), f"{name}: [defaults.{app}]") for app in FIT_COMMANDS}
    for app, table in per_app.items():
        if "application" in table:
            raise InputError(f"{name}: [defaults.{app}] holds the settings of {app} assets; application has no place "
                             "in it (the table's name says it)")
    reader = _JobReader(name, base, root, out_dir, defaults, per_app,
                        {str(k).replace("-", "_"): v for k, v in (overrides or {}).items()})
    if source.is_dir():
        # under the resolved root (the keys are paths under it), each entry itself unresolved (a link keeps its name)
        entries = [str(p) for p in discover(root, exclude=out_dir)]
        if not entries:
            raise InputError(f"no assets in {source}: expected mesh files (.obj, .ply, ...) or capture folders")
    else:
        entries = data.get("assets")
        if not isinstance(entries, list) or not entries:
            raise InputError(f"{name}: no assets: list them as [[assets]] tables with a path, or assets = [\"a.obj\", ...]")
    # a found file's name is literal, not a pattern ("scan[1].obj")
    specs = [spec for i, entry in enumerate(entries, 1)
             for spec in reader.specs(entry, f"{name}: asset {i}", literal=source.is_dir())]
    reader.check_overrides(specs)
    _check_keys(specs, name)
    return Job(source=source, root=root, out=out_dir, assets=specs)


def _check_out_dir(out_dir: Path, name: str) -> None:
    """The output folder is new, empty or an earlier batch's (it holds ``results.jsonl`` or ``.batch.lock``):
    a batch writes and replaces ``results.*`` and asset folders there, so a folder of other files is refused."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{name}: the output path {out_dir} exists and is not a directory: give a folder")
    from vqad.app.commands.common import refuse_foreign_dir

    refuse_foreign_dir(out_dir, (RESULTS, LOCK), f"{name}: the output folder {out_dir}", "batch")


@dataclass
class _JobReader:
    """Turns a job's asset entries into checked :class:`AssetSpec` s."""

    name: str  # the job, as errors name it
    base: Path  # what relative paths are relative to
    root: Path  # the input tree mirrored under out_dir
    out_dir: Path
    defaults: dict  # [defaults] without its per-application tables
    per_app: dict  # application -> [defaults.<application>]
    overrides: dict  # command line: key -> value
    used: set = dfield(default_factory=set)  # overrides some asset took

    def specs(self, entry, where: str, literal: bool = False) -> list[AssetSpec]:
        """The assets of one entry (a path, or a table with a path, maybe a glob, and settings); with ``literal``
        the path is a file's name as found (``[``, ``*`` and ``?`` are themselves)."""
        entry = _table({"path": entry} if isinstance(entry, str) else entry, where)
        path = entry.pop("path", None)
        if not isinstance(path, str) or not path:
            raise InputError(f"{where}: needs a path (a mesh file or a capture folder), got {path!r}")
        name = entry.pop("name", None)
        sources = [path] if literal else _expand(path, self.base, self.out_dir, f"{where} ({path})")
        if name is not None and len(sources) > 1:
            raise InputError(f"{self.name}: {path}: name names one asset's folder, but the pattern matches {len(sources)}")
        return [self._spec(src, entry, name, f"{self.name}: {path if len(sources) == 1 else Path(src).name}")
                for src in sources]

    def _spec(self, source: str, entry: dict, name, where: str) -> AssetSpec:
        app = application_of(source, where)
        stated = entry.get("application", self.defaults.get("application"))
        if stated is not None and stated != app:
            raise InputError(f"{where}: application {stated!r}, but {'a mesh file is an sdf' if app == 'sdf' else 'a capture is a nerf'} asset")
        merged = {k: v for layer in (self.defaults, self.per_app[app], entry) for k, v in layer.items() if k != "application"}
        for k, v in self.overrides.items():
            if has_setting(app, k):
                merged[k] = v
                self.used.add(k)
        bad = [k for k, v in merged.items() if isinstance(v, (list, dict))]
        if bad:
            raise InputError(f"{where}: {bad[0]} must be a single value, got {merged[bad[0]]!r}")
        try:
            args, options, configs = resolve_settings(app, tuple(sorted(merged.items())))
            if app == "nerf" and args["format"] == "auto" and source not in _procedural_names():
                from vqad.nerf.formats import detect_format

                detect_format(source)  # what a capture is, before anything runs
        except VqadError as exc:
            raise InputError(f"{where}: {exc}") from None
        # (a capture given by its transforms.json: its whole folder, images included)
        stamp = input_stamp(str(capture_folder(Path(source), app)), self.out_dir)
        return AssetSpec(_asset_key(source, self.root, name, where), source, app, dict(args), options,
                         {**merged, "input": stamp}, fingerprint(app, stamp, args, options, configs),
                         fit_fingerprint(app, stamp, args, options, configs))

    def check_overrides(self, specs: list[AssetSpec]) -> None:
        """Refuse a command-line setting that no asset of the job takes, saying why."""
        unused = sorted(set(self.overrides) - self.used)
        if not unused:
            return
        try:
            _check_key(unused[0], specs[0].application)  # unknown, or a setting of the other kind of asset
        except InputError as exc:
            raise InputError(f"--set {unused[0]}: {exc}") from None
        raise InputError(f"--set {unused[0]}: no asset of this job takes it")


def _expand(path: str, base: Path, out_dir: Path, where: str) -> list[str]:
    """An asset entry's inputs: the path (relative to the job file), or every match of a glob."""
    if path in _procedural_names():
        return [path]
    full = Path(path) if Path(path).is_absolute() else base / path
    if not glob.has_magic(path):
        if not full.exists():
            raise InputError(f"{where}: not found: {full}")
        if not (full.is_file() or full.is_dir()):
            raise InputError(f"{where}: {full} is not a mesh file or a capture folder (a device, pipe or socket)")
        return [str(_as_named(full))]
    if "**" in path:
        _check_walk(full, where)
    hits = sorted(_as_named(Path(p)) for p in glob.glob(str(full), recursive=True))
    hits = [h for h in hits if out_dir not in h.parents and h != out_dir and not is_output_folder(h)
            and not any(is_output_folder(d) for d in h.parents)]
    if not hits:
        raise InputError(f"{where}: the pattern matches nothing (relative to {base})")
    return [str(h) for h in hits]


def _as_named(p: Path) -> Path:
    """``p`` with its folder resolved and its own name kept: an asset that is a link (``captures/lego`` -> the
    shared data) is named, and its output folder placed, by the path the job gives, not by its target's."""
    if p.name in ("", ".", ".."):
        return p.resolve()
    return p.parent.resolve() / p.name


#: the most folders a "**" of an asset pattern may search (a "/**/*" walked the whole file system)
MAX_WALK_FOLDERS = 20_000


def _check_walk(pattern: Path, where: str) -> None:
    """Refuse a recursive ``pattern`` whose fixed folder holds more than :data:`MAX_WALK_FOLDERS` folders, before
    the glob walks them (counted without following links, and stopped at the bound)."""
    parts = pattern.parts
    top = Path(*parts[:next(i for i, part in enumerate(parts) if glob.has_magic(part))])
    seen = 0
    for _ in os.walk(top):
        seen += 1
        if seen > MAX_WALK_FOLDERS:
            raise InputError(f"{where}: the pattern's '**' would search more than {MAX_WALK_FOLDERS:,} folders under "
                             f"{top}: start it in a lower folder (e.g. captures/**/transforms.json)")


def _folder_identity(key: str) -> str:
    """What a folder name is to the file systems outputs may go to: macOS's and Windows' ignore case, and macOS's
    Unicode normalization, so ``Box`` and ``box`` (or a composed and a decomposed ``é``) are one folder there."""
    return unicodedata.normalize("NFC", key).casefold()


def _check_keys(specs: list[AssetSpec], name: str) -> None:
    """One output folder per asset, none inside another's, on any file system (:func:`_folder_identity`)."""
    seen: dict[str, AssetSpec] = {}
    for s in specs:
        other = seen.get(_folder_identity(s.key))
        if other is not None and other.key != s.key:
            raise InputError(f"{name}: {other.source} and {s.source} map to the output folders {other.key!r} and "
                             f"{s.key!r}, one folder on macOS and Windows (they differ only in case or in Unicode "
                             'form): give one a name = "..."')
        if other is not None:
            what = "is listed twice" if other.source == s.source else f"and {other.source} both map to"
            raise InputError(f'{name}: {s.source} {what} the output folder {s.key!r}: give one a name = "..."')
        seen[_folder_identity(s.key)] = s
    for ident, spec in seen.items():
        outer = next((str(p) for p in PurePosixPath(ident).parents if str(p) in seen), None)
        if outer is not None:
            raise InputError(f"{name}: the output folder of {spec.source} ({spec.key!r}) would be inside that of "
                             f"{seen[outer].source} ({seen[outer].key!r}): give one a name = \"...\"")


# ================================================================================================
# one asset (in this process or in a Ray worker)
# ================================================================================================
@dataclass(frozen=True)
class WorkerContext:
    """What every asset of a run shares."""

    out: str  # the output root (absolute; the same path on every node)
    threads: int  # CPU threads of each fit
    device: str  # auto | cpu | cuda[:N]
    run: str  # this run's id (attempts are counted per run)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _now() -> float:
    return time.time()


#: outputs of an asset's earlier fit, removed when its settings changed (the log is kept)
STALE = ("checkpoint", "checkpoint.tmp", "checkpoint.old", "metrics.json", "*.vqad", "mesh_lod*.ply",
         "render_lod*.png", "*_lod*")


#: ... of which those an evaluation (or export) writes: removed when only their settings changed
EVAL_OUTPUTS = ("metrics.json", "*.vqad", "mesh_lod*.ply", "render_lod*.png", "*_lod*")


def keeps_fit(old: dict, spec: AssetSpec, d: Path) -> bool:
    """Whether the fit in ``d`` (of settings ``old``, its settings.json) is the one ``spec`` asks for, and
    complete: then only what follows it runs again."""
    if not spec.fit_fingerprint or old.get("fit_fingerprint") != spec.fit_fingerprint:
        return False
    cfg = _read_json(d / "checkpoint" / "config.json")  # (read only: a save that was killed half-way counts as none)
    if not isinstance(cfg, dict) or cfg.get("baked") or cfg.get("after_training") == "pending":
        return False
    step, steps = cfg.get("step"), (cfg.get("train") if isinstance(cfg.get("train"), dict) else {}).get("steps")
    # every step asked (a fit its time cap stopped would train on when resumed: it is fitted again, as before)
    return all(isinstance(v, int) and not isinstance(v, bool) for v in (step, steps)) and step >= steps > 0


def _clear(d: Path, patterns: tuple[str, ...] = STALE) -> None:
    for pattern in patterns:
        for p in d.glob(pattern):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None


def _claim(d: Path, spec: AssetSpec, ctx: WorkerContext, started: float) -> int:
    """Prepare ``d`` for this attempt: outputs of other settings cleared, no stale metrics.json (the
    asset's done-marker), the worker recorded. Returns the attempt number within this run."""
    old = _read_json(d / "settings.json")
    if old is None or old.get("fingerprint") != spec.fingerprint:
        if old is not None and keeps_fit(old, spec, d):
            print(f"only export or evaluation settings changed since this folder's last run: evaluating {spec.key} "
                  "again, its fit is kept")
            _clear(d, EVAL_OUTPUTS)
        else:
            if old is not None:
                print(f"settings changed since this folder's last fit: fitting {spec.key} from scratch")
            _clear(d)
        write_atomic(d / "settings.json", json.dumps({"fingerprint": spec.fingerprint,
                                                      "fit_fingerprint": spec.fit_fingerprint,
                                                      "settings": spec.settings}, indent=2, default=str))
    (d / "metrics.json").unlink(missing_ok=True)
    prev = _read_json(d / "worker.json") or {}
    attempt = prev.get("attempt", 0) + 1 if prev.get("run") == ctx.run else 1
    write_atomic(d / "worker.json", json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "attempt": attempt,
                                                "run": ctx.run, "started_at": started, "threads": ctx.threads}))
    return attempt


def _resume_step(d: Path) -> int | None:
    """The step of the asset's checkpoint to continue from (None: start a new fit)."""
    from vqad.checkpoint import recover_checkpoint

    ckpt = recover_checkpoint(d / "checkpoint")
    cfg = _read_json(ckpt / "config.json") if ckpt is not None else None
    if not cfg or cfg.get("baked"):
        return None
    return int(cfg.get("step", 0))


def _fit_sdf(spec: AssetSpec, ctx: WorkerContext, d: Path, resume: bool):
    """Fit a mesh asset; returns its summary, field and a function that evaluates a field of it."""
    from vqad.app.commands.sdf import MC_RESOLUTION, fit_sdf_configs, fit_sdf_summary
    from vqad.device import resolve_device
    from vqad.sdf.evaluate import evaluate_sdf
    from vqad.sdf.fit import fit_sdf
    from vqad.sdf.mesh import load_mesh

    args = spec.namespace(d, ctx.device)
    grid, dec, train = fit_sdf_configs(args)
    deadline = Deadline.for_job(train.max_minutes, evaluation=spec.options.eval)  # minutes cap the asset's whole job
    device = resolve_device(ctx.device)
    mesh = load_mesh(spec.source)
    fit_started = _now()
    res = fit_sdf(mesh, grid, dec, train, device, out_dir=d, resume=resume, quiet=True, mesh_path=spec.source,
                  deadline=deadline)
    o = spec.options

    def evaluate(field) -> dict:
        return evaluate_sdf(field, mesh, d, args.mc_resolution or MC_RESOLUTION, device, quiet=True,
                            chamfer_samples=o.chamfer_samples, iou_samples=o.iou_samples, renders=o.renders,
                            deadline=deadline)

    return fit_sdf_summary(spec.source, res), res.field, evaluate, fit_started, device


def _fit_nerf(spec: AssetSpec, ctx: WorkerContext, d: Path, resume: bool):
    """Fit a capture asset; returns its summary, field and a function that evaluates a field of it."""
    from vqad.app.commands.nerf import check_nerf_dataset, fit_nerf_configs, fit_nerf_summary, load_nerf_dataset
    from vqad.device import resolve_device
    from vqad.nerf.appearance import appearance_scoring
    from vqad.nerf.evaluate import evaluate_nerf
    from vqad.nerf.fit import fit_nerf

    args = spec.namespace(d, ctx.device)
    grid, dec, nerf_cfg, train, background = fit_nerf_configs(args)
    deadline = Deadline.for_job(train.max_minutes, evaluation=spec.options.eval)  # minutes cap the asset's whole job
    device = resolve_device(ctx.device)
    dataset = load_nerf_dataset(spec.source, args.format, args.downscale, background)
    check_nerf_dataset(args, dataset, train, resumed=resume)
    fit_started = _now()
    res = fit_nerf(dataset, grid, dec, train, device, out_dir=d, resume=resume, quiet=True, nerf_cfg=nerf_cfg,
                   deadline=deadline)
    summary = fit_nerf_summary(res)
    summary["eval_views"] = args.eval_views

    def evaluate(field) -> dict:
        return evaluate_nerf(field, dataset, args.eval_views, out_dir=d, max_views=args.eval_max_views,
                             save_images=spec.options.renders, quiet=True, deadline=deadline,
                             **appearance_scoring(res.appearance is not None, args.eval_views, res.appearance))

    return summary, res.field, evaluate, fit_started, device


FITS = {"sdf": _fit_sdf, "nerf": _fit_nerf}


def _process_asset(spec: AssetSpec, ctx: WorkerContext, d: Path, rec: dict) -> dict:
    """Fit (or resume), export and evaluate one asset into ``d``; the record's results."""
    from vqad import fileformat as F
    from vqad.api import load

    resumed_from = _resume_step(d)
    if resumed_from is not None:
        print(f"continuing the fit from its checkpoint at step {resumed_from}")
    summary, field, evaluate, fit_started, device = FITS[spec.application](spec, ctx, d, resumed_from is not None)
    rec.update(fit_started_at=fit_started, resumed_from=resumed_from)
    seconds = summary["fit_seconds"] if summary["fit_seconds"] is not None else summary["fit_seconds_this_run"]
    print(f"fit: {summary['steps']} steps in {seconds:.1f} s" + ("" if summary["fit_seconds"] is not None else
                                                                   " (this run's; the earlier runs' is not recorded)"))
    for line in field.size_lines():
        print(line)
    field.bake(fp16=True)  # what is evaluated is what is stored
    path = d / f"{spec.name}.vqad"
    nbytes = F.save(field, path, entropy=spec.options.entropy)
    size = field.size_report()
    print(f"wrote {path.name}: {nbytes:,} bytes{' (entropy-coded)' if spec.options.entropy else ''}")
    lods, eval_seconds = {}, 0.0
    if spec.options.eval:
        t0 = time.perf_counter()
        lods = evaluate(load(path, device=device))  # the decoded file, as a user would get it
        eval_seconds = time.perf_counter() - t0
        for lod, m in lods.items():
            print(f"LOD {lod}: " + "  ".join(f"{k} {v:.5g}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items()))
    summary["lods"] = lods
    rec.update(
        status="done", file=spec.file, bytes=nbytes, dense_fp16_grid_bytes=size["dense_fp16_bytes"],
        ratio=size["dense_fp16_bytes"] / nbytes, steps=summary["steps"], fit_seconds=summary["fit_seconds"],
        eval_seconds=eval_seconds, quality={str(lod): m.get(QUALITY[spec.application][0]) for lod, m in lods.items()},
        lods={str(lod): m for lod, m in lods.items()})
    return summary


def failed_record(spec: AssetSpec, error: str, **fields) -> dict:
    """An asset's results record, as failed with the one-line ``error`` until its run says otherwise."""
    return {"asset": spec.key, "status": "failed", "application": spec.application, "input": spec.source,
            "fingerprint": spec.fingerprint, "fit_fingerprint": spec.fit_fingerprint, "settings": spec.settings,
            "error": error, **fields}


def run_asset(spec: AssetSpec, ctx: WorkerContext, submitted_at: float) -> dict:
    """Fit, export and evaluate one asset into ``OUT/<key>/``: the task of a Ray worker, and of
    ``--local``. Returns its results record (``status`` ``"done"`` or ``"failed"`` with the one-line
    ``error``); output goes to the asset's log. A problem of the asset is its record's error, never
    an exception; Ctrl-C (KeyboardInterrupt) saves the fit's checkpoint and propagates."""
    from vqad.device import set_threads

    started, cpu0 = _now(), time.process_time()
    set_threads(ctx.threads)
    d = Path(ctx.out) / spec.key
    rec = failed_record(spec, None, worker=f"{socket.gethostname()}:{os.getpid()}", threads=ctx.threads,
                        device=ctx.device, run=ctx.run, submitted_at=submitted_at, started_at=started)
    try:
        d.mkdir(parents=True, exist_ok=True)
        log = open(d / "log.txt", "a", buffering=1, encoding="utf-8")
    except OSError as exc:
        rec.update(error=f"cannot write {d}: {exc.strerror or exc} (every worker needs the output folder at this path)",
                   finished_at=_now())
        return rec
    with log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            rec["attempt"] = _claim(d, spec, ctx, started)
            print(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} {spec.key} ({spec.application}, {spec.source}): attempt "
                  f"{rec['attempt']} of run {ctx.run} on {rec['worker']}, {ctx.threads} thread(s), device {ctx.device}")
            summary = _process_asset(spec, ctx, d, rec)
            rec.update(finished_at=_now(), cpu_seconds=time.process_time() - cpu0)  # all of this process's threads
            write_atomic(d / "metrics.json", json.dumps({**summary, "batch": rec}, indent=2, default=str))  # last
        except VqadError as exc:
            rec.update(status="failed", error=_one_line(exc), finished_at=_now())
        except KeyboardInterrupt:
            step = _resume_step(d)  # what the interrupt left: a checkpoint (a fit saves one as it stops), or none yet
            print("interrupted: " + (f"the fit's checkpoint (step {step}) is saved; the next run of the job continues it"
                                     if step is not None else "before the fit saved a checkpoint (a radiance field's "
                                     "octree pass saves none); the next run of the job starts this asset again"))
            raise
        except Exception as exc:  # a bug, not the asset's fault: its traceback goes to the log
            traceback.print_exc()
            rec.update(status="failed", finished_at=_now(), error=f"{type(exc).__name__}: {_one_line(exc)} (unexpected: "
                                                                 f"the traceback is in {spec.key}/log.txt)")
        print(f"== {rec['status']}" + (f": {rec['error']}" if rec["error"] else "")
              + f" ({rec['finished_at'] - started:.1f} s)")
    release_freed_memory()  # the next asset in this process starts from what is live, not this one's peak
    return rec


# ================================================================================================
# the results: an append-only log, the table
# ================================================================================================
def read_results(out: Path) -> dict[str, dict]:
    """The latest record of every asset in ``out/results.jsonl`` (a line torn by a crash, or one whose asset and
    status are not text, is skipped)."""
    latest: dict[str, dict] = {}
    try:
        lines = (Path(out) / RESULTS).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return latest
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the results log {Path(out) / RESULTS}: {getattr(exc, 'strerror', None) or exc} "
                         "(it must be the file an earlier vqad batch wrote: move it away or give another --out)") from None
    for line in lines:
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(rec, dict) and isinstance(rec.get("asset"), str) and isinstance(rec.get("status"), str):
            latest[rec["asset"]] = rec
    return latest


def _fmt(v, spec: str) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _matched(rec: dict) -> dict[str, float]:
    """Each LOD's ``psnr_matched`` (held-out photos' exposure matched: fits with a per-view appearance), if any."""
    lods = rec.get("lods") if isinstance(rec.get("lods"), dict) else {}
    return {lod: m["psnr_matched"] for lod, m in lods.items() if isinstance(m, dict) and m.get("psnr_matched") is not None}


def eval_errors(rec: dict) -> list[str]:
    """``"LOD L: why"`` for each LOD of a finished asset whose evaluation failed (its file is written and
    good; that LOD has no quality)."""
    lods = rec.get("lods") if isinstance(rec.get("lods"), dict) else {}
    return [f"LOD {lod}: {m['error']}" for lod, m in sorted(lods.items(), key=lambda kv: int(kv[0]))
            if isinstance(m, dict) and m.get("error")]


def _cell(text) -> str:
    """``text`` as one cell of a markdown table (a ``|`` would start another cell)."""
    return str(text).replace("|", "\\|")


def _quality_text(rec: dict) -> str:
    spec = ".5f" if rec.get("application") == "sdf" else ".2f"
    matched = _matched(rec)
    return " · ".join(f"L{lod} {_fmt(q, spec)}" + (f" ({_fmt(matched[lod], spec)})" if lod in matched else "")
                      for lod, q in sorted((rec.get("quality") or {}).items(), key=lambda kv: int(kv[0])))


def write_reports(out: Path, records: list[dict]) -> None:
    """``results.csv`` (one column per LOD's quality, and per LOD's ``psnr_matched`` where a fit has it) and
    ``results.md`` of ``records``."""
    lods = sorted({int(lod) for r in records for lod in (r.get("quality") or {})})
    matched = sorted({int(lod) for r in records for lod in _matched(r)})
    cols = ["asset", "application", "status", "bytes", "ratio", "metric", *[f"lod{lod}" for lod in lods],
            *[f"lod{lod}_psnr_matched" for lod in matched],
            "fit_seconds", "eval_seconds", "steps", "resumed_from", "worker", "threads", "error"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in records:
        row = {**r, "metric": QUALITY[r["application"]][0] if r["status"] == "done" and r.get("quality") else None,
               "error": r.get("error") or "; ".join(eval_errors(r)) or None,
               **{f"lod{lod}": q for lod, q in (r.get("quality") or {}).items()},
               **{f"lod{lod}_psnr_matched": q for lod, q in _matched(r).items()}}
        w.writerow({c: ("" if row.get(c) is None else (f"{row[c]:.6g}" if isinstance(row[c], float) else row[c]))
                    for c in cols})
    write_atomic(Path(out) / RESULTS_CSV, buf.getvalue())
    done = [r for r in records if r["status"] == "done"]
    failed = [r for r in records if r["status"] != "done"]
    L = ["# vqad batch results", "",
         f"{len(done)} assets done, {len(failed)} failed. **size**: the .vqad file as written; **ratio**: the dense "
         "fp16 feature grid of the same octree ÷ the file; quality per LOD of the decoded file: "
         + ", ".join(f"{label} ({app})" for app, (_, label) in QUALITY.items())
         + (" (in brackets: with each held-out photo's exposure matched, psnr_matched)" if any(map(_matched, done))
            else "") + ".", "",
         "| asset | application | size kB | ratio | quality per LOD | fit s | worker |", "|---|---|---|---|---|---|---|"]
    for r in done:
        L.append(f"| {_cell(r['asset'])} | {r['application']} | {r['bytes'] / 1e3:,.1f} | {r['ratio']:.1f}× | "
                 f"{_quality_text(r) or '–'} | {_fmt(r.get('fit_seconds'), ',.1f')} | {_cell(r.get('worker', '–'))} |")
    unmeasured = [(r, e) for r in done for e in eval_errors(r)]
    if unmeasured:
        L += ["", "## Evaluation errors (the file is written; these LODs have no quality)", "", "| asset | error |",
              "|---|---|"]
        L += [f"| {_cell(r['asset'])} | {_cell(e)} |" for r, e in unmeasured]
    if failed:
        L += ["", "## Failed", "", "| asset | error |", "|---|---|"]
        L += [f"| {_cell(r['asset'])} | {_cell(r.get('error'))} |" for r in failed]
    write_atomic(Path(out) / RESULTS_MD, "\n".join(L) + "\n")


# ================================================================================================
# running a job
# ================================================================================================
#: what ``--ray`` takes besides ``auto``: ``host:port``, ``[v6]:port``, or Ray Client's ``ray://host:port``
_RAY_ADDRESS = re.compile(r"(ray://)?([A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]):\d{1,5}")


def check_local_cores(threads: int) -> None:
    """A local Ray (``--ray auto``) runs no fit of more threads than this machine's cores."""
    from vqad.device import available_cores

    cores = available_cores()
    if threads > cores:
        raise InputError(f"--threads {threads} per fit, but this machine has {cores} core(s): no fit could start; "
                         f"use --threads {cores} or fewer")


@dataclass
class RunConfig:
    """How a job runs (what each asset computes is in its settings)."""

    local: bool = False  # every asset in this process, one after another
    ray: str | None = None  # "auto": a local Ray for the job; else a running cluster's address; None: see resolved()
    threads: int | None = None  # CPU threads per fit (None: --local every core, Ray $VQAD_THREADS or 1)
    device: str = "auto"  # auto | cpu | cuda[:N] (with Ray: auto | cpu | cuda)
    retries: int | None = None  # Ray: runs of a task whose worker died (Ray's max_retries; None: RETRIES)
    quiet: bool = False  # no progress bar or plan
    command: str = ""  # the command that resumes the job (said on Ctrl-C)

    RETRIES = 3

    @property
    def max_retries(self) -> int:
        return self.RETRIES if self.retries is None else self.retries

    def validate(self) -> None:
        if self.local and self.ray is not None:
            raise InputError("--local and --ray exclude each other: choose one")
        if self.retries is not None and self.retries < 0:
            raise InputError(f"--retries must be >= 0, got {self.retries}")
        if self.local and self.retries is not None:
            raise InputError("--retries applies to Ray tasks (a worker that died); --local runs no task: remove it")
        if self.ray is not None and self.ray != "auto" and not _RAY_ADDRESS.fullmatch(self.ray):
            raise InputError(f"--ray takes auto or a cluster's address host:port (ray://host:port for Ray Client), "
                             f"got {self.ray!r}")

    def executor(self, note=print) -> str:
        """``"local"`` or ``"ray"``: without a flag Ray when it is installed; ``--ray auto`` without Ray
        runs locally with a note; ``--ray ADDRESS`` without Ray is an error."""
        if self.local:
            return "local"
        try:
            import ray  # noqa: F401
        except ImportError:
            if self.ray not in (None, "auto"):
                raise InputError(f"--ray {self.ray} needs Ray on this machine: pip install 'vqad[ray]' (or run --local)") from None
            note("vqad batch: Ray is not installed (pip install 'vqad[ray]'): running the assets one after another here (--local)"
                 + ("; --retries does not apply there" if self.retries is not None else ""))
            return "local"
        return "ray"

    def fit_threads(self, executor: str) -> int:
        """Threads per fit: ``--threads``; else for Ray ``$VQAD_THREADS`` or 1 (the most fits at once:
        docs/benchmarks/threads.md), for --local every core (:func:`vqad.device.resolve_threads`)."""
        from vqad.device import resolve_threads

        if self.threads is None and executor == "ray" and not os.environ.get("VQAD_THREADS", "").strip():
            return 1
        return resolve_threads(self.threads)


@dataclass
class Plan:
    """Which assets of a job run, which are skipped, and why."""

    run: list[AssetSpec] = dfield(default_factory=list)
    skipped: list[str] = dfield(default_factory=list)  # finished earlier with the same settings
    recovered: list[dict] = dfield(default_factory=list)  # finished, but the driver died before recording it
    reasons: dict[str, str] = dfield(default_factory=dict)  # asset → why it runs again


def _changed(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if not keys:
        return "vqad's defaults changed"
    return ", ".join(f"{k}: {old.get(k, '(default)')!r} → {new.get(k, '(default)')!r}" for k in keys[:4]) \
        + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")


def plan(job: Job) -> Plan:
    """Skip what is finished with the same settings; say why the others run."""
    latest = read_results(job.out)
    p = Plan()
    for spec in job.assets:
        rec = latest.get(spec.key)
        # the folder's outputs are this fit's only while its settings.json says so: a run with other settings,
        # stopped before its record, leaves the record of an earlier fit beside a folder it has started to replace
        settings = _read_json(job.out / spec.key / "settings.json") or {}
        folder = settings.get("fingerprint")
        replaced = folder not in (None, spec.fingerprint)
        ours = not replaced and (job.out / spec.file).is_file()
        done = bool(rec) and rec.get("status") == "done" and rec.get("fingerprint") == spec.fingerprint
        if done and ours:
            p.skipped.append(spec.key)
            continue
        marker = (_read_json(job.out / spec.key / "metrics.json") or {}).get("batch")
        if marker and marker.get("status") == "done" and marker.get("fingerprint") == spec.fingerprint and ours:
            p.recovered.append(marker)  # finished after the driver's last record
            continue
        if done and replaced:
            p.reasons[spec.key] = ("its folder holds the outputs of a run with other settings that was stopped: "
                                   "fitting again")
        elif rec is None:
            p.reasons[spec.key] = "new"
        elif rec.get("fingerprint") != spec.fingerprint:
            kept = keeps_fit(settings, spec, job.out / spec.key)  # as _claim decides
            p.reasons[spec.key] = (f"{'only export or evaluation ' if kept else ''}settings changed "
                                   f"({_changed(rec.get('settings') or {}, spec.settings)})"
                                   + ("; its fit is kept, only evaluated again" if kept else ""))
        elif rec.get("status") != "done":
            p.reasons[spec.key] = f"failed earlier ({rec.get('error')}): trying again"
        else:
            p.reasons[spec.key] = f"its file {spec.file} is missing: fitting again"
        p.run.append(spec)
    return p


@dataclass
class BatchResult:
    records: list[dict]  # the latest record of every asset of the job
    ran: int  # assets run this time
    failed: int  # ... of which failed
    skipped: int
    seconds: float
    layout: str

    @property
    def exit_code(self) -> int:
        return 1 if any(r["status"] != "done" for r in self.records) else 0


class _Bar:
    """One progress bar of assets: done / running / failed, and the ETA."""

    def __init__(self, total: int, quiet: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="asset", desc="batch", disable=quiet, dynamic_ncols=True, file=sys.stderr)
        self.done = self.failed = self.running = 0
        self.quiet = quiet

    def show(self, running: int | None = None) -> None:
        if running is not None:
            self.running = running
        self.bar.set_postfix(done=self.done, running=self.running, failed=self.failed, refresh=True)

    def finished(self, rec: dict) -> None:
        if rec["status"] == "done":
            self.done += 1
            for e in eval_errors(rec):
                self.write(f"evaluation: {rec['asset']}: {e}")
        else:
            self.failed += 1
            self.write(f"failed: {rec['asset']}: {rec.get('error')}")
        self.bar.update(1)
        self.show()

    def write(self, text: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


class BatchRun:
    """``BatchRun(job, run).execute()``: plan, run, record and report one job."""

    def __init__(self, job: Job, run: RunConfig, log=print):
        run.validate()
        self.job, self.run, self.log = job, run, log
        self.executor = run.executor(note=lambda m: print(m, file=sys.stderr))
        self.threads = run.fit_threads(self.executor)
        if self.executor == "ray" and run.device.startswith("cuda:"):
            raise InputError(f"--device {run.device}: with Ray each task is given its GPU; use --device cuda")
        if self.executor == "ray" and run.ray in (None, "auto"):
            check_local_cores(self.threads)  # now, before the output folder is made
            if run.device.startswith("cuda"):  # a local cluster has this machine's GPUs
                from vqad.device import resolve_device

                resolve_device(run.device)
        elif self.executor == "ray":
            check_ray_reachable(run.ray)  # (ray.init retries a closed port for good, printing Ray's warnings)
        if self.executor == "local":
            from vqad.device import available_cores, resolve_device

            if self.threads > available_cores():
                print(f"vqad batch: warning: --threads {self.threads} per fit on the {available_cores()} core(s) this "
                      "process may use: threads beyond the cores only wait for each other", file=sys.stderr)
            resolve_device(run.device)  # --device cuda without a GPU: an error now, before anything is written
        self.plan = plan(job)
        self._last_report = 0.0

    def describe(self) -> list[str]:
        p = self.plan
        lines = [f"batch: {len(self.job.assets)} assets, {len(p.run)} to run"
                 + (f", {len(p.skipped) + len(p.recovered)} finished earlier (skipped)" if p.skipped or p.recovered else "")]
        lines += [f"  {key}: {why}" for key, why in p.reasons.items() if why != "new"]
        return lines

    def _record(self, rec: dict) -> None:
        append_record(self.job.out / RESULTS, json.dumps(rec, sort_keys=True, default=str), "results log")
        if time.monotonic() - self._last_report >= REPORT_EVERY_S:
            self._report()

    def _report(self) -> list[dict]:
        latest = read_results(self.job.out)
        records = [latest[s.key] for s in self.job.assets if s.key in latest]
        write_reports(self.job.out, records)
        self._last_report = time.monotonic()
        return records

    def execute(self) -> BatchResult:
        """Run every planned asset; KeyboardInterrupt (Ctrl-C, SIGTERM) stops the fits, each saving its
        checkpoint, writes the reports and propagates. One run at a time writes an output folder."""
        from vqad.app.commands.common import ensure_writable_dir

        out = ensure_writable_dir(self.job.out)
        with _exclusive(out):
            return self._execute(out)

    def _execute(self, out: Path) -> BatchResult:
        from vqad.fit import interrupt_guard

        self.plan = plan(self.job)  # again, now that this run holds the folder
        for rec in self.plan.recovered:
            self._record(rec)
        if not self.run.quiet:
            for line in self.describe():
                self.log(line)
        device = self.run.device
        if self.executor == "local":
            from vqad.device import resolve_device

            device = str(resolve_device(device))
        ctx = WorkerContext(out=str(out), threads=self.threads, device=device, run=uuid.uuid4().hex[:8])
        bar = _Bar(len(self.plan.run), self.run.quiet)
        t0 = time.perf_counter()
        ran: list[dict] = []

        def finished(rec: dict) -> None:
            self._record(rec)
            ran.append(rec)
            bar.finished(rec)

        layout = ""
        try:
            with interrupt_guard():
                if not self.plan.run:
                    layout = "nothing to run"
                elif self.executor == "local":
                    layout = f"--local: one fit at a time in this process, {self.threads} thread(s)"
                    if not self.run.quiet:
                        bar.write(f"batch: {layout}")
                    for spec in self.plan.run:
                        bar.show(running=1)
                        finished(run_asset(spec, ctx, _now()))
                else:
                    layout = _run_ray(self.plan.run, ctx, self.run, finished, bar)
        except KeyboardInterrupt:
            bar.close()
            self._report()
            raise
        bar.show(running=0)
        bar.close()
        records = self._report()
        failed = sum(r["status"] != "done" for r in ran)
        return BatchResult(records, len(ran), failed, len(self.plan.skipped) + len(self.plan.recovered),
                           time.perf_counter() - t0, layout)


@contextlib.contextmanager
def _exclusive(out: Path):
    """Hold ``out/.batch.lock`` while a run writes ``out`` (released by the kernel if the driver dies):
    a second driver on the same folder would fit the same assets twice."""
    import fcntl

    with open(out / LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise InputError(f"another vqad batch is running with the output folder {out}: wait for it to finish, "
                             "or give this one another --out") from None
        yield


def batch_running(out: Path) -> bool:
    """Whether another run holds ``out``'s lock now (for ``--dry-run``, which takes no lock and writes nothing)."""
    import fcntl

    try:
        fd = os.open(out / LOCK, os.O_RDONLY)
    except OSError:  # no lock file: no run has held the folder
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


#: seconds a TCP connection to a --ray address may take before it is judged unreachable
RAY_CONNECT_TIMEOUT_S = 5.0


def check_ray_reachable(address: str, timeout: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """Refuse a ``--ray host:port`` (or ``ray://host:port``) that takes no TCP connection within ``timeout``
    seconds: ``ray.init`` would retry it without end. Says nothing of what listens there (Ray's own check)."""
    m = _RAY_ADDRESS.fullmatch(address)
    if m is None:
        raise InputError(f"--ray must be auto, host:port or ray://host:port, got {address!r}")
    host, port = m.group(2).strip("[]"), int(address.rsplit(":", 1)[1])
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise InputError(f"cannot join the Ray cluster at {address}: no connection to {host} port {port} ({why}); "
                         "is `ray start --head` running there, and is this the address it printed?") from None


def _start_ray(run: RunConfig, threads: int):
    """Start (``--ray auto``) or join the Ray cluster; check that a task of ``threads`` CPUs (and a GPU
    with --device cuda) can run on some node. Returns ``(ray, gpus per task, description, started)``."""
    import logging

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing leaves this machine
    import ray

    from vqad.device import available_cores

    quiet_ray = {"log_to_driver": False, "logging_level": logging.ERROR}
    if run.ray in (None, "auto"):
        check_local_cores(threads)
        cores = available_cores()
        ray.init(address="local", num_cpus=cores, include_dashboard=False, **quiet_ray)
        where, started = f"a local Ray ({cores} CPUs)", True
    else:
        try:
            ray.init(address=run.ray, **quiet_ray)
        except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError, ... for a bad address
            raise InputError(f"cannot join the Ray cluster at {run.ray}: {_one_line(exc)} (is `ray start --head` running "
                             "there, is the address host:port, and with token authentication, the default of `ray start` "
                             "from Ray 2.59, are RAY_AUTH_MODE=token and the cluster's token set here?)") from None
        where, started = f"the Ray cluster at {run.ray}", False
    try:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        if not any(n.get("CPU", 0) >= threads for n in nodes):
            raise InputError(f"no node of {where} has {threads} CPUs for a fit (--threads {threads}): use fewer threads")
        gpus = 0
        if run.device.startswith("cuda") or (run.device == "auto" and sum(n.get("GPU", 0) for n in nodes) > 0):
            if not any(n.get("GPU", 0) >= 1 for n in nodes):
                raise InputError(f"--device {run.device}: {where} has no GPU; use --device cpu")
            gpus = 1
    except BaseException:
        if started:
            ray.shutdown()
        raise
    slots = sum(int(n.get("CPU", 0) // threads) for n in nodes)
    if gpus:
        slots = min(slots, sum(int(n.get("GPU", 0)) for n in nodes))
    desc = f"{where}: {slots} fit(s) at a time × {threads} thread(s)" + (", 1 GPU each" if gpus else "")
    return ray, gpus, desc, started


@contextlib.contextmanager
def _ray_messages(quiet: bool):
    """Ray's driver prints the errors its raylet publishes ("A worker died ...", "... the task will be retried")
    on stdout, whatever ``log_to_driver`` says, among the batch's own output: while this is held they go to stderr,
    one line each, or nowhere with ``--quiet`` (what they report is in results.jsonl: the attempt and the error).
    Ray's own printer is patched (``ray._private.worker.print_to_stdstream``, looked up at each call) and restored."""
    try:
        from ray._private import worker as ray_worker

        original = ray_worker.print_to_stdstream
    except (ImportError, AttributeError):  # another Ray: its messages stay as they are
        yield
        return

    def routed(data, *args, **kwargs):
        if isinstance(data, dict) and data.get("pid") == "raylet":
            if not quiet:
                for line in data.get("lines", []):
                    print(f"ray: {line}", file=sys.stderr, flush=True)
            return None
        return original(data, *args, **kwargs)

    ray_worker.print_to_stdstream = routed
    try:
        yield
    finally:
        ray_worker.print_to_stdstream = original


def _run_ray(todo: list[AssetSpec], ctx: WorkerContext, run: RunConfig, finished, bar: _Bar) -> str:
    """Every asset of ``todo`` as one Ray task; ``finished(record)`` as each returns."""
    with _ray_messages(run.quiet):
        return _run_ray_tasks(todo, ctx, run, finished, bar)


def _run_ray_tasks(todo: list[AssetSpec], ctx: WorkerContext, run: RunConfig, finished, bar: _Bar) -> str:
    from dataclasses import replace

    ray, gpus, layout, started = _start_ray(run, ctx.threads)
    if not run.quiet:
        bar.write(f"batch: {layout}")
    if gpus:
        ctx = replace(ctx, device="cuda")  # Ray gives each task its GPU as cuda:0
    elif ctx.device == "auto":
        ctx = replace(ctx, device="cpu")
    task = ray.remote(run_asset)
    pending: dict = {}
    try:
        for spec in todo:
            ref = task.options(num_cpus=ctx.threads, num_gpus=gpus, max_retries=run.max_retries, retry_exceptions=False,
                               name=f"vqad-batch:{spec.key}").remote(spec, ctx, _now())
            pending[ref] = spec
        total_cpus = ray.cluster_resources().get("CPU", 0)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in ready:
                spec = pending.pop(ref)
                try:
                    rec = ray.get(ref)
                except ray.exceptions.RayError as exc:  # the worker died more than --retries times, or Ray failed
                    rec = failed_record(spec, ray_error(exc, run.max_retries, spec.key), finished_at=_now())
                finished(rec)
            busy = total_cpus - ray.available_resources().get("CPU", 0)
            bar.show(running=min(len(pending), max(0, round(busy / ctx.threads))))
    except KeyboardInterrupt:
        # each fit saves its checkpoint on the KeyboardInterrupt a cancel raises in it
        for ref in pending:
            ray.cancel(ref, force=False)
        done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=CANCEL_WAIT_S) if pending else ([], [])
        for ref in done:
            try:
                finished(ray.get(ref))  # finished before the cancel reached it
            except ray.exceptions.RayError:
                pass
        raise
    finally:
        if started:
            ray.shutdown()
    return layout


def ray_error(exc: BaseException, retries: int, key: str) -> str:
    """One line for a task Ray could not complete: the last line of Ray's report (the cause), and what
    to check."""
    import re

    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines() if ln.strip()]
    cause = lines[-1] if lines else type(exc).__name__
    if "ModuleNotFoundError" in cause or "ImportError" in cause or "failed to import" in cause:
        return f"a Ray worker cannot import vqad: {cause} (every worker needs this vqad and torch installed)"
    return f"{type(exc).__name__}: {cause} (after up to {retries} retries; see {key}/log.txt)"


def run_job(job: Job, run: RunConfig, log=print) -> BatchResult:
    """Plan, run and report ``job``: see :class:`BatchRun`."""
    return BatchRun(job, run, log=log).execute()


def summary_line(res: BatchResult, out: Path) -> str:
    done = sum(r["status"] == "done" for r in res.records)
    failed = len(res.records) - done
    nbytes = sum(r.get("bytes") or 0 for r in res.records if r["status"] == "done")
    rate = f", {3600 * (res.ran - res.failed) / res.seconds:,.0f} assets/hour" if res.ran > res.failed else ""
    unmeasured = sum(bool(eval_errors(r)) for r in res.records if r["status"] == "done")
    return (f"batch: {len(res.records)} assets: {done} done ({res.skipped} finished earlier, skipped"
            + (f"; {unmeasured} with LODs the evaluation could not measure" if unmeasured else "") + f"), {failed} failed; "
            f"{nbytes / 1e6:,.2f} MB of .vqad files; this run {res.ran} in {res.seconds:,.1f} s{rate}; "
            f"results: {out / RESULTS_MD}")


__all__ = ["AssetOptions", "AssetSpec", "Job", "load_job", "discover", "RunConfig", "WorkerContext", "run_asset",
           "plan", "Plan", "BatchRun", "BatchResult", "run_job", "read_results", "write_reports", "summary_line",
           "parse_override", "parse_value", "fit_flags", "resolve_settings", "fingerprint"]
