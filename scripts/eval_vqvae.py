#!/usr/bin/env python
"""Reconstruction quality of a trained VQVAE on held-out G-buffer objects.

    python scripts/eval_vqvae.py --ckpt checkpoints/vqvae --data-dir data/shapes --resolution 64

For each object and each of its two encoder view sets (views 0-5 and 6-11, thinned to the
model's num_views), the views are resized to the encoder's input size as in training
(models.inputs.encoder_views), encoded, quantised and decoded to a triplane, which is
rendered deterministically from all 12 cameras at --resolution and compared with the dataset's
targets at that resolution (GBufferDataset(resolution=...)): PSNR and SSIM of the RGB on white,
IoU of the masks (rendered opacity > 0.5 vs GT alpha > 0.5), the mean absolute depth error, and
the colour error: the distance in RGB ([0, 1]) between the mean colours of render and GT over
the pixels both cover (whether an object keeps its colour, whatever its shape).

Depth. The renderer's depth is sum(w * t), the ray distance weighted by the compositing
weights and not divided by the opacity; it is divided by the opacity where that exceeds 0.5,
then turned into camera z (t times the cosine between the ray and the optical axis), which is
what the dataset stores. Pixels whose sum the renderer clamped up to the nearest sample depth
of the batch (as the official renderer does; it hits partly transparent pixels) carry no depth
and are left out. The GT depth is resized like the targets, then divided by the resized
foreground coverage so that silhouette pixels are not averaged with the background's 0. The
error is taken over GT-foreground pixels that the reconstruction also covers (misses count in
the IoU instead); in world units. Each object's metrics are means over its 24 renders, the
overall ones means over objects.

Writes a JSON (default <ckpt>/eval/metrics_<split>.json) with per-object and mean metrics,
where a non-finite value (PSNR of a perfect render, depth of an empty mask) is written as null,
and a PNG grid (default beside it): one row per object (the first 8), GT / reconstruction pairs
for views 0, 3, 6 and 9 as seen from the first view set. A perceptual (LPIPS) score is not
computed: no perceptual network is available offline, so the key is absent.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from datasets.gbuffer import GBufferDataset  # noqa: E402
from evaluation.image import colour_error, depth_error, mask_iou, psnr, ssim  # noqa: E402
from models.inputs import encoder_views, input_view_sets  # noqa: E402
from models.vqvae import TriplaneVQVAE, load_vqvae  # noqa: E402
from renderers.nerf import camera_rays  # noqa: E402
from utils.cameras import unpack_cameras  # noqa: E402
from utils.cli import ArgumentParser, run  # noqa: E402

METRICS = ("psnr", "ssim", "mask_iou", "depth_error", "colour_error")
GRID_OBJECTS = 8
GRID_VIEWS = (0, 3, 6, 9)
EVAL_CHUNK_RAYS = 1024        # rays per camera at once when the config sets none: bounds memory


def gt_depth_at(sample: dict, res: int) -> torch.Tensor:
    """GT camera-z depth (12, res, res): the dataset's target_depth over the foreground coverage
    resized the same way (bilinear); 0 where no foreground reaches the pixel."""
    fg = (sample["depth"][:, None] > 0).float()
    cover = F.interpolate(fg, size=(res, res), mode="bilinear", align_corners=False)[:, 0]
    return torch.where(cover > 0, sample["target_depth"] / cover.clamp_min(1e-6), 0.0)


def render_camera_z(out: dict, c: torch.Tensor, res: int):
    """Rendered depth as camera z (V, res, res) and where it is valid (V, res, res) bool, from a
    renderer output dict (see the module docstring)."""
    depth_sum, opacity = out["image_depth"][:, 0], out["weights_samples"][:, 0]
    _, dirs = camera_rays(c, res)                                   # (V, res*res, 3) unit
    c2w = unpack_cameras(c.float())[0]
    cos = (dirs * c2w[:, None, :3, 2]).sum(-1).reshape(-1, res, res)
    valid = (opacity > 0.5) & (depth_sum > depth_sum.min())        # the minimum is the clamp value
    return torch.where(valid, depth_sum / opacity.clamp_min(0.5) * cos, 0.0), valid


def score_views(pred_rgb, pred_opacity, pred_depth, pred_valid, gt_rgb, gt_alpha, gt_depth) -> dict:
    """Per-view metrics, each (V,): rgb (V, 3, H, W) in [0, 1], opacity/alpha (V, H, W), depths
    (V, H, W) camera z, pred_valid (V, H, W) bool where the rendered depth means something."""
    gt_fg = gt_alpha > 0.5
    return {"psnr": psnr(pred_rgb, gt_rgb), "ssim": ssim(pred_rgb, gt_rgb),
            "mask_iou": mask_iou(pred_opacity > 0.5, gt_fg),
            "depth_error": depth_error(pred_depth, gt_depth, gt_fg & pred_valid & (gt_depth > 0)),
            "colour_error": colour_error(pred_rgb, gt_rgb, gt_fg & (pred_opacity > 0.5))}


@torch.no_grad()
def evaluate_object(model: TriplaneVQVAE, sample: dict, res: int, device) -> tuple[dict, tuple]:
    """Both view sets of one object -> (metrics averaged over its 2 x 12 renders, NaN depth
    errors left out; (GT targets, renders from the first view set), each (12, 3, res, res) in
    [0, 1], for the grid)."""
    cfg = model.cfg
    size = cfg.input_size
    c = sample["c"].to(device)
    gt_rgb, gt_alpha = sample["target_rgb"].to(device), sample["target_alpha"].to(device)
    gt_depth = gt_depth_at(sample, res).to(device)
    scores, renders = [], []
    for views in input_view_sets(cfg.encoder.num_views, c.shape[0]):
        # Resized to the encoder's input size exactly as in training.
        x = encoder_views(sample["rgb"][None], sample["depth"][None], sample["c"][None], views, size)
        triplane, _, _ = model(x.to(device))
        out = model.render(triplane, c, resolution=res, deterministic=True)
        renders.append(((out["image_raw"] + 1) / 2).clamp(0, 1))
        depth, valid = render_camera_z(out, c, res)
        scores.append(score_views(renders[-1], out["weights_samples"][:, 0], depth, valid,
                                  gt_rgb, gt_alpha, gt_depth))
    per_object = {k: _nanmean(torch.cat([s[k] for s in scores])) for k in METRICS}
    return per_object, (gt_rgb.cpu(), renders[0].cpu())


def _nanmean(values) -> float:
    """Mean of the finite-or-infinite values, ignoring NaN (nothing to judge); NaN if none."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    v = v[~torch.isnan(v)]
    return float(v.mean()) if len(v) else math.nan


