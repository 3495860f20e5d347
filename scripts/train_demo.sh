#!/usr/bin/env bash
# Rebuild the embedded demo models (checkpoints/demo) from nothing, on a CPU: the procedural
# dataset, the small VQVAE and its decoder fine-tuned with the occupancy term, the same objects
# upright with their token and condition files, then the text and image generators; the
# captioner; and for Argus-3D, the small occupancy tokenizer and the class-guided generator on the
# captioner's objects.
# Every stage resumes where it stopped when the script is run again.
#   bash scripts/train_demo.sh            # DATA, GEN_DATA, RUNS and OUT override the folders below
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data/shapes1k}
GEN_DATA=${GEN_DATA:-data/upright1k}
RUNS=${RUNS:-runs/demo}
OUT=${OUT:-checkpoints/demo}
VQVAE_STEPS=${VQVAE_STEPS:-5000}
DECODER_STEPS=${DECODER_STEPS:-3000}
CAPTION_DATA=${CAPTION_DATA:-data/caption2k}

resume() { if compgen -G "$1/train_state*/state.json" > /dev/null; then echo --resume; fi; }

python scripts/make_shapes.py --out "$DATA" --num 600 --res 64 --seed 0
python train_vqvae.py --config configs/vqvae/small.yaml --data-dir "$DATA" --out-dir "$RUNS/vqvae" \
  --max-steps "$VQVAE_STEPS" $(resume "$RUNS/vqvae")
# Encoder, quant_conv and quantizer frozen: the decoder learns sharper surfaces from the occupancy
# files while every token id, and so what the generators learn from, stays as it was.
python train_vqvae.py --config configs/vqvae/small.yaml --data-dir "$DATA" --out-dir "$RUNS/vqvae_dec" \
  --max-steps "$DECODER_STEPS" --set train.init_from="$RUNS/vqvae" --set "train.freeze=[encoder,quant_conv,quantizer]" \
  --set train.occupancy_weight=0.5 --set train.lr_dit=2.0e-4 --set train.lr_rest=2.0e-4 $(resume "$RUNS/vqvae_dec")
# The tokenizer learns objects at every yaw and tilt; the generators learn them upright, as aligned
# datasets hold them: over turned objects a box's token ids spread over all its turns, and what
# the generator samples decodes as a rounded cylinder (README).
python scripts/make_shapes.py --out "$GEN_DATA" --num 600 --res 64 --seed 0 --upright
python scripts/precompute.py --data-dir "$GEN_DATA" --vqvae "$RUNS/vqvae" --text-encoder minilm --image-encoder mobilenet_v2 \
  --overwrite   # the tokens of this VQVAE, never stale ones
for kind in text image; do
  python train_ar.py --config "configs/ar/demo_$kind.yaml" --data-dir "$GEN_DATA" --vqvae "$RUNS/vqvae" \
    --out-dir "$RUNS/ar_$kind" $(resume "$RUNS/ar_$kind")
done
# The captioner: a small random LLaMA (word-level tokenizer) trained from scratch on the ids of
# upright objects (the first 600 are GEN_DATA's), the last 5 of each category held out: 1000
# steps on 1000 objects, then 1500 more from those weights on 2000 objects.
python scripts/make_demo_llm.py --out "$OUT/captioner_llm"
for num in 1000 2000; do
  python scripts/make_shapes.py --out "$CAPTION_DATA" --num "$num" --res 64 --seed 0 --upright
  python scripts/precompute.py --data-dir "$CAPTION_DATA" --vqvae "$RUNS/vqvae"
  if [ "$num" = 1000 ]; then
    python train_caption.py --config configs/caption/demo.yaml --data-dir "$CAPTION_DATA" --vqvae "$RUNS/vqvae" \
      --set llm="$OUT/captioner_llm" --out-dir "$RUNS/captioner_1k" $(resume "$RUNS/captioner_1k")
  else
    python train_caption.py --config configs/caption/demo.yaml --data-dir "$CAPTION_DATA" --vqvae "$RUNS/vqvae" \
      --set llm="$OUT/captioner_llm" --set train.init_from="$RUNS/captioner_1k" --set train.lr=5.0e-4 \
      --max-steps 1500 --out-dir "$RUNS/captioner" $(resume "$RUNS/captioner")
  fi
done
# Argus-3D: the tokenizer (configs/argus/small.yaml, an hour on 2 cores) on the captioner's 2000
# upright objects, their ids (every split), the class-guided GPT on them.
python train_vqvae.py --config configs/argus/small.yaml --data-dir "$CAPTION_DATA" \
  --out-dir "$RUNS/argus_tokenizer" $(resume "$RUNS/argus_tokenizer")
for split in train val test; do
  python scripts/precompute.py --data-dir "$CAPTION_DATA" --occupancy-vqvae "$RUNS/argus_tokenizer" --inputs 3000 \
    --split "$split" --overwrite
done
python train_ar.py --config configs/argus/gpt_small.yaml --data-dir "$CAPTION_DATA" --out-dir "$RUNS/argus_class" \
  $(resume "$RUNS/argus_class")
for m in vqvae_dec ar_text ar_image argus_tokenizer argus_class captioner; do
  dst="$OUT/${m%_dec}"
  mkdir -p "$dst"
  cp "$RUNS/$m/model.safetensors" "$RUNS/$m/config.json" "$dst/"
done
du -sh "$OUT"
