"""The next-scale autoregressive generator: one model for image, text, class
and unconditional generation over the triplane token pyramid.

Sequence layout (L = 3·Σ pn² tokens): scales from coarse to fine, each scale as
[plane 0 | plane 1 | plane 2] with pn² tokens per plane in raster order. The first scale's tokens
are start tokens made from the condition; the others are the VQVAE's teacher-forcing input
(`TriplaneQuantizer.idx_to_var_input`, regrouped per object). A query at scale s sees every token
of scales ≤ s.

    model = NextScaleAR(ARConfig(condition="text", depth=16, pooled_dim=768, seq_dim=768,
                                 cross_attn="after_self"))
    logits_BLV = model(x_BLCv_wo_first_l, Condition(pooled=pooled_BD, tokens=tokens_BTD))
    idx = model.sample(vqvae.quantizer, cond, uncond=Condition(pooled=..., tokens=...), guidance=4.0,
                       top_k=10, top_p=0.5, seed=0)    # per scale (B·3, pn²); decode_tokens(idx)
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import nn

from models.ar_blocks import AdaLNBeforeHead, ARBlock, KVCache
from models.layout import NUM_PLANES, planes_to_sequence, seq_len, sequence_to_planes, token_levels_planes
from utils.checkpoint import ConversionError, load_built, map_official_state
from utils.config import ConfigError, from_dict


@dataclass
class ARConfig:
    """Sizes of the generator; the defaults are the official image model (depth 24)."""
    condition: Literal["image", "text", "class", "none"] = "image"
    depth: int = 24
    width: int = 0                    # 0: 64·depth, as the official
    num_heads: int = 16
    mlp_ratio: float = 4.0
    drop_path: float = -1.0           # < 0: 0.1·depth/24, as the official; linear over the blocks
    cond_drop: float = 0.1            # training: pooled and sequence conditions dropped independently
    pooled_dim: int = 1024            # image/text: width of the pooled condition (DINOv2 1024, CLIP 768)
    seq_dim: int = 1024               # width of the cross-attention sequence (ignored with cross_attn none)
    num_classes: int = 0              # class: number of classes (one more embedding row = unconditional)
    cross_attn: Literal["first", "after_self", "none"] = "first"   # image: first; text: after_self
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    vocab_size: int = 16384
    c_vae: int = 8
    norm_eps: float = 1e-6
    init_adaln: float = 0.5
    init_adaln_gamma: float = 1e-4           # the training scripts' --alng
    init_head: float = 0.02
    encoder: str = ""                 # the condition encoder it was trained on (models.conditioners
                                      # source); "": the official DINOv2 / CLIP
    tokenizer: str = ""               # fingerprint of the VQVAE whose tokens it was trained on
                                      # (models.layout.tokenizer_signature); "": unknown

    def __post_init__(self):
        self.patch_nums = tuple(self.patch_nums)
        if self.width == 0:
            self.width = 64 * self.depth
        if self.drop_path < 0:
            self.drop_path = 0.1 * self.depth / 24
        if self.width % self.num_heads:
            raise ConfigError(f"width {self.width} is not a multiple of num_heads {self.num_heads}")
        if self.condition in ("class", "none") and self.cross_attn != "none":
            raise ConfigError(f"condition {self.condition} has no token sequence: set cross_attn: none")
        if self.condition == "class" and self.num_classes < 1:
            raise ConfigError("condition class needs num_classes >= 1")

    @property
    def seq_len(self) -> int:
        return seq_len(self.patch_nums)


class Condition(NamedTuple):
    """What the generator is conditioned on. image/text: pooled (B, pooled_dim) and tokens
    (B, T, seq_dim) from a models.conditioners encoder; class: labels (B,) int64 in
    [0, num_classes], num_classes meaning unconditional; none: nothing (labels optional)."""
    pooled: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    labels: torch.Tensor | None = None


def sample_top_k_top_p(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0, temperature: float = 1.0,
                       generator: torch.Generator | None = None, exact: bool = True) -> torch.Tensor:
    """One token per row from softmax(logits / temperature) restricted to the top_k largest
    logits (0: all) and to the smallest set holding top_p of the mass (0: all), as the official
    helper (its random draws: one multinomial over the whole vocabulary per row). exact=False
    (with top_k): the same distribution computed on the top_k candidates alone, without sorting
    the vocabulary (other draws; ties at the k-th logit keep k tokens). Returns idx_Bl (B, l)."""
    B, l, V = logits_BlV.shape
    logits = logits_BlV.float() / max(temperature, 1e-6)
    if not exact and 0 < top_k < V:
        values, idx = logits.topk(top_k, dim=-1)              # descending
        if top_p > 0:
            rising = values.flip(-1)
            remove = rising.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
            remove[..., -1] = False
            values = values.masked_fill(remove.flip(-1), -torch.inf)
        pick = torch.multinomial(values.softmax(dim=-1).view(-1, top_k), 1, generator=generator)
        return idx.view(-1, top_k).gather(1, pick).view(B, l)
    if 0 < top_k < V:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits.sort(dim=-1)
        remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        remove[..., -1] = False                      # the most likely token always stays
        logits = logits.masked_fill(remove.scatter(-1, sorted_idx, remove), -torch.inf)
    probs = logits.softmax(dim=-1).view(-1, V)
    return torch.multinomial(probs, 1, generator=generator).view(B, l)


class NextScaleAR(nn.Module):
    """Block-causal transformer over the token pyramid. Parameter names follow the official
    `var_wo_ddp` (image or text) so that converted checkpoints load strictly."""

    def __init__(self, cfg: ARConfig | None = None, **overrides):
        super().__init__()
        cfg = dataclasses.replace(cfg or ARConfig(), **overrides)
        self.cfg = cfg
        C, S = cfg.width, len(cfg.patch_nums)
        self.first_l = cfg.patch_nums[0] ** 2
        self.word_embed = nn.Linear(cfg.c_vae, C)
        if cfg.condition in ("image", "text"):
            self.pooler_emb = nn.Linear(cfg.pooled_dim, C)
        else:                                         # the last row is the unconditional class
            self.class_emb = nn.Embedding(cfg.num_classes + 1, C)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.empty(1, cfg.seq_len, C))
        self.lvl_embed = nn.Embedding(S, C)
        self.plane_embed = nn.Embedding(NUM_PLANES, C)
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(
            ARBlock(C, cfg.num_heads, cfg.mlp_ratio, cfg.seq_dim, cfg.cross_attn, rates[i], cfg.norm_eps)
            for i in range(cfg.depth))
        self.head_nm = AdaLNBeforeHead(C, cfg.norm_eps)
        self.head = nn.Linear(C, cfg.vocab_size)

        self.build_index_buffers()
        self.init_weights()
        self.exact_draws = True     # the official draw protocol; models.precision's int8 path turns it off

    def build_index_buffers(self, device=None):
        """The index buffers that follow from patch_nums (not saved): level and plane of every
        token, and the block-causal mask. Called again after weights are assigned into a model
        built on the meta device."""
        lvl, plane = token_levels_planes(self.cfg.patch_nums)
        self.register_buffer("lvl_1L", lvl[None].to(device), persistent=False)
        self.register_buffer("plane_1L", plane[None].to(device), persistent=False)
        self.register_buffer("mask_LL", (lvl[:, None] >= lvl[None, :]).to(device), persistent=False)

    @torch.no_grad()
    def init_weights(self):
        """The official initialisation."""
        cfg, C = self.cfg, self.cfg.width
        std = (1 / C / 3) ** 0.5
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
        for p in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p, std=std)
        self.head.weight.mul_(cfg.init_head)
        self.head_nm.ada_lin[-1].weight.mul_(cfg.init_adaln)
        for block in self.blocks:
            block.attn.proj.weight.div_((2 * cfg.depth) ** 0.5)
            block.ffn.fc2.weight.div_((2 * cfg.depth) ** 0.5)
            block.ada_lin[-1].weight[2 * C:].mul_(cfg.init_adaln)
            block.ada_lin[-1].weight[:2 * C].mul_(cfg.init_adaln_gamma)

    # ---- pieces (public so that tests can compare each stage) -------------------------------
    def positions(self) -> torch.Tensor:
        """Level + position + plane embeddings of every token, (1, L, C)."""
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC + self.plane_embed(self.plane_1L)

    def embed_condition(self, cond: Condition) -> tuple:
        """-> (cond_BD (B, C) for AdaLN and the start tokens, per-block cross-attention keys/values
        or Nones)."""
        cfg = self.cfg
        if cfg.condition in ("image", "text"):
            if cond.pooled is None or (cfg.cross_attn != "none" and cond.tokens is None):
                raise ValueError(f"a {cfg.condition} model needs Condition(pooled=..., tokens=...)")
            cond_BD = self.pooler_emb(cond.pooled.float())
        else:
            labels = cond.labels
            if labels is None:
                if cfg.condition == "class":
                    raise ValueError("a class model needs Condition(labels=...)")
                labels = torch.zeros(1, dtype=torch.long, device=self.pos_start.device)
            cond_BD = self.class_emb(labels)
        if cfg.cross_attn == "none":
            return cond_BD, [None] * len(self.blocks)
        tokens = cond.tokens.float()
        return cond_BD, [b.cross_attn.keys_values(tokens) for b in self.blocks]

    def start_tokens(self, cond_BD: torch.Tensor) -> torch.Tensor:
        """(B, C) -> the first scale's tokens (B, 3·first_l, C), before position embeddings."""
        sos = cond_BD[:, None] + self.pos_start
        return sos.repeat(1, NUM_PLANES, 1)

    def logits(self, h_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """Final hidden states -> logits (B, l, V) in float32."""
        return self.head(self.head_nm(h_BLC.float(), cond_BD.float())).float()

    # ---- training ---------------------------------------------------------------------------
    def forward(self, x_BLCv_wo_first_l: torch.Tensor, cond: Condition) -> torch.Tensor:
        """Teacher forcing: (B, L - 3·first_l, c_vae) and the condition -> logits (B, L, V)."""
        cond_BD, k_v = self.embed_condition(cond)
        B = x_BLCv_wo_first_l.shape[0]
        if cond_BD.shape[0] != B:
            cond_BD = cond_BD.expand(B, -1)
        x_BLC = torch.cat((self.start_tokens(cond_BD), self.word_embed(x_BLCv_wo_first_l.float())), 1)
        if x_BLC.shape[1] != self.cfg.seq_len:
            raise ValueError(f"teacher-forcing input has {x_BLCv_wo_first_l.shape[1]} tokens, expected "
                             f"{self.cfg.seq_len - NUM_PLANES * self.first_l} for patch_nums {self.cfg.patch_nums}")
        x_BLC = x_BLC + self.positions()
        for block, kv in zip(self.blocks, k_v):
            x_BLC = block(x_BLC, cond_BD, kv, self.mask_LL)
        return self.logits(x_BLC, cond_BD)

    def drop_condition(self, cond: Condition, uncond: Condition | None, u_B2: torch.Tensor) -> Condition:
        """Classifier-free-guidance dropout. u_B2: two uniforms per row; the pooled vector (or class
        label) of row b is replaced by the unconditional one when u[b, 0] < cond_drop, its token
        sequence when u[b, 1] < cond_drop: independently, as the official."""
        p = self.cfg.cond_drop
        if p == 0 or self.cfg.condition == "none":
            return cond
        drop = u_B2.to(self.pos_start.device) < p
        if self.cfg.condition == "class":
            return cond._replace(labels=cond.labels.masked_fill(drop[:, 0], self.cfg.num_classes))
        if uncond is None:
            raise ValueError("condition dropout needs the unconditional embedding (the encoder's empty())")
        out = {}
        for col, name in enumerate(("pooled", "tokens")):
            x, u = getattr(cond, name), getattr(uncond, name)
            if x is not None:
                out[name] = torch.where(drop[:, col].view(-1, *[1] * (x.dim() - 1)), u.to(x).expand_as(x), x)
        return cond._replace(**out)

    # ---- sampling ---------------------------------------------------------------------------
    def unconditional(self, uncond: Condition | None, batch: int, device) -> Condition:
        if self.cfg.condition in ("class", "none"):
            return Condition(labels=torch.full((batch,), self.cfg.num_classes, dtype=torch.long, device=device))
        if uncond is None:
            raise ValueError("guidance needs the unconditional embedding: pass uncond= the encoder's empty(), "
                             "or guidance=0")
        return Condition(pooled=uncond.pooled.reshape(1, -1).expand(batch, -1),
                         tokens=None if uncond.tokens is None
                         else uncond.tokens.reshape(1, *uncond.tokens.shape[-2:]).expand(batch, -1, -1))

    @torch.no_grad()
    def sample(self, quantizer, cond: Condition, uncond: Condition | None = None, *, batch: int | None = None,
               guidance: float = 4.0, top_k: int = 0, top_p: float = 0.0, temperature: float = 1.0,
               seed: int | None = None, generator: torch.Generator | None = None, use_cache: bool = True,
               static_cache: bool = False, scale_seconds: list | None = None) -> list:
        """Sample token ids scale by scale, always in eval mode.

        quantizer: the VQVAE's TriplaneQuantizer (builds each next scale's input).
        cond: batch B conditions (class/none models may pass batch= instead).
        guidance: classifier-free guidance weight, ramped as t = guidance·s/(S-1): logits =
            (1+t)·cond - t·uncond. With uncond given (implicit for class models), the batch is
            doubled even at guidance 0; a
            model with no condition samples unguided.
        seed or generator: the sampling randomness (a seed builds a generator on the model's device).
        use_cache: keep self-attention keys/values (True), or rerun the whole prefix at every scale.
        static_cache: keep them in buffers of the whole sequence's length allocated once (the same
            tokens; static shapes for CUDA graphs) rather than concatenating them scale by scale.
        scale_seconds: a list that receives the wall time of each scale (benchmarks).
        Returns idx per scale, each (B·3, pn²), rows 3b+p: `vqvae.decode_tokens(idx)` decodes them.
        """
        device = self.pos_start.device
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(0 if seed is None else seed)
        B = next((t.shape[0] for t in cond if t is not None), batch or 1)
        guided = uncond is not None or (guidance != 0 and self.cfg.condition == "class")
        if guidance != 0 and not guided:
            self.unconditional(None, B, device)            # raises the message
        if self.cfg.condition == "none" and cond.labels is None:
            cond = Condition(labels=torch.zeros(B, dtype=torch.long, device=device))
        if guided:
            u = self.unconditional(uncond, B, device)
            cond = Condition(*(None if a is None else torch.cat((a, b.to(a))) for a, b in zip(cond, u)))
        was_training = self.training
        self.eval()
        try:
            cache = KVCache(capacity=self.cfg.seq_len if static_cache else 0) if use_cache else None
            return self._sample_loop(quantizer, cond, B, guided, guidance, top_k, top_p, temperature, generator,
                                     cache, scale_seconds)
        finally:
            self.train(was_training)

    def _sample_loop(self, quantizer, cond, B, guided, guidance, top_k, top_p, temperature, generator, cache,
                     scale_seconds):
        pn_list, S = self.cfg.patch_nums, len(self.cfg.patch_nums)
        tick = time.perf_counter()
        cond_BD, k_v = self.embed_condition(cond)
        pos = self.positions()
        use_cache = cache is not None
        n0 = NUM_PLANES * self.first_l
        x_in = self.start_tokens(cond_BD) + pos[:, :n0]
        seq, cur, idx_out = x_in, 0, []
        H = pn_list[-1]
        f_hat = torch.zeros(B * NUM_PLANES, self.cfg.c_vae, H, H, device=cond_BD.device)
        for si, pn in enumerate(pn_list):
            n = NUM_PLANES * pn * pn
            if use_cache:
                h = x_in
                for i, block in enumerate(self.blocks):
                    h = block(h, cond_BD, k_v[i], None, cache, i)
            else:
                h = seq
                mask = self.mask_LL[:cur + n, :cur + n]
                for i, block in enumerate(self.blocks):
                    h = block(h, cond_BD, k_v[i], mask)
                h = h[:, cur:]
            logits_BlV = self.logits(h, cond_BD)
            if guided:
                t = guidance * si / max(S - 1, 1)
                logits_BlV = (1 + t) * logits_BlV[:B] - t * logits_BlV[B:]
            idx_Bl = sample_top_k_top_p(logits_BlV, top_k, top_p, temperature, generator, self.exact_draws)
            idx_planes = sequence_to_planes(idx_Bl, (pn,))[0]
            idx_out.append(idx_planes)
            f_hat, nxt = quantizer.next_autoregressive_input(si, f_hat, quantizer.lookup(idx_planes))
            cur += n
            if scale_seconds is not None:
                if f_hat.is_cuda:
                    torch.cuda.synchronize()
                scale_seconds.append(time.perf_counter() - tick)
                tick = time.perf_counter()
            if si == S - 1:
                break
            x_in = self.word_embed(planes_to_sequence([nxt.flatten(2).transpose(1, 2)]))
            x_in = x_in + pos[:, cur:cur + x_in.shape[1]]
            if guided:
                x_in = x_in.repeat(2, 1, 1)
            if not use_cache:
                seq = torch.cat((seq, x_in), 1)
        return idx_out


# ----------------------------------------------------------------------------- checkpoints

def load_ar(ckpt, device="cpu") -> NextScaleAR:
    """A NextScaleAR from our checkpoint folder, strictly loaded, in eval mode."""
    return load_built(ckpt, "ar", lambda cfg: NextScaleAR(from_dict(ARConfig, cfg)), device)


# Official buffers we rebuild from patch_nums rather than load.
DERIVED = ("lvl_1L", "plane_1L", "attn_bias_for_masking")


def sizes_from_official(state: dict, base: ARConfig) -> ARConfig:
    """`base` with the sizes an official var_wo_ddp state dict shows: depth, width, heads, MLP
    ratio, condition widths, vocabulary, code width and (from its lvl_1L buffer) the scales, so
    that an official file of any size loads without a config file."""
    if "word_embed.weight" not in state or "head.weight" not in state:
        return base                              # not a generator: the conversion names what is missing
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    width, c_vae = state["word_embed.weight"].shape
    sizes = dict(depth=depth, width=width, c_vae=c_vae, vocab_size=state["head.weight"].shape[0])
    if "blocks.0.attn.scale_mul_1H11" in state:
        sizes["num_heads"] = state["blocks.0.attn.scale_mul_1H11"].shape[1]
    if "blocks.0.ffn.fc1.weight" in state:
        sizes["mlp_ratio"] = state["blocks.0.ffn.fc1.weight"].shape[0] / width
    if "pooler_emb.weight" in state:
        sizes["pooled_dim"] = state["pooler_emb.weight"].shape[1]
    if "blocks.0.cross_attn.mat_kv.weight" in state:
        sizes["seq_dim"] = state["blocks.0.cross_attn.mat_kv.weight"].shape[1]
    if "lvl_1L" in state and state["lvl_1L"].device.type != "meta":
        counts = torch.bincount(state["lvl_1L"].flatten().long()).tolist()
        pns = [round((c / NUM_PLANES) ** 0.5) for c in counts]
        if all(NUM_PLANES * pn * pn == c for pn, c in zip(pns, counts)):
            sizes["patch_nums"] = tuple(pns)
    try:
        return dataclasses.replace(base, drop_path=-1.0, **sizes)
    except ConfigError as e:
        raise ConversionError(f"its tensors give a generator that cannot be built ({e})") from None


def convert_official(state: dict, model: NextScaleAR) -> dict:
    """Official var_wo_ddp state dict -> ours (the names are the same; the derived index and
    mask buffers are checked against ours and dropped)."""
    expected = dict(zip(("lvl_1L", "plane_1L"), token_levels_planes(model.cfg.patch_nums)))
    for key, ours in expected.items():
        if key in state and state[key].device.type != "meta" and not torch.equal(state[key].flatten().long(), ours):
            raise ConversionError(f"official '{key}' does not match patch_nums {model.cfg.patch_nums}")
    L = model.cfg.seq_len
    if "attn_bias_for_masking" in state and tuple(state["attn_bias_for_masking"].shape[-2:]) != (L, L):
        raise ConversionError(f"official 'attn_bias_for_masking' has shape {tuple(state['attn_bias_for_masking'].shape)}, "
                              f"expected a mask over {L} tokens")
    return map_official_state(state, model.state_dict(), to_ours=lambda k: None if k in DERIVED else k,
                              to_official=lambda k: k, dropped=DERIVED)
