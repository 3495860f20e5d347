"""Transformer blocks of the autoregressive generator, with the official parameter
names so that converted checkpoints load strictly.

Attention is ℓ2-normalised: q and k are unit vectors per head, q is multiplied by a learnable
per-head scale exp(min(s, ln 100)) (s starts at ln 4) and the softmax scale is 1. It runs through
torch's scaled_dot_product_attention; flash-attn is used when installed, on CUDA, in half
precision and without a mask (cached sampling). Layouts: x_BLC tokens, cond_BD the pooled
condition after `pooler_emb`/`class_emb`, kv_BTD the condition's token sequence.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from models.precision import linear

try:                                   # optional; the SDPA path below is the reference
    from flash_attn import flash_attn_func
except ImportError:                    # also covers a flash-attn built for another torch
    flash_attn_func = None

MAX_SCALE_MUL = math.log(100)


def attend(q_BHLc: torch.Tensor, k_BHTc: torch.Tensor, v_BHTc: torch.Tensor, mask_LT: torch.Tensor | None
           ) -> torch.Tensor:
    """Softmax(q·kᵀ)·v with scale 1 (q already carries the learnt scale). mask: bool (L, T), True
    where a query may look. Returns (B, L, H·c)."""
    B, H, L, c = q_BHLc.shape
    if (mask_LT is None and flash_attn_func is not None and q_BHLc.is_cuda
            and q_BHLc.dtype in (torch.float16, torch.bfloat16)):
        out = flash_attn_func(q_BHLc.transpose(1, 2), k_BHTc.transpose(1, 2).to(q_BHLc.dtype),
                              v_BHTc.transpose(1, 2).to(q_BHLc.dtype), softmax_scale=1.0)
        return out.reshape(B, L, H * c)
    out = F.scaled_dot_product_attention(q_BHLc, k_BHTc.to(q_BHLc.dtype), v_BHTc.to(q_BHLc.dtype),
                                         attn_mask=mask_LT, scale=1.0)
    return out.transpose(1, 2).reshape(B, L, H * c)


@dataclass
class KVCache:
    """Self-attention keys and values of the tokens seen so far, per block, for sampling.

    capacity 0: each scale's keys/values are concatenated to the block's. capacity N: each block
    writes into one (B, H, N, c) buffer allocated at its first call (static shapes, no copies of
    the past: what a CUDA graph needs); attention reads the filled part, so the tokens are the same."""
    capacity: int = 0
    k: list = field(default_factory=list)
    v: list = field(default_factory=list)
    filled: list = field(default_factory=list)

    def update(self, block: int, k_BHLc: torch.Tensor, v_BHLc: torch.Tensor) -> tuple:
        """Add this block's new keys/values; returns all of them so far."""
        if len(self.k) <= block:
            if not self.capacity:
                self.k.append(k_BHLc)
                self.v.append(v_BHLc)
                return k_BHLc, v_BHLc
            B, H, _, c = k_BHLc.shape
            self.k.append(k_BHLc.new_empty(B, H, self.capacity, c))
            self.v.append(v_BHLc.new_empty(B, H, self.capacity, c))
            self.filled.append(0)
        if not self.capacity:
            self.k[block] = torch.cat((self.k[block], k_BHLc), dim=2)
            self.v[block] = torch.cat((self.v[block], v_BHLc), dim=2)
            return self.k[block], self.v[block]
        start, end = self.filled[block], self.filled[block] + k_BHLc.shape[2]
        if end > self.capacity:
            raise ValueError(f"KVCache: {end} positions do not fit its capacity {self.capacity}")
        self.k[block][:, :, start:end] = k_BHLc
        self.v[block][:, :, start:end] = v_BHLc
        self.filled[block] = end
        return self.k[block][:, :, :end], self.v[block][:, :, :end]


