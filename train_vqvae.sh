#!/usr/bin/env bash
# Train the VQVAE with the original script's positional arguments. Run it with no arguments or
# --help for the details.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
usage() {
  cat <<TXT
usage: bash train_vqvae.sh DATA_DIR NUM_GPUS BATCH_SIZE OUT_DIR [train_vqvae.py flags]

Trains the multi-scale triplane VQVAE with train_vqvae.py.
  DATA_DIR    a G-buffer dataset (scripts/make_shapes.py, scripts/render_meshes.py or the official data)
  NUM_GPUS    processes on this node: GPUs (NCCL), or CPU processes (gloo) without one;
              1 runs train_vqvae.py directly
  BATCH_SIZE  objects per step over all processes
  OUT_DIR     the run's folder; one that already holds a run is resumed
Environment:
  CONFIG      the model config (default: paper.yaml, the paper's); on a CPU:
              CONFIG=configs/vqvae/small.yaml
Example:
  CONFIG=configs/vqvae/small.yaml bash train_vqvae.sh data/shapes 1 8 runs/vqvae_small
TXT
}
if [ $# -gt 0 ] && { [ "$1" = "--help" ] || [ "$1" = "-h" ]; }; then usage; exit 0; fi
if [ $# -lt 4 ]; then usage >&2; exit 2; fi
DATA_DIR=$1; NUM_GPUS=$2; BATCH_SIZE=$3; OUT_DIR=$4; shift 4
CONFIG=${CONFIG:-$HERE/configs/vqvae/paper.yaml}
RESUME=()
if compgen -G "$OUT_DIR/train_state*/state.json" > /dev/null; then RESUME=(--resume); fi
exec python "$HERE/scripts/launch.py" --standalone --nproc_per_node "$NUM_GPUS" "$HERE/train_vqvae.py" \
  --config "$CONFIG" --data-dir "$DATA_DIR" --out-dir "$OUT_DIR" --batch-size "$BATCH_SIZE" "${RESUME[@]}" "$@"
