"""Readers of posed-image captures into a :class:`~vqad.nerf.data.SceneDataset`.

Formats (``load_dataset(..., format=...)``; ``"auto"`` looks at the files present):

========== ============================================ ==================================================
format     recognised by                                splits
========== ============================================ ==================================================
blender    ``transforms_train.json`` (NeRF-synthetic)    ``transforms_{train,val,test}.json``; a missing
                                                        test split is val (a missing val is test)
ngp        ``transforms.json`` (instant-ngp)             every 8th frame is test (and val), the rest train
llff       ``poses_bounds.npy`` + ``images[_N]/``        every 8th image is test (and val), the rest train
rtmv       ``NNNNN.json`` + ``NNNNN.exr`` (+ depth)      sorted; first ⌊2N/3⌋ train, next ⌊N/30⌋ val, rest
                                                        test (kaolin-wisp's split); no val → val = test
colmap     ``sparse/0/cameras.bin`` (or ``.txt``)        every 8th image by name is test (and val), the rest
           + ``images/``                                train (:mod:`.colmap`; the scene is contracted)
procedural the name ``procedural`` / ``builtin:procedural`` 40 / 5 / 10 views (:mod:`.procedural`)
========== ============================================ ==================================================

Where each split came from is recorded in ``SceneDataset.split_sources``.

Conventions of the output (see :mod:`vqad.nerf.data`): OpenGL camera-to-world poses; intrinsics
``fx, fy, cx, cy`` in pixels of the images as held (after ``downscale``), pixel centres at ``+ ½``;
images ``uint8`` composited on ``background`` (alpha, when present, becomes the mask); depth
``float16`` z-depth in world units (float32 where float16 would overflow or round), 0 where nothing
was hit.

Per-format conversions:

* **blender / ngp**: ``transform_matrix`` is already OpenGL camera-to-world. Intrinsics come from
  ``fl_x``/``fl_y`` or ``camera_angle_x``/``camera_angle_y`` (``fl = ½ w / tan(angle / 2)``, ``fl_y``
  defaults to ``fl_x``), ``cx``/``cy`` (default: the image centre), given for an image of ``w × h``
  (default: the image's own size) and scaled to the size actually read. Any of these keys may be
  overridden per frame. The lens (:mod:`vqad.nerf.lens`) becomes ``Views.distortion`` and the rays
  undistort it: ``is_fisheye: true`` (instant-ngp) or ``camera_model: OPENCV_FISHEYE`` (nerfstudio)
  is OpenCV's fisheye with ``k1..k4``; otherwise ``k1, k2, k3, p1, p2`` are OpenCV's radial-tangential
  terms (a non-zero ``k4`` there, which nerfstudio and OpenCV read differently, and other camera
  models are refused). ``file_path`` may omit the extension. A frame's ``depth_file_path``
  (nerfstudio's: Polycam, Record3D, a phone's depth sensor) is a z-depth map, a 16-bit PNG (or EXR,
  32-bit TIFF, 2-D ``.npy``) in ``depth_unit_scale_factor`` world units (default 0.001: millimetres
  to metres, as nerfstudio), 0 where there is none; a map smaller than its photo is resized to it by
  nearest neighbour. With depth on every frame the octree is built from it (``--octree auto``).
  Loss masks (``Views.valid``, docs/method.md §8.4): a frame's ``mask_path`` (nerfstudio: a pixel with
  a non-zero value, a palette mask's index, is trained on, 0 is left out; on every frame or none) or a
  ``dynamic_mask_<image stem>.png`` beside its image (instant-ngp: a non-zero colour is left out; the
  two on one frame are refused); a mask smaller than its image is resized to it by nearest neighbour,
  a lossy one (JPEG, WebP, JPEG 2000) is on from 128 up, and a downscaled pixel is kept only where its
  whole block is. A left-out pixel has no depth and counts as foreground for carving. COLMAP and LLFF
  captures read the dynamic masks beside their photos too, and a COLMAP project its ``masks/<image
  name>.png`` (:func:`vqad.nerf.formats.colmap.colmap_mask_of`).
* **llff**: ``poses_bounds.npy`` rows are ``[R | t | (H, W, f)]`` (3×5, column-major flattened)
  then ``near, far``; R's columns are [down, right, backwards] and become [right, up, backwards]
  (OpenGL): ``x = right = col 1``, ``y = up = −col 0``, ``z = col 2``. ``(H, W, f)`` is for the
  full-size photos and is scaled to the images read (``cx, cy`` = image centre). World coordinates
  are the file's own (no recentring, no NDC).
* **rtmv**: ``camera_data.cam2world`` is stored transposed (translation in the last row), as
  kaolin-wisp's reader documents: ``c2w = array(cam2world).T`` is an OpenGL camera-to-world. Colour
  EXRs are linear RGB with straight (not premultiplied) alpha; they are composited on the
  background in linear light, then converted to sRGB. ``NNNNN.depth.exr`` holds, by default, the
  *distance along the ray* from the camera centre (as kaolin-wisp treats it: ``x = o + d·depth``
  with unit ``d``); it is converted to z-depth ``z = depth · cos θ``. Pass ``depth_kind="z"`` to
  :func:`read_rtmv` for files that store z-depth. Depth values that are non-finite, ``<= 0`` or
  ``>= 1000`` (RTMV's background sentinel) mean "no hit".

Every pose must be rigid (last row ``0 0 0 1``, ``RᵀR = I`` within 1e-3, ``det R > 0``) and every
image appear once; a COLMAP camera more than 50 times the typical distance from the cameras' median
position is refused as a failed registration. Images are 8-bit (PNG, JPEG) or EXR.

Scene normalisation (``x_unit = (x_world − center) · scale``, a cube around a world box):

* blender: the NeRF-synthetic object box [-1.5, 1.5]^3 (the box instant-ngp uses for it);
* ngp: the unit cube of ngp space, ``ngp = world · scale + offset`` (defaults 0.33 and 0.5), i.e.
  centre ``(0.5 − offset) / scale`` and half extent ``1 / (2 · scale)`` in world units (instant-ngp's
  ``aabb_scale`` 1 box); with ``aabb_scale`` A > 1 the scene extends to A times that box, and
  ``SceneDataset.outer_scale = A``: the field contracts the shell between the two boxes
  (:mod:`vqad.nerf.contraction`). ``aabb_scale`` < 1 keeps the smaller box as the cube. A nerfstudio
  ``transforms.json`` (``camera_model``, ``applied_transform``, ``applied_scale`` or ``orientation_override``,
  and none of ``aabb_scale``, ``scale``,
  ``offset``: poses in its structure from motion's units) gets COLMAP's box from its cameras instead;
* colmap (and nerfstudio): centred where the optical axes meet, half extent 0.375 × the cameras'
  mean distance to that point, contracted out to 16 times it; where the cameras look at no common
  point (forward-facing, inside-out), the 5–95 % box of the capture's points or back-projected depth
  instead (:func:`.common.capture_box`);
* llff: the box holding every camera's view frustum between 0.9 × its near bound and 1.1 × its far
  bound;
* rtmv: the box of the back-projected depth of all views, grown by 5 % (or the JSON's
  ``scene_min_3d_box`` / ``scene_max_3d_box`` when there is no depth);
* procedural: the shapes' known box, grown by 10 %.

``near``/``far`` (world units, z-depth) bound that box as seen from every camera (for llff: the
near/far bounds of the file, ×0.9 and ×1.1). A capture whose training rays mostly miss its box (under 2 %
of them cross it: a box in the wrong units or place) is read with a warning.

Downscaling (``downscale=N``) crops each image to a multiple of N pixels (from the bottom / right,
so ``cx, cy`` keep their meaning) and averages N×N blocks (area resampling: PIL's ``reduce`` for 8-bit
images, which premultiplies alpha, the same box average on premultiplied float colour for EXRs);
intrinsics are divided by N. Depth is not averaged across silhouettes: a block keeps the median of
its valid samples when at least half of them are valid, else 0; an even count's two middle samples are
averaged only where they lie on one surface, within 15 % (:func:`.common.downscale_depth`: a silhouette
shallower than that cannot be told from a slope), else the nearer is kept.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

from vqad.errors import InputError
from vqad.nerf.data import SceneDataset, check_downscale
from vqad.nerf.formats.blender import read_blender
from vqad.nerf.formats.colmap import read_colmap
from vqad.nerf.formats.common import _limit
from vqad.nerf.formats.llff import read_llff
from vqad.nerf.formats.ngp import read_ngp
from vqad.nerf.formats.rtmv import _RTMV_JSON, read_rtmv

FORMATS = ("blender", "ngp", "llff", "rtmv", "colmap", "procedural")
_ALIASES = {"nerf_synthetic": "blender", "nerf-synthetic": "blender", "instant-ngp": "ngp", "instant_ngp": "ngp"}
PROCEDURAL_NAMES = ("procedural", "builtin:procedural")


# -- format detection and the entry point ----------------------------------------------------------
def detect_format(path) -> str:
    """The format of a dataset folder (or of a ``transforms*.json`` / ``poses_bounds.npy`` file)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"dataset not found: {p} (give a dataset folder, or 'procedural' for the built-in scene)")
    if p.is_file():
        if re.fullmatch(r"transforms_(train|val|test)\.json", p.name):
            return "blender"
        if p.suffix == ".json":
            return "ngp"
        if p.name == "poses_bounds.npy":
            return "llff"
        if p.stem in ("cameras", "images", "points3D") and p.suffix in (".bin", ".txt"):
            return "colmap"  # a file of the model: read_colmap finds the capture around it
        raise InputError(f"{p} is not a dataset folder or a recognised dataset file")
    names = {q.name for q in p.iterdir()}
    if "transforms_train.json" in names:
        return "blender"
    if "transforms.json" in names:
        return "ngp"
    if "poses_bounds.npy" in names:
        return "llff"
    if any(_RTMV_JSON.match(n) for n in names) and any(re.fullmatch(r"\d+\.exr", n) for n in names):
        return "rtmv"
    if any((d / "cameras.bin").is_file() or (d / "cameras.txt").is_file() for d in (p / "sparse" / "0", p / "sparse", p)):
        return "colmap"
    raise InputError(
        f"{p} holds no recognisable dataset: expected transforms_train.json (blender), transforms.json (ngp), "
        "poses_bounds.npy + images_N/ (llff) or NNNNN.json + NNNNN.exr (rtmv); or pass --format"
    )


