"""Rate–distortion sweeps: several storages × several rates on one dataset, every point a real file.

A sweep takes ONE dataset — a mesh (signed distance field) or a radiance-field capture — and a set
of *points* ``method × setting``, and for each point writes the file a user would ship and measures
it:

================= ========= ================================================================ ===============
method            setting   what is fitted                                                   file
================= ========= ================================================================ ===============
dense             –         fp16 feature grid Z (m × k), trained                             ``.vqad``
codebook          b         VQ-AD: b-bit learned indices V into a codebook D (2^b × k)       ``.vqad``
codebook-norefine b         SDF only: the same VQ-AD fit without index refinement            ``.vqad``
codebook-rate     b × λ     VQ-AD minimising loss + λ·bits (``--rate-weights``)             ``.vqad``
hash              T         Instant-NGP random indices into a trained table θ (2^T × k)      ``.vqad``
kmeans            b         post hoc: k-means of the dense fit's Z into 2^b centroids (kmVQ) ``.vqad``
lowrank           r         post hoc: rank-r PCA of the dense fit's Z                        ``.vqad``
draco-input       q         SDF only: the input mesh, Draco at q quantization bits           ``.drc``
draco-mc          q         SDF only: marching cubes of the dense fit, Draco at q bits       ``.drc``
================= ========= ================================================================ ===============

``kmeans``, ``lowrank`` and ``draco-mc`` are computed from the ONE dense fit of the sweep (its
``.vqad`` file, so exactly what was measured as the dense point); asking for any of them adds the
dense point.

**Index refinement.** An SDF fit ends with Gauss–Newton sweeps over the codebook indices
(:mod:`vqad.refine`; ``SDFTrainConfig.refine``, 10 by default), so every ``codebook`` point of a mesh
sweep has them, and no baseline gets a comparable step. ``codebook-norefine`` fits exactly the same
VQ-AD grid with ``refine = 0``, so the two series show what refinement buys. Radiance-field fits do
not refine by default (``NeRFTrainConfig.refine = 0``), so there ``codebook`` already is VQ-AD
without refinement and ``codebook-norefine`` is refused. Each fitted point's CSV row gives its
sweeps in ``refine``.

**Rate-aware points.** ``codebook-rate:4,6,8 --rate-weights 3e-4,3e-3`` fits every (b, λ) pair
of the two lists: VQ-AD whose loss gains λ × the estimated coded bits per index
(:func:`vqad.fit.rate_term`, ``TrainConfig.rate_weight``; ``--rate-context`` estimates them given
the coarser level's index, the CONTEXT codec's model, for every such point). They end with the fit's
default index refinement (a mesh: 10 sweeps; a radiance field: none), and those sweeps minimise the
same ``loss + λ · bits`` (:func:`vqad.refine.rate_bit_cost`), so their λ = 0 reference is
``codebook:b`` (λ = 0 itself is refused: it is that point). The sweeps move far more bits per λ than
the training term does, hence the defaults per kind (:data:`DEFAULT_RATE_WEIGHTS`). A record of an
older sweep whose refinement differs from what its method now does is set aside and the point
refitted. Like ``--methods``, the λ values choose points: a resumed sweep may add others (each
point's λ is in its key, ``codebook-rate-b4-lambda0.003``); the plot draws one series per b, its λ
values ordered by bytes. Every row with indices gives ``index_bits`` (b) and
``coded_index_bits`` (payload bits per index of the shipped file, its probability model included).

One more curve is derived from a VQ-AD point: ``codebook-stream``, the quality of each
LOD decoded from a *prefix* of that point's file against the prefix's bytes (the progressive
stream, see :mod:`vqad.fileformat`).

Measures: ``bytes`` is the file as shipped (the entropy-coded ``.vqad`` unless entropy coding is
off; the Draco buffer), with the raw file, its grid chunks alone, and the dense fp16 grid of the
same octree beside it. Quality at the finest LOD, decoded from that file: Chamfer-L1, normal
consistency and IoU (:func:`vqad.metrics.geometry_metrics`, unit-cube frame) for a mesh; PSNR and
SSIM on the held-out views (:func:`vqad.nerf.evaluate.evaluate_nerf`) for a capture. Draco points
are measured with the same Chamfer / normal code on the decoded mesh against the input, in the same
unit-cube frame (no IoU: a Draco mesh has no field to query).

Output directory::

    sweep.json                 the settings every point was made with (a re-run must match them)
    points/<point>.json        one finished point (its CSV rows), written last and atomically
    points/<point>.vqad        its file (and <point>-entropy.vqad; Draco: <point>.drc)
    work/<point>/checkpoint/   an unfinished fit's checkpoint (Ctrl-C saves it; removed when done)
    results.csv, results.md, rd.png   rebuilt from points/*.json after every point

**Resuming**: a point is finished when its ``points/<point>.json`` exists; a re-run with the same
settings skips finished points, continues an interrupted fit from its checkpoint and redoes the
rest. Every file is written to a temporary name and renamed, so an interrupted sweep never leaves a
half-written result that looks complete.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field as dfield, fields, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from vqad.app.outputs import SWEEP_MANIFEST
from vqad.atomicio import atomic_path, write_atomic
from vqad.config import is_real
from vqad.device import release_freed_memory
from vqad.errors import InputError

SWEEP_FORMAT = 1


# ================================================================================================
# methods and points
# ================================================================================================
@dataclass(frozen=True)
class Method:
    name: str
    label: str  # tables and the plot legend
    param: str  # the setting's symbol: b, T, r, q ("" when the method has no setting)
    defaults: tuple[int, ...]  # settings swept when only the name is given
    kind: str  # "fit" (trained), "posthoc" (from the dense fit), "draco", "stream" (derived)
    sdf_only: bool = False
    storage: str = ""  # the grid storage a "fit" trains ("": the method's name)
    refine: int | None = None  # index-refinement sweeps of the fit (None: the fit's default)
    rated: bool = False  # its points are (b, λ) pairs: a fit with the rate term λ·R (--rate-weights)

    @property
    def grid(self) -> str:
        return self.storage or self.name


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("dense", "dense fp16", "", (), "fit"),
    Method("codebook", "VQ-AD (learned indices)", "b", (1, 2, 4, 6, 8), "fit"),
    Method("codebook-norefine", "VQ-AD, no index refinement", "b", (1, 2, 4, 6, 8), "fit", sdf_only=True,
           storage="codebook", refine=0),
    Method("codebook-rate", "VQ-AD + rate term", "b", (4, 6, 8), "fit", storage="codebook", rated=True),
    Method("codebook-stream", "VQ-AD, per-LOD file prefixes", "b", (), "stream"),
    Method("hash", "hash (random indices)", "T", (10, 12, 14, 16), "fit"),
    Method("kmeans", "k-means VQ (post hoc)", "b", (4, 6), "posthoc"),
    Method("lowrank", "low rank (post hoc)", "r", (), "posthoc"),  # defaults: k/4, k/2 (see default_settings)
    Method("draco-input", "Draco, input mesh", "q", (8, 10, 12, 14), "draco", sdf_only=True),
    Method("draco-mc", "Draco, marching cubes of dense", "q", (8, 10, 12, 14), "draco", sdf_only=True),
)}
SELECTABLE = [n for n, m in METHODS.items() if m.kind != "stream"]
GRID_OPTION_OF_PARAM = {"b": "bits", "T": "table_bits", "r": "rank"}  # a method's setting → its GridConfig field
# default method set, in the order the points run: cheap and shared work first
DEFAULT_METHODS = ("draco-input", "dense", "kmeans", "lowrank", "draco-mc", "codebook", "hash")
METHOD_SPEC_HELP = (
    "METHOD or METHOD:S1,S2,... with METHOD one of dense; codebook:b (VQ-AD bits, default 1,2,4,6,8; 1..12; "
    "on a mesh each fit ends with fit-sdf's default index refinement); codebook-norefine:b (meshes only: the same "
    "VQ-AD fits with no index refinement, a series of its own; default 1,2,4,6,8); codebook-rate:b (VQ-AD fitted "
    "and refined to loss + λ × bits: one point per b and per λ of --rate-weights; default 4,6,8); "
    "hash:T (table bits, default 10,12,14,16); kmeans:b (post hoc, default 4,6); lowrank:r (post hoc, r < k, "
    "default k/4,k/2); draco-input:q and draco-mc:q (meshes only: Draco quantization bits, default 8,10,12,14). "
    "Default: all of them but codebook-norefine and codebook-rate (Draco only for meshes)"
)


#: λ values of codebook-rate points when --rate-weights is not given, per kind (docs/benchmarks/rd-rate.md):
#: a mesh's fit ends with rate-aware index sweeps, which move bits at λ ~1e-7..1e-6; a radiance field's
#: has none, and its training term needs λ ~1e-3
DEFAULT_RATE_WEIGHTS = {"sdf": (1e-7, 3e-7, 1e-6), "nerf": (3e-4, 1e-3, 3e-3)}
RATE_WEIGHTS_HELP = ("write the λ values as positive numbers separated by commas, e.g. --rate-weights 3e-4,3e-3 "
                     "(config file: rate-weights = [3e-4, 3e-3])")


@dataclass(frozen=True)
class Point:
    method: str
    setting: int | None = None
    rate_weight: float | None = None  # λ of a rated method's point (codebook-rate)

    @property
    def key(self) -> str:
        m = METHODS[self.method]
        key = self.method if self.setting is None else f"{self.method}-{m.param}{self.setting}"
        return key if self.rate_weight is None else f"{key}-lambda{self.rate_weight:g}"

    @property
    def label(self) -> str:
        m = METHODS[self.method]
        label = m.label if self.setting is None else f"{m.label}, {m.param} = {self.setting}"
        return label if self.rate_weight is None else f"{label}, λ = {self.rate_weight:g}"


def default_settings(method: str, features: int) -> tuple[int, ...]:
    """Settings of ``method`` when none are given (low rank: k/4 and k/2, i.e. 4 and 8 at k = 16)."""
    if method == "lowrank":
        return tuple(sorted({max(1, features // 4), max(1, features // 2)} - {features}))
    return METHODS[method].defaults


def default_refine(kind: str) -> int:
    """Index-refinement sweeps a ``codebook`` fit of a ``kind`` ("sdf" | "nerf") sweep ends with: the
    fit's own default (SDF: ``SDFTrainConfig.refine``; radiance field: ``NeRFTrainConfig.refine``)."""
    if kind == "sdf":
        from vqad.sdf.fit import SDFTrainConfig

        return SDFTrainConfig.refine
    from vqad.nerf.fit import NeRFTrainConfig

    return NeRFTrainConfig.refine


