"""Shaded G-buffer renders of a coloured triangle mesh: RGB on white, alpha, depth, normals.

Lighting is fixed in the world (two directional lights and an ambient term), so every view
sees the same Lambertian colours, which is what a NeRF without view dependence can fit. Meshes
whose colours already hold that lighting (those extracted from a trained triplane) are drawn
unlit (shading="unlit"), so that they look as the volume render of the triplane does.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from renderers.rasterizer import rasterize
from utils.cameras import pixel_rays

_LIGHTS = ((np.array([0.3, 0.2, 1.0]), 0.45), (np.array([-0.7, -0.5, 0.3]), 0.2))
_AMBIENT = 0.45
SHADINGS = ("lit", "unlit")


@dataclass
class ColoredMesh:
    """A triangle mesh with per-vertex colours and optional textures.

    verts (N, 3), faces (F, 3) int, colors (N, 3) in [0, 1]. Optional: normals (N, 3) (area-
    weighted face normals when absent), uv (N, 2) with face_texture (F,) int indexing `textures`
    ((Ht, Wt, 3) in [0, 1], multiplied with the vertex colour; -1 for an untextured face).
    """
    verts: np.ndarray
    faces: np.ndarray
    colors: np.ndarray
    normals: np.ndarray | None = None
    uv: np.ndarray | None = None
    face_texture: np.ndarray | None = None
    textures: list = field(default_factory=list)

    def vertex_normals(self) -> np.ndarray:
        if self.normals is not None:
            return self.normals
        v = self.verts[self.faces]
        fn = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])           # area-weighted
        n = np.zeros_like(self.verts, dtype=np.float64)
        for k in range(3):
            np.add.at(n, self.faces[:, k], fn)
        return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)


def sample_surface(verts_N3: np.ndarray, faces_F3: np.ndarray, n: int, rng) -> tuple:
    """n points uniform over the surface area -> (points (n, 3), unit face normals (n, 3))."""
    v = verts_N3[faces_F3]
    cross = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    area = np.linalg.norm(cross, axis=1)
    tri = rng.choice(len(area), n, p=area / area.sum())
    s1, r2 = np.sqrt(rng.random(n)), rng.random(n)
    pts = (1 - s1)[:, None] * v[tri, 0] + (s1 * (1 - r2))[:, None] * v[tri, 1] + (s1 * r2)[:, None] * v[tri, 2]
    return pts, cross[tri] / area[tri, None]


def _interp(attr_N_C: torch.Tensor, faces: torch.Tensor, tri: torch.Tensor, bary: torch.Tensor):
    return (attr_N_C[faces[tri]] * bary[..., None]).sum(-2)


def _shade_colors(mesh: ColoredMesh, tensors, tri, bary):
    colors = _interp(tensors["colors"], tensors["faces"], tri, bary)
    if mesh.uv is None or not mesh.textures:
        return colors
    uv = _interp(tensors["uv"], tensors["faces"], tri, bary)
    tex_id = tensors["face_texture"][tri]
    for k, tex in enumerate(tensors["textures"]):
        sel = tex_id == k
        if sel.any():
            # uv origin at the bottom-left of the image (glTF after trimesh's flip, OBJ); the
            # texture repeats outside [0, 1], as glTF's default sampler and OBJ tiling do.
            tiled = uv[sel] - uv[sel].floor()
            grid = torch.stack([tiled[:, 0] * 2 - 1, 1 - tiled[:, 1] * 2], -1).view(1, -1, 1, 2)
            texel = F.grid_sample(tex.permute(2, 0, 1)[None], grid.float(), mode="bilinear",
                                  padding_mode="border", align_corners=False)[0, :, :, 0].T
            colors[sel] = colors[sel] * texel
    return colors


@contextmanager
def intra_op_threads(n: int | None):
    """Inside the block, torch runs CPU operations on n threads (None: as set); restored after.
    The setting is process-wide, so other Python threads see it while the block runs."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def render_views(mesh: ColoredMesh, c_V25: np.ndarray, res: int, ssaa: int = 3, backend: str = "auto",
                 device: str = "cpu", shading: str = "lit", progress: bool | None = False,
                 threads: int | None = None) -> dict:
    """Render each camera of `c_V25` (V, 25) at res x res.

    RGB and alpha are averaged over ssaa x ssaa samples per pixel (ssaa odd); depth and normal
    are taken at the pixel centre sample, so depth is exact along the pixel's centre ray.
    shading: "lit" multiplies the colours by the fixed world lights (module docstring); "unlit"
    draws the colours as they are. progress: a tqdm bar over the views (None: on a terminal).
    threads: torch's CPU threads while rendering on the CPU (None: as set). Rendering is many
    operations on tensors of at most a few hundred thousand elements, which gain little from more
    threads and lose much when other processes share the cores (measured on 2 cores: 2 threads
    were 1.4x faster than 1 when idle, 10x slower when busy).
    Returns float32 numpy arrays: rgb (V, res, res, 3) in [0, 1] composited on white, alpha
    (V, res, res), depth (V, res, res) camera z with 0 where the centre ray misses, normal
    (V, res, res, 3) world-space unit normals facing the camera (0 where empty).
    """
    if ssaa < 1 or ssaa % 2 == 0:
        raise ValueError(f"ssaa must be an odd positive integer, got {ssaa}")
    if shading not in SHADINGS:
        raise ValueError(f"unknown shading {shading!r}: use {' or '.join(SHADINGS)}")
    t = {
        "verts": torch.as_tensor(mesh.verts, dtype=torch.float32, device=device),
        "faces": torch.as_tensor(mesh.faces, dtype=torch.int64, device=device),
        "colors": torch.as_tensor(mesh.colors, dtype=torch.float32, device=device),
        "normals": torch.as_tensor(mesh.vertex_normals(), dtype=torch.float32, device=device),
    }
    if mesh.uv is not None and mesh.textures:
        t["uv"] = torch.as_tensor(mesh.uv, dtype=torch.float32, device=device)
        t["face_texture"] = torch.as_tensor(mesh.face_texture, dtype=torch.int64, device=device)
        t["textures"] = [torch.as_tensor(x, dtype=torch.float32, device=device) for x in mesh.textures]
    S = res * ssaa
    c_all = torch.as_tensor(c_V25, dtype=torch.float64)
    out = {k: [] for k in ("rgb", "alpha", "depth", "normal")}
    with intra_op_threads(threads if torch.device(device).type == "cpu" else None):
        for c in tqdm(c_all, desc="render", unit="view", disable=None if progress is None else not progress):
            frag = rasterize(t["verts"], t["faces"], c, S, S, backend=backend)
            hit = frag.mask
            tri, bary = frag.tri_id[hit], frag.bary[hit]
            n = F.normalize(_interp(t["normals"], t["faces"], tri, bary), dim=-1)
            _, dirs = pixel_rays(c[None].float(), S, S)
            d = dirs[0].to(device)[hit]
            n = torch.where(((n * d).sum(-1) > 0)[:, None], -n, n)           # two-sided: face the camera
            light = torch.full_like(n[:, 0], 1.0 if shading == "unlit" else _AMBIENT)
            for direction, strength in _LIGHTS if shading == "lit" else ():
                L = torch.as_tensor(direction / np.linalg.norm(direction), dtype=torch.float32, device=device)
                light = light + strength * (n @ L).clamp(min=0)
            shaded = (_shade_colors(mesh, t, tri, bary) * light[:, None]).clamp(0, 1)
            rgb = torch.ones(S, S, 3, device=device)
            rgb[hit] = shaded
            normal = torch.zeros(S, S, 3, device=device)
            normal[hit] = n
            a = hit.float()
            # Average the sub-samples; colours are averaged premultiplied, then put on white.
            pool = lambda x: F.avg_pool2d(x.permute(2, 0, 1)[None], ssaa)[0].permute(1, 2, 0)
            alpha = pool(a[..., None])[..., 0]
            rgb_fg = pool(torch.where(hit[..., None], rgb, torch.zeros_like(rgb)))
            out["rgb"].append(rgb_fg + (1 - alpha[..., None]))
            out["alpha"].append(alpha)
            mid = ssaa // 2
            out["depth"].append(frag.depth[mid::ssaa, mid::ssaa])
            out["normal"].append(normal[mid::ssaa, mid::ssaa])
    return {k: torch.stack(v).cpu().numpy().astype(np.float32) for k, v in out.items()}
