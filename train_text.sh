#!/usr/bin/env bash
# Train the text-conditioned generator: the arguments of train_image.sh, the paper's text model by default.
#   bash train_text.sh DEPTH BS NPROC_PER_NODE VQVAE_PATH OUT_DIR DATA_DIR [extra train_ar.py flags]
HERE=$(cd "$(dirname "$0")" && pwd)
CONFIG=${CONFIG:-$HERE/configs/ar/paper_text.yaml} SCRIPT=train_text.sh exec bash "$HERE/train_image.sh" "$@"