def _check_args(downscale, background) -> tuple[int, tuple[float, float, float]]:
    downscale = check_downscale(downscale)
    try:
        bg = tuple(float(c) for c in background)
    except (TypeError, ValueError):
        bg = ()
    if len(bg) != 3 or not all(0.0 <= c <= 1.0 for c in bg):
        raise InputError(f"the background must be three numbers in [0, 1], not {background!r}")
    return int(downscale), bg


def load_dataset(path_or_name, format: str = "auto", downscale: int = 1, background=(1.0, 1.0, 1.0),
                 split_limit: int | Mapping[str, int] | None = None) -> SceneDataset:
    """Read a dataset folder (or the built-in scene) into a :class:`SceneDataset`.

    Args:
        path_or_name: a dataset folder (or its ``transforms*.json`` / ``poses_bounds.npy``), or
            ``"procedural"`` / ``"builtin:procedural"`` for the built-in scene.
        format: ``auto | blender | ngp | llff | rtmv | procedural``.
        downscale: integer area-downscaling factor (intrinsics follow).
        background: RGB in [0, 1] that images with alpha are composited on.
        split_limit: keep only the first N views of every split (an int) or of the named splits
            (``{"val": 20}``).
    Raises:
        InputError: unknown format, nothing recognisable, missing images, pose/image count
            mismatch, non-finite poses, images of different sizes, ...
    """
    downscale, background = _check_args(downscale, background)
    fmt = _ALIASES.get(str(format).lower(), str(format).lower())
    if fmt != "auto" and fmt not in FORMATS:
        raise InputError(f"unknown dataset format {format!r}: choose one of auto, {', '.join(FORMATS)}")
    name = str(path_or_name)
    if fmt == "procedural" or (fmt == "auto" and name in PROCEDURAL_NAMES):
        if name not in PROCEDURAL_NAMES:
            raise InputError(f"the procedural scene is named 'procedural', not {name!r}")
        from vqad.nerf.procedural import ProceduralConfig, procedural_dataset

        cfg = ProceduralConfig()
        if downscale > cfg.resolution:  # as for a capture's images (formats.common), not a 1-pixel scene
            raise InputError(f"--downscale {downscale} is larger than the image ({cfg.resolution}×{cfg.resolution}): "
                             "use a smaller factor")
        counts = {s: len(_limit(range(getattr(cfg, f"n_{s}")), s, split_limit)) for s in ("train", "val", "test")}
        cfg = ProceduralConfig(n_train=counts["train"], n_val=counts["val"], n_test=counts["test"])
        return procedural_dataset(cfg, background=background, downscale=downscale)
    if fmt == "auto":
        fmt = detect_format(name)
    path = Path(name)
    if not path.exists():
        raise InputError(f"dataset not found: {path}")
    readers = {"blender": read_blender, "ngp": read_ngp, "llff": read_llff, "rtmv": read_rtmv, "colmap": read_colmap}
    if fmt in ("blender", "rtmv", "colmap") and path.is_file():
        path = path.parent
    if fmt != "ngp" and not path.is_dir():
        raise InputError(f"{path} is not a folder: the {fmt} format is a folder of files")
    try:
        return readers[fmt](path, downscale=downscale, background=background, split_limit=split_limit)
    except OSError as e:  # one the readers did not name (a listed file's name too long, an I/O error): one line
        raise InputError(f"cannot read the {fmt} capture {path}: {e.strerror or e}"
                         + (f" ({e.filename})" if e.filename else "")) from e
