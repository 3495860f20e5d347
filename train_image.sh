#!/usr/bin/env bash
# Train the image-conditioned generator (train_text.sh: the text one) with the original script's
# positional arguments. Run it with no arguments or --help for the details.
set -euo pipefail
SCRIPT=${SCRIPT:-train_image.sh}
KIND=${KIND:-image}
HERE=$(cd "$(dirname "$0")" && pwd)
DEFAULT_CONFIG=$HERE/configs/ar/paper_$KIND.yaml
usage() {
  cat <<TXT
usage: bash $SCRIPT DEPTH BS NPROC_PER_NODE VQVAE_PATH OUT_DIR DATA_DIR [train_ar.py flags]

Trains the $KIND-conditioned next-scale generator with train_ar.py.
  DEPTH           transformer blocks (width 64·DEPTH unless the config sets one)
  BS              objects per step over all processes
  NPROC_PER_NODE  processes on this node: GPUs (NCCL), or CPU processes (gloo) without one;
                  1 runs train_ar.py directly
  VQVAE_PATH      the VQVAE whose tokens DATA_DIR holds (our checkpoint folder)
  OUT_DIR         the run's folder; one that already holds a run is resumed
  DATA_DIR        a dataset with the tokens and $KIND embeddings of scripts/precompute.py
Environment:
  CONFIG          the generator config (default: $(basename "$DEFAULT_CONFIG"), the paper's, whose
                  encoder is the official one). For the demo VQVAE and its packaged encoders:
                  CONFIG=configs/ar/demo_$KIND.yaml
Example (the demo's data and VQVAE, on a CPU):
  CONFIG=configs/ar/demo_$KIND.yaml bash $SCRIPT 4 8 1 checkpoints/demo/vqvae runs/ar_$KIND data/shapes
TXT
}
if [ $# -gt 0 ] && { [ "$1" = "--help" ] || [ "$1" = "-h" ]; }; then usage; exit 0; fi
if [ $# -lt 6 ]; then usage >&2; exit 2; fi
DEPTH=$1; BS=$2; NPROC=$3; VQVAE=$4; OUT_DIR=$5; DATA_DIR=$6; shift 6
CONFIG=${CONFIG:-$DEFAULT_CONFIG}
RESUME=()
if compgen -G "$OUT_DIR/train_state*/state.json" > /dev/null; then RESUME=(--resume); fi
exec python "$HERE/scripts/launch.py" --standalone --nproc_per_node "$NPROC" "$HERE/train_ar.py" --config "$CONFIG" \
  --set "depth=$DEPTH" --vqvae "$VQVAE" --data-dir "$DATA_DIR" --out-dir "$OUT_DIR" --batch-size "$BS" \
  "${RESUME[@]}" "$@"
