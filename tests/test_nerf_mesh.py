"""Mesh export from NeRF density: a hand-built triplane + decoder whose density is a known sphere."""
import math

import numpy as np
import pytest
import torch
import trimesh

from renderers.nerf import NeRFConfig, NeRFRenderer
from renderers.nerf_mesh import (OFFICIAL_DENSITY_THRESHOLD, ZUP_TO_GLTF, density_grid, extract_mesh,
                                 grid_to_world, write_mesh)

CENTRE = (0.1, -0.05, 0.08)     # off-centre so that a swapped or flipped axis moves the mesh
RADIUS = 0.3
COLOUR = (0.8, 0.2, 0.4)
C, HIDDEN, PLANE_RES = 4, 8, 64


def sphere_triplane(centre=CENTRE, radius=RADIUS, K=100.0):
    """A renderer and planes (3, C, R, R) with sigma = K (radius^2 - |p - centre|^2) + sigma_T,
    where softplus(sigma_T - 1) is the default threshold, so the surface is the sphere; rgb =
    COLOUR. K (per squared world unit) sets how sharp the surface is.

    Plane features hold 1 - squared offsets: plane 0 (x, y) holds 1 - (x - cx)^2 along its width
    and 1 - (y - cy)^2 along its height in channels 0 and 1; plane 1 (y, z) holds 1 - (z - cz)^2
    along its height. (Sampling fades to 0 half a texel beyond the last texel centre, which then
    reads as far away, not as the centre.) Layer 0 sums them; the other layers pass unit 0
    through. A margin M keeps the ReLUs linear everywhere near the surface."""
    cfg = NeRFConfig(feat_dim=C, hidden_dim=HIDDEN)
    r = NeRFRenderer(cfg)
    half = cfg.box_side / 2
    centres = ((torch.arange(PLANE_RES) + 0.5) / PLANE_RES * 2 - 1) * half   # pixel centres, world units
    planes = torch.zeros(3, C, PLANE_RES, PLANE_RES)
    planes[0, 0] = (1 - (centres - centre[0]) ** 2)[None, :]     # varies along width (x)
    planes[0, 1] = (1 - (centres - centre[1]) ** 2)[:, None]     # varies along height (y)
    planes[1, 0] = (1 - (centres - centre[2]) ** 2)[:, None]     # plane 1 height is z
    M = 50.0
    sigma_t = 1 + math.log(math.expm1(OFFICIAL_DENSITY_THRESHOLD))
    net = r.decoder.net
    with torch.no_grad():
        for layer in net:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.zero_()
                layer.bias.zero_()
        net[0].weight[0, [0, 1, C]] = K
        net[0].bias[0] = K * (radius ** 2 - 3) + sigma_t + M
        net[2].weight[0, 0] = net[4].weight[0, 0] = net[6].weight[0, 0] = 1.0
        net[6].bias[0] = -M
        target = (torch.tensor(COLOUR) + 0.001) / 1.002
        net[6].bias[1:] = torch.log(target / (1 - target))
    return r, planes


def test_sphere_mesh():
    r, planes = sphere_triplane()
    res = 64
    cell = r.cfg.box_side / (res - 1)
    verts, faces, colours = extract_mesh(r, planes, resolution=res, chunk=50_000)
    assert verts.dtype == np.float32 and faces.dtype == np.int64 and colours.dtype == np.uint8
    dist = np.linalg.norm(verts - np.array(CENTRE), axis=1)
    assert np.abs(dist - RADIUS).max() < 0.25 * cell     # the field is near-linear across a cell
    np.testing.assert_allclose(verts.mean(0), CENTRE, atol=0.1 * cell)
    mesh = trimesh.Trimesh(verts, faces, process=False)
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.volume == pytest.approx(4 / 3 * math.pi * RADIUS ** 3, rel=0.02)   # positive: outward normals
    assert np.abs(colours.astype(int) - np.round(np.array(COLOUR) * 255)).max() <= 1
    # The flat (3*C, H, W) layout reads the same field.
    flat = planes.reshape(3 * C, PLANE_RES, PLANE_RES)
    np.testing.assert_array_equal(density_grid(r, flat, 12), density_grid(r, planes, 12))
    np.testing.assert_array_equal(density_grid(r, flat[None], 12), density_grid(r, planes, 12))


