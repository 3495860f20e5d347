"""Triangle rasterization through calibrated pinhole cameras.

Two backends produce the same fragments: a pure-PyTorch z-buffer rasterizer that runs anywhere
(the CPU path the tests use) and nvdiffrast, imported only when asked for on CUDA. Pixel (i, j)
samples the ray through its centre ((j + 0.5) / W, (i + 0.5) / H) in normalised image
coordinates, as the official ray sampler does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from utils.cameras import unpack_cameras

_NO_HIT = torch.iinfo(torch.int64).max


@dataclass
class Fragments:
    """Per-pixel result: `tri_id` (H, W) int64, -1 where nothing is hit; `bary` (H, W, 3)
    perspective-correct barycentrics of the hit triangle; `depth` (H, W) camera z, 0 where empty."""
    tri_id: torch.Tensor
    bary: torch.Tensor
    depth: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        return self.tri_id >= 0


def world_to_camera(verts_N3: torch.Tensor, c_25: torch.Tensor) -> torch.Tensor:
    c2w = unpack_cameras(c_25[None].double())[0][0]
    R, t = c2w[:3, :3], c2w[:3, 3]
    return (verts_N3.double() - t) @ R


def rasterize(verts_N3: torch.Tensor, faces_F3: torch.Tensor, c_25: torch.Tensor, H: int, W: int,
              backend: str = "auto") -> Fragments:
    """Rasterize a world-space triangle mesh seen by the camera `c_25` (a c.npy row).

    backend: "torch", "nvdiffrast", or "auto" (nvdiffrast when the mesh is on CUDA and the
    package imports, else torch).
    """
    if backend not in ("auto", "torch", "nvdiffrast"):
        raise ValueError(f"unknown rasterizer backend {backend!r}: use auto, torch or nvdiffrast")
    if backend == "auto":
        backend = "nvdiffrast" if verts_N3.is_cuda and _nvdiffrast() is not None else "torch"
    v_cam = world_to_camera(verts_N3, c_25.to(verts_N3.device))
    _, fx, fy, cx, cy = unpack_cameras(c_25[None].double())
    intr = (float(fx[0]), float(fy[0]), float(cx[0]), float(cy[0]))
    if backend == "nvdiffrast":
        return _rasterize_nvdiffrast(v_cam, faces_F3, H, W, *intr)
    return _rasterize_torch(v_cam, faces_F3, H, W, *intr)


def _screen(v_cam, H, W, fx, fy, cx, cy):
    z = v_cam[:, 2]
    return (fx * v_cam[:, 0] / z + cx) * W, (fy * v_cam[:, 1] / z + cy) * H, z


def _edge_weights(px, py, x, y):
    """Screen-space barycentrics of points (px, py) in triangles with corners x, y (..., 3)."""
    area = (x[..., 1] - x[..., 0]) * (y[..., 2] - y[..., 0]) - (x[..., 2] - x[..., 0]) * (y[..., 1] - y[..., 0])
    l0 = ((x[..., 1] - px) * (y[..., 2] - py) - (x[..., 2] - px) * (y[..., 1] - py)) / area
    l1 = ((x[..., 2] - px) * (y[..., 0] - py) - (x[..., 0] - px) * (y[..., 2] - py)) / area
    return torch.stack([l0, l1, 1.0 - l0 - l1], -1)


def _rasterize_torch(v_cam, faces, H, W, fx, fy, cx, cy, near=1e-4, max_candidates=1 << 22):
    device = v_cam.device
    sx, sy, z = _screen(v_cam, H, W, fx, fy, cx, cy)
    faces = faces.long()
    tx, ty, tz = sx[faces], sy[faces], z[faces]                           # (F, 3) each
    area = (tx[:, 1] - tx[:, 0]) * (ty[:, 2] - ty[:, 0]) - (tx[:, 2] - tx[:, 0]) * (ty[:, 1] - ty[:, 0])
    # Pixel j covers centre j + 0.5: the centres inside [min, max] are ceil(min - .5) .. floor(max - .5).
    x0 = torch.ceil(tx.min(1).values - 0.5).clamp(0, W - 1).long()
    x1 = torch.floor(tx.max(1).values - 0.5).clamp(-1, W - 1).long()
    y0 = torch.ceil(ty.min(1).values - 0.5).clamp(0, H - 1).long()
    y1 = torch.floor(ty.max(1).values - 0.5).clamp(-1, H - 1).long()
    bw, bh = (x1 - x0 + 1).clamp(min=0), (y1 - y0 + 1).clamp(min=0)
    keep = ((tz > near).all(1) & (area.abs() > 1e-12) & (bw > 0) & (bh > 0)).nonzero()[:, 0]
    counts = bw[keep] * bh[keep]

    best = torch.full((H * W,), _NO_HIT, dtype=torch.int64, device=device)
    ends = torch.cumsum(counts, 0)
    start = 0
    while start < len(keep):
        # Take triangles until the candidate pixels reach max_candidates (at least one triangle).
        limit = (ends[start - 1] if start else 0) + max_candidates
        stop = max(start + 1, int(torch.searchsorted(ends, limit, right=True)))
        tri = keep[start:stop]
        cnt = counts[start:stop]
        owner = torch.repeat_interleave(torch.arange(len(tri), device=device), cnt)
        offset = torch.arange(int(cnt.sum()), device=device) - torch.repeat_interleave(torch.cumsum(cnt, 0) - cnt, cnt)
        t = tri[owner]
        px = x0[t] + offset % bw[t]
        py = y0[t] + torch.div(offset, bw[t], rounding_mode="floor")
        lam = _edge_weights(px.double() + 0.5, py.double() + 0.5, tx[t], ty[t])
        inside = (lam >= -1e-9).all(-1)
        lam, t, px, py = lam[inside], t[inside], px[inside], py[inside]
        depth = 1.0 / (lam / tz[t]).sum(-1)
        # One int64 key per fragment orders by depth, then by triangle id: a deterministic z-test.
        key = (depth.float().view(torch.int32).long() << 32) | t
        best.scatter_reduce_(0, py * W + px, key, "amin")
        start = stop

    hit = best != _NO_HIT
    tri_id = torch.where(hit, best & 0xFFFFFFFF, torch.full_like(best, -1))
    pix = hit.nonzero()[:, 0]
    t = tri_id[pix]
    lam = _edge_weights((pix % W).double() + 0.5, torch.div(pix, W, rounding_mode="floor").double() + 0.5, tx[t], ty[t])
    persp = lam / tz[t]
    bary = torch.zeros(H * W, 3, dtype=torch.float32, device=device)
    bary[pix] = (persp / persp.sum(-1, keepdim=True)).float()
    depth = torch.zeros(H * W, dtype=torch.float32, device=device)
    depth[pix] = (1.0 / persp.sum(-1)).float()
    return Fragments(tri_id.view(H, W), bary.view(H, W, 3), depth.view(H, W))


def _nvdiffrast():
    try:
        import nvdiffrast.torch as dr
    except ImportError:
        return None
    return dr


_NV_CONTEXT = {}


def _rasterize_nvdiffrast(v_cam, faces, H, W, fx, fy, cx, cy, near=1e-3, far=100.0):
    dr = _nvdiffrast()
    if dr is None:
        raise RuntimeError("backend 'nvdiffrast' needs the nvdiffrast package (pip install "
                           "git+https://github.com/NVlabs/nvdiffrast); use backend='torch' without it")
    if not v_cam.is_cuda:
        raise RuntimeError("backend 'nvdiffrast' needs the mesh on a CUDA device")
    device = v_cam.device
    if device not in _NV_CONTEXT:
        _NV_CONTEXT[device] = dr.RasterizeCudaContext(device=device)
    z = v_cam[:, 2]
    # Clip space whose NDC y = -1 is image row 0, matching the row order of the torch backend.
    clip = torch.stack([2 * fx * v_cam[:, 0] + (2 * cx - 1) * z,
                        2 * fy * v_cam[:, 1] + (2 * cy - 1) * z,
                        ((far + near) * z - 2 * far * near) / (far - near), z], -1).float()
    rast, _ = dr.rasterize(_NV_CONTEXT[device], clip[None].contiguous(), faces.int().contiguous(), (H, W))
    u, v, tri = rast[0, ..., 0], rast[0, ..., 1], rast[0, ..., 3].long() - 1
    bary = torch.stack([u, v, 1 - u - v], -1)
    hit = tri >= 0
    zt = z.float()[faces.long()[tri.clamp(min=0)]]                       # (H, W, 3)
    depth = torch.where(hit, (bary * zt).sum(-1), torch.zeros_like(u))
    return Fragments(tri, torch.where(hit[..., None], bary, torch.zeros_like(bary)), depth)
