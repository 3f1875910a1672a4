"""COLMAP sparse models: ``cameras.bin`` / ``images.bin`` (or ``.txt``) and the photos they pose.

A small self-contained parser of COLMAP's documented formats (colmap.github.io/format.html), not
``pycolmap``: that wheel bundles all of COLMAP (tens of MB) to read two small files.

Layout: ``ROOT/images/`` with the photos and the model in ``ROOT/sparse/0/``, ``ROOT/sparse/`` or
``ROOT`` itself (the first that holds ``cameras.bin`` or ``cameras.txt``).

* ``cameras``: ``CAMERA_ID MODEL WIDTH HEIGHT PARAMS...``; the models read are SIMPLE_PINHOLE
  ``f cx cy``, PINHOLE ``fx fy cx cy``, SIMPLE_RADIAL ``f cx cy k``, RADIAL ``f cx cy k1 k2``,
  OPENCV ``fx fy cx cy k1 k2 p1 p2``, FULL_OPENCV ``fx fy cx cy k1 k2 p1 p2 k3 k4 k5 k6``, and the
  fisheyes SIMPLE_RADIAL_FISHEYE ``f cx cy k``, RADIAL_FISHEYE ``f cx cy k1 k2`` and OPENCV_FISHEYE
  ``fx fy cx cy k1 k2 k3 k4``; the distortion becomes the view's lens row (:mod:`vqad.nerf.lens`,
  COLMAP's own formulas), which the rays undo. FOV and THIN_PRISM_FISHEYE are refused.
* ``images``: ``IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME`` (then a line of 2-D points, ignored):
  world-to-camera ``x_cam = R(q) x + t`` in OpenCV axes (x right, y down, z forward), so
  ``c2w = [Rᵀ | −Rᵀ t]`` with its y and z columns negated (OpenGL).
* binary: ``uint64 n`` then per camera ``int32 id, int32 model, uint64 width, uint64 height,
  float64 params[n_model]``; per image ``int32 id, float64 q[4], float64 t[3], int32 camera_id,
  NAME\\0, uint64 n_points, n_points × (float64 x, float64 y, int64 point_id)``. Little-endian.

Loss masks (docs/method.md §8.4), optional per image: ``ROOT/masks/<image name>.png`` as COLMAP's feature
extraction takes them (``--ImageReader.mask_path``; black = leave the pixel out), or else ``<name without
its extension>.png`` there (nerfstudio's), or else instant-ngp's ``dynamic_mask_<stem>.png`` beside the photo.

Scene box (COLMAP's units are arbitrary): :func:`vqad.nerf.formats.common.capture_box`, centred on the
point nearest to every camera's optical axis (least squares, as instant-ngp's ``colmap2nerf`` finds its
"centre of attention"), with half extent ``0.375 ×`` the cameras' mean distance to it (colmap2nerf scales
that distance to 4 and instant-ngp's unit box is then 1.5 across each way: 1.5 / 4); the scene extends to
``outer_scale`` (default 16) times it, contracted (:mod:`vqad.nerf.contraction`). Where the cameras
look at no common point (a forward-facing capture), the box of the model's 3-D points instead. Every
8th image, sorted by name, is test (and val); the rest train.
"""

from __future__ import annotations

import math
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vqad.errors import InputError
from vqad.nerf.formats.points import read_colmap_points
from vqad.nerf.contraction import check_outer_scale
from vqad.nerf.data import SceneDataset
from vqad.nerf.formats.common import (CAMERA_BOX_OUTER, HOLD_EVERY, IMAGE_EXTS, _Frame, _Pinhole, _as_c2w, _dataset, _holdout, _resolve_image,
                                      _loss_mask_of, capture_box, dynamic_mask_of, inside_capture, lens_row)
from vqad.nerf.lens import LENS_FISHEYE, LENS_OPENCV

