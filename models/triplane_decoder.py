"""The VQVAE decoder: quantized latent planes -> triplane.

    f_hat (B·3, 8, 16, 16) per plane, as the quantizer returns it
      -> post_quant_conv (per plane)                  -> (B, 24, 16, 16)   plane p = channels 8p..8p+7
      -> ldm_upsample (3x3 group conv, token embed)   -> (B, 3·256, 768)   plane-major tokens
      -> vit_decoder (DiT, the tokens enter only through per-token adaLN) -> (B, 3·256, 768)
      -> conv_sr (LDM conv decoder, per plane, 16 -> 128)                 -> (B, 96, 128, 128)

Parameter names equal the official VQVAE keys up to a fixed prefix (`official_to_ours`), so an
official state dict loads strictly. The official runs everything before conv_sr under a bf16
autocast; here that is `compute_dtype` (float32 by default, which is what the parity tests use).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.ldm_blocks import AttnBlock, ResnetBlock, Upsample, group_norm

from models.layout import NUM_PLANES, merge_planes


def official_to_ours(key: str) -> str | None:
    """Map an official VQVAE state-dict key to ours, or None when it is not part of this module.

    `decoder.superresolution.{post_quant_conv,ldm_upsample,conv_sr}.*` lose the prefix
    `decoder.superresolution.`; `decoder.vit_decoder.*` loses `decoder.`. Everything else
    (encoder, quant_conv, quantize, triplane_decoder, the w_avg buffer) maps to None.
    """
    sr = "decoder.superresolution."
    if key.startswith(sr) and key[len(sr):].split(".")[0] in ("post_quant_conv", "ldm_upsample", "conv_sr"):
        return key[len(sr):]
    if key.startswith("decoder.vit_decoder."):
        return key[len("decoder."):]
    return None


@dataclass
class TriplaneDecoderConfig:
    """Sizes of the decoder; the defaults are the paper's (official `ft` + DiT2-B/2)."""
    latent_channels: int = 8        # Cvae: channels per plane of the quantized latent
    latent_size: int = 16           # plane side of the latent = token grid side
    hidden: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: int = 4
    sr_ch: int = 32                 # conv_sr base width
    sr_ch_mult: tuple = (1, 2, 2, 4)
    sr_num_res_blocks: int = 1
    sr_norm_groups: int = 32        # GroupNorm groups in conv_sr (must divide every width)
    triplane_channels: int = 32     # per plane; the triplane has 3x this many channels
    compute_dtype: str = "float32"  # "bfloat16" reproduces the official autocast
    tokens_in_stream: bool = False  # also add the latent tokens to the DiT's query stream (not
                                    # official: there they enter only through adaLN)


# ----------------------------------------------------------------------------- DiT decoder