def check_setting(method: str, value, features: int) -> None:
    """Raise :class:`InputError` unless ``value`` is a valid setting of ``method`` at k = ``features``."""
    from vqad.storages.lowrank import check_rank
    from vqad.storages.hash import check_table_bits
    from vqad.storages.base import check_bits

    if method in ("codebook", "codebook-norefine", "codebook-rate", "kmeans"):
        check_bits(value)
    elif method == "hash":
        check_table_bits(value)
    elif method == "lowrank":
        check_rank(value, features)
    elif method.startswith("draco"):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 30:
            raise InputError(f"{method}: Draco quantization bits must be an integer in 1..30, got {value!r}")


def parse_rate_weights(value) -> list[float]:
    """``"3e-4,3e-3"`` or ``[3e-4, 3e-3]`` → the λ values, ascending, duplicates dropped; each must be a
    finite number > 0 (λ = 0 is plain VQ-AD: ``codebook:b``)."""
    items = value.replace(",", " ").split() if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise InputError(f"bad --rate-weights {value!r}: {RATE_WEIGHTS_HELP}")
    out = []
    for v in items:
        try:
            if isinstance(v, bool):
                raise ValueError
            lam = float(v)
        except (TypeError, ValueError):
            raise InputError(f"bad --rate-weights value {v!r}: {RATE_WEIGHTS_HELP}") from None
        if lam == 0:
            raise InputError("--rate-weights: λ = 0 is plain VQ-AD without the rate term; its points are "
                             "codebook:b: add those to --methods")
        if not 0 < lam < math.inf:
            raise InputError(f"--rate-weights: λ must be a finite number > 0, got {v!r}")
        out.append(lam)
    out = sorted(set(out))
    same = next(((a, b) for a, b in zip(out, out[1:]) if f"{a:g}" == f"{b:g}"), None)
    if same is not None:  # a point's key (its folder) holds λ to 6 significant digits
        raise InputError(f"--rate-weights: {same[0]!r} and {same[1]!r} agree to 6 significant digits, so their points "
                         "would be one: give values that differ there")
    return out


def _whole_number(text: str) -> int:
    """A method's setting: ASCII digits only (``int`` also reads "4_0" as 40, and other scripts' digits), else
    a ValueError."""
    text = text.strip()
    if not (text.isascii() and text.isdigit()):
        raise ValueError(text)
    return int(text)


def parse_methods(specs, kind: str, features: int, rate_weights=None) -> list[Point]:
    """``["codebook:4,6", "hash", "dense"]`` → points, in the order given (duplicates dropped).

    A spec is ``METHOD`` (its default settings) or ``METHOD:S1,S2,...``. Empty ``specs``: the
    default set (:data:`DEFAULT_METHODS`, Draco methods only for meshes). A rated method
    (``codebook-rate:4,6``) gives one point per b and per λ of ``rate_weights`` (None:
    :data:`DEFAULT_RATE_WEIGHTS` of ``kind``), b-major. Raises :class:`InputError` for an unknown method, a
    malformed or out-of-range setting, or a mesh-only method on a radiance field.
    """
    if isinstance(specs, str):
        specs = specs.split()
    explicit = bool(specs)
    if not explicit:
        specs = [m for m in DEFAULT_METHODS if kind == "sdf" or not METHODS[m].sdf_only]
    points: list[Point] = []
    for spec in specs:
        if not isinstance(spec, str) or not spec.strip():
            raise InputError(f"bad method spec {spec!r}: {METHOD_SPEC_HELP}")
        name, sep, rest = spec.strip().partition(":")
        if name not in SELECTABLE:
            raise InputError(f"unknown method {name!r} in {spec!r}: choose from {', '.join(SELECTABLE)}")
        m = METHODS[name]
        if m.sdf_only and kind != "sdf":
            if m.refine is not None:
                raise InputError(f"{name}: radiance-field fits do not refine their indices (fit-nerf --refine 0 "
                                 "by default), so codebook points already are VQ-AD without refinement: use codebook")
            raise InputError(f"{name} compresses a mesh: it applies to SDF sweeps of a mesh, not to a radiance field")
        if not m.param:
            if sep:
                raise InputError(f"{name} takes no setting, got {spec!r}")
            points.append(Point(name))
            continue
        if sep:
            try:
                values = [_whole_number(v) for v in rest.split(",")]
            except ValueError:
                if m.rated:
                    raise InputError(f"bad settings in {spec!r}: write {name}:B1,B2,... with integer b values "
                                     f"(e.g. {name}:4,6,8) and give the λ values apart, with --rate-weights "
                                     "3e-4,3e-3: every b is fitted at every λ") from None
                raise InputError(f"bad settings in {spec!r}: write {name}:{m.param.upper()}1,{m.param.upper()}2,... "
                                 f"with integer {m.param} values, e.g. {name}:{','.join(map(str, default_settings(name, features)[:2]))}") from None
        else:
            values = list(default_settings(name, features))
        for v in values:
            try:
                check_setting(name, v, features)
            except InputError as exc:
                raise InputError(f"{name}:{v}: {exc}") from None
            if m.rated:
                points += [Point(name, v, lam) for lam in parse_rate_weights(rate_weights or list(DEFAULT_RATE_WEIGHTS[kind]))]
            else:
                points.append(Point(name, v))
    return list(dict.fromkeys(points))


# ================================================================================================
# configuration
# ================================================================================================


def _app_defaults(grid, train_cls, batch: str, decoder) -> dict:
    """A sweep's defaults, read from the application's own configs (never typed twice)."""
    return {"levels": f"{grid.base_level}:{grid.max_level}", "features": grid.features,
            "steps": train_cls.steps, "batch": getattr(train_cls, batch), "hidden": decoder.hidden}


def _defaults():
    from vqad.config import DecoderConfig, GridConfig
    from vqad.nerf.fit import NERF_DECODER, NERF_GRID, NeRFTrainConfig
    from vqad.sdf.fit import SDFTrainConfig

    return (_app_defaults(GridConfig(), SDFTrainConfig, "batch", DecoderConfig()),
            _app_defaults(NERF_GRID, NeRFTrainConfig, "batch_rays", NERF_DECODER))


SDF_DEFAULTS, NERF_DEFAULTS = _defaults()
NERF_ONLY = ("format", "downscale", "eval_views", "eval_max_views", "background", "octree", "appearance")
SDF_ONLY = ("mc_resolution", "draco_mc_resolution", "draco_level")
# may change between resumed runs: they choose points (each point's λ is in its key) or where and how they run
NOT_SETTINGS = ("out", "methods", "rate_weights", "device", "quiet", "stream_bits")


