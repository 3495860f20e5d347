#!/usr/bin/env bash
# Rebuild the embedded demo model (checkpoints/demo) from nothing, on a CPU: the procedural
# dataset, the small VQVAE, the token and condition files, then the text and image generators.
# Every stage resumes where it stopped when the script is run again.
#   bash scripts/train_demo.sh            # DATA, RUNS and OUT override the folders below
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data/shapes1k}
RUNS=${RUNS:-runs/demo}
OUT=${OUT:-checkpoints/demo}
VQVAE_STEPS=${VQVAE_STEPS:-5000}

resume() { if [ -f "$1/train_state/state.json" ]; then echo --resume; fi; }

python scripts/make_shapes.py --out "$DATA" --num 600 --res 64 --seed 0
python train_vqvae.py --config configs/vqvae/small.yaml --data-dir "$DATA" --out-dir "$RUNS/vqvae" \
  --max-steps "$VQVAE_STEPS" $(resume "$RUNS/vqvae")
python scripts/precompute.py --data-dir "$DATA" --vqvae "$RUNS/vqvae" --text-encoder minilm --image-encoder mobilenet_v2 \
  --overwrite   # the tokens of this VQVAE, never stale ones
for kind in text image; do
  python train_ar.py --config "configs/ar/demo_$kind.yaml" --data-dir "$DATA" --vqvae "$RUNS/vqvae" \
    --out-dir "$RUNS/ar_$kind" $(resume "$RUNS/ar_$kind")
done
for m in vqvae ar_text ar_image; do
  mkdir -p "$OUT/$m"
  cp "$RUNS/$m/model.safetensors" "$RUNS/$m/config.json" "$OUT/$m/"
done
du -sh "$OUT"
