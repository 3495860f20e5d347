"""Mesh export of a NeRF triplane: marching cubes on the volume-rendering density, coloured per vertex.

The density is the one the ray marcher integrates, softplus(sigma - 1) (renderers/nerf.py
`composite`), sampled on a res^3 lattice that spans the closed render cube [-box_side/2,
box_side/2]^3 node to node: node (i, j, k) sits at world (x_i, y_j, z_k) with
x_i = -box_side/2 + i * box_side / (res - 1), as the official export's linspace grid.

The official export thresholds the raw sigma at 10 on a 192^3 grid; softplus is monotone, so
the same surface is the density level softplus(9) = OFFICIAL_DENSITY_THRESHOLD.
"""
from __future__ import annotations

import math
from pathlib import Path

import mcubes
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.layout import NUM_PLANES, as_planes
from renderers.nerf import NeRFRenderer

OFFICIAL_SIGMA = 10.0                                                # the official export's raw-sigma level
OFFICIAL_DENSITY_THRESHOLD = math.log1p(math.exp(OFFICIAL_SIGMA - 1.0))   # softplus(10 - 1) ~ 9.0001
MESH_FORMATS = (".glb", ".obj", ".ply")
# Our world is +z up; glTF's is +y up (glTF 2.0, "Coordinate System and Units"): a rotation of
# -90 degrees about x, (x, y, z) -> (x, z, -y), as a matrix applied to column vectors.
ZUP_TO_GLTF = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])


def grid_to_world(index, resolution: int, box_side: float) -> np.ndarray:
    """Lattice coordinates (..., 3), integer or fractional (marching-cubes vertices), to world
    units (..., 3) float64: index 0 is -box_side/2 and index resolution-1 is +box_side/2."""
    if resolution < 2:
        raise ValueError(f"grid resolution must be at least 2, got {resolution}")
    return np.asarray(index, np.float64) * (box_side / (resolution - 1)) - box_side / 2


def _as_planes(planes: torch.Tensor) -> torch.Tensor:
    """One triplane, (3, C, H, W), (3·C, H, W) or with a batch of 1 in front -> (1, 3, C, H, W)."""
    if planes.dim() == 3 or (planes.dim() == 4 and planes.shape[0] == NUM_PLANES):
        planes = planes[None]
    if planes.dim() not in (4, 5) or planes.shape[0] != 1 or planes.shape[1] % NUM_PLANES:
        raise ValueError(f"planes must be one triplane (3, C, H, W) or (3*C, H, W), got shape {tuple(planes.shape)}")
    return as_planes(planes)