@dataclass
class SweepConfig:
    """Everything a sweep is run with. ``None`` fields take the dataset kind's default
    (:data:`SDF_DEFAULTS` / :data:`NERF_DEFAULTS`); :meth:`resolved` fills them in and validates."""

    dataset: str = ""  # a mesh file, a capture directory or "procedural"
    out: str = ""
    methods: list[str] = dfield(default_factory=list)  # specs (parse_methods); empty: the default set
    levels: str | None = None  # octree levels BASE:MAX
    features: int | None = None  # k
    steps: int | None = None  # per fit
    minutes: float | None = None  # also stop each fit after this long
    batch: int | None = None  # points (SDF) or rays (NeRF) per step
    hidden: int | None = None  # decoder width
    seed: int = 0
    device: str = "auto"
    entropy: bool = True  # also write entropy-coded files; `bytes` is then their size
    stream_bits: int | None = None  # VQ-AD point whose per-LOD prefix curve is measured (None: 4 if swept; 0: none)
    rate_weights: object = None  # λ values of codebook-rate points: "3e-4,3e-3" or [3e-4, 3e-3] (None: the defaults)
    rate_context: bool = False  # their rate term given the coarser level's index (TrainConfig.rate_context)
    quiet: bool = False  # no progress bars
    # meshes
    mc_resolution: int = 256  # marching cubes for the quality metrics
    draco_mc_resolution: int = 128  # marching cubes of the dense field for draco-mc
    draco_level: int = 10  # Draco compression level 0..10
    # radiance fields
    format: str = "auto"
    downscale: int = 1
    eval_views: str = "test"
    eval_max_views: int | None = None
    background: object = "white"  # white, black, "R,G,B" or [R, G, B]
    octree: str = "auto"  # auto | depth | mask | density
    appearance: str = "none"  # per-view exposure and white balance learned beside the field: none | affine
    kind: str = ""  # "sdf" | "nerf", set by resolved()

    @classmethod
    def from_mapping(cls, values: dict) -> "SweepConfig":
        """Build from a dict (a config file merged with command-line flags), checking names and types;
        options that do not apply to the dataset's kind are errors, not silently ignored."""
        names = {f.name for f in fields(cls)} - {"kind"}
        values = {str(k).replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(values) - names)
        if unknown:
            raise InputError(f"unknown sweep option(s): {', '.join(unknown)} (known: {', '.join(sorted(names))})")
        for k, v in values.items():
            _check_type(k, v)
        cfg = cls(**values)
        if isinstance(cfg.methods, str):
            cfg.methods = cfg.methods.split()
        if "methods" in values and not cfg.methods:  # (left out, it means the default set: hours of fits)
            raise InputError("methods is empty: name the methods to sweep, or leave methods out for the default set")
        kind = detect_kind(cfg.dataset)
        wrong = [k for k in (SDF_ONLY if kind == "nerf" else NERF_ONLY) if k in values]
        if wrong:
            what = "a radiance-field capture" if kind == "nerf" else "a mesh"
            raise InputError(f"{', '.join('--' + w.replace('_', '-') for w in wrong)}: not an option for {what} "
                             f"({cfg.dataset}); remove it")
        return cfg

    def resolved(self) -> "SweepConfig":
        """A copy with the kind and its defaults filled in, every value validated."""
        from vqad.config import parse_levels

        kind = detect_kind(self.dataset)
        defaults = SDF_DEFAULTS if kind == "sdf" else NERF_DEFAULTS
        cfg = replace(self, kind=kind, **{k: defaults[k] for k in defaults if getattr(self, k) is None})
        if not str(cfg.out).strip():
            raise InputError("a sweep needs an output directory: --out DIR (or out = \"DIR\" in its config)")
        parse_levels(cfg.levels)
        if not 1 <= cfg.features <= 256:
            raise InputError(f"features (k) must be in 1..256, got {cfg.features}")
        for name in ("steps", "batch", "hidden", "downscale"):
            if getattr(cfg, name) <= 0:
                raise InputError(f"--{name} must be positive, got {getattr(cfg, name)}")
        if cfg.minutes is not None and not cfg.minutes > 0:
            raise InputError(f"--minutes must be positive, got {cfg.minutes}")
        if cfg.eval_max_views is not None and cfg.eval_max_views <= 0:
            raise InputError("--eval-max-views must be positive")
        for name in ("mc_resolution", "draco_mc_resolution"):
            if not 8 <= getattr(cfg, name) <= 1024:
                raise InputError(f"--{name.replace('_', '-')} must be in 8..1024, got {getattr(cfg, name)}")
        from vqad.nerf.task import OCTREE_CHOICES

        if cfg.octree not in OCTREE_CHOICES:
            raise InputError(f"--octree must be one of {', '.join(OCTREE_CHOICES)}, got {cfg.octree!r}")
        from vqad.nerf.appearance import APPEARANCES

        if cfg.appearance not in APPEARANCES:
            raise InputError(f"--appearance must be one of {', '.join(APPEARANCES)}, got {cfg.appearance!r}")
        if cfg.appearance != "none" and cfg.eval_views == "train":
            raise InputError("--appearance with --eval-views train: a training view is scored through its learned "
                             "exposure, which the sweep's files do not keep (they hold the views' average); score "
                             "held-out views (their PSNR is also given with each photo's exposure matched: psnr_matched)")
        if not 0 <= cfg.draco_level <= 10:
            raise InputError(f"--draco-level must be in 0..10, got {cfg.draco_level}")
        names = {s.strip().partition(":")[0] for s in (cfg.methods or DEFAULT_METHODS) if isinstance(s, str)}
        defaults = SweepConfig.__dataclass_fields__
        for flag, name, needs in (("--draco-level", "draco_level", ("draco-input", "draco-mc")),
                                  ("--draco-mc-resolution", "draco_mc_resolution", ("draco-mc",))):
            if getattr(cfg, name) != defaults[name].default and not names & set(needs):
                raise InputError(f"{flag} applies to the {' / '.join(needs)} point{'s' if len(needs) > 1 else ''}: add "
                                 f"{needs[-1]} to --methods, or remove {flag}")
        rated = [s for s in cfg.methods if isinstance(s, str) and METHODS.get(s.strip().partition(":")[0], METHODS["dense"]).rated]
        if not rated:  # a flag that cannot apply is an error, not silently ignored
            for flag, given in (("--rate-weights", cfg.rate_weights is not None), ("--rate-context", cfg.rate_context)):
                if given:
                    raise InputError(f"{flag} applies to rate-aware points: add codebook-rate:B1,B2,... to --methods "
                                     f"(e.g. codebook-rate:4,6,8), or remove {flag}")
        else:
            cfg.rate_weights = parse_rate_weights(DEFAULT_RATE_WEIGHTS[kind] if cfg.rate_weights is None
                                                  else cfg.rate_weights)
        cfg._check_fit_configs()
        return cfg

    def _check_fit_configs(self) -> None:
        """The fits' own checks (seed range, decoder width, batch bounds, ...), run now: a value only the
        first fit refused used to be recorded in sweep.json first, and the corrected re-run was then refused
        as a sweep of other settings."""
        from vqad.config import DecoderConfig

        DecoderConfig(hidden=self.hidden).validate()
        if self.kind == "sdf":
            from vqad.sdf.fit import SDFTrainConfig

            SDFTrainConfig(steps=self.steps, batch=self.batch, seed=self.seed, max_minutes=self.minutes).validate()
        else:
            from vqad.nerf.fit import NeRFTrainConfig

            NeRFTrainConfig(steps=self.steps, batch_rays=self.batch, octree=self.octree, seed=self.seed,
                            max_minutes=self.minutes, appearance=self.appearance).validate()

    def settings(self) -> dict:
        """What determines the results (recorded in sweep.json; a resumed sweep must match it)."""
        skip = set(NOT_SETTINGS) | set(SDF_ONLY if self.kind == "nerf" else NERF_ONLY)
        d = {k: v for k, v in asdict(self).items() if k not in skip}
        if self.kind == "sdf" or d["dataset"] not in _procedural_names():
            d["dataset"] = str(Path(self.dataset).resolve())
            from vqad.app.outputs import capture_folder, input_stamp

            # the input's size and modification time (every file's, for a capture): a sweep resumed on a changed
            # input would put two inputs' points in one table
            # (a capture given by one of its files, transforms.json: the whole capture folder, its images too)
            d["input"] = input_stamp(str(capture_folder(Path(d["dataset"]), self.kind)), Path(self.out).resolve())
        if self.kind == "nerf":
            d["background"] = [float(c) for c in _background(self.background)]  # checked by the dataset loader
        return d


#: settings added after sweeps were first recorded: a sweep.json without them was made with these values
ADDED_SETTINGS = {"rate_context": False, "appearance": "none"}


_TYPES = {"methods": (list, str), "levels": (str,), "features": (int,), "steps": (int,), "minutes": (int, float),
          "batch": (int,), "hidden": (int,), "seed": (int,), "device": (str,), "entropy": (bool,),
          "stream_bits": (int,), "rate_weights": (list, str), "rate_context": (bool,), "quiet": (bool,), "mc_resolution": (int,), "draco_mc_resolution": (int,),
          "draco_level": (int,), "format": (str,), "downscale": (int,), "eval_views": (str,),
          "eval_max_views": (int,), "background": (str, list), "octree": (str,), "appearance": (str,), "dataset": (str,), "out": (str,)}


def _check_type(name: str, value) -> None:
    if value is None and name in ("minutes", "eval_max_views", "stream_bits", "rate_weights", "levels", "features", "steps",
                                  "batch", "hidden"):
        return
    ok = _TYPES[name]
    if isinstance(value, bool) and bool not in ok:
        ok = ()
    if not isinstance(value, ok):
        raise InputError(f"sweep option {name} must be {' or '.join(t.__name__ for t in _TYPES[name])}, got {value!r}")


def _procedural_names() -> tuple[str, ...]:
    from vqad.nerf.formats import PROCEDURAL_NAMES

    return PROCEDURAL_NAMES


def _background(value) -> tuple:
    """white | black | "R,G,B" | [R, G, B] → a tuple for the dataset loader, which checks it."""
    named = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0)}
    if isinstance(value, str):
        return named.get(value) or tuple(value.split(","))
    return tuple(value)


