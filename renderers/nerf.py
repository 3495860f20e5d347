"""Triplane NeRF renderer of SAR3D: a point decoder plus EG3D-style importance volume rendering.

Units: world coordinates as in the official `c.npy` cameras; the object lives in the cube
[-box_side/2, box_side/2]^3 (box_side 0.9). Ray directions are unit vectors, so depths are
Euclidean distances from the camera centre (not camera z).

A triplane is (B, 3*C, H, W), plane-major: channels [C*p, C*(p+1)) hold plane p, and planes 0, 1
and 2 are indexed by the (x, y), (y, z) and (z, x) coordinates of a point (grid_sample's first
coordinate runs along the width).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.layout import as_planes
from utils.cameras import unpack_cameras


@dataclass
class NeRFConfig:
    """Defaults are the AR-time (inference) settings, 80 + 80 samples at 512^2; `vqvae_training()`
    gives the VQVAE training ones, 64 + 64 at 256^2 (official training renders 130^2 patches)."""
    box_side: float = 0.9         # cube side: ray bounds, sample filter, and plane coords p*2/box_side
    n_coarse: int = 80            # stratified samples per ray
    n_importance: int = 80        # importance samples per ray (0: coarse pass only)
    resolution: int = 512         # official image_size: inference renders 512^2
    white_background: bool = True
    deterministic: bool = False   # True: no stratified jitter, importance u = linspace(0, 1)
    chunk_rays: int | None = None  # rays per camera evaluated at once (None: all); bounds CPU memory
    feat_dim: int = 32            # channels per plane
    hidden_dim: int = 64

    @classmethod
    def vqvae_training(cls, **kw) -> "NeRFConfig":
        return cls(**{"n_coarse": 64, "n_importance": 64, "resolution": 256, **kw})


class PointDecoder(nn.Module):
    """Official `LRMOSGDecoder`: concatenated plane features (..., 3*C) -> MLP -> sigma, rgb."""

    def __init__(self, feat_dim: int = 32, hidden_dim: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3 * feat_dim, hidden_dim), nn.ReLU(),
                                 nn.Linear(hidden_dim, hidden_dim), nn.ReLU(),
                                 nn.Linear(hidden_dim, hidden_dim), nn.ReLU(),
                                 nn.Linear(hidden_dim, 4))
        # He initialisation (PyTorch's default shrinks activations ~2.4x per layer): with it, colour
        # starts to depend on the plane features within tens of steps instead of hundreds, which
        # decides whether a small VQVAE learns per-object colour at all (README, VQVAE training).
        for layer in self.net[::2]:
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def forward(self, feats: torch.Tensor):
        """feats (..., 3*C) -> raw density sigma (..., 1) and rgb (..., 3) in [-0.001, 1.001]."""
        out = self.net(feats).float()     # under a bf16 autocast, compositing stays in float32
        # The widened sigmoid (MipNeRF) lets colours reach exactly 0 and 1 with finite logits.
        return out[..., :1], torch.sigmoid(out[..., 1:]) * 1.002 - 0.001


def sample_triplane(planes_B3CHW: torch.Tensor, pts_BN3: torch.Tensor, box_side: float) -> torch.Tensor:
    """Bilinear plane features at world points: (B, 3, C, H, W), (B, N, 3) -> (B, N, 3*C)."""
    B, _, C, H, W = planes_B3CHW.shape
    p = pts_BN3 * (2.0 / box_side)          # the box maps onto grid_sample's [-1, 1]
    uv = torch.stack([p[..., [0, 1]], p[..., [1, 2]], p[..., [2, 0]]], 1)  # (B, 3, N, 2)
    f = F.grid_sample(planes_B3CHW.reshape(B * 3, C, H, W), uv.reshape(B * 3, 1, -1, 2).float(),
                      mode="bilinear", padding_mode="zeros", align_corners=False)  # (B*3, C, 1, N)
    return f.reshape(B, 3, C, -1).permute(0, 3, 1, 2).reshape(B, -1, 3 * C)


def camera_rays(c_B25: torch.Tensor, res: int):
    """Unit rays through pixel centres ((j+0.5)/res, (i+0.5)/res): origins, dirs (B, res*res, 3), row-major.

    Same rays as utils.cameras.pixel_rays, but with the official operation order (lift, rotate
    with bmm, subtract the centre, then normalise): samples placed exactly on the box faces are
    kept or dropped by the +-box/2 filter as in the official renderer only if rays agree bitwise."""
    c2w, fx, fy, cx, cy = (t.float() for t in unpack_cameras(c_B25))
    sk = c_B25[:, 17].float()[:, None]
    fx, fy, cx, cy = fx[:, None], fy[:, None], cx[:, None], cy[:, None]
    centres = torch.arange(res, dtype=torch.float32, device=c_B25.device) * (1.0 / res) + 0.5 / res
    y, x = (t.reshape(1, -1) for t in torch.meshgrid(centres, centres, indexing="ij"))
    x_cam = (x - cx + cy * sk / fy - sk * y / fy) / fx
    y_cam = (y - cy) / fy
    p = torch.stack([x_cam, y_cam, torch.ones_like(x_cam), torch.ones_like(x_cam)], 1)  # (B, 4, M)
    d = torch.bmm(c2w, p).transpose(1, 2)[..., :3] - c2w[:, None, :3, 3]
    return c2w[:, None, :3, 3].expand_as(d), F.normalize(d, dim=-1)


def ray_box_limits(o: torch.Tensor, d: torch.Tensor, box_side: float):
    """Slab intersection of rays (..., 3) with the centred cube: near, far (..., 1), and a hit mask (...).

    As the official 'auto' ray range, rays that miss get near = min and far = max of the hitting
    rays' *near* over the whole batch (sic): they are sampled like the others, then filtered out."""
    inv = 1.0 / d
    t0, t1 = (-box_side / 2 - o) * inv, (box_side / 2 - o) * inv
    near = torch.minimum(t0, t1).amax(-1, keepdim=True)
    far = torch.maximum(t0, t1).amin(-1, keepdim=True)
    hit = (far > near)[..., 0]
    near, far = torch.where(hit[..., None], near, -1.0), torch.where(hit[..., None], far, -2.0)
    if hit.any():
        near = torch.where(hit[..., None], near, near[hit].min())
        far = torch.where(hit[..., None], far, near[hit].max())
    return near, far, hit


