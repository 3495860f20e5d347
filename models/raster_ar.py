"""The Argus-3D generator: a GPT over the tokenizer's 32×32 latent grid in raster order.

Sequence (one object, L = latent side² tokens): [condition | SOS + pos 0 | tok_0 + pos 1 | ...],
the condition first and without a position (the official class embedding; beyond the original, an
image or text encoder's pooled vector through `cond_proj`). Position i+1 predicts tok_i. Pre-LN
blocks with separate key/query/value projections, softmax attention under a causal mask, a 4× MLP
with the exact (erf) GELU; the head is LN → dense → GELU → LN and logits h·Eᵀ + b with E the
token embedding (tied). Parameter names are the official `transformer_model.*` ones, so converted
checkpoints load strictly; the tied `z_value_dec.weight` is `emb.weight` and is not stored twice.

    model = RasterAR(RasterARConfig.preset("paper"))               # 3,663,104,000 parameters
    logits = model(tokens_BL, Condition(labels=labels_B))          # (B, L, vocab)
    ids = model.sample(None, Condition(labels=torch.tensor([18] * 4)), top_k=250, seed=0)   # (4, L)
    planes = tokenizer.decode_tokens(ids)

Sampling keeps every block's keys and values in a preallocated cache (one new token per step);
`use_cache=False` re-runs the whole prefix at every step as the official script does. With a
torch.Generator on the CPU each step draws exactly as the official loop (one multinomial over the
top-k-filtered probabilities), so seeded runs reproduce its tokens.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from models.ar import Condition, sample_top_k_top_p
from utils.checkpoint import ConversionError, load_built, map_official_state
from utils.config import ConfigError, from_dict

# The classes of the released model, in its label order (generate_class-guide.py).
SHAPENET55 = ("plane", "ashcan", "bag", "basket", "bathtub", "bed", "bench", "birdhouse", "bookshelf", "bottle",
              "bowl", "bus", "cabinet", "camera", "can", "cap", "car", "cell_phone", "chair", "clock", "keyboard",
              "dishwasher", "display", "earphone", "faucet", "file_cabinet", "guitar", "helmet", "jar", "knife",
              "lamp", "laptop", "loudspeaker", "mailbox", "microphone", "microwave", "bike", "mug", "piano",
              "pillow", "pistol", "flowerpot", "printer", "remote", "rifle", "rocket", "skateboard", "sofa", "stove",
              "table", "telephone", "tower", "train", "vessel", "washer")

# (width, depth, heads): the released model and the paper's other sizes.
PRESETS = {"paper": (3072, 32, 24), "large": (2048, 24, 16), "base": (768, 12, 12)}


@dataclass
class RasterARConfig:
    """Defaults: the released class-guided model (transformer3072_24_32)."""
    condition: Literal["class", "image", "text"] = "class"
    width: int = 3072
    depth: int = 32
    num_heads: int = 24
    vocab_size: int = 8192           # the tokenizer's codebook size
    num_tokens: int = 1024           # tokens per object: the tokenizer's latent side²
    classes: tuple[str, ...] = SHAPENET55   # class models: the label names, in label order
    pooled_dim: int = 1024           # image/text models: width of the encoder's pooled vector
    cond_drop: float = 0.0           # training: share of conditions replaced by a learned null one
                                     # (> 0 adds `null_condition` and allows classifier-free guidance)
    attn_drop: float = 0.1
    resid_drop: float = 0.1
    mlp_drop: float = 0.01
    encoder: str = ""                # image/text: the condition encoder it was trained on
    tokenizer: str = ""              # fingerprint of the tokenizer whose ids it was trained on

    def __post_init__(self):
        self.classes = tuple(self.classes)
        if self.width % self.num_heads:
            raise ConfigError(f"width {self.width} is not a multiple of num_heads {self.num_heads}")
        if self.condition == "class" and not self.classes:
            raise ConfigError("condition class needs at least one name in classes")

    @classmethod
    def preset(cls, name: str, **overrides) -> "RasterARConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown size {name!r}; one of {', '.join(PRESETS)}")
        width, depth, heads = PRESETS[name]
        return cls(**{"width": width, "depth": depth, "num_heads": heads, **overrides})


def gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="none")           # the official x·½(1 + erf(x/√2))


class GELU(nn.Module):
    def forward(self, x):
        return gelu(x)


class StaticKVCache:
    """Keys and values of every block, preallocated for the whole sequence: (B, H, T, head)."""

    def __init__(self, depth: int, batch: int, heads: int, length: int, head_dim: int, like: torch.Tensor):
        shape = (batch, heads, length, head_dim)
        self.k = [like.new_empty(shape) for _ in range(depth)]
        self.v = [like.new_empty(shape) for _ in range(depth)]
        self.start = 0                                # where the next tokens go


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: RasterARConfig):
        super().__init__()
        D = cfg.width
        self.num_heads, self.attn_drop = cfg.num_heads, cfg.attn_drop
        self.key, self.query, self.value, self.proj = (nn.Linear(D, D) for _ in range(4))
        self.resid_drop = nn.Dropout(cfg.resid_drop)

    def forward(self, x: torch.Tensor, cache: StaticKVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, D = x.shape
        H = self.num_heads
        q, k, v = (f(x).view(B, T, H, D // H).transpose(1, 2) for f in (self.query, self.key, self.value))
        causal = True
        if cache is not None:
            s = cache.start
            cache.k[layer][:, :, s:s + T] = k
            cache.v[layer][:, :, s:s + T] = v
            k, v = cache.k[layer][:, :, :s + T], cache.v[layer][:, :, :s + T]
            causal = s == 0 and T > 1                 # one new token sees everything cached
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                           dropout_p=self.attn_drop if self.training else 0.0)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, D)))


class Block(nn.Module):
    def __init__(self, cfg: RasterARConfig):
        super().__init__()
        D = cfg.width
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = CausalSelfAttention(cfg)
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), GELU(), nn.Linear(4 * D, D), nn.Dropout(cfg.mlp_drop))

    def forward(self, x, cache=None, layer=0):
        x = x + self.attn(self.ln1(x), cache, layer)
        return x + self.mlp(self.ln2(x))


class Prediction(nn.Module):
    """The official GPTPrediction head: LN → dense → GELU → LN."""

    def __init__(self, D: int):
        super().__init__()
        self.ln1, self.dense, self.ln2 = nn.LayerNorm(D), nn.Linear(D, D), nn.LayerNorm(D)

    def forward(self, x):
        return self.ln2(gelu(self.dense(self.ln1(x))))


class RasterAR(nn.Module):
    def __init__(self, cfg: RasterARConfig | None = None, **overrides):
        super().__init__()
        cfg = dataclasses.replace(cfg or RasterARConfig(), **overrides)
        self.cfg = cfg
        D, V = cfg.width, cfg.vocab_size
        self.value_start = nn.Parameter(torch.empty(1, D))
        self.bias_value = nn.Parameter(torch.zeros(V))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.dec = Prediction(D)
        self.emb = nn.Embedding(V, D)
        self.pos_emb = nn.Embedding(cfg.num_tokens + 1, D)
        if cfg.condition == "class":
            self.class_embedding = nn.Embedding(len(cfg.classes), D)
        else:
            self.cond_proj = nn.Linear(cfg.pooled_dim, D)
        if cfg.cond_drop > 0:
            self.null_condition = nn.Parameter(torch.empty(1, D))
        self.checkpointing = False       # training: recompute each block in the backward pass
        self.init_weights()

    def init_weights(self):
        """N(0, 0.02) for matrices and embeddings, zero biases, unit norm gains (minGPT)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.value_start, std=0.02)
        if self.cfg.cond_drop > 0:
            nn.init.normal_(self.null_condition, std=0.02)

    # ---- conditions ----------------------------------------------------------------------
    def class_index(self, name: str) -> int:
        """The label of a class name; an unknown name is a ValueError listing the valid ones."""
        if self.cfg.condition != "class":
            raise ValueError(f"this generator is {self.cfg.condition}-guided, not class-guided")
        if name not in self.cfg.classes:
            raise ValueError(f"unknown category {name!r}; this model knows: {', '.join(self.cfg.classes)}")
        return self.cfg.classes.index(name)

    def embed_condition(self, cond: Condition) -> torch.Tensor:
        """(B, 1, width): the class embedding, or the projected pooled image/text vector."""
        if self.cfg.condition == "class":
            if cond.labels is None:
                raise ValueError("this generator is class-guided: pass Condition(labels=...) (a --cate name)")
            return self.class_embedding(cond.labels)[:, None]
        if cond.pooled is None:
            raise ValueError(f"this generator is {self.cfg.condition}-guided: pass the encoder's pooled "
                             f"{self.cfg.condition} embedding (Condition(pooled=...))")
        return self.cond_proj(cond.pooled.to(self.cond_proj.weight.dtype))[:, None]

    def null(self, batch: int, uncond: Condition | None = None) -> torch.Tensor:
        """The unconditional prefix (B, 1, width): the encoder's empty embedding when given,
        else the learned null condition of a model trained with cond_drop > 0."""
        if uncond is not None and self.cfg.condition != "class":
            return self.embed_condition(Condition(pooled=uncond.pooled.reshape(1, -1))).expand(batch, -1, -1)
        if self.cfg.cond_drop <= 0:
            raise ValueError("classifier-free guidance needs a generator trained with condition dropout "
                             "(cond_drop > 0); sample with guidance 0")
        return self.null_condition[None].expand(batch, -1, -1)

    def drop_condition(self, c_B1D: torch.Tensor, u_B: torch.Tensor) -> torch.Tensor:
        """Training: the null condition where u < cond_drop."""
        if self.cfg.cond_drop <= 0:
            return c_B1D
        keep = (u_B >= self.cfg.cond_drop).to(c_B1D.dtype)[:, None, None]
        return keep * c_B1D + (1 - keep) * self.null_condition[None]

    # ---- the network -----------------------------------------------------------------------
    def run(self, x: torch.Tensor, cache: StaticKVCache | None = None) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            if self.checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, cache, i)
        if cache is not None:
            cache.start += x.shape[1]
        return self.dec(x)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.emb.weight) + self.bias_value

    def prefix(self, c_B1D: torch.Tensor) -> torch.Tensor:
        """[condition | SOS + pos 0]: (B, 2, width)."""
        sos = (self.value_start + self.pos_emb.weight[:1])[None].expand(len(c_B1D), -1, -1)
        return torch.cat((c_B1D, sos.to(c_B1D.dtype)), 1)

    def forward(self, tokens_BL: torch.Tensor, cond: Condition, drop_u: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: logits (B, L, vocab), [:, i] predicting tokens[:, i] from the condition
        and tokens[:, :i]. Training passes drop_u (B,) uniform draws: conditions with
        u < cond_drop are replaced by the null one."""
        c = self.embed_condition(cond)
        if drop_u is not None:
            c = self.drop_condition(c, drop_u)
        L = tokens_BL.shape[1]
        x = torch.cat((self.prefix(c), self.emb(tokens_BL) + self.pos_emb.weight[1:L + 1]), 1)
        return self.head(self.run(x)[:, 1:-1])

    # ---- sampling --------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, quantizer, cond: Condition, uncond: Condition | None = None, *, batch: int | None = None,
               guidance: float = 0.0, top_k: int = 250, top_p: float = 0.0, temperature: float = 1.0,
               seed: int | None = None, generator: torch.Generator | None = None, use_cache: bool = True,
               step_seconds: list | None = None, progress: bool = False, max_steps: int | None = None) -> torch.Tensor:
        """Token ids (B, num_tokens), one per step, always in eval mode. The signature is the
        next-scale generator's (models.ar.NextScaleAR.sample); `quantizer` is not needed here
        (raster tokens are the model's own input) and may be None.

        cond: batch B conditions (labels for class models, pooled vectors for image/text).
        guidance: classifier-free guidance weight g, logits = (1+g)·cond − g·uncond (models
            trained with cond_drop > 0); 0 samples as the official script (top-k 250, T 1).
        seed or generator: the randomness (a seed builds a generator on the model's device).
        use_cache: one new token per step through the KV cache (True), or the official
            full-prefix recomputation at every step.
        step_seconds: a list that receives the wall time of each step (benchmarks).
        max_steps: stop after this many tokens (benchmarks; the rest stay 0).
        """
        device = self.value_start.device
        if generator is None:
            generator = torch.Generator(device=device).manual_seed(0 if seed is None else seed)
        c = self.embed_condition(cond)
        if batch is not None and len(c) == 1:        # one condition for the whole batch
            c = c.expand(batch, -1, -1)
        B = len(c)
        guided = guidance != 0
        if guided:
            c = torch.cat((c, self.null(B, uncond).to(c)))
        was_training = self.training
        self.eval()
        try:
            return self._sample_loop(c, B, guided, guidance, top_k, top_p, temperature, generator, use_cache,
                                     step_seconds, progress, max_steps or self.cfg.num_tokens)
        finally:
            self.train(was_training)

    def _sample_loop(self, c, B, guided, guidance, top_k, top_p, temperature, generator, use_cache, step_seconds,
                     progress, steps):
        L = self.cfg.num_tokens
        out = torch.zeros(B, L, dtype=torch.long, device=c.device)
        cache = None
        if use_cache:
            H = self.cfg.num_heads
            cache = StaticKVCache(self.cfg.depth, len(c), H, L + 1, self.cfg.width // H, c)
            x = self.prefix(c)
        tick = time.perf_counter()
        for i in tqdm(range(min(steps, L)), desc="tokens", unit="tok", disable=not progress, dynamic_ncols=True,
                      leave=False):
            if use_cache:
                h = self.run(x, cache)[:, -1:]
            else:                                     # the official step: the whole prefix, placeholder at i
                tokens = out[:, :i + 1].repeat(2, 1) if guided else out[:, :i + 1]
                h = self.run(torch.cat((self.prefix(c), self.emb(tokens) + self.pos_emb.weight[1:i + 2]), 1))
                h = h[:, i + 1:i + 2]
            logits = self.head(h)
            if guided:
                logits = (1 + guidance) * logits[:B] - guidance * logits[B:]
            out[:, i] = sample_top_k_top_p(logits, top_k, top_p, temperature, generator)[:, 0]
            if use_cache and i + 1 < L:
                x = self.emb(out[:, i:i + 1]) + self.pos_emb.weight[i + 1]
                if guided:
                    x = x.repeat(2, 1, 1)
            if step_seconds is not None:
                if c.is_cuda:
                    torch.cuda.synchronize()
                step_seconds.append(time.perf_counter() - tick)
                tick = time.perf_counter()
        return out

    def flops_per_token(self, prefix: int) -> dict:
        """Multiply-adds ×2 of one new token at position `prefix` (cached): linear layers and attention."""
        D, V, n = self.cfg.width, self.cfg.vocab_size, self.cfg.depth
        return {"linear": 2 * (n * 12 * D * D + D * D + D * V), "attention": 2 * n * 2 * D * (prefix + 1)}


# ----------------------------------------------------------------------------- checkpoints

def load_raster_ar(ckpt, device="cpu") -> RasterAR:
    """A RasterAR from our checkpoint folder (one file or shards), strictly loaded, in eval mode."""
    return load_built(ckpt, "raster_ar", lambda cfg: RasterAR(from_dict(RasterARConfig, cfg)), device)


TIED = "z_value_dec.weight"        # the official output projection: the same tensor as emb.weight


def sizes_from_official(state: dict, base: RasterARConfig) -> RasterARConfig:
    """`base` with the width, depth, vocabulary, length and classes the official tensors show
    (heads cannot be seen in the tensors: they come from `base`)."""
    if "emb.weight" not in state or "pos_emb.weight" not in state:
        return base                               # the conversion names what is missing
    V, D = state["emb.weight"].shape
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    sizes = dict(width=D, vocab_size=V, depth=depth, num_tokens=state["pos_emb.weight"].shape[0] - 1)
    if "class_embedding.weight" in state:
        n = state["class_embedding.weight"].shape[0]
        sizes["classes"] = SHAPENET55 if n == len(SHAPENET55) else tuple(f"class_{i}" for i in range(n))
    heads = base.num_heads if D % base.num_heads == 0 else max(h for h in range(1, D + 1) if D % h == 0 and D // h >= min(64, D))
    try:
        return dataclasses.replace(base, num_heads=heads, **sizes)
    except ConfigError as e:
        raise ConversionError(f"its tensors give a generator that cannot be built ({e})") from None


def convert_official(state: dict, model: RasterAR) -> dict:
    """Official transformer_model state dict (prefix removed) -> ours: the same names, without
    the tied output projection (checked to be the embedding where the values are there)."""
    if TIED in state and "emb.weight" in state:
        a, b = state[TIED], state["emb.weight"]
        if a.shape != b.shape or (a.device.type != "meta" and a.data_ptr() != b.data_ptr() and not torch.equal(a, b)):
            raise ConversionError(f"'{TIED}' is not tied to 'emb.weight' as in the released model")
    return map_official_state(state, model.state_dict(), to_ours=lambda k: None if k == TIED else k,
                              to_official=lambda k: k, dropped=(TIED,))

