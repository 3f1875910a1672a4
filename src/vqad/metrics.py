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


#: the fewest pixels a channel's exposure is fitted to (:func:`exposure_matched`)
MIN_MATCH_PIXELS = 64


def exposure_matched(pred: torch.Tensor, gt: torch.Tensor, keep: torch.Tensor | None = None,
                     opacity: torch.Tensor | None = None, background: torch.Tensor | None = None) -> torch.Tensor:
    """``pred (H, W, 3)`` as the photo ``gt`` would have recorded it: each channel's gain (≥ 0) and offset
    fitted to ``gt`` by least squares, clamped to [0, 1].

    The fit runs over the pixels ``keep (H, W)`` marks (all without it) where the photo's channel is not
    clipped (strictly between 0 and 1: a blown highlight says nothing about the gain). With ``background
    (3,)`` and the render's ``opacity (H, W)`` (a photo the reader composited on that background, which
    the camera never saw), it runs over the opaque pixels (opacity > 0.99) and the transform applies to
    the foreground before compositing, as :func:`vqad.nerf.appearance.apply_look` does. A channel with
    fewer than :data:`MIN_MATCH_PIXELS` such pixels keeps gain 1 and offset 0 (two numbers fitted to a few
    pixels would match them exactly), one that ``pred`` holds constant there gain 1."""
    pred = pred.float()
    min_pixels = MIN_MATCH_PIXELS
    g = gt.float().to(pred.device)
    use = torch.ones(pred.shape[:-1], dtype=torch.bool, device=pred.device) if keep is None else keep.to(pred.device)
    if background is not None:
        use = use & (opacity.to(pred.device) > 0.99)
    gains, offsets = [], []
    for c in range(3):
        sel = use & (g[..., c] > 0) & (g[..., c] < 1)
        p, t = pred[..., c][sel], g[..., c][sel]
        if p.numel() < min_pixels:  # too few to tell an exposure from the field's error: the identity
            gains.append(pred.new_tensor(1.0))
            offsets.append(pred.new_tensor(0.0))
            continue
        var = ((p - p.mean()) ** 2).mean()
        gain = ((p - p.mean()) * (t - t.mean())).mean() / var if var > 1e-10 else pred.new_tensor(1.0)
        gain = gain.clamp_min(0.0)
        gains.append(gain)
        offsets.append(t.mean() - gain * p.mean())
    gain, offset = torch.stack(gains), torch.stack(offsets)
    if background is None:
        return (pred * gain + offset).clamp(0, 1)
    a = opacity.to(pred.device).unsqueeze(-1)
    rest = (1.0 - a) * background.to(pred.device)
    return ((pred - rest) * gain + a * offset + rest).clamp(0, 1)


def psnr_matched(pred: torch.Tensor, gt: torch.Tensor, keep: torch.Tensor | None = None,
                 opacity: torch.Tensor | None = None, background: torch.Tensor | None = None) -> float:
    """PSNR of ``pred (H, W, 3)`` as the photo's own exposure would have recorded it: of
    :func:`exposure_matched`, or of ``pred`` itself where that scores higher (the identity is a transform
    too; a fit to the opaque, unclipped pixels can lose on the others), so never below :func:`psnr`."""
    return max(psnr(pred, gt, keep), psnr(exposure_matched(pred, gt, keep, opacity, background), gt, keep))


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
