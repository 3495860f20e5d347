#!/usr/bin/env python
"""Convert an official SAR3D checkpoint into ours (model.safetensors + config.json).

    python scripts/convert_official.py --kind vqvae --src checkpoints/vqvae-ckpt.pt --out checkpoints/vqvae
    python scripts/convert_official.py --kind vqvae-flexicubes --src checkpoints/vqvae-flexicubes-ckpt.pt \
        --out checkpoints/vqvae-flexicubes

The file is read with torch.load(weights_only=True): nothing in it is unpickled beyond
tensors. Every tensor is mapped to our name and checked; the model is then loaded strictly, so
a missing, unexpected or mis-shaped tensor stops the conversion with its name.
"""
from __future__ import annotations

import argparse
import pickle
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from models.vqvae import ConversionError, TriplaneVQVAE, VQVAEConfig, convert_official  # noqa: E402
from utils.checkpoint import CheckpointError, save_model  # noqa: E402
from utils.cli import run  # noqa: E402
from utils.config import ConfigError, load_config, to_dict  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KINDS = {"vqvae": ROOT / "configs" / "vqvae" / "paper.yaml",
         "vqvae-flexicubes": ROOT / "configs" / "vqvae" / "paper_flexicubes.yaml"}


def read_official(path: Path) -> dict:
    """The official file's tensors, read without unpickling anything else."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: put the file there or pass its path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint, or truncated ({first})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors (such as the official vqvae-ckpt.pt)")
    return state


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", required=True, choices=sorted(KINDS))
    ap.add_argument("--src", required=True, type=Path, help="the official checkpoint file")
    ap.add_argument("--out", required=True, type=Path, help="output folder")
    ap.add_argument("--config", type=Path, help="model config (default: the paper configuration)")
    args = ap.parse_args(argv)
    cfg = load_config(VQVAEConfig, args.config or KINDS[args.kind])
    wanted = "flexicubes" if args.kind == "vqvae-flexicubes" else "nerf"
    if cfg.renderer_kind != wanted:
        raise ConfigError(f"--kind {args.kind} needs a config with renderer_kind: {wanted}, "
                          f"got {cfg.renderer_kind}")
    state = read_official(args.src)
    with torch.device("meta"):                  # shapes only; the tensors come from the file
        model = TriplaneVQVAE(cfg)
    try:
        ours = convert_official(state, model)
    except ConversionError as e:
        raise CheckpointError(f"{args.src}: {e}") from None
    model.load_state_dict(ours, strict=True, assign=True)
    path = save_model(args.out, model.state_dict(), to_dict(cfg), kind="vqvae")   # renderer_kind tells them apart
    print(f"converted {len(ours)} tensors from {args.src} into {path}")
    return 0


if __name__ == "__main__":
    run(main)
