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
    r = [float(v) for v in torch.as_tensor(row).reshape(-1).tolist()]
    if len(r) == 4:
        return f"k1, k2, p1, p2 = {[round(v, 6) for v in r]}"
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


def fisheye_theta_d(row, theta):
    """A fisheye lens row's distorted angle ``θ_d`` (its normalised image radius) at ``theta`` radians
    off axis (a float, or a tensor of any shape)."""
    r = [float(v) for v in torch.as_tensor(row).reshape(-1).tolist()]
    t2 = theta * theta
    return theta * (1 + t2 * (r[1] + t2 * (r[2] + t2 * (r[5] + t2 * r[6]))))


def _radial(r2: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A lens's radial factor ``R`` (``x_d = x R + tangential``) at squared normalised radii ``r2 (N,)``
    and its derivative ``∂R/∂r²``, per row of ``k (N, 9)`` (:func:`lens_rows`).

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
    if bool(fish.any()):
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
        R, dR = torch.where(fish, Rf, R), torch.where(fish, dRf, dR)
    return R, dR


def _distort_jacobian(x, y, k):
    """:func:`distort` of ``(x, y)`` (each ``(N,)``) for lens rows ``k (N, 9)``, and its Jacobian:
    ``xd, yd, a = ∂x_d/∂x, b = ∂x_d/∂y = ∂y_d/∂x, d = ∂y_d/∂y`` (each ``(N,)``)."""
    p1, p2 = k[:, 3], k[:, 4]
    r2 = x * x + y * y
    radial, dR = _radial(r2, k)
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


def undistort(xy_distorted: torch.Tensor, distortion: torch.Tensor, iters: int = 12) -> torch.Tensor:
    """Invert :func:`distort` by Newton's method (2×2 Jacobian per point), starting from the input
    (a fisheye row from the equidistant guess ``r = tan |x_d|``).

    Args:
        xy_distorted: ``(N, 2)`` distorted normalised coordinates (what a pixel records).
        distortion: lens rows ``(9,)`` or ``(N, 9)``, or ``k1, k2, p1, p2`` (:func:`lens_rows`).
    Returns:
        ``(N, 2)`` undistorted normalised coordinates ``xy`` with ``distort(xy) ≈ xy_distorted`` where
        the model is one-to-one over the image (the readers check that: :func:`distortion_fit`).
    """
    target = xy_distorted
    k = lens_rows(distortion, target.shape[0]).to(target)
    x, y = target[:, 0].clone(), target[:, 1].clone()
    fish = k[:, 0] == LENS_FISHEYE
    if bool(fish.any()):
        rd = target.norm(dim=-1)
        grow = torch.tan(rd.clamp(max=1.48)) / rd.clamp_min(1e-12)
        grow = torch.where(fish & (rd > 1e-6), grow, torch.ones_like(grow))
        x, y = x * grow, y * grow
    for _ in range(iters):
        xd, yd, a, b, d = _distort_jacobian(x, y, k)
        fx, fy = xd - target[:, 0], yd - target[:, 1]
        det = a * d - b * b
        det = torch.where(det.abs() < 1e-12, torch.full_like(det, 1e-12), det)
        x = x - (d * fx - b * fy) / det
        y = y - (a * fy - b * fx) / det
    return torch.stack([x, y], dim=-1)


#: the largest round trip ``|distort(undistort(u)) − u|`` in pixels, over an image, that ray generation accepts
DISTORTION_TOL_PX = 0.1


def distortion_fit(intrinsics, distortion, hw: tuple[int, int], n: int = 17) -> tuple[float, float]:
    """How well ray generation undoes a view's lens distortion over its whole image.

    An ``n × n`` grid of pixel positions spanning the image, borders included, is undistorted as the
    rays are (:func:`undistort`, in float64) and distorted back. Returns the largest round-trip error
    in pixels and the smallest Jacobian determinant of :func:`distort` at the undistorted points. A
    model that is one-to-one over the image gives an error near 0 and a positive determinant; one
    that folds inside it (a strong negative ``k1``, a large ``p1``: two scene directions on one pixel)
    gives a determinant ≤ 0 or an error the iteration cannot close.

    Args:
        intrinsics: ``(4,)`` fx, fy, cx, cy; distortion: one lens row ``(9,)`` or ``k1, k2, p1, p2``;
            ``hw`` the image's height and width in pixels.
    """
    K = torch.as_tensor(intrinsics, dtype=torch.float64).reshape(4)
    h, w = hw
    v, u = torch.meshgrid(torch.linspace(0, h, n, dtype=torch.float64), torch.linspace(0, w, n, dtype=torch.float64),
                          indexing="ij")
    xy_d = torch.stack([(u.reshape(-1) - K[2]) / K[0], (v.reshape(-1) - K[3]) / K[1]], dim=-1)
    k = lens_rows(torch.as_tensor(distortion, dtype=torch.float64).reshape(-1), xy_d.shape[0])
    xy = undistort(xy_d, k)
    xd, yd, a, b, d = _distort_jacobian(xy[:, 0], xy[:, 1], k)
    err = torch.stack([(xd - xy_d[:, 0]) * K[0], (yd - xy_d[:, 1]) * K[1]], -1).norm(dim=-1)
    det = a * d - b * b
    if not bool(torch.isfinite(err).all() and torch.isfinite(det).all()):
        return math.inf, -math.inf
    return float(err.max()), float(det.min())




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