def test_chunking_changes_nothing():
    r, planes = sphere_triplane()
    # Equal up to float rounding (matrix products may be blocked differently per batch size).
    np.testing.assert_allclose(density_grid(r, planes, 17, chunk=7), density_grid(r, planes, 17, chunk=10 ** 6),
                               rtol=1e-5, atol=1e-6)


def test_grid_points_and_axis_order(monkeypatch):
    r, planes = sphere_triplane()
    res, seen = 9, []

    def query(planes, pts):
        seen.append(pts[0].clone())
        return torch.zeros(*pts.shape[:2], 1), torch.zeros(*pts.shape[:2], 3)

    monkeypatch.setattr(r, "query", query)
    density_grid(r, planes, res, chunk=100)
    pts = torch.cat(seen).reshape(res, res, res, 3).double().numpy()
    axis = grid_to_world(np.arange(res), res, r.cfg.box_side)
    assert axis[0] == -0.45 and axis[-1] == 0.45
    np.testing.assert_allclose(pts[..., 0], axis[:, None, None].repeat(res, 1).repeat(res, 2), atol=1e-7)
    np.testing.assert_allclose(pts[..., 1], axis[None, :, None].repeat(res, 0).repeat(res, 2), atol=1e-7)
    np.testing.assert_allclose(pts[..., 2], axis[None, None, :].repeat(res, 0).repeat(res, 1), atol=1e-7)


def test_vertices_land_exactly_on_a_plane(monkeypatch):
    """Density linear in x crosses the threshold at x0, between lattice nodes: marching cubes
    interpolates linear fields exactly, so every vertex off the cube faces has x = x0."""
    r, planes = sphere_triplane()
    res, x0, slope = 23, 0.1234, 10.0

    def query(planes, pts):
        dens = OFFICIAL_DENSITY_THRESHOLD + slope * (x0 - pts[..., :1].double())
        sigma = 1 + torch.log(torch.expm1(dens))        # softplus(sigma - 1) = dens
        return sigma.float(), torch.full((*pts.shape[:2], 3), 0.5)

    monkeypatch.setattr(r, "query", query)
    verts, faces, colours = extract_mesh(r, planes, resolution=res)
    half = r.cfg.box_side / 2
    inner = (np.abs(verts) < half - 1e-6).all(1)
    assert inner.sum() > 100
    np.testing.assert_allclose(verts[inner, 0], x0, atol=1e-5)
    # On the y/z faces, vertices sit on lattice x values, on x0, or on the clamped face x = -half.
    allowed = np.concatenate([grid_to_world(np.arange(res), res, r.cfg.box_side), [x0]])
    assert (np.abs(verts[~inner, 0][:, None] - allowed[None]).min(1) < 1e-6).all()
    assert trimesh.Trimesh(verts, faces, process=False).is_watertight
    assert (colours == 128).all()


def test_no_surface_is_an_error():
    r, planes = sphere_triplane()
    with pytest.raises(ValueError, match="never exceeds the threshold"):
        extract_mesh(r, planes, resolution=8, threshold=1e6)
    with pytest.raises(ValueError, match="positive"):
        extract_mesh(r, planes, resolution=8, threshold=0.0)
    with pytest.raises(ValueError, match="one triplane"):
        extract_mesh(r, torch.zeros(2, 3, C, 8, 8), resolution=8)    # two triplanes