def detect_kind(dataset: str) -> str:
    """``"sdf"`` for a mesh file, ``"nerf"`` for a capture directory (or its transforms / poses file)
    or the built-in ``procedural`` scene; :class:`InputError` when the dataset does not exist."""
    from vqad.sdf.mesh import MESH_SUFFIXES

    if not dataset:
        raise InputError("a sweep needs a dataset: a mesh file (.obj, .ply, ...) or a radiance-field capture directory")
    if dataset in _procedural_names():
        return "nerf"
    path = Path(dataset)
    if path.suffix.lower() in MESH_SUFFIXES:
        if not path.is_file():
            raise InputError(f"mesh not found: {path}")
        return "sdf"
    if not path.exists():
        raise InputError(f"dataset not found: {path} (a mesh file {', '.join(sorted(MESH_SUFFIXES))}, "
                         "a radiance-field capture directory, or 'procedural')")
    return "nerf"


def load_config_file(path: str | Path, what: str = "sweep config") -> dict:
    """A config (``what``: how errors name it) from JSON (``.json``) or TOML (``.toml``; the standard
    ``tomllib``, ``tomli`` on Python 3.10): keys are the long flag names (``steps``,
    ``eval-max-views`` or ``eval_max_views``, ``methods = ["codebook:4,6", "hash:12"]``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10: the same parser as a package (a dependency there)
                import tomli as tomllib
            data = tomllib.loads(text)
        elif path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            raise InputError(f"{what} must be .json or .toml, got {path.name}")
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise InputError(f"cannot parse {what} {path}: {exc}".splitlines()[0]) from None
    except RecursionError:
        raise InputError(f"cannot parse {what} {path}: nested too deeply") from None
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"{what} {path} must hold a table / object of options")
    seen: dict[str, str] = {}
    for key in data:  # eval_views and eval-views both: one of them silently won
        other = seen.setdefault(str(key).replace("-", "_"), str(key))
        if other != str(key):
            raise InputError(f"{what} {path} gives one option twice, as {other} and as {key}: keep one")
    return data


# ================================================================================================
# measuring
# ================================================================================================
class PeakMemory:
    """Peak memory while the ``with`` block runs: the CUDA allocator's peak on a GPU; on the CPU the
    process's resident set sampled every ``interval`` s (Linux ``/proc``; elsewhere the process's
    lifetime peak). Includes what the process already held (data, earlier models)."""

    def __init__(self, device: torch.device, interval: float = 0.02):
        self.device, self.interval, self.bytes = device, interval, 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            import resource

            return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.bytes = max(self.bytes, self._rss())

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.bytes = self._rss()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            self._thread.join()
            self.bytes = max(self.bytes, self._rss())


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty, or gone
        pass


#: what is left of a sweep point's cap once an earlier run spent it: the fit stops at once (a cap must be > 0)
MIN_CAP_MINUTES = 1e-6


def minutes_left(minutes: float | None, spent: float) -> float | None:
    """The cap of a sweep point's fit (``minutes`` per fit; None: none) after ``spent`` seconds an interrupted run of it
    trained: the cap holds for the point, not for each run (a resumed point got its whole cap again)."""
    if minutes is None:
        return None
    return max(minutes - spent / 60.0, MIN_CAP_MINUTES)


class SDFTask:
    """A mesh: SDF fits, Chamfer-L1 / normal consistency / IoU, and the Draco baselines."""

    kind = "sdf"
    quality = ("chamfer_l1", "normal_consistency", "iou")

    def __init__(self, cfg: SweepConfig, device: torch.device):
        from vqad.sdf.mesh import SDFOracle, fit_normalization, load_mesh

        self.cfg, self.device = cfg, device
        self.mesh = load_mesh(cfg.dataset)
        self.oracle = SDFOracle(self.mesh)
        self.normalization = fit_normalization(self.mesh)  # the frame every SDF fit uses (build_sdf_field)
        self.name = Path(cfg.dataset).stem

    def fit(self, grid_cfg, work: Path, resume: bool, refine: int | None = None, rate_weight: float = 0.0,
            spent: float = 0.0):
        """Fit ``grid_cfg`` with ``refine`` index-refinement sweeps (None: the SDF default, see
        :func:`default_refine`) and the rate term λ = ``rate_weight`` (0: none); ``spent``: the seconds an interrupted
        run of this point trained already (the per-fit cap holds for both runs). Returns the field, the steps done,
        the sweeps it was fitted with and the fit's notes (what its time cap cut)."""
        from vqad.config import DecoderConfig
        from vqad.sdf.fit import SDFTrainConfig, fit_sdf

        c = self.cfg
        # vqad fit-sdf's learning rates (SDFTrainConfig.resolved: a codebook's argmax needs larger steps)
        train = SDFTrainConfig(steps=c.steps, batch=c.batch, seed=c.seed).resolved(grid_cfg)
        train.max_minutes = minutes_left(c.minutes, spent)
        if refine is not None:
            train.refine = refine
        _set_rate(train, rate_weight, c.rate_context)
        res = fit_sdf(self.mesh, grid_cfg, DecoderConfig(hidden=c.hidden), train, self.device, out_dir=work,
                      resume=resume, quiet=c.quiet, mesh_path=str(Path(c.dataset).resolve()))
        return res.field, res.steps, train.refine, res.notes

    def evaluate(self, field, lod: int) -> dict:
        from vqad.sdf.extract import extract_mesh
        from vqad.sdf.metrics import geometry_metrics

        try:
            mesh = extract_mesh(field, lod, resolution=self.cfg.mc_resolution)
        except InputError as exc:  # no zero crossing: a failed fit is a result, not a crash
            return {"chamfer_l1": math.nan, "normal_consistency": math.nan, "iou": math.nan, "note": str(exc)}
        return geometry_metrics(field, lod, self.mesh, mesh, self.oracle).as_dict()

    def evaluate_mesh(self, mesh) -> dict:
        """Chamfer-L1 and normal consistency of ``mesh`` (world coordinates) against the input."""
        from vqad.sdf.metrics import chamfer_and_normals

        to_unit = lambda v: self.normalization.to_unit(torch.from_numpy(v)).numpy()  # noqa: E731
        ch, nc = chamfer_and_normals(self.mesh.transformed(to_unit), mesh.transformed(to_unit))
        return {"chamfer_l1": ch, "normal_consistency": nc, "iou": math.nan}


class NeRFTask:
    """A radiance-field capture: NeRF fits, PSNR / SSIM on the held-out views."""

    kind = "nerf"
    quality = ("psnr", "ssim")

    def __init__(self, cfg: SweepConfig, device: torch.device):
        from vqad.nerf.data import require_training_pixels
        from vqad.nerf.formats import load_dataset
        from vqad.nerf.evaluate import require_scorable

        self.cfg, self.device = cfg, device
        # only the views scored are read (not the training views: they all train, whichever split is scored)
        limit = {cfg.eval_views: cfg.eval_max_views} if cfg.eval_max_views and cfg.eval_views != "train" else None
        self.dataset = load_dataset(cfg.dataset, format=cfg.format, downscale=cfg.downscale,
                                    background=_background(cfg.background), split_limit=limit)
        require_training_pixels(self.dataset.splits["train"])  # fail now, not after the first fit
        require_scorable(self.dataset, cfg.eval_views, cfg.eval_max_views,
                         fix="score more or other views (--eval-max-views, --eval-views), or check the masks")
        self.name = self.dataset.name

    def fit(self, grid_cfg, work: Path, resume: bool, refine: int | None = None, rate_weight: float = 0.0,
            spent: float = 0.0):
        """Fit ``grid_cfg`` (``refine``: index-refinement sweeps, None: the radiance-field default, 0;
        ``rate_weight``: λ of the rate term, 0: none; ``spent``: as :meth:`SDFTask.fit`). Returns the field, the
        steps done, the sweeps it was fitted with and the fit's notes."""
        from vqad.nerf.fit import NERF_DECODER, NERF_FIELD, NeRFTrainConfig, fit_nerf

        c = self.cfg
        # vqad fit-nerf's defaults (the marching step chosen from the octree); one width for both MLPs
        train = NeRFTrainConfig(steps=c.steps, batch_rays=c.batch, octree=c.octree, seed=c.seed,
                                max_minutes=minutes_left(c.minutes, spent), appearance=c.appearance)
        if refine is not None:
            train.refine = refine
        _set_rate(train, rate_weight, c.rate_context)
        res = fit_nerf(self.dataset, grid_cfg, replace(NERF_DECODER, hidden=c.hidden), train, self.device,
                       out_dir=work, resume=resume, quiet=c.quiet,
                       nerf_cfg=replace(NERF_FIELD, color_hidden=c.hidden))  # the capture's outer scale, as fit-nerf
        return res.field, res.steps, train.refine, res.notes

    def evaluate(self, field, lod: int) -> dict:
        from vqad.nerf.evaluate import evaluate_nerf

        matched = self.cfg.appearance != "none"  # held-out photos metered anew (train views are refused above)
        r = evaluate_nerf(field, self.dataset, self.cfg.eval_views, lods=[lod], max_views=self.cfg.eval_max_views,
                          save_images=False, match_exposure=matched)[lod]
        return {"psnr": r["psnr"], "ssim": r["ssim"], **({"psnr_matched": r["psnr_matched"]} if matched else {})}


def _set_rate(train, rate_weight: float, context: bool) -> None:
    """The rate term of a rate-aware point (λ > 0; ``context``: estimated given the coarser index)."""
    if rate_weight:
        train.rate_weight, train.rate_context = rate_weight, context


