"""What the VQVAE encoder takes, built from an object's views: the one home of the model's input.

The official input is a stack of views, each 10 channels: ImageNet-normalised RGB, the Plücker
rays of its camera (6) and its depth. An object has NUM_VIEWS = 12 views, in two sets of 6 that
each circle it once; the encoder takes one set at a time (`input_view_sets`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from utils.cameras import plucker_rays

NUM_VIEWS = 12
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_normalise(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) RGB in [0, 1] -> ImageNet mean/std normalised."""
    mean = torch.tensor(IMAGENET_MEAN, device=rgb.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=rgb.device).view(3, 1, 1)
    return (rgb - mean) / std


def encoder_input(rgb_V3HW: torch.Tensor, plucker_V6HW: torch.Tensor, depth_VHW: torch.Tensor) -> torch.Tensor:
    """The official 10-channel encoder input: ImageNet-normalised RGB (from [0, 1]), Plucker
    rays, raw depth. Works batched too ((..., V, C, H, W)). Returns (..., V, 10, H, W)."""
    return torch.cat([imagenet_normalise(rgb_V3HW), plucker_V6HW, depth_VHW.unsqueeze(-3)], -3)


def input_view_sets(num_views: int, total: int = NUM_VIEWS) -> list[list[int]]:
    """The two encoder inputs of an object, as the official loader makes them: views 0-5 and views
    6-11 (each half circles the object once). With fewer than 6 encoder views, each half is
    thinned evenly (2 views: [0, 3] and [6, 9]). Both sets are supervised on all views."""
    half = total // 2
    if not 1 <= num_views <= half:
        raise ValueError(f"num_views must be between 1 and {half}, got {num_views}")
    return [[h * half + (i * half) // num_views for i in range(num_views)] for h in (0, 1)]


def encoder_views(rgb_BV3HW: torch.Tensor, depth_BVHW: torch.Tensor, c_BV25: torch.Tensor, view_ids,
                  size: int) -> torch.Tensor:
    """The encoder input of a batch of objects from the chosen views, at the encoder's size.

    rgb in [0, 1], depth as decoded (0 = background), cameras as c.npy rows. Views stored at
    another resolution are resized (RGB area-averaged, depth nearest so that no depth between
    object and background is invented) and their Plucker rays recomputed at `size`.
    Returns (B·V, 10, size, size), the views of an object adjacent.
    """
    rgb, depth, c = rgb_BV3HW[:, view_ids], depth_BVHW[:, view_ids], c_BV25[:, view_ids]
    B, V = rgb.shape[:2]
    rgb, depth, c = rgb.flatten(0, 1).float(), depth.flatten(0, 1).float(), c.flatten(0, 1).float()
    if rgb.shape[-1] != size or rgb.shape[-2] != size:
        rgb = F.interpolate(rgb, size=(size, size), mode="area")
        depth = F.interpolate(depth[:, None], size=(size, size), mode="nearest-exact")[:, 0]
    return encoder_input(rgb, plucker_rays(c.cpu(), size, size).to(rgb), depth)
