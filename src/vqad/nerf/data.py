"""The in-memory form every radiance-field dataset reader produces (the contract between the
readers in :mod:`vqad.nerf.datasets` and the renderer / trainer).

Conventions:
* camera-to-world poses ``c2w (N, 4, 4)`` in the OpenGL convention: x right, y up, the camera looks
  down −z (Blender / NeRF-synthetic / instant-ngp). Readers of other conventions (LLFF, RTMV)
  convert to this one.
* pinhole intrinsics ``(N, 4)`` = ``fx, fy, cx, cy`` in pixels of the (possibly downscaled) images;
  optional lenses ``(N, 9)``, one row of :data:`vqad.nerf.lens.LENS_COLUMNS` per view (OpenCV's
  radial-tangential or fisheye model; ``(N, 4)`` ``k1, k2, p1, p2`` is taken as the former).
* images ``(N, H, W, 3) uint8`` (RGB, already composited on ``background`` when the source has
  alpha), masks ``(N, H, W) uint8`` (255 = foreground) when known, depth ``(N, H, W) float16`` (float32
  where float16 cannot hold the capture's depths) z-depth along the camera's viewing axis in world
  units, 0 where there is no surface.
* loss masks ``valid (N, H, W) bool`` when the capture has them (nerfstudio's ``mask_path``, instant-ngp's
  ``dynamic_mask_*.png``): the pixels to train on and to score; False marks what the field must not
  learn (a passer-by, the photographer's shadow). ``masks`` and ``valid`` differ: a foreground mask
  says where the object is (its complement is empty space), a loss mask says which pixels to trust.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vqad.errors import InputError
from vqad.field import Normalization
from vqad.nerf.lens import LENS_MODELS, lens_rows


@dataclass
class Views:
    """One split of posed images."""

    images: torch.Tensor  # (N, H, W, 3) uint8
    c2w: torch.Tensor  # (N, 4, 4) float32, OpenGL convention
    intrinsics: torch.Tensor  # (N, 4) float32: fx, fy, cx, cy
    masks: torch.Tensor | None = None  # (N, H, W) uint8, 255 = foreground
    depth: torch.Tensor | None = None  # (N, H, W) float16 (or float32) z-depth, world units, 0 = no hit
    distortion: torch.Tensor | None = None  # (N, 9) float32 lens rows (vqad.nerf.lens.LENS_COLUMNS)
    names: list[str] = field(default_factory=list)
    valid: torch.Tensor | None = None  # (N, H, W) bool loss masks: True = train on and score; None: every pixel

    def __post_init__(self):
        if self.valid is not None:
            if self.valid.dtype != torch.bool or tuple(self.valid.shape) != tuple(self.images.shape[:3]):
                raise ValueError(f"Views: loss masks must be bool of shape {tuple(self.images.shape[:3])}, not "
                                 f"{self.valid.dtype} {tuple(self.valid.shape)}")
        if self.distortion is not None:  # one layout everywhere: k1, k2, p1, p2 become OpenCV lens rows
            self.distortion = lens_rows(self.distortion, len(self)).float().contiguous()
            if self.distortion.shape != (len(self), 9):
                raise ValueError(f"Views: {len(self)} images but lens rows of shape {tuple(self.distortion.shape)}")
            if not bool(torch.isin(self.distortion[:, 0], torch.tensor(LENS_MODELS, dtype=torch.float32)).all()):
                raise ValueError(f"Views: a lens row's model must be one of {LENS_MODELS} (vqad.nerf.lens)")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def hw(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    @property
    def composited(self) -> bool:
        """Whether the reader composited these photos on the dataset's background: some pixel's alpha was
        below 255, so the colour there is partly a background the camera never saw."""
        return self.masks is not None and bool((self.masks < 255).any())


@dataclass
class SceneDataset:
    """A posed-image capture, normalised into the unit cube.

    ``normalization`` maps world → unit cube [-1, 1]^3 (it is stored with the model);
    ``near``/``far`` bound the scene's z-depth (along each camera's optical axis) in world units, so
    ``near`` also bounds the ray distance from below and ``far / cos θ`` from above;
    ``background`` is the RGB in [0, 1] that images with alpha were composited on and that the
    renderer composites on.
    """

    name: str
    format: str  # blender | ngp | llff | rtmv | procedural
    splits: dict[str, Views]
    normalization: Normalization
    near: float
    far: float
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    source: str = ""  # path it was read from ("" for built-in scenes)
    downscale: int = 1
    # where each split came from, e.g. {"test": "transforms_val.json (no transforms_test.json: test = val)"}
    split_sources: dict[str, str] = field(default_factory=dict)
    # the world-space box (lo, hi) that ``normalization`` maps onto [-1, 1]^3
    bbox: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None
    # the scene extends to this many times ``bbox`` (around its centre): > 1 is a large scene, fitted
    # with a contracted field (vqad.nerf.contraction); instant-ngp's aabb_scale
    outer_scale: float = 1.0
    # sparse surface points in world coordinates (N, 3) float32 that came with the capture (structure
    # from motion: COLMAP's points3D, nerfstudio's sparse_pc.ply), or None; used by --octree points
    points: torch.Tensor | None = None



#: what to check when a loss mask leaves out every pixel
MASK_POLARITY = ("check the masks' polarity (mask_path and a COLMAP project's masks/: white = train on the pixel; "
                 "dynamic_mask_*: white = leave it out)")


def mask_summary(views: Views) -> str:
    """``", loss masks: 12 views (3.1% of the pixels left out)"``: what a split's loss masks leave out, for a
    fit's first lines ("" without masks)."""
    if views.valid is None:
        return ""
    masked = int((~views.valid).flatten(1).any(dim=1).sum())
    kept, total = int(views.valid.sum()), views.valid.numel()
    share = f"{1 - kept / total:.1%}"
    if share in ("0.0%", "100.0%"):  # too close to either end to say in a share
        share = f"all but {kept:,} of {total:,}"
    return f", loss masks: {masked} view{'s' if masked != 1 else ''} ({share} of the pixels left out)"


