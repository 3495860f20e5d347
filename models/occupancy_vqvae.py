"""The Argus-3D shape tokenizer: a VQ auto-encoder on Convolutional Occupancy Networks.

    points (B, T, 3) --encoder--> three c_dim planes xz, xy, yz at plane_resolution²
      --couple, down-sample--> (B, e_dim, L, L) --project1--> (B, L, L, reduce_dim) --VQ--> ids (B, L²)
      --codebook, project2, UNet, up-sample, decouple, shared UNet--> three planes
      --decoder at query points (B, N, 3)--> occupancy logits (B, N)

Points live in the ONet unit cube (about [-0.5, 0.5]³) padded by `padding` (box side 1.1). Plane
cells are indexed [v, u] with xz → (u=x, v=z), xy → (u=x, v=y), yz → (u=y, v=z). Token ids are
the L×L grid row-major. Parameter names are the official ones (model_stage1.pt['model']), so that
converted checkpoints load strictly; `paper` is the released PR256_ED512_EN8192 configuration.

    model = OccupancyVQVAE(OccupancyVQVAEConfig())
    ids = model.tokenize(points)                     # (B, 1024)
    planes = model.decode_tokens(ids)                # {"xz": (B, 32, 256, 256), "xy": ..., "yz": ...}
    logits = model.query(planes, query_points)       # (B, N)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.unet import UNet
from utils.checkpoint import load_built, map_official_state
from utils.config import from_dict

PLANES = ("xz", "xy", "yz")
AXES = {"xz": (0, 2), "xy": (0, 1), "yz": (1, 2)}          # (u, v) coordinates of each plane


@dataclass
class OccupancyVQVAEConfig:
    """Defaults: the official released tokenizer (7,258,821 parameters)."""
    c_dim: int = 32                  # feature width of the planes and the implicit decoder's input
    hidden: int = 32                 # point-network width (fc_pos gives 2·hidden)
    n_blocks: int = 5                # ResNet-FC blocks of the encoder and of the decoder
    plane_resolution: int = 256
    padding: float = 0.1
    down_channels: tuple[int, ...] = (64, 128, 256)   # stride-2 2x2 convolutions: plane_resolution / 2^n = latent side
    e_dim: int = 512                 # width around the quantizer
    n_e: int = 8192                  # codebook size
    reduce_dim: int = 4              # code width
    beta: float = 0.4                # weight of the codebook term of the VQ loss
    up_channels: tuple[int, ...] = (128, 64, 32)      # nearest x2 + 3x3 convolution stages back to the planes
    unet_depth: int = 4
    unet_filters: int = 32
    encoder_unet: bool = True        # the official encoder builds a plane UNet it never calls (kept for loading)

    def __post_init__(self):
        self.down_channels, self.up_channels = tuple(self.down_channels), tuple(self.up_channels)
        if len(self.down_channels) != len(self.up_channels):
            raise ValueError(f"down_channels {self.down_channels} and up_channels {self.up_channels} must have "
                             "the same number of stages (the planes come back at their resolution)")
        if self.plane_resolution % 2 ** len(self.down_channels):
            raise ValueError(f"plane_resolution {self.plane_resolution} is not divisible by "
                             f"2^{len(self.down_channels)}")

    @property
    def latent_size(self) -> int:
        return self.plane_resolution // 2 ** len(self.down_channels)

    @property
    def num_tokens(self) -> int:
        return self.latent_size ** 2


class ResnetBlockFC(nn.Module):
    """out = shortcut(x) + fc_1(relu(fc_0(relu(x)))); the shortcut is a bias-free Linear only
    when the widths differ."""

    def __init__(self, size_in: int, size_out: int):
        super().__init__()
        size_h = min(size_in, size_out)
        self.fc_0 = nn.Linear(size_in, size_h)
        self.fc_1 = nn.Linear(size_h, size_out)
        self.shortcut = nn.Linear(size_in, size_out, bias=False) if size_in != size_out else None

    def forward(self, x):
        dx = self.fc_1(F.relu(self.fc_0(F.relu(x))))
        return (x if self.shortcut is None else self.shortcut(x)) + dx


def plane_coordinates(p: torch.Tensor, plane: str, padding: float) -> torch.Tensor:
    """(B, N, 3) points -> (B, N, 2) (u, v) in [0, 1): scaled into the padded box, values at or
    above 1 set to 1 - 1e-5 and below 0 to 0, as the official code."""
    uv = p[..., list(AXES[plane])] / (1 + padding + 1e-5) + 0.5
    uv = torch.where(uv >= 1, torch.full_like(uv, 1 - 1e-5), uv)
    return torch.where(uv < 0, torch.zeros_like(uv), uv)


def plane_cells(uv: torch.Tensor, resolution: int) -> torch.Tensor:
    """(B, N, 2) (u, v) -> (B, N) flat cell index u_cell + resolution·v_cell (truncation)."""
    cells = (uv * resolution).long()
    return cells[..., 0] + resolution * cells[..., 1]


class LocalPoolPointnet(nn.Module):
    """Point cloud (B, T, 3) -> planes {name: (B, c_dim, R, R)}: a ResNet-FC point network whose
    blocks 1.. also see the max of their plane cells' features, then the point features averaged
    into the cells of each plane (empty cells 0)."""

    def __init__(self, cfg: OccupancyVQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.fc_pos = nn.Linear(3, 2 * cfg.hidden)
        self.blocks = nn.ModuleList(ResnetBlockFC(2 * cfg.hidden, cfg.hidden) for _ in range(cfg.n_blocks))
        self.fc_c = nn.Linear(cfg.hidden, cfg.c_dim)
        if cfg.encoder_unet:
            self.unet = UNet(cfg.c_dim, cfg.c_dim, cfg.unet_depth, cfg.unet_filters)

    def point_features(self, p: torch.Tensor, cells: dict) -> list:
        """Per-point activations after fc_pos, each block and fc_c (for parity tests)."""
        out = [self.fc_pos(p)]
        net = self.blocks[0](out[0])
        out.append(net)
        for block in self.blocks[1:]:
            pooled = sum(self._pool_max(net, cells[name]) for name in PLANES)
            net = block(torch.cat([net, pooled], -1))
            out.append(net)
        out.append(self.fc_c(net))
        return out

    def _pool_max(self, x_BNC: torch.Tensor, cells_BN: torch.Tensor) -> torch.Tensor:
        """Max of the features in each point's cell, gathered back to the points (B, N, C)."""
        B, N, C = x_BNC.shape
        idx = cells_BN[..., None].expand(B, N, C)
        cellmax = x_BNC.new_zeros(B, self.cfg.plane_resolution ** 2, C)
        cellmax = cellmax.scatter_reduce(1, idx, x_BNC, reduce="amax", include_self=False)
        return cellmax.gather(1, idx)

    def cells(self, p: torch.Tensor) -> dict:
        R = self.cfg.plane_resolution
        return {name: plane_cells(plane_coordinates(p, name, self.cfg.padding), R) for name in PLANES}

    def forward(self, p: torch.Tensor) -> dict:
        cells = self.cells(p)
        c = self.point_features(p, cells)[-1]
        B, N, C = c.shape
        R = self.cfg.plane_resolution
        planes = {}
        for name in PLANES:
            idx = cells[name][..., None].expand(B, N, C)
            total = c.new_zeros(B, R * R, C).scatter_add(1, idx, c)
            count = c.new_zeros(B, R * R, 1).scatter_add(1, cells[name][..., None], c.new_ones(B, N, 1))
            planes[name] = (total / count.clamp(min=1)).transpose(1, 2).reshape(B, C, R, R)
        return planes


