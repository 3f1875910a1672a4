"""RGB-D sequences: depth (and colour) frames with intrinsics and camera poses, and their readers.

:class:`RGBDSequence` loads frames lazily, so a long capture never sits in memory whole.

Conventions every reader and writer keeps (and fusion relies on):

* ``poses (N, 4, 4)`` camera-to-world, OpenCV camera axes (x right, y down, z forward);
* ``K (3, 3)`` pinhole intrinsics in pixels, OpenCV pixel convention: pixel ``(col, row)`` is
  *centred* at ``(u, v) = (col, row)``, so a camera point ``X`` lands in pixel
  ``(round(fx X/Z + cx), round(fy Y/Z + cy))``. (vqad's radiance-field readers put pixel centres at
  ``col + ½``; :func:`read_rtmv_sequence` and the procedural scene shift ``cx, cy`` by −½ to match.)
* depth is z-depth (along the optical axis, not the ray) in ``units``, 0 where missing.

Readers:

* :func:`read_tum` — TUM RGB-D (``rgb.txt``, ``depth.txt``, ``groundtruth.txt``, 16-bit PNG depth);
* :func:`read_redwood` — Redwood / Open3D folders (``depth/``, ``color/``, a ``*.log`` trajectory,
  an Open3D ``PinholeCameraIntrinsic`` JSON);
* :func:`read_rtmv_sequence` — an RTMV scene (EXR ray-distance depth);
* ``"procedural"`` — the built-in analytic scene (:func:`vqad.tsdf.synth.procedural_sequence`);
* :func:`read_sequence` — detects the layout and dispatches.

Every problem with the input raises :class:`~vqad.errors.InputError` with one line saying what to do.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from vqad.config import is_real
from vqad.errors import InputError
from vqad.tsdf import as_colour8, check_units, is_whole

#: TUM depth PNGs hold depth × 5000 (0.2 mm steps); Redwood / Open3D ones millimetres
TUM_DEPTH_SCALE = 5000.0
REDWOOD_DEPTH_SCALE = 1000.0
#: TUM's associate.py pairs time stamps at most this far apart (seconds)
TUM_MAX_DT = 0.02
#: a median depth outside this range (metres) means the depth scale is wrong
PLAUSIBLE_DEPTH_M = (0.05, 20.0)
#: ``|RᵀR − I|`` above this is not a rotation
RIGID_TOL = 1e-3

#: Named pinhole cameras ``fx, fy, cx, cy`` (pixels, 640×480). TUM's calibrated colour cameras of
#: the freiburg1/2/3 sequences (TUM RGB-D "file formats" page), and the PrimeSense factory default
#: that Open3D (``PinholeCameraIntrinsicParameters.PrimeSenseDefault``) and Redwood use.
CAMERA_PRESETS: dict[str, tuple[float, float, float, float]] = {
    "fr1": (517.3, 516.5, 318.6, 255.3),
    "fr2": (520.9, 521.0, 325.1, 249.7),
    "fr3": (535.4, 539.2, 320.1, 247.6),
    "primesense": (525.0, 525.0, 319.5, 239.5),
}
_PRESET_SIZE = (640, 480)

FORMATS = ("auto", "tum", "redwood", "rtmv", "procedural")


def check_pose(m, what: str) -> np.ndarray:
    """A rigid camera-to-world pose ``(4, 4) float64``: finite, last row ``0 0 0 1``, a rotation
    (``RᵀR = I`` within :data:`RIGID_TOL`, ``det R = +1``); else :class:`InputError`."""
    try:
        a = np.asarray(m, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InputError(f"{what}: the pose is not a numeric 4×4 matrix") from e
    if a.shape != (4, 4):
        raise InputError(f"{what}: the pose must be a 4×4 matrix, not {list(a.shape)}")
    if not np.all(np.isfinite(a)):
        raise InputError(f"{what}: the pose has non-finite values (NaN or inf); fix or drop that frame")
    if np.abs(a[:3, 3]).max() > MAX_TRANSLATION:
        raise InputError(f"{what}: the camera is {np.abs(a[:3, 3]).max():.3g} units from the origin, beyond "
                         f"{MAX_TRANSLATION:g}: not a scan's pose (check the trajectory's units)")
    if not np.allclose(a[3], [0, 0, 0, 1], atol=1e-6):
        raise InputError(f"{what}: the pose's last row is {a[3].tolist()}, not [0, 0, 0, 1]; "
                         "give a rigid camera-to-world matrix")
    r = a[:3, :3]
    err = float(np.abs(r.T @ r - np.eye(3)).max())
    if err > RIGID_TOL or np.linalg.det(r) < 0:
        raise InputError(f"{what}: the pose is not rigid (|RᵀR − I| = {err:.2g}, det R = {np.linalg.det(r):.3g}); "
                         "poses must be rotations plus translations (no scale, shear or mirror)")
    return a


#: the largest text file (lists, trajectories, camera JSON) a sequence reader reads: a 100k-frame TUM list is ~6 MB
MAX_TEXT_BYTES = 256 << 20
#: the largest image side a sequence's camera may state
MAX_IMAGE_SIDE = 65_536
#: the largest camera translation from the origin (in the sequence's units): beyond it the fusion's block
#: coordinates overflow (a 1e20 silently dropped its frame)
MAX_TRANSLATION = 1e9


def read_text_file(path: Path, what: str) -> str:
    """The UTF-8 text of ``path``, a regular file of at most :data:`MAX_TEXT_BYTES` (a FIFO would block forever
    and /dev/zero fill the memory), or one :class:`InputError` naming ``what`` it is and the problem."""
    import stat

    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{what} {path} is not a regular file (a device, a pipe or a folder); give the file itself")
        if st.st_size > MAX_TEXT_BYTES:
            raise InputError(f"{what} {path} holds {st.st_size:,} bytes, more than {MAX_TEXT_BYTES:,}: not a "
                             "sequence's text file")
        data = Path(path).read_bytes()
    except OSError as e:
        raise InputError(f"cannot read {what} {path}: {e.strerror or e}") from e
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"cannot read {what} {path}: not UTF-8 text ({e.reason} at byte {e.start}); fix or "
                         "regenerate it") from e


def intrinsics_matrix(fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    """``K (3, 3)`` from ``fx, fy, cx, cy`` (pixels)."""
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=np.float64)


def parse_intrinsics(value, width: int | None = None, height: int | None = None) -> np.ndarray:
    """``K (3, 3)`` from a ``(3, 3)`` array, ``(fx, fy, cx, cy)``, the text ``"fx,fy,cx,cy"``, or a
    preset name of :data:`CAMERA_PRESETS` (scaled to ``width × height`` when those are given and
    are not 640×480)."""
    if isinstance(value, str):
        key = value.strip().lower().replace("freiburg", "fr")
        if key in CAMERA_PRESETS:
            fx, fy, cx, cy = CAMERA_PRESETS[key]
            if width and height and (width, height) != _PRESET_SIZE:
                sx, sy = width / _PRESET_SIZE[0], height / _PRESET_SIZE[1]
                fx, fy, cx, cy = fx * sx, fy * sy, (cx + 0.5) * sx - 0.5, (cy + 0.5) * sy - 0.5
            return intrinsics_matrix(fx, fy, cx, cy)
        try:
            value = [float(x) for x in value.replace(",", " ").split()]
        except ValueError:
            value = None
        if value is None or len(value) != 4:
            raise InputError(f"intrinsics must be 'fx,fy,cx,cy' in pixels or one of {', '.join(CAMERA_PRESETS)}")
    a = np.asarray(value, dtype=np.float64)
    if a.shape == (4,):
        a = intrinsics_matrix(*a)
    if a.shape != (3, 3):
        raise InputError(f"intrinsics must be a 3×3 matrix K or fx, fy, cx, cy; got shape {list(a.shape)}")
    if not np.all(np.isfinite(a)) or a[0, 0] <= 0 or a[1, 1] <= 0 or not np.allclose(a[2], [0, 0, 1]):
        raise InputError(f"invalid intrinsics K = {a.tolist()}: fx, fy must be positive and the last row 0 0 1")
    if a[1, 0] != 0 or abs(a[0, 1]) > 1e-9 * a[0, 0]:
        raise InputError(f"intrinsics K = {a.tolist()} have a skew: the fusion's pinhole takes fx, fy, cx, cy only "
                         "(undistort and unskew the images first)")
    return a


@dataclass
class RGBDSequence:
    """Posed depth frames of one scene.

    ``intrinsics`` ``K (3, 3)`` in pixels; ``poses (N, 4, 4)`` camera-to-world, OpenCV axes (x right,
    y down, z forward), in ``units``; ``load_depth(i) -> (H, W) float32`` depth in ``units`` along the
    optical axis (z-depth), 0 where missing; ``load_color(i) -> (H, W, 3) uint8`` or ``None`` when the
    sequence has no colour. Pixel ``(col, row)`` is centred at ``(u, v) = (col, row)`` (OpenCV).

    Construction checks the intrinsics and that every pose is rigid (:func:`check_pose`).
    """

    name: str
    intrinsics: np.ndarray
    poses: np.ndarray
    width: int
    height: int
    load_depth: Callable[[int], np.ndarray]
    load_color: Callable[[int], np.ndarray] | None = None
    units: str = "m"
    note: str = ""  # what the reader left out of the folder's frames, and why ("" when nothing)

    def __post_init__(self) -> None:
        check_units(self.units, self.name)
        self.intrinsics = parse_intrinsics(self.intrinsics)
        poses = np.asarray(self.poses, dtype=np.float64)
        if poses.ndim != 3 or poses.shape[1:] != (4, 4) or poses.shape[0] == 0:
            raise InputError(f"{self.name}: poses must be (N, 4, 4) with N ≥ 1, not {list(poses.shape)}")
        for i, p in enumerate(poses):
            check_pose(p, f"{self.name}: pose {i}")
        self.poses = poses
        size = np.asarray([self.width, self.height]) if all(
            isinstance(n, (int, float, np.integer, np.floating)) and not isinstance(n, bool) for n in (self.width, self.height)) else None
        if size is None or not is_whole(size) or not (1 <= size.min() and size.max() <= MAX_IMAGE_SIDE):
            raise InputError(f"{self.name}: image size {self.width!r}×{self.height!r} must be whole numbers of pixels "
                             f"in 1..{MAX_IMAGE_SIDE}")
        self.width, self.height = int(self.width), int(self.height)

    def __len__(self) -> int:
        return int(self.poses.shape[0])

    @property
    def has_color(self) -> bool:
        return self.load_color is not None

    def depth(self, i: int) -> np.ndarray:
        """``(H, W) float32`` z-depth of frame ``i``, 0 where missing (what ``load_depth`` gave, checked: an
        :class:`InputError` for another shape or anything but real numbers)."""
        d = self.load_depth(i)
        try:
            a = np.asarray(d.cpu() if hasattr(d, "cpu") else d)  # a NumPy array, a list, a CPU or GPU tensor
        except (TypeError, ValueError):
            a = None
        if a is None or a.dtype.kind not in "fiu" or a.shape != (self.height, self.width):
            raise InputError(f"{self.name}: frame {i}'s depth must be a ({self.height}, {self.width}) array of numbers, "
                             f"got {type(d).__name__} {getattr(a, 'dtype', '')} {list(getattr(a, 'shape', []))}")
        return a

    def color(self, i: int) -> np.ndarray | None:
        """``(H, W, 3) uint8`` colour of frame ``i``, or ``None`` (what ``load_color`` gave, checked: another shape
        or type is an :class:`InputError`, never wrapped to 8 bits)."""
        if self.load_color is None:
            return None
        return as_colour8(self.load_color(i), (self.height, self.width, 3), f"{self.name}: frame {i}")

    def points(self, i: int, stride: int = 1) -> np.ndarray:
        """World points ``(M, 3) float64`` of frame ``i``'s valid depth pixels (every ``stride``-th row
        and column): pixel ``(col, row)`` with depth ``z`` is the camera point
        ``((col − cx) z / fx, (row − cy) z / fy, z)``, moved by ``poses[i]``."""
        z = self.depth(i)[::stride, ::stride].astype(np.float64)
        rows, cols = np.nonzero(z > 0)
        zz = z[rows, cols]
        K = self.intrinsics
        cam = np.stack([(cols * stride - K[0, 2]) / K[0, 0] * zz, (rows * stride - K[1, 2]) / K[1, 1] * zz, zz], -1)
        return cam @ self.poses[i, :3, :3].T + self.poses[i, :3, 3]

    def subset(self, indices: Sequence[int]) -> "RGBDSequence":
        """The frames ``indices`` (in that order) as a new lazy sequence, e.g. ``seq.subset(range(0, len(seq), 5))``."""
        idx = [int(i) for i in indices]
        n = len(self)
        bad = [i for i in idx if not 0 <= i < n]
        if not idx or bad:
            raise InputError(f"{self.name}: frame indices must be a non-empty subset of 0..{n - 1}"
                             + (f" (got {bad[:3]})" if bad else ""))
        depth, color = self.load_depth, self.load_color
        return replace(self, poses=self.poses[idx], load_depth=lambda k: depth(idx[k]),
                       load_color=None if color is None else (lambda k: color(idx[k])))

    def summary(self) -> str:
        """One line: name, frame count, size, colour, camera."""
        K = self.intrinsics
        return (f"{self.name}: {len(self)} frames {self.width}×{self.height}, "
                f"{'depth + colour' if self.has_color else 'depth only'}, fx {K[0, 0]:.1f} fy {K[1, 1]:.1f} "
                f"cx {K[0, 2]:.1f} cy {K[1, 2]:.1f}, units {self.units}")


# -- image I/O -------------------------------------------------------------------------------------
def read_depth_png(path: Path, depth_scale: float, size: tuple[int, int] | None = None) -> np.ndarray:
    """A 16-bit depth PNG → ``(H, W) float32`` z-depth ``value / depth_scale`` (0 stays 0 = missing).

    ``size = (W, H)``, when given, must match. 8-bit or colour images are refused: depth needs 16 bits.
    """
    from PIL import Image

    if not path.is_file():
        raise InputError(f"depth image not found: {path}; restore it or remove the frame from the list")
    try:
        with Image.open(path) as im:
            mode = im.mode
            if size is not None and im.size != tuple(size):  # (before decoding: a header may claim 60000²)
                raise InputError(f"the depth image {path} is {im.size[0]}×{im.size[1]} but the camera is "
                                 f"{size[0]}×{size[1]}; use the intrinsics of the camera that took these images")
            if mode not in ("I;16", "I;16B", "I;16L", "I"):
                raise InputError(f"the depth image {path} is {_mode_text(mode)}, not a 16-bit depth PNG; depth "
                                 "must be single-channel 16-bit (TUM: depth × 5000, Redwood: millimetres)")
            a = np.asarray(im)
    except InputError:
        raise
    except _image_errors() as e:
        raise InputError(f"cannot read the depth image {path}: {e}") from e
    if a.ndim != 2:
        raise InputError(f"the depth image {path} has {a.shape[-1]} channels; depth must be single-channel 16-bit")
    if mode == "I" and (a.min() < 0 or a.max() > 65535):
        raise InputError(f"the depth image {path} holds values outside 0..65535: not 16-bit depth")
    if size is not None and (a.shape[1], a.shape[0]) != tuple(size):
        raise InputError(f"the depth image {path} is {a.shape[1]}×{a.shape[0]} but the camera is {size[0]}×{size[1]}; "
                         "use the intrinsics of the camera that took these images")
    return (a.astype(np.float32) / np.float32(depth_scale)).astype(np.float32)


def _mode_text(mode: str) -> str:
    return {"L": "8-bit greyscale", "P": "8-bit palette", "RGB": "8-bit RGB", "RGBA": "8-bit RGBA",
            "LA": "8-bit greyscale + alpha", "1": "1-bit", "F": "32-bit float"}.get(mode, f"mode {mode}")


def read_color_image(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """A colour image → ``(H, W, 3) uint8``; ``size = (W, H)``, when given, must match."""
    from PIL import Image

    if not path.is_file():
        raise InputError(f"colour image not found: {path}; restore it or remove the frame from the list")
    try:
        with Image.open(path) as im:
            if size is not None and im.size != tuple(size):  # (before decoding)
                raise InputError(f"the colour image {path} is {im.size[0]}×{im.size[1]} but the depth is "
                                 f"{size[0]}×{size[1]}; colour must be registered to depth at the same size")
            if im.mode.startswith(("I", "F")):  # (PIL's RGB conversion clips 16-bit values to white)
                raise InputError(f"the colour image {path} is {_mode_text(im.mode)} (16-bit or float pixels): colour "
                                 "is read as 8-bit; convert it to an 8-bit PNG or JPEG")
            a = np.asarray(im.convert("RGB"))
    except InputError:
        raise
    except _image_errors() as e:
        raise InputError(f"cannot read the colour image {path}: {e}") from e
    if size is not None and (a.shape[1], a.shape[0]) != tuple(size):
        raise InputError(f"the colour image {path} is {a.shape[1]}×{a.shape[0]} but the depth is {size[0]}×{size[1]}; "
                         "colour must be registered to depth at the same size")
    return a


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
    except _image_errors() as e:
        raise InputError(f"cannot read the image {path}: {e}") from e
    if not (0 < w <= MAX_IMAGE_SIDE and 0 < h <= MAX_IMAGE_SIDE):
        raise InputError(f"the image {path} is {w}×{h}: each side must be 1..{MAX_IMAGE_SIDE:,} pixels")
    return w, h


def _image_errors() -> tuple:
    from PIL import Image

    return (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def median_depth(seq: RGBDSequence) -> float | None:
    """The median valid depth of the first, middle and last frames (in the sequence's units), or None when
    they have none."""
    n = len(seq)
    z = np.concatenate([d[d > 0] for d in (seq.depth(i) for i in sorted({0, n // 2, n - 1}))])
    return float(np.median(z)) if z.size else None


def check_depth_scale(seq: RGBDSequence, depth_scale: float, flag: str = "--depth-scale") -> None:
    """Refuse a depth scale that makes the depth implausible: the median valid depth of the first,
    middle and last frames outside :data:`PLAUSIBLE_DEPTH_M`, or no valid depth in any of them."""
    med = median_depth(seq)
    if med is None:
        raise InputError(f"{seq.name}: the first, middle and last depth frames have no valid pixel (all 0); "
                         "check the depth images")
    lo, hi = PLAUSIBLE_DEPTH_M
    if not lo <= med <= hi:
        raise InputError(f"{seq.name}: the median depth is {med:.4g} m with depth scale {depth_scale:g} (units per "
                         f"metre), outside {lo:g}..{hi:g} m: wrong depth scale? pass {flag} (TUM 5000, Redwood / "
                         "Open3D 1000)")


#: horizontal fields of view a depth camera's intrinsics may give (a focal length in other units falls outside)
FOV_RANGE_DEG = (1.0, 170.0)


def _check_size_vs_intrinsics(K: np.ndarray, size: tuple[int, int], what: str) -> None:
    """A principal point outside the image means the intrinsics belong to another image size."""
    w, h = size
    cx, cy = K[0, 2], K[1, 2]
    if not (0.25 * w < cx + 0.5 < 0.75 * w and 0.25 * h < cy + 0.5 < 0.75 * h):
        raise InputError(f"{what}: the images are {w}×{h} but the principal point (cx, cy) = ({cx:g}, {cy:g}) is "
                         "not near their centre; the intrinsics are for another image size")
    if not 0.5 <= K[1, 1] / K[0, 0] <= 2:
        raise InputError(f"{what}: fy = {K[1, 1]:g} px against fx = {K[0, 0]:g} px: a depth camera's pixels are "
                         "about square (fy ≈ fx); check the intrinsics")
    fov = math.degrees(2 * math.atan(w / (2 * K[0, 0])))
    if not FOV_RANGE_DEG[0] <= fov <= FOV_RANGE_DEG[1]:
        raise InputError(f"{what}: fx = {K[0, 0]:g} px gives these {w}-px-wide images a field of view of {fov:.3g}°, "
                         f"outside {FOV_RANGE_DEG[0]:g}..{FOV_RANGE_DEG[1]:g}°; the focal length must be in pixels of "
                         "these images")


def read_open3d_intrinsics(path: Path) -> tuple[np.ndarray, tuple[int, int], float | None]:
    """Open3D's ``PinholeCameraIntrinsic`` JSON: ``width``, ``height`` and ``intrinsic_matrix``
    (9 values, column-major) → ``K (3, 3)``, ``(W, H)``, and the optional extra key ``depth_scale``
    (depth PNG units per metre; vqad's writers record it, Open3D ignores it) or None."""
    try:
        meta = json.loads(read_text_file(path, "the intrinsics file"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, and an integer of over 4,300 digits
        raise InputError(f"{path} is not valid JSON ({e}); fix or regenerate it") from e
    try:
        m = np.asarray(meta["intrinsic_matrix"], dtype=np.float64).reshape(3, 3).T  # column-major
        size = (meta["width"], meta["height"])
    except (KeyError, TypeError, ValueError, OverflowError) as e:  # (an integer of 400 digits overflows a float)
        raise InputError(f"{path} must be an Open3D PinholeCameraIntrinsic JSON with width, height and "
                         "intrinsic_matrix (9 numbers, column-major)") from e
    if not all(isinstance(n, int) and not isinstance(n, bool) and 0 < n <= MAX_IMAGE_SIDE for n in size):
        raise InputError(f"{path}: width and height must be whole numbers of pixels in 1..{MAX_IMAGE_SIDE:,}, got "
                         f"{size[0]!r:.20} and {size[1]!r:.20}")
    if not np.allclose(m[2], [0, 0, 1]) and np.allclose(m.T[2], [0, 0, 1]):
        raise InputError(f"{path}: intrinsic_matrix reads as row-major (fx, 0, cx, 0, fy, cy, 0, 0, 1); Open3D's "
                         f"PinholeCameraIntrinsic stores it column by column: fx, 0, 0, 0, fy, 0, cx, cy, 1")
    K = parse_intrinsics(m)
    _check_size_vs_intrinsics(K, size, str(path))
    scale = meta.get("depth_scale")
    if scale is not None and not (is_real(scale) and 0 < scale < 1e12):  # (an integer of 400 digits is not a float)
        raise InputError(f"{path}: depth_scale must be a positive number below 1e12, not {scale!r:.40}")
    return K, size, None if scale is None else float(scale)


def write_open3d_intrinsics(path: Path, K: np.ndarray, width: int, height: int, depth_scale: float | None = None) -> None:
    """Write ``K`` as Open3D's ``PinholeCameraIntrinsic`` JSON (``intrinsic_matrix`` column-major),
    plus ``depth_scale`` when given."""
    meta = {"width": int(width), "height": int(height),
            "intrinsic_matrix": np.asarray(K, dtype=np.float64).T.reshape(-1).tolist()}
    if depth_scale is not None:
        meta["depth_scale"] = float(depth_scale)
    path.write_text(json.dumps(meta, indent=1))


# -- TUM RGB-D -------------------------------------------------------------------------------------
def _read_list(path: Path, columns: int) -> list[list[str]]:
    """A TUM list file: ``#`` comments, whitespace-separated fields, first field a time stamp."""
    if not path.exists():
        raise InputError(f"{path} not found: a TUM RGB-D sequence needs it")
    text = read_text_file(path, "the list")
    rows, seen = [], {}
    for k, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].replace(",", " ").strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) < columns:
            raise InputError(f"{path} line {k}: expected {columns} fields, got {len(parts)} ({line[:60]!r})")
        try:
            t = float(parts[0])
        except ValueError as e:
            raise InputError(f"{path} line {k}: {parts[0]!r} is not a time stamp") from e
        if not math.isfinite(t):
            raise InputError(f"{path} line {k}: the time stamp {parts[0]!r} is not a finite number")
        if t in seen:
            raise InputError(f"{path} lines {seen[t]} and {k} have the same time stamp {parts[0]}: one line per time "
                             f"stamp, please (fix or regenerate the list)")
        seen[t] = k
        rows.append(parts)
    if not rows:
        raise InputError(f"{path} lists no frames")
    return rows


def associate(a: np.ndarray, b: np.ndarray, max_dt: float = TUM_MAX_DT) -> list[tuple[int, int]]:
    """One-to-one pairs ``(i, j)`` of time stamps ``a (N,)``, ``b (M,)`` with ``|a_i − b_j| ≤ max_dt``,
    chosen greedily closest first (TUM's ``associate.py``), sorted by ``i``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size == 0 or b.size == 0:
        return []
    order = np.argsort(b)
    bs = b[order]
    cand = []
    for i, t in enumerate(a):  # only near neighbours can lie within max_dt of t
        lo, hi = np.searchsorted(bs, t - max_dt, "left"), np.searchsorted(bs, t + max_dt, "right")
        cand += [(abs(t - bs[k]), i, int(order[k])) for k in range(lo, hi)]
    cand.sort()
    used_a, used_b, out = set(), set(), []
    for _, i, j in cand:
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            out.append((i, j))
    return sorted(out)


def quaternion_to_matrix(q) -> np.ndarray:
    """Unit quaternion ``(qx, qy, qz, qw)`` → rotation ``(3, 3)``."""
    x, y, z, w = q
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def matrix_to_quaternion(r: np.ndarray) -> np.ndarray:
    """Rotation ``(3, 3)`` → unit quaternion ``(qx, qy, qz, qw)`` with ``qw ≥ 0`` (Shepperd's method)."""
    r = np.asarray(r, np.float64)
    tr = np.trace(r)
    k = int(np.argmax([tr, r[0, 0], r[1, 1], r[2, 2]]))
    if k == 0:
        s = 2 * math.sqrt(1 + tr)
        q = [(r[2, 1] - r[1, 2]) / s, (r[0, 2] - r[2, 0]) / s, (r[1, 0] - r[0, 1]) / s, s / 4]
    elif k == 1:
        s = 2 * math.sqrt(1 + r[0, 0] - r[1, 1] - r[2, 2])
        q = [s / 4, (r[0, 1] + r[1, 0]) / s, (r[0, 2] + r[2, 0]) / s, (r[2, 1] - r[1, 2]) / s]
    elif k == 2:
        s = 2 * math.sqrt(1 + r[1, 1] - r[0, 0] - r[2, 2])
        q = [(r[0, 1] + r[1, 0]) / s, s / 4, (r[1, 2] + r[2, 1]) / s, (r[0, 2] - r[2, 0]) / s]
    else:
        s = 2 * math.sqrt(1 + r[2, 2] - r[0, 0] - r[1, 1])
        q = [(r[0, 2] + r[2, 0]) / s, (r[1, 2] + r[2, 1]) / s, s / 4, (r[1, 0] - r[0, 1]) / s]
    q = np.asarray(q)
    return -q if q[3] < 0 else q


def _tum_pose(row: list[str], what: str) -> np.ndarray:
    try:
        v = np.array([float(x) for x in row[1:8]])
    except ValueError as e:
        raise InputError(f"{what}: expected 'timestamp tx ty tz qx qy qz qw' numbers") from e
    if not np.all(np.isfinite(v)):
        raise InputError(f"{what}: the pose has non-finite values (NaN or inf); fix or drop that line")
    q = v[3:]
    norm = float(np.linalg.norm(q))
    if abs(norm - 1) > 1e-2:
        raise InputError(f"{what}: the quaternion (qx qy qz qw) has length {norm:.4g}, not 1: not a rotation; "
                         "fix that line (the order is tx ty tz qx qy qz qw)")
    m = np.eye(4)
    m[:3, :3] = quaternion_to_matrix(q / norm)
    m[:3, 3] = v[:3]
    return m


def _tum_intrinsics(root: Path, K) -> tuple[np.ndarray | None, tuple[int, int] | None, str, float | None]:
    """``K`` (given) > ``intrinsics.json`` (Open3D) > ``camera.txt`` (``fx fy cx cy``) > ``freiburg1|2|3``
    in the folder name; returns ``K`` (or None: ask), the size the file states, where K came from,
    and the depth scale ``intrinsics.json`` records (or None)."""
    js = root / "intrinsics.json"
    size, scale = None, None
    if js.is_file():
        K_file, size, scale = read_open3d_intrinsics(js)
        if K is None:
            return K_file, size, js.name, scale
    if K is not None:
        return parse_intrinsics(K), None, "given", scale
    txt = root / "camera.txt"
    if txt.is_file():
        lines = [ln.split("#", 1)[0].strip() for ln in read_text_file(txt, "the camera file").splitlines()]
        lines = [ln for ln in lines if ln]
        if len(lines) != 1:
            raise InputError(f"{txt} must hold one line 'fx fy cx cy' (pixels)")
        return parse_intrinsics(lines[0]), None, txt.name, None
    m = re.search(r"freiburg([123])", str(root.resolve()).lower())
    if m:
        return parse_intrinsics("fr" + m.group(1)), None, f"freiburg{m.group(1)} (from the folder name)", None
    return None, None, "", None


def read_tum(path, depth_scale: float | None = None, K=None, max_dt: float = TUM_MAX_DT) -> RGBDSequence:
    """A TUM RGB-D sequence folder.

    Layout: ``depth.txt`` and ``rgb.txt`` (``timestamp filename`` per line), ``groundtruth.txt``
    (``timestamp tx ty tz qx qy qz qw``: camera-to-world, OpenCV axes), 16-bit PNG depth holding
    ``metres × depth_scale``. Each depth frame is paired with the nearest colour frame (one-to-one,
    closest first, as TUM's ``associate.py``) and the nearest ground-truth pose, both within
    ``max_dt`` seconds; depth frames without a pose are dropped (TUM's ground truth often starts
    later than the images), those without colour too when ``rgb.txt`` exists. No ``rgb.txt``:
    a depth-only sequence.

    Intrinsics, first found: ``K`` (a ``(3, 3)`` array, ``fx, fy, cx, cy``, or a preset name of
    :data:`CAMERA_PRESETS`), ``intrinsics.json`` (Open3D format) or ``camera.txt`` (one line
    ``fx fy cx cy``) in the folder, ``freiburg1|2|3`` in the folder's path (TUM's calibration of
    that camera). Otherwise :class:`InputError`: guessing a camera silently would bend every surface.

    ``depth_scale`` (PNG units per metre): given, else the ``depth_scale`` key of ``intrinsics.json``,
    else :data:`TUM_DEPTH_SCALE`.
    """
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"TUM sequence folder not found: {root}")
    drows = _read_list(root / "depth.txt", 2)
    grows = _read_list(root / "groundtruth.txt", 8)
    crows = _read_list(root / "rgb.txt", 2) if (root / "rgb.txt").exists() else None
    K_given = K
    K, k_size, k_source, file_scale = _tum_intrinsics(root, K)
    depth_scale = _depth_scale(depth_scale, file_scale, TUM_DEPTH_SCALE, "TUM")
    if K is None:
        raise InputError(f"{root}: unknown camera: pass its intrinsics (--intrinsics fx,fy,cx,cy or fr1 / fr2 / fr3 "
                         "/ primesense), or write intrinsics.json (Open3D format) or camera.txt ('fx fy cx cy') "
                         "into the folder")
    dts = np.array([float(r[0]) for r in drows])
    gts = np.array([float(r[0]) for r in grows])
    # nearest ground-truth pose of each depth frame (not one-to-one: poses come at 100 Hz or more)
    order = np.argsort(gts)
    g_sorted = gts[order]
    pos = np.clip(np.searchsorted(g_sorted, dts), 1, len(gts)) if len(gts) > 1 else np.zeros(len(dts), int)
    left = np.maximum(pos - 1, 0)
    right = np.minimum(pos, len(gts) - 1)
    nearest = np.where(np.abs(g_sorted[left] - dts) <= np.abs(g_sorted[right] - dts), left, right)
    pose_of = {i: int(order[nearest[i]]) for i in range(len(dts)) if abs(g_sorted[nearest[i]] - dts[i]) <= max_dt}
    if crows is not None:
        cts = np.array([float(r[0]) for r in crows])
        pairs = [(i, j) for i, j in associate(dts, cts, max_dt) if i in pose_of]
    else:
        pairs = [(i, None) for i in sorted(pose_of)]
    if not pairs:
        raise InputError(f"{root}: no depth frame has a ground-truth pose{' and a colour frame' if crows else ''} "
                         f"within {max_dt} s; check that depth.txt, rgb.txt and groundtruth.txt are of the same "
                         "sequence (the time stamps do not overlap)")
    left_out = len(drows) - len(pairs)
    note = (f"{left_out} of {len(drows)} depth frames left out: no ground-truth pose{' or colour frame' if crows else ''} "
            f"within {max_dt} s" if left_out else "")
    depth_paths = [root / drows[i][1] for i, _ in pairs]
    color_paths = [root / crows[j][1] for _, j in pairs] if crows is not None else None
    for listing, paths in (("depth.txt", depth_paths), ("rgb.txt", color_paths)):
        for p in paths or []:
            if not p.is_file():
                why = ("is a folder, not an image" if p.is_dir() else
                       "is not a regular file (a device, pipe or socket)" if os.path.lexists(p) and p.exists() else
                       "is a broken symbolic link" if os.path.lexists(p) else "is missing on disk")
                raise InputError(f"{p} is listed in {listing} but {why}; restore it or delete its line")
    poses = np.stack([_tum_pose(grows[pose_of[i]], f"groundtruth.txt, time stamp {grows[pose_of[i]][0]}")
                      for i, _ in pairs])
    size = _image_size(depth_paths[0])
    if K_given is not None:  # a preset name scales to the images
        K = parse_intrinsics(K_given, *size)
    if k_size is not None and k_size != size:
        raise InputError(f"{root}: the depth images are {size[0]}×{size[1]} but {k_source} is for {k_size[0]}×{k_size[1]}; "
                         "use the intrinsics of these images")
    try:
        _check_size_vs_intrinsics(K, size, f"{root} ({k_source})")
    except InputError as exc:
        if not k_source.startswith("freiburg") or size == _PRESET_SIZE:
            raise
        # a name is no proof that these are the camera's images resized: say how to scale it, never guess
        raise InputError(f"{exc} (the {k_source.split()[0]} calibration is for {_PRESET_SIZE[0]}×{_PRESET_SIZE[1]} "
                         f"images: if these are its images resized, pass --intrinsics fr{k_source[8]}, which scales "
                         "to them)") from None
    return _image_sequence(root, K, poses, size, depth_paths, color_paths, depth_scale, note=note)


def _image_sequence(root: Path, K: np.ndarray, poses: np.ndarray, size: tuple[int, int], depth_paths: list[Path],
                    color_paths: list[Path] | None, scale: float, note: str = "") -> RGBDSequence:
    """The sequence of a folder of 16-bit depth PNGs (``scale`` units per metre) and optional colour
    images, read lazily at ``size``; its depth scale checked on a few frames (:func:`check_depth_scale`)."""
    seq = RGBDSequence(
        name=root.name, intrinsics=K, poses=poses, width=size[0], height=size[1],
        load_depth=lambda i: read_depth_png(depth_paths[i], scale, size),
        load_color=None if color_paths is None else (lambda i: read_color_image(color_paths[i], size)),
        note=note,
    )
    check_depth_scale(seq, scale)
    return seq


def _depth_scale(given: float | None, recorded: float | None, default: float, layout: str) -> float:
    scale = given if given is not None else recorded if recorded is not None else default
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        scale = float("nan")
    if not (math.isfinite(scale) and scale > 0):
        raise InputError(f"the depth scale must be a positive number of depth units per metre ({layout}: "
                         f"{default:g}), got {given!r}")
    return scale


# -- Redwood / Open3D ------------------------------------------------------------------------------
_COLOR_DIRS = ("color", "image", "rgb")
_TRAJ_TXT = "*-traj.txt"  # Redwood's synthetic scenes name their .log trajectory livingroom1-traj.txt
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def read_log_trajectory(path: Path) -> np.ndarray:
    """An Open3D / Redwood ``.log`` trajectory → camera-to-world poses ``(N, 4, 4)``.

    Per frame: a line of three integers (``id id frame``, ignored), then four rows of the 4×4 matrix.
    """
    lines = [ln.strip() for ln in read_text_file(path, "the trajectory").splitlines() if ln.strip()]
    if not lines or len(lines) % 5:
        raise InputError(f"{path}: a .log trajectory has 5 lines per frame (an 'id id frame' line, then 4 matrix "
                         f"rows); it has {len(lines)} non-empty lines")
    poses = []
    for k in range(0, len(lines), 5):
        what = f"{path.name}, frame {k // 5} (line {k + 1})"
        if len(lines[k].split()) != 3:
            raise InputError(f"{what}: expected the three-integer header line 'id id frame', got {lines[k][:60]!r}")
        try:
            m = np.array([[float(x) for x in row.split()] for row in lines[k + 1:k + 5]])
        except ValueError as e:
            raise InputError(f"{what}: the matrix rows must be numbers") from e
        if m.shape != (4, 4):
            raise InputError(f"{what}: expected 4 rows of 4 numbers")
        poses.append(check_pose(m, what))
    return np.stack(poses)


def write_log_trajectory(path: Path, poses: np.ndarray) -> None:
    """Write camera-to-world ``poses (N, 4, 4)`` as an Open3D ``.log`` trajectory (header ``i i i+1``)."""
    out = []
    for i, m in enumerate(np.asarray(poses, np.float64)):
        out.append(f"{i} {i} {i + 1}")
        out += [" ".join(f"{x:.12g}" for x in row) for row in m]
    path.write_text("\n".join(out) + "\n")


def _natural_key(p: Path) -> list:
    """Sort key of a frame's file name with its numbers compared as numbers: 2.png before 10.png (zero-padded
    names sort as before)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in re.split(r"(\d+)", p.name) if t]


def _list_images(d: Path) -> list[Path]:
    """The images in ``d`` in frame order (numbers in names compared as numbers), leaving out hidden files
    (macOS's ``._NAME`` copies on foreign file systems)."""
    return sorted((p for p in d.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in _IMAGE_SUFFIXES), key=_natural_key)


def _one(root: Path, pattern: str, what: str, given) -> Path | None:
    if given is not None:  # a path as given (absolute, or from the working directory), else in the folder
        for p in (Path(given), root / given):
            if p.is_file():
                return p
        raise InputError(f"{what} not found: {given}" + ("" if Path(given).is_absolute() else
                                                         f" (looked in the working directory and in {root})"))
    found = sorted(root.glob(pattern))
    if len(found) > 1:
        raise InputError(f"{root} has several {pattern} files ({', '.join(p.name for p in found)}); say which {what} "
                         f"to use" + (" (--trajectory NAME)" if what == "trajectory" else ""))
    return found[0] if found else None


def read_redwood(path, depth_scale: float | None = None, K=None, trajectory: str | None = None,
                 intrinsics_file: str | None = None) -> RGBDSequence:
    """A Redwood / Open3D RGB-D folder.

    Layout: ``depth/`` (16-bit PNGs holding ``metres × depth_scale``, millimetres by default),
    optional ``color/`` (or ``image/``, ``rgb/``) with as many images, frames matched by sorted
    name; one ``*.log`` (or Redwood's ``*-traj.txt``) trajectory (camera-to-world, one pose per
    depth image; ``trajectory`` picks one of several); intrinsics from ``K`` or the folder's Open3D ``PinholeCameraIntrinsic``
    JSON (any ``*.json`` with ``intrinsic_matrix``, or ``intrinsics_file``). ``depth_scale``: given,
    else the JSON's ``depth_scale`` key, else :data:`REDWOOD_DEPTH_SCALE`.
    """
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"Redwood / Open3D sequence folder not found: {root}")
    ddir = root / "depth"
    if not ddir.is_dir():
        raise InputError(f"{root} has no depth/ folder: a Redwood / Open3D sequence keeps its 16-bit depth PNGs there")
    depth_paths = _list_images(ddir)
    if not depth_paths:
        raise InputError(f"{ddir} holds no PNG images")
    cdir = next((root / d for d in _COLOR_DIRS if (root / d).is_dir()), None)
    color_paths = _list_images(cdir) if cdir is not None else None
    if color_paths is not None and len(color_paths) != len(depth_paths):
        raise InputError(f"{root}: {len(depth_paths)} depth images but {len(color_paths)} in {cdir.name}/; each depth "
                         "frame needs one colour frame (matched by sorted name)")
    log = _one(root, "*.log", "trajectory", trajectory) or _one(root, _TRAJ_TXT, "trajectory", None)
    if log is None:
        raise InputError(f"{root} has no *.log (or *-traj.txt) trajectory (camera-to-world poses, Open3D / Redwood format)")
    poses = read_log_trajectory(log)
    if len(poses) != len(depth_paths):
        raise InputError(f"{root}: {log.name} has {len(poses)} poses but depth/ has {len(depth_paths)} images; "
                         "they must match one to one (trim the trajectory or the images)")
    size = _image_size(depth_paths[0])
    if intrinsics_file is not None:
        js = _one(root, "", "intrinsics file", intrinsics_file)
    else:
        cands = [p for p in sorted(root.glob("*.json")) if p.is_file() and p.stat().st_size <= MAX_TEXT_BYTES
                 and "intrinsic_matrix" in read_text_file(p, "the JSON file")]
        if len(cands) > 1:
            raise InputError(f"{root} has several intrinsics JSON files ({', '.join(p.name for p in cands)}); "
                             "say which to use (--intrinsics FILE.json)")
        js = cands[0] if cands else None
    file_scale = None
    if js is not None:
        K_file, k_size, file_scale = read_open3d_intrinsics(js)
        if K is None and k_size != size:
            raise InputError(f"{root}: the depth images are {size[0]}×{size[1]} but {js.name} is for "
                             f"{k_size[0]}×{k_size[1]}; use the intrinsics of these images")
        K = K_file if K is None else K
    if K is None:
        raise InputError(f"{root} has no intrinsics JSON (Open3D PinholeCameraIntrinsic: width, height, "
                         "intrinsic_matrix); add one or pass the intrinsics (e.g. primesense for Redwood's "
                         "640×480 captures)")
    K = parse_intrinsics(K, *size)
    _check_size_vs_intrinsics(K, size, f"{root} (intrinsics)")
    return _image_sequence(root, K, poses, size, depth_paths, color_paths,
                           _depth_scale(depth_scale, file_scale, REDWOOD_DEPTH_SCALE, "Redwood / Open3D"))


# -- RTMV ------------------------------------------------------------------------------------------
#: OpenGL camera axes (x right, y up, z backward) → OpenCV (x right, y down, z forward)
GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])


