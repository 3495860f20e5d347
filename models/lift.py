"""Geometric lifting of the encoder's views onto the triplane latent grid (not in the official model).

The official encoder fuses its V per-view maps by concatenating them on channels and a 3×3 conv,
so outside its mid attention view pixel (i, j) only reaches latent texel (i, j) and its
neighbours: where a box corner lands on the triplane has to be learnt. `ViewLift` instead places
K points along the normal of every latent texel of the three planes, projects each into every
view and reads there

- the view's feature map (bilinear) and its RGB,
- a truncated signed distance: the view's depth at that pixel minus the point's own camera depth,
  divided by `trunc` and clamped to [-1, 1] (+1 where the view sees background: free space),
- whether the point falls inside the view.

A small MLP embeds each (point, view) sample; the mean and the maximum over views are kept, the K
points of a texel are stacked on channels and a 3×3 conv per plane gives its latent, which the
encoder adds to the official fusion's.

Cameras come from the input itself, so nothing changes in the encoder's interface: the Plücker
channels [o × d, d] of a view give its centre o (least squares over its pixels) and the
homography H with [u, v, 1] ∝ H d, u and v being grid_sample's coordinates of the pixel centres
(a direct linear transform, exact for pinhole cameras). A point P then lands at H (P - o); the
third row of H is the camera's forward axis up to scale, which gives the point's camera depth.

Latent plane p is triplane p (models/triplane_decoder.py), so texel (row i, column j) of plane 0
sits at (x, y) = (u_j, v_i), of plane 1 at (y, z) and of plane 2 at (z, x), as
renderers/nerf.py `sample_triplane` reads them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.layout import NUM_PLANES


def pixel_centres(n: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """grid_sample (align_corners=False) coordinates of n pixel centres in [-1, 1]."""
    return (2 * torch.arange(n, dtype=dtype, device=device) + 1) / n - 1


def cameras_from_plucker(plucker_N6HW: torch.Tensor):
    """Centres o (N, 3) and homographies H (N, 3, 3) of pinhole views from their Plücker rays
    [o × d, d] (unit d), in float64. [u, v, w] = H (P - o) puts world point P at grid_sample
    coordinates (u/w, v/w), with w > 0 in front of the camera; H[2] is parallel to the optical axis."""
    N, _, Hh, Ww = plucker_N6HW.shape
    rays = plucker_N6HW.double().flatten(2).transpose(1, 2)                 # (N, HW, 6)
    scale = rays[..., 3:].norm(dim=-1, keepdim=True)
    m, d = rays[..., :3] / scale, rays[..., 3:] / scale
    # d × m = o - d (d·o) for unit d: sum_i (I - d_i d_i^T) o = sum_i d_i × m_i.
    eye = torch.eye(3, dtype=d.dtype, device=d.device)
    o = torch.linalg.solve((eye - d[..., :, None] * d[..., None, :]).sum(1), torch.cross(d, m, dim=-1).sum(1))
    # DLT: u (h3·d) - h1·d = 0 and v (h3·d) - h2·d = 0 for every pixel centre.
    v, u = torch.meshgrid(pixel_centres(Hh, d.dtype, d.device), pixel_centres(Ww, d.dtype, d.device), indexing="ij")
    u, v, z = u.reshape(1, -1, 1).expand(N, -1, 1), v.reshape(1, -1, 1).expand(N, -1, 1), torch.zeros_like(d)
    rows = torch.cat([torch.cat([-d, z, u * d], -1), torch.cat([z, -d, v * d], -1)], 1)   # (N, 2HW, 9)
    h = torch.linalg.eigh(rows.transpose(1, 2) @ rows)[1][..., 0].reshape(N, 3, 3)
    centre = d[:, (Hh // 2) * Ww + Ww // 2]
    sign = torch.sign((h[:, 2] * centre).sum(-1))
    return o, h * sign[:, None, None]


class ViewLift(nn.Module):
    """Per-view features -> latent planes, through the views' own cameras (module docstring)."""

    def __init__(self, feat_channels: int, out_per_plane: int, num_views: int, box_side: float, samples: int,
                 hidden: int = 32):
        super().__init__()
        self.num_views, self.box_side, self.samples, self.hidden = num_views, box_side, samples, hidden
        self.trunc = box_side / 8
        self.embed = nn.Sequential(nn.Linear(feat_channels + 3 + 2, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.out = nn.Conv2d(NUM_PLANES * samples * 2 * hidden, NUM_PLANES * out_per_plane, 3, padding=1,
                             groups=NUM_PLANES)

    def texel_points(self, s: int, device) -> torch.Tensor:
        """World points (3, s, s, K, 3): K along the normal of each texel of each s × s plane."""
        c, t = pixel_centres(s, device=device), pixel_centres(self.samples, device=device)
        rows, cols, depth = torch.meshgrid(c, c, t, indexing="ij")
        # Plane 0: (x, y) = (col, row), normal z; plane 1: (y, z), normal x; plane 2: (z, x), normal y.
        planes = [torch.stack([cols, rows, depth], -1), torch.stack([depth, cols, rows], -1),
                  torch.stack([rows, depth, cols], -1)]
        return torch.stack(planes) * (self.box_side / 2)

    def forward(self, x_NChw: torch.Tensor, feat_NChw: torch.Tensor, s: int) -> torch.Tensor:
        """Input views x (B·V, 10, H, W), their features (B·V, C, h', w') -> (B, 3·out_per_plane, s, s)."""
        N, V, P, K = x_NChw.shape[0], self.num_views, NUM_PLANES, self.samples
        B = N // V
        with torch.autocast(x_NChw.device.type, enabled=False):
            o, h = cameras_from_plucker(x_NChw[:, 3:9])
            pts = self.texel_points(s, x_NChw.device).reshape(1, -1, 3) - o[:, None]   # (N, 3·s·s·K, 3)
            q = pts @ h.transpose(1, 2)
            w = q[..., 2:]
            front = w > 1e-6
            uv = (q[..., :2] / w.clamp_min(1e-6)).float()
            cam_depth = (w / h[:, 2].norm(dim=-1)[:, None, None]).float()
        grid = uv[:, None]                                                     # (N, 1, M, 2)
        inside = (front & (uv.abs() <= 1).all(-1, keepdim=True)).float()
        feat = F.grid_sample(feat_NChw, grid.to(feat_NChw.dtype), align_corners=False)[:, :, 0].transpose(1, 2)
        rgb = F.grid_sample(x_NChw[:, :3], grid.to(x_NChw.dtype), align_corners=False)[:, :, 0].transpose(1, 2)
        seen = F.grid_sample(x_NChw[:, 9:10], grid.to(x_NChw.dtype), mode="nearest", align_corners=False)[:, 0, 0]
        tsdf = torch.where(seen[..., None] > 0, (seen[..., None] - cam_depth) / self.trunc, 1.0).clamp(-1, 1)
        e = self.embed(torch.cat([feat.float(), rgb.float(), tsdf * inside, inside], -1))   # (N, M, hidden)
        e = e.reshape(B, V, P, s, s, K * self.hidden)
        pooled = torch.cat([e.mean(1), e.amax(1)], -1)                         # (B, 3, s, s, 2·K·hidden)
        return self.out(pooled.permute(0, 1, 4, 2, 3).reshape(B, -1, s, s).to(feat_NChw.dtype))