# model id → (name, number of parameters); only the first five are read
CAMERA_MODELS = {0: ("SIMPLE_PINHOLE", 3), 1: ("PINHOLE", 4), 2: ("SIMPLE_RADIAL", 4), 3: ("RADIAL", 5),
                 4: ("OPENCV", 8), 5: ("OPENCV_FISHEYE", 8), 6: ("FULL_OPENCV", 12), 7: ("FOV", 5),
                 8: ("SIMPLE_RADIAL_FISHEYE", 4), 9: ("RADIAL_FISHEYE", 5), 10: ("THIN_PRISM_FISHEYE", 12)}
SUPPORTED = ("SIMPLE_PINHOLE", "PINHOLE", "SIMPLE_RADIAL", "RADIAL", "OPENCV", "FULL_OPENCV",
             "SIMPLE_RADIAL_FISHEYE", "RADIAL_FISHEYE", "OPENCV_FISHEYE")
_ONE_FOCAL = ("SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL", "SIMPLE_RADIAL_FISHEYE", "RADIAL_FISHEYE")
#: each distorting model's lens: (vqad.nerf.lens model, the names of its parameters, the index of the first)
_LENS_PARAMS = {"SIMPLE_RADIAL": (LENS_OPENCV, ("k1",), 3), "RADIAL": (LENS_OPENCV, ("k1", "k2"), 3),
                "OPENCV": (LENS_OPENCV, ("k1", "k2", "p1", "p2"), 4),
                "FULL_OPENCV": (LENS_OPENCV, ("k1", "k2", "p1", "p2", "k3", "k4", "k5", "k6"), 4),
                "SIMPLE_RADIAL_FISHEYE": (LENS_FISHEYE, ("k1",), 3), "RADIAL_FISHEYE": (LENS_FISHEYE, ("k1", "k2"), 3),
                "OPENCV_FISHEYE": (LENS_FISHEYE, ("k1", "k2", "k3", "k4"), 4)}


@dataclass
class ColmapCamera:
    model: str
    width: int
    height: int
    params: np.ndarray  # (n_model,) float64

    def pinhole_and_distortion(self, what: str) -> tuple[_Pinhole, np.ndarray | None]:
        p = self.params
        if self.model not in SUPPORTED:
            raise InputError(f"{what}: camera model {self.model} is not supported (use {', '.join(SUPPORTED)}; "
                             "or undistort the images with colmap image_undistorter first)")
        if self.model in _ONE_FOCAL:
            fx = fy = p[0]
            cx, cy = p[1], p[2]
        else:
            fx, fy, cx, cy = p[:4]
        if not (fx > 0 and fy > 0 and self.width > 0 and self.height > 0):
            raise InputError(f"{what}: the camera's focal length ({fx:g}, {fy:g}) and size ({self.width}×{self.height}) "
                             f"must be positive; fix the cameras file or re-run COLMAP's mapper")
        model, names, first = _LENS_PARAMS.get(self.model, (None, (), 0))
        lens = None if model is None else lens_row(model, **dict(zip(names, p[first:])))
        return (_Pinhole(fx=float(fx), fy=float(fy), cx=float(cx), cy=float(cy), w=float(self.width),
                         h=float(self.height)), lens)


@dataclass
class ColmapImage:
    qvec: np.ndarray  # (4,) w, x, y, z
    tvec: np.ndarray  # (3,)
    camera_id: int
    name: str

    def c2w(self, what: str) -> np.ndarray:
        """OpenGL camera-to-world ``(4, 4)``."""
        big = float(np.abs(self.qvec).max())  # divided by first: the norm of a component near 1e308 overflows
        if not big < math.inf:
            raise InputError(f"{what}: the rotation quaternion {self.qvec.tolist()} is not finite; fix or drop that image")
        if big < 1e-9:
            raise InputError(f"{what}: the rotation quaternion is zero; fix or drop that image")
        q = self.qvec / big
        q = q / np.linalg.norm(q)
        w, x, y, z = q
        R = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                      [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                      [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])
        m = np.eye(4)
        m[:3, :3] = R.T @ np.diag([1.0, -1.0, -1.0])
        m[:3, 3] = -R.T @ self.tvec
        return _as_c2w(m, what)


def _check_number(values, what: str) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(a)):
        raise InputError(f"{what}: non-finite numbers")
    return a


