"""FlexiCubes surface extraction and the triplane mesh renderer of SAR3D's FlexiCubes VQVAE.

Units. The FlexiCubes grid lives in *mesh units*: res^3 cubes over [-grid_scale/2, grid_scale/2]^3
(grid_scale 2.005), and the triplane is sampled at p * 2 / box_warp (box_warp 2.0), so the planes
span [-1, 1]^3 mesh units. The NeRF renderer samples the same planes at p * 2 / box_side
(box_side 0.9) of the c.npy world, so one triplane point is at world = mesh * box_side / box_warp
(0.45). Meshes are rendered and exported in world units, where the NeRF renderer draws the same
triplane: both renderers agree on any c.npy camera.

SDF convention: negative inside. Faces are wound so that their normals, by the right-hand rule,
point to positive SDF (outwards).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.layout import as_planes
from renderers.flexicubes_tables import CHECK_TABLE, CUBE_CORNERS, CUBE_EDGES, DMC_TABLE, NUM_VD_TABLE
from renderers.nerf import sample_triplane
from renderers.rasterizer import rasterize


@dataclass
class FlexiCubesConfig:
    """Defaults are the official FlexiCubes VQVAE, rendered at the NeRF inference size."""
    grid_res: int = 128            # cubes per side (the official code forces 128)
    grid_scale: float = 2.005      # grid side in mesh units
    box_warp: float = 2.0          # triplane sampling: plane coordinates = p * 2 / box_warp (mesh units)
    box_side: float = 0.9          # the same planes' extent in the c.npy world (NeRFConfig.box_side)
    feat_dim: int = 32             # channels per plane
    hidden_dim: int = 64
    weight_scale: float = 0.5      # s: beta, alpha = 1 + s tanh(raw), gamma = s sigmoid(raw) + (1 - s) / 2
    resolution: int = 512          # rendered image side
    camera: Literal["world", "official"] = "world"   # see FlexiCubesRenderer
    backend: Literal["auto", "torch", "nvdiffrast"] = "auto"   # renderers.rasterizer backend


# ----------------------------------------------------------------------------- the grid

def voxel_grid(res: int, scale: float, device=None):
    """Grid vertices (N, 3) float32 in [-scale/2, scale/2]^3, N = (res+1)^3, vertex (i, j, k) at row
    i (res+1)^2 + j (res+1) + k; cubes (res^3, 8) long vertex ids, cube (a, b, c) at row a res^2 + b res + c,
    corners in CUBE_CORNERS order. Coordinates are rounded to 1e-5 before scaling, as the official
    grid is (it merges duplicate corners that way), so the triplane is sampled at the same points."""
    t = torch.round(torch.arange(res + 1, dtype=torch.float32, device=device) / res * 1e5) / 1e5 - 0.5
    verts = torch.stack(torch.meshgrid(t, t, t, indexing="ij"), -1).reshape(-1, 3) * scale
    i = torch.arange(res, device=device)
    a, b, c = (x.reshape(-1) for x in torch.meshgrid(i, i, i, indexing="ij"))
    stride = torch.tensor([(res + 1) ** 2, res + 1, 1], device=device)
    cubes = (a * stride[0] + b * stride[1] + c)[:, None] + (CUBE_CORNERS.to(device) * stride).sum(-1)
    return verts, cubes


def grid_edges(res: int, device=None) -> torch.Tensor:
    """Every grid edge once: (3 res (res+1)^2, 2) vertex ids."""
    n = res + 1
    idx = torch.arange(n ** 3, device=device).reshape(n, n, n)
    return torch.cat([torch.stack([idx[:-1].reshape(-1), idx[1:].reshape(-1)], -1),
                      torch.stack([idx[:, :-1].reshape(-1), idx[:, 1:].reshape(-1)], -1),
                      torch.stack([idx[:, :, :-1].reshape(-1), idx[:, :, 1:].reshape(-1)], -1)])


def fix_empty_shapes(sdf_BN: torch.Tensor, deform_BN3: torch.Tensor, res: int):
    """The official empty-shape fix. An object whose SDF has no sign change on the grid's interior
    vertices (the outermost layer ignored) gets SDF 1 - min(sdf) at the vertex of index res // 2 + 1 on each axis and
    -1 - max(sdf) on the two outer vertex layers (min and max over the whole batch), so that it still
    yields a surface, and its SDF and deformation are detached: such a shape teaches the network
    nothing through the mesh. -> (sdf (B, N), deformation (B, N, 3), empty (B,) bool)."""
    B, n = sdf_BN.shape[0], res + 1
    cube = sdf_BN.reshape(B, n, n, n)
    interior = cube[:, 1:-1, 1:-1, 1:-1].reshape(B, -1)
    empty = ((interior > 0).sum(-1) == 0) | ((interior < 0).sum(-1) == 0)
    if not empty.any():
        return sdf_BN, deform_BN3, empty
    with torch.no_grad():
        fixed = sdf_BN.detach().reshape(B, n, n, n).clone()
        boundary = torch.zeros(n, n, n, dtype=torch.bool, device=sdf_BN.device)
        for d in range(3):
            boundary.index_fill_(d, torch.tensor([0, 1, n - 2, n - 1], device=sdf_BN.device), True)
        fixed[:, boundary] = -1 - sdf_BN.max()
        c = res // 2 + 1
        fixed[:, c, c, c] = 1 - sdf_BN.min()
    keep = ~empty[:, None]
    sdf = torch.where(keep, sdf_BN, fixed.reshape(B, -1))
    deform = torch.where(keep[..., None], deform_BN3, deform_BN3.detach())
    return sdf, deform, empty


# ----------------------------------------------------------------------------- extraction

def _resolve_ambiguity(case_S: torch.Tensor, surf_S: torch.Tensor, res: int) -> torch.Tensor:
    """Cubes of a CHECK_TABLE case whose neighbour across the ambiguous face is one too take their
    complement's grouping (255 - case: the same crossing edges, grouped the other way)."""
    check = CHECK_TABLE.to(case_S.device)[case_S]
    to_check = check[:, 0] == 1
    if not to_check.any():
        return case_S
    flagged = torch.zeros(res ** 3, dtype=torch.bool, device=case_S.device)
    flagged[surf_S[to_check]] = True
    lin = surf_S[to_check]
    coords = torch.stack([lin // res ** 2, lin // res % res, lin % res], -1) + check[to_check, 1:]
    inside = ((coords >= 0) & (coords < res)).all(-1)
    neighbour = (coords.clamp(0, res - 1) * torch.tensor([res ** 2, res, 1], device=lin.device)).sum(-1)
    invert = to_check.nonzero()[:, 0][inside & flagged[neighbour]]
    case_S = case_S.clone()
    case_S[invert] = 255 - case_S[invert]
    return case_S


def flexicubes(x_N3: torch.Tensor, s_N: torch.Tensor, cubes_C8: torch.Tensor, res: int,
               weights_C21: torch.Tensor | None = None, training: bool = False, weight_scale: float = 0.5):
    """FlexiCubes (Shen et al. 2023) isosurface of the SDF s at (deformed) grid vertices x.

    x (N, 3), s (N,), cubes (C, 8) from voxel_grid(res); weights (C, 21) raw per-cube parameters
    [beta (12 edges), alpha (8 corners), gamma], or None for the plain dual-marching-cubes surface.
    Each surface patch of a cube gets one dual vertex: the beta-weighted mean of its edges'
    crossings, each placed by interpolating alpha-scaled SDFs. Each grid edge with a sign change
    shared by four cubes gives a quad of their dual vertices, split into two triangles along the
    diagonal of larger gamma product (training=False) or into four around their gamma-weighted
    centre (training=True, differentiable in gamma).

    Returns vertices (V, 3), faces (F, 3) long, and the L_dev regulariser per (patch, edge) entry
    (the absolute deviation of each crossing's distance to its dual vertex from their mean).
    Differentiable w.r.t. x, s and the weights; the topology is not. A vertex with s exactly 0 counts
    as outside, so a surface running through grid vertices can fold (as in the official code).
    Dual vertices of cubes on the grid boundary whose edges have no full quad stay unreferenced.
    """
    dev, N = x_N3.device, x_N3.shape[0]
    inside = s_N < 0
    n_in = inside[cubes_C8].sum(-1)
    surf = ((n_in > 0) & (n_in < 8)).nonzero()[:, 0]                   # (S,) ascending cube ids
    if surf.numel() == 0:
        return x_N3.new_zeros(0, 3), torch.zeros(0, 3, dtype=torch.long, device=dev), x_N3.new_zeros(0)
    S = surf.shape[0]
    if weights_C21 is None:
        beta, alpha, gamma = x_N3.new_ones(S, 12), x_N3.new_ones(S, 8), x_N3.new_ones(S)
    else:
        w = weights_C21[surf]
        beta = torch.tanh(w[:, :12]) * weight_scale + 1
        alpha = torch.tanh(w[:, 12:20]) * weight_scale + 1
        gamma = torch.sigmoid(w[:, 20]) * weight_scale + (1 - weight_scale) / 2

    with torch.no_grad():
        cube_v = cubes_C8[surf]
        case = (inside[cube_v].long() << torch.arange(8, device=dev)).sum(-1)
        case = _resolve_ambiguity(case, surf, res)
        edges = CUBE_EDGES.to(dev)
        ev = cube_v[:, edges]                                           # (S, 12, 2)
        # Every cube sees a grid edge with the same endpoint order, so (a, b) names it uniquely.
        key, inv, count = torch.unique(ev[..., 0] * N + ev[..., 1], return_inverse=True, return_counts=True)
        crossing = inside[key // N] != inside[key % N]
        surf_edge = torch.where(crossing, torch.cumsum(crossing, 0) - 1, -1)[inv]    # (S, 12) id or -1
        se_v = torch.stack([key[crossing] // N, key[crossing] % N], -1)              # (E, 2)
        # One dual vertex per patch, numbered cube by cube.
        n_vd = NUM_VD_TABLE.to(dev)[case]
        vd_slot = torch.arange(4, device=dev) < n_vd[:, None]                       # (S, 4)
        vd_id = (torch.cumsum(vd_slot.reshape(-1), 0) - 1).reshape(S, 4)
        groups = DMC_TABLE.to(dev)[case]                                            # (S, 4, 7)
        ci, gi, ki = (groups >= 0).nonzero(as_tuple=True)
        le = groups[ci, gi, ki]                                         # local edge of each entry
        vd_of, e_of = vd_id[ci, gi], surf_edge[ci, le]
        V = int(vd_slot.sum())

    xs, ss = x_N3[se_v], s_N[se_v]                                      # (E, 2, 3), (E, 2)
    crossing_pt = (xs[:, 0] * ss[:, 1:] - xs[:, 1] * ss[:, :1]) / (ss[:, 1:] - ss[:, :1])
    sa = ss[e_of, 0] * alpha[ci, edges[le, 0]]
    sb = ss[e_of, 1] * alpha[ci, edges[le, 1]]
    ue = (xs[e_of, 0] * sb[:, None] - xs[e_of, 1] * sa[:, None]) / (sb - sa)[:, None]
    b = beta[ci, le][:, None]
    vd = (x_N3.new_zeros(V, 3).index_add(0, vd_of, ue * b)) / x_N3.new_zeros(V, 1).index_add(0, vd_of, b)
    dist = (crossing_pt[e_of] - vd[vd_of]).norm(dim=-1)
    n_edges = torch.zeros(V, device=dev).index_add_(0, vd_of, torch.ones_like(dist))
    mean = x_N3.new_zeros(V).index_add(0, vd_of, dist) / n_edges
    l_dev = (dist - mean[vd_of]).abs()
    vd_gamma = gamma[vd_slot.nonzero()[:, 0]]                           # (V,) the gamma of its cube

    with torch.no_grad():
        vd_map = torch.full((S, 12), -1, dtype=torch.long, device=dev)
        vd_map[ci, le] = vd_of
        full = (surf_edge >= 0) & (count[inv] == 4)   # crossing edges away from the grid boundary
        qc, qe = full.nonzero(as_tuple=True)                            # cube-major, cube ids ascending
        order = torch.sort(surf_edge[qc, qe], stable=True).indices
        quad = vd_map[qc, qe][order].reshape(-1, 4)
        # The four cubes round an edge come in lexicographic order of their two other coordinates,
        # (0,0), (0,1), (1,0), (1,1): [0, 1, 3, 2] is a cycle whose normal points to the edge's first
        # endpoint (in CUBE_EDGES order), [2, 3, 1, 0] the reverse one. Point it to the outside end.
        first_v = se_v[surf_edge[qc, qe][order].reshape(-1, 4)[:, 0], 0]
        outward_first = (s_N[first_v] > 0)[:, None]
        quad = torch.where(outward_first, quad[:, [0, 1, 3, 2]], quad[:, [2, 3, 1, 0]])

    g = vd_gamma[quad]                                                  # (Q, 4)
    g02, g13 = g[:, 0] * g[:, 2], g[:, 1] * g[:, 3]
    if not training:
        split = (g02 > g13)[:, None]
        faces = torch.where(split, quad[:, [0, 1, 2, 0, 2, 3]], quad[:, [0, 1, 3, 3, 1, 2]]).reshape(-1, 3)
        return vd, faces, l_dev
    v = vd[quad]                                                        # (Q, 4, 3)
    centre = ((v[:, 0] + v[:, 2]) / 2 * g02[:, None] + (v[:, 1] + v[:, 3]) / 2 * g13[:, None]) \
        / (g02 + g13 + 1e-8)[:, None]
    c_id = torch.arange(quad.shape[0], device=dev) + V
    rim = torch.stack([quad, quad.roll(-1, 1)], -1)                     # (Q, 4, 2) consecutive corners
    faces = torch.cat([rim, c_id[:, None, None].expand(-1, 4, 1)], -1).reshape(-1, 3)
    return torch.cat([vd, centre]), faces, l_dev


# ----------------------------------------------------------------------------- the network

def _mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, n_out))


class MeshPointDecoder(nn.Module):
    """Official `LRMOSGDecoderMesh`: four MLPs on concatenated plane features (..., 3C).

    net_sdf -> 1, net_rgb -> 3, net_deformation -> 3 per point; net_weight takes a cube's 8
    corner features concatenated in corner order (8 * 3C) -> 21 FlexiCubes weights. The official
    class zeroes every bias at construction; so does this one."""

    def __init__(self, feat_dim: int = 32, hidden_dim: int = 64):
        super().__init__()
        f = 3 * feat_dim
        self.net_sdf = _mlp(f, hidden_dim, 1)
        self.net_rgb = _mlp(f, hidden_dim, 3)
        self.net_deformation = _mlp(f, hidden_dim, 3)
        self.net_weight = _mlp(8 * f, hidden_dim, 21)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def sdf(self, feats: torch.Tensor) -> torch.Tensor:
        """(..., 3C) -> SDF (...) in (-0.5, 0.5), negative inside."""
        return torch.sigmoid(self.net_sdf(feats)[..., 0]) - 0.5

    def deformation(self, feats: torch.Tensor, grid_res: int) -> torch.Tensor:
        """(..., 3C) -> vertex offsets (..., 3), at most 1 / (4 grid_res) mesh units per axis."""
        return torch.tanh(self.net_deformation(feats)) / (grid_res * 4)

    def rgb(self, feats: torch.Tensor) -> torch.Tensor:
        """(..., 3C) -> colour (..., 3) in [-0.001, 1.001]."""
        return torch.sigmoid(self.net_rgb(feats)) * 1.002 - 0.001

    def cube_weights(self, feats_BNF: torch.Tensor, cubes_C8: torch.Tensor) -> torch.Tensor:
        """Vertex features (B, N, 3C), cubes (C, 8) -> raw weights (B, C, 21), net_weight * 0.1.

        The first layer is linear in the concatenated corner features, so it is applied per corner
        slot to the vertex features and gathered: the (B, C, 8 * 3C) input (6 GB at 128^3) never exists."""
        first = self.net_weight[0]
        w = first.weight.reshape(first.out_features, 8, -1)
        h = first.bias
        for k in range(8):
            h = h + (feats_BNF @ w[:, k].T)[:, cubes_C8[:, k]]
        return self.net_weight[1:](h) * 0.1


# ----------------------------------------------------------------------------- the renderer

class FlexiCubesRenderer(nn.Module):
    """Triplane -> SDF, deformation and weights on the FlexiCubes grid -> mesh -> rasterised image.

    Parameters: `decoder.net_{sdf,rgb,deformation,weight}.{0,2,4,6}.{weight,bias}`, the official
    `decoder.triplane_decoder.decoder.*` keys without the `decoder.triplane_decoder.` prefix. The
    grid is rebuilt per device on first use and is not part of the state dict.

    Cameras (cfg.camera). "world": the mesh is scaled into the c.npy world (x box_side / box_warp)
    and seen through the c.npy camera itself, so it lines up with the NeRF render of the same planes.
    "official": the camera of the official FlexiCubes fine-tuning, which flips the c2w rotation to
    OpenGL (the same view), doubles its translation in mesh units and replaces the intrinsics by a
    centred 43 degree field of view. It approximates the world camera (objects come out about 1.6%
    larger: (tan 19.8 deg / tan 21.5 deg) / 0.9 for the official 39.6 degree K) and is there to
    reproduce the official RGB renders (their mask is antialiased, their depth is camera z in mesh units).

    In training mode (module.training) quads are split in four, differentiably in gamma (official)."""

    def __init__(self, cfg: FlexiCubesConfig | None = None):
        super().__init__()
        self.cfg = cfg or FlexiCubesConfig()
        self.decoder = MeshPointDecoder(self.cfg.feat_dim, self.cfg.hidden_dim)
        self._grids = {}

    @property
    def mesh_to_world(self) -> float:
        return self.cfg.box_side / self.cfg.box_warp

    def grid(self, device):
        """(vertices (N, 3) mesh units, cubes (C, 8), edges (E, 2)) of the configured grid on `device`, cached."""
        key = str(device)
        if key not in self._grids:
            res = self.cfg.grid_res
            self._grids[key] = (*voxel_grid(res, self.cfg.grid_scale, device), grid_edges(res, device))
        return self._grids[key]

    def features(self, planes_B3CHW: torch.Tensor, pts_BN3: torch.Tensor) -> torch.Tensor:
        """Plane features (B, N, 3C) at points in mesh units."""
        return sample_triplane(planes_B3CHW, pts_BN3, self.cfg.box_warp)

    def geometry(self, planes_B3CHW: torch.Tensor):
        """-> SDF (B, N), deformed grid vertices (B, N, 3) mesh units, raw weights (B, C, 21),
        empty (B,) bool (objects the empty-shape fix replaced)."""
        cfg = self.cfg
        verts, cubes, _ = self.grid(planes_B3CHW.device)
        B = planes_B3CHW.shape[0]
        feats = self.features(planes_B3CHW, verts.expand(B, -1, -1))
        sdf, deform, empty = fix_empty_shapes(self.decoder.sdf(feats),
                                              self.decoder.deformation(feats, cfg.grid_res), cfg.grid_res)
        return sdf, verts + deform, self.decoder.cube_weights(feats, cubes), empty

    def meshes(self, planes_B3CHW: torch.Tensor, training: bool):
        """-> [(vertices (V, 3) mesh units, faces (F, 3) long)] per object, and the official
        regularisers (scalars): sdf_reg_loss_entropy, flexicubes_surface_reg, flexicubes_weight_reg."""
        cfg = self.cfg
        sdf, x, weights, _ = self.geometry(planes_B3CHW)
        _, cubes, edges = self.grid(sdf.device)
        out, l_dev = [], []
        for b in range(sdf.shape[0]):
            v, f, dev = flexicubes(x[b], sdf[b], cubes, cfg.grid_res, weights[b], training, cfg.weight_scale)
            out.append((v, f))
            l_dev.append(dev)
        # Official weights: 0.01 x BCE pushing the two ends of every crossing edge towards each other's
        # sign, 0.5 x mean L_dev, 0.1 x mean squared raw weight over all cubes.
        e = sdf[:, edges]                                                   # (B, E, 2)
        e = e[torch.sign(e[..., 0]) != torch.sign(e[..., 1])]
        entropy = (F.binary_cross_entropy_with_logits(e[:, 0], (e[:, 1] > 0).float())
                   + F.binary_cross_entropy_with_logits(e[:, 1], (e[:, 0] > 0).float()))
        regs = {"sdf_reg_loss_entropy": entropy * 0.01,
                "flexicubes_surface_reg": torch.cat(l_dev).mean() * 0.5,
                "flexicubes_weight_reg": (weights ** 2).mean() * 0.1}
        return out, regs

    def cameras(self, c_B25: torch.Tensor) -> torch.Tensor:
        """The c.npy rows (B, 25) the world-space mesh is rasterised with (see the class docstring)."""
        if self.cfg.camera == "world":
            return c_B25
        c = c_B25.clone()
        c[:, [3, 7, 11]] *= 2 * self.mesh_to_world     # translation x2 in mesh units, back to world
        focal = 0.5 / math.tan(math.radians(43.0) / 2)
        c[:, 16:] = torch.tensor([focal, 0, 0.5, 0, focal, 0.5, 0, 0, 1], dtype=c.dtype, device=c.device)
        return c

    def forward(self, planes: torch.Tensor, c: torch.Tensor, resolution: int | None = None,
                deterministic: bool | None = None, generator: torch.Generator | None = None) -> dict:
        """planes (P, 3*C, Hp, Wp) or (P, 3, C, Hp, Wp); c (B, 25) c.npy rows with B a multiple of P,
        the B / P views of each object adjacent (P = B: one camera per object). H = W = resolution.
        Mesh rendering draws no random numbers: `deterministic` and `generator` are accepted so that
        callers can use either renderer alike, and change nothing.

        Returns image_raw (B, 3, H, W) in [-1, 1] on white; image_depth (B, 1, H, W), the world
        distance from the camera centre to the surface, 0 on the background; image_mask and
        weights_samples (B, 1, H, W), the hard coverage mask in {0, 1} (no antialiasing: silhouette
        edges get no gradient); and the regularisers of `meshes`. Colours are net_rgb at the
        rasterised surface points, differentiable w.r.t. the mesh through the barycentrics."""
        cfg = self.cfg
        res = resolution or cfg.resolution
        planes = as_planes(planes)
        P, B = planes.shape[0], c.shape[0]
        if B % P:
            raise ValueError(f"{B} cameras cannot be split evenly over {P} objects")
        meshes, regs = self.meshes(planes, self.training)
        cams = self.cameras(c.to(planes.device))
        rgb, depth, mask = [], [], []
        for i in range(B):
            p = i // (B // P)
            verts, faces = meshes[p]
            img, dist = planes.new_ones(res, res, 3), planes.new_zeros(res, res)
            hit = torch.zeros(res, res, dtype=torch.bool, device=planes.device)
            if faces.shape[0]:
                frag = rasterize(verts * self.mesh_to_world, faces, cams[i], res, res, backend=cfg.backend)
                hit = frag.mask
                pos = (verts[faces[frag.tri_id[hit]]] * frag.bary[hit][..., None].to(verts.dtype)).sum(-2)
                colour = self.decoder.rgb(self.features(planes[p:p + 1], pos[None]))[0].clamp(0, 1)
                centre = cams[i, [3, 7, 11]].to(pos.dtype)
                img = img.index_put((hit,), colour)
                dist = dist.index_put((hit,), (pos * self.mesh_to_world - centre).norm(dim=-1))
            rgb.append(img)
            depth.append(dist)
            mask.append(hit.to(dist.dtype))
        m = torch.stack(mask)[:, None]
        return {"image_raw": torch.stack(rgb).permute(0, 3, 1, 2) * 2 - 1, "image_depth": torch.stack(depth)[:, None],
                "image_mask": m, "weights_samples": m, **regs}

    @torch.no_grad()
    def extract_mesh(self, planes: torch.Tensor) -> list:
        """planes (B, 3*C, Hp, Wp) or (B, 3, C, Hp, Wp) -> per object (vertices (V, 3) float world
        units, faces (F, 3) long, vertex colours (V, 3) in [0, 1] from net_rgb), two triangles per quad."""
        planes = as_planes(planes)
        meshes, _ = self.meshes(planes, training=False)
        out = []
        for p, (verts, faces) in enumerate(meshes):
            colours = self.decoder.rgb(self.features(planes[p:p + 1], verts[None]))[0].clamp(0, 1)
            out.append((verts * self.mesh_to_world, faces, colours))
        return out
