"""FlexiCubes: derived tables, extraction of analytic SDFs, gradients, the empty-shape fix, the
mesh renderer against an analytic silhouette, and the official FlexiCubes VQVAE conversion."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from models.vqvae import TriplaneVQVAE, VQVAEConfig, convert_official, ours_to_official
from renderers.flexicubes import (FlexiCubesConfig, FlexiCubesRenderer, MeshPointDecoder, fix_empty_shapes,
                                  flexicubes, voxel_grid)
from renderers.flexicubes_tables import CHECK_TABLE, CUBE_EDGES, DMC_TABLE, NUM_VD_TABLE
from utils.checkpoint import ConversionError
from scripts.convert_official import main as convert_main
from tests.official import fill, key_table, needs_official
from utils.cameras import normalized_intrinsics, orbit_c2w, pack_cameras, pixel_rays
from utils.checkpoint import load_model
from utils.cli import run
from utils.config import from_dict, load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "decoder.triplane_decoder."


def _tiny_cfg() -> VQVAEConfig:
    return load_config(VQVAEConfig, ROOT / "configs/vqvae/tiny.yaml", [
        "renderer_kind=flexicubes", "flexicubes.grid_res=8", "flexicubes.feat_dim=8",
        "flexicubes.hidden_dim=16", "flexicubes.resolution=16"])


def _mesh_stats(v, f):
    """Signed volume, area, and the number of faces at each undirected edge (2 everywhere: closed)."""
    t = v.double()[f]
    cross = torch.linalg.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0])
    volume = (t[:, 0] * torch.linalg.cross(t[:, 1], t[:, 2])).sum() / 6
    edges = torch.sort(torch.cat([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), 1).values
    return float(volume), float(cross.norm(dim=-1).sum() / 2), torch.unique(edges, dim=0, return_counts=True)[1]


# ----------------------------------------------------------------------------- tables

def test_derived_tables_are_consistent():
    assert NUM_VD_TABLE[0] == 0 and NUM_VD_TABLE[255] == 0
    assert int(NUM_VD_TABLE.max()) == 4 and int((NUM_VD_TABLE == 1).sum()) == 162
    for case in range(256):
        inside = [(case >> k) & 1 for k in range(8)]
        crossing = {e for e, (a, b) in enumerate(CUBE_EDGES.tolist()) if inside[a] != inside[b]}
        groups = [e for e in DMC_TABLE[case].reshape(-1).tolist() if e >= 0]
        assert sorted(groups) == sorted(crossing)                   # every crossing edge in one patch
        # Complementary cases cross the same edges; only CHECK_TABLE cases group them differently.
        if CHECK_TABLE[case, 0]:
            assert NUM_VD_TABLE[case] < NUM_VD_TABLE[255 - case]
    assert int(CHECK_TABLE[:, 0].sum()) == 36 and (CHECK_TABLE[:, 1:].abs().sum(-1) == CHECK_TABLE[:, 0]).all()


# ----------------------------------------------------------------------------- extraction

RES, SCALE = 24, 1.0
CELL = SCALE / RES


@pytest.mark.parametrize("training", [False, True])
def test_sphere_is_closed_and_on_the_surface(training):
    x, cubes = voxel_grid(RES, SCALE)
    r = 0.3
    v, f, l_dev = flexicubes(x, x.norm(dim=-1) - r, cubes, RES, training=training)
    volume, area, per_edge = _mesh_stats(v, f)
    assert (per_edge == 2).all()                                    # closed, manifold edges
    assert (v.norm(dim=-1) - r).abs().max() < 0.15 * CELL
    assert abs(volume / (4 / 3 * math.pi * r ** 3) - 1) < 0.04      # > 0: normals point outwards
    assert abs(area / (4 * math.pi * r ** 2) - 1) < 0.03
    assert f.shape[0] == (4 if training else 2) * (f.shape[0] // (4 if training else 2)) and l_dev.numel() > 0


def test_box_keeps_its_extent_and_corners():
    x, cubes = voxel_grid(RES, SCALE)
    h = torch.tensor([0.27, 0.21, 0.33])       # not on grid planes: no SDF exactly 0 at a vertex
    q = x.abs() - h
    sdf = q.clamp(min=0).norm(dim=-1) + q.amax(-1).clamp(max=0)
    v, f, _ = flexicubes(x, sdf, cubes, RES)
    volume, _, per_edge = _mesh_stats(v, f)
    assert (per_edge == 2).all()
    assert torch.allclose(v.amin(0), -h, atol=0.05 * CELL) and torch.allclose(v.amax(0), h, atol=0.05 * CELL)
    corners = torch.tensor([[i, j, k] for i in (-1, 1) for j in (-1, 1) for k in (-1, 1)]) * h
    assert torch.cdist(corners, v).amin(1).max() < CELL              # dual vertices round corners by < 1 cell
    assert abs(volume / float(8 * h.prod()) - 1) < 0.05


def test_gradients_reach_sdf_deformation_and_weights():
    res = 8
    x, cubes = voxel_grid(res, 1.0)
    sdf = (x.norm(dim=-1) - 0.3).requires_grad_()
    deform = torch.zeros_like(x, requires_grad=True)
    weights = torch.zeros(cubes.shape[0], 21, requires_grad=True)
    v, f, l_dev = flexicubes(x + deform, sdf, cubes, res, weights, training=True)
    (v.square().sum() + l_dev.sum()).backward()
    for g in (sdf.grad, deform.grad, weights.grad):
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    near = (sdf.detach().abs() < 1.0 / res)
    assert sdf.grad[~near].abs().sum() == 0 and sdf.grad[near].abs().sum() > 0   # only vertices by the surface
    assert weights.grad[:, 20].abs().sum() > 0                                   # gamma: the 4-way split


def test_empty_shape_fix_gives_a_mesh_and_no_gradient():
    res = 8
    x, cubes = voxel_grid(res, 1.0)
    sphere = x.norm(dim=-1) - 0.3
    sdf = torch.stack([sphere, torch.full_like(sphere, 0.2)]).requires_grad_()   # object 1 is all outside
    deform = torch.zeros(2, *x.shape, requires_grad=True)
    fixed, fixed_def, empty = fix_empty_shapes(sdf, deform, res)
    assert empty.tolist() == [False, True] and torch.equal(fixed[0], sdf[0])
    v, f, _ = flexicubes(x + fixed_def[1], fixed[1], cubes, res)
    assert f.shape[0] > 0
    (fixed.sum() + fixed_def.sum()).backward()
    assert (sdf.grad[1] == 0).all() and (deform.grad[1] == 0).all() and (sdf.grad[0] == 1).all()


# ----------------------------------------------------------------------------- network and renderer

def test_cube_weights_equal_the_concatenated_corner_mlp():
    torch.manual_seed(0)
    dec = MeshPointDecoder(feat_dim=4, hidden_dim=8)
    for p in dec.parameters():
        torch.nn.init.normal_(p)
    _, cubes = voxel_grid(3, 1.0)
    feats = torch.randn(2, 64, 12)
    direct = dec.net_weight(feats[:, cubes].reshape(2, cubes.shape[0], -1)) * 0.1
    assert torch.allclose(dec.cube_weights(feats, cubes), direct, atol=1e-5)


COLOUR = torch.tensor([0.2, 0.5, 0.8])
RGB = COLOUR * 1.002 - 0.001        # the decoder's widened sigmoid


def _sphere_renderer(radius: float, **cfg) -> tuple:
    """A renderer whose planes and decoder give SDF = |p|^2 - radius^2 (mesh units), no deformation,
    default FlexiCubes weights and a constant colour: plane p holds u^2 in channel 0, u its first
    coordinate, so the three planes sum to x^2 + y^2 + z^2; ReLUs pass it through a +1 offset."""
    r = FlexiCubesRenderer(FlexiCubesConfig(feat_dim=2, hidden_dim=4, **cfg))
    d = r.decoder
    with torch.no_grad():
        for p in d.parameters():
            p.zero_()
        d.net_sdf[0].weight[0, [0, 2, 4]] = 1
        d.net_sdf[0].bias[0] = 1 - radius ** 2
        d.net_sdf[2].weight[0, 0] = d.net_sdf[4].weight[0, 0] = d.net_sdf[6].weight[0, 0] = 1
        d.net_sdf[6].bias[0] = -1
        d.net_rgb[6].bias[:] = torch.logit(COLOUR)
    n = 64
    u = (torch.arange(n) + 0.5) / n * 2 - 1                          # plane pixel centres, mesh units
    planes = torch.zeros(1, 3, 2, n, n)
    planes[:, :, 0] = (u ** 2).expand(n, n)
    return r.eval(), planes


def _camera(az=30.0, el=20.0, radius=1.2):
    return torch.as_tensor(pack_cameras(orbit_c2w(az, el, radius)[None], normalized_intrinsics()))


@pytest.mark.parametrize("camera", ["world", "official"])
def test_renderer_silhouette_matches_the_analytic_sphere(camera):
    radius, res = 0.5, 40
    r, planes = _sphere_renderer(radius, grid_res=20, resolution=res, camera=camera, backend="torch")
    c = _camera()
    out = r(planes, c, deterministic=True, generator=torch.Generator())    # NeRF keywords, no effect
    assert {"image_raw", "image_depth", "image_mask", "weights_samples"} <= set(out)
    assert out["image_raw"].shape == (1, 3, res, res) and out["image_mask"].shape == (1, 1, res, res)
    o, d = pixel_rays(c, res, res)
    world_r = radius * r.mesh_to_world
    analytic = torch.linalg.cross(o[0], d[0]).norm(dim=-1) < world_r   # ray passes within world_r of the centre
    mask = out["image_mask"][0, 0] > 0.5
    iou = (mask & analytic).sum() / (mask | analytic).sum()
    assert iou > 0.9, float(iou)
    if camera == "world":
        img = out["image_raw"][0].permute(1, 2, 0)
        assert torch.allclose(img[mask], RGB * 2 - 1, atol=1e-5)
        assert (img[~mask] == 1).all() and (out["image_depth"][0, 0][~mask] == 0).all()
        centre = out["image_depth"][0, 0, res // 2 - 1:res // 2 + 1, res // 2 - 1:res // 2 + 1]
        assert (centre - (1.2 - world_r)).abs().max() < 0.02


def test_extract_mesh_and_views_per_object():
    r, planes = _sphere_renderer(0.5, grid_res=12, resolution=12, backend="torch")
    (v, f, colours), = r.extract_mesh(planes)
    assert v.dtype == torch.float32 and f.dtype == torch.long and colours.shape == v.shape
    assert torch.allclose(colours, RGB.expand_as(colours), atol=1e-5)
    assert (v.norm(dim=-1) - 0.5 * r.mesh_to_world).abs().max() < 0.02             # world units
    two_views = torch.cat([_camera(30.0), _camera(120.0)])
    out = r(planes, two_views)                                    # one object, two adjacent views
    assert out["image_raw"].shape == (2, 3, 12, 12) and out["image_mask"].sum() > 0


def test_tiny_flexicubes_vqvae_end_to_end():
    torch.manual_seed(0)
    model = TriplaneVQVAE(_tiny_cfg())
    assert isinstance(model.renderer, FlexiCubesRenderer)
    triplane, vq_loss, _ = model(torch.randn(2, 10, 16, 16))
    c = torch.as_tensor(pack_cameras(np.stack([orbit_c2w(30, 20, 2.0)]), normalized_intrinsics()))
    out = model.render(triplane, c)
    assert out["image_raw"].shape == (1, 3, 16, 16) and out["image_depth"].shape == (1, 1, 16, 16)
    loss = out["image_raw"].mean() + out["flexicubes_weight_reg"] + out["sdf_reg_loss_entropy"] + vq_loss
    loss.backward()
    assert model.renderer.decoder.net_weight[0].weight.grad.abs().sum() > 0
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- official weights

def _paper_flexicubes_on_meta():
    with torch.device("meta"):
        return TriplaneVQVAE(load_config(VQVAEConfig, ROOT / "configs/vqvae/paper_flexicubes.yaml"))


@needs_official
def test_official_flexicubes_vqvae_converts_and_loads_strictly():
    table = key_table("vqvae_flexicubes")
    model = _paper_flexicubes_on_meta()
    assert sum(p.numel() for p in model.parameters()) == sum(math.prod(s) for _, s, _, kind in table if kind == "param")
    # The renderer's tensors (the only ones unlike the NeRF VQVAE) are filled; the others, whose
    # conversion test_vqvae.py checks, only need their shapes.
    state = {k: (fill(k, s) if kind == "param" else torch.zeros(s)) if k.startswith(PREFIX)
             else torch.empty(s, device="meta") for k, s, _, kind in table}
    model.load_state_dict(convert_official(state, model), strict=True, assign=True)
    assert torch.equal(model.renderer.decoder.net_weight[6].bias, state[PREFIX + "decoder.net_weight.6.bias"])
    assert torch.equal(model.renderer.decoder.net_sdf[0].weight, state[PREFIX + "decoder.net_sdf.0.weight"])
    gone = PREFIX + "decoder.net_deformation.4.weight"
    missing = {k: v for k, v in state.items() if k != gone}
    with pytest.raises(ConversionError, match=f"missing tensor '{gone}'"):
        convert_official(missing, model)
    nerf = {k: torch.empty(s, device="meta") for k, s, _, _ in key_table("vqvae")}
    with pytest.raises(ConversionError, match=r"unexpected tensor 'decoder.triplane_decoder.decoder.net.0.weight'"):
        convert_official(nerf, model)


def test_convert_official_script_flexicubes(tmp_path, capsys):
    cfg = _tiny_cfg()
    (tmp_path / "tiny_fc.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    torch.manual_seed(0)
    model = TriplaneVQVAE(cfg)
    official = {**{ours_to_official(k): v for k, v in model.state_dict().items()}, "decoder.w_avg": torch.zeros(512)}
    assert PREFIX + "decoder.net_weight.0.weight" in official
    torch.save(official, tmp_path / "vqvae-flexicubes-ckpt.pt")
    args = ["--kind", "vqvae-flexicubes", "--src", str(tmp_path / "vqvae-flexicubes-ckpt.pt"),
            "--out", str(tmp_path / "out"), "--config", str(tmp_path / "tiny_fc.yaml")]
    assert convert_main(args) == 0
    state, saved_cfg, kind = load_model(tmp_path / "out", kind="vqvae")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert from_dict(VQVAEConfig, saved_cfg) == cfg

    del official[PREFIX + "decoder.net_rgb.6.bias"]
    torch.save(official, tmp_path / "bad.pt")
    with pytest.raises(SystemExit) as e:
        run(lambda: convert_main([*args[:2], "--src", str(tmp_path / "bad.pt"), *args[4:]]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "missing tensor 'decoder.triplane_decoder.decoder.net_rgb.6.bias'" in err
    with pytest.raises(SystemExit) as e:                           # a NeRF config under the FlexiCubes kind
        run(lambda: convert_main([*args[:4], "--out", str(tmp_path / "x"),
                                  "--config", str(ROOT / "configs/vqvae/tiny.yaml")]))
    assert e.value.code == 2 and "renderer_kind: flexicubes" in capsys.readouterr().err
