"""The multi-scale triplane VQVAE of SAR3D, assembled: views -> latent planes -> tokens ->
triplane -> renders.

    x (B·V, 10, H, W) --encoder--> (B, 3·Cvae, h, w) --split planes, quant_conv--> f (B·3, Cvae, h, w)
      --quantizer--> f_hat (B·3, Cvae, h, w) / token ids per scale
      --decoder--> triplane (B, 3·C, R, R) --renderer--> rgb, depth, opacity per camera

The renderer is the NeRF one (vqvae-ckpt.pt) or, with `renderer_kind: flexicubes`, the FlexiCubes
mesh renderer of the official FlexiCubes VQVAE (vqvae-flexicubes-ckpt.pt), which differs only there.

`official_key(key)` maps every tensor name of an official checkpoint to ours; `convert_official(state)`
does the whole state dict and names any missing, unexpected or mis-shaped tensor.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from models.encoder import EncoderConfig, MultiViewEncoder
from models.layout import as_planes, split_planes
from models.quantizer import TriplaneQuantizer
from models.triplane_decoder import TriplaneDecoder, TriplaneDecoderConfig, official_to_ours
from renderers.flexicubes import FlexiCubesConfig, FlexiCubesRenderer
from renderers.nerf import NeRFConfig, NeRFRenderer
from utils.checkpoint import load_built, map_official_state
from utils.config import from_dict


@dataclass
class QuantizerConfig:
    vocab_size: int = 16384
    c_vae: int = 8
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    beta: float = 0.25
    phi_ratio: float = 0.5
    num_phi: int = 4
    official_quirks: bool = True      # the official codebook-row conventions (models/quantizer.py)


@dataclass
class VQVAEConfig:
    """Defaults are the paper configuration (configs/vqvae/paper.yaml). `renderer_kind` picks the
    renderer section that is built: `renderer` (NeRF) or `flexicubes`; the other one is unused."""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    decoder: TriplaneDecoderConfig = field(default_factory=TriplaneDecoderConfig)
    renderer: NeRFConfig = field(default_factory=NeRFConfig.vqvae_training)
    renderer_kind: Literal["nerf", "flexicubes"] = "nerf"
    flexicubes: FlexiCubesConfig = field(default_factory=lambda: FlexiCubesConfig(resolution=256))  # 256^2 as NeRF

    @property
    def input_size(self) -> int:
        """Side of the views the encoder takes: the latent side times its downsampling."""
        return self.decoder.latent_size * 2 ** (len(self.encoder.ch_mult) - 1)

    @property
    def active_renderer(self) -> NeRFConfig | FlexiCubesConfig:
        return self.flexicubes if self.renderer_kind == "flexicubes" else self.renderer

    def __post_init__(self):
        c, q, d = self.encoder, self.quantizer, self.decoder
        if c.z_channels != 3 * q.c_vae or d.latent_channels != q.c_vae:
            raise ValueError(f"encoder.z_channels ({c.z_channels}) must be 3 x quantizer.c_vae ({q.c_vae}) "
                             f"and decoder.latent_channels ({d.latent_channels}) equal to it")
        if q.patch_nums[-1] != d.latent_size:
            raise ValueError(f"the last quantizer scale ({q.patch_nums[-1]}) must equal decoder.latent_size "
                             f"({d.latent_size})")
        section = "flexicubes" if self.renderer_kind == "flexicubes" else "renderer"
        if self.active_renderer.feat_dim != d.triplane_channels:
            raise ValueError(f"{section}.feat_dim ({self.active_renderer.feat_dim}) must equal "
                             f"decoder.triplane_channels ({d.triplane_channels})")


class TriplaneVQVAE(nn.Module):
    def __init__(self, cfg: VQVAEConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or VQVAEConfig()
        self.encoder = MultiViewEncoder(cfg.encoder, box_side=cfg.active_renderer.box_side)
        c = cfg.quantizer.c_vae
        self.quant_conv = nn.Conv2d(c, c, 3, padding=1)
        self.quantizer = TriplaneQuantizer(**dataclasses.asdict(cfg.quantizer))
        self.decoder = TriplaneDecoder(cfg.decoder)
        if cfg.renderer_kind == "flexicubes":
            self.renderer = FlexiCubesRenderer(cfg.flexicubes)
        else:
            self.renderer = NeRFRenderer(cfg.renderer)

    def encode(self, x_NChw: torch.Tensor) -> torch.Tensor:
        """Views (B·V, 10, H, W) -> pre-quantization planes f (B·3, Cvae, h, w), row 3b+p = plane p."""
        return self.quant_conv(split_planes(self.encoder(x_NChw)))

    def forward(self, x_NChw: torch.Tensor):
        """Training pass: -> (triplane (B, 3·C, R, R), vq_loss, codebook usage per scale)."""
        f_hat, vq_loss, usage = self.quantizer(self.encode(x_NChw))
        return self.decoder(f_hat), vq_loss, usage

    @torch.no_grad()
    def tokenize(self, x_NChw: torch.Tensor) -> list:
        """Views -> token ids per scale, each (B·3, pn²)."""
        return self.quantizer.f_to_idx(self.encode(x_NChw))

    def decode_tokens(self, idx_Bl: list) -> torch.Tensor:
        """Token ids per scale -> triplane (B, 3·C, R, R)."""
        return self.decoder(self.quantizer.idx_to_fhat(idx_Bl))

    def render(self, triplane: torch.Tensor, c_B25: torch.Tensor, **kw) -> dict:
        """Render a triplane from cameras (c.npy rows); see renderers/nerf.py or renderers/flexicubes.py."""
        return self.renderer(as_planes(triplane), c_B25, **kw)

    def query(self, triplane: torch.Tensor, pts_BN3: torch.Tensor) -> tuple:
        """Raw density (B, N, 1) and colour (B, N, 3) of a triplane at points (B, N, 3): NeRF renderer only."""
        return self.renderer.query(as_planes(triplane), pts_BN3)


def load_vqvae(ckpt, device="cpu") -> TriplaneVQVAE:
    """A TriplaneVQVAE from our checkpoint folder (model.safetensors + config.json), strictly
    loaded, in eval mode. Raises CheckpointError naming the checkpoint on any mismatch."""
    return load_built(ckpt, "vqvae", lambda cfg: TriplaneVQVAE(from_dict(VQVAEConfig, cfg)), device)


# ----------------------------------------------------------------------------- official weights

DROPPED = {"decoder.w_avg": "a buffer of zeros the official code never reads"}


# (official prefix, our prefix), most specific first; the rest of the name is the same. The
# renderer's point decoder (NeRF `net.*`, FlexiCubes `net_{sdf,rgb,deformation,weight}.*`) keeps
# the official names under `renderer.`.
_PREFIXES = (("encoder.", "encoder."),
             ("decoder.superresolution.quant_conv.", "quant_conv."),
             ("decoder.superresolution.quantize.", "quantizer."),
             ("decoder.triplane_decoder.", "renderer."))


def official_key(key: str) -> str | None:
    """Our name for an official vqvae-ckpt.pt tensor, or None for one in DROPPED."""
    if key in DROPPED:
        return None
    for official, ours in _PREFIXES:
        if key.startswith(official):
            return ours + key[len(official):]
    mapped = official_to_ours(key)
    return None if mapped is None else "decoder." + mapped


def ours_to_official(name: str) -> str:
    """The inverse of official_key."""
    for official, ours in _PREFIXES:
        if name.startswith(ours):
            return official + name[len(ours):]
    inner = name[len("decoder."):]
    return "decoder." + inner if inner.startswith("vit_decoder.") else "decoder.superresolution." + inner


def convert_official(state: dict, model: TriplaneVQVAE) -> dict:
    """Official state dict -> ours for `model`, checked tensor by tensor (map_official_state)."""
    return map_official_state(state, model.state_dict(), official_key, ours_to_official, DROPPED)
