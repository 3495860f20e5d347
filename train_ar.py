#!/usr/bin/env python
"""Train the next-scale generator (stage 2) on precomputed tokens.

    # one process (CPU or one GPU)
    python train_ar.py --config configs/ar/small_text.yaml --data-dir data/shapes --vqvae runs/vqvae_small \\
        --out-dir runs/ar_small_text
    # Argus-3D: the raster-order GPT on the occupancy tokenizer's ids (kind: raster)
    python train_ar.py --config configs/argus/gpt_small.yaml --data-dir data/shapes --out-dir runs/argus_gpt_small
    # several processes on one node (gloo on CPU, NCCL on GPUs); the original's scripts do this
    torchrun --standalone --nproc_per_node 8 train_ar.py --config configs/ar/paper_image.yaml ...
    bash train_image.sh DEPTH BS NPROC_PER_NODE VQVAE_PATH OUT_DIR DATA_DIR

The data directory is made by scripts/precompute.py (what it must hold: trainers/ar.py, and
trainers/raster_ar.py for the Argus-3D generator). The config is a generator config
(configs/ar/*.yaml; configs/argus/gpt_*.yaml with `kind: raster`) with an optional `train:`
section (trainers/ar.py TrainConfig: the official recipe by default; `train.parallel: fsdp`
shards an Argus-3D model over the processes). `--out-dir` always holds the latest
model.safetensors + config.json and train_state/ for an exact --resume; TensorBoard logs go to
OUT/tb, every step's loss and token accuracy to OUT/train_log.jsonl, the held-out loss and token
accuracy every `eval_every` steps to OUT/metrics.jsonl, and every `sample_every` steps renders of
sampled objects to OUT/samples/step_N.png (with --vqvae).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trainers.ar import ARRunConfig, ARTrainer  # noqa: E402
from trainers.cli import add_run_args, load_run_config  # noqa: E402
from trainers.loop import fit  # noqa: E402
from trainers.raster_ar import RasterRunConfig, RasterTrainer  # noqa: E402
from utils.cli import ArgumentParser, run  # noqa: E402
from utils.config import ConfigError, read_yaml  # noqa: E402

# The config's `kind`: the SAR3D next-scale generator (the default) or the Argus-3D raster GPT.
GENERATORS = ("next_scale", "raster")


def main(argv=None):
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True, type=Path, help="generator config with an optional train: section")
    ap.add_argument("--data-dir", required=True, type=Path, help="G-buffer dataset root with precomputed tokens")
    ap.add_argument("--vqvae", type=Path, help="the VQVAE that made the tokens (for the sample renders)")
    add_run_args(ap, "train.lr=3e-4 or depth=4")
    args = ap.parse_args(argv)
    kind = read_yaml(args.config).get("kind", "next_scale") if args.config.is_file() else "next_scale"
    if kind not in GENERATORS:
        raise ConfigError(f"{args.config}: kind {kind!r} is not one of {', '.join(GENERATORS)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if kind == "raster":
        trainer = RasterTrainer(load_run_config(RasterRunConfig, args), args.data_dir, args.out_dir)
    else:
        trainer = ARTrainer(load_run_config(ARRunConfig, args), args.data_dir, args.vqvae, args.out_dir)
    fit(trainer, args.resume, args.stop_at)
    return 0


if __name__ == "__main__":
    run(main)
