"""Where every tensor of a triplane and of its token pyramid sits: the one home of these layouts.

Triplane: (B, 3·C, R, R), plane p in channels p·C … p·C+C−1; the renderers read it as
(B, 3, C, R, R) (`as_planes`).

Token pyramid, two layouts of the same ids:
- per scale ("planes"): a list over scales of (B·3, pn², ...), row 3b+p = plane p of object b, raster
  order inside a plane. The quantizer and the decoder work in it.
- sequence ("generator order"): (B, L, ...) with L = 3·Σ pn², scales coarse to fine, each scale as
  [plane 0 | plane 1 | plane 2]. The generator, the precomputed token files and tokens.npy use it.

`check_pair` is the one check that a tokenizer and a generator fit each other; the generator
trainer, precompute and the pipeline call it.
"""
from __future__ import annotations

import hashlib

import torch

NUM_PLANES = 3


# ----------------------------------------------------------------------------- triplane

def as_planes(triplane: torch.Tensor) -> torch.Tensor:
    """(B, 3·C, R, R) or (B, 3, C, R, R) -> (B, 3, C, R, R)."""
    return triplane.reshape(triplane.shape[0], NUM_PLANES, -1, *triplane.shape[-2:])


def split_planes(f_BChw: torch.Tensor) -> torch.Tensor:
    """(B, 3·C, h, w) -> (B·3, C, h, w), the planes of an object adjacent."""
    B, C, h, w = f_BChw.shape
    return f_BChw.reshape(B * NUM_PLANES, C // NUM_PLANES, h, w)


def merge_planes(f_BPChw: torch.Tensor) -> torch.Tensor:
    """The inverse of split_planes: (B·3, C, h, w) -> (B, 3·C, h, w)."""
    BP, C, h, w = f_BPChw.shape
    return f_BPChw.reshape(BP // NUM_PLANES, NUM_PLANES * C, h, w)


# ----------------------------------------------------------------------------- token pyramid

def seq_len(patch_nums) -> int:
    """Tokens of one object in generator order: 3·Σ pn²."""
    return NUM_PLANES * sum(pn * pn for pn in patch_nums)


def token_levels_planes(patch_nums) -> tuple:
    """Scale index and plane index of every token of the sequence, each (L,) int64."""
    lvl = torch.cat([torch.full((NUM_PLANES * pn * pn,), s) for s, pn in enumerate(patch_nums)])
    plane = torch.cat([torch.arange(NUM_PLANES).repeat_interleave(pn * pn) for pn in patch_nums])
    return lvl, plane


def planes_to_sequence(per_scale: list) -> torch.Tensor:
    """Per-scale tensors (B·3, pn², ...) -> generator order (B, 3·Σpn², ...)."""
    return torch.cat([x.reshape(x.shape[0] // NUM_PLANES, NUM_PLANES * x.shape[1], *x.shape[2:])
                      for x in per_scale], 1)


def sequence_to_planes(seq_BL: torch.Tensor, patch_nums) -> list:
    """The inverse of planes_to_sequence: (B, 3·Σpn², ...) -> per scale (B·3, pn², ...)."""
    sizes = [NUM_PLANES * pn * pn for pn in patch_nums]
    if seq_BL.shape[1] != sum(sizes):
        raise ValueError(f"{seq_BL.shape[1]} tokens, expected {sum(sizes)} for patch_nums {list(patch_nums)}")
    return [x.reshape(x.shape[0] * NUM_PLANES, x.shape[1] // NUM_PLANES, *x.shape[2:])
            for x in seq_BL.split(sizes, dim=1)]


def object_sequence(per_scale: list, b: int) -> torch.Tensor:
    """Object b's ids in generator order, (3·Σpn²,), from the per-scale layout."""
    return torch.cat([x[NUM_PLANES * b:NUM_PLANES * b + NUM_PLANES].reshape(-1) for x in per_scale])


# ----------------------------------------------------------------------------- tokenizer ↔ generator

def tokenizer_signature(quantizer) -> dict:
    """What a generator must agree on with the tokenizer whose ids it models: the token layout
    (SAR3D: the scales and the code width; Argus-3D: the number of tokens), the vocabulary, and a
    fingerprint of the quantizer's weights (SAR3D: codebook and residual convolutions; Argus-3D:
    codebook and the way back to planes), which changes whenever the meaning of an id does. A
    decoder fine-tuned with the quantizer frozen keeps the fingerprint."""
    h = hashlib.sha256()
    for name, p in sorted(quantizer.named_parameters()):      # not the usage statistics (buffers)
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    if hasattr(quantizer, "patch_nums"):
        layout = {"patch_nums": list(quantizer.patch_nums), "c_vae": int(quantizer.c_vae)}
    else:
        layout = {"num_tokens": int(quantizer.num_tokens)}
    return {**layout, "vocab_size": int(quantizer.vocab_size), "fingerprint": h.hexdigest()[:16]}


def check_pair(tokenizer: dict, generator: dict, tokenizer_name: str, generator_name: str,
               hint: str = "pass the VQVAE whose tokens it was trained on") -> None:
    """Raise one ValueError naming both when `generator` (a generator config with the layout keys
    of `tokenizer`, vocab_size and optionally tokenizer, the fingerprint of the tokenizer it was
    trained on) does not fit `tokenizer` (a tokenizer_signature). A missing fingerprint on either
    side (official files, older checkpoints) checks the shapes only."""
    keys = ("patch_nums", "vocab_size", "c_vae") if "patch_nums" in tokenizer else ("num_tokens", "vocab_size")
    for key in keys:
        a, b = tokenizer[key], generator.get(key)
        if key == "patch_nums":
            a, b = list(a), list(b or ())
        if a != b:
            raise ValueError(f"{generator_name} does not fit {tokenizer_name}: {key} {b} in the generator, "
                             f"{a} in the tokenizer; {hint}")
    want, have = (generator.get("tokenizer") or ""), tokenizer.get("fingerprint") or ""
    if want and have and want != have:
        raise ValueError(f"{generator_name} was trained on the tokens of another VQVAE than {tokenizer_name} "
                         f"(tokenizer fingerprint {want}, this VQVAE's {have}); {hint}")
