"""The multi-view encoder of the SAR3D VQVAE: V posed views of an object → one triplane latent.

Each view (RGB ImageNet-normalised, Plücker rays [o × d, d], raw depth; see
`models.inputs.encoder_input`) goes through an LDM-style convolutional down path. In the
middle, one transformer block lets the views talk to each other: its first self-attention runs
over the tokens of all V views of an object at once, its second within each view. The V
per-view maps are then concatenated on channels, in view order, and fused by a 3×3 conv into
the latent of 3 planes × Cvae channels. With `lift_samples` > 0 (our small configs, not the
official model) models/lift.py's geometric lifting of the views onto the planes is added to it.

Parameter names equal the official `MVEncoder` keys with the prefix `encoder.` removed, so the
official weights load with a prefix strip. Layout suffixes follow VAR: `x_NChw` has N = B·V
views (views of an object adjacent), `f_BChw` one row per object.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.ldm_blocks import Downsample, ResnetBlock, group_norm
from models.layout import NUM_PLANES, split_planes
from models.lift import ViewLift


@dataclass
class EncoderConfig:
    """Sizes of the encoder; the defaults are the paper configuration (45,085,648 parameters)."""
    in_channels: int = 10             # RGB 3 + Plücker 6 + depth 1
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # one level per entry; a stride-2 downsample between levels
    num_res_blocks: int = 2
    z_channels: int = 24              # NUM_PLANES × Cvae
    num_views: int = 6
    num_heads: int = 8
    head_dim: int = 64
    depth: int = 1                    # transformer blocks in the mid attention
    dropout: float = 0.0
    lift_samples: int = 0             # points per latent texel of models/lift.py's lifting; 0: none (official)
    lift_level: int = 1               # the down level whose features (after its blocks) the lift reads
    lift_hidden: int = 32             # width of the lift's embedding of each (point, view) sample


class Attention(nn.Module):
    """Multi-head self-attention, no q/k/v biases; softmax scale head_dim^-½. (N, L, D) → (N, L, D).
    `to_out` is a Sequential so that its Linear is named `to_out.0` as in the official keys."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, dropout: float = 0.0):
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x_NLD: torch.Tensor) -> torch.Tensor:
        N, L, _ = x_NLD.shape
        q, k, v = (proj(x_NLD).view(N, L, self.num_heads, -1).transpose(1, 2)
                   for proj in (self.to_q, self.to_k, self.to_v))
        o = F.scaled_dot_product_attention(q, k, v)        # (N, heads, L, head_dim)
        return self.to_out(o.transpose(1, 2).reshape(N, L, -1))