class LocalDecoder(nn.Module):
    """Occupancy logits (B, N) at points (B, N, 3) from the three planes: bilinear samples
    (border padding, align_corners=True) summed over the planes, then ResNet-FC blocks each
    adding a projection of that feature."""

    def __init__(self, cfg: OccupancyVQVAEConfig):
        super().__init__()
        self.padding = cfg.padding
        self.fc_c = nn.ModuleList(nn.Linear(cfg.c_dim, cfg.hidden) for _ in range(cfg.n_blocks))
        self.fc_p = nn.Linear(3, cfg.hidden)
        self.blocks = nn.ModuleList(ResnetBlockFC(cfg.hidden, cfg.hidden) for _ in range(cfg.n_blocks))
        self.fc_out = nn.Linear(cfg.hidden, 1)

    def features(self, planes: dict, p: torch.Tensor) -> torch.Tensor:
        c = 0
        for name in PLANES:
            grid = 2 * plane_coordinates(p, name, self.padding)[:, None] - 1          # (B, 1, N, 2): x = u, y = v
            c = c + F.grid_sample(planes[name], grid, mode="bilinear", padding_mode="border",
                                  align_corners=True)[:, :, 0].transpose(1, 2)
        return c

    def forward(self, p: torch.Tensor, planes: dict) -> torch.Tensor:
        c = self.features(planes, p)
        net = self.fc_p(p)
        for fc_c, block in zip(self.fc_c, self.blocks):
            net = block(net + fc_c(c))
        return self.fc_out(F.relu(net))[..., 0]


