"""Camera conventions shared by the dataset writers, the readers and the renderers.

World frame: +z up (the G-buffer layout). Cameras are OpenCV-style: +x right, +y down, +z
forward. A camera is stored as in the official `c.npy`: a row of 25 floats, the row-major 4x4
camera-to-world matrix followed by the row-major 3x3 intrinsics normalised by the image size
(fx/W, 0, cx/W, 0, fy/H, cy/H, 0, 0, 1).
"""
from __future__ import annotations

import math

import numpy as np
import torch

# The official G-buffer intrinsics: focal 1422.222 px at 1024 px (field of view 39.6 degrees).
OFFICIAL_FOCAL = 1422.222 / 1024.0


def look_at(eye: np.ndarray, target=(0.0, 0.0, 0.0), up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """OpenCV camera-to-world (4, 4) float64 for a camera at `eye` looking at `target`."""
    eye = np.asarray(eye, np.float64)
    forward = np.asarray(target, np.float64) - eye
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, np.asarray(up, np.float64))
    if np.linalg.norm(right) < 1e-8:  # looking straight along `up`
        right = np.cross(forward, np.array([0.0, 1.0, 0.0]))
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, down, forward, eye
    return c2w


def orbit_c2w(azimuth_deg: float, elevation_deg: float, radius: float) -> np.ndarray:
    """Camera on a sphere of `radius` around the origin, azimuth from +x towards +y."""
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    eye = radius * np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
    return look_at(eye)


def normalized_intrinsics(focal: float = OFFICIAL_FOCAL, cx: float = 0.5, cy: float = 0.5) -> np.ndarray:
    return np.array([[focal, 0.0, cx], [0.0, focal, cy], [0.0, 0.0, 1.0]])


def pack_cameras(c2w_V44: np.ndarray, K_33: np.ndarray) -> np.ndarray:
    """(V, 4, 4) camera-to-world and one (3, 3) normalised K -> (V, 25) float32, as c.npy."""
    V = c2w_V44.shape[0]
    return np.concatenate([c2w_V44.reshape(V, 16), np.tile(K_33.reshape(1, 9), (V, 1))], 1).astype(np.float32)


def unpack_cameras(c_V25):
    """(V, 25) -> (c2w (V, 4, 4), fx, fy, cx, cy each (V,)), intrinsics normalised by image size."""
    c2w = c_V25[:, :16].reshape(-1, 4, 4)
    K = c_V25[:, 16:]
    return c2w, K[:, 0], K[:, 4], K[:, 2], K[:, 5]


def pixel_rays(c_V25: torch.Tensor, H: int, W: int):
    """Unit rays through pixel centres, as the official loader builds them.

    c_V25: (V, 25). Returns origins and directions, both (V, H, W, 3), in world space.
    """
    c2w, fx, fy, cx, cy = unpack_cameras(c_V25.float())
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32) + 0.5,
                            torch.arange(W, dtype=torch.float32) + 0.5, indexing="ij")
    x = (xs / W - cx[:, None, None]) / fx[:, None, None]
    y = (ys / H - cy[:, None, None]) / fy[:, None, None]
    d_cam = torch.stack([x, y, torch.ones_like(x)], -1)
    d_cam = d_cam / d_cam.norm(dim=-1, keepdim=True)
    dirs = torch.einsum("vij,vhwj->vhwi", c2w[:, :3, :3], d_cam)
    origins = c2w[:, None, None, :3, 3].expand_as(dirs)
    return origins, dirs


def plucker_rays(c_V25: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Plucker coordinates [o x d, d] (moment first), (V, 6, H, W)."""
    o, d = pixel_rays(c_V25, H, W)
    return torch.cat([torch.cross(o, d, dim=-1), d], -1).permute(0, 3, 1, 2).contiguous()


def unproject_depth(depth_HW: np.ndarray, c_25: np.ndarray) -> np.ndarray:
    """Camera-z depth map (H, W) -> world points (H, W, 3) through pixel centres."""
    H, W = depth_HW.shape
    c2w, fx, fy, cx, cy = unpack_cameras(np.asarray(c_25, np.float64)[None])
    ys, xs = np.meshgrid(np.arange(H) + 0.5, np.arange(W) + 0.5, indexing="ij")
    p_cam = np.stack([(xs / W - cx[0]) / fx[0] * depth_HW, (ys / H - cy[0]) / fy[0] * depth_HW, depth_HW], -1)
    return p_cam @ c2w[0, :3, :3].T + c2w[0, :3, 3]


def crop_cameras(c_V25: torch.Tensor, x0: torch.Tensor, y0: torch.Tensor, size: int, res: int) -> torch.Tensor:
    """Cameras that see exactly the size x size pixel window at (x0, y0) of a res x res image.

    Rendering the returned cameras at `size` gives the same rays as pixels [y0, y0+size) x
    [x0, x0+size) of the full render at `res` (zero skew, as all our cameras have), so patch
    training needs no special path in the renderers. x0, y0: (V,) pixel offsets.
    """
    out = c_V25.clone()
    zoom = res / size
    out[:, 16] = c_V25[:, 16] * zoom                                    # fx
    out[:, 20] = c_V25[:, 20] * zoom                                    # fy
    out[:, 18] = (c_V25[:, 18] - x0.to(c_V25) / res) * zoom            # cx
    out[:, 21] = (c_V25[:, 21] - y0.to(c_V25) / res) * zoom            # cy
    return out
