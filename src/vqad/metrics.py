"""Image metrics: PSNR and SSIM (11-pixel Gaussian window, σ 1.5, as pytorch-msssim computes it), over a whole
image or the pixels a loss mask keeps."""

from __future__ import annotations

import math

import torch

SSIM_WINDOW = 11  # pixels
SSIM_SIGMA = 1.5
SSIM_K = (0.01, 0.03)  # C1 = (K1 L)², C2 = (K2 L)², data range L = 1


def psnr(pred: torch.Tensor, gt: torch.Tensor, keep: torch.Tensor | None = None) -> float:
    """PSNR in dB of ``(H, W, 3)`` images in [0, 1]: ``-10 log10(MSE)``, the MSE over the pixels ``keep (H, W)``
    marks True (all without it; NaN where it keeps none)."""
    err = (pred.float() - gt.float()) ** 2
    if keep is not None:
        if not bool(keep.any()):
            return math.nan
        err = err[keep.to(err.device)]
    return float(-10.0 * torch.log10(torch.mean(err).clamp_min(1e-12)))


def ssim(pred: torch.Tensor, gt: torch.Tensor, keep: torch.Tensor | None = None) -> float:
    """SSIM (Gaussian window 11, σ 1.5) of ``(H, W, 3)`` images in [0, 1]: the mean of :func:`ssim_map` (what
    pytorch-msssim gives, to float rounding: tested); with ``keep (H, W)``, its mean over the windows whose
    centre pixel it keeps, or, where every kept pixel lies in the 5-pixel border no window is centred on, over
    the window nearest each (NaN: no pixel kept)."""
    m, (oy, ox) = ssim_map(pred, gt)
    if keep is not None:
        keep = keep.to(m.device)
        k = keep[oy:oy + m.shape[0], ox:ox + m.shape[1]]
        if bool(k.any()):
            return float(m[k].mean())
        if not bool(keep.any()):
            return math.nan
        r, c = torch.nonzero(keep, as_tuple=True)
        return float(m[(r - oy).clamp(0, m.shape[0] - 1), (c - ox).clamp(0, m.shape[1] - 1)].mean())
    return float(m.mean())


def ssim_map(pred: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """SSIM of every full window of ``(H, W, 3)`` images in [0, 1], the mean over the channels: ``(H', W')``
    (``H' = H − 10`` where ``H ≥ 11``, else ``H``: no window along a side shorter than it, as pytorch-msssim), and
    the pixel ``(row, col)`` of the first window's centre. Its mean is :func:`ssim` without a mask."""
    a = pred.float().permute(2, 0, 1)[None].clamp(0, 1)  # (1, 3, H, W)
    b = gt.float().permute(2, 0, 1)[None]
    x = torch.arange(SSIM_WINDOW, dtype=torch.float32) - SSIM_WINDOW // 2
    g = torch.exp(-x * x / (2 * SSIM_SIGMA ** 2))
    g = (g / g.sum()).to(a.device)

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable Gaussian, 'valid' along each side long enough
        if t.shape[2] >= SSIM_WINDOW:
            t = torch.nn.functional.conv2d(t, g.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
        if t.shape[3] >= SSIM_WINDOW:
            t = torch.nn.functional.conv2d(t, g.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
        return t

    c1, c2 = SSIM_K[0] ** 2, SSIM_K[1] ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
    m = ((2 * mu_a * mu_b + c1) / (mu_a ** 2 + mu_b ** 2 + c1)) * ((2 * cov + c2) / (var_a + var_b + c2))
    m = m[0].mean(0)
    half = SSIM_WINDOW // 2
    return m, (half if a.shape[2] >= SSIM_WINDOW else 0, half if a.shape[3] >= SSIM_WINDOW else 0)
