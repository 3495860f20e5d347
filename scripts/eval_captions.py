#!/usr/bin/env python
"""How well a trained captioner describes held-out objects: greedy captions against theirs.

    python scripts/eval_captions.py --ckpt checkpoints/demo/captioner --data-dir data/caption2k \\
        [--holdout 5] [--batch-size 10] [--out outputs/eval_captions/results.json]

The objects are the held-out split of a token dataset (scripts/precompute.py wrote their ids; the
last --holdout objects of each category, as train_caption.py holds them out with train.holdout).
Each is captioned greedily with the captioning prompt and scored against its caption_3dtopia.txt
by evaluation/captions.py: corpus BLEU-4, ROUGE-L and CIDEr-D, and, for procedural captions, the
share naming exactly the right shape families and colours. Prints the scores and writes them with
every object's caption to --out (JSON).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.gbuffer import GBufferDataset  # noqa: E402
from datasets.precompute import as_generator_side, read_tokenizer_record  # noqa: E402
from evaluation.captions import caption_scores  # noqa: E402
from models.captioner import load_captioner, read_captioner_config  # noqa: E402
from models.layout import check_pair, seq_len  # noqa: E402
from utils.cli import ArgumentParser, check_device, run  # noqa: E402


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--ckpt", required=True, type=Path, help="captioner checkpoint folder")
    ap.add_argument("--data-dir", required=True, type=Path, help="token dataset (scripts/precompute.py)")
    ap.add_argument("--holdout", type=int, default=5, help="held-out objects per category (train.holdout)")
    ap.add_argument("--batch-size", type=int, default=10, help="objects captioned at once")
    ap.add_argument("--llm", help="the base LLM's folder, if not where the checkpoint says")
    ap.add_argument("--out", type=Path, default=Path("outputs/eval_captions/results.json"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    args = ap.parse_args(argv)
    if args.holdout < 1 or args.batch_size < 1:
        raise ValueError("--holdout and --batch-size must be at least 1")
    device = check_device(args.device)
    cfg = read_captioner_config(args.ckpt)
    record = read_tokenizer_record(args.data_dir)
    if record is not None:
        check_pair(as_generator_side(record), vars(cfg), f"the tokens in {args.data_dir}", f"the captioner {args.ckpt}",
                   "rerun scripts/precompute.py with the VQVAE the captioner was trained with")
    ds = GBufferDataset(args.data_dir, split="val", holdout=args.holdout, mode="tokens")
    if len(ds[0]["gt_BL"]) != seq_len(cfg.patch_nums):
        raise ValueError(f"the tokens in {args.data_dir} hold {len(ds[0]['gt_BL'])} ids per object, the captioner "
                         f"reads {seq_len(cfg.patch_nums)}: rerun scripts/precompute.py")
    model = load_captioner(args.ckpt, device, llm=args.llm)
    start = time.perf_counter()
    captions, references = [], []
    for first in range(0, len(ds), args.batch_size):
        samples = [ds[i] for i in range(first, min(first + args.batch_size, len(ds)))]
        captions += model.generate(torch.stack([s["gt_BL"] for s in samples]).to(device))
        references += [s["caption"] for s in samples]
    names = [rel for rel, _ in ds.items]
    seconds = time.perf_counter() - start
    scores = caption_scores(captions, [[r] for r in references])
    for name, text, ref in zip(names, captions, references):
        print(f"{name}: {text}  [{ref}]")
    print(f"{len(ds)} held-out objects ({seconds:.1f} s): " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    per_object = [{"object": n, "caption": c, "reference": r} for n, c, r in zip(names, captions, references)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"ckpt": str(args.ckpt), "data_dir": str(args.data_dir), "holdout": args.holdout,
                                    "num_objects": len(ds), "scores": scores, "per_object": per_object}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    run(main)
