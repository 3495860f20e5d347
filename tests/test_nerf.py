import math

import numpy as np
import torch

from renderers.nerf import NeRFConfig, NeRFRenderer
from tests.official import filled_state, needs_official, reference, rel_err
from utils.cameras import normalized_intrinsics, orbit_c2w, pack_cameras, pixel_rays

PREFIX = "decoder.triplane_decoder."


def _official_renderer(**cfg) -> NeRFRenderer:
    r = NeRFRenderer(NeRFConfig(**cfg))
    r.load_state_dict({k[len(PREFIX):]: v for k, v in filled_state("vqvae", PREFIX).items()}, strict=True)
    return r


def _random_renderer(**cfg) -> NeRFRenderer:
    """Default init, density bias +6 (as the parity fill) so that renders are semi-opaque."""
    torch.manual_seed(0)
    r = NeRFRenderer(NeRFConfig(**cfg))
    with torch.no_grad():
        r.decoder.net[6].bias[0] += 6
    return r


def _random_planes():
    return torch.randn(1, 96, 32, 32, generator=torch.Generator().manual_seed(3)) * 4


def _cameras(views=((30.0, 20.0), (200.0, -35.0)), radius=1.8):
    c2w = np.stack([orbit_c2w(az, el, radius) for az, el in views])
    return torch.as_tensor(pack_cameras(c2w, normalized_intrinsics()))


@needs_official
def test_parity_with_official_render():
    ref = reference("render")
    r = _official_renderer(resolution=32, n_coarse=80, n_importance=80, deterministic=True)
    with torch.no_grad():
        out = r(ref["triplane"], ref["c"], return_coords=True)
    for k in ("image_raw", "image_depth", "weights_samples", "image_mask", "all_coords"):
        assert out[k].shape == ref[k].shape, k
        assert rel_err(out[k], ref[k]) <= 1e-5, (k, rel_err(out[k], ref[k]))


def _slab_indicator(n: int, half: float, box: float) -> torch.Tensor:
    """1 at texel centres with |coord| < half (world units), 0 elsewhere; (n,)."""
    centres = ((torch.arange(n) + 0.5) / n * 2 - 1) * box / 2
    return (centres.abs() < half).float()


def test_constant_density_cube_matches_closed_form():
    """Density sigma' inside the cube [-h, h]^3 (h = box/4), 0 elsewhere, colour c: opacity
    1 - exp(-sigma' L) over the chord L, rgb = c*alpha + (1 - alpha), unnormalised depth
    = int z sigma' exp(-sigma' (z - z0)) dz over the chord; white where rays miss."""
    box, h, n, density, colour = 0.9, 0.225, 1024, 3.0, torch.tensor([0.2, 0.5, 0.8])
    # One channel per plane keeps fine (1024^2) planes cheap; the faces are blurred by < 0.001.
    r = NeRFRenderer(NeRFConfig(resolution=40, n_coarse=160, n_importance=160, deterministic=True, feat_dim=1))
    # Plane 0 (x, y) = indicator(|x|, |y| < h), plane 1 (y, z) = indicator(|z| < h); the MLP
    # ANDs them. h sits on a texel edge, so the bilinear ramps are centred on the faces.
    ind = _slab_indicator(n, h, box)
    planes = torch.zeros(1, 3, n, n)
    planes[0, 0] = ind[:, None] * ind[None, :]
    planes[0, 1] = ind[:, None].expand(n, n)          # rows index the plane's 2nd coord, z
    with torch.no_grad():
        for lin in r.decoder.net[::2]:
            lin.weight.zero_(), lin.bias.zero_()
        net = r.decoder.net
        net[0].weight[0, 0], net[0].weight[0, 1], net[0].bias[0] = 1.0, 1.0, -1.0  # AND of the two
        net[2].weight[0, 0] = net[4].weight[0, 0] = 1.0
        sig_in, sig_out = 1 + math.log(math.expm1(density)), -30.0   # softplus(sigma - 1) = density
        net[6].weight[0, 0], net[6].bias[0] = sig_in - sig_out, sig_out
        net[6].bias[1:] = torch.logit((colour + 0.001) / 1.002)
        c = _cameras()
        out = r(planes, c)

    # Closed form in float64, from the independently written utils.cameras rays.
    o, d = (t.double().reshape(2, -1, 3) for t in pixel_rays(c, 40, 40))

    def chord(half):
        """Entry distance and chord length (0 on a miss) of each ray through [-half, half]^3."""
        t0, t1 = (-half - o) / d, (half - o) / d
        near, far = torch.minimum(t0, t1).amax(-1), torch.maximum(t0, t1).amin(-1)
        return near, torch.where(far > near, far - near, 0.0)

    opacity = lambda L: 1 - torch.exp(-density * L)
    z0, L = chord(h)
    alpha = opacity(L)
    box_near, box_L = chord(box / 2)
    # Unnormalised depth; pixels of low opacity are clamped up to the batch-wide minimum sample
    # depth, which is the nearest entry into the box over all rays of both cameras.
    z_min = box_near[box_L > 0].min()
    depth = torch.clamp(z0 * alpha + alpha / density - L * torch.exp(-density * L), min=z_min)
    rgb = colour.double()[None, :, None] * alpha[:, None] + (1 - alpha[:, None])
    got_alpha = out["weights_samples"].reshape(2, -1).double()
    got_rgb = (out["image_raw"].reshape(2, 3, -1).double() + 1) / 2
    got_depth = out["image_depth"].reshape(2, -1).double()

    # Two discretisations separate the render from the closed form. Bilinear sampling blurs each
    # face by half a texel, and the official midpoint rule averages raw sigma across a face, so
    # the interval that straddles it adds almost nothing (about one sample spacing, 0.003 here, of
    # chord lost per face). The opacity therefore lies between those of cubes one texel smaller
    # and larger, up to that loss, and equals the closed form where the texel does not matter.
    texel = box / n
    lo, hi = opacity(chord(h - texel)[1]), opacity(chord(h + texel)[1])
    assert torch.all(got_alpha >= lo - 0.02) and torch.all(got_alpha <= hi + 1e-6)
    sharp = (hi - lo) < 0.01
    assert (sharp & (alpha > 0.3)).sum() > 100                     # many real chords are checked
    for got, want, tol in ((got_alpha, alpha, 0.02), (got_rgb, rgb, 0.02), (got_depth, depth, 0.03)):
        err = (got - want).abs().reshape(2, -1, 40 * 40).amax(1)   # worst channel per pixel
        assert err[sharp].max() < tol and err[sharp & (alpha > 0.05)].mean() < 0.006
    # Rays that miss the whole box: exactly white and transparent.
    miss = box_L == 0
    assert miss.sum() > 100
    assert torch.all(got_rgb.permute(0, 2, 1)[miss] == 1) and torch.all(got_alpha[miss] == 0)
    assert torch.allclose(got_depth[miss], z_min.expand(int(miss.sum())), atol=1e-5)