class GEGLU(nn.Module):
    """Linear to 2·hidden, split into value and gate; value · GELU(gate) (exact erf GELU)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU(dim → 4·dim) → dropout → Linear(4·dim → dim); keys `net.0.proj`, `net.2`."""

    def __init__(self, dim: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(dropout), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MultiViewTransformerBlock(nn.Module):
    """Pre-norm block: self-attention over all views of an object jointly, then within each
    view, then the feed-forward. x (B·V, L, D) → (B·V, L, D), L = h·w tokens per view."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, dropout: float = 0.0):
        super().__init__()
        self.attn1 = Attention(dim, num_heads, head_dim, dropout)
        self.ff = FeedForward(dim, dropout)
        self.attn2 = Attention(dim, num_heads, head_dim, dropout)
        self.norm1 = nn.LayerNorm(dim)     # PyTorch default eps 1e-5, as the official
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x_NLD: torch.Tensor, num_views: int) -> torch.Tensor:
        N, L, D = x_NLD.shape
        # Views of an object are adjacent, so this view joins their tokens view-major.
        x_BlD = x_NLD.reshape(N // num_views, num_views * L, D)
        x_BlD = x_BlD + self.attn1(self.norm1(x_BlD))
        x_NLD = x_BlD.reshape(N, L, D)
        x_NLD = x_NLD + self.attn2(self.norm2(x_NLD))
        return x_NLD + self.ff(self.norm3(x_NLD))


class MultiViewSpatialTransformer(nn.Module):
    """GroupNorm → 1×1 `proj_in` → transformer blocks on the h·w tokens → 1×1 `proj_out`,
    residual around it all. (B·V, C, h, w) → (B·V, C, h, w)."""

    def __init__(self, channels: int, num_heads: int, head_dim: int, depth: int = 1, dropout: float = 0.0):
        super().__init__()
        inner = num_heads * head_dim
        self.norm = group_norm(channels)
        self.proj_in = nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            MultiViewTransformerBlock(inner, num_heads, head_dim, dropout) for _ in range(depth))
        self.proj_out = nn.Conv2d(inner, channels, 1)
        # Zero-initialised so that a fresh block starts as the identity (the official intent).
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x_NChw: torch.Tensor, num_views: int) -> torch.Tensor:
        N, _, h, w = x_NChw.shape
        t = self.proj_in(self.norm(x_NChw)).flatten(2).transpose(1, 2)    # (N, h·w, inner)
        for block in self.transformer_blocks:
            t = block(t, num_views)
        t = t.transpose(1, 2).reshape(N, -1, h, w)
        return x_NChw + self.proj_out(t)


class MultiViewEncoder(nn.Module):
    """V views of B objects, (B·V, in_channels, H, W) with the views of an object adjacent →
    fused latent (B, z_channels, H/2^(L−1), W/2^(L−1)), L = len(ch_mult); the paper config
    maps (B·6, 10, 256, 256) → (B, 24, 16, 16).

    Build with a config, keyword overrides of the defaults, or both:
    `MultiViewEncoder()`, `MultiViewEncoder(ch=32, ch_mult=(1, 2))`.
    """

    def __init__(self, cfg: EncoderConfig | None = None, box_side: float = 0.9, **overrides):
        """box_side: the triplane's extent in world units (the renderer's), used by the lift only."""
        super().__init__()
        cfg = dataclasses.replace(cfg or EncoderConfig(), **overrides)
        cfg.ch_mult = tuple(cfg.ch_mult)
        self.cfg = cfg
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)

        self.down = nn.ModuleList()
        block_in = cfg.ch
        for level, mult in enumerate(cfg.ch_mult):
            stage = nn.Module()
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, cfg.ch * mult, dropout=cfg.dropout))
                block_in = cfg.ch * mult
            stage.block = nn.ModuleList(blocks)
            if level != len(cfg.ch_mult) - 1:
                stage.downsample = Downsample(block_in)
            self.down.append(stage)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout=cfg.dropout)
        self.mid.attn_1 = MultiViewSpatialTransformer(block_in, cfg.num_heads, cfg.head_dim,
                                                      cfg.depth, cfg.dropout)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout=cfg.dropout)

        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, padding=1)
        # Concatenating the views on channels makes fusion depend on view order (by design:
        # the official views come in a fixed camera order).
        self.fusion_layer = nn.Conv2d(cfg.num_views * cfg.z_channels, cfg.z_channels, 3, padding=1)
        if cfg.lift_samples > 0:
            if not 0 <= cfg.lift_level < len(cfg.ch_mult):
                raise ValueError(f"encoder.lift_level must name a down level (0..{len(cfg.ch_mult) - 1}), "
                                 f"got {cfg.lift_level}")
            self.lift = ViewLift(cfg.ch * cfg.ch_mult[cfg.lift_level], cfg.z_channels // NUM_PLANES, cfg.num_views,
                                 box_side, cfg.lift_samples, cfg.lift_hidden)

    def encode_views(self, x_NChw: torch.Tensor) -> torch.Tensor:
        """Per-view maps before fusion: (B·V, in_channels, H, W) → (B·V, z_channels, h, w)."""
        return self._encode(x_NChw)[0]

    def _encode(self, x_NChw: torch.Tensor):
        """→ per-view maps (B·V, z_channels, h, w) and the features of down level `lift_level`."""
        V = self.cfg.num_views
        if x_NChw.shape[0] % V:
            raise ValueError(f"batch of {x_NChw.shape[0]} views is not a multiple of num_views={V}")
        h, level_feat = self.conv_in(x_NChw), None
        for level, stage in enumerate(self.down):
            for block in stage.block:
                h = block(h)
            if level == self.cfg.lift_level:
                level_feat = h
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h), V))
        return self.conv_out(F.silu(self.norm_out(h))), level_feat

    def fuse(self, f_NChw: torch.Tensor) -> torch.Tensor:
        """(B·V, z, h, w) → (B, z, h, w): the V maps of an object concatenated view-major
        (channel v·z + c is channel c of view v), then `fusion_layer`."""
        N, C, h, w = f_NChw.shape
        return self.fusion_layer(f_NChw.reshape(N // self.cfg.num_views, self.cfg.num_views * C, h, w))

    def forward(self, x_NChw: torch.Tensor) -> torch.Tensor:
        """(B·V, in_channels, H, W) → fused latent (B, z_channels, h, w)."""
        maps, level_feat = self._encode(x_NChw)
        fused = self.fuse(maps)
        if self.cfg.lift_samples > 0:
            fused = fused + self.lift(x_NChw, level_feat, fused.shape[-1])
        return fused

    def encode_planes(self, x_NChw: torch.Tensor) -> torch.Tensor:
        """(B·V, in_channels, H, W) → per-plane latents (B·3, z_channels/3, h, w), the
        quantizer's input layout (official 'latent_planes')."""
        return split_planes(self(x_NChw))
