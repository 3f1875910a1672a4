"""Lens models: where a camera-space direction lands on the image, and back.

A view's lens is one row of :data:`LENS_COLUMNS` (``Views.distortion (N, 9)``): the model, then
OpenCV's coefficients, acting on normalised pinhole coordinates ``x = X / −Z``, ``y = −Y / −Z`` (y
down, as pixel rows grow), which :mod:`vqad.nerf.rays` turns into pixels ``u = cx + fx x_d``:

* :data:`LENS_OPENCV`, OpenCV's radial-tangential model with its rational radial term (COLMAP's
  SIMPLE_RADIAL, RADIAL, OPENCV and FULL_OPENCV; instant-ngp's and nerfstudio's ``k1, k2, k3, p1, p2``):
  ``x_d = x R + 2 p1 x y + p2 (r² + 2 x²)``, ``y_d = y R + p1 (r² + 2 y²) + 2 p2 x y``,
  ``R = (1 + k1 r² + k2 r⁴ + k3 r⁶) / (1 + k4 r² + k5 r⁴ + k6 r⁶)``;
* :data:`LENS_FISHEYE`, OpenCV's fisheye (equidistant, Kannala–Brandt; COLMAP's OPENCV_FISHEYE,
  SIMPLE_RADIAL_FISHEYE and RADIAL_FISHEYE; ``is_fisheye`` or ``camera_model: OPENCV_FISHEYE`` in a
  ``transforms.json``): ``θ = atan r``, ``θ_d = θ (1 + k1 θ² + k2 θ⁴ + k3 θ⁶ + k4 θ⁸)``,
  ``x_d = x θ_d / r`` (p1, p2, k5, k6 are zero).

A pixel records the distorted point, so ray generation inverts the model (:func:`undistort`, Newton
iterations as instant-ngp does). Directions are kept as ``(x, −y, −1)``, so a fisheye view can look
at most 90° off its axis (the readers stop at :data:`vqad.nerf.formats.common.MAX_RAY_ANGLE`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


def expand_rows(p: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """``(k,)`` or ``(n, k)`` → ``(n, k)``."""
    p = torch.as_tensor(p)
    return p.reshape(1, k).expand(n, k) if p.dim() == 1 else p


#: a lens row's columns: the model (:data:`LENS_OPENCV` or :data:`LENS_FISHEYE`), then OpenCV's coefficients
LENS_COLUMNS = ("model", "k1", "k2", "p1", "p2", "k3", "k4", "k5", "k6")
LENS_OPENCV = 0  #: radial-tangential, with OpenCV's rational radial term (COLMAP's OPENCV and FULL_OPENCV)
LENS_FISHEYE = 1  #: OpenCV's fisheye (equidistant, Kannala-Brandt): k1..k4 used, p1, p2, k5, k6 zero
LENS_MODELS = (LENS_OPENCV, LENS_FISHEYE)
#: a fisheye ray's normalised radius below which its radial factor is its Taylor series (no 0 / 0)
_FISHEYE_SMALL_R2 = 1e-6


def lens_rows(distortion, n: int | None = None) -> torch.Tensor:
    """Lens parameters as ``(n, 9)`` rows of :data:`LENS_COLUMNS`.

    Args:
        distortion: ``(9,)`` or ``(n, 9)`` lens rows, or ``(4,)`` / ``(n, 4)`` OpenCV ``k1, k2, p1, p2``
            (the radial-tangential model with ``k3 .. k6 = 0``).
        n: how many rows (None: as many as given, one row stays ``(9,)``).
    """
    p = torch.as_tensor(distortion)
    if p.shape[-1] == 4 and p.dim() in (1, 2):
        p = torch.cat([torch.zeros(p.shape[:-1] + (1,), dtype=p.dtype, device=p.device), p,
                       torch.zeros(p.shape[:-1] + (4,), dtype=p.dtype, device=p.device)], dim=-1)
    if p.shape[-1] != len(LENS_COLUMNS) or p.dim() not in (1, 2):
        raise ValueError(f"lens parameters must be (9,) or (N, 9) rows of {LENS_COLUMNS} or (N, 4) k1, k2, p1, p2; "
                         f"got shape {tuple(p.shape)}")
    return p if n is None else expand_rows(p, n, len(LENS_COLUMNS))


def describe_lens(row) -> str:
    """A lens row in words, for messages: ``OpenCV fisheye k1..k4 = [...]``."""
    r = [float(v) for v in lens_rows(torch.as_tensor(row).reshape(-1)).tolist()]
    if r[0] == LENS_FISHEYE:
        return f"OpenCV fisheye k1, k2, k3, k4 = {[round(v, 6) for v in (r[1], r[2], r[5], r[6])]}"
    names = [k for k, v in zip(LENS_COLUMNS[1:], r[1:]) if k in ("k1", "k2", "p1", "p2") or v != 0.0]
    return f"OpenCV {', '.join(names)} = {[round(r[LENS_COLUMNS.index(k)], 6) for k in names]}"


def lens_summary(views) -> str:
    """``", lenses: OpenCV fisheye (43 views)"``: what lenses a split's rays undo, for a fit's first lines
    ("" for pinholes)."""
    if views.distortion is None:
        return ""
    rows = views.distortion
    zero = (rows[:, 1:] == 0).all(dim=1)
    kinds = {"OpenCV fisheye": int((rows[:, 0] == LENS_FISHEYE).sum()),
             "OpenCV radial-tangential": int(((rows[:, 0] == LENS_OPENCV) & ~zero).sum())}
    return ", lenses: " + ", ".join(f"{k} ({n} view{'s' if n > 1 else ''})" for k, n in kinds.items() if n)


def distorted_radius(row, theta: float) -> float:
    """The normalised image radius at which a lens row (or None, a pinhole) shows a direction ``theta``
    radians off its axis: ``ρ R(ρ²)`` for ``ρ = tan θ`` (:func:`_radial`; a fisheye's ``θ_d``)."""
    rho = math.tan(theta)
    if row is None:
        return rho
    R, _, _ = _radial(torch.tensor([rho * rho], dtype=torch.float64), lens_rows(torch.as_tensor(row).reshape(-1))[None].double())
    return rho * float(R[0])


def _radial(r2: torch.Tensor, k: torch.Tensor, fisheye: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A lens's radial factor ``R`` (``x_d = x R + tangential``) at squared normalised radii ``r2 (N,)``,
    its derivative ``∂R/∂r²`` and the rational model's denominator ``Q`` (1 for a fisheye), per row of
    ``k (N, 9)`` (:func:`lens_rows`). ``fisheye``: whether any row is a fisheye, when the caller knows
    (None: looked up, a host sync on a GPU).

    OpenCV: ``R = (1 + k1 r² + k2 r⁴ + k3 r⁶) / (1 + k4 r² + k5 r⁴ + k6 r⁶)``. Fisheye: ``θ = atan r``,
    ``θ_d = θ (1 + k1 θ² + k2 θ⁴ + k3 θ⁶ + k4 θ⁸)``, ``R = θ_d / r`` (``→ 1 + (k1 − ⅓) r²`` as ``r → 0``).
    """
    model, k1, k2, _, _, k3, k4, k5, k6 = k.unbind(-1)
    P = 1 + r2 * (k1 + r2 * (k2 + r2 * k3))
    Q = 1 + r2 * (k4 + r2 * (k5 + r2 * k6))
    dP = k1 + r2 * (2 * k2 + 3 * k3 * r2)
    dQ = k4 + r2 * (2 * k5 + 3 * k6 * r2)
    R, dR = P / Q, (dP * Q - P * dQ) / (Q * Q)
    fish = model == LENS_FISHEYE
    if fisheye if fisheye is not None else bool(fish.any()):
        small = r2 < _FISHEYE_SMALL_R2
        rs2 = torch.where(small, torch.ones_like(r2), r2)
        r = rs2.sqrt()
        th = torch.atan(r)
        t2 = th * th
        thd = th * (1 + t2 * (k1 + t2 * (k2 + t2 * (k3 + t2 * k4))))
        dthd = 1 + t2 * (3 * k1 + t2 * (5 * k2 + t2 * (7 * k3 + t2 * 9 * k4)))  # dθ_d/dθ
        Rf = thd / r
        dRf = (dthd / (1 + rs2) - Rf) / (2 * rs2)  # (dR/dr) / (2 r), dθ/dr = 1 / (1 + r²)
        c = k1 - 1.0 / 3.0
        Rf = torch.where(small, 1 + c * r2, Rf)
        dRf = torch.where(small, c, dRf)
        R, dR, Q = torch.where(fish, Rf, R), torch.where(fish, dRf, dR), torch.where(fish, torch.ones_like(Q), Q)
    return R, dR, Q


def _distort_jacobian(x, y, k, fisheye: bool | None = None):
    """:func:`distort` of ``(x, y)`` (each ``(N,)``) for lens rows ``k (N, 9)``, and its Jacobian:
    ``xd, yd, a = ∂x_d/∂x, b = ∂x_d/∂y = ∂y_d/∂x, d = ∂y_d/∂y`` (each ``(N,)``); ``fisheye`` as for
    :func:`_radial`."""
    p1, p2 = k[:, 3], k[:, 4]
    r2 = x * x + y * y
    radial, dR, _ = _radial(r2, k, fisheye)
    xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    dr = 2 * dR  # d radial / d(x or y) = dr · (x or y)
    a = radial + dr * x * x + 2 * p1 * y + 6 * p2 * x
    b = dr * x * y + 2 * p1 * x + 2 * p2 * y
    d = radial + dr * y * y + 6 * p1 * y + 2 * p2 * x
    return xd, yd, a, b, d


def distort(xy: torch.Tensor, distortion: torch.Tensor) -> torch.Tensor:
    """A lens's distortion of normalised pinhole coordinates (y down): where a camera-space direction
    ``(x, −y, −1)`` lands, in the normalised coordinates a pixel records (``u = cx + fx x_d``).

    OpenCV: ``x_d = x R + 2 p1 x y + p2 (r² + 2 x²)``, ``y_d = y R + p1 (r² + 2 y²) + 2 p2 x y`` with
    the rational radial factor ``R`` of :func:`_radial`; fisheye: ``x_d = x θ_d / r`` (equidistant).

    Args:
        xy: ``(N, 2)`` undistorted normalised coordinates ``((u − cx)/fx, (v − cy)/fy)``.
        distortion: lens rows ``(9,)`` or ``(N, 9)``, or ``k1, k2, p1, p2`` (:func:`lens_rows`).
    Returns:
        ``(N, 2)`` distorted normalised coordinates.
    """
    xd, yd, *_ = _distort_jacobian(*xy.unbind(-1), lens_rows(distortion, xy.shape[0]).to(xy))
    return torch.stack([xd, yd], dim=-1)


#: the radial map's main branch is searched at this many angles off the axis, up to :data:`BRANCH_MAX_DEG`
_BRANCH_SAMPLES = 2048
BRANCH_MAX_DEG = 89.5


class RadialBranch(NamedTuple):
    """The main branch of lenses' radial maps (:func:`radial_branch`), for ``u`` lens rows."""

    rho: torch.Tensor  # (S,) the pinhole radii sampled, tan θ for S angles from 0 to BRANCH_MAX_DEG
    f: torch.Tensor  # (u, S) the distorted radius at each, held at f(ρ*) past the branch's end
    end: torch.Tensor  # (u,) int64: the index of ρ*, the branch's last sample

    @property
    def rho_end(self) -> torch.Tensor:
        return self.rho[self.end]

    @property
    def f_end(self) -> torch.Tensor:
        return self.f.gather(1, self.end[:, None])[:, 0]


def radial_branch(rows: torch.Tensor) -> RadialBranch:
    """The main branch of each lens's radial map ``f(ρ) = ρ R(ρ²)`` (the distorted radius of a direction
    whose pinhole radius is ``ρ = tan θ``): from the axis, as far as ``f`` keeps increasing and the
    rational model's denominator stays positive, sampled at :data:`_BRANCH_SAMPLES` angles up to
    :data:`BRANCH_MAX_DEG`. A pixel farther out than ``f(ρ*)`` has no direction on it: the lens turns back
    (or meets its pole) inside that image.

    Args:
        rows: ``(u, 9)`` lens rows.
    """
    theta = torch.linspace(0.0, math.radians(BRANCH_MAX_DEG), _BRANCH_SAMPLES, dtype=rows.dtype, device=rows.device)
    rho = torch.tan(theta)
    u = rows.shape[0]
    R, _, Q = _radial((rho * rho).repeat(u), rows.repeat_interleave(_BRANCH_SAMPLES, dim=0))
    f, Q = (rho * R.view(u, -1)), Q.view(u, -1)
    ok = torch.isfinite(f) & (Q > 0)
    ok[:, 1:] &= f[:, 1:] > f[:, :-1]
    # the last sample before the first that fails (the whole search when none does)
    end = torch.where(ok.all(dim=1), _BRANCH_SAMPLES - 1, (~ok).int().argmax(dim=1) - 1).clamp_min(0)
    past = torch.arange(_BRANCH_SAMPLES, device=rows.device)[None] > end[:, None]
    f = torch.where(past, f.gather(1, end[:, None]), f).nan_to_num(0.0)
    return RadialBranch(rho, f, end)


def _branch_radius(branch: RadialBranch, which: torch.Tensor, rd: torch.Tensor) -> torch.Tensor:
    """The pinhole radius ``ρ (N,)`` on the main branch of lens ``which (N,)`` whose distorted radius is
    ``rd (N,)`` (the branch's end beyond its reach), by linear interpolation between its samples."""
    u, S = branch.f.shape
    f = branch.f.double()
    top = f[:, -1:].clamp_min(1e-300)
    flat = (f / top + torch.arange(u, device=f.device, dtype=f.dtype)[:, None]).reshape(-1)  # rows one after another
    goal = (rd.double() / top[which, 0]).clamp(0.0, 1.0)
    i = torch.searchsorted(flat, goal + which.double()).clamp(1, u * S - 1)
    i = torch.where(i % S == 0, i + 1, i)  # stay inside the row: between its samples j − 1 and j, j ≥ 1
    f0, f1 = flat[i - 1] - which.double(), flat[i] - which.double()
    rho = branch.rho.double()
    j = i % S
    t = ((goal - f0) / (f1 - f0).clamp_min(1e-300)).clamp(0.0, 1.0)
    return (rho[j - 1] + t * (rho[j] - rho[j - 1])).to(rd.dtype)


class LensTable(NamedTuple):
    """A capture's distinct lenses, prepared once (:func:`lens_table`) so that casting a batch of rays
    through them needs no sort, no table and no host sync."""

    rows: torch.Tensor  # (u, 9) the distinct lens rows
    branch: RadialBranch  # their radial maps' main branches
    fisheye: bool  # whether any is a fisheye


class LensBatch(NamedTuple):
    """Lenses for a batch of rays: a :class:`LensTable` and each ray's row in it, ``which (n,)`` int64.
    Ray generation takes it wherever it takes lens rows (:func:`undistort`, :mod:`vqad.nerf.rays`)."""

    table: LensTable
    which: torch.Tensor


_BRANCH_CACHE: dict[tuple, RadialBranch] = {}


def _branch_of(rows: torch.Tensor) -> RadialBranch:
    """:func:`radial_branch` of distinct lens rows, remembered for the few a capture has (training asks
    for the same ones every step)."""
    key = (rows.dtype, str(rows.device), rows.cpu().numpy().tobytes())
    if key not in _BRANCH_CACHE:
        if len(_BRANCH_CACHE) >= 16:
            _BRANCH_CACHE.clear()
        _BRANCH_CACHE[key] = radial_branch(rows)
    return _BRANCH_CACHE[key]


def lens_table(rows: torch.Tensor) -> tuple[LensTable, torch.Tensor]:
    """The distinct rows of lens rows ``(N, 9)`` as a :class:`LensTable` (their branches remembered:
    :func:`_branch_of`), and each row's index in it ``(N,)``."""
    if bool((rows == rows[:1]).all()):  # one lens (the common case): no sort
        distinct, which = rows[:1], torch.zeros(rows.shape[0], dtype=torch.long, device=rows.device)
    else:
        distinct, which = torch.unique(rows, dim=0, return_inverse=True)
    return LensTable(distinct, _branch_of(distinct), bool((distinct[:, 0] == LENS_FISHEYE).any())), which


def undistort(xy_distorted: torch.Tensor, distortion: torch.Tensor, iters: int = 5) -> torch.Tensor:
    """Invert :func:`distort` on the radial map's main branch (:func:`radial_branch`): each point's radius
    from the branch's samples (the radial terms alone), then ``iters`` Newton steps on the 2×2 Jacobian
    for the rest and the tangential terms. Starting on the branch keeps every pixel's ray on it: Newton
    from the distorted point itself can settle on a far branch, beyond a rational lens's pole or where a
    fisheye polynomial turns back.

    Args:
        xy_distorted: ``(N, 2)`` distorted normalised coordinates (what a pixel records).
        distortion: lens rows ``(9,)`` or ``(N, 9)``, ``k1, k2, p1, p2`` (:func:`lens_rows`), or a
            :class:`LensBatch` (a training step's rays: no host sync).
    Returns:
        ``(N, 2)`` undistorted normalised coordinates ``xy`` with ``distort(xy) ≈ xy_distorted`` where
        the model is one-to-one over the image (the readers check that: :func:`distortion_fit`); a
        point beyond the branch's reach gets the branch's end.
    """
    target = xy_distorted
    if target.shape[0] == 0:
        return target.clone()
    if not isinstance(distortion, LensBatch):  # a LensBatch is prepared: no sort, no table, no host sync
        distortion = LensBatch(*lens_table(lens_rows(distortion, target.shape[0]).to(target)))
    table, which = distortion
    k, fisheye = table.rows[which].to(target), table.fisheye
    rd = target.norm(dim=-1)
    rho = _branch_radius(table.branch, which, rd)
    scale = torch.where(rd > 0, rho / rd.clamp_min(1e-30), torch.ones_like(rd))
    x, y = target[:, 0] * scale, target[:, 1] * scale
    for _ in range(iters):
        xd, yd, a, b, d = _distort_jacobian(x, y, k, fisheye)
        fx, fy = xd - target[:, 0], yd - target[:, 1]
        det = a * d - b * b
        det = torch.where(det.abs() < 1e-12, torch.full_like(det, 1e-12), det)
        x = x - (d * fx - b * fy) / det
        y = y - (a * fy - b * fx) / det
    return torch.stack([x, y], dim=-1)


#: the largest round trip ``|distort(undistort(u)) − u|`` in pixels, over an image, that ray generation accepts
DISTORTION_TOL_PX = 0.1


class LensFit(NamedTuple):
    """How well ray generation undoes a view's lens over its image (:func:`distortion_fit`)."""

    error_px: float  # the largest round trip |distort(undistort(u)) − u| in pixels
    min_det: float  # the smallest Jacobian determinant of distort at the undistorted points (≤ 0: a fold)
    reach: float  # the share of the radial map's main branch the image uses (> 1: the image leaves it)
    branch_deg: float  # how far off axis the main branch goes, degrees (BRANCH_MAX_DEG: as far as searched)
    min_pixel_rad: float  # the smallest angle a pixel spans anywhere in the image, radians

    @property
    def ok(self) -> bool:
        return (self.min_det > 0 and self.error_px <= DISTORTION_TOL_PX and self.reach <= 1.0
                and self.min_pixel_rad >= MIN_PIXEL_RAD)


#: the smallest angle a pixel may span (float32 unit directions resolve ~6e-8 rad; a 100,000-px focal
#: length, a 4-m lens on a phone's sensor, still gives 1e-5)
MIN_PIXEL_RAD = 1e-6


def distortion_fit(intrinsics, distortion, hw: tuple[int, int], n: int = 65) -> LensFit:
    """How well ray generation undoes a view's lens distortion over its whole image.

    An ``n × n`` grid of pixel positions spanning the image, borders and corners included, is undistorted
    as the rays are (:func:`undistort`, in float64) and distorted back. A model that is one-to-one over
    the image gives an error near 0, a positive determinant and a reach within the radial map's main
    branch; one that folds inside it (a strong negative ``k1``, a large ``p1``: two scene directions on
    one pixel), turns back or meets its pole there does not.

    Args:
        intrinsics: ``(4,)`` fx, fy, cx, cy; distortion: one lens row ``(9,)`` or ``k1, k2, p1, p2``;
            ``hw`` the image's height and width in pixels.
    """
    K = torch.as_tensor(intrinsics, dtype=torch.float64).reshape(4)
    h, w = hw
    v, u = torch.meshgrid(torch.linspace(0, h, n, dtype=torch.float64), torch.linspace(0, w, n, dtype=torch.float64),
                          indexing="ij")
    xy_d = torch.stack([(u.reshape(-1) - K[2]) / K[0], (v.reshape(-1) - K[3]) / K[1]], dim=-1)
    table, _ = lens_table(lens_rows(torch.as_tensor(distortion, dtype=torch.float64).reshape(-1))[None])
    rho_end, f_end = table.branch.rho_end, table.branch.f_end
    branch_deg = math.degrees(math.atan(float(rho_end[0])))
    k = table.rows.expand(xy_d.shape[0], -1)
    xy = undistort(xy_d, LensBatch(table, torch.zeros(xy_d.shape[0], dtype=torch.long)))
    xd, yd, a, b, d = _distort_jacobian(xy[:, 0], xy[:, 1], k)
    err = torch.stack([(xd - xy_d[:, 0]) * K[0], (yd - xy_d[:, 1]) * K[1]], -1).norm(dim=-1)
    det = a * d - b * b
    reach = float(xy_d.norm(dim=-1).max() / f_end[0]) if float(f_end[0]) > 0 else math.inf
    if not bool(torch.isfinite(err).all() and torch.isfinite(det).all()):
        return LensFit(math.inf, -math.inf, reach, branch_deg, 0.0)
    # a pixel spans 1 / (f √det) of the pinhole plane, and dθ = dρ / (1 + ρ²) of the view
    pixel = 1.0 / ((K[0] * K[1]).sqrt() * det.clamp_min(1e-300).sqrt() * (1.0 + (xy * xy).sum(-1)))
    return LensFit(float(err.max()), float(det.min()), reach, branch_deg, float(pixel.min()))


def image_radius2(intrinsics, distortion, hw: tuple[int, int], n: int = 17) -> float:
    """The largest squared normalised radius ``r²`` (undistorted) that a view's image border reaches:
    ``n`` points along each edge, undistorted as the rays are.

    Args:
        intrinsics: ``(4,)`` fx, fy, cx, cy; distortion: one lens row ``(9,)`` (:func:`lens_rows`);
            ``hw`` the image's height and width in pixels.
    """
    K = torch.as_tensor(intrinsics, dtype=torch.float64).reshape(4)
    h, w = hw
    t = torch.linspace(0, 1, n, dtype=torch.float64)
    zero, one = torch.zeros_like(t), torch.ones_like(t)
    u = torch.cat([t * w, t * w, zero, one * w])
    v = torch.cat([zero, one * h, t * h, t * h])
    xy_d = torch.stack([(u - K[2]) / K[0], (v - K[3]) / K[1]], dim=-1)
    xy = undistort(xy_d, lens_rows(torch.as_tensor(distortion, dtype=torch.float64).reshape(-1), xy_d.shape[0]))
    return float((xy * xy).sum(-1).max())


def distort_within(xy: torch.Tensor, distortion: torch.Tensor, radius2: float) -> torch.Tensor:
    """:func:`distort`, with the points beyond the image's undistorted radius (``r² > radius2``,
    :func:`image_radius2`, plus 5 %) sent to ``+inf``: a polynomial model can fold a direction far
    outside the field of view back into the image, and a projection must not see it there.

    Args:
        xy: ``(N, 2)`` undistorted normalised coordinates; distortion: one lens row ``(9,)``.
    Returns:
        ``(N, 2)`` distorted normalised coordinates, ``inf`` outside the image.
    """
    out = distort(xy, distortion)
    outside = (xy * xy).sum(-1) > radius2 * 1.1025
    return out.masked_fill(outside[:, None], float("inf"))