def kept_views(views: Views, first: int | None = None) -> int:
    """How many of a split's views (its ``first`` ones, or all) keep at least one pixel through their loss
    masks: every view without masks."""
    n = len(views) if first is None else min(first, len(views))
    if views.valid is None:
        return n
    return int(views.valid[:n].flatten(1).any(dim=1).sum())


def require_training_pixels(views: Views) -> None:
    """Refuse a training split whose loss masks leave out every pixel (before anything reads the capture's
    depth or builds an octree from it: the masks removed that too)."""
    if views.valid is not None and kept_views(views) == 0:
        raise InputError(f"the loss masks leave out every pixel of the training views: nothing to train on; "
                         f"{MASK_POLARITY}")


#: the largest ``--downscale`` (and a stored record's): a 1024× smaller 100-megapixel photo is already 12×8 pixels
MAX_DOWNSCALE = 1024


def check_downscale(downscale) -> int:
    """``--downscale`` as an integer in 1..:data:`MAX_DOWNSCALE` (NumPy integers taken), else an :class:`InputError`."""
    if isinstance(downscale, bool) or not isinstance(downscale, (int, np.integer)) or not 1 <= downscale <= MAX_DOWNSCALE:
        raise InputError(f"--downscale must be an integer in 1..{MAX_DOWNSCALE}, not {downscale!r}")
    return int(downscale)


#: the keys of a stored dataset record (:func:`dataset_info`) and the types each may hold
DATASET_INFO_TYPES = {"name": str, "format": str, "source": str, "downscale": int, "background": list,
                      "views": int, "size": list}


def check_dataset_info(info: dict) -> dict:
    """A dataset record read from a checkpoint or .vqad header, checked key by key.

    Raises:
        InputError: unknown keys, wrong types, a downscale outside 1..MAX_DOWNSCALE or a background that is not
            3 numbers in [0, 1].
    """
    if not isinstance(info, dict):
        raise InputError(f"the dataset record must be an object, got {type(info).__name__}")
    unknown = set(info) - set(DATASET_INFO_TYPES)
    wrong = [k for k, v in info.items() if k in DATASET_INFO_TYPES and
             (not isinstance(v, DATASET_INFO_TYPES[k]) or isinstance(v, bool))]
    if unknown or wrong:
        raise InputError(f"the dataset record has unknown or mistyped keys: {', '.join(sorted(unknown | set(wrong)))}")
    if "downscale" in info and not 1 <= info["downscale"] <= MAX_DOWNSCALE:
        raise InputError(f"the dataset record's downscale must be in 1..{MAX_DOWNSCALE}, got {info['downscale']}")
    bg = info.get("background", [0.0, 0.0, 0.0])
    if len(bg) != 3 or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and 0 <= c <= 1 for c in bg):
        raise InputError(f"the dataset record's background must be 3 numbers in [0, 1], got {bg!r:.60}")
    if "views" in info and info["views"] < 0:
        raise InputError(f"the dataset record's views must be >= 0, got {info['views']}")
    size = info.get("size", [1, 1])
    if len(size) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in size):
        raise InputError(f"the dataset record's size must be 2 positive integers (width, height), got {size!r:.60}")
    return dict(info)


def capture_changes(info: dict, dataset: "SceneDataset") -> list[str]:
    """How ``dataset`` differs from the capture the record ``info`` (:func:`dataset_info`) describes: its
    training views' count and size (what a capture regenerated or replaced at the same path changes); empty
    when they agree or the record predates them."""
    now = dataset_info(dataset)
    shown = {"views": lambda n: f"{n} views", "size": lambda wh: f"{wh[0]}×{wh[1]} px"}
    return [f"{shown[key](info[key])} then, {shown[key](now[key])} now" for key in ("views", "size")
            if key in info and info[key] != now[key]]


def dataset_info(dataset: SceneDataset) -> dict:
    """What ``vqad render`` / ``vqad eval`` need to load the same views again (stored with the model)."""
    train = dataset.splits.get("train")
    procedural = dataset.format == "procedural" or not dataset.source
    return {
        "name": dataset.name,
        "format": dataset.format,
        # absolute: eval and render from another folder find it (and never a same-named capture there)
        "source": dataset.source if procedural else str(Path(dataset.source).resolve()),
        "downscale": int(dataset.downscale),
        "background": [float(c) for c in dataset.background],
        **({"views": len(train), "size": [int(train.hw[1]), int(train.hw[0])]} if train is not None else {}),
    }