@torch.no_grad()
def density_grid(renderer: NeRFRenderer, planes: torch.Tensor, resolution: int = 256,
                 chunk: int = 2 ** 18, progress: bool | None = None) -> np.ndarray:
    """Density softplus(sigma - 1) (1/world units) at the lattice nodes: (res, res, res) float32,
    axes x, y, z. Points are made and queried `chunk` at a time, so memory beyond the output
    grid stays O(chunk). progress: tqdm bar (None: only for grids of 128^3 and more)."""
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    planes = _as_planes(planes)
    box = renderer.cfg.box_side
    axis = torch.from_numpy(grid_to_world(np.arange(resolution), resolution, box)).float().to(planes.device)
    total = resolution ** 3
    out = np.empty(total, np.float32)
    show = resolution >= 128 if progress is None else progress
    for start in tqdm(range(0, total, chunk), desc="density grid", unit="chunk", disable=not show):
        flat = torch.arange(start, min(start + chunk, total), device=planes.device)
        # Flat index = (i * res + j) * res + k, so x varies slowest: the (res, res, res) reshape is x, y, z.
        ijk = torch.stack([flat // resolution ** 2, (flat // resolution) % resolution, flat % resolution], -1)
        sigma, _ = renderer.query(planes, axis[ijk][None])
        out[start:start + len(flat)] = F.softplus(sigma[0, :, 0] - 1).float().cpu().numpy()
    return out.reshape(resolution, resolution, resolution)


@torch.no_grad()
def extract_mesh(renderer: NeRFRenderer, planes: torch.Tensor, resolution: int = 256,
                 threshold: float = OFFICIAL_DENSITY_THRESHOLD, chunk: int = 2 ** 18,
                 progress: bool | None = None):
    """Marching cubes on the density of one triplane, coloured by the rgb head at the vertices.

    planes: one triplane, (3, C, H, W) or (3·C, H, W) (a leading batch of 1 is allowed, as
    TriplaneVQVAE.decode_tokens returns it). threshold: density level
    (1/world units; default the official surface, see the module docstring). The lattice is
    padded by one node of zero density, so surfaces cut by the cube's faces are closed there
    (vertices are clamped onto the face) and the mesh is watertight.

    Returns verts (N, 3) float32 world units, faces (F, 3) int64 with outward normals
    (counter-clockwise seen from outside), colours (N, 3) uint8. Raises ValueError for a threshold
    <= 0 or a density that never exceeds it.
    """
    if not threshold > 0:
        raise ValueError(f"threshold must be a positive density, got {threshold}")
    planes = _as_planes(planes)
    box = renderer.cfg.box_side
    dens = density_grid(renderer, planes, resolution, chunk, progress)
    if dens.max() <= threshold:
        raise ValueError(f"the density never exceeds the threshold {threshold:.4g} (max {dens.max():.4g}): "
                         "no surface to extract")
    # Density high inside gives outward-facing triangles from PyMCubes.
    verts_idx, faces = mcubes.marching_cubes(np.pad(dens, 1, constant_values=0.0), threshold)
    verts = np.clip(grid_to_world(verts_idx - 1.0, resolution, box), -box / 2, box / 2).astype(np.float32)
    colours = []
    for start in range(0, len(verts), chunk):
        pts = torch.from_numpy(verts[start:start + chunk]).to(planes.device)[None]
        _, rgb = renderer.query(planes, pts)
        colours.append(rgb[0].float().cpu().numpy())
    rgb = np.concatenate(colours) if colours else np.zeros((0, 3), np.float32)
    return verts, faces.astype(np.int64), np.round(np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8)


def write_mesh(path, verts: np.ndarray, faces: np.ndarray, colours: np.ndarray,
               normals: np.ndarray | None = None) -> Path:
    """Write a vertex-coloured mesh; the format follows the suffix (.glb, .obj or .ply).

    verts (N, 3) world units (+z up, as the G-buffer cameras), faces (F, 3) vertex indices,
    colours (N, 3) uint8 or float in [0, 1], normals (N, 3) unit vertex normals or None (then
    none are written).

    Frames: .glb follows glTF, whose +y is up, so that viewers show objects upright: vertices and
    normals are rotated by ZUP_TO_GLTF, (x, y, z) -> (x, z, -y) (a proper rotation, so windings
    stay outward), and the file has no node transform. .obj and .ply keep our world frame, +z up,
    as they are written unrotated (these formats define no up axis)."""
    import trimesh  # only exporting needs it

    path = Path(path)
    if path.suffix.lower() not in MESH_FORMATS:
        raise ValueError(f"{path}: unknown mesh format '{path.suffix}', use one of {', '.join(MESH_FORMATS)}")
    colours = np.asarray(colours)
    if colours.shape != (len(verts), 3):
        raise ValueError(f"{path}: colours have shape {colours.shape}, expected ({len(verts)}, 3)")
    if colours.dtype != np.uint8:
        colours = np.round(np.clip(colours, 0.0, 1.0) * 255).astype(np.uint8)
    rgba = np.concatenate([colours, np.full((len(colours), 1), 255, np.uint8)], 1)
    verts = np.asarray(verts)
    if normals is not None and np.shape(normals) != verts.shape:
        raise ValueError(f"{path}: normals have shape {np.shape(normals)}, expected {verts.shape}")
    if path.suffix.lower() == ".glb":
        rotate = ZUP_TO_GLTF.T.astype(verts.dtype if verts.dtype.kind == "f" else np.float64)
        verts = verts @ rotate
        normals = None if normals is None else np.asarray(normals) @ rotate
    mesh = trimesh.Trimesh(vertices=verts, faces=np.asarray(faces), vertex_colors=rgba,
                           vertex_normals=normals, process=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    mesh.export(path)
    return path
