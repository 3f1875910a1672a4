"""Scene contraction: a large scene (an object in a room) folded into the octree's cube.

A capture's *scene space* is the dataset's normalisation of the world (:class:`~vqad.field.Normalization`):
the central box, where the object and the cameras' attention are, is [-1, 1]^3. The scene itself
extends to the box of L∞ radius ``A`` (``outer_scale``; instant-ngp's ``aabb_scale``). The octree's
*grid space* is [-1, 1]^3 too. The contraction (mip-NeRF 360's, with the L∞ norm as nerfstudio's
``SceneContraction(order=inf)``, and bounded so that the outer box fills the cube exactly) is::

    r = ||x||∞
    g(x) = x / 2                                       r ≤ 1
    g(x) = x / (2 r) · (1 + (1 − 1/r) / (1 − 1/A))     1 < r ≤ A

The central box takes the inner half of the cube ([-½, ½]^3) at uniform resolution; the shell
``1 < r ≤ A`` is folded into the outer half, uniformly in disparity ``1/r``: a grid cell of the
shell at radius r spans about ``r²`` times its size in the centre (radially). ``A → ∞`` is
mip-NeRF 360's ``2 − 1/r``. ``A = 1`` means no contraction: ``g(x) = x`` (the cube is the scene, as
for the object captures), and nothing below applies.

Why a contraction and not instant-ngp's cascades: the octree, its per-level codebooks and the
progressive file stay exactly as they are (one octree, coarse levels first); only the map from a
sample point to the grid and the marching step change. Cascades would need one octree and one set
of codebooks per cascade, interleaved in the file. See docs/method.md ("Large scenes").

Ray marching (:meth:`vqad.nerf.render.OccupancySampler.march`) keeps the rays straight in scene
space (volume rendering integrates σ over scene-space length) and takes steps of constant length
in *grid* space: ``Δt = step / |J(x) d|``, ``J`` the Jacobian of ``g`` at the step's start. Along a
ray heading outwards, ``|J d| ≈ 1/(2 k r²)`` (``k = 1 − 1/A``): steps grow like ``r²``, uniform in
disparity; along a ray passing the object sideways, they grow like ``r`` (the tangential scale
``s(r) / 2``). Either way each grid cell a ray crosses gets about ``cell / step`` samples.
"""

from __future__ import annotations

import math

import torch

from vqad.errors import InputError

MAX_OUTER_SCALE = 4096.0


def check_outer_scale(a, what: str = "outer_scale") -> float:
    """``A`` checked: a finite number in ``[1, 4096]`` (1: no contraction)."""
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or not 1.0 <= a <= MAX_OUTER_SCALE:
        raise InputError(f"{what} must be a number in [1, {MAX_OUTER_SCALE:g}] (1: no contraction), got {a!r}")
    return float(a)


def _k(outer_scale: float) -> float:
    return 1.0 - 1.0 / outer_scale


def contract(x: torch.Tensor, outer_scale: float) -> torch.Tensor:
    """Scene → grid coordinates ``(N, 3) -> (N, 3)`` (the module's ``g``; identity when ``A = 1``).

    >>> contract(torch.tensor([[0.5, 0.0, 0.0], [2.0, 1.0, 0.0], [4.0, 0.0, 0.0]]), 4.0)
    tensor([[0.2500, 0.0000, 0.0000],
            [0.6667, 0.3333, 0.0000],
            [1.0000, 0.0000, 0.0000]])
    """
    if outer_scale == 1.0:
        return x
    r = x.abs().amax(-1, keepdim=True).clamp_min(1e-12)
    s = torch.where(r <= 1, torch.ones_like(r), (1 + (1 - 1 / r) / _k(outer_scale)) / r)
    return x * (0.5 * s)


