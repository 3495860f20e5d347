#!/usr/bin/env python
"""Convert an official SAR3D checkpoint into ours (model.safetensors + config.json).

    python scripts/convert_official.py --kind vqvae --src checkpoints/vqvae-ckpt.pt --out checkpoints/vqvae
    python scripts/convert_official.py --kind vqvae-flexicubes --src checkpoints/vqvae-flexicubes-ckpt.pt \
        --out checkpoints/vqvae-flexicubes
    python scripts/convert_official.py --kind ar-image --src checkpoints/image-condition-ckpt.pth --out checkpoints/ar-image
    python scripts/convert_official.py --kind ar-text --src checkpoints/text-condition-ckpt.pth --out checkpoints/ar-text

The file is read with torch.load(weights_only=True); the AR files also hold their training
arguments, which a restricted unpickler turns into inert placeholders (utils.checkpoint.read_official):
nothing in them is imported or run. Every tensor is mapped to our name and checked; the model is
then loaded strictly, so a missing, unexpected or mis-shaped tensor stops the conversion with its name.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from models import ar, vqvae  # noqa: E402
from utils.checkpoint import CheckpointError, ConversionError, read_official_state, save_model  # noqa: E402
from utils.cli import run  # noqa: E402
from utils.config import ConfigError, load_config, to_dict  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# kind -> (default config, model family)
KINDS = {"vqvae": (ROOT / "configs" / "vqvae" / "paper.yaml", "vqvae"),
         "vqvae-flexicubes": (ROOT / "configs" / "vqvae" / "paper_flexicubes.yaml", "vqvae"),
         "ar-image": (ROOT / "configs" / "ar" / "paper_image.yaml", "ar"),
         "ar-text": (ROOT / "configs" / "ar" / "paper_text.yaml", "ar")}


def build(kind: str, cfg_path: Path):
    """-> (model on the meta device, its config, the converter) for a kind."""
    family = KINDS[kind][1]
    if family == "ar":
        cfg = load_config(ar.ARConfig, cfg_path)
        want = kind.split("-")[1]
        if cfg.condition != want:
            raise ConfigError(f"--kind {kind} needs a config with condition: {want}, got {cfg.condition}")
        with torch.device("meta"):                  # shapes only; the tensors come from the file
            return ar.NextScaleAR(cfg), cfg, ar.convert_official
    cfg = load_config(vqvae.VQVAEConfig, cfg_path)
    wanted = "flexicubes" if kind == "vqvae-flexicubes" else "nerf"
    if cfg.renderer_kind != wanted:
        raise ConfigError(f"--kind {kind} needs a config with renderer_kind: {wanted}, got {cfg.renderer_kind}")
    with torch.device("meta"):
        return vqvae.TriplaneVQVAE(cfg), cfg, vqvae.convert_official


def load_official(kind: str, src: Path, config: Path | None = None):
    """The official checkpoint `src` of `kind` converted and strictly loaded: (model on the CPU,
    in eval mode, its config). Raises CheckpointError naming the file and the tensor at fault."""
    model, cfg, convert = build(kind, config or KINDS[kind][0])
    if KINDS[kind][1] == "ar":
        state = read_official_state(src, ("trainer", "var_wo_ddp"),
                                    "the generator under trainer/var_wo_ddp (as in image-condition-ckpt.pth)")
    else:
        state = read_official_state(src, what="a state dict of tensors (such as the official vqvae-ckpt.pt)")
    try:
        ours = convert(state, model)
    except ConversionError as e:
        raise CheckpointError(f"{src}: {e}") from None
    model.load_state_dict(ours, strict=True, assign=True)
    return model.eval(), cfg


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
