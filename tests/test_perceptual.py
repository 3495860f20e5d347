"""LPIPS: weights gathered from the torchvision / lpips file layouts, the distance against a
float64 recomputation, the disabled path, and the trainer using it."""
import json
import logging

import pytest
import torch
import torch.nn.functional as F

from losses.perceptual import SCALE, SHIFT, TAPS, VGG16, LPIPS, load_lpips
from scripts.make_lpips_weights import main as make_weights
from tests.helpers import train_log
from tests.test_train_vqvae import _train
from utils.checkpoint import CheckpointError


def _public_files(tmp_path):
    """Random weights in the layouts of torchvision's vgg16 .pth and lpips' vgg.pth."""
    g = torch.Generator().manual_seed(0)
    vgg, c, i = {}, 3, 0
    for v in VGG16:
        if v != "M":
            vgg[f"features.{i}.weight"] = torch.randn(v, c, 3, 3, generator=g) * (2.0 / (9 * c)) ** 0.5
            vgg[f"features.{i}.bias"] = torch.randn(v, generator=g) * 0.01
            c, i = v, i + 2
        else:
            i += 1
    vgg["classifier.0.weight"] = torch.zeros(2, 2)
    lin = {f"lin{k}.model.1.weight": torch.rand(1, ch, 1, 1, generator=g) for k, ch in
           enumerate((64, 128, 256, 512, 512))}
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(lin, tmp_path / "vgg.pth")
    assert make_weights(["--vgg", str(tmp_path / "vgg16.pth"), "--lin", str(tmp_path / "vgg.pth"),
                         "--out", str(tmp_path / "lpips.safetensors")]) == 0
    return vgg, lin, tmp_path / "lpips.safetensors"


def _reference(vgg, lin, x, y):
    """LPIPS written out with functional ops in float64, layer by layer from the public files."""
    def feats(z):
        h = (z.double() - torch.tensor(SHIFT, dtype=torch.float64).view(1, 3, 1, 1)) / \
            torch.tensor(SCALE, dtype=torch.float64).view(1, 3, 1, 1)
        out, i = [], 0
        for v in VGG16:
            if v == "M":
                h, i = F.max_pool2d(h, 2), i + 1
            else:
                h = F.relu(F.conv2d(h, vgg[f"features.{i}.weight"].double(), vgg[f"features.{i}.bias"].double(),
                                    padding=1))
                if i + 1 in TAPS:
                    out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
                i += 2
        return out
    return sum(F.conv2d((a - b) ** 2, lin[f"lin{k}.model.1.weight"].double()).mean((1, 2, 3))
               for k, (a, b) in enumerate(zip(feats(x), feats(y))))


def test_lpips_matches_a_float64_recomputation(tmp_path):
    vgg, lin, path = _public_files(tmp_path)
    net = load_lpips(path)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    d = net(x, y)
    ref = _reference(vgg, lin, x, y)
    assert torch.allclose(d.double(), ref, rtol=1e-4) and (d > 0).all()
    assert torch.equal(net(x, x), torch.zeros(2))
    x.requires_grad_(True)
    net(x, y).sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is None for p in net.parameters())


def test_missing_weights_disable_the_term_and_bad_files_are_named(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert load_lpips(tmp_path / "none.safetensors") is None
    assert "make_lpips_weights" in caplog.text
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_lpips(tmp_path / "bad.safetensors")
    torch.save({"features.0.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match="not the VGG16 / LPIPS files"):
        make_weights(["--vgg", str(tmp_path / "wrong.pth"), "--lin", str(tmp_path / "wrong.pth"),
                      "--out", str(tmp_path / "x.safetensors")])
    assert isinstance(LPIPS().train(), LPIPS) and not LPIPS().train().training


def test_training_uses_lpips_when_its_weights_exist(shapes_root, tmp_path):
    _, _, path = _public_files(tmp_path)
    assert _train(shapes_root, tmp_path / "run", 2, "--set", f"train.lpips_weights={path}",
                  "--set", "train.perceptual_start=0") == 0
    assert all(r["lpips"] > 0 for r in train_log(tmp_path / "run"))
    assert json.loads((tmp_path / "run/config.json").read_text())["kind"] == "vqvae"