class VectorQuantizer(nn.Module):
    """Nearest codebook row by squared L2 (|z|² + |e|² - 2 z·e, first index on ties)."""

    def __init__(self, n_e: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_e, dim)
        nn.init.uniform_(self.embedding.weight, -1 / n_e, 1 / n_e)

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (...) int64."""
        flat = z.reshape(-1, z.shape[-1]).float()
        e = self.embedding.weight.float()
        d = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.t()
        return d.argmin(1).reshape(z.shape[:-1])


class PlaneQuantizer(nn.Module):
    """The planes' coupling into one latent, its quantisation, and the way back to planes."""

    def __init__(self, cfg: OccupancyVQVAEConfig):
        super().__init__()
        self.num_tokens, self.vocab_size = cfg.num_tokens, cfg.n_e      # for models.layout.tokenizer_signature
        c, P = cfg.c_dim, len(PLANES)
        self.encode_3plane_reso32 = nn.Sequential(nn.Conv2d(P * c, P * c, 3, padding=1), nn.ReLU(),
                                                  nn.Conv2d(P * c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 1))
        down, width = [], c
        for w in cfg.down_channels:
            down += [nn.Conv2d(width, w, 2, stride=2), nn.ReLU()]
            width = w
        self.down = nn.Sequential(*down, nn.Conv2d(width, cfg.e_dim, 1))
        self.project1 = nn.Linear(cfg.e_dim, cfg.reduce_dim)
        self.quantizer = VectorQuantizer(cfg.n_e, cfg.reduce_dim)
        self.project2 = nn.Linear(cfg.reduce_dim, cfg.e_dim)
        self.unet_after_quant = UNet(cfg.e_dim, cfg.e_dim, cfg.unet_depth, cfg.unet_filters)
        up, width = [], cfg.e_dim
        for w in cfg.up_channels:
            up += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, w, 3, padding=1), nn.ReLU()]
            width = w
        self.up = nn.Sequential(*up, nn.Conv2d(width, c, 1))
        self.decode_3plane_reso256 = nn.Sequential(nn.Conv2d(c, P * c, 3, padding=1), nn.ReLU(),
                                                   nn.Conv2d(P * c, P * c, 3, padding=1), nn.ReLU(),
                                                   nn.Conv2d(P * c, P * c, 1))
        self.unet_2d = UNet(c, c, cfg.unet_depth, cfg.unet_filters)

    def encode(self, planes: dict) -> torch.Tensor:
        """Planes -> pre-quantisation codes (B, L, L, reduce_dim)."""
        x = self.down(self.encode_3plane_reso32(torch.cat([planes[n] for n in PLANES], 1)))
        return self.project1(x.permute(0, 2, 3, 1))

    def decode(self, zq_BLLc: torch.Tensor) -> dict:
        """Codes (B, L, L, reduce_dim) -> planes {name: (B, c_dim, R, R)}."""
        x = self.project2(zq_BLLc).permute(0, 3, 1, 2)
        x = self.decode_3plane_reso256(self.up(self.unet_after_quant(x)))
        return {n: self.unet_2d(part) for n, part in zip(PLANES, x.chunk(len(PLANES), 1))}


class OccupancyVQVAE(nn.Module):
    """Children in the official order: decoder, encoder, quantizer."""

    def __init__(self, cfg: OccupancyVQVAEConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or OccupancyVQVAEConfig()
        self.decoder = LocalDecoder(cfg)
        self.encoder = LocalPoolPointnet(cfg)
        self.quantizer = PlaneQuantizer(cfg)

    @torch.no_grad()
    def tokenize(self, points: torch.Tensor) -> torch.Tensor:
        """Surface points (B, T, 3) -> token ids (B, L²), the L×L latent row-major."""
        z = self.quantizer.encode(self.encoder(points))
        return self.quantizer.quantizer.indices(z).flatten(1)

    def decode_tokens(self, ids: torch.Tensor) -> dict:
        """Token ids (B, L²) -> planes {name: (B, c_dim, R, R)} (the generation path)."""
        L = self.cfg.latent_size
        zq = self.quantizer.quantizer.embedding(ids).reshape(ids.shape[0], L, L, -1)
        return self.quantizer.decode(zq)

    def query(self, planes: dict, points: torch.Tensor, chunk: int = 100_000) -> torch.Tensor:
        """Occupancy logits (B, N) of the decoded planes at points (B, N, 3), `chunk` points at a
        time (the memory of a dense grid's query stays bounded)."""
        return torch.cat([self.decoder(p, planes) for p in points.split(chunk, dim=1)], 1)

    def forward(self, points: torch.Tensor, queries: torch.Tensor) -> tuple:
        """Training pass: surface points (B, T, 3), query points (B, N, 3) -> (logits (B, N), VQ
        loss, token ids (B, L²)). Straight-through estimator; VQ loss = mean |sg(zq) - z|² +
        beta · mean |zq - sg(z)|², as the official."""
        z = self.quantizer.encode(self.encoder(points))
        ids = self.quantizer.quantizer.indices(z.detach())
        zq = self.quantizer.quantizer.embedding(ids)
        vq_loss = (zq.detach() - z).pow(2).mean() + self.cfg.beta * (zq - z.detach()).pow(2).mean()
        planes = self.quantizer.decode(z + (zq - z).detach())
        return self.decoder(queries, planes), vq_loss, ids.flatten(1)


def load_occupancy_vqvae(ckpt, device="cpu") -> OccupancyVQVAE:
    """An OccupancyVQVAE from our checkpoint folder, strictly loaded, in eval mode."""
    return load_built(ckpt, "occupancy_vqvae", lambda cfg: OccupancyVQVAE(from_dict(OccupancyVQVAEConfig, cfg)),
                      device)


def convert_official(state: dict, model: OccupancyVQVAE) -> dict:
    """Official model_stage1.pt['model'] -> ours: the names are the same; every tensor is checked."""
    return map_official_state(state, model.state_dict(), to_ours=lambda k: k, to_official=lambda k: k)