# ================================================================================================
# running
# ================================================================================================
def plan(points: list[Point], stream_bits: int | None) -> list[Point]:
    """The points in run order: the dense fit before everything derived from it, each
    ``codebook-stream`` right after its VQ-AD point."""
    if any(METHODS[p.method].kind == "posthoc" or p.method == "draco-mc" for p in points):
        if Point("dense") not in points:
            points = [Point("dense")] + list(points)
        else:  # dense before its dependants
            first = next(i for i, p in enumerate(points) if METHODS[p.method].kind == "posthoc" or p.method == "draco-mc")
            if points.index(Point("dense")) > first:
                points = [Point("dense")] + [p for p in points if p != Point("dense")]
    bits = {p.setting for p in points if p.method == "codebook"}
    if stream_bits is None:
        stream_bits = 4 if 4 in bits else 0
    elif stream_bits and stream_bits not in bits:
        raise InputError(f"--stream-bits {stream_bits}: the sweep has no codebook:{stream_bits} point "
                         f"(it has {', '.join(f'codebook:{b}' for b in sorted(bits)) or 'no codebook point'}; 0: no stream curve)")
    out = []
    for p in points:
        out.append(p)
        if p.method == "codebook" and p.setting == stream_bits:
            out.append(Point("codebook-stream", stream_bits))
    return out