def test_gradients_reach_triplane_and_mlp():
    r = _random_renderer(resolution=8, n_coarse=16, n_importance=16)   # jitter on, as in training
    planes = _random_planes().requires_grad_()
    out = r(planes, _cameras(), generator=torch.Generator().manual_seed(0))
    (out["image_raw"].square().sum() + out["image_depth"].sum() + out["weights_samples"].sum()).backward()
    assert planes.grad is not None and torch.isfinite(planes.grad).all()
    for p in range(3):                         # every plane receives gradient
        assert planes.grad[0, 32 * p:32 * (p + 1)].abs().sum() > 0
    for name, p in r.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_jitter_flag():
    r = _random_renderer(resolution=8, n_coarse=16, n_importance=16)
    planes, c = _random_planes(), _cameras()
    with torch.no_grad():
        a = r(planes, c, generator=torch.Generator().manual_seed(1), return_coords=True)["all_coords"]
        b = r(planes, c, generator=torch.Generator().manual_seed(2), return_coords=True)["all_coords"]
        d1 = r(planes, c, deterministic=True, return_coords=True)["all_coords"]
        d2 = r(planes, c, deterministic=True, return_coords=True)["all_coords"]
    assert not torch.equal(a, b) and torch.equal(d1, d2)


def test_chunked_equals_unchunked():
    planes, c = _random_planes(), _cameras(radius=1.5)   # close: some rays miss the box
    full = _random_renderer(resolution=16, n_coarse=24, n_importance=24, deterministic=True)
    chunked = _random_renderer(resolution=16, n_coarse=24, n_importance=24, deterministic=True,
                                 chunk_rays=37)                    # not a divisor of 256
    with torch.no_grad():
        a, b = full(planes, c, return_coords=True), chunked(planes, c, return_coords=True)
    assert (a["weights_samples"] == 0).any()                       # rays that miss are in the batch
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_pixel_rays_render_the_full_image_at_those_pixels():
    planes, c = _random_planes(), _cameras(radius=1.5)   # some rays miss the box: they stay white
    r = _random_renderer(resolution=16, n_coarse=24, n_importance=24, deterministic=True)
    pixels = torch.stack([torch.randperm(256, generator=torch.Generator().manual_seed(j))[:40].sort().values
                          for j in range(2)])
    with torch.no_grad():
        full, part = r(planes, c), r(planes, c, pixels=pixels)
    for k in ("image_raw", "weights_samples"):
        assert part[k].shape == (2, full[k].shape[1], 1, 40)
        ref = full[k].flatten(2).gather(2, pixels[:, None].expand(-1, full[k].shape[1], -1))
        assert torch.allclose(part[k][:, :, 0], ref, atol=1e-5), k
