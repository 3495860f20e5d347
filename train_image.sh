#!/usr/bin/env bash
# Train the image-conditioned generator (train_text.sh: the text one) with the original script's
# positional arguments, through torchrun:
#   bash train_image.sh DEPTH BS NPROC_PER_NODE VQVAE_PATH OUT_DIR DATA_DIR [extra train_ar.py flags]
# DEPTH blocks (width 64·DEPTH unless the config sets one), BS objects per step over all
# NPROC_PER_NODE processes (NCCL on GPUs; gloo on the CPU without one). DATA_DIR holds the tokens
# and condition embeddings of scripts/precompute.py. CONFIG picks the model (default: the paper's).
# An OUT_DIR that already holds a run is resumed.
set -euo pipefail
if [ $# -lt 6 ]; then
  echo "usage: bash ${SCRIPT:-train_image.sh} DEPTH BS NPROC_PER_NODE VQVAE_PATH OUT_DIR DATA_DIR [train_ar.py flags]" >&2
  exit 2
fi
DEPTH=$1; BS=$2; NPROC=$3; VQVAE=$4; OUT_DIR=$5; DATA_DIR=$6; shift 6
HERE=$(cd "$(dirname "$0")" && pwd)
CONFIG=${CONFIG:-$HERE/configs/ar/paper_image.yaml}
RESUME=()
if [ -f "$OUT_DIR/train_state/state.json" ]; then RESUME=(--resume); fi
exec torchrun --standalone --nproc_per_node "$NPROC" "$HERE/train_ar.py" --config "$CONFIG" --set "depth=$DEPTH" \
  --vqvae "$VQVAE" --data-dir "$DATA_DIR" --out-dir "$OUT_DIR" --batch-size "$BS" "${RESUME[@]}" "$@"