class Sweep:
    """One sweep: ``Sweep(cfg).run()``. Validates everything (config, methods, dataset) before
    writing anything; see the module docstring for the directory layout and resuming."""

    def __init__(self, cfg: SweepConfig, log=print):
        from vqad.device import resolve_device

        self.cfg = cfg.resolved()
        self.log = log
        self.points = plan(parse_methods(self.cfg.methods, self.cfg.kind, self.cfg.features, self.cfg.rate_weights),
                           self.cfg.stream_bits)
        if not self.points:
            raise InputError(f"--methods {' '.join(self.cfg.methods)} gives no point to fit at k = {self.cfg.features} "
                             "(low rank's default ranks are k/4 and k/2, below k): give settings, e.g. lowrank:1,2")
        import importlib.util

        draco = sorted({p.method for p in self.points if METHODS[p.method].kind == "draco"})
        if draco and importlib.util.find_spec("DracoPy") is None:  # before any fit, not at its point
            raise InputError(f"the {' and '.join(draco)} points need DracoPy: pip install 'vqad[bench]', or give --methods "
                             "without them")
        self.device = resolve_device(self.cfg.device)
        self.task = (SDFTask if self.cfg.kind == "sdf" else NeRFTask)(self.cfg, self.device)
        self.out = Path(self.cfg.out)
        self._check_out()
        self._dense = None
        self._mc_mesh = None

    # -- the output directory ----------------------------------------------------------------
    def _check_out(self) -> None:
        from vqad.app.commands.common import refuse_foreign_dir

        manifest = self.out / SWEEP_MANIFEST
        if self.out.exists() and not self.out.is_dir():
            raise InputError(f"output path exists and is not a directory: {self.out}")
        # a sweep writes and replaces results.csv, results.md, rd.png and points/ there: never among other files
        refuse_foreign_dir(self.out, (SWEEP_MANIFEST,), f"--out {self.out}", "sweep")
        if manifest.is_file():
            try:
                doc = json.loads(manifest.read_text())
                old, version = doc["settings"], doc.get("vqad_sweep", SWEEP_FORMAT)
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
                raise InputError(f"{manifest} is not a vqad sweep record: use another --out") from None
            if isinstance(version, int) and not isinstance(version, bool) and version > SWEEP_FORMAT:
                raise InputError(f"{manifest}: sweep format {version}, written by a newer vqad (this one reads format "
                                 f"{SWEEP_FORMAT}): upgrade vqad, or use another --out")
            if not isinstance(old, dict) or isinstance(version, bool) or version != SWEEP_FORMAT:
                raise InputError(f"{manifest} is not a vqad sweep record: use another --out")
            # a sweep recorded before these settings existed had their defaults; older records also kept
            # choices of points (the λ values) that are no longer settings
            new = json.loads(json.dumps(self.cfg.settings()))
            added = {k: v for k, v in ADDED_SETTINGS.items() if k in new}  # a mesh sweep has no radiance-field settings
            old = {k: v for k, v in {**added, **old}.items() if k not in NOT_SETTINGS}
            if "input" not in old:  # recorded before the input's stamp was: nothing to compare it with
                new.pop("input", None)
            elif self._stamped_alone(old):  # a capture given by one of its files, stamped alone before: whole now
                doc["settings"]["input"] = old["input"] = new["input"]
                write_atomic(manifest, json.dumps(doc, indent=2))
            diff = [f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" if k != "input" else
                    f"its input changed since the sweep began: a file of {self._input_name()} was "
                    "added, removed or modified (size or modification time); the points made before would not be "
                    "comparable" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
            if diff:
                raise InputError(f"{self.out} holds a sweep made with other settings ({'; '.join(diff)}): "
                                 "re-run with the same settings to resume it, or use another --out")

    def _input_name(self) -> str:
        """What the input stamp covers: the mesh, or the capture's folder."""
        from vqad.app.outputs import capture_folder

        return str(capture_folder(Path(self.cfg.dataset).resolve(), self.cfg.kind))

    def _stamped_alone(self, old: dict) -> bool:
        """Whether the recorded input stamp is the one a sweep of a radiance-field capture given by one of its files
        (``transforms.json``) recorded before its whole folder was stamped, and that file is unchanged."""
        from vqad.app.outputs import input_stamp

        source = Path(str(old.get("dataset", "")))
        return (self.cfg.kind == "nerf" and source.is_file() and isinstance(old.get("input"), list)
                and len(old["input"]) == 2 and old["input"] == input_stamp(str(source)))

    def _prepare_out(self) -> None:
        from vqad.app.commands.common import ensure_writable_dir

        ensure_writable_dir(self.out / "points")
        manifest = self.out / SWEEP_MANIFEST
        if not manifest.is_file():
            write_atomic(manifest, json.dumps({"vqad_sweep": SWEEP_FORMAT, "settings": self.cfg.settings()}, indent=2))

    def finished(self, p: Point) -> bool:
        """Whether point ``p`` has a record in this directory (read now: another process sharing it may
        have just written one); a damaged record is set aside and the point redone, and so is a codebook
        fit's record made with other index-refinement sweeps than its method now runs (an older sweep's)."""
        path = self.out / "points" / f"{p.key}.json"
        if not path.is_file():
            return False
        rec = read_point(path)
        if rec is None:
            path.replace(path.with_name(path.name + ".damaged"))
            self.log(f"{path} is damaged (empty or not a point record): set aside as {path.name}.damaged, the point is redone")
            return False
        m = METHODS[p.method]
        want = default_refine(self.cfg.kind) if m.refine is None else m.refine
        had = rec["rows"][-1].get("refine")
        if m.kind == "fit" and m.grid == "codebook" and isinstance(had, int) and had != want:
            path.replace(path.with_name(path.name + ".stale"))
            self.log(f"{path} was fitted with {had} index-refinement sweeps, its method now runs {want}: "
                     f"set aside as {path.name}.stale, the point is refitted")
            return False
        return True

    # -- the run -------------------------------------------------------------------------------
    def run(self) -> list[dict]:
        """Run every unfinished point, rebuilding the reports after each; returns all CSV rows.

        Each point's record is looked up when its turn comes, so several processes may share ``out``
        (each its ``--methods``, e.g. one thread each): a point another one finished meanwhile is skipped."""
        self._prepare_out()
        n = len(self.points)
        for i, p in enumerate(self.points, 1):
            if self.finished(p):
                self.log(f"[{i}/{n}] {p.label}: finished earlier, skipped")
                continue
            source = self._source(p)
            if source is not None and not self.finished(source):
                self.log(f"[{i}/{n}] {p.label}: waiting for another process to finish {source.label}, which it is made "
                         "from", flush=True)
                held = self._claim(source, wait=True)  # returns when that process has finished it (or stopped)
                if held is not None:
                    os.close(held)
                if not self.finished(source):
                    self.log(f"[{i}/{n}] {p.label}: skipped: {source.label}, which it is made from, is not finished "
                             "(the process making it stopped: run the sweep again)")
                    continue
            claim = self._claim(p)
            if claim is None:
                self.log(f"[{i}/{n}] {p.label}: another process sharing {self.out} is making it now, skipped")
                continue
            try:
                if self.finished(p):  # (the other process finished it as this one claimed it)
                    self.log(f"[{i}/{n}] {p.label}: finished earlier, skipped")
                    _remove_if_empty(self.out / "work" / p.key)
                    continue
                self.log(f"[{i}/{n}] {p.label} ...", flush=True)
                rows = self._run_point(p)
                rec = {"point": p.key, "method": p.method, "setting": p.setting, "rate_weight": p.rate_weight,
                       "rows": rows, "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
                write_atomic(self.out / "points" / f"{p.key}.json", json.dumps(rec, indent=2))
                shutil.rmtree(self.out / "work" / p.key, ignore_errors=True)  # the finished fit's checkpoint
            finally:
                os.close(claim)
            r = rows[-1]
            q = self.task.quality[0]
            self.log(f"[{i}/{n}] {p.label}: {r['bytes'] / 1e3:,.1f} kB, {q} {r[q]:.5g}, "
                     f"{r['fit_seconds']:.1f} s", flush=True)
            write_reports(self.out, self.cfg, self._pending())
        rows = write_reports(self.out, self.cfg, self._pending())
        self.log(f"wrote {self.out}/results.csv, results.md, rd.png ({len(rows)} rows)")
        return rows

    def _claim(self, p: Point, wait: bool = False) -> int | None:
        """Hold point ``p`` while this process makes it (a ``flock`` on its folder ``work/KEY``, which holds its fit's
        checkpoint): a descriptor to close when done, or None when another process sharing ``out`` holds it (both
        fitted the same point and wrote the same checkpoint); with ``wait``, until that process lets it go."""
        from vqad.app.commands.common import lock_folder

        folder = self.out / "work" / p.key
        while True:
            folder.mkdir(parents=True, exist_ok=True)
            try:
                return lock_folder(folder, wait)
            except FileNotFoundError:  # the other process removed it (its point finished) between the two calls
                continue

    @staticmethod
    def _source(p: Point) -> Point | None:
        """The point ``p`` is made from (post-hoc and draco-mc points: the dense fit's file; a stream curve: its
        codebook fit), or None."""
        if METHODS[p.method].kind == "posthoc" or p.method == "draco-mc":
            return Point("dense")
        if p.method == "codebook-stream":
            return Point("codebook", p.setting)
        return None

    def _pending(self) -> list[str]:
        """The labels of this sweep's points that have no record yet (an interrupt, or another process's share)."""
        return [p.label for p in self.points if not self.finished(p)]

    def _run_point(self, p: Point) -> list[dict]:
        kind = METHODS[p.method].kind
        if kind == "stream":
            return self._stream_rows(p)
        t0 = time.perf_counter()
        steps, note, refine, spent = None, None, None, 0.0
        release_freed_memory()  # each point's peak from what is live, not from the points before it
        with PeakMemory(self.device) as mem:
            if kind == "draco":
                row = self._draco_row(p)
            elif kind == "fit":
                work = self.out / "work" / p.key
                resume = (work / "checkpoint" / "config.json").is_file()
                if resume:
                    from vqad.checkpoint import read_config
                    from vqad.fit import earlier_train_seconds

                    known = earlier_train_seconds(read_config(work / "checkpoint"))  # (None: not recorded)
                    spent = known or 0.0
                    note = ("fit continued from the checkpoint of an interrupted run (fit s: "
                            + ("both runs)" if known is not None else "this run only)"))
                    self.log(f"    continuing the interrupted fit from {work / 'checkpoint'}")
                rate = {"rate_weight": p.rate_weight} if p.rate_weight else {}
                field, steps, refine, notes = self.task.fit(self._grid_cfg(p), work, resume,
                                                            refine=METHODS[p.method].refine, spent=spent, **rate)
                note = "; ".join([n for n in (note, *notes) if n]) or None
                if not any(s.discrete for s in field.grid.storages):
                    refine = None  # only codebook indices are refined
                field.bake(fp16=True)
            else:  # post hoc, from the dense point's file
                from vqad.posthoc import posthoc

                arg = {"bits": p.setting} if p.method == "kmeans" else {"rank": p.setting}
                field = posthoc(self.dense_field(), p.method, seed=self.cfg.seed, **arg)
        if kind != "draco":
            seconds = time.perf_counter() - t0 + spent
            row = self._file_row(p, field)
            row.update(fit_seconds=seconds, steps=steps, refine=refine, note=note)
        row["peak_memory_bytes"] = mem.bytes
        return [row]

    def _grid_cfg(self, p: Point):
        from vqad.config import GridConfig, parse_levels

        base, top = parse_levels(self.cfg.levels)
        m = METHODS[p.method]
        option = {GRID_OPTION_OF_PARAM[m.param]: p.setting} if m.param in GRID_OPTION_OF_PARAM else {}
        g = GridConfig(storage=m.grid, features=self.cfg.features, base_level=base, max_level=top, **option)
        g.validate()
        return g

    def _paths(self, p: Point) -> tuple[Path, Path]:
        raw = self.out / "points" / f"{p.key}.vqad"
        return raw, (raw.with_name(f"{p.key}-entropy.vqad") if self.cfg.entropy else raw)

    def _file_row(self, p: Point, field) -> dict:
        """Write the point's .vqad file(s), decode the shipped one, measure bytes and quality."""
        from vqad import fileformat as F
        from vqad.api import load

        raw, shipped = self._paths(p)
        F.save(field, raw)
        if shipped != raw:
            F.save(field, shipped, entropy=True)
        info = F.read_info(raw)
        indices = [c for c in (F.read_info(shipped) if shipped != raw else info).chunks if c.symbols]
        n = sum(c.symbols for c in indices)
        t0 = time.perf_counter()
        lod = info.levels[-1].level
        q = self.task.evaluate(load(shipped, device=self.device), lod)
        return {
            **_row(p, lod), **q, "bytes": shipped.stat().st_size, "file_bytes": raw.stat().st_size,
            "entropy_bytes": shipped.stat().st_size if shipped != raw else None,
            "grid_bytes": sum(lv.grid_bytes for lv in info.levels),
            "octree_bytes": sum(lv.tree_bytes for lv in info.levels), "decoder_bytes": info.decoder_bytes,
            "dense_fp16_grid_bytes": sum(lv.dense_fp16_bytes for lv in info.levels),
            "vertices": sum(lv.vertices for lv in info.levels), "eval_seconds": time.perf_counter() - t0,
            "file": str(shipped.relative_to(self.out)),
            # bits per index before coding (b) and as shipped, the chunks' probability models included
            "index_bits": sum(c.bits * c.symbols for c in indices) / n if n else None,
            "coded_index_bits": 8 * sum(c.length for c in indices) / n if n else None,
        }

    def dense_field(self):
        """The sweep's one dense fit, decoded from its file (what the dense point measured)."""
        if self._dense is None:
            from vqad.api import load

            path = self._paths(Point("dense"))[0]
            if not path.is_file():
                raise InputError(f"{path} is missing, but the post-hoc and draco-mc points are made from it: "
                                 f"delete {self.out / 'points' / 'dense.json'} to refit the dense grid")
            self._dense = load(path, device=self.device)
        return self._dense

    def _draco_row(self, p: Point) -> dict:
        """The input mesh (or the dense field's marching-cubes mesh) through Draco at q bits."""
        import DracoPy

        from vqad.sdf.extract import extract_mesh
        from vqad.sdf.mesh import Mesh

        if p.method == "draco-mc":
            if self._mc_mesh is None:
                self._mc_mesh = extract_mesh(self.dense_field(), resolution=self.cfg.draco_mc_resolution)
            src = self._mc_mesh
        else:
            src = self.task.mesh
        t0 = time.perf_counter()
        buf = DracoPy.encode(np.ascontiguousarray(src.vertices, dtype=np.float32),
                             np.ascontiguousarray(src.faces, dtype=np.uint32),
                             quantization_bits=p.setting, compression_level=self.cfg.draco_level)
        seconds = time.perf_counter() - t0
        path = self.out / "points" / f"{p.key}.drc"
        write_atomic(path, buf)
        back = DracoPy.decode(path.read_bytes())
        decoded = Mesh(np.asarray(back.points, dtype=np.float64), np.asarray(back.faces, dtype=np.int64).reshape(-1, 3))
        t1 = time.perf_counter()
        q = self.task.evaluate_mesh(decoded)
        note = f"{len(src.faces):,} faces"
        if p.method == "draco-mc":
            note += f", marching cubes {self.cfg.draco_mc_resolution}^3 of the dense field"
        return {**_row(p, None), **q, "bytes": len(buf), "file_bytes": len(buf), "fit_seconds": seconds,
                "eval_seconds": time.perf_counter() - t1, "vertices": len(decoded.vertices),
                "file": str(path.relative_to(self.out)), "note": note}

    def _stream_rows(self, p: Point) -> list[dict]:
        """Each LOD decoded from a prefix of the VQ-AD point's shipped file, as a client would."""
        from vqad import fileformat as F
        from vqad.api import load

        shipped = self._paths(Point("codebook", p.setting))[1]
        if not shipped.is_file():
            raise InputError(f"{shipped} is missing: delete {self.out / 'points' / f'codebook-b{p.setting}.json'} to redo that point")
        rows = []
        for lod, nbytes in F.lod_prefix_sizes(shipped).items():
            t0 = time.perf_counter()
            q = self.task.evaluate(load(shipped, device=self.device, max_bytes=nbytes), lod)
            rows.append({**_row(p, lod), **q, "bytes": nbytes, "eval_seconds": time.perf_counter() - t0,
                         "fit_seconds": 0.0, "file": str(shipped.relative_to(self.out)), "note": "file prefix"})
        return rows


def _row(p: Point, lod: int | None) -> dict:
    return {"point": p.key, "method": p.method, "param": METHODS[p.method].param, "setting": p.setting,
            "rate_weight": p.rate_weight, "lod": lod}


def run_sweep(cfg: SweepConfig, log=print) -> list[dict]:
    """Run (or resume) the sweep ``cfg`` and return its CSV rows (see :class:`Sweep`)."""
    return Sweep(cfg, log=log).run()


# ================================================================================================
# reports: results.csv, results.md, rd.png
# ================================================================================================
COLUMNS = ["point", "method", "param", "setting", "rate_weight", "lod", "bytes", "file_bytes", "entropy_bytes",
           "grid_bytes", "octree_bytes", "decoder_bytes", "dense_fp16_grid_bytes", "grid_ratio", "dense_ratio",
           "index_bits", "coded_index_bits", "vertices",
           "QUALITY", "fit_seconds", "eval_seconds", "peak_memory_bytes", "steps", "refine", "finished_at", "file",
           "note"]
QUALITY = {"sdf": ("chamfer_l1", "normal_consistency", "iou"), "nerf": ("psnr", "ssim")}
ORDER = ["dense", "codebook", "codebook-norefine", "codebook-stream", "codebook-rate", "hash", "kmeans", "lowrank", "draco-input",
         "draco-mc"]


def read_point(path: Path) -> dict | None:
    """A finished point's record (``points/<key>.json``), or ``None`` if it is damaged: unreadable,
    not JSON, or without its point key (matching the file name), method, rows and finish time."""
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    ok = (isinstance(rec, dict) and rec.get("point") == path.stem and isinstance(rec.get("method"), str)
          and rec["method"] in METHODS and isinstance(rec.get("rows"), list) and rec["rows"]
          and all(_row_ok(r, rec["method"]) for r in rec["rows"]) and isinstance(rec.get("finished_at"), str))
    return rec if ok else None


#: a point row's counts and sizes (each None or a finite number >= 0), its quality metrics (None or a number: NaN
#: where not measured, as a Draco mesh's IoU), and its texts (None or a string)
_ROW_NUMBERS = ("setting", "rate_weight", "lod", "bytes", "file_bytes", "entropy_bytes", "grid_bytes", "octree_bytes",
                "decoder_bytes", "dense_fp16_grid_bytes", "index_bits", "coded_index_bits", "vertices", "fit_seconds",
                "eval_seconds", "peak_memory_bytes", "steps", "refine")
_ROW_METRICS = ("chamfer_l1", "normal_consistency", "iou", "psnr", "psnr_matched", "ssim")
_ROW_TEXTS = ("param", "file", "note")


def _row_ok(r, method: str) -> bool:
    """Whether ``r`` is a row the tables and the plot can use: its point's method, its numbers numbers (a
    damaged record's string or 0 for bytes made collect_rows divide by it, or the plot fail), a positive size."""
    def number(v):
        return is_real(v) and math.isfinite(v) and v >= 0

    if not isinstance(r, dict) or r.get("method") != method or not {"setting", "lod", "bytes"} <= set(r):
        return False
    if any(r.get(k) is not None and not number(r[k]) for k in _ROW_NUMBERS):
        return False
    if any(r.get(k) is not None and not is_real(r[k]) for k in _ROW_METRICS):
        return False
    if any(r.get(k) is not None and not isinstance(r[k], str) for k in _ROW_TEXTS):
        return False
    if not (r.get("lod") is None or isinstance(r["lod"], int)) or not (number(r.get("bytes")) and r["bytes"] > 0):
        return False
    return not r.get("grid_bytes") or (number(r.get("dense_fp16_grid_bytes")) and r["dense_fp16_grid_bytes"] > 0)


def collect_rows(out: Path) -> list[dict]:
    """Every finished point's rows, in table order, with the ratios filled in (damaged records left out)."""
    rows = []
    for p in sorted((Path(out) / "points").glob("*.json")):
        rec = read_point(p)
        if rec is not None:
            rows += [dict(r, finished_at=rec["finished_at"]) for r in rec["rows"]]
    rows.sort(key=lambda r: (ORDER.index(r["method"]), r["setting"] or 0, r.get("rate_weight") or 0,
                             r["lod"] if r["lod"] is not None else -1))
    dense = next((r for r in rows if r["method"] == "dense"), None)
    for r in rows:
        if r.get("grid_bytes"):
            r["grid_ratio"] = r["dense_fp16_grid_bytes"] / r["grid_bytes"]
        if dense is not None:
            r["dense_ratio"] = dense["bytes"] / r["bytes"]
    return rows


def write_reports(out: Path, cfg: SweepConfig, pending: list[str] | None = None) -> list[dict]:
    """Rebuild results.csv, results.md and rd.png from the finished points; returns the rows. ``pending``: the
    points not finished yet, which results.md names (a stopped sweep's tables must not read as the whole sweep)."""
    out = Path(out)
    rows = collect_rows(out)
    quality = QUALITY[cfg.kind] + (("psnr_matched",) if cfg.kind == "nerf" and cfg.appearance != "none" else ())
    cols = [c for col in COLUMNS for c in (quality if col == "QUALITY" else (col,))]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: _csv_value(r.get(c)) for c in cols})
    write_atomic(out / "results.csv", buf.getvalue())
    table = markdown_table(rows, cfg)
    if pending:
        head, _, rest = table.partition("\n\n")
        table = (f"{head}\n\n**Incomplete:** {len(pending)} point{'s' if len(pending) > 1 else ''} of this sweep "
                 f"{'are' if len(pending) > 1 else 'is'} not finished: {'; '.join(pending)}. Run the same command again "
                 f"to go on (an interrupted fit continues from its checkpoint).\n\n{rest}")
    write_atomic(out / "results.md", table)
    plot_rd(rows, cfg, out / "rd.png")
    return rows