@pytest.mark.parametrize("suffix", [".glb", ".ply", ".obj"])
def test_write_mesh_round_trip(tmp_path, suffix):
    box = trimesh.creation.box()
    colours = np.random.default_rng(0).integers(0, 256, (len(box.vertices), 3)).astype(np.uint8)
    path = write_mesh(tmp_path / f"m{suffix}", box.vertices, box.faces, colours)
    back = trimesh.load(path, force="mesh", process=False)
    expected = box.vertices @ ZUP_TO_GLTF.T if suffix == ".glb" else box.vertices   # glTF is +y up
    np.testing.assert_allclose(back.vertices, expected, atol=1e-6)
    np.testing.assert_array_equal(back.visual.vertex_colors[:, :3], colours)
    # Float colours in [0, 1] are accepted too.
    write_mesh(tmp_path / f"f{suffix}", box.vertices, box.faces, colours / 255.0)
    back = trimesh.load(tmp_path / f"f{suffix}", force="mesh", process=False)
    np.testing.assert_array_equal(back.visual.vertex_colors[:, :3], colours)


def test_write_mesh_unknown_suffix(tmp_path):
    box = trimesh.creation.box()
    with pytest.raises(ValueError, match=r"m\.stl: unknown mesh format"):
        write_mesh(tmp_path / "m.stl", box.vertices, box.faces, np.zeros((8, 3), np.uint8))


def _glb_json(path) -> dict:
    """The JSON chunk of a binary glTF: 12-byte header, then chunk length, chunk type, JSON."""
    import json
    import struct
    data = path.read_bytes()
    length, kind = struct.unpack_from("<II", data, 12)
    assert data[:4] == b"glTF" and kind == 0x4E4F534A          # "JSON"
    return json.loads(data[20:20 + length])


def test_glb_is_written_y_up_and_obj_ply_z_up(tmp_path):
    """A tall thin box standing on the ground of our +z-up world (x 0.1, y 0.2, z 0.8 wide, z from
    0 to 0.8) stands along +y in the GLB (glTF is +y up, no node transform) and along +z in OBJ/PLY."""
    box = trimesh.creation.box(extents=(0.1, 0.2, 0.8))
    verts = box.vertices + [0.0, 0.0, 0.4]
    normals = np.asarray(box.vertex_normals)
    colours = np.full((len(verts), 3), 200, np.uint8)
    for suffix in (".glb", ".obj", ".ply"):
        path = write_mesh(tmp_path / f"tall{suffix}", verts, box.faces, colours, normals=normals)
        loaded = trimesh.load(path, process=False)
        if suffix == ".glb":
            assert len(loaded.geometry) == 1
            raw = next(iter(loaded.geometry.values()))        # the geometry's own vertices, no scene graph
            lo, hi = raw.bounds
            np.testing.assert_allclose(lo, [-0.05, 0.0, -0.1], atol=1e-6)    # z -> y, y -> -z
            np.testing.assert_allclose(hi, [0.05, 0.8, 0.1], atol=1e-6)
            np.testing.assert_allclose(raw.vertex_normals, normals @ ZUP_TO_GLTF.T, atol=1e-6)
            gltf = _glb_json(path)
            assert not any({"matrix", "rotation", "translation", "scale"} & set(n) for n in gltf["nodes"])
            position = gltf["accessors"][gltf["meshes"][0]["primitives"][0]["attributes"]["POSITION"]]
            np.testing.assert_allclose(position["max"], [0.05, 0.8, 0.1], atol=1e-6)
            mesh = raw
        else:
            mesh = loaded
            lo, hi = mesh.bounds
            np.testing.assert_allclose(lo, [-0.05, -0.1, 0.0], atol=1e-6)
            np.testing.assert_allclose(hi, [0.05, 0.1, 0.8], atol=1e-6)
        assert mesh.volume == pytest.approx(0.1 * 0.2 * 0.8)       # a rotation: windings stay outward
    with pytest.raises(ValueError, match="normals have shape"):
        write_mesh(tmp_path / "bad.glb", verts, box.faces, colours, normals=normals[:3])
