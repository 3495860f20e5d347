#!/usr/bin/env python
"""Precompute the AR model's inputs for every object of a G-buffer dataset.

    python scripts/precompute.py --data-dir data/shapes --vqvae checkpoints/vqvae \\
        [--image-encoder [DIR|HUB_ID]] [--text-encoder [DIR|HUB_ID]] \\
        [--split all|train|val] [--batch-size 8] [--device cpu|cuda] [--workers 2] [--overwrite]
    # Argus-3D: the occupancy tokenizer's ids of each shape (occupancy_tokens.npz, field index)
    python scripts/precompute.py --data-dir data/shapes --occupancy-vqvae runs/argus_small [--split train]

Writes into each object's folder, under the official names (datasets.gbuffer.TOKEN_FILES and
CONDITION_FILES), what GBufferDataset(mode="tokens") reads back:

| file | shape (paper) | content |
|---|---|---|
| gt_BL_dim_8_l2norm_lrm_256.npy | (2040,) int64 | token ids of encoder view set 0 (views 0-5) |
| x_BLCv_wo_first_l_dim_8_l2_norm_lrm_256.npy | (2037, 8) float32 | teacher-forcing input |
| image_dino_embedding_lrm.npy | (257, 1024) float32 | [pooled; 256 patch tokens] of view (id % 4) + 1 |
| text_embedding_lrm_3dtopia.npy, text_pooler_output_lrm_3dtopia.npy | (77, 768), (768,) | caption |
| text_variants_embedding.npy, text_variants_pooler_output.npy | (V, 77, 768), (V, 768) | the V captions of caption_variants.json, where there is one |
| image_variants_embedding.npy | (12, 257, 1024) | [pooled; patch tokens] of every view (--all-views) |

With an encoder, its unconditional embedding (a white image, the empty prompt) also goes to the
dataset root as the official files/ have it: empty_dino_embedding.npy (257, 1024) and
empty_dino_pooler_output.npy (1024,), or empty_text_embedding.npy (77, 768) and
empty_text_pooler_output.npy (768,); train_ar.py reads them for its condition dropout.

Both token files are ordered per scale as [plane 0 | plane 1 | plane 2], the AR sequence order:
gt_BL has 3·Σpn² ids, x_BLCv one row per token of scales 1.. (3·(Σpn² − pn0²) rows). The image
files are written with --image-encoder, the text files with --text-encoder (a flag alone means
the official model, facebook/dinov2-large or openai/clip-vit-large-patch14). Views whose size
differs from the VQVAE's encoder input are resized as in VQVAE training
(models.inputs.encoder_views).

Resumable: an object keeps the files it already has unless --overwrite, and each file is
written under a temporary name, then renamed. The dataset root records which VQVAE wrote the
tokens (tokenizer.json): another VQVAE is refused unless --overwrite recomputes every object.
The work is done by datasets/precompute.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.precompute import precompute, precompute_occupancy_tokens  # noqa: E402
from models.conditioners import DEFAULT_SOURCES  # noqa: E402
from utils.cli import ArgumentParser, run  # noqa: E402


def main(argv=None):
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--data-dir", required=True, type=Path, help="G-buffer dataset root (with dataset.json)")
    ap.add_argument("--vqvae", type=Path, help="VQVAE checkpoint folder (or .safetensors file)")
    ap.add_argument("--occupancy-vqvae", type=Path,
                    help="instead: an Argus-3D tokenizer; writes occupancy_tokens.npz (field index) per shape of "
                         "--split (train unless given) of an occupancy dataset")
    ap.add_argument("--inputs", type=int, default=30000, help="surface points per shape (--occupancy-vqvae)")
    ap.add_argument("--image-encoder", nargs="?", const=DEFAULT_SOURCES["image"],
                    help="image encoder (DINOv2 folder or hub id, mobilenet_v2, ...: models/conditioners.py); "
                         "writes the image embeddings")
    ap.add_argument("--text-encoder", nargs="?", const=DEFAULT_SOURCES["text"],
                    help="text encoder (CLIP folder or hub id, minilm, ...: models/conditioners.py); "
                         "writes the caption embeddings")
    ap.add_argument("--all-views", action="store_true",
                    help="also the image embeddings of every view, for train.condition_variants")
    ap.add_argument("--views-from", type=Path,
                    help="the image embeddings from the same objects (category/id) in this dataset instead, e.g. "
                         "make_shapes' turned objects for an --upright dataset (--overwrite where they exist)")
    ap.add_argument("--split", choices=("all", "train", "val", "test"), help="default: all (train with "
                    "--occupancy-vqvae)")
    ap.add_argument("--holdout", type=int, default=100, help="objects per category in 'val' (as GBufferDataset)")
    ap.add_argument("--batch-size", type=int, default=8, help="objects per forward pass")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader processes decoding the views")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--overwrite", action="store_true", help="recompute files that exist")
    args = ap.parse_args(argv)
    if args.batch_size < 1 or args.workers < 0:
        raise ValueError("--batch-size must be at least 1 and --workers at least 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if (args.vqvae is None) == (args.occupancy_vqvae is None):
        raise ValueError("pass --vqvae (SAR3D tokens) or --occupancy-vqvae (Argus-3D tokens)")
    if args.occupancy_vqvae is not None:
        print(precompute_occupancy_tokens(args.data_dir, args.occupancy_vqvae, args.split or "train", args.inputs,
                                          args.device, args.overwrite))
        return 0
    if args.split == "test":
        raise ValueError("--split test: the G-buffer datasets have all, train and val")
    print(precompute(args.data_dir, args.vqvae, args.image_encoder, args.text_encoder, args.split or "all",
                     args.holdout, args.batch_size, args.workers, args.device, args.overwrite, args.all_views,
                     args.views_from))
    return 0


if __name__ == "__main__":
    run(main)
