#!/usr/bin/env python
"""Train the multi-scale triplane VQVAE (stage 1) on a G-buffer dataset.

    # one process (CPU or one GPU)
    python train_vqvae.py --config configs/vqvae/small.yaml --data-dir data/shapes --out-dir runs/vqvae_small
    # several processes on one node (gloo on CPU, NCCL on GPUs); the original's script does this
    torchrun --standalone --nproc_per_node 4 train_vqvae.py --config configs/vqvae/paper.yaml ...
    bash train_vqvae.sh DATA_DIR NUM_GPUS BATCH_SIZE OUT_DIR

The config is a model config (configs/vqvae/*.yaml) with an optional `train:` section
(trainers/vqvae.py TrainConfig: the official recipe by default; what each step supervises is
described there). `--out-dir` always holds the latest raw weights (model.safetensors +
config.json, what every other tool reads), the EMA weights in ema/, and train_state/ for an
exact `--resume`. TensorBoard logs go to OUT/tb, the losses of every step to
OUT/train_log.jsonl and the held-out PSNR curve to OUT/metrics.jsonl.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trainers.cli import add_run_args, load_run_config  # noqa: E402
from trainers.loop import fit  # noqa: E402
from trainers.vqvae import VQVAERunConfig, VQVAETrainer  # noqa: E402
from utils.cli import ArgumentParser, run  # noqa: E402


def main(argv=None):
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True, type=Path, help="model config with an optional train: section")
    ap.add_argument("--data-dir", required=True, type=Path, help="G-buffer dataset root (with dataset.json)")
    add_run_args(ap, "train.patch_size=32")
    args = ap.parse_args(argv)
    cfg = load_run_config(VQVAERunConfig, args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    fit(VQVAETrainer(cfg, args.data_dir, args.out_dir, args.resume), args.resume, args.stop_at)
    return 0


if __name__ == "__main__":
    run(main)
