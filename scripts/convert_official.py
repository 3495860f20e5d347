#!/usr/bin/env python
"""Convert an official SAR3D or Argus-3D checkpoint into ours (model.safetensors + config.json).

    python scripts/convert_official.py --kind vqvae --src checkpoints/vqvae-ckpt.pt --out checkpoints/vqvae
    python scripts/convert_official.py --kind vqvae-flexicubes --src checkpoints/vqvae-flexicubes-ckpt.pt \
        --out checkpoints/vqvae_flexicubes
    python scripts/convert_official.py --kind ar-image --src checkpoints/image-condition-ckpt.pth --out checkpoints/ar_image
    python scripts/convert_official.py --kind ar-text --src checkpoints/text-condition-ckpt.pth --out checkpoints/ar_text
    python scripts/convert_official.py --kind argus-stage1 --src model_stage1.pt --out checkpoints/argus_tokenizer
    # both halves of the released stage-2 file: OUT/tokenizer and OUT/generator (14.7 GB of float32,
    # read memory-mapped, written in shards; --dtype bf16 halves it)
    python scripts/convert_official.py --kind argus-stage2 --src model_stage2.pt --out checkpoints/argus [--dtype bf16]

The file is read safely and every tensor checked by models/official.py (nothing in the file is
imported or run); a missing, unexpected or mis-shaped tensor stops the conversion with its name.
sample.py and pipelines.SAR3DPipeline also take the official files directly.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from models.official import KINDS, load_official  # noqa: E402
from utils.checkpoint import save_model  # noqa: E402
from utils.cli import ArgumentParser, run  # noqa: E402
from utils.config import to_dict  # noqa: E402


def main(argv=None):
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--kind", required=True, choices=sorted(k for k in KINDS if k != "argus-gpt"))
    ap.add_argument("--src", required=True, type=Path, help="the official checkpoint file")
    ap.add_argument("--out", required=True, type=Path, help="output folder")
    ap.add_argument("--config", type=Path, help="model config (default: the paper configuration; for "
                    "argus-stage2 the tokenizer's)")
    ap.add_argument("--dtype", choices=("float32", "bf16"), default="float32",
                    help="store floating-point tensors in this type (bf16: half the size)")
    ap.add_argument("--shard-gb", type=float, default=2.0, help="largest file of a model written in shards")
    args = ap.parse_args(argv)
    parts = [(args.kind, args.out, args.config)]
    if args.kind == "argus-stage2":
        parts = [("argus-stage2", args.out / "tokenizer", args.config), ("argus-gpt", args.out / "generator", None)]
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    for kind, out, config in parts:
        model, cfg = load_official(kind, args.src, config)
        state = model.state_dict()
        path = save_model(out, state, to_dict(cfg), kind=KINDS[kind][1], shard_bytes=int(args.shard_gb * 2 ** 30),
                          dtype=dtype)
        print(f"converted {len(state)} tensors from {args.src} into {path}")
        del model, state
    return 0


if __name__ == "__main__":
    run(main)
