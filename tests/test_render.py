import math

import numpy as np
import pytest
import torch

from renderers.mesh_render import ColoredMesh, render_views
from renderers.rasterizer import rasterize
from utils.cameras import normalized_intrinsics, orbit_c2w, pack_cameras, pixel_rays, plucker_rays, unpack_cameras


def _icosphere(radius=0.4, subdivisions=4):
    import trimesh
    m = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    return np.asarray(m.vertices, np.float32), np.asarray(m.faces, np.int64)


def _camera(az=30.0, el=20.0, r=2.0):
    return torch.as_tensor(pack_cameras(orbit_c2w(az, el, r)[None], normalized_intrinsics()))[0]


def test_camera_convention_looks_at_origin():
    c2w = orbit_c2w(75.0, 25.0, 2.0)
    R = c2w[:3, :3]
    assert np.allclose(R.T @ R, np.eye(3), atol=1e-12) and np.isclose(np.linalg.det(R), 1.0)
    assert np.isclose(np.linalg.norm(c2w[:3, 3]), 2.0)
    assert np.allclose(R[:, 2], -c2w[:3, 3] / 2.0)          # +z forward, towards the origin
    assert R[2, 1] < 0                                      # image +y (down) points to world -z
    # The central pixel ray passes through the origin.
    o, d = pixel_rays(_camera(75.0, 25.0)[None], 2, 2)
    centre_dir = d[0].mean((0, 1))
    assert torch.allclose(torch.linalg.cross(o[0, 0, 0], centre_dir / centre_dir.norm()), torch.zeros(3), atol=1e-6)


def test_plucker_is_moment_then_direction():
    c = _camera()
    p = plucker_rays(c[None], 8, 8)[0]
    o, d = pixel_rays(c[None], 8, 8)
    assert torch.allclose(p[3:].permute(1, 2, 0), d[0])
    assert torch.allclose(p[:3].permute(1, 2, 0), torch.linalg.cross(o[0], d[0]))
    assert torch.allclose(d[0].norm(dim=-1), torch.ones(8, 8))


def test_rasterizer_matches_analytic_sphere():
    v, f = _icosphere()
    c = _camera()
    frag = rasterize(torch.from_numpy(v), torch.from_numpy(f), c, 64, 64, backend="torch")
    o, d = pixel_rays(c[None], 64, 64)
    o, d = o[0].double(), d[0].double()
    b = (o * d).sum(-1)
    disc = b * b - ((o * o).sum(-1) - 0.4 ** 2)
    t = -b - disc.clamp(min=0).sqrt()
    z = t * (d @ unpack_cameras(c[None].double())[0][0][:3, 2])
    clear = disc > 0.02                                      # away from the silhouette
    assert frag.mask[clear].all() and not frag.mask[disc < -0.02].any()
    assert (frag.depth[clear] - z[clear]).abs().max() < 2e-3  # tessellation error only
    assert torch.allclose(frag.bary[frag.mask].sum(-1), torch.ones(int(frag.mask.sum())), atol=1e-5)


def test_rasterizer_z_test_keeps_nearest_triangle():
    # Two parallel squares facing the camera; the nearer (red) must win everywhere it covers.
    quad = np.array([[-1, -1, 0], [1, -1, 0], [1, 1, 0], [-1, 1, 0]], np.float32) * 0.3
    verts = np.concatenate([quad + [0, 0, 0.2], quad * 2 + [0, 0, -0.2]]).astype(np.float32)
    faces = np.array([[0, 1, 2], [0, 2, 3], [4, 5, 6], [4, 6, 7]])
    colors = np.array([[1, 0, 0]] * 4 + [[0, 0, 1]] * 4, np.float32)
    cams = pack_cameras(orbit_c2w(0, 90, 2.0)[None], normalized_intrinsics())   # looking down -z
    out = render_views(ColoredMesh(verts, faces, colors), cams, 32, ssaa=1, backend="torch")
    centre = out["rgb"][0, 16, 16]
    assert centre[0] > 0.5 and centre[2] < 0.1
    assert math.isclose(out["depth"][0, 16, 16], 2.0 - 0.2, rel_tol=1e-5)


def test_render_views_alpha_and_white_background():
    v, f = _icosphere(0.3, 3)
    cams = pack_cameras(np.stack([orbit_c2w(a, 10, 2.0) for a in (0, 90)]), normalized_intrinsics())
    out = render_views(ColoredMesh(v, f, np.tile([[0.2, 0.8, 0.2]], (len(v), 1)).astype(np.float32)), cams, 32)
    assert out["rgb"].shape == (2, 32, 32, 3) and out["alpha"].shape == (2, 32, 32)
    assert np.allclose(out["rgb"][:, 0, 0], 1.0) and out["alpha"][:, 0, 0].max() == 0
    frac = out["alpha"][(out["alpha"] > 0) & (out["alpha"] < 1)]
    assert len(frac) > 0                                     # antialiased silhouette
    inner = out["alpha"] == 1
    assert (out["rgb"][inner][:, 1] > out["rgb"][inner][:, 0]).all()   # green stays green when lit
    assert np.allclose(np.linalg.norm(out["normal"][inner], axis=-1), 1, atol=1e-4)


@pytest.mark.cuda
def test_nvdiffrast_matches_torch_backend():
    pytest.importorskip("nvdiffrast")
    v, f = _icosphere()
    c = _camera()
    ref = rasterize(torch.from_numpy(v), torch.from_numpy(f), c, 64, 64, backend="torch")
    out = rasterize(torch.from_numpy(v).cuda(), torch.from_numpy(f).cuda(), c, 64, 64, backend="nvdiffrast")
    same = ref.mask & out.mask.cpu()
    assert (ref.mask != out.mask.cpu()).float().mean() < 0.01
    assert (ref.depth[same] - out.depth.cpu()[same]).abs().max() < 1e-4


def test_unlit_render_keeps_vertex_colours_and_thread_setting(capsys):
    """shading="unlit" draws the vertex colours as they are (a triplane's mesh has its lighting
    baked in); `threads` holds only while rendering; progress=True shows a bar over the views."""
    v, f = _icosphere(0.3, 3)
    colour = np.array([0.7, 0.3, 0.1], np.float32)
    cams = pack_cameras(np.stack([orbit_c2w(a, 20, 2.0) for a in (0, 120, 240)]), normalized_intrinsics())
    threads = torch.get_num_threads()
    mesh = ColoredMesh(v, f, np.tile(colour, (len(v), 1)))
    out = render_views(mesh, cams, 24, shading="unlit", threads=1, progress=True)
    assert torch.get_num_threads() == threads
    assert "3/3" in capsys.readouterr().err
    inner = out["alpha"] == 1
    assert inner.sum() > 100
    np.testing.assert_allclose(out["rgb"][inner], np.broadcast_to(colour, out["rgb"][inner].shape), atol=1e-6)
    np.testing.assert_array_equal(out["rgb"][out["alpha"] == 0], 1.0)          # white background
    lit = render_views(mesh, cams, 24)
    np.testing.assert_array_equal(lit["alpha"], out["alpha"])                   # same coverage, other colours
    assert not np.allclose(lit["rgb"][inner], colour, atol=0.05)
    with pytest.raises(ValueError, match="unknown shading 'flat'"):
        render_views(mesh, cams, 8, shading="flat")
