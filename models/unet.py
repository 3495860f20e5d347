"""The 2-D UNet of Convolutional Occupancy Networks (and Argus-3D's plane decoder), with the official
parameter names: down_convs.i.{conv1,conv2}, up_convs.i.{upconv,conv1,conv2}, conv_final.

Down level i (channels start_filts·2^i): conv3x3 + ReLU, conv3x3 + ReLU, then 2x2 max-pooling
except at the last level; up level: 2x2 transposed convolution halving the channels, concatenated
[upsampled, skip], conv3x3 + ReLU twice; a final 1x1 convolution. No normalisation; padding 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Down(nn.Module):
    def __init__(self, c_in: int, c_out: int, pool: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.pool = pool

    def forward(self, x):
        skip = F.relu(self.conv2(F.relu(self.conv1(x))))
        return (F.max_pool2d(skip, 2) if self.pool else skip), skip


class _Up(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.upconv = nn.ConvTranspose2d(c_in, c_out, 2, stride=2)
        self.conv1 = nn.Conv2d(2 * c_out, c_out, 3, padding=1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)

    def forward(self, x, skip):
        x = torch.cat([self.upconv(x), skip], 1)
        return F.relu(self.conv2(F.relu(self.conv1(x))))


class UNet(nn.Module):
    """(B, in_channels, H, W) -> (B, out_channels, H, W); H and W divisible by 2^(depth-1)."""

    def __init__(self, in_channels: int, out_channels: int, depth: int = 4, start_filts: int = 32):
        super().__init__()
        widths = [start_filts * 2 ** i for i in range(depth)]
        self.down_convs = nn.ModuleList(
            _Down(in_channels if i == 0 else widths[i - 1], w, pool=i < depth - 1) for i, w in enumerate(widths))
        self.up_convs = nn.ModuleList(_Up(widths[i], widths[i - 1]) for i in range(depth - 1, 0, -1))
        self.conv_final = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for down in self.down_convs:
            x, skip = down(x)
            skips.append(skip)
        for up, skip in zip(self.up_convs, reversed(skips[:-1])):
            x = up(x, skip)
        return self.conv_final(x)
