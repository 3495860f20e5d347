"""Image metrics against hand-computed values and a direct float64 recomputation of SSIM."""
import math

import numpy as np
import pytest
import torch

from evaluation.image import colour_error, depth_error, gaussian_window, mask_iou, psnr, ssim


def test_psnr_values():
    x = torch.rand(2, 4, 3, 8, 8)
    assert torch.isinf(psnr(x, x)).all() and psnr(x, x).shape == (2, 4)
    y = x.clone()
    y[0, 0] += 0.1                                     # MSE 0.01 -> 20 dB
    assert psnr(y, x)[0, 0].item() == pytest.approx(20.0, abs=1e-4)
    assert psnr(y * 255, x * 255, data_range=255.0)[0, 0].item() == pytest.approx(20.0, abs=1e-4)
    with pytest.raises(ValueError, match="psnr"):
        psnr(x, x[..., 1:])


def test_ssim_identical_and_constant_images():
    x = torch.rand(3, 3, 16, 16)
    np.testing.assert_allclose(ssim(x, x).numpy(), 1.0, atol=1e-6)
    # Constant images a and b: all variances vanish, SSIM = (2ab + C1) / (a^2 + b^2 + C1) by hand.
    a, b = torch.full((1, 1, 12, 12), 0.5), torch.full((1, 1, 12, 12), 0.25)
    c1 = 0.01 ** 2
    assert ssim(a, b).item() == pytest.approx((2 * 0.5 * 0.25 + c1) / (0.25 + 0.0625 + c1), rel=1e-6)
    assert ssim(a, b).item() == pytest.approx(0.800064, abs=1e-6)


def direct_ssim(x: np.ndarray, y: np.ndarray, size=11, sigma=1.5) -> float:
    """SSIM of (C, H, W) float64 images, window by window, straight from Wang et al. 2004."""
    ax = np.arange(size) - (size - 1) / 2
    g1 = np.exp(-ax ** 2 / (2 * sigma ** 2))
    w = np.outer(g1, g1) / np.outer(g1, g1).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    vals = []
    C, H, W = x.shape
    for c in range(C):
        for i in range(H - size + 1):
            for j in range(W - size + 1):
                px, py = x[c, i:i + size, j:j + size], y[c, i:i + size, j:j + size]
                mx, my = (w * px).sum(), (w * py).sum()
                vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
                cov = (w * (px - mx) * (py - my)).sum()
                vals.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 14, 13, generator=g, dtype=torch.float64)
    y = (x + 0.2 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    got = ssim(x, y)
    assert got.shape == (2,) and got.dtype == torch.float64
    for k in range(2):
        assert got[k].item() == pytest.approx(direct_ssim(x[k].numpy(), y[k].numpy()), abs=1e-12)
    assert ssim(y, x).numpy() == pytest.approx(got.numpy(), abs=1e-12)     # symmetric


def test_ssim_window_and_small_images():
    w = gaussian_window()
    assert w.shape == (11,) and w.sum().item() == pytest.approx(1.0) and w.argmax().item() == 5
    with pytest.raises(ValueError, match="smaller than the 11x11 window"):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


def test_mask_iou():
    p = torch.zeros(2, 4, 4, dtype=torch.bool)
    g = torch.zeros(2, 4, 4, dtype=torch.bool)
    p[0, :2, :2] = True                                # 4 pixels
    g[0, :2, 1:3] = True                               # 4 pixels, 2 shared -> 2 / 6
    iou = mask_iou(p, g)
    assert iou[0].item() == pytest.approx(2 / 6) and iou[1].item() == 1.0   # both empty: agree
    assert mask_iou(g, g)[0].item() == 1.0


def test_depth_error():
    gt = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    pred = torch.tensor([[[1.5, 2.0], [2.0, 100.0]]])
    mask = torch.tensor([[[True, True], [True, False]]])
    assert depth_error(pred, gt, mask).item() == pytest.approx((0.5 + 0 + 1) / 3)
    assert math.isnan(depth_error(pred, gt, torch.zeros_like(mask)).item())
    with pytest.raises(ValueError, match="depth_error"):
        depth_error(pred, gt, mask[..., :1])


def test_colour_error():
    gt = torch.zeros(2, 3, 2, 2)
    gt[:, 0] = 1.0                                     # red everywhere
    pred = gt.clone()
    pred[0, :, 0, 0] = torch.tensor([0.0, 0.0, 1.0])   # one blue pixel, one outside the mask
    pred[0, :, 1, 1] = torch.tensor([0.0, 1.0, 0.0])
    mask = torch.ones(2, 2, 2, dtype=torch.bool)
    mask[:, 1, 1] = False
    err = colour_error(pred, gt, mask)
    assert err[0].item() == pytest.approx(math.dist((2 / 3, 0, 1 / 3), (1, 0, 0))) and err[1].item() == 0
    assert math.isnan(colour_error(pred, gt, torch.zeros_like(mask))[0].item())
    with pytest.raises(ValueError, match="colour_error"):
        colour_error(pred, gt, mask[:, :1])
