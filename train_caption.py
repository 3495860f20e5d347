#!/usr/bin/env python
"""Train the 3D captioner (SAR3D-LLM) on precomputed tokens and their captions.

    # stage 1: projector and point rows, the LLM frozen (one process: CPU or one GPU)
    python train_caption.py --config configs/caption/paper_stage1.yaml --data-dir data/objaverse \\
        --vqvae checkpoints/vqvae --out-dir runs/caption_stage1
    # stage 2: everything, from stage 1's weights, sharded over 5 GPUs (train.parallel: fsdp)
    torchrun --standalone --nproc_per_node 5 train_caption.py --config configs/caption/paper.yaml \\
        --data-dir data/objaverse --vqvae checkpoints/vqvae --out-dir runs/caption_stage2 \\
        --set train.init_from=runs/caption_stage1

The data directory is made by scripts/precompute.py (token ids beside each object's
caption_3dtopia.txt; trainers/caption.py). The config is a captioner config (configs/caption/*.yaml,
`kind: caption`) with an optional `train:` section (trainers/caption.py TrainConfig); `llm` names
the base language model's folder (--set llm=DIR). `--out-dir` holds the latest model.safetensors
+ config.json (caption.py reads them) and train_state/ for an exact --resume; every step's loss
goes to OUT/train_log.jsonl and TensorBoard (OUT/tb), the held-out loss and caption scores every
`eval_every` steps to OUT/metrics.jsonl.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trainers.caption import CaptionRunConfig, CaptionTrainer  # noqa: E402
from trainers.cli import add_run_args, load_run_config  # noqa: E402
from trainers.loop import fit  # noqa: E402
from utils.cli import ArgumentParser, run  # noqa: E402
from utils.config import ConfigError, read_yaml  # noqa: E402


def main(argv=None):
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True, type=Path, help="captioner config with an optional train: section")
    ap.add_argument("--data-dir", required=True, type=Path, help="G-buffer dataset root with precomputed tokens")
    ap.add_argument("--vqvae", required=True, type=Path, help="the VQVAE that made the tokens (its codebook is read)")
    add_run_args(ap, "train.stage=2 or llm=DIR")
    args = ap.parse_args(argv)
    kind = read_yaml(args.config).get("kind", "caption") if args.config.is_file() else "caption"
    if kind != "caption":
        raise ConfigError(f"{args.config}: kind {kind!r}; train_caption.py trains captioners (kind: caption), "
                          "train_ar.py the generators")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    trainer = CaptionTrainer(load_run_config(CaptionRunConfig, args), args.data_dir, args.vqvae, args.out_dir)
    fit(trainer, args.resume, args.stop_at)
    return 0


if __name__ == "__main__":
    run(main)