def read_rtmv_sequence(path, depth_kind: str = "ray") -> RGBDSequence:
    """An RTMV scene as an RGB-D sequence: every view's ``NNNNN.depth.exr`` (``depth_kind``
    ``"ray"``: distance along the ray, RTMV's convention; ``"z"``: z-depth) turned into z-depth
    ``z = t / √(1 + x² + y²)`` with ``x, y`` the pixel's normalised coordinates, background
    (≥ 1000) → 0; colour from the linear EXR as sRGB on black. Poses go from RTMV's OpenGL axes to
    OpenCV, ``cx, cy`` from pixel-centre-at-½ to OpenCV's (−½). Units are RTMV's scene units.
    """
    from vqad.nerf.formats.common import _image_to_srgb8, _read_rgba, exr_depth
    from vqad.nerf.formats.rtmv import RTMV_DEPTH_INVALID
    from vqad.nerf.formats.rtmv import _RTMV_JSON, _rtmv_c2w

    if depth_kind not in ("ray", "z"):
        raise InputError(f"depth_kind must be 'ray' or 'z', not {depth_kind!r}")
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"RTMV scene folder not found: {root}")
    jsons = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _RTMV_JSON.match(p.name)))
    if not jsons:
        raise InputError(f"{root} has no NNNNN.json camera files: not an RTMV scene")
    poses, K, size, depths, colors = [], None, None, [], []
    for _, jp in jsons:
        try:
            cam = json.loads(read_text_file(jp, "the camera file"))["camera_data"]
            intr = cam["intrinsics"]
            numbers = [intr["fx"], intr["fy"], intr["cx"], intr["cy"], cam["width"], cam["height"]]
            c2w = cam["cam2world"]
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise InputError(f"{jp}: needs camera_data with cam2world, intrinsics fx, fy, cx, cy, width and height") from e
        if not all(is_real(v) and abs(v) < math.inf for v in numbers) \
                or not all(isinstance(n, int) and 0 < n <= MAX_IMAGE_SIDE for n in numbers[4:]):
            raise InputError(f"{jp}: fx, fy, cx, cy must be finite numbers and width, height whole numbers of pixels "
                             f"in 1..{MAX_IMAGE_SIDE:,}")
        k = intrinsics_matrix(float(numbers[0]), float(numbers[1]), numbers[2] - 0.5, numbers[3] - 0.5)
        s = (numbers[4], numbers[5])
        if K is None:
            K, size = k, s
        elif not np.allclose(k, K) or s != size:
            raise InputError(f"{jp}: its camera differs from {jsons[0][1].name}'s; an RGB-D sequence has one camera")
        poses.append(_rtmv_c2w(c2w, jp.name) @ GL_TO_CV)
        dp = jp.with_name(jp.stem + ".depth.exr")
        if not dp.is_file():
            raise InputError(f"{dp} not found: every RTMV view needs its depth EXR for RGB-D fusion")
        depths.append(dp)
        cp = jp.with_suffix(".exr")
        colors.append(cp if cp.is_file() else None)
    has_color = all(c is not None for c in colors)
    if not has_color and any(c is not None for c in colors):
        warnings.warn(f"{root}: {sum(c is None for c in colors)} of {len(colors)} views have no colour EXR "
                      "(NNNNN.exr): the sequence is read without colour")
    K = parse_intrinsics(K)
    _check_size_vs_intrinsics(K, size, str(root))  # (before the per-pixel table below is allocated)
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    ray_to_z = 1.0 / np.sqrt(1.0 + ((np.arange(size[0]) - cx) / fx)[None, :] ** 2
                             + ((np.arange(size[1]) - cy) / fy)[:, None] ** 2)

    def load_depth(i: int) -> np.ndarray:
        d = exr_depth(depths[i])
        if (d.shape[1], d.shape[0]) != size:
            raise InputError(f"the depth map {depths[i]} is {d.shape[1]}×{d.shape[0]} but its camera is {size[0]}×{size[1]}")
        d = np.where(np.isfinite(d) & (d > 0) & (d < RTMV_DEPTH_INVALID), d, 0.0)
        return (d * ray_to_z if depth_kind == "ray" else d).astype(np.float32)

    def load_color(i: int) -> np.ndarray:
        rgba, _ = _read_rgba(colors[i])
        if (rgba.shape[1], rgba.shape[0]) != size:
            raise InputError(f"the image {colors[i]} is {rgba.shape[1]}×{rgba.shape[0]} but its camera is {size[0]}×{size[1]}")
        return _image_to_srgb8(rgba, 1, (0.0, 0.0, 0.0))[0]

    return RGBDSequence(name=root.name, intrinsics=K, poses=np.stack(poses), width=size[0], height=size[1],
                        load_depth=load_depth, load_color=load_color if has_color else None, units="scene")


