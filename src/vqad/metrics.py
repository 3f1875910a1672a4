"""Image metrics: PSNR and SSIM (11-pixel Gaussian window, σ 1.5, pytorch-msssim)."""

from __future__ import annotations


import torch



def psnr(pred: torch.Tensor, gt: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1]: ``-10 log10(MSE)``."""
    mse = torch.mean((pred.float() - gt.float()) ** 2).clamp_min(1e-12)
    return float(-10.0 * torch.log10(mse))


def ssim(pred: torch.Tensor, gt: torch.Tensor) -> float:
    """SSIM (Gaussian window 11, σ 1.5) of ``(H, W, 3)`` images in [0, 1], via pytorch-msssim."""
    from pytorch_msssim import ssim as _ssim

    a = pred.float().permute(2, 0, 1)[None].clamp(0, 1)
    b = gt.float().permute(2, 0, 1)[None]
    # pytorch-msssim squeezes away sides of 1 px (then refuses the tensor) and skips the window along sides
    # shorter than it; a 1-px side repeated twice gives the same score under that rule
    reps = (1, 1, 2 if a.shape[2] == 1 else 1, 2 if a.shape[3] == 1 else 1)
    a, b = a.repeat(reps), b.repeat(reps)
    return float(_ssim(a, b, data_range=1.0, size_average=True, win_size=11, win_sigma=1.5))