class _L2Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def heads(self, x_BLD: torch.Tensor) -> torch.Tensor:
        B, L, D = x_BLD.shape
        return x_BLD.view(B, L, self.num_heads, D // self.num_heads).transpose(1, 2)

    def fold_biases(self) -> None:
        """Give each bias-free projection its bias (a frozen copy) before int8 quantisation
        (models/precision.py): the quantised matmul then adds it."""
        folds = {"mat_qkv": (self.q_bias, self.zero_k_bias, self.v_bias), "mat_q": (self.q_bias,),
                 "mat_kv": (self.zero_k_bias, self.v_bias)}
        for name, parts in folds.items():
            layer = getattr(self, name, None)
            if layer is not None and layer.bias is None:
                layer.bias = nn.Parameter(torch.cat(parts).detach().clone(), requires_grad=False)

    def scaled_q(self, q_BHLc: torch.Tensor) -> torch.Tensor:
        return F.normalize(q_BHLc, dim=-1) * self.scale_mul_1H11.clamp_max(MAX_SCALE_MUL).exp()


class SelfAttention(_L2Attention):
    """(B, L, C) → (B, L, C). With a cache, the new tokens' k/v are appended to it and the
    queries see everything cached (block-causal order makes a mask unnecessary there)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__(dim, num_heads)
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, x_BLC: torch.Tensor, mask_LL: torch.Tensor | None, cache: KVCache | None = None,
                block: int = 0) -> torch.Tensor:
        qkv = linear(self.mat_qkv, x_BLC, torch.cat((self.q_bias, self.zero_k_bias, self.v_bias)))
        q, k, v = (self.heads(t) for t in qkv.chunk(3, dim=-1))
        k = F.normalize(k, dim=-1)
        if cache is not None:
            k, v = cache.update(block, k, v)
        return self.proj(attend(self.scaled_q(q), k, v, mask_LL))


class CrossAttention(_L2Attention):
    """Queries from the tokens, keys/values from the condition sequence: (B, L, C), (B, T, kv_dim)
    → (B, L, C). `keys_values` can be computed once per sampling call and passed back in."""

    def __init__(self, dim: int, kv_dim: int, num_heads: int):
        super().__init__(dim, num_heads)
        self.mat_q = nn.Linear(dim, dim, bias=False)
        self.mat_kv = nn.Linear(kv_dim, 2 * dim, bias=False)

    def keys_values(self, kv_BTD: torch.Tensor) -> tuple:
        kv = linear(self.mat_kv, kv_BTD, torch.cat((self.zero_k_bias, self.v_bias)))
        k, v = (self.heads(t) for t in kv.chunk(2, dim=-1))
        return F.normalize(k, dim=-1), v

    def forward(self, x_BLC: torch.Tensor, k_v: tuple) -> torch.Tensor:
        q = self.heads(linear(self.mat_q, x_BLC, self.q_bias))
        return self.proj(attend(self.scaled_q(q), *k_v, None))


class RMSNorm(nn.Module):
    """x / max(‖x‖·d^-½, eps) · g, the official pre-norm of the cross-attention."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.g = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rms = x.norm(dim=-1, keepdim=True) * x.shape[-1] ** -0.5
        return x / rms.clamp(min=self.eps) * self.g


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def drop_path(x_BLC: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples' residual branches with probability p, rescale the rest."""
    if p == 0.0 or not training:
        return x_BLC
    keep = x_BLC.new_empty(x_BLC.shape[0], 1, 1).bernoulli_(1 - p)
    return x_BLC * keep / (1 - p)


class ARBlock(nn.Module):
    """AdaLN self-attention + FFN block with cross-attention to the condition sequence.

    cross_attn: "first" (the image model: cross → self → FFN), "after_self" (the text model:
    self → cross → FFN) or "none" (class or unconditional models). AdaLN chunks from
    SiLU→Linear(C, 6C) on cond_BD, in the official order γ1, γ2, s1, s2, b1, b2.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, kv_dim: int, cross_attn: str,
                 drop_path: float = 0.0, norm_eps: float = 1e-6):
        super().__init__()
        if cross_attn not in ("first", "after_self", "none"):
            raise ValueError(f"cross_attn must be first, after_self or none, got {cross_attn!r}")
        self.dim, self.cross, self.drop_path = dim, cross_attn, drop_path
        self.attn = SelfAttention(dim, num_heads)
        if cross_attn != "none":
            self.cross_attn = CrossAttention(dim, kv_dim, num_heads)
            self.prenorm_ca_dino = RMSNorm(dim)
        self.ffn = FFN(dim, round(dim * mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def _cross(self, x_BLC, k_v):
        return x_BLC + drop_path(self.cross_attn(self.prenorm_ca_dino(x_BLC), k_v), self.drop_path, self.training)

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor, k_v: tuple | None,
                mask_LL: torch.Tensor | None, cache: KVCache | None = None, block: int = 0) -> torch.Tensor:
        """k_v: this block's cross-attention keys/values (`cross_attn.keys_values`), None without."""
        g1, g2, s1, s2, b1, b2 = self.ada_lin(cond_BD).view(-1, 1, 6, self.dim).unbind(2)
        if self.cross == "first":
            x_BLC = self._cross(x_BLC, k_v)
        h = self.attn(self.ln_wo_grad(x_BLC) * (1 + s1) + b1, mask_LL, cache, block)
        x_BLC = x_BLC + drop_path(h * g1, self.drop_path, self.training)
        if self.cross == "after_self":
            x_BLC = self._cross(x_BLC, k_v)
        h = self.ffn(self.ln_wo_grad(x_BLC) * (1 + s2) + b2)
        return x_BLC + drop_path(h * g2, self.drop_path, self.training)


class AdaLNBeforeHead(nn.Module):
    """LayerNorm without affine, then scale/shift from SiLU→Linear(C, 2C) on cond_BD."""

    def __init__(self, dim: int, norm_eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.ln_wo_grad = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.dim).unbind(2)
        return self.ln_wo_grad(x_BLC) * (1 + scale) + shift
