"""The official SAR3D and Argus-3D checkpoints, read safely and loaded into our models.

    model, cfg = load_official("ar-text", "checkpoints/text-condition-ckpt.pth")
    model, cfg = load_official("vqvae", "checkpoints/vqvae-ckpt.pt")
    tokenizer, _ = load_official("argus-stage2", "model_stage2.pt")    # the stage-2 file's two halves
    generator, _ = load_official("argus-gpt", "model_stage2.pt")

The file is read with torch.load(weights_only=True), memory-mapped (a 14.7 GB stage-2 file
converts on a machine with less memory than that); the AR files also hold their training
arguments, which a restricted unpickler turns into inert placeholders (utils.checkpoint.read_official):
nothing in them is imported or run. Every tensor is mapped to our name and checked against a
model of the paper configuration built on the meta device (no memory, no initialisation), then
assigned strictly: a missing, unexpected or mis-shaped tensor is one CheckpointError naming the
file and the tensor.
"""
from __future__ import annotations

from pathlib import Path

import torch

from models import ar, occupancy_vqvae, raster_ar, vqvae
from utils.checkpoint import CheckpointError, ConversionError, read_official_state
from utils.config import ConfigError, from_dict, load_config, read_yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# kind -> (default config, model family)
KINDS = {"vqvae": (CONFIGS / "vqvae" / "paper.yaml", "vqvae"),
         "vqvae-flexicubes": (CONFIGS / "vqvae" / "paper_flexicubes.yaml", "vqvae"),
         "ar-image": (CONFIGS / "ar" / "paper_image.yaml", "ar"),
         "ar-text": (CONFIGS / "ar" / "paper_text.yaml", "ar"),
         # Argus-3D: model_stage1.pt ({'model': tokenizer}), and model_stage2.pt, whose 'model' holds
         # the tokenizer under vqvae_model. beside the transformer (converted by the generator)
         "argus-stage1": (CONFIGS / "argus" / "paper.yaml", "occupancy_vqvae"),
         "argus-stage2": (CONFIGS / "argus" / "paper.yaml", "occupancy_vqvae"),
         "argus-gpt": (CONFIGS / "argus" / "gpt_paper.yaml", "raster_ar")}
# The official file names in checkpoints/, by kind.
FILE_NAMES = {"vqvae": "vqvae-ckpt.pt", "vqvae-flexicubes": "vqvae-flexicubes-ckpt.pt",
              "ar-text": "text-condition-ckpt.pth", "ar-image": "image-condition-ckpt.pth"}


def _config(kind: str, cfg_path: Path):
    """The model config of `kind` from a YAML file, checked to be of that kind."""
    if kind not in KINDS:
        raise ValueError(f"unknown official checkpoint kind {kind!r}; one of {', '.join(KINDS)}")
    if KINDS[kind][1] == "ar":
        cfg = load_config(ar.ARConfig, cfg_path)
        want = kind.split("-")[1]
        if cfg.condition != want:
            raise ConfigError(f"{kind} needs a config with condition: {want}, got {cfg.condition}")
        return cfg
    if KINDS[kind][1] in ("occupancy_vqvae", "raster_ar"):
        model_part = {k: v for k, v in read_yaml(cfg_path).items() if k not in ("kind", "train")}
        cls = occupancy_vqvae.OccupancyVQVAEConfig if KINDS[kind][1] == "occupancy_vqvae" else raster_ar.RasterARConfig
        return from_dict(cls, model_part, str(cfg_path))
    cfg = load_config(vqvae.VQVAEConfig, cfg_path)
    wanted = "flexicubes" if kind == "vqvae-flexicubes" else "nerf"
    if cfg.renderer_kind != wanted:
        raise ConfigError(f"{kind} needs a config with renderer_kind: {wanted}, got {cfg.renderer_kind}")
    return cfg


def load_official(kind: str, src, config=None):
    """The official checkpoint `src` of `kind` (KINDS) converted and strictly loaded: (model on
    the CPU, in eval mode, its config). The config is `config` (a YAML file) or the paper's; a
    generator takes its sizes from the file's own tensors (models.ar.sizes_from_official)."""
    src = Path(src)
    cfg = _config(kind, Path(config) if config else KINDS[kind][0])
    if KINDS[kind][1] == "ar":
        state = read_official_state(src, ("trainer", "var_wo_ddp"),
                                    "the generator under trainer/var_wo_ddp (as in image-condition-ckpt.pth)")
        build, convert = ar.NextScaleAR, ar.convert_official
        try:
            cfg = cfg if config else ar.sizes_from_official(state, cfg)
        except ConversionError as e:
            raise CheckpointError(f"{src}: {e}") from None
    elif kind == "argus-stage1":
        state = read_official_state(src, ("model",), "the tokenizer under 'model' (as in model_stage1.pt)")
        build, convert = occupancy_vqvae.OccupancyVQVAE, occupancy_vqvae.convert_official
    elif kind in ("argus-stage2", "argus-gpt"):
        full = read_official_state(src, ("model",), "the model under 'model' (as in model_stage2.pt)")
        prefix = "vqvae_model." if kind == "argus-stage2" else "transformer_model."
        state = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
        if not state:
            half = "tokenizer" if kind == "argus-stage2" else "generator"
            raise CheckpointError(f"{src}: no {prefix} tensors under 'model' (the {half} of an Argus-3D stage-2 "
                                  "file model_stage2.pt)")
        if kind == "argus-stage2":
            build, convert = occupancy_vqvae.OccupancyVQVAE, occupancy_vqvae.convert_official
        else:
            build, convert = raster_ar.RasterAR, raster_ar.convert_official
            try:
                cfg = cfg if config else raster_ar.sizes_from_official(state, cfg)
            except ConversionError as e:
                raise CheckpointError(f"{src}: {e}") from None
    else:
        state = read_official_state(src, what="a state dict of tensors (such as the official vqvae-ckpt.pt)")
        build, convert = vqvae.TriplaneVQVAE, vqvae.convert_official
    with torch.device("meta"):                  # shapes only; the tensors come from the file
        model = build(cfg)
    try:
        ours = convert(state, model)
    except ConversionError as e:
        raise CheckpointError(f"{src}: {e}") from None
    model.load_state_dict(ours, strict=True, assign=True)
    if isinstance(model, ar.NextScaleAR):
        model.build_index_buffers()
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{src}: {len(left)} tensors of the {kind} model were not filled ({left[0]}, ...)")
    return model.eval(), cfg