def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """(grid_h·grid_w, dim) fixed 2-D sin-cos embedding, row-major tokens.

    As in DiT/MAE, the first half of the channels encodes the column index and the second half
    the row index; each half is [sin | cos] over frequencies 10000^(-k/(dim/4)).
    """
    assert dim % 4 == 0
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float32), np.arange(grid_w, dtype=np.float32), indexing="ij")

    def embed_1d(pos):
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    return torch.from_numpy(np.concatenate([embed_1d(cols), embed_1d(rows)], axis=1)).float()


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (keys qkv, proj)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        B, L, C = x_BLC.shape
        q, k, v = self.qkv(x_BLC).view(B, L, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)          # (B, heads, L, C/heads)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class FeedForward(nn.Module):
    """Linear -> exact GELU -> Linear, both without bias: the official xformers FusedMLP,
    whose two FusedDropoutBias biases are plain always-zero tensors outside the state dict."""

    def __init__(self, dim: int, ratio: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, ratio * dim, bias=False), nn.GELU(),
                                 nn.Linear(ratio * dim, dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class DiTBlock(nn.Module):
    """Pre-norm transformer block whose shift/scale/gate come per token from a condition.

    x, c: (N, L, C) -> (N, L, C). Norms are LayerNorm without affine, eps 1e-6.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = FeedForward(dim, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa * self.attn(self.norm1(x) * (1 + scale_msa) + shift_msa)
        return x + gate_mlp * self.mlp(self.norm2(x) * (1 + scale_mlp) + shift_mlp)


class DiTDecoder(nn.Module):
    """The official DiT2 without x/t embedders and final layer.

    The query stream starts as the learned `pos_embed` (1, 3·L, C); the condition tokens c
    (B, 3·L, C) enter only through adaLN (with cfg.tokens_in_stream they are also added to the
    stream, so that a fresh decoder already passes them on). Even blocks attend within each
    plane, odd blocks over all 3·L tokens. No final norm. Returns (B, 3·L, C).
    """

    def __init__(self, cfg: TriplaneDecoderConfig):
        super().__init__()
        s = cfg.latent_size
        self.tokens_in_stream = cfg.tokens_in_stream
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(cfg.hidden, NUM_PLANES * s, s)[None])
        self.blocks = nn.ModuleList(DiTBlock(cfg.hidden, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self._init_weights()

    def _init_weights(self):
        # DiT's initialisation: xavier linears, zero biases, zeroed adaLN (each block starts as
        # the identity, so a fresh decoder outputs pos_embed whatever the condition).
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for blk in self.blocks:
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)

    def forward(self, c_BLC: torch.Tensor) -> torch.Tensor:
        B, L, C = c_BLC.shape
        x = self.pos_embed + c_BLC if self.tokens_in_stream else self.pos_embed.expand(B, -1, -1)
        c_per_plane = c_BLC.reshape(B * NUM_PLANES, L // NUM_PLANES, C)
        for i, blk in enumerate(self.blocks):
            if i % 2 == 0:       # within-plane attention: planes folded into the batch
                x = blk(x.reshape(B * NUM_PLANES, L // NUM_PLANES, C), c_per_plane)
            else:                # global attention over the three planes
                x = blk(x.reshape(B, L, C), c_BLC)
        return x.reshape(B, L, C)


# ----------------------------------------------------------------------------- token embed

class PlaneTokenEmbed(nn.Module):
    """The official PatchEmbedTriplane: (B, 3·Cvae, h, w) -> (B, 3·h·w, C) plane-major tokens.

    A 3x3 conv with groups=3 (group p reads plane p), but its 3·C outputs are read as
    (C, 3): token (plane p, y·w+x) channel c is conv output channel 3c+p, not p·C+c. This
    interleave does not follow the groups; it is kept because the trained weights assume it.
    """

    def __init__(self, latent_channels: int, hidden: int):
        super().__init__()
        self.proj = nn.Conv2d(NUM_PLANES * latent_channels, NUM_PLANES * hidden, 3, 1, 1, groups=NUM_PLANES)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        y = self.proj(x_BChw)
        B, _, h, w = y.shape
        return y.view(B, -1, NUM_PLANES, h, w).flatten(2).transpose(1, 2)     # (B, 3·h·w, C)


# ----------------------------------------------------------------------------- conv_sr

class ConvUpsampler(nn.Module):
    """The LDM `Decoder` (no timestep, no up-path attention): (N, hidden, s, s) ->
    (N, triplane_channels, s·2^(len(ch_mult)-1), same). Keys conv_in, mid.{block_1, attn_1,
    block_2}, up.{level}.{block.{i}, upsample.conv}, norm_out, conv_out (level 0 = finest)."""

    def __init__(self, cfg: TriplaneDecoderConfig):
        super().__init__()
        g, widths = cfg.sr_norm_groups, [cfg.sr_ch * m for m in cfg.sr_ch_mult]
        c = widths[-1]
        self.conv_in = nn.Conv2d(cfg.hidden, c, 3, 1, 1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(c, c, g)
        self.mid.attn_1 = AttnBlock(c, g)
        self.mid.block_2 = ResnetBlock(c, c, g)
        levels = []
        for level in reversed(range(len(widths))):      # coarsest first, like the forward pass
            up = nn.Module()
            up.block = nn.ModuleList()
            for _ in range(cfg.sr_num_res_blocks + 1):
                up.block.append(ResnetBlock(c, widths[level], g))
                c = widths[level]
            up.upsample = Upsample(c) if level != 0 else None
            levels.insert(0, up)
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(c, g)
        self.conv_out = nn.Conv2d(c, cfg.triplane_channels, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for up in reversed(self.up):
            for blk in up.block:
                h = blk(h)
            if up.upsample is not None:
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------- the decoder

class TriplaneDecoder(nn.Module):
    """Quantized latent planes (B·3, Cvae, s, s) -> triplane (B, 3·triplane_channels, R, R),
    R = s·2^(len(sr_ch_mult)-1) (paper: (B·3, 8, 16, 16) -> (B, 96, 128, 128))."""

    def __init__(self, cfg: TriplaneDecoderConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or TriplaneDecoderConfig()
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 3, 1, 1)
        self.ldm_upsample = PlaneTokenEmbed(cfg.latent_channels, cfg.hidden)
        self.vit_decoder = DiTDecoder(cfg)
        self.conv_sr = ConvUpsampler(cfg)

    def stages(self, f_hat_BPChw: torch.Tensor) -> dict:
        """Every intermediate: post_quant_conv (B, 3·Cvae, s, s), ldm_upsample and dit_out
        (B, 3·s², hidden), triplane (B, 3·triplane_channels, R, R), all float32."""
        dtype = getattr(torch, self.cfg.compute_dtype)
        with torch.autocast(f_hat_BPChw.device.type, dtype=dtype, enabled=dtype != torch.float32):
            f_BChw = merge_planes(self.post_quant_conv(f_hat_BPChw))
            tokens_BLC = self.ldm_upsample(f_BChw)
            x_BLC = self.vit_decoder(tokens_BLC)
        triplane = self.tokens_to_triplane(x_BLC.float())
        return dict(post_quant_conv=f_BChw.float(), ldm_upsample=tokens_BLC.float(), dit_out=x_BLC.float(),
                    triplane=triplane)

    def tokens_to_triplane(self, x_BLC: torch.Tensor) -> torch.Tensor:
        """(B, 3·s², hidden) plane-major tokens -> conv_sr per plane -> (B, 3·triplane_channels, R, R)."""
        B, L, C = x_BLC.shape
        s = int(round((L // NUM_PLANES) ** 0.5))
        planes = x_BLC.reshape(B, NUM_PLANES, s, s, C).permute(0, 1, 4, 2, 3).reshape(B * NUM_PLANES, C, s, s)
        out = self.conv_sr(planes)                                   # (B·3, c, R, R)
        return out.reshape(B, NUM_PLANES * out.shape[1], *out.shape[-2:])

    def forward(self, f_hat_BPChw: torch.Tensor) -> torch.Tensor:
        """(B·3, Cvae, s, s) -> triplane (B, 3·triplane_channels, R, R), planes in channel blocks."""
        return self.stages(f_hat_BPChw)["triplane"]
