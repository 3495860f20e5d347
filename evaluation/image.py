"""Image metrics for reconstructions, one value per image.

Images are (..., C, H, W) with values in [0, data_range] (1 for our [0, 1] renders); masks
(..., H, W) bool; depths (..., H, W) in world units. Every function returns a (...) tensor:
one number per image, so callers choose how to average.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SSIM_K1, SSIM_K2 = 0.01, 0.03     # Wang et al. 2004 stabilisers, times the data range


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, 10 log10(range^2 / MSE); +inf for identical images."""
    _check_pair(pred, target, "psnr")
    mse = (pred.double() - target.double()).pow(2).flatten(-3).mean(-1)
    return (10 * torch.log10(data_range ** 2 / mse)).to(pred.dtype)   # mse 0 -> inf


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """(size,) float64 Gaussian taps centred on the middle tap, summing to 1."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return w / w.sum()


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0,
         window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004): Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03.

    Local means, variances and covariance are Gaussian-weighted (population, not sample,
    statistics), computed only where the window fits inside the image ('valid'); the SSIM map
    is averaged over those positions and the channels. Computed in float64. Images smaller
    than the window are a ValueError."""
    _check_pair(pred, target, "ssim")
    *lead, C, H, W = pred.shape
    if H < window or W < window:
        raise ValueError(f"ssim: images of {H}x{W} are smaller than the {window}x{window} window")
    x = pred.double().reshape(-1, C, H, W)
    y = target.double().reshape(-1, C, H, W)
    g = gaussian_window(window, sigma).to(x.device)
    # Separable blur, per channel: rows then columns.
    kh, kw = g.view(1, 1, -1, 1).repeat(C, 1, 1, 1), g.view(1, 1, 1, -1).repeat(C, 1, 1, 1)
    blur = lambda t: F.conv2d(F.conv2d(t, kh, groups=C), kw, groups=C)
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).reshape(lead).to(pred.dtype)


def mask_iou(pred_mask: torch.Tensor, gt_mask: torch.Tensor) -> torch.Tensor:
    """|pred & gt| / |pred | gt| of boolean masks (..., H, W); 1 when both are empty (they agree)."""
    if pred_mask.shape != gt_mask.shape:
        raise ValueError(f"mask_iou: masks of shapes {tuple(pred_mask.shape)} and {tuple(gt_mask.shape)} differ")
    p, g = pred_mask.bool(), gt_mask.bool()
    inter = (p & g).flatten(-2).sum(-1).double()
    union = (p | g).flatten(-2).sum(-1).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union)).float()


def depth_error(pred_depth: torch.Tensor, gt_depth: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean |pred - gt| over the pixels of `mask` (..., H, W), in the depths' units; NaN where
    the mask is empty (no pixel to judge)."""
    if not pred_depth.shape == gt_depth.shape == mask.shape:
        raise ValueError(f"depth_error: shapes {tuple(pred_depth.shape)}, {tuple(gt_depth.shape)} and "
                         f"{tuple(mask.shape)} differ")
    m = mask.bool()
    err = torch.where(m, (pred_depth.double() - gt_depth.double()).abs(), 0.0).flatten(-2).sum(-1)
    n = m.flatten(-2).sum(-1)
    return torch.where(n > 0, err / n.clamp_min(1), math.nan).float()


def colour_error(pred_rgb: torch.Tensor, gt_rgb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Euclidean distance between the mean colours of pred and gt (..., C, H, W) over the pixels
    of `mask` (..., H, W): whether an object came out in its colour, whatever its shape. NaN where
    the mask is empty."""
    _check_pair(pred_rgb, gt_rgb, "colour_error")
    if mask.shape != pred_rgb.shape[:-3] + pred_rgb.shape[-2:]:
        raise ValueError(f"colour_error: mask of shape {tuple(mask.shape)} for images {tuple(pred_rgb.shape)}")
    m = mask.bool().unsqueeze(-3).double()
    n = m.flatten(-2).sum(-1)                                           # (..., 1)
    mean = lambda x: (x.double() * m).flatten(-2).sum(-1) / n.clamp_min(1)
    dist = (mean(pred_rgb) - mean(gt_rgb)).norm(dim=-1)
    return torch.where(n[..., 0] > 0, dist, math.nan).float()


def _check_pair(pred: torch.Tensor, target: torch.Tensor, name: str):
    if pred.shape != target.shape or pred.dim() < 3:
        raise ValueError(f"{name}: expected two (..., C, H, W) images of one shape, got "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}")
