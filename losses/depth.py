"""Scale-and-shift-invariant depth loss (MiDaS, Ranftl et al.), as the official VQVAE uses it.

Rendered depth (Σ w·t, not normalised by opacity) and the ground truth differ by an unknown
affine map near silhouettes and in scale, so the prediction is first aligned to the target by
the least-squares scale and shift over the masked pixels of each image; the loss is the MSE of
the aligned prediction plus `alpha` times a multi-scale gradient-matching term.
"""
from __future__ import annotations

import torch


def align_scale_shift(pred_BHW: torch.Tensor, target_BHW: torch.Tensor, mask_BHW: torch.Tensor) -> torch.Tensor:
    """s·pred + t with (s, t) minimising Σ mask·(s·pred + t − target)² per image; images whose
    normal equations are singular (fewer than 2 distinct masked values) keep s = t = 0."""
    m = mask_BHW.float()
    a00 = (m * pred_BHW * pred_BHW).sum((1, 2))
    a01 = (m * pred_BHW).sum((1, 2))
    a11 = m.sum((1, 2))
    b0 = (m * pred_BHW * target_BHW).sum((1, 2))
    b1 = (m * target_BHW).sum((1, 2))
    det = a00 * a11 - a01 * a01
    ok = det.abs() > 1e-12
    safe = torch.where(ok, det, torch.ones_like(det))
    s = torch.where(ok, (a11 * b0 - a01 * b1) / safe, torch.zeros_like(det))
    t = torch.where(ok, (a00 * b1 - a01 * b0) / safe, torch.zeros_like(det))
    return s[:, None, None] * pred_BHW + t[:, None, None]


def _gradient_term(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    diff = mask * (pred - target)
    gx = (diff[:, :, 1:] - diff[:, :, :-1]).abs() * (mask[:, :, 1:] * mask[:, :, :-1])
    gy = (diff[:, 1:] - diff[:, :-1]).abs() * (mask[:, 1:] * mask[:, :-1])
    return (gx.sum() + gy.sum()) / mask.sum().clamp_min(1.0)


def scale_shift_invariant_loss(pred_BHW: torch.Tensor, target_BHW: torch.Tensor, mask_BHW: torch.Tensor,
                               alpha: float = 0.5, scales: int = 4) -> torch.Tensor:
    """MiDaS loss, batch-reduced: Σ mask·(aligned − target)² / (2 Σ mask) + alpha · Σ over
    `scales` dyadic subsamplings of the masked gradient difference."""
    m = mask_BHW.float()
    aligned = align_scale_shift(pred_BHW, target_BHW, m)
    data = (m * (aligned - target_BHW) ** 2).sum() / (2 * m.sum()).clamp_min(1.0)
    if alpha == 0:
        return data
    reg = sum(_gradient_term(aligned[:, ::2 ** k, ::2 ** k], target_BHW[:, ::2 ** k, ::2 ** k],
                             m[:, ::2 ** k, ::2 ** k]) for k in range(scales))
    return data + alpha * reg
