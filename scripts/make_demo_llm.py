#!/usr/bin/env python
"""Write the demo captioner's base language model: a small LLaMA with random weights and a
word-level tokenizer, as a save_pretrained folder (models.captioner.load_llm reads it offline).

    python scripts/make_demo_llm.py [--out checkpoints/demo/captioner_llm] [--seed 0]

The model is not pretrained: train_caption.py trains all of it (stage 2 from scratch,
configs/caption/demo.yaml). Its vocabulary is every word the captioner reads or writes: the
words of the procedural captions (datasets/shapes.py: families, colours, size and proportion
words, "on top of", "next to"), of the captioning prompt and of the vicuna_v1_1 layout the
prompt is set in (models.captioner: no chat template), plus <unk>, <s> (put in front, as
LLaMA's tokenizer does), </s> and <pad>. A 30k-word vocabulary (MiniLM's WordPiece) would hold
7.8M embedding weights at width 256, three times the transformer's, and the trained captioner
folder stores every LLM weight once more; ~100 words keep both folders near 10 MB in float32.
A word outside the vocabulary (e.g. in --question) reads as <unk>.

The same seed writes the same files.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.shapes import FAMILIES, PALETTE, PROPORTIONS, SIZES  # noqa: E402
from models.captioner import PROMPT, VICUNA_SYSTEM  # noqa: E402
from utils.cli import ArgumentParser, run  # noqa: E402

SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
CAPTION_GLUE = "a an on top of next to"          # the words that join the parts of a caption
LAYOUT = "USER: ASSISTANT:"                     # the vicuna_v1_1 turn markers


def make_tokenizer():
    """A lower-case word-level tokenizer over the vocabulary of the module docstring."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    proportions = {w for words in PROPORTIONS.values() for w in words}
    text = " ".join([*FAMILIES, *PALETTE, *SIZES, *proportions, CAPTION_GLUE, PROMPT, VICUNA_SYSTEM, LAYOUT]).lower()
    words = sorted({w for w, _ in pre.pre_tokenize_str(text)})
    vocab = {w: i for i, w in enumerate([*SPECIALS, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok.decoder = decoders.WordPiece()               # words joined by spaces, none before punctuation
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def make_llm(tokenizer, seed: int, hidden: int, layers: int, heads: int, intermediate: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def main(argv=None):
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("checkpoints/demo/captioner_llm"), help="folder to write")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=512)
    args = ap.parse_args(argv)
    if args.hidden % args.heads:
        raise ValueError(f"--hidden {args.hidden} must be a multiple of --heads {args.heads}")
    tokenizer = make_tokenizer()
    model = make_llm(tokenizer, args.seed, args.hidden, args.layers, args.heads, args.intermediate)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.out}: LLaMA of {params / 1e6:.2f}M parameters, {len(tokenizer)} words")
    return 0


if __name__ == "__main__":
    run(main)
