"""A general pinhole camera for the viewer: any pose, any image size, rays in unit-cube coordinates.

:class:`~vqad.sdf.render.OrbitCamera` only circles the origin; a browser's camera can be anywhere.
:class:`ViewCamera` follows viser's convention (OpenCV: camera x right, y down, looking down +z;
``R`` is camera-to-world) and the same pixel model as ``OrbitCamera`` (square pixels, vertical
field of view, pixel centres at ``(col + ½, row + ½)``), so the renderers' ``camera.rays(device)``
accepts either, and the same pose gives the same rays (:meth:`ViewCamera.from_orbit`).

World units vs the unit cube: a field maps world points to its unit cube by ``x_unit = (x_world −
center) · scale`` (:class:`~vqad.field.Normalization`); :meth:`ViewCamera.from_world` moves the
eye with it (directions are unchanged: the map is a translation and a uniform scale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from vqad.errors import InputError


def quat_to_matrix(wxyz) -> np.ndarray:
    """Unit quaternion ``(w, x, y, z)`` → rotation matrix ``(3, 3)``."""
    w, x, y, z = (float(v) for v in np.asarray(wxyz, dtype=np.float64) / np.linalg.norm(wxyz))
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def look_at_rotation(eye, target, up=(0.0, 1.0, 0.0)) -> np.ndarray:
    """Camera-to-world rotation ``(3, 3)`` (OpenCV columns: right, down, forward) of a camera at
    ``eye`` looking at ``target`` with ``up`` roughly up in the image."""
    fwd = np.asarray(target, np.float64) - np.asarray(eye, np.float64)
    fwd /= np.linalg.norm(fwd)
    right = np.cross(fwd, np.asarray(up, np.float64))
    right /= np.linalg.norm(right)
    true_up = np.cross(right, fwd)
    return np.stack([right, -true_up, fwd], axis=1)


@dataclass(frozen=True)
class ViewCamera:
    """A pinhole camera in unit-cube coordinates.

    Attributes:
        position: ``(3,)`` the eye.
        rotation: ``(3, 3)`` camera-to-world; columns are the camera's right, down and forward axes.
        fov_y: vertical field of view in radians.
        width, height: the image in pixels.
        row0: the first image row this camera renders (a band of ``height`` rows of an image
            ``full_height`` tall: the viewer renders a still frame band by band so a camera move
            can interrupt it).
        full_height: the whole image's height (default: ``height``).
    """

    position: tuple[float, float, float]
    rotation: tuple[tuple[float, float, float], ...]
    fov_y: float
    width: int
    height: int
    row0: int = 0
    full_height: int | None = None

    def __post_init__(self) -> None:
        if not (self.width >= 1 and self.height >= 1):
            raise InputError(f"a view's image must be at least 1×1 pixels, got {self.width}×{self.height}")
        if not 0 < self.fov_y < math.pi:
            raise InputError(f"a view's vertical field of view must be between 0 and π radians, got {self.fov_y}")

    @classmethod
    def from_world(cls, position, wxyz_or_rotation, fov_y: float, width: int, height: int,
                   normalization=None) -> "ViewCamera":
        """From a world-space pose: ``position (3,)`` and a quaternion ``(4,)`` (viser's ``wxyz``) or a
        ``(3, 3)`` camera-to-world rotation; ``normalization`` (a field's) maps the eye into its unit cube."""
        r = np.asarray(wxyz_or_rotation, dtype=np.float64)
        rot = quat_to_matrix(r) if r.shape == (4,) else r.reshape(3, 3)
        pos = np.asarray(position, dtype=np.float64)
        if normalization is not None:
            pos = (pos - np.asarray(normalization.center)) * normalization.scale
        return cls(tuple(float(v) for v in pos), tuple(tuple(float(v) for v in row) for row in rot),
                   float(fov_y), int(width), int(height))

    @classmethod
    def from_orbit(cls, cam) -> "ViewCamera":
        """The pose of a :class:`~vqad.sdf.render.OrbitCamera` (same rays, same image)."""
        az, el = math.radians(cam.azimuth_deg), math.radians(cam.elevation_deg)
        eye = cam.distance * np.array([math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)])
        return cls.from_world(eye, look_at_rotation(eye, (0.0, 0.0, 0.0)), math.radians(cam.fov_deg), cam.width, cam.height)

    def resized(self, width: int, height: int) -> "ViewCamera":
        return replace(self, width=int(width), height=int(height), row0=0, full_height=None)

    def band(self, row0: int, rows: int) -> "ViewCamera":
        """Rows ``row0 .. row0 + rows`` of this camera's image as a camera of its own."""
        return replace(self, row0=row0, height=rows, full_height=self.full_height or self.height)

    def same_pose(self, other: "ViewCamera | None", tol: float = 1e-9) -> bool:
        return (other is not None and np.allclose(self.position, other.position, atol=tol)
                and np.allclose(self.rotation, other.rotation, atol=tol) and abs(self.fov_y - other.fov_y) <= tol)

    def rays(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Origins and unit directions ``(height·width, 3)`` each, row-major, in unit-cube coordinates."""
        H = self.full_height or self.height
        f = 0.5 * H / math.tan(self.fov_y / 2)
        rot = torch.tensor(self.rotation, dtype=torch.float32, device=device)
        j, i = torch.meshgrid(torch.arange(self.row0, self.row0 + self.height, device=device),
                              torch.arange(self.width, device=device), indexing="ij")
        u = (i.float() + 0.5 - self.width / 2) / f
        v = (j.float() + 0.5 - H / 2) / f  # OpenCV: +v is down, the camera's +y column
        d = rot[:, 2][None] + u.reshape(-1, 1) * rot[:, 0][None] + v.reshape(-1, 1) * rot[:, 1][None]
        d = d / d.norm(dim=-1, keepdim=True)
        o = torch.tensor(self.position, dtype=torch.float32, device=device)
        return o.expand_as(d).contiguous(), d


__all__ = ["ViewCamera", "look_at_rotation", "quat_to_matrix"]