def uncontract(g: torch.Tensor, outer_scale: float) -> torch.Tensor:
    """Grid → scene coordinates, the inverse of :func:`contract` on ``[-1, 1]^3``.

    With ``c = 2 ||g||∞``: ``r = c`` for ``c ≤ 1``, else ``1/r = 1 − (c − 1) k``.
    """
    if outer_scale == 1.0:
        return g
    c = (2 * g.abs().amax(-1, keepdim=True)).clamp(1e-12, 2.0)
    inv_r = (1 - (c - 1) * _k(outer_scale)).clamp_min(1.0 / outer_scale)
    r = torch.where(c <= 1, c, 1 / inv_r)
    return 2 * g * (r / c)


def grid_speed(x: torch.Tensor, d: torch.Tensor, outer_scale: float) -> torch.Tensor:
    """``|J(x) d|``: grid-space length per unit of scene-space length along ``d`` at ``x``.

    Args:
        x, d: ``(N, 3)`` scene points and unit directions.
    Returns:
        ``(N,)``; ½ inside the central box. Outside, with ``g = s(r) x / 2``,
        ``s(r) = (1 + 1/k)/r − 1/(k r²)`` and ``r = |x_m|`` (m the largest axis):
        ``J d = (s d + x s'(r) sign(x_m) d_m) / 2``, ``s'(r) = −(1 + 1/k)/r² + 2/(k r³)``.
    """
    if outer_scale == 1.0:
        return torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
    k = _k(outer_scale)
    ax, m = x.abs().max(-1)
    r = ax.clamp_min(1.0)
    s = (1 + 1 / k) / r - 1 / (k * r * r)
    ds = -(1 + 1 / k) / (r * r) + 2 / (k * r ** 3)
    dr = torch.sign(x.gather(1, m[:, None])).squeeze(1) * d.gather(1, m[:, None]).squeeze(1)
    jd = s[:, None] * d + x * (ds * dr)[:, None]
    speed = 0.5 * jd.norm(dim=-1)
    return torch.where(ax <= 1, torch.full_like(speed, 0.5), speed)


def jacobian(x: torch.Tensor, outer_scale: float) -> torch.Tensor:
    """``J = ∂g/∂x`` at scene points ``x (N, 3)``: ``(N, 3, 3)`` (``I/2`` inside the central box).

    Outside: ``J = (s(r) I + s'(r) x sign(x_m) e_mᵀ) / 2`` (see :func:`grid_speed`).
    """
    n = x.shape[0]
    eye = torch.eye(3, dtype=x.dtype, device=x.device).expand(n, 3, 3)
    if outer_scale == 1.0:
        return eye.clone()
    k = _k(outer_scale)
    ax, m = x.abs().max(-1)
    r = ax.clamp_min(1.0)
    s = (1 + 1 / k) / r - 1 / (k * r * r)
    ds = -(1 + 1 / k) / (r * r) + 2 / (k * r ** 3)
    e = torch.nn.functional.one_hot(m, 3).to(x.dtype) * torch.sign(x.gather(1, m[:, None]))
    J = 0.5 * (s[:, None, None] * eye + ds[:, None, None] * x[:, :, None] * e[:, None, :])
    return torch.where((ax <= 1)[:, None, None], 0.5 * eye, J)


def slowest_speed(g: torch.Tensor, outer_scale: float, chunk: int = 1 << 18) -> torch.Tensor:
    """The smallest ``|J d|`` over all directions d at grid points ``g (N, 3)``: ``(N,)``, the
    smallest singular value of :func:`jacobian` (½ inside the central box; all ones when ``A = 1``).

    One grid step there spans at most ``step / slowest_speed`` of scene length, so a cell is empty
    for every ray when ``σ · step / slowest_speed`` absorbs little (:func:`vqad.nerf.render.prune_threshold`).
    """
    if outer_scale == 1.0:
        return torch.ones(g.shape[0], dtype=g.dtype, device=g.device)
    x = uncontract(g, outer_scale)
    return torch.cat([torch.linalg.svdvals(jacobian(x[a:a + chunk].double(), outer_scale))[:, -1].to(g.dtype)
                      for a in range(0, x.shape[0], chunk)]) if x.shape[0] else g.new_zeros(0)
