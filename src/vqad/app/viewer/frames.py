"""One viewer frame: an SDF or a radiance field seen through a camera, in one of several modes.

The shading is the renderers' own: ``shaded`` and ``lod colour`` are
:func:`vqad.sdf.render.render_sdf` (the ``vqad render`` image), radiance ``colour`` is
:func:`vqad.nerf.render.render_rays_chunked` (the ``vqad eval`` image). The other modes show a
by-product of the same march: normals, depth, opacity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SDF_MODES = ("shaded", "normals", "depth", "lod colour")
NERF_MODES = ("colour", "depth", "opacity")
#: base colours of ``lod colour``, by LOD index (coarsest first), so a glance says which LOD is drawn
LOD_COLOURS = [(0.86, 0.42, 0.38), (0.90, 0.66, 0.30), (0.80, 0.80, 0.36), (0.46, 0.78, 0.44),
               (0.36, 0.70, 0.82), (0.48, 0.52, 0.88), (0.74, 0.50, 0.84), (0.60, 0.60, 0.60)]
BACKGROUND = (1.0, 1.0, 1.0)


#: field kinds drawn by sphere tracing (a TSDF is a signed distance inside its observed space)
DISTANCE_KINDS = ("sdf", "tsdf")


def modes_for(kind: str) -> tuple[str, ...]:
    return SDF_MODES if kind in DISTANCE_KINDS else NERF_MODES


def _u8(img: torch.Tensor) -> np.ndarray:
    return (img.clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def _depth_image(depth: torch.Tensor, valid: torch.Tensor, near: float, far: float) -> torch.Tensor:
    """``(N,)`` distances → grey ``(N, 3)``: near = bright, far = dark, background white; ``near``/``far``
    fixed per camera (not per image) so the shades do not flicker as the LOD changes."""
    g = torch.ones_like(depth)
    g[valid] = (1.0 - 0.85 * ((depth[valid] - near) / max(far - near, 1e-6))).clamp(0.1, 1.0)
    out = g[:, None].expand(-1, 3).clone()
    out[~valid] = torch.tensor(BACKGROUND, device=depth.device)
    return out


@dataclass
class NeRFContext:
    """What rendering a radiance field needs besides the field: its sampler (built once per field)."""

    sampler: object
    background: torch.Tensor


def nerf_context(field) -> NeRFContext:
    """The pruned sampler ``vqad render`` uses and the dataset's background colour."""
    from vqad.nerf.render import model_sampler

    bg = tuple(field.dataset.get("background", BACKGROUND)) if isinstance(getattr(field, "dataset", None), dict) else BACKGROUND
    return NeRFContext(model_sampler(field), torch.tensor(bg, dtype=torch.float32, device=field.device))


@torch.no_grad()
def render_frame(field, lod: int, camera, mode: str | None = None, nerf: NeRFContext | None = None) -> np.ndarray:
    """``(camera.height, camera.width, 3)`` uint8: ``field`` at ``lod`` through ``camera``
    (:class:`~vqad.app.viewer.camera.ViewCamera` or :class:`~vqad.sdf.render.OrbitCamera`).

    SDF modes: ``shaded`` (:func:`~vqad.sdf.render.render_sdf`), ``normals`` (``(n + 1) / 2`` as RGB),
    ``depth`` (distance to the hit, near bright), ``lod colour`` (shaded in the LOD's own colour).
    Radiance modes: ``colour``, ``depth`` (expected ray distance), ``opacity`` (``Σ w_i``).
    """
    if field.kind in DISTANCE_KINDS:
        return _sdf_frame(field, lod, camera, mode or "shaded")
    return _nerf_frame(field, lod, camera, mode or "colour", nerf or nerf_context(field))


def _sdf_frame(field, lod: int, camera, mode: str) -> np.ndarray:
    from vqad.sdf.render import render_sdf, sdf_normals, sphere_trace

    if mode == "shaded":
        return render_sdf(field, lod, camera, background=BACKGROUND)
    if mode == "lod colour":
        colour = LOD_COLOURS[field.lods.index(lod) % len(LOD_COLOURS)]
        return render_sdf(field, lod, camera, background=BACKGROUND, base_color=colour)
    if mode not in SDF_MODES:
        raise ValueError(f"unknown SDF view mode {mode!r}: one of {SDF_MODES}")
    octree = field.grid.octree
    o, d = camera.rays(octree.device)

    lod = field.check_lod(lod)

    def fn(x):  # (unchecked: sphere tracing evaluates the field dozens of times a frame)
        return field.query(x, lod)

    hit, t, dist = sphere_trace(fn, o, d, octree=octree, level=lod)
    if mode == "depth":
        eye = float(o[0].norm()) if o.shape[0] else 0.0
        img = _depth_image(t, hit, max(eye - 1.8, 0.0), eye + 1.8)
    else:
        img = torch.tensor(BACKGROUND, device=o.device).repeat(o.shape[0], 1)
        if hit.any():
            x = o[hit] + t[hit, None] * d[hit]
            img[hit] = (sdf_normals(fn, x, center=dist[hit]) + 1) / 2
    return _u8(img.reshape(camera.height, camera.width, 3))


def _nerf_frame(field, lod: int, camera, mode: str, ctx: NeRFContext) -> np.ndarray:
    from vqad.nerf.render import render_rays_chunked

    if mode not in NERF_MODES:
        raise ValueError(f"unknown radiance view mode {mode!r}: one of {NERF_MODES}")
    o, d = camera.rays(field.device)
    rgb, depth, opa = render_rays_chunked(field, ctx.sampler, o, d, [lod], ctx.background)
    if mode == "colour":
        img = rgb[0]
    elif mode == "opacity":
        img = opa[0][:, None].expand(-1, 3)
    else:
        eye = float(o[0].norm()) if o.shape[0] else 0.0
        img = _depth_image(depth[0] / opa[0].clamp_min(1e-6), opa[0] > 0.5, max(eye - 1.8, 0.0), eye + 1.8)
    return _u8(img.reshape(camera.height, camera.width, 3))


__all__ = ["SDF_MODES", "NERF_MODES", "LOD_COLOURS", "modes_for", "render_frame", "nerf_context", "NeRFContext"]