def _csv_value(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.6g}" if isinstance(v, float) else v


def read_csv(path: str | Path) -> list[dict]:
    """results.csv back as dicts of numbers (empty cells → None)."""
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            d = {}
            for k, v in r.items():
                if v == "":
                    d[k] = None
                    continue
                try:
                    d[k] = int(v)
                except ValueError:
                    try:
                        d[k] = float(v)
                    except ValueError:
                        d[k] = v
            rows.append(d)
    return rows


def _fmt(v, spec: str) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def markdown_table(rows: list[dict], cfg: SweepConfig) -> str:
    """The paper's Tables 2 / 3 shape: method, setting, quality, size, ratio; then the stream curve."""
    sdf = cfg.kind == "sdf"
    name = Path(cfg.dataset).name if sdf else cfg.dataset
    qh = "Chamfer-L1 ↓ | normal cons. ↑ | IoU ↑" if sdf else "PSNR (dB) ↑ | SSIM ↑"
    ent = "entropy-coded" if cfg.entropy else "raw"
    L = [
        f"# Rate–distortion sweep: {name}",
        "",
        f"`vqad sweep` of {'the mesh' if sdf else 'the capture'} `{cfg.dataset}`: octree levels {cfg.levels}, "
        f"k = {cfg.features} features, {cfg.steps} steps × {cfg.batch:,} {'points' if sdf else 'rays'} per fit"
        + (f" (at most {cfg.minutes:g} min)" if cfg.minutes else "") + f", decoder width {cfg.hidden}, seed {cfg.seed}.  ",
        ("Quality at the finest LOD, decoded from the file: Chamfer-L1 (exact point-to-surface, unit-cube units) and "
         f"normal consistency against the input mesh, IoU of 500k uniform points; marching cubes at {cfg.mc_resolution}^3. "
         "Draco points: the decoded Draco mesh against the input, same code, same frame."
         if sdf else
         f"Quality at the finest LOD, decoded from the file: PSNR / SSIM on the {cfg.eval_views!r} views"
         + (f" (first {cfg.eval_max_views})" if cfg.eval_max_views else "") + f", downscale {cfg.downscale}.") + "  ",
        f"**size** = the file as shipped ({ent} .vqad{'; Draco: the buffer' if sdf else ''}); *grid* = its feature-grid chunks alone; "
        "**vs dense** = the dense fp16 point's size / this size. Post-hoc points are made from the dense point's file "
        "(no fine-tuning).",
        *(["", refinement_note(rows, cfg.kind)] if any(r["method"].startswith("codebook") for r in rows) else []),
        *(["", rate_note(cfg, rows)] if any(r["method"] == "codebook-rate" for r in rows) else []),
        "",
        f"| method | setting | {qh} | size kB | raw file kB | grid kB | bits/index b → coded | vs dense | steps | fit s | "
        "peak memory MB |",
        "|---|---|" + "---|" * (3 if sdf else 2) + "---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["method"] == "codebook-stream":
            continue
        m = METHODS[r["method"]]
        q = (f"{_fmt(r.get('chamfer_l1'), '.5f')} | {_fmt(r.get('normal_consistency'), '.4f')} | {_fmt(r.get('iou'), '.4f')}"
             if sdf else f"{_fmt(r.get('psnr'), '.2f')} | {_fmt(r.get('ssim'), '.4f')}")
        setting = "–" if r["setting"] is None else f"{m.param} = {r['setting']}"
        if r.get("rate_weight") is not None:
            setting += f", λ = {r['rate_weight']:g}"
        bits = (f"{r['index_bits']:g} → {r['coded_index_bits']:.2f}" if r.get("index_bits") is not None
                and r.get("coded_index_bits") is not None else "–")
        grid = _fmt(r["grid_bytes"] / 1e3 if r.get("grid_bytes") else None, ",.1f")
        mem = _fmt(r["peak_memory_bytes"] / 2**20 if r.get("peak_memory_bytes") else None, ",.0f")
        raw = _fmt(r["file_bytes"] / 1e3 if r.get("file_bytes") else None, ",.1f")
        L.append(f"| {m.label} | {setting} | {q} | {r['bytes'] / 1e3:,.1f} | {raw} | "
                 f"{grid} | {bits} | {_fmt(r.get('dense_ratio'), '.1f')}× | {_fmt(r.get('steps'), ',d')} | "
                 f"{_fmt(r.get('fit_seconds'), ',.1f')} | {mem} |")
    stream = [r for r in rows if r["method"] == "codebook-stream"]
    if stream:
        L += ["", f"## Streaming: VQ-AD b = {stream[0]['setting']}, each LOD decoded from a prefix of its file", "",
              f"| LOD | prefix kB | {qh} |", "|---|---|" + "---|" * (3 if sdf else 2)]
        for r in stream:
            q = (f"{_fmt(r.get('chamfer_l1'), '.5f')} | {_fmt(r.get('normal_consistency'), '.4f')} | {_fmt(r.get('iou'), '.4f')}"
                 if sdf else f"{_fmt(r.get('psnr'), '.2f')} | {_fmt(r.get('ssim'), '.4f')}")
            L.append(f"| {r['lod']} | {r['bytes'] / 1e3:,.1f} | {q} |")
    notes = [r for r in rows if r.get("note") and r["method"] != "codebook-stream"]
    if notes:
        L += ["", "Notes: " + "; ".join(f"{r['point']}: {r['note']}" for r in notes) + "."]
    return "\n".join(L) + "\n"


def rate_sweeps(rows: list[dict]) -> list[int]:
    """The index-refinement sweeps of the rows' ``codebook-rate`` points (their ``refine`` values; [] if none)."""
    return sorted({r["refine"] for r in rows if r["method"] == "codebook-rate" and r.get("refine") is not None})


def rate_note(cfg: SweepConfig, rows: list[dict]) -> str:
    """What the rate-aware points (``codebook-rate``) of ``rows`` are."""
    est = ("given the coarser level's index at floor(v/2), the context codec's model (`--rate-context`)"
           if cfg.rate_context else "order-0")
    lams = sorted({r["rate_weight"] for r in rows if r["method"] == "codebook-rate" and r.get("rate_weight")}) \
        or (cfg.rate_weights or [])
    sweeps = rate_sweeps(rows)
    return (f"**Rate-aware points** (*VQ-AD + rate term*): VQ-AD fits whose loss gains λ × the estimated coded bits "
            f"per index ({est}; `vqad.fit.rate_term`), at λ = {', '.join(f'{v:g}' for v in lams)}, "
            + ("with no index refinement" if sweeps in ([], [0]) else
               f"ending with {' or '.join(map(str, sweeps))} index-refinement sweeps that minimise the same loss + λ × bits "
               "(order-0; `vqad.refine.rate_bit_cost`)")
            + ": their λ = 0 reference is `codebook:b`. *bits/index*: b before coding → the "
            "shipped file's payload bits per index, probability models included.")


def codebook_sweeps(rows: list[dict], kind: str) -> list[int]:
    """The index-refinement sweeps of the rows' ``codebook`` points (their ``refine`` values; the
    fit's default, :func:`default_refine`, for rows written before the sweep recorded them)."""
    return sorted({r["refine"] for r in rows if r["method"] == "codebook" and r.get("refine") is not None}) \
        or [default_refine(kind)]


def refinement_note(rows: list[dict], kind: str) -> str:
    """Which points of the table had index refinement (:mod:`vqad.refine`), and that no baseline has
    a comparable step."""
    sweeps = codebook_sweeps(rows, kind)
    n = " or ".join(str(v) for v in sweeps)
    recorded = all(r.get("refine") is not None for r in rows if METHODS[r["method"]].kind == "fit"
                   and METHODS[r["method"]].grid == "codebook")
    where = ("Each point's sweeps: the `refine` column of results.csv." if recorded else
             "These rows predate the `refine` column of results.csv: the sweeps stated are the fit's current default.")
    if sweeps == [0]:
        return ("**Index refinement**: none; the VQ-AD points, like every baseline, are used as trained "
                f"(radiance-field fits do not refine their indices by default: `fit-nerf --refine 0`). {where}")
    text = (f"**Index refinement**: every *VQ-AD (learned indices)* point ends with {n} Gauss–Newton "
            f"index-refinement sweep{'' if sweeps == [1] else 's'} after training (`vqad.refine`, the "
            f"{'SDF ' if kind == 'sdf' else ''}fit's default); ")
    if any(r["method"] == "codebook-norefine" for r in rows):
        text += "*VQ-AD, no index refinement* points are the same fits without them. "
    else:
        text += "`codebook-norefine:b` in the sweep adds the same fits without them. "
    rated = rate_sweeps(rows)
    if rated:
        text += ("*VQ-AD + rate term* points have none. " if rated == [0] else
                 f"*VQ-AD + rate term* points end with {' or '.join(map(str, rated))} rate-aware sweeps (they "
                 "minimise loss + λ × index bits). ")
    return text + ("No baseline gets a comparable step: dense and hash are used as trained, k-means and low rank "
                   f"as computed from the dense fit, Draco as encoded. {where}")


STYLES = {  # marker, line style, colour
    "dense": ("*", "", "black"), "codebook": ("o", "-", "C0"), "codebook-stream": ("o", ":", "C0"),
    "codebook-norefine": ("x", "--", "C0"),
    "hash": ("s", "-", "C1"), "kmeans": ("^", "-", "C2"), "lowrank": ("v", "-", "C3"),
    "draco-input": ("D", "--", "C4"), "draco-mc": ("P", "--", "C5"),
}
RATE_COLORS = ("C6", "C8", "C9", "C7", "C5")  # codebook-rate: one series per b, in ascending b
RATE_MARKERS = ("d", "h", "p", "<", ">")


def _series(rows: list[dict], method: str):
    """(label, style, points) of ``method``'s plotted series: one, or for ``codebook-rate`` one per b."""
    marker, ls, color = STYLES.get(method, ("o", "-.", "C6"))
    if method != "codebook-rate":
        return [(METHODS[method].label, (marker, ls, color), rows)]
    bits = sorted({r["setting"] for r in rows})
    return [(f"{METHODS[method].label}, b = {b}", (RATE_MARKERS[i % 5], "-.", RATE_COLORS[i % 5]),
             [r for r in rows if r["setting"] == b]) for i, b in enumerate(bits)]


def plot_rd(rows: list[dict], cfg: SweepConfig, path: Path) -> None:
    """x: bytes (log), y: PSNR or Chamfer-L1 (log); one line and marker per method, settings labelled."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sdf = cfg.kind == "sdf"
    q = "chamfer_l1" if sdf else "psnr"
    fig = Figure(figsize=(8, 5.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for method in ORDER:
        pts = [r for r in rows if r["method"] == method and r.get(q) is not None and not math.isnan(r[q])]
        if not pts:
            continue
        for label, (marker, ls, color), series in _series(pts, method):
            series = sorted(series, key=lambda r: r["bytes"])
            label += f" (b = {series[0]['setting']})" if method == "codebook-stream" else ""
            if method == "codebook" and codebook_sweeps(rows, cfg.kind) != [0]:  # say so where the baselines have none
                label += f", {' or '.join(map(str, codebook_sweeps(rows, cfg.kind)))} index-refinement sweeps"
            if method == "codebook-rate" and cfg.rate_context:
                label += ", rate given the coarser index"
            ax.plot([r["bytes"] for r in series], [r[q] for r in series], marker=marker, linestyle=ls or "none",
                    color=color, label=label, markersize=9 if method == "dense" else 5,
                    alpha=0.6 if method == "codebook-stream" else 1.0)
            for r in series:
                if method == "codebook-stream":
                    txt = f"L{r['lod']}"
                elif r.get("rate_weight") is not None:  # the series names b; each point its λ
                    txt = f"λ={r['rate_weight']:g}"
                else:
                    txt = f"{r['param']}={r['setting']}" if r["setting"] is not None else ""
                if txt:
                    below = method in ("codebook-stream", "codebook-rate")  # not on top of a b= label
                    ax.annotate(txt, (r["bytes"], r[q]), textcoords="offset points", xytext=(4, -10 if below else 4),
                                fontsize=7, color=color)
    ax.set_xscale("log")
    if sdf:
        ax.set_yscale("log")
    ax.set_xlabel("file bytes (log scale)")
    ax.set_ylabel("Chamfer-L1, unit cube (log scale, lower is better)" if sdf else
                  f"PSNR (dB) on {cfg.eval_views!r} views (higher is better)")
    name = Path(cfg.dataset).name if sdf else cfg.dataset
    budget = f"{cfg.steps} steps" + (f", ≤ {cfg.minutes:g} min per fit" if cfg.minutes else "")
    ax.set_title(f"rate–distortion: {name} (levels {cfg.levels}, k = {cfg.features}, {budget})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8, loc="best")
    with warnings.catch_warnings():  # a title in a script the font lacks draws boxes: not worth a warning a point
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.tight_layout()
        with atomic_path(path, "plot") as tmp:
            fig.savefig(tmp, format="png")


__all__ = ["SweepConfig", "Sweep", "run_sweep", "parse_methods", "Point", "Method", "METHODS", "DEFAULT_METHODS",
           "load_config_file", "detect_kind", "write_reports", "collect_rows", "read_csv", "markdown_table", "plot_rd",
           "PeakMemory", "METHOD_SPEC_HELP", "default_refine", "codebook_sweeps", "refinement_note", "rate_note", "rate_sweeps",
           "parse_rate_weights", "DEFAULT_RATE_WEIGHTS"]
