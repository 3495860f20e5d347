#!/usr/bin/env python
"""Train a tokenizer (stage 1): the multi-scale triplane VQVAE on a G-buffer dataset, or, for a
config with `kind: occupancy` (configs/argus/*.yaml), the Argus-3D occupancy tokenizer on the
ONet-layout files of the same dataset (trainers/occupancy.py).

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
from trainers.occupancy import OccupancyRunConfig, OccupancyTrainer  # noqa: E402
from trainers.vqvae import VQVAERunConfig, VQVAETrainer  # noqa: E402
from utils.cli import ArgumentParser, run  # noqa: E402
from utils.config import ConfigError, read_yaml  # noqa: E402

# The config's `kind`: the SAR3D triplane VQVAE (the default) or the Argus-3D occupancy tokenizer.
TOKENIZERS = {"triplane": (VQVAERunConfig, VQVAETrainer), "occupancy": (OccupancyRunConfig, OccupancyTrainer)}


def main(argv=None):
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True, type=Path,
                    help="tokenizer config (configs/vqvae/*.yaml, configs/argus/*.yaml) with an optional train: section")
    ap.add_argument("--data-dir", required=True, type=Path,
                    help="G-buffer dataset root (with dataset.json), or an occupancy dataset for kind: occupancy")
    add_run_args(ap, "train.patch_size=32")
    args = ap.parse_args(argv)
    kind = read_yaml(args.config).get("kind", "triplane") if args.config.is_file() else "triplane"
    if kind not in TOKENIZERS:
        raise ConfigError(f"{args.config}: kind {kind!r} is not one of {', '.join(TOKENIZERS)}")
    run_config, trainer = TOKENIZERS[kind]
    cfg = load_run_config(run_config, args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    fit(trainer(cfg, args.data_dir, args.out_dir, args.resume), args.resume, args.stop_at)
    return 0


if __name__ == "__main__":
    run(main)
