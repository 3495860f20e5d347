"""scripts/eval_vqvae.py on a tiny random VQVAE and a two-object synthetic G-buffer dataset."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.gbuffer import write_gbuffer_object, write_index
from models.vqvae import TriplaneVQVAE, VQVAEConfig
from renderers.nerf import camera_rays
from models.vqvae import load_vqvae
from scripts.eval_vqvae import gt_depth_at, main, render_camera_z, score_views
from tests.test_nerf_mesh import sphere_triplane
from utils.cameras import normalized_intrinsics, orbit_c2w, pack_cameras
from utils.checkpoint import CheckpointError, save_model
from utils.cli import run
from utils.config import load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]
VIEW_RES = 32          # the tiny encoder takes 16 px views: the views are resized


def cameras(n=12):
    c2w = np.stack([orbit_c2w(30 * i, 20 if i < 6 else -10, 2.0) for i in range(n)])
    return pack_cameras(c2w, normalized_intrinsics())


def write_dataset(root: Path, num=2) -> Path:
    """`num` objects of 12 views: a coloured disc at camera z 1.7 on white."""
    yy, xx = np.mgrid[:VIEW_RES, :VIEW_RES] + 0.5
    disc = ((xx - VIEW_RES / 2) ** 2 + (yy - VIEW_RES / 2) ** 2 < (VIEW_RES / 4) ** 2).astype(np.float32)
    alpha = np.repeat(disc[None], 12, 0)
    objs = []
    for k in range(num):
        colour = np.array([0.2 + 0.3 * k, 0.5, 0.8 - 0.3 * k])
        rgb = alpha[..., None] * colour + (1 - alpha[..., None])
        write_gbuffer_object(root / "disc" / f"{k:06d}", rgb, alpha, alpha * 1.7, np.zeros((12, VIEW_RES, VIEW_RES, 3)),
                             cameras(), f"disc {k}", str(k))
        objs.append(f"disc/{k:06d}")
    write_index(root, {"disc": objs})
    return root


def save_tiny_vqvae(out: Path) -> Path:
    cfg = load_config(VQVAEConfig, ROOT / "configs/vqvae/tiny.yaml")
    torch.manual_seed(0)
    model = TriplaneVQVAE(cfg)
    with torch.no_grad():                      # dense everywhere in the box: the masks overlap
        model.renderer.decoder.net[-1].bias[0] = 6.0
    save_model(out, model.state_dict(), to_dict(cfg), kind="vqvae")
    return out


def test_eval_writes_metrics_and_grid(tmp_path, capsys):
    data = write_dataset(tmp_path / "data")
    ckpt = save_tiny_vqvae(tmp_path / "ckpt")
    out, grid = tmp_path / "m.json", tmp_path / "g.png"
    assert main(["--ckpt", str(ckpt), "--data-dir", str(data), "--split", "all", "--resolution", "16",
                 "--out", str(out), "--grid", str(grid)]) == 0
    report = json.loads(out.read_text())
    assert report["num_objects"] == 2 and [o["path"] for o in report["objects"]] == ["disc/000000", "disc/000001"]
    for o in report["objects"] + [report["mean"]]:
        keys = ("psnr", "ssim", "mask_iou", "depth_error", "colour_error")
        assert set(o) >= set(keys) and "lpips" not in o
        assert all(isinstance(o[k], float) and np.isfinite(o[k]) for k in keys)
        assert 0 < o["mask_iou"] < 1 and -1 <= o["ssim"] <= 1
    assert report["mean"]["psnr"] == pytest.approx(np.mean([o["psnr"] for o in report["objects"]]))
    with Image.open(grid) as im:
        assert im.size == (4 * 2 * 16, 2 * 16)     # 4 views x (GT, reconstruction); 2 objects
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("2 objects (all, 16px) | PSNR")


def test_perfect_reconstruction_scores():
    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(3, 3, 16, 16, generator=g)
    alpha = (torch.rand(3, 16, 16, generator=g) > 0.3).float()
    depth = alpha * 1.7
    s = score_views(rgb, alpha, depth, alpha > 0.5, rgb, alpha, depth)
    assert torch.isinf(s["psnr"]).all() and torch.allclose(s["ssim"], torch.ones(3))
    assert (s["mask_iou"] == 1).all() and (s["depth_error"] == 0).all() and (s["colour_error"] == 0).all()


def test_rendered_depth_becomes_camera_z():
    """sum(w t) with opacity 0.8 and t = 1.7 / cos(ray, axis) reads as camera z 1.7; pixels at
    the batch minimum (the renderer's clamp) or of opacity <= 0.5 are not valid."""
    c = torch.from_numpy(cameras(2))
    res = 12
    _, dirs = camera_rays(c, res)
    cos = (dirs * c[:, None, [2, 6, 10]]).sum(-1).reshape(2, res, res)   # c2w third column: optical axis
    opacity = torch.full((2, res, res), 0.8)
    opacity[:, 0] = 0.3
    depth_sum = 0.8 * 1.7 / cos
    depth_sum[:, 0] = depth_sum.min() * 0.5           # clamped: the batch minimum
    depth_sum[1, 5, 5] = depth_sum[:, 0].min()        # an opaque pixel clamped as well
    out = {"image_depth": depth_sum[:, None], "weights_samples": opacity[:, None]}
    z, valid = render_camera_z(out, c, res)
    assert not valid[:, 0].any() and not valid[1, 5, 5] and valid[:, 1:].sum() == 2 * (res - 1) * res - 1
    np.testing.assert_allclose(z[valid].numpy(), 1.7, rtol=1e-5)


def test_rendered_sphere_depth_matches_analytic_camera_z():
    """A sharp sphere of radius 0.4 at the origin: the normalised, camera-z rendered depth is the
    analytic first hit's camera z, well within the 0.03 that a ray distance would be off by."""
    radius, res = 0.4, 16
    renderer, planes = sphere_triplane((0.0, 0.0, 0.0), radius, K=1e6)
    renderer.cfg.n_coarse = renderer.cfg.n_importance = 48
    c = torch.from_numpy(cameras(3))
    with torch.no_grad():
        z, valid = render_camera_z(renderer(planes[None], c, resolution=res, deterministic=True), c, res)
    o, d = camera_rays(c, res)
    od = (o * d).sum(-1)
    disc = od ** 2 - ((o * o).sum(-1) - radius ** 2)
    t = -od - disc.clamp_min(0).sqrt()                                  # first hit, ray distance
    z_true = (t * (d * c[:, None, [2, 6, 10]]).sum(-1)).reshape(3, res, res)
    hit = (disc > 0).reshape(3, res, res)
    assert torch.equal(valid, hit)
    assert (z - z_true)[hit].abs().max() < 0.012          # grazing rays are the worst
    assert (t.reshape(3, res, res) - z_true)[hit].abs().max() > 0.03


def test_gt_depth_is_normalised_by_coverage():
    depth = torch.zeros(12, 4, 4)
    depth[:, :, :2] = 1.5                              # left half at 1.5
    sample = {"depth": depth, "target_depth": torch.nn.functional.interpolate(
        depth[:, None], size=(2, 2), mode="bilinear", align_corners=False)[:, 0]}
    assert torch.equal(gt_depth_at(sample, 2), torch.tensor([[1.5, 0.0], [1.5, 0.0]]).expand(12, 2, 2))
    # The silhouette pixel of a 3-px resize is half foreground: it reads 1.5, not 0.75.
    sample["target_depth"] = torch.nn.functional.interpolate(depth[:, None], size=(3, 3), mode="bilinear",
                                                             align_corners=False)[:, 0]
    np.testing.assert_allclose(gt_depth_at(sample, 3)[0, :, :2].numpy(), 1.5, rtol=1e-6)


def test_errors_are_one_line(tmp_path, capsys):
    data = write_dataset(tmp_path / "data", num=1)
    for argv, needle in [(["--ckpt", str(tmp_path / "nope"), "--data-dir", str(data)], "no checkpoint at"),
                         (["--ckpt", str(save_tiny_vqvae(tmp_path / "ck")), "--data-dir", str(tmp_path / "none")],
                          "dataset.json: missing file")]:
        with pytest.raises(SystemExit) as e:
            run(lambda: main(argv))
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]


def test_weights_that_do_not_fit_the_config(tmp_path):
    ckpt = save_tiny_vqvae(tmp_path / "ck")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.pop("kind")
    state = TriplaneVQVAE(load_config(VQVAEConfig, ROOT / "configs/vqvae/tiny.yaml")).state_dict()
    state.pop("quant_conv.bias")
    save_model(ckpt, state, cfg, kind="vqvae")
    with pytest.raises(CheckpointError, match="weights do not match.*quant_conv.bias"):
        load_vqvae(ckpt)
