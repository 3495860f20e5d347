#!/usr/bin/env python
"""Write a randomly initialised CLIP text encoder (character-level tokenizer) with save_pretrained.

    python scripts/make_random_clip.py --out checkpoints/clip-random [--width 64] [--layers 2] [--heads 4]

A stand-in for openai/clip-vit-large-patch14 where it cannot be downloaded: its embeddings are a
fixed (seeded) function of the caption's characters, so a generator can learn from them, but they
carry no pretrained meaning. Load it like the real one (--text-encoder checkpoints/clip-random).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.cli import ArgumentParser, run  # noqa: E402


def char_vocab() -> dict:
    """A byte-level BPE vocabulary with no merges: every character is a token, '</w>' ends a word."""
    from tokenizers import pre_tokenizers
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    return vocab


def save_random_clip(path, width: int = 64, layers: int = 2, heads: int = 4, seed: int = 0,
                     with_tokenizer: bool = True) -> Path:
    """A random CLIP text model (77 positions) and its character tokenizer in `path`."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    vocab = char_vocab()
    torch.manual_seed(seed)
    CLIPTextModel(CLIPTextConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                                 num_attention_heads=heads, vocab_size=len(vocab), max_position_embeddings=77,
                                 bos_token_id=0, eos_token_id=1, pad_token_id=1)).save_pretrained(path)
    if with_tokenizer:
        CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77).save_pretrained(path)
    return Path(path)


def main(argv=None):
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    save_random_clip(args.out, args.width, args.layers, args.heads, seed=args.seed)
    print(f"wrote a random {args.width}-wide, {args.layers}-layer CLIP text encoder to {args.out}")
    return 0


if __name__ == "__main__":
    run(main)