def stratified_depths(near, far, n: int, jitter: bool, generator=None) -> torch.Tensor:
    """n depths per ray from near to far inclusive, (..., 1) -> (..., n); jitter adds U[0, step)."""
    steps = torch.arange(n, dtype=torch.float32, device=near.device) / (n - 1)
    z = near + steps * (far - near)
    if jitter:
        u = torch.rand(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        z = z + u * ((far - near) / (n - 1))
    return z


@torch.no_grad()
def importance_depths(z_R: torch.Tensor, w_R: torch.Tensor, n: int, deterministic: bool, generator=None):
    """EG3D/NeRF inverse-CDF sampling. z (R, S) coarse depths, w (R, S-1) coarse weights -> (R, n).

    The weights are smoothed (max-pool then avg-pool over neighbours, + 0.01 so empty rays still
    spread samples); as in the official code, bins are coarse midpoints and the last is never used."""
    w = F.max_pool1d(w_R[:, None], 2, 1, padding=1)
    w = F.avg_pool1d(w, 2, 1)[:, 0] + 0.01
    bins, w = 0.5 * (z_R[:, :-1] + z_R[:, 1:]), w[:, 1:-1]
    R, nb = w.shape
    w = w + 1e-5                                   # no division by zero in the pdf
    cdf = torch.cumsum(w / w.sum(-1, keepdim=True), -1)
    cdf = torch.cat([torch.zeros_like(cdf[:, :1]), cdf], -1)
    if deterministic:
        u = torch.linspace(0, 1, n, device=z_R.device).expand(R, n).contiguous()
    else:
        u = torch.rand(R, n, generator=generator, device=z_R.device)
    idx = torch.searchsorted(cdf, u, right=True)
    lo, hi = (idx - 1).clamp_min(0), idx.clamp_max(nb)
    c_lo, c_hi = cdf.gather(1, lo), cdf.gather(1, hi)
    b_lo, b_hi = bins.gather(1, lo), bins.gather(1, hi)
    denom = c_hi - c_lo
    denom = torch.where(denom < 1e-5, torch.ones_like(denom), denom)  # empty bin: never drawn anyway
    return b_lo + (u - c_lo) / denom * (b_hi - b_lo)


def composite(rgb, sigma, z, white_background: bool = True):
    """MipRayMarcher2 over sorted samples: rgb (..., S, 3), sigma (..., S, 1), z (..., S, 1).

    Intervals take midpoint colours and densities; density is softplus(sigma - 1). Returns rgb
    (..., 3) in [-1, 1], unnormalised depth sum(w * z_mid) (..., 1) (unclamped), weights (..., S-1, 1)."""
    delta = z[..., 1:, :] - z[..., :-1, :]
    rgb_mid = (rgb[..., :-1, :] + rgb[..., 1:, :]) / 2
    # The -1 activation bias is the official (EG3D) choice: near-zero density at initialisation.
    density = F.softplus((sigma[..., :-1, :] + sigma[..., 1:, :]) / 2 - 1)
    z_mid = (z[..., :-1, :] + z[..., 1:, :]) / 2
    alpha = 1 - torch.exp(-density * delta)
    trans = torch.cumprod(torch.cat([torch.ones_like(alpha[..., :1, :]), 1 - alpha + 1e-10], -2), -2)
    w = alpha * trans[..., :-1, :]
    out_rgb, depth = (w * rgb_mid).sum(-2), (w * z_mid).sum(-2)
    if white_background:
        out_rgb = out_rgb + 1 - w.sum(-2)
    return out_rgb * 2 - 1, depth, w


class NeRFRenderer(nn.Module):
    """Renders triplanes from c.npy cameras. Parameters: `decoder.net.{0,2,4,6}.{weight,bias}`,
    the official `decoder.triplane_decoder.decoder.*` keys without the `decoder.triplane_decoder.` prefix."""

    def __init__(self, cfg: NeRFConfig | None = None):
        super().__init__()
        self.cfg = cfg or NeRFConfig()
        self.decoder = PointDecoder(self.cfg.feat_dim, self.cfg.hidden_dim)

    def query(self, planes_B3CHW, pts_BN3):
        """Density and colour at points (B, N, 3): sigma (B, N, 1), rgb (B, N, 3). Points outside the
        cube get rgb 0 and sigma -FLT_MAX/3 (softplus -> 0; /3 keeps midpoint sums finite)."""
        sigma, rgb = self.decoder(sample_triplane(planes_B3CHW, pts_BN3, self.cfg.box_side))
        half = self.cfg.box_side / 2
        inside = ((pts_BN3 >= -half) & (pts_BN3 <= half)).all(-1, keepdim=True)
        empty = torch.finfo(sigma.dtype).max / -3
        return torch.where(inside, sigma, empty), torch.where(inside, rgb, 0.0)

    def _render_rays(self, planes, o, d, near, far, det, gen, keep_coords):
        """One chunk: o, d (B, R, 3), near/far (B, R, 1) -> rgb, depth (unclamped), opacity,
        min and max sample depth, sorted sample points (B, R, S, 3) or None."""
        cfg, (B, R, _) = self.cfg, o.shape
        z = stratified_depths(near, far, cfg.n_coarse, not det, gen)[..., None]  # (B, R, S, 1)
        pts = o[:, :, None] + z * d[:, :, None]
        sigma, rgb = (t.reshape(B, R, cfg.n_coarse, -1) for t in self.query(planes, pts.reshape(B, -1, 3)))
        if cfg.n_importance > 0:
            with torch.no_grad():
                _, _, w = composite(rgb, sigma, z, cfg.white_background)
            z_f = importance_depths(z.reshape(B * R, -1), w.reshape(B * R, -1), cfg.n_importance, det, gen)
            z_f = z_f.reshape(B, R, -1, 1)
            pts_f = o[:, :, None] + z_f * d[:, :, None]
            sig_f, rgb_f = (t.reshape(B, R, cfg.n_importance, -1)
                            for t in self.query(planes, pts_f.reshape(B, -1, 3)))
            z, order = torch.sort(torch.cat([z, z_f], -2), -2)
            pick = lambda t: torch.cat(t, -2).gather(-2, order.expand(-1, -1, -1, t[0].shape[-1]))
            sigma, rgb, pts = pick((sigma, sig_f)), pick((rgb, rgb_f)), pick((pts, pts_f))
        out_rgb, depth, w = composite(rgb, sigma, z, cfg.white_background)
        return out_rgb, depth, w.sum(-2), z.min(), z.max(), pts if keep_coords else None

    def forward(self, planes: torch.Tensor, c: torch.Tensor, resolution: int | None = None,
                deterministic: bool | None = None, return_coords: bool = False,
                generator: torch.Generator | None = None, pixels: torch.Tensor | None = None) -> dict:
        """planes (B or 1, 3*C, Hp, Wp); c (B, 25) c.npy camera rows. Renders H = W = resolution,
        or with `pixels` (B, R) (row-major indices into the resolution^2 image) only those rays, as
        1 x R images (random-ray supervision).

        Returns image_raw (B, 3, H, W) in [-1, 1]; image_depth (B, 1, H, W), sum(w * z) in world
        units, not divided by the opacity (background pixels -> 0, then clamped to the min/max of
        all depth samples in the whole batch); weights_samples (B, 1, H, W), the opacity sum(w);
        image_mask = opacity * 1.002 - 0.001 (official); with return_coords, all_coords
        (B, H*W, n_coarse + n_importance, 3), the depth-sorted sample points."""
        cfg = self.cfg
        res = resolution or cfg.resolution
        det = cfg.deterministic if deterministic is None else deterministic
        B = c.shape[0]
        planes = as_planes(planes).expand(B, -1, -1, -1, -1)
        o, d = camera_rays(c.to(planes.device), res)
        if pixels is not None:
            pick = pixels.to(o.device)[..., None].expand(-1, -1, 3)
            o, d = o.gather(1, pick), d.gather(1, pick)
        n_rays, (h, w) = o.shape[1], (res, res) if pixels is None else (1, pixels.shape[1])
        # Ray ranges and the depth clamp are batch-wide in the official code, so they are computed
        # outside the chunks: chunking then changes nothing.
        near, far, _ = ray_box_limits(o, d, cfg.box_side)
        step = cfg.chunk_rays or n_rays
        chunks = [self._render_rays(planes, o[:, i:i + step], d[:, i:i + step], near[:, i:i + step],
                                    far[:, i:i + step], det, generator, return_coords)
                  for i in range(0, n_rays, step)]
        rgb, depth, wsum = (torch.cat([ch[k] for ch in chunks], 1) for k in range(3))
        z_lo, z_hi = torch.stack([ch[3] for ch in chunks]).min(), torch.stack([ch[4] for ch in chunks]).max()
        depth = torch.clamp(torch.nan_to_num(depth, float("inf")), z_lo, z_hi)
        img = lambda t: t.permute(0, 2, 1).reshape(B, -1, h, w)
        out = {"image_raw": img(rgb), "image_depth": img(depth), "weights_samples": img(wsum),
               "image_mask": img(wsum) * 1.002 - 0.001}
        if return_coords:
            out["all_coords"] = torch.cat([ch[5] for ch in chunks], 1)
        return out
