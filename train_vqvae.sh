#!/usr/bin/env bash
# Train the VQVAE with the original script's positional arguments, through torchrun:
#   bash train_vqvae.sh DATA_DIR NUM_GPUS BATCH_SIZE OUT_DIR [extra train_vqvae.py flags]
# NUM_GPUS processes on this node (NCCL on GPUs; on a machine without one, gloo on the CPU);
# BATCH_SIZE objects per step over all of them. CONFIG picks the model (default: the paper's).
# An OUT_DIR that already holds a run is resumed.
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: bash train_vqvae.sh DATA_DIR NUM_GPUS BATCH_SIZE OUT_DIR [train_vqvae.py flags]" >&2
  exit 2
fi
DATA_DIR=$1; NUM_GPUS=$2; BATCH_SIZE=$3; OUT_DIR=$4; shift 4
HERE=$(cd "$(dirname "$0")" && pwd)
CONFIG=${CONFIG:-$HERE/configs/vqvae/paper.yaml}
RESUME=()
if [ -f "$OUT_DIR/train_state/state.json" ]; then RESUME=(--resume); fi
exec torchrun --standalone --nproc_per_node "$NUM_GPUS" "$HERE/train_vqvae.py" --config "$CONFIG" \
  --data-dir "$DATA_DIR" --out-dir "$OUT_DIR" --batch-size "$BATCH_SIZE" "${RESUME[@]}" "$@"