def save_grid(path, pairs: list) -> Path:
    """PNG, one row per object: GT | reconstruction for each view of GRID_VIEWS.
    pairs: [(gt (12, 3, H, W), recon (12, 3, H, W)) in [0, 1]] per object."""
    rows = [torch.cat([torch.cat([gt[v], rec[v]], -1) for v in GRID_VIEWS if v < gt.shape[0]], -1)
            for gt, rec in pairs]
    img = torch.cat(rows, -2).permute(1, 2, 0).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(img * 255).astype(np.uint8)).save(path)
    return path


def _json_value(x: float):
    return x if math.isfinite(x) else None


def main(argv=None):
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--ckpt", type=Path, required=True,
                    help="VQVAE checkpoint folder (model.safetensors + config.json)")
    ap.add_argument("--data-dir", type=Path, required=True, help="G-buffer dataset root (dataset.json)")
    ap.add_argument("--split", choices=("val", "all"), default="val", help="objects to score (default val)")
    ap.add_argument("--holdout", type=int, default=100, help="objects per category in val (default 100)")
    ap.add_argument("--num", type=int, help="score only the first N objects")
    ap.add_argument("--resolution", type=int, default=64, help="render and compare at this size (default 64)")
    ap.add_argument("--out", type=Path, help="metrics JSON (default <ckpt>/eval/metrics_<split>.json)")
    ap.add_argument("--grid", type=Path, help="PNG grid (default beside the JSON)")
    ap.add_argument("--device", default="cpu", help="torch device (default cpu)")
    args = ap.parse_args(argv)
    if args.num is not None and args.num < 1:
        raise ValueError(f"--num must be at least 1, got {args.num}")
    if args.resolution < 11:
        raise ValueError(f"--resolution must be at least 11 (the SSIM window), got {args.resolution}")
    if args.holdout < 0:
        raise ValueError(f"--holdout must be non-negative, got {args.holdout}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available")
    ckpt_dir = args.ckpt if args.ckpt.is_dir() else args.ckpt.parent
    out = args.out or ckpt_dir / "eval" / f"metrics_{args.split}.json"
    grid = args.grid or out.with_name(out.stem + "_grid.png")

    model = load_vqvae(args.ckpt, device)
    if model.cfg.renderer_kind == "nerf" and model.renderer.cfg.chunk_rays is None:
        model.renderer.cfg = dataclasses.replace(model.renderer.cfg, chunk_rays=EVAL_CHUNK_RAYS)
    data = GBufferDataset(args.data_dir, split=args.split, holdout=args.holdout, resolution=args.resolution)
    n = len(data) if args.num is None else min(args.num, len(data))

    objects, pairs = [], []
    for i in tqdm(range(n), desc="evaluating", unit="object"):
        sample = data[i]
        metrics, pair = evaluate_object(model, sample, args.resolution, device)
        objects.append({"path": str(Path(sample["path"]).relative_to(args.data_dir)), **metrics})
        if len(pairs) < GRID_OBJECTS:
            pairs.append(pair)
    mean = {k: _nanmean([o[k] for o in objects]) for k in METRICS}

    report = {"checkpoint": str(args.ckpt), "data_dir": str(args.data_dir), "split": args.split,
              "holdout": args.holdout, "resolution": args.resolution, "num_objects": n,
              "mean": {k: _json_value(v) for k, v in mean.items()},
              "objects": [{k: _json_value(v) if k in METRICS else v for k, v in o.items()} for o in objects]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    save_grid(grid, pairs)
    print(f"{n} objects ({args.split}, {args.resolution}px) | PSNR {mean['psnr']:.2f} dB | SSIM {mean['ssim']:.4f} | "
          f"mask IoU {mean['mask_iou']:.4f} | depth error {mean['depth_error']:.4f} | "
          f"colour error {mean['colour_error']:.4f} | {out} | {grid}")
    return 0


if __name__ == "__main__":
    run(main)
