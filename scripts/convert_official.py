#!/usr/bin/env python
"""Convert an official SAR3D checkpoint into ours (model.safetensors + config.json).

    python scripts/convert_official.py --kind vqvae --src checkpoints/vqvae-ckpt.pt --out checkpoints/vqvae
    python scripts/convert_official.py --kind vqvae-flexicubes --src checkpoints/vqvae-flexicubes-ckpt.pt \
        --out checkpoints/vqvae_flexicubes
    python scripts/convert_official.py --kind ar-image --src checkpoints/image-condition-ckpt.pth --out checkpoints/ar_image
    python scripts/convert_official.py --kind ar-text --src checkpoints/text-condition-ckpt.pth --out checkpoints/ar_text

The file is read safely and every tensor checked by models/official.py (nothing in the file is
imported or run); a missing, unexpected or mis-shaped tensor stops the conversion with its name.
sample.py and pipelines.SAR3DPipeline also take the official files directly.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.official import KINDS, load_official  # noqa: E402
from utils.checkpoint import save_model  # noqa: E402
from utils.cli import ArgumentParser, run  # noqa: E402
from utils.config import to_dict  # noqa: E402


def main(argv=None):
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--kind", required=True, choices=sorted(KINDS))
    ap.add_argument("--src", required=True, type=Path, help="the official checkpoint file")
    ap.add_argument("--out", required=True, type=Path, help="output folder")
    ap.add_argument("--config", type=Path, help="model config (default: the paper configuration)")
    args = ap.parse_args(argv)
    model, cfg = load_official(args.kind, args.src, args.config)
    path = save_model(args.out, model.state_dict(), to_dict(cfg), kind=KINDS[args.kind][1])
    print(f"converted {len(model.state_dict())} tensors from {args.src} into {path}")
    return 0


if __name__ == "__main__":
    run(main)
