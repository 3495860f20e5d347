#!/usr/bin/env python
"""Gather the LPIPS (VGG16) weights into one safetensors file for losses/perceptual.py.

    python scripts/make_lpips_weights.py --vgg vgg16-397923af.pth --lin vgg.pth \
        --out checkpoints/lpips_vgg.safetensors

--vgg: torchvision's ImageNet VGG16 state dict (download.pytorch.org/models/vgg16-397923af.pth);
--lin: the LPIPS linear heads, `lpips/weights/v0.1/vgg.pth` inside the `lpips` wheel on PyPI
(`pip download lpips --no-deps` and unzip it). Both are read with weights_only=True.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safetensors.torch import save_file  # noqa: E402

from losses.perceptual import LPIPS  # noqa: E402
from utils.checkpoint import CheckpointError, read_official_state  # noqa: E402
from utils.cli import ArgumentParser, run  # noqa: E402


def gather(vgg: dict, lin: dict) -> dict:
    """torchvision `features.{i}.*` -> `vgg.{i}.*`, LPIPS `lin{k}.model.1.weight` -> `lins.{k}.weight`."""
    ours = LPIPS().state_dict()
    out = {f"vgg.{k[len('features.'):]}": v for k, v in vgg.items() if k.startswith("features.")}
    out.update({f"lins.{k[3]}.weight": v for k, v in lin.items() if k.startswith("lin") and k.endswith(".weight")})
    missing = [k for k in ours if k not in out]
    wrong = [k for k in ours if k in out and tuple(out[k].shape) != tuple(ours[k].shape)]
    if missing or wrong:
        raise CheckpointError(f"not the VGG16 / LPIPS files: missing {missing[:4]}, mis-shaped {wrong[:4]}")
    return {k: out[k].float().contiguous() for k in ours}


def main(argv=None):
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--vgg", required=True, type=Path)
    ap.add_argument("--lin", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    state = gather(read_official_state(args.vgg), read_official_state(args.lin))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out))
    print(f"wrote {len(state)} tensors to {args.out}")
    return 0


if __name__ == "__main__":
    run(main)