# -- text ------------------------------------------------------------------------------------------
def _lines(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path}: {e}") from e
    return text.splitlines()


def read_cameras_txt(path: Path) -> dict[int, ColmapCamera]:
    out = {}
    for n, line in enumerate(_lines(path), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        f = line.split()
        what = f"{path.name} line {n}"
        try:
            cam_id, model, w, h = int(f[0]), f[1], int(f[2]), int(f[3])
            params = _check_number([float(v) for v in f[4:]], what)
        except (ValueError, IndexError) as e:
            raise InputError(f"{what}: expected CAMERA_ID MODEL WIDTH HEIGHT PARAMS... ({e})") from e
        expected = {name: k for name, k in CAMERA_MODELS.values()}.get(model)
        if expected is None or len(params) != expected:
            raise InputError(f"{what}: unknown camera model {model!r} or wrong number of parameters ({len(params)})")
        _add_unique(out, cam_id, ColmapCamera(model, w, h, params), path, "camera")
    return out


def read_images_txt(path: Path) -> dict[int, ColmapImage]:
    out = {}
    lines = [ln for ln in _lines(path) if not ln.lstrip().startswith("#")]
    i = 0
    while i < len(lines):
        if not lines[i].strip():  # a blank pose line never occurs; skip stray blank lines
            i += 1
            continue
        f = lines[i].split(maxsplit=9)
        what = f"{path.name}: image line {lines[i][:40]!r}"
        try:
            img_id = int(f[0])
            q = _check_number([float(v) for v in f[1:5]], what)
            t = _check_number([float(v) for v in f[5:8]], what)
            cam, name = int(f[8]), f[9].strip()
        except (ValueError, IndexError) as e:
            raise InputError(f"{what}: expected IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME ({e})") from e
        _add_unique(out, img_id, ColmapImage(q, t, cam, name), path, "image")
        points = lines[i + 1].split() if i + 1 < len(lines) else []
        try:
            [float(v) for v in points]
            ok = len(points) % 3 == 0
        except ValueError:
            ok = False
        if not ok:
            raise InputError(f"{path.name}: image {img_id} ({name!r}) is not followed by its POINTS2D line (X Y POINT3D_ID "
                             f"triples, or an empty line): every image takes two lines; re-export the model")
        i += 2  # the points line follows (possibly empty)
    return out


def _add_unique(out: dict, key: int, value, path: Path, noun: str) -> None:
    """``out[key] = value``, refusing a second ``noun`` (camera, image) of the same id: it would silently
    replace the first (image names: :func:`_unique_names`)."""
    if key in out:
        raise InputError(f"{path.name}: {noun} id {key} appears twice; re-export the model")
    out[key] = value


def _unique_names(images: dict[int, ColmapImage], path: Path) -> dict[int, ColmapImage]:
    """``images``, refusing two ids of one image name (one photo, two poses)."""
    first: dict[str, int] = {}
    for img_id, im in images.items():
        if im.name in first:
            raise InputError(f"{path.name}: images {first[im.name]} and {img_id} are both {im.name!r}; "
                             f"re-export the model")
        first[im.name] = img_id
    return images


# -- binary ----------------------------------------------------------------------------------------
class _Reader:
    def __init__(self, path: Path):
        try:
            self.data = path.read_bytes()
        except OSError as e:
            raise InputError(f"cannot read {path}: {e}") from e
        self.pos, self.path = 0, path

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise InputError(f"{self.path} is truncated (at byte {self.pos}): re-export the model")
        v = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return v

    def done(self, what: str) -> None:
        """Refuse bytes after the last record: a record of another length than its header says (a camera
        model written with another parameter count) would otherwise be read shifted, without a word."""
        if self.pos != len(self.data):
            raise InputError(f"{self.path} has {len(self.data) - self.pos} bytes after its {what}: a record is not "
                             f"the length its header says (a camera model with another number of parameters?); "
                             f"re-export the model")

    def string(self) -> str:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise InputError(f"{self.path} is truncated (an image name has no end): re-export the model")
        s = self.data[self.pos:end].decode("utf-8", errors="replace")
        self.pos = end + 1
        return s


def read_cameras_bin(path: Path) -> dict[int, ColmapCamera]:
    r = _Reader(path)
    (n,) = r.take("<Q")
    out = {}
    for _ in range(n):
        cam_id, model_id, w, h = r.take("<iiQQ")
        if model_id not in CAMERA_MODELS:
            raise InputError(f"{path}: camera {cam_id} has unknown model id {model_id}")
        name, k = CAMERA_MODELS[model_id]
        _add_unique(out, cam_id, ColmapCamera(name, int(w), int(h), _check_number(r.take(f"<{k}d"), f"{path} camera {cam_id}")),
                    path, "camera")
    r.done(f"{n} cameras")
    return out


def read_images_bin(path: Path) -> dict[int, ColmapImage]:
    r = _Reader(path)
    (n,) = r.take("<Q")
    out = {}
    for _ in range(n):
        (img_id,) = r.take("<i")
        pose = _check_number(r.take("<7d"), f"{path} image {img_id}")
        (cam,) = r.take("<i")
        name = r.string()
        (n_pts,) = r.take("<Q")
        if r.pos + 24 * n_pts > len(r.data):
            raise InputError(f"{path} is truncated (image {img_id}'s points): re-export the model")
        r.pos += 24 * n_pts
        _add_unique(out, img_id, ColmapImage(pose[:4], pose[4:], cam, name), path, "image")
    r.done(f"{n} images")
    return out


def _capture_root(path: Path) -> Path:
    """The capture's folder (``images/`` beside ``sparse/``) from it, from its model folder
    (``sparse/0``, ``sparse``) or from a file in that folder, as users point at any of them."""
    root = path.parent if path.is_file() else path
    for _ in range(2):
        if (root / "images").is_dir() or not (root.name == "sparse" or root.parent.name == "sparse"):
            break
        root = root.parent
    return root


def find_model(root: Path) -> Path:
    """The folder holding ``cameras.bin``/``.txt``: ``root/sparse/0``, ``root/sparse`` or ``root``."""
    for d in (root / "sparse" / "0", root / "sparse", root):
        if (d / "cameras.bin").is_file() or (d / "cameras.txt").is_file():
            return d
    raise InputError(f"{root} holds no COLMAP model: expected sparse/0/cameras.bin (or .txt) and images.bin")


def read_model(model_dir: Path) -> tuple[dict[int, ColmapCamera], dict[int, ColmapImage]]:
    """Cameras and images of a sparse model (binary preferred when both exist)."""
    if (model_dir / "cameras.bin").is_file() and (model_dir / "images.bin").is_file():
        path = model_dir / "images.bin"
        return read_cameras_bin(model_dir / "cameras.bin"), _unique_names(read_images_bin(path), path)
    if (model_dir / "cameras.txt").is_file() and (model_dir / "images.txt").is_file():
        path = model_dir / "images.txt"
        return read_cameras_txt(model_dir / "cameras.txt"), _unique_names(read_images_txt(path), path)
    raise InputError(f"{model_dir} needs cameras and images in the same form (cameras.bin + images.bin, or .txt)")


def colmap_mask_of(root: Path, name: str, image: Path, what: str) -> dict:
    """An image's loss mask as :class:`~vqad.nerf.formats.common._Frame` fields: ``ROOT/masks/<image name>.png``
    (COLMAP's ``--ImageReader.mask_path`` rule: black = leave the pixel out) or ``ROOT/masks/<name without its
    extension>.png`` (nerfstudio's), else instant-ngp's dynamic mask beside the photo (white = leave it out),
    else none: masks are optional per image."""
    folder = root / "masks"
    if folder.is_dir():
        rules = [f"{name}.png"] + ([str(Path(name).with_suffix(".png"))] if Path(name).suffix.lower() in IMAGE_EXTS else [])
        for rel in rules:
            path = inside_capture(folder, folder, rel, what, "its mask (in masks/)")
            try:
                found = path.is_file()
            except OSError as e:  # a name too long for the file system...
                raise InputError(f"{what}: its mask {path} cannot be looked up ({e.strerror or e})") from e
            if found:
                return _loss_mask_of(f"masks/{rel}", root, image, what, key="the mask")
    return dynamic_mask_of(image)


def _check_masks_folder(root: Path, frames: list) -> None:
    """Warn where a project's ``masks`` gives no image a mask: not a folder, or none of its files named after an
    image (a typo there would silently train on every pixel)."""
    folder = Path(os.path.abspath(root / "masks"))  # as the masks' own paths (inside_capture): a relative root too
    if folder.exists() and not folder.is_dir():
        warnings.warn(f"{folder} is not a folder: no loss masks are read from it", stacklevel=3)
    elif folder.is_dir() and not any(f.loss_mask is not None and folder in Path(os.path.abspath(f.loss_mask)).parents
                                     for f in frames):
        n = sum(1 for _ in folder.iterdir())
        warnings.warn(f"{folder} holds {n} entries, none named after an image (masks/<image name>.png, or "
                      f"<name without its extension>.png): no loss masks are read from it", stacklevel=3)


STRAY_CAMERA = 50.0  # a camera this many times the median camera's distance from the cameras' median is stray


def _refuse_stray_cameras(poses: np.ndarray, frames: list, model_dir: Path) -> None:
    """A camera far from all the others (a failed registration, a typo) would set the scene's box and
    its centre by itself: refuse the model, naming it, rather than fit a scene the size of that mistake."""
    pos = poses[:, :3, 3]
    d = np.linalg.norm(pos - np.median(pos, axis=0), axis=-1)
    typical = float(np.median(d))
    worst = int(np.argmax(d))
    if typical > 0 and d[worst] > STRAY_CAMERA * typical:
        raise InputError(f"{model_dir}: the camera of {frames[worst].name!r} is {d[worst]:.3g} from the others' "
                         f"median position, {d[worst] / typical:.0f}× the typical camera's {typical:.3g}: a failed "
                         f"registration? drop that image from the model")


def read_colmap(path, downscale: int = 1, background=(1.0, 1.0, 1.0), split_limit=None, hold_every: int = HOLD_EVERY,
                outer_scale: float = CAMERA_BOX_OUTER) -> SceneDataset:
    """A COLMAP capture (``path``: the folder with ``images/`` and ``sparse/``) as a :class:`SceneDataset`."""
    root = _capture_root(Path(path))
    outer_scale = check_outer_scale(outer_scale, "the COLMAP scene's outer scale")
    model_dir = find_model(root)
    cams, imgs = read_model(model_dir)
    if len(imgs) < 2:
        raise InputError(f"{model_dir} poses {len(imgs)} image: at least 2 are needed (one is held out)")
    image_dir = root / "images"
    if not image_dir.is_dir():
        raise InputError(f"{root} has a COLMAP model but no images/ folder: put the photos in {image_dir}")
    frames = []
    for img in sorted(imgs.values(), key=lambda im: im.name):
        what = f"image {img.name!r} of {model_dir}"
        if img.camera_id not in cams:
            raise InputError(f"{what}: camera {img.camera_id} is not in the cameras file")
        pin, dist = cams[img.camera_id].pinhole_and_distortion(what)
        image = _resolve_image(image_dir, img.name, what, root=root, key="the image name")
        frames.append(_Frame(image=image, c2w=img.c2w(what), pinhole=pin, name=img.name, distortion=dist,
                             **colmap_mask_of(root, img.name, image, what)))
    _check_masks_folder(root, frames)
    train, test = _holdout(frames, hold_every)
    poses = np.stack([f.c2w for f in frames])
    _refuse_stray_cameras(poses, frames, model_dir)
    points = read_colmap_points(model_dir)
    center, half, _ = capture_box(poses, str(model_dir), points)
    desc = f"every {hold_every}th image of {model_dir.name} by name"
    sources = {"train": f"{model_dir} minus every {hold_every}th image", "val": desc + " (val = test)", "test": desc}
    return _dataset(root.name, "colmap", {"train": train, "val": test, "test": test}, sources, downscale, background,
                    split_limit, root, lambda splits: (center - half, center + half, None, None), outer_scale=outer_scale,
                    points=points)