def sequence_from_views(views, name: str = "views", units: str = "scene") -> RGBDSequence:
    """A radiance-field split with depth (:class:`vqad.nerf.data.Views`: OpenGL ``c2w``, ``fx, fy, cx, cy``
    with pixel centres at ½, float16 z-depth) as an RGB-D sequence: poses ``c2w @ GL_TO_CV``,
    ``cx − ½, cy − ½``. Every view must share one camera. Depth keeps its float16 precision
    (≈ 1e-3 relative); :func:`read_rtmv_sequence` and :func:`vqad.tsdf.synth.procedural_sequence`
    give float32 depth."""
    if views.depth is None:
        raise InputError(f"{name} has no depth maps: RGB-D fusion needs depth for every view")
    intr = views.intrinsics.double().numpy()
    if not np.allclose(intr, intr[:1]):
        raise InputError(f"{name}: the views have different intrinsics; an RGB-D sequence has one camera")
    fx, fy, cx, cy = intr[0]
    h, w = views.hw
    depth = views.depth.float().numpy()
    images = views.images.numpy()
    return RGBDSequence(name=name, intrinsics=intrinsics_matrix(fx, fy, cx - 0.5, cy - 0.5),
                        poses=views.c2w.double().numpy() @ GL_TO_CV, width=w, height=h,
                        load_depth=lambda i: depth[i].copy(), load_color=lambda i: images[i].copy(), units=units)


# -- detection and dispatch ------------------------------------------------------------------------
def detect_sequence_format(path) -> str:
    """``"procedural"``, ``"tum"``, ``"redwood"`` or ``"rtmv"``; else :class:`InputError` saying what was looked for."""
    root = Path(path)
    if str(path) == "procedural" and not root.exists():
        return "procedural"
    if not root.exists():
        raise InputError(f"RGB-D sequence not found: {root} (or use 'procedural' for the built-in scene)")
    if not root.is_dir():
        raise InputError(f"{root} is a file: an RGB-D sequence is a folder (TUM, Redwood / Open3D or RTMV)")
    if (root / "depth.txt").is_file():
        return "tum"
    if (root / "depth").is_dir() and (any(root.glob("*.log")) or any(root.glob(_TRAJ_TXT))):
        return "redwood"
    if any(re.fullmatch(r"\d+\.depth\.exr", p.name) for p in root.iterdir()):
        return "rtmv"
    raise InputError(f"cannot tell the layout of {root}: looked for depth.txt (TUM RGB-D), a depth/ folder with a "
                     "*.log (or *-traj.txt) trajectory (Redwood / Open3D) and NNNNN.depth.exr files (RTMV); pass --format or fix "
                     "the folder")
