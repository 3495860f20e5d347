"""LPIPS (VGG16, Zhang et al. 2018), the perceptual term of the VQVAE loss and of eval_vqvae.

The network needs pretrained weights that cannot be downloaded at run time: the ImageNet VGG16
convolutions and LPIPS's linear heads, gathered into one safetensors file by
`scripts/make_lpips_weights.py` from the two public files. `load_lpips(path)` returns None, with
one warning saying how to make the file, when it is absent, so training goes on without the term.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from utils.checkpoint import CheckpointError

log = logging.getLogger(__name__)

# VGG16 `features`: output channels of each 3x3 conv ("M" = 2x2 max-pool), torchvision's indexing.
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
TAPS = (3, 8, 15, 22, 29)              # after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
TAP_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS's input scaling: (x - shift) / scale for x in [-1, 1] (ImageNet statistics in that range)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class LPIPS(nn.Module):
    """d(x, y) = Σ_layers mean_hw ‖w_l ⊙ (φ̂_l(x) − φ̂_l(y))‖², φ̂ = channel-normalised VGG features.
    Inputs (B, 3, H, W) in [-1, 1]; returns (B,). Frozen: gradients flow to the inputs only."""

    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for v in VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=False)]
                c = v
        self.vgg = nn.Sequential(*layers)
        self.lins = nn.ModuleList(nn.Conv2d(ch, 1, 1, bias=False) for ch in TAP_CHANNELS)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):          # always in eval mode
        return super().train(False)

    def features(self, x: torch.Tensor) -> list:
        h, out = (x - self.shift) / self.scale, []
        for i, layer in enumerate(self.vgg):
            h = layer(h)
            if i in TAPS:
                out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
            if i == TAPS[-1]:
                break
        return out

    def forward(self, x_B3HW: torch.Tensor, y_B3HW: torch.Tensor) -> torch.Tensor:
        fx, fy = self.features(x_B3HW.float()), self.features(y_B3HW.float())
        return sum(lin((a - b) ** 2).mean((1, 2, 3)) for lin, a, b in zip(self.lins, fx, fy))


def load_lpips(path, device="cpu") -> LPIPS | None:
    """The LPIPS network from our weights file, or None (with a warning) when there is none."""
    path = Path(path) if path else None
    if path is None or not path.is_file():
        log.warning("perceptual (LPIPS) term disabled: no weights at %s; make them with "
                    "scripts/make_lpips_weights.py (needs the VGG16 and LPIPS files, see its help)", path)
        return None
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable LPIPS weights ({e})") from None
    net = LPIPS()
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: not LPIPS weights (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return net.to(device)


def lpips_distance(net: LPIPS, x: torch.Tensor, y: torch.Tensor, min_size: int = 32) -> torch.Tensor:
    """LPIPS of images in [-1, 1], upsampled to at least `min_size` so that VGG's four pools
    keep a spatial extent on small patches."""
    if x.shape[-1] < min_size:
        x = F.interpolate(x, size=(min_size, min_size), mode="bilinear", align_corners=False)
        y = F.interpolate(y, size=(min_size, min_size), mode="bilinear", align_corners=False)
    return net(x, y)
