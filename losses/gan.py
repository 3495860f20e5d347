"""PatchGAN discriminator and hinge losses of the VQVAE's adversarial term."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    """pix2pix `NLayerDiscriminator`: 4x4 convs, `n_layers` stride-2 stages, LeakyReLU 0.2; one
    logit per receptive-field patch. (B, 3, H, W) in [-1, 1] -> (B, 1, h, w).

    norm: "batch" is the official choice; "group" (the default here) keeps the output of each
    image independent of the rest of the batch, so that training on N processes computes what
    one process computes on the same global batch.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "group"):
        super().__init__()
        if norm not in ("batch", "group"):
            raise ValueError(f"discriminator norm must be 'batch' or 'group', got {norm!r}")

        def norm_layer(c):
            return nn.BatchNorm2d(c) if norm == "batch" else nn.GroupNorm(min(32, c // 4) or 1, c)

        layers = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False), norm_layer(ndf * mult),
                       nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():           # the pix2pix initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        return self.main(x_B3HW)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()
