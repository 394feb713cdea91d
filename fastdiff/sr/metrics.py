"""PSNR and SSIM on the Y channel, as super-resolution papers report them.

Y is ITU-R BT.601 luma in the studio range the SR literature uses (MATLAB's ``rgb2ycbcr``):
Y = 16 + 65.481 R + 128.553 G + 24.966 B for R, G, B in [0, 1], so Y is in [16, 235] on a 0-255 scale, and both
metrics use a data range of 255. SSIM (Wang et al. 2004): 11x11 Gaussian window with sigma 1.5, K1 = 0.01,
K2 = 0.03, the mean of the SSIM map over the valid region (no padding), as Wang's reference code and BasicSR.
Inputs are RGB tensors in [-1, 1], ``[N, 3, H, W]`` or ``[3, H, W]``; nothing is rounded here (quantize outputs
to 8 bits before, if the numbers are to match saved images). ``crop_border`` pixels are dropped on each side first
(papers often crop ``scale`` pixels). Results are per image, ``[N]`` (float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Y_WEIGHTS = (65.481, 128.553, 24.966)
Y_OFFSET = 16.0
DATA_RANGE = 255.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def rgb_to_y(x: torch.Tensor) -> torch.Tensor:
    """BT.601 luma on the 0-255 scale ([16, 235]) of RGB in [-1, 1]: ``[..., 3, H, W]`` -> ``[..., H, W]``."""
    if x.shape[-3] != 3:
        raise ValueError(f"expected 3 channels in dim -3, got shape {tuple(x.shape)}")
    rgb01 = (x.double() + 1) / 2
    weights = torch.tensor(Y_WEIGHTS, dtype=torch.float64, device=x.device)
    return torch.einsum("...chw,c->...hw", rgb01, weights) + Y_OFFSET


def _y_pair(pred: torch.Tensor, target: torch.Tensor, crop_border: int) -> tuple[torch.Tensor, torch.Tensor]:
    if pred.shape != target.shape:
        raise ValueError(f"shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    y_pred, y_target = rgb_to_y(pred), rgb_to_y(target)
    if y_pred.dim() == 2:
        y_pred, y_target = y_pred[None], y_target[None]
    if crop_border:
        y_pred = y_pred[:, crop_border:-crop_border, crop_border:-crop_border]
        y_target = y_target[:, crop_border:-crop_border, crop_border:-crop_border]
    return y_pred, y_target


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = DATA_RANGE) -> torch.Tensor:
    """PSNR in dB of single-channel images ``[N, H, W]``: 10 log10(range^2 / MSE), inf where identical."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """The normalised ``size`` x ``size`` Gaussian window (float64)."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = DATA_RANGE) -> torch.Tensor:
    """Mean SSIM of single-channel images ``[N, H, W]`` (each side at least the window's 11)."""
    if min(a.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(
            f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {tuple(a.shape[-2:])}"
        )
    window = gaussian_window().to(a.device)[None, None]
    x, y = a.double()[:, None], b.double()[:, None]

    def local_mean(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, window)  # valid region only

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x**2
    var_y = local_mean(y * y) - mu_y**2
    cov_xy = local_mean(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return ssim_map.flatten(1).mean(1)


def psnr_y(pred: torch.Tensor, target: torch.Tensor, crop_border: int = 0) -> torch.Tensor:
    """Per-image PSNR (dB) on the Y channel of RGB images in [-1, 1]; ``[N]``, inf where identical."""
    return psnr(*_y_pair(pred, target, crop_border))


def ssim_y(pred: torch.Tensor, target: torch.Tensor, crop_border: int = 0) -> torch.Tensor:
    """Per-image SSIM on the Y channel of RGB images in [-1, 1]; ``[N]``, 1 where identical."""
    return ssim(*_y_pair(pred, target, crop_border))
