"""The encoder's geometric lift (models/lift.py): cameras recovered from Plücker rays against the
cameras that made them, texel points against the renderer's triplane lookup, and the lift inside
a tiny encoder."""
import numpy as np
import torch

from models.encoder import MultiViewEncoder
from models.lift import ViewLift, cameras_from_plucker
from renderers.nerf import sample_triplane
from utils.cameras import look_at, pack_cameras, plucker_rays, unpack_cameras


def cameras() -> np.ndarray:
    """Three views with different focal lengths and off-centre principal points."""
    eyes = [(2.0, 0.3, 0.8), (-0.4, -1.7, 1.1), (0.2, 1.9, -0.6)]
    K = [np.array([[f, 0, cx], [0, f * 1.1, cy], [0, 0, 1]]) for f, cx, cy in
         [(1.3, 0.5, 0.5), (1.9, 0.45, 0.56), (1.1, 0.52, 0.48)]]
    return np.concatenate([pack_cameras(look_at(np.array(e), target=(0.05, -0.02, 0.0))[None], k)
                           for e, k in zip(eyes, K)])


def test_cameras_from_plucker_project_points_as_the_cameras_do():
    c = torch.from_numpy(cameras())
    H, W = 12, 16                                  # not square: rows and columns must not swap
    o, h = cameras_from_plucker(plucker_rays(c.float(), H, W).double())
    c2w, fx, fy, cx, cy = (t.double() for t in unpack_cameras(c))
    assert torch.allclose(o, c2w[:, :3, 3], atol=1e-5)
    pts = torch.tensor([[0.1, -0.2, 0.15], [-0.3, 0.25, -0.1], [0.0, 0.0, 0.0]], dtype=torch.float64)
    cam = torch.einsum("vji,vpj->vpi", c2w[:, :3, :3], pts[None] - c2w[:, None, :3, 3])   # camera frame
    want_u = 2 * (fx[:, None] * cam[..., 0] / cam[..., 2] + cx[:, None]) - 1
    want_v = 2 * (fy[:, None] * cam[..., 1] / cam[..., 2] + cy[:, None]) - 1
    q = (pts[None] - o[:, None]) @ h.transpose(1, 2)
    assert (q[..., 2] > 0).all()
    assert torch.allclose(q[..., 0] / q[..., 2], want_u, atol=1e-4)
    assert torch.allclose(q[..., 1] / q[..., 2], want_v, atol=1e-4)
    depth = q[..., 2] / h[:, 2].norm(dim=-1)[:, None]
    assert torch.allclose(depth, cam[..., 2], atol=1e-5)


def test_texel_points_sit_on_their_own_triplane_texels():
    """Plane p of the lift's grid is plane p of the renderer's lookup, rows and columns included:
    a triplane whose texels hold their own (plane, row, column) reads them back at every point."""
    s, K, box = 4, 3, 0.9
    pts = ViewLift(8, 8, 1, box, K).texel_points(s, None)                  # (3, s, s, K, 3)
    p, i, j = torch.meshgrid(torch.arange(3.0), torch.arange(s * 1.0), torch.arange(s * 1.0), indexing="ij")
    planes = torch.stack([p, i, j], 1)[None]                               # (1, 3, C=3, s, s)
    got = sample_triplane(planes, pts.reshape(1, -1, 3).float(), box).reshape(3, s, s, K, 3, 3)
    want = torch.stack([p, i, j], -1)[:, :, :, None].expand(3, s, s, K, 3)
    for plane in range(3):
        assert torch.allclose(got[plane, ..., plane, :].float(), want[plane].float(), atol=1e-5)


def test_lifting_encoder_shapes_gradients_and_objects_kept_apart():
    torch.manual_seed(0)
    enc = MultiViewEncoder(ch=32, ch_mult=(1, 2), num_res_blocks=1, num_views=3, num_heads=2, head_dim=8,
                           z_channels=12, lift_samples=4, lift_hidden=8, lift_level=0).double()
    c = torch.from_numpy(cameras())
    rays = plucker_rays(c.float(), 16, 16).double()
    x = torch.randn(2 * 3, 10, 16, 16, dtype=torch.float64)
    x[:, 3:9] = rays.repeat(2, 1, 1, 1)
    x[:, 9] = x[:, 9].abs() + 1.5                                           # depths in front of the box
    out = enc(x)
    assert out.shape == (2, 12, 8, 8)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.lift.parameters())
    with torch.no_grad():
        swapped = enc(torch.cat([x[3:], x[:3]]))
    assert torch.allclose(swapped, torch.cat([out[1:], out[:1]]).detach(), atol=1e-10)
