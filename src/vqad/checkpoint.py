"""Checkpoints: tensors in safetensors, everything else in JSON. No pickles.

A checkpoint is a directory::

    config.json        field config (kind, grid, decoder, normalisation), step, train config, baked
    model.safetensors  octree codes, storages (training form, or stored form once baked), decoder, and
                       ``task.*``: what a fit trains outside the field (per-view appearance)
    optim.safetensors  optimizer state (for --resume)

It is written to a temporary sibling and renamed into place, so an interrupted save never leaves
a half-written checkpoint that looks complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vqad.atomicio import fsync_path
from vqad.config import GridConfig, is_real
from vqad.errors import InputError
from vqad.field import field_config, field_from_config, field_record
from vqad.grid import OctreeGrid, octree_args
from vqad.octree import SparseOctree
from vqad.storages import STORAGES

FORMAT_VERSION = 1


def _model_tensors(field) -> dict[str, torch.Tensor]:
    octree = field.grid.octree
    tensors = {"octree.codes": octree.codes[octree.max_level]}
    for i, s in enumerate(field.grid.storages):
        items = s.export_tensors() if s.baked else {k: v for k, v in s.state_dict().items()}
        for key, t in items.items():
            tensors[f"storage.{i}.{key}"] = t
    for key, t in field.decoder_state().items():
        tensors[f"decoder.{key}"] = t
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def _optim_tensors(optimizers: dict[str, torch.optim.Optimizer]) -> tuple[dict, dict]:
    tensors, meta = {}, {}
    for oname, opt in optimizers.items():
        sd = opt.state_dict()
        meta[oname] = {"param_groups": sd["param_groups"], "scalars": {}}
        for pid, st in sd["state"].items():
            for key, val in st.items():
                if torch.is_tensor(val):
                    tensors[f"{oname}.{pid}.{key}"] = val.detach().contiguous().cpu()
                else:
                    meta[oname]["scalars"][f"{pid}.{key}"] = val
    return tensors, meta


#: the prefix of the tensors a fit trains outside the field (:func:`read_task_tensors`)
TASK_PREFIX = "task."


#: the files of a checkpoint directory: :func:`save_checkpoint` replaces a directory that holds nothing else
CHECKPOINT_FILES = ("config.json", "model.safetensors", "optim.safetensors")


def is_checkpoint(path: str | Path) -> bool:
    """Whether the folder ``path`` holds a vqad checkpoint: a model.safetensors, and a config.json that names this
    format (a Hugging Face model's folder has the same two file names)."""
    path = Path(path)
    if not ((path / "config.json").is_file() and (path / "model.safetensors").is_file()):
        return False
    try:
        with open(path / "config.json", "rb") as f:
            return b'"vqad_checkpoint"' in f.read(4096)  # (the first key save_checkpoint writes)
    except OSError:
        return False


def check_checkpoint_target(path: str | Path) -> Path:
    """``path`` (absolute) if a checkpoint may be saved there: new, or a folder holding nothing but a
    checkpoint's files, as are its ``.tmp`` and ``.old`` siblings (a save replaces all three). A folder
    of anything else (a user's files, a fit's whole output) is refused with an :class:`InputError`,
    never deleted. Commands call it before their work, :func:`save_checkpoint` again before it writes."""
    path = Path(os.path.abspath(path))  # ("." and "dir/" have no name to add .tmp to)
    for d in (path, path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")):
        if not d.exists() and not d.is_symlink():
            continue
        if d.is_symlink() or not d.is_dir():
            raise InputError(f"cannot save a checkpoint to {path}: {d} is {'a link' if d.is_symlink() else 'a file'}, "
                             "not a checkpoint folder; move it away or choose another folder")
        other = sorted(p.name for p in d.iterdir() if p.name not in CHECKPOINT_FILES)
        if other:
            raise InputError(f"cannot save a checkpoint to {path}: {d} holds files that are not a checkpoint's "
                             f"({', '.join(other[:3])}{', ...' if len(other) > 3 else ''}), and a save replaces the "
                             "whole folder; move them away or choose another folder")
    return path


def save_checkpoint(path: str | Path, field, extra: dict | None = None, optimizers: dict | None = None,
                    task_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``field`` (and optimizer state, and ``task_tensors``: what the fit trains outside the field) to
    the directory ``path`` atomically; a folder there holding other files is refused
    (:func:`check_checkpoint_target`). Interrupted or failing while it writes, it removes its half-written
    ``path.tmp``; killed outright, :func:`recover_checkpoint` sorts out what is left."""
    path = check_checkpoint_target(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise InputError(f"cannot write checkpoint to {path}: {exc.strerror}") from exc
    try:
        _write_checkpoint_files(tmp, field, extra, optimizers, task_tensors)
    except BaseException:  # Ctrl-C, SIGTERM (interrupt_guard), a full disk: no half-written tmp is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(path.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    fsync_path(path.parent)
    return path


def _write_checkpoint_files(tmp: Path, field, extra, optimizers, task_tensors) -> None:
    """The files of :func:`save_checkpoint` into the empty folder ``tmp``, config.json last, all on disk."""
    cfg = {"vqad_checkpoint": FORMAT_VERSION, **field_config(field), "baked": field.baked, **(extra or {})}
    tensors = _model_tensors(field)
    tensors.update({TASK_PREFIX + k: v.detach().contiguous().cpu() for k, v in (task_tensors or {}).items()})
    save_file(tensors, str(tmp / "model.safetensors"))
    if optimizers:
        tensors, meta = _optim_tensors(optimizers)
        save_file(tensors, str(tmp / "optim.safetensors"))
        cfg["optimizers"] = meta
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))  # last: its presence marks tmp complete
    mode = (tmp / "config.json").stat().st_mode & 0o777  # what a new file gets here (the umask)
    for f in tmp.iterdir():  # on disk before the renames make it the checkpoint
        os.chmod(f, mode)  # (safetensors writes 0600: a shared checkpoint's tensors unreadable beside its config)
        fsync_path(f)
    fsync_path(tmp)


def _complete_step(d: Path) -> int | None:
    """The step of the checkpoint directory ``d`` if it is complete (config last, every file it names), else None."""
    try:
        cfg = json.loads((d / "config.json").read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if not (d / "model.safetensors").is_file() or (cfg.get("optimizers") and not (d / "optim.safetensors").is_file()):
        return None
    return int(cfg.get("step", 0)) if isinstance(cfg.get("step", 0), int) else None


def recover_checkpoint(path: str | Path) -> Path | None:
    """Put the newest complete checkpoint back at ``path`` after a save was killed; returns ``path``
    (or None when there is no complete checkpoint at all).

    :func:`save_checkpoint` writes ``path.tmp`` (config last), renames ``path`` to ``path.old``, then
    ``path.tmp`` to ``path``. Killed between those steps it leaves a complete ``path.tmp`` (newer) or
    only ``path.old``: the complete one with the highest step wins; the others are removed.
    """
    path = Path(path)
    cands = {d: _complete_step(d) for d in (path, path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old"))}
    complete = {d: st for d, st in cands.items() if st is not None}
    if not complete:
        return None
    best = max(complete, key=lambda d: (complete[d], d == path))  # ties: the one in place
    if best != path:
        stale = path.with_name(path.name + ".stale")
        if path.exists():
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(path, stale)
        os.replace(best, path)
        shutil.rmtree(stale, ignore_errors=True)
        fsync_path(path.parent)
    for d in cands:
        if d != path and d.exists():
            shutil.rmtree(d, ignore_errors=True)
    return path


def read_config(path: str | Path) -> dict:
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        inner = " (it holds checkpoint/: pass that)" if (Path(path) / "checkpoint" / "config.json").is_file() else ""
        raise InputError(f"{path} is not a vqad checkpoint (no config.json){inner}: pass a checkpoint directory or a "
                         f".vqad file")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4,300 digits
        raise InputError(f"cannot read {cfg_path}: {exc}: {DAMAGED}") from exc
    except RecursionError as exc:
        raise InputError(f"cannot read {cfg_path}: nested too deeply: {DAMAGED}") from exc
    if not isinstance(cfg, dict):
        raise InputError(f"{cfg_path} does not hold a JSON object: {DAMAGED}")
    version = cfg.get("vqad_checkpoint")
    if version != FORMAT_VERSION or isinstance(version, bool):
        newer = isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION
        raise InputError(f"{cfg_path}: checkpoint format {version!r}, but this vqad reads format {FORMAT_VERSION}: "
                         + ("written by a newer vqad: upgrade vqad" if newer else DAMAGED))
    step = cfg.get("step", 0)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise InputError(f"{cfg_path}: step must be a whole number >= 0, not {step!r}: {DAMAGED}")
    if "train" in cfg and not isinstance(cfg["train"], dict):
        raise InputError(f"{cfg_path}: its training settings are {type(cfg['train']).__name__}, not a JSON object: "
                         f"{DAMAGED}")
    return cfg


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu"):
    """Load a checkpoint directory; returns ``(field, config_dict)``."""
    path = Path(path)
    cfg = read_config(path)
    tensors = _read_tensors(path / "model.safetensors", device)
    for name, t in tensors.items():
        problem = _tensor_problem(name, t)
        if problem:
            raise InputError(f"{path / 'model.safetensors'}: tensor {name} {problem}: {DAMAGED}")
    try:
        return build_field(cfg, tensors, device, baked=bool(cfg.get("baked"))), cfg
    except InputError:
        raise
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError, AttributeError) as exc:
        raise InputError(f"{path} does not hold the model its config.json describes ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}): {DAMAGED}") from exc


#: the dtypes of a checkpoint's values (trained: float32; baked: float16) and of its integer tensors: an octree's
#: codes (int64) and a baked codebook's indices V (any of these integers)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def _tensor_problem(name: str, t: torch.Tensor) -> str | None:
    """What is wrong with the model tensor ``name``, or None: codes must be int64 and V integers (a bool or uint8
    octree cast silently into another model), every other tensor float32/16 and finite (a float64 1e300 became
    inf in float32 and a blank render exited 0; a fit skips non-finite steps, so its tensors stay finite)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "codes":
        return None if t.dtype == torch.int64 else f"is {t.dtype}, not the octree's int64 codes"
    if leaf == "V":
        return None if t.dtype in INDEX_DTYPES else f"is {t.dtype}, not a codebook's integer indices"
    if t.dtype not in FLOAT_DTYPES:
        return f"is {t.dtype}, not float32 or float16"
    return None if bool(torch.isfinite(t).all()) else "holds NaN or inf values"


#: what to do about a damaged checkpoint
DAMAGED = "the checkpoint is damaged; delete it to start the fit over, or put an intact copy in its place"


def _read_tensors(file: Path, device: torch.device | str = "cpu", prefix: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (only those whose name starts with ``prefix``, if given), or one
    :class:`InputError` line naming it and what to do."""
    try:  # the environment's errors (permissions, a vanished file) first: they are not damage
        with open(file, "rb"):
            pass
    except OSError as exc:
        raise InputError(f"cannot read {file}: {exc.strerror or exc}") from exc
    try:
        if not _utf8(file):  # safetensors takes only UTF-8 paths: read the bytes (a checkpoint at b'nu\xffck/')
            from safetensors.torch import load

            tensors = load(Path(file).read_bytes())
            return {k: t.to(device) for k, t in tensors.items() if prefix is None or k.startswith(prefix)}
        if prefix is None:
            return load_file(str(file), device=str(device))
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    except Exception as exc:  # safetensors raises several types on bad files
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"cannot read {file}: {msg}: {DAMAGED}") from exc


def _utf8(path) -> bool:
    try:
        os.fsencode(str(path)).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def build_field(cfg: dict, tensors: dict[str, torch.Tensor], device, baked: bool):
    """Rebuild a field from its config and named tensors (training or stored form)."""
    grid_cfg = GridConfig.from_stored(cfg["grid"])  # an old storage name is read as today's kind
    octree = SparseOctree.from_codes(tensors["octree.codes"].to(device), grid_cfg.base_level, grid_cfg.max_level)

    def sub(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    if baked:
        storages = [
            STORAGES[grid_cfg.storage].from_export(
                octree.num_vertices(level), grid_cfg.features, sub(f"storage.{i}."),
                **octree_args(STORAGES[grid_cfg.storage], octree, level), **cfg["storage_params"][i]
            )
            for i, level in enumerate(octree.levels)
        ]
        grid = OctreeGrid(octree, storages, grid_cfg).to(device)
    else:
        grid = OctreeGrid.from_octree(octree, grid_cfg)
        for i, s in enumerate(grid.storages):
            s.load_state_dict(sub(f"storage.{i}."))
    field = field_from_config(field_record(cfg), grid).to(device)  # (config.json holds the fit's records too)
    field.load_decoder_state(sub("decoder."))
    if baked:
        field.bake(fp16=False)
    return field


def read_task_tensors(path: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors a fit saved beside the model under ``task.<prefix>`` (:func:`save_checkpoint`'s
    ``task_tensors``), the prefix stripped, on the CPU (only those are read); the caller validates them."""
    full = TASK_PREFIX + prefix
    return {k[len(full):]: v for k, v in _read_tensors(Path(path) / "model.safetensors", prefix=full).items()}


def load_optimizer_state(path: str | Path, optimizers: dict[str, torch.optim.Optimizer], cfg: dict) -> None:
    """Restore optimizer state written by :func:`save_checkpoint`."""
    path = Path(path)
    meta = cfg.get("optimizers")
    if not meta or not (path / "optim.safetensors").is_file():
        raise InputError(f"{path} holds no optimizer state: it cannot be resumed (was it baked?)")
    if isinstance(meta, dict) and set(meta) != set(optimizers):
        raise InputError(
            f"{path}: its optimizer state is for the optimizers {sorted(meta)}, this fit uses {sorted(optimizers)} "
            "(the checkpoint comes from a vqad version or storage options that trained other parameter groups, "
            "e.g. codebook logits with SparseAdam where this version uses row-wise RMSprop): it cannot be resumed; "
            "start a new fit"
        )
    tensors = _read_tensors(path / "optim.safetensors")
    for oname, opt in optimizers.items():
        try:
            m = meta[oname]
            try:
                groups = _checked_param_groups(m["param_groups"], opt)
            except _OtherGroups as e:  # another grouping of the parameters (other learning-rate options)
                raise InputError(f"{path}: its optimizer state does not fit this fit's parameter groups ({e}); resume "
                                 "with the options (learning-rate scales) the checkpoint was written with") from None
            n_params = sum(len(g["params"]) for g in opt.param_groups)
            state: dict = {}
            for key, t in tensors.items():
                o, pid, k = key.split(".", 2)
                if o == oname:
                    state.setdefault(_param_id(pid, n_params), {})[k] = t
            for key, val in m["scalars"].items():
                pid, k = key.split(".", 1)
                if not (is_real(val) and 0 <= val < math.inf):
                    raise ValueError(f"{key} = {val!r} is not a count")
                state.setdefault(_param_id(pid, n_params), {})[k] = val
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise InputError(f"{path}: the optimizer state of {oname!r} is malformed ({type(exc).__name__}: {exc}): "
                             f"{DAMAGED}") from exc
        try:
            opt.load_state_dict({"state": state, "param_groups": groups})
        except (ValueError, TypeError, KeyError) as e:  # (the groups are this fit's: a state that does not fit them)
            raise InputError(f"{path}: the optimizer state of {oname!r} is malformed ({type(e).__name__}: {e}): "
                             f"{DAMAGED}") from None
        _check_state_values(path, oname, opt)


def _param_id(text: str, n_params: int) -> int:
    """A parameter's number in an optimizer's state (``0 .. n_params - 1``), or ValueError."""
    pid = int(text)
    if not 0 <= pid < n_params:
        raise ValueError(f"state for parameter {pid}, of {n_params}")
    return pid


class _OtherGroups(ValueError):
    """Well-formed parameter groups, but not this fit's: another count, or other parameters in them."""


def _checked_param_groups(saved, opt: torch.optim.Optimizer) -> list[dict]:
    """The parameter groups to load into ``opt``: its own (the hyperparameters this fit's configuration sets,
    which the checkpoint's must match), with the learning-rate schedule's state read from ``saved``, each
    value checked (``lr``, ``initial_lr``: positive finite numbers). :class:`_OtherGroups` when ``saved`` are
    groups of other parameters (a group or a parameter more or less), ValueError when they are malformed."""
    current = opt.state_dict()["param_groups"]
    ids = lambda g: isinstance(g, dict) and isinstance(g.get("params"), list) and all(  # noqa: E731
        isinstance(i, int) and not isinstance(i, bool) for i in g["params"])
    if not isinstance(saved, list) or not all(ids(g) for g in saved):
        raise ValueError("its parameter groups are not lists of parameter numbers")
    if [g["params"] for g in saved] != [g["params"] for g in current]:
        raise _OtherGroups(f"{len(saved)} groups of {[len(g['params']) for g in saved]} parameters, this fit has "
                           f"{len(current)} of {[len(g['params']) for g in current]}")
    groups = []
    for g, now in zip(saved, current):
        group = dict(now)
        for key in ("lr", "initial_lr"):
            if key in g:
                v = g[key]
                if not (is_real(v) and 0 < v < math.inf):
                    raise ValueError(f"{key} = {v!r} is not a learning rate")
                group[key] = float(v)
        groups.append(group)
    return groups


#: state values that are second moments or counts: never negative (a negative exp_avg_sq made the step NaN)
NON_NEGATIVE_STATE = ("step", "exp_avg_sq", "max_exp_avg_sq", "v", "t")


def _state_keys(opt: torch.optim.Optimizer, group: dict) -> tuple[str, ...] | None:
    """The keys a parameter's state holds after its first step in ``opt`` (None: not known, not checked)."""
    keys = getattr(type(opt), "STATE_KEYS", None)
    if keys is None and isinstance(opt, (torch.optim.Adam, torch.optim.SparseAdam)):  # (SparseRowAdam too)
        keys = ("step", "exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group.get("amsgrad") else ())
    return keys


def _check_state_values(path: Path, oname: str, opt: torch.optim.Optimizer) -> None:
    """Every parameter's state in ``opt`` is empty or holds the keys its optimizer's step makes
    (:func:`_state_keys`), each a finite float tensor (or a count) of its parameter's shape, one value per row
    (an optimizer with ``ROW_STATE``) or a scalar, and second moments and counts are >= 0: anything else fails
    only at the first step, deep inside the optimizer, or turns the steps into NaN."""
    rows = getattr(type(opt), "ROW_STATE", False)
    for group in opt.param_groups:
        keys = _state_keys(opt, group)
        for p in group["params"]:
            state = opt.state.get(p, {})
            if state and keys is not None and set(state) != set(keys):
                raise InputError(f"{path}: the optimizer state of {oname!r} holds {sorted(state)} for a parameter, not "
                                 f"{sorted(keys)}: {DAMAGED}")
            for key, v in state.items():
                if not torch.is_tensor(v):
                    continue
                shapes = (tuple(p.shape[:1]),) if rows else ((), tuple(p.shape))
                if tuple(v.shape) not in shapes or v.dtype not in FLOAT_DTYPES:
                    raise InputError(f"{path}: the optimizer state {oname}.{key} is {v.dtype} of shape "
                                     f"{tuple(v.shape)} for a parameter of shape {tuple(p.shape)}: {DAMAGED}")
                if not bool(torch.isfinite(v).all()) or (key in NON_NEGATIVE_STATE and bool((v < 0).any())):
                    what = f"is {v.item()!r}" if v.dim() == 0 else "holds values that are not finite, or negative ones"
                    raise InputError(f"{path}: the optimizer state {oname}.{key} {what}: {DAMAGED}")
