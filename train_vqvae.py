#!/usr/bin/env python
"""Train the multi-scale triplane VQVAE (stage 1) on a G-buffer dataset.

    # one process (CPU or one GPU)
    python train_vqvae.py --config configs/vqvae/small.yaml --data-dir data/shapes --out-dir runs/vqvae_small
    # several processes on one node (gloo on CPU, NCCL on GPUs); the original's script does this
    torchrun --standalone --nproc_per_node 4 train_vqvae.py --config configs/vqvae/paper.yaml ...
    bash train_vqvae.sh DATA_DIR NUM_GPUS BATCH_SIZE OUT_DIR

The config is a model config (configs/vqvae/*.yaml) with an optional `train:` section (TrainConfig
below: the official recipe of spec §2.7 and §4 by default). Every step encodes each object twice,
from each of its two view sets (datasets.gbuffer.input_view_sets), and supervises the renders of
its views: L1 and LPIPS on RGB, opacity L1 against the mask, scale-and-shift-invariant depth, the VQ loss,
and a PatchGAN hinge term; with train.occupancy_weight, also the density at the dataset's
occupancy points. train.init_from starts from a trained VQVAE, and train.freeze keeps modules as
they are (its encoder, quant_conv and quantizer: every token id stays as it was). `--out-dir`
always holds the latest raw weights (model.safetensors + config.json, what every other tool
reads), the EMA weights in ema/, and train_state/ for an exact
`--resume` (model, EMA, discriminator, optimizers, step, RNG; the data order and all random
choices are functions of (seed, step, sample), so resuming, or changing the number of processes,
continues the same run). TensorBoard logs go to OUT/tb, the losses of every step to OUT/train_log.jsonl and the
held-out PSNR curve to OUT/metrics.jsonl.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from datasets.gbuffer import GBufferDataset, encoder_views, input_view_sets  # noqa: E402
from losses.depth import scale_shift_invariant_loss  # noqa: E402
from losses.gan import PatchDiscriminator, hinge_d_loss, hinge_g_loss  # noqa: E402
from losses.perceptual import load_lpips, lpips_distance  # noqa: E402
from models.vqvae import TriplaneVQVAE, VQVAEConfig, load_vqvae  # noqa: E402
from renderers.nerf_mesh import OFFICIAL_SIGMA  # noqa: E402
from trainers import distributed  # noqa: E402
from trainers.cli import add_run_args, load_run_config, model_config  # noqa: E402
from trainers.runlog import RunLog  # noqa: E402
from trainers.sampler import IndexedDataset, StepBatches, seeded_generator  # noqa: E402
from trainers.schedule import lr_factor  # noqa: E402
from trainers.state import EMA, load_train_state, save_train_state  # noqa: E402
from utils.cameras import crop_cameras  # noqa: E402
from utils.checkpoint import save_model  # noqa: E402
from utils.cli import run  # noqa: E402
from utils.config import to_dict  # noqa: E402
from utils.metrics import psnr  # noqa: E402

log = logging.getLogger("train_vqvae")


@dataclass
class TrainConfig:
    """Defaults: the official recipe where it applies (spec §2.7, §4)."""
    batch_size: int = 8              # objects per optimizer step over all processes
    view_sets_per_object: int = 2    # samples per object: both encoder view sets (official), or 1, a
                                     # random one: twice the objects for the same work per step
    grad_accum: int = 1              # micro-batches per step and process
    max_steps: int = 100_000
    seed: int = 0
    holdout: int = 5                 # last objects of each category kept out of training, for evaluation
    # optimiser groups (peak lr, weight decay); the official rate is constant (warmup 0, hold 1)
    lr_encoder: float = 1e-4
    wd_encoder: float = 0.001
    lr_dit: float = 8e-5
    wd_dit: float = 0.001
    lr_rest: float = 1e-4            # quantizer, convs around it, conv upsampler, point decoder
    wd_rest: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup: float = 0.0              # trainers.schedule.lr_factor: share of max_steps warming up,
    hold: float = 1.0                # share of the rest held at the peak, then linear decay
    final_lr: float = 1.0            # ... to this multiple of each group's lr
    grad_clip: float = 1.0
    # supervision
    render_resolution: int = 64      # targets are resized to this; renders cover all of it or a patch
    patch_size: int | None = None    # official: 130 of 256; None renders the whole image
    patch_in_bbox: float = 0.875     # share of patches centred (of random rays) inside the foreground box
    rays_per_view: int | None = None  # random pixels per target view instead of patches (NeRF only,
                                     # no LPIPS or GAN): every view of a sample supervised at once
    views_per_sample: int = 12       # target views rendered per sample (random subset when < 12)
    l1_weight: float = 1.0
    perceptual_weight: float = 0.8   # LPIPS-VGG, from `perceptual_start` on; off when its weights are absent
    perceptual_start: int = 100
    lpips_weights: str | None = "checkpoints/lpips_vgg.safetensors"   # scripts/make_lpips_weights.py
    depth_weight: float = 0.5
    depth_max: float = 0.2           # the depth term is dropped for a sample when it exceeds this
    alpha_weight: float = 1.0
    vq_weight: float = 1.0
    # occupancy term (datasets whose object folders also hold points.npz and pointcloud.npz in the
    # views' frame, as scripts/make_shapes.py and render_meshes.py write them): binary cross-entropy
    # of (sigma - occupancy_sigma) / occupancy_temperature against inside/outside, which puts the
    # exported mesh's surface (renderers.nerf_mesh, level OFFICIAL_SIGMA) where the object's is
    occupancy_weight: float = 0.0
    occupancy_points: int = 2048     # per sample, from points.npz (uniform in the padded cube)
    surface_points: int = 2048       # per sample, surface points moved along their normal by U(-d, d),
    surface_offset: float = 0.02     # d (world units): inside when moved inwards
    occupancy_sigma: float = OFFICIAL_SIGMA
    occupancy_temperature: float = 1.0
    # fine-tuning
    init_from: str | None = None     # start from this VQVAE checkpoint folder (model.safetensors + config.json)
    freeze: tuple[str, ...] = ()     # top-level modules left as they are (no gradient, not optimised):
                                     # [encoder, quant_conv, quantizer] keeps every token id, so a decoder
                                     # fine-tuned that way still serves generators trained on the old tokens
    # adversarial term
    gan_g_weight: float = 0.025 * 0.025
    gan_d_weight: float = 0.025
    gan_start: int = 0
    disc_lr: float = 8e-5
    disc_betas: tuple[float, float] = (0.0, 0.999)
    disc_layers: int = 3
    disc_channels: int = 64
    disc_norm: str = "group"         # see losses.gan.PatchDiscriminator
    # bookkeeping
    ema_decay: float = 0.9999
    amp: str = "auto"                # auto: bf16 autocast on CUDA, float32 on CPU; or none / bf16
    num_workers: int = 2
    cache_objects: bool = False      # keep decoded training objects in memory (GBufferDataset(cache=True))
    log_every: int = 10
    eval_every: int = 500
    eval_objects: int = 8
    save_every: int = 500


@dataclass
class VQVAERunConfig(VQVAEConfig):
    train: TrainConfig = field(default_factory=TrainConfig)


OCCUPANCY_KEYS = ("occ_points", "occ_labels", "surface_points", "surface_normals")


def collate(samples: list) -> dict:
    keys = ("rgb", "depth", "c", "target_rgb", "target_depth", "target_alpha")
    lists = {k: [s[k] for s in samples] for k in OCCUPANCY_KEYS if k in samples[0]}   # lengths may differ
    return {**{k: torch.stack([s[k] for s in samples]) for k in keys}, **lists,
            "pos": torch.tensor([s["pos"] for s in samples])}


# ----------------------------------------------------------------------------- one step

def sample_view_sets(cfg: TrainConfig, step: int, pos: int) -> list[int]:
    """The encoder view sets (datasets.gbuffer.input_view_sets) that the object at batch
    position `pos` of `step` is encoded from: both, or one drawn from (seed, step, pos)."""
    if cfg.view_sets_per_object == 2:
        return [0, 1]
    return [int(torch.randint(2, (1,), generator=seeded_generator(cfg.seed, step, pos, 2)))]


def choose_views(cfg: TrainConfig, g: torch.Generator, alpha_VHW: torch.Tensor, c_V25: torch.Tensor):
    """The target views of one sample and what of them is rendered. Returns (view ids (V,),
    cameras (V, 25), region): region None for whole views, a pair of patch offsets y0, x0 (V,)
    (the cameras are then those of the patches), or random pixel indices (V, rays_per_view)."""
    n = alpha_VHW.shape[0]
    views = torch.randperm(n, generator=g)[:cfg.views_per_sample].sort().values if cfg.views_per_sample < n \
        else torch.arange(n)
    res, p = cfg.render_resolution, cfg.patch_size
    if cfg.rays_per_view:
        return views, c_V25[views], random_pixels(cfg, g, alpha_VHW[views])
    if p is None or p >= res:
        return views, c_V25[views], None
    y0, x0 = torch.randint(0, res - p + 1, (2, len(views)), generator=g)
    in_box = torch.rand(len(views), generator=g) < cfg.patch_in_bbox
    u = torch.rand(2, len(views), generator=g)
    for j, v in enumerate(views.tolist()):
        box = foreground_box(alpha_VHW[v])
        if in_box[j] and box is not None:      # a centre inside the foreground box, patch clamped to the image
            (ya, yb), (xa, xb) = box
            cy = ya + u[0, j] * (yb - ya)
            cx = xa + u[1, j] * (xb - xa)
            y0[j] = (cy - p // 2).round().clamp(0, res - p).long()
            x0[j] = (cx - p // 2).round().clamp(0, res - p).long()
    return views, crop_cameras(c_V25[views], x0, y0, p, res), (y0, x0)


def foreground_box(alpha_HW: torch.Tensor):
    """((first row, last row), (first column, last column)) of the pixels with alpha > 0.5, or None."""
    ys, xs = torch.nonzero(alpha_HW > 0.5, as_tuple=True)
    return ((int(ys.min()), int(ys.max())), (int(xs.min()), int(xs.max()))) if len(ys) else None


def random_pixels(cfg: TrainConfig, g: torch.Generator, alpha_VHW: torch.Tensor, margin: int = 2) -> torch.Tensor:
    """(V, rays_per_view) sorted row-major pixel indices per view: a `patch_in_bbox` share drawn
    uniformly inside the foreground box grown by `margin` pixels, the rest over the whole view."""
    V, H, W = alpha_VHW.shape
    n_in = round(cfg.rays_per_view * cfg.patch_in_bbox)
    u = torch.rand(V, cfg.rays_per_view, 2, generator=g)
    y, x = u[..., 0] * H, u[..., 1] * W
    for v in range(V):
        box = foreground_box(alpha_VHW[v])
        if box is not None:
            (ya, yb), (xa, xb) = box
            y0, y1 = max(ya - margin, 0), min(yb + 1 + margin, H)
            x0, x1 = max(xa - margin, 0), min(xb + 1 + margin, W)
            y[v, :n_in] = y0 + u[v, :n_in, 0] * (y1 - y0)
            x[v, :n_in] = x0 + u[v, :n_in, 1] * (x1 - x0)
    return (y.long().clamp(max=H - 1) * W + x.long().clamp(max=W - 1)).sort(-1).values


def sample_targets(mb: dict, o: int, views, region, p: int | None, device):
    """Ground-truth rgb (V, 3, h, w), opacity and depth (V, h, w) of object o's chosen views,
    cropped to their patches or gathered at their pixels (h = 1, w = rays) as `region` says."""
    def crop(img_VCHW):
        if region is None:
            return img_VCHW
        if isinstance(region, torch.Tensor):
            V, C = img_VCHW.shape[:2]
            return img_VCHW.flatten(2).gather(2, region[:, None].expand(V, C, -1))[:, :, None]
        y0, x0 = region
        return torch.stack([img_VCHW[j, :, y:y + p, x:x + p] for j, (y, x) in enumerate(zip(y0.tolist(), x0.tolist()))])
    return (crop(mb["target_rgb"][o][views]).to(device), crop(mb["target_alpha"][o][views][:, None])[:, 0].to(device),
            crop(mb["target_depth"][o][views][:, None])[:, 0].to(device))


def occupancy_targets(cfg: TrainConfig, g: torch.Generator, mb: dict, o: int, half: float, device) -> tuple:
    """Object o's query points (N, 3) in world units and their inside (1) / outside (0) labels:
    occupancy_points + surface_points drawn, those outside the render cube [-half, half]^3
    (empty by construction, renderers.nerf.NeRFRenderer.query) dropped."""
    pts, occ = mb["occ_points"][o], mb["occ_labels"][o]
    surf, nrm = mb["surface_points"][o], mb["surface_normals"][o]
    i = torch.randint(len(pts), (cfg.occupancy_points,), generator=g)
    j = torch.randint(len(surf), (cfg.surface_points,), generator=g)
    shift = (torch.rand(cfg.surface_points, generator=g) * 2 - 1) * cfg.surface_offset
    q = torch.cat([pts[i].float(), surf[j].float() + shift[:, None] * nrm[j].float()])
    y = torch.cat([occ[i].float(), (shift < 0).float()])
    keep = (q.abs() <= half).all(-1)
    return q[keep].to(device), y[keep].to(device)


def occupancy_loss(cfg: TrainConfig, sigmas: list, labels: list) -> torch.Tensor:
    return sum(F.binary_cross_entropy_with_logits((s.float() - cfg.occupancy_sigma) / cfg.occupancy_temperature, y)
               for s, y in zip(sigmas, labels)) / len(sigmas)


def freeze_modules(model: TriplaneVQVAE, names) -> None:
    children = dict(model.named_children())
    unknown = sorted(set(names) - set(children))
    if unknown:
        raise ValueError(f"train.freeze: unknown modules {unknown}; the VQVAE has {', '.join(children)}")
    for name in names:
        children[name].requires_grad_(False)


def init_weights(model: TriplaneVQVAE, src) -> None:
    """Copy the weights of the VQVAE checkpoint folder `src` (train.init_from) into `model`."""
    state = load_vqvae(src).state_dict()
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[1:2] or [str(e)]
        raise ValueError(f"train.init_from {src}: its weights do not fit --config's model ({first[0].strip()})") from None


class ReconstructionStep(nn.Module):
    """VQVAE forward plus the renders of each sample's target views: the module DDP wraps, so
    that every parameter (the renderer's too) is used inside one forward."""

    def __init__(self, vqvae: TriplaneVQVAE):
        super().__init__()
        self.vqvae = vqvae

    def forward(self, x_NChw: torch.Tensor, cams: list, generators: list, queries: list | None = None):
        """cams: per sample (cameras, resolution, pixel indices or None); queries: per sample
        points (N, 3) whose raw sigma (N,) is returned too (None: an empty list)."""
        triplane, vq_loss, usage = self.vqvae(x_NChw)
        renders = [self.vqvae.render(triplane[j:j + 1], c, resolution=res, generator=g,
                                     **({} if pix is None else {"pixels": pix}))
                   for j, ((c, res, pix), g) in enumerate(zip(cams, generators))]
        sigmas = [self.vqvae.query(triplane[j:j + 1], q[None])[0][0, :, 0] for j, q in enumerate(queries or [])]
        return renders, vq_loss, usage, sigmas


def reconstruction_losses(cfg: TrainConfig, renders: list, targets: list, lpips=None) -> tuple:
    """Mean over samples of the weighted RGB (L1, LPIPS when `lpips` is given) / opacity / depth
    terms. Returns (loss, logs, fake and real RGB patches in [-1, 1] for the discriminator)."""
    total, logs, fakes, reals = 0.0, {"l1": 0.0, "alpha": 0.0, "depth": 0.0, "lpips": 0.0}, [], []
    for r, (rgb, alpha, depth) in zip(renders, targets):
        gt = rgb * 2 - 1
        l1 = (r["image_raw"] - gt).abs().mean()
        if lpips is not None:
            l_p = lpips_distance(lpips, r["image_raw"], gt).mean()
            total = total + cfg.perceptual_weight * l_p
            logs["lpips"] += l_p.item() / len(renders)
        l_alpha = (r["weights_samples"][:, 0] - alpha).abs().mean()
        # the gradient term compares neighbouring pixels: random rays have none
        l_depth = scale_shift_invariant_loss(r["image_depth"][:, 0].float(), depth, alpha > 0.5,
                                             alpha=0.0 if cfg.rays_per_view else 0.5)
        if l_depth.item() > cfg.depth_max:   # a sample the depth term cannot fit yet; skip as the official
            l_depth = l_depth * 0.0
        total = total + cfg.l1_weight * l1 + cfg.alpha_weight * l_alpha + cfg.depth_weight * l_depth
        for k, v in (("l1", l1), ("alpha", l_alpha), ("depth", l_depth)):
            logs[k] += v.item() / len(renders)
        fakes.append(r["image_raw"])
        reals.append(gt)
    return total / len(renders), logs, torch.cat(fakes), torch.cat(reals)


def param_groups(model: TriplaneVQVAE, t: TrainConfig) -> list:
    groups = {"encoder": (t.lr_encoder, t.wd_encoder), "dit": (t.lr_dit, t.wd_dit), "rest": (t.lr_rest, t.wd_rest)}
    params = {k: [] for k in groups}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = "encoder" if name.startswith("encoder.") else "dit" if name.startswith("decoder.vit_decoder.") else "rest"
        params[key].append(p)
    return [{"params": params[k], "lr": lr, "weight_decay": wd, "name": k} for k, (lr, wd) in groups.items()]


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: TriplaneVQVAE, ds: GBufferDataset, cfg: VQVAERunConfig, device) -> tuple[float, torch.Tensor]:
    """Mean PSNR of all 12 deterministic renders of the first `eval_objects` held-out objects,
    encoded from their first view set, and a grid (3, H, W): GT rows over reconstruction rows."""
    was_training = model.training
    model.eval()
    values, rows = [], []
    view_ids = input_view_sets(cfg.encoder.num_views)[0]
    for i in range(min(cfg.train.eval_objects, len(ds))):
        s = ds[i]
        x = encoder_views(s["rgb"][None], s["depth"][None], s["c"][None], view_ids, cfg.input_size).to(device)
        triplane = model(x)[0]
        r = model.render(triplane, s["c"].to(device), resolution=cfg.train.render_resolution, deterministic=True)
        pred = (r["image_raw"].float().clamp(-1, 1) + 1) / 2
        values.append(psnr(pred.cpu(), s["target_rgb"]).mean().item())
        if i < 4:
            rows += [torch.cat(list(s["target_rgb"][:6]), -1), torch.cat(list(pred.cpu()[:6]), -1)]
    model.train(was_training)
    return sum(values) / len(values), torch.cat(rows, -2)


# ----------------------------------------------------------------------------- main loop

def train(cfg: VQVAERunConfig, data_dir: Path, out_dir: Path, resume: bool, stop_at: int | None = None) -> dict:
    """Train to train.max_steps (the learning-rate schedule's length), or stop early at `stop_at`."""
    t = cfg.train
    if t.rays_per_view and (cfg.renderer_kind != "nerf" or t.perceptual_weight > 0 or t.gan_g_weight > 0
                            or t.gan_d_weight > 0):
        raise ValueError("train.rays_per_view renders scattered pixels: it needs renderer_kind nerf and "
                         "train.perceptual_weight, gan_g_weight and gan_d_weight at 0 (they need patches)")
    if t.view_sets_per_object not in (1, 2):
        raise ValueError(f"train.view_sets_per_object must be 1 or 2, got {t.view_sets_per_object}")
    d = distributed.setup()
    torch.manual_seed(t.seed)
    device = d.device
    autocast = distributed.autocast_factory(t.amp, device)

    use_occ = t.occupancy_weight > 0
    if use_occ and cfg.renderer_kind != "nerf":
        raise ValueError("train.occupancy_weight needs renderer_kind nerf (it supervises the NeRF density)")
    train_ds = GBufferDataset(data_dir, split="train", holdout=t.holdout, resolution=t.render_resolution,
                              cache=t.cache_objects, occupancy=use_occ)
    val_ds = GBufferDataset(data_dir, split="val", holdout=t.holdout, resolution=t.render_resolution) \
        if d.is_main and t.eval_objects > 0 and t.holdout > 0 else None
    objects_per_rank = t.batch_size // d.world_size
    if t.batch_size % (d.world_size * t.grad_accum):
        raise ValueError(f"train.batch_size {t.batch_size} must split evenly into {d.world_size} process(es) "
                         f"x {t.grad_accum} micro-batch(es)")

    model = TriplaneVQVAE(cfg).to(device)
    if t.init_from and not resume:
        init_weights(model, t.init_from)
    freeze_modules(model, t.freeze)
    disc = PatchDiscriminator(ndf=t.disc_channels, n_layers=t.disc_layers, norm=t.disc_norm).to(device)
    patch = t.render_resolution if t.patch_size is None else min(t.patch_size, t.render_resolution)
    try:
        with torch.no_grad():
            disc(torch.zeros(1, 3, patch, patch, device=device))
    except RuntimeError:
        raise ValueError(f"train: {patch}x{patch} renders are too small for a discriminator of {t.disc_layers} layers; "
                         "raise train.patch_size / render_resolution or lower train.disc_layers") from None
    lpips = load_lpips(t.lpips_weights, device) if t.perceptual_weight > 0 else None
    ema = EMA(model, t.ema_decay)
    opt = torch.optim.AdamW(param_groups(model, t), betas=t.betas)
    peak_lr = {g["name"]: g["lr"] for g in opt.param_groups}
    opt_d = torch.optim.AdamW(disc.parameters(), lr=t.disc_lr, betas=t.disc_betas)
    step = 0
    if resume:
        meta = load_train_state(out_dir, {"model": model, "ema": ema, "disc": disc}, {"model": opt, "disc": opt_d})
        step, model.quantizer.hit_updates = meta["step"], meta["hit_updates"]
        log.info("resumed from step %d", step)
    train_step = ReconstructionStep(model)
    if d.enabled:
        train_step = nn.parallel.DistributedDataParallel(train_step, device_ids=[device.index] if device.type == "cuda"
                                                         else None)
        disc_ddp = nn.parallel.DistributedDataParallel(disc, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        disc_ddp = disc

    end = t.max_steps if stop_at is None else min(stop_at, t.max_steps)
    sampler = StepBatches(len(train_ds), t.batch_size, t.seed, step, d.rank, d.world_size, max(end - step, 0))
    loader = torch.utils.data.DataLoader(IndexedDataset(train_ds), batch_sampler=sampler, collate_fn=collate,
                                         num_workers=t.num_workers, persistent_workers=False)
    run_log = RunLog(out_dir, d.is_main, "train_vqvae", step, t.max_steps, t.batch_size, t.log_every)
    view_sets = input_view_sets(cfg.encoder.num_views)
    size = cfg.input_size
    model.train()
    for batch in loader:
        logs = {"loss": 0.0, "l1": 0.0, "lpips": 0.0, "alpha": 0.0, "depth": 0.0, "vq": 0.0, "g_gan": 0.0,
                "d_gan": 0.0, **({"occ": 0.0} if use_occ else {})}
        n_micro = t.grad_accum
        per_micro = objects_per_rank // n_micro
        gan_on = step >= t.gan_start and t.gan_g_weight + t.gan_d_weight > 0
        fakes_all, reals_all = [], []
        factor = lr_factor(step, t)
        for group in opt.param_groups:
            group["lr"] = peak_lr[group["name"]] * factor
        for m in range(n_micro):
            sl = slice(m * per_micro, (m + 1) * per_micro)
            mb = {k: v[sl] for k, v in batch.items()}
            # an object gives one sample per view set it uses; sample key 2·position + set
            samples = [(o, h) for o in range(len(mb["pos"])) for h in sample_view_sets(t, step, int(mb["pos"][o]))]
            x = torch.cat([encoder_views(mb["rgb"][o:o + 1], mb["depth"][o:o + 1], mb["c"][o:o + 1], view_sets[h], size)
                           for o, h in samples]).to(device)      # (samples·V, 10, S, S), samples object-major
            cams, gens, targets, queries, labels = [], [], [], [], []
            for o, h in samples:
                g = seeded_generator(t.seed, step, 2 * int(mb["pos"][o]) + h)
                views, c, region = choose_views(t, g, mb["target_alpha"][o], mb["c"][o])
                pix = region.to(device) if isinstance(region, torch.Tensor) else None
                cams.append((c.to(device), t.patch_size if isinstance(region, tuple) else t.render_resolution, pix))
                gens.append(g)
                targets.append(sample_targets(mb, o, views, region, t.patch_size, device))
                if use_occ:
                    q, y = occupancy_targets(t, seeded_generator(t.seed, step, 2 * int(mb["pos"][o]) + h, 3), mb, o,
                                             cfg.renderer.box_side / 2, device)
                    queries.append(q)
                    labels.append(y)
            sync = nullcontext() if (not d.enabled or m == n_micro - 1) else train_step.no_sync()
            with sync:
                with autocast():
                    renders, vq_loss, usage, sigmas = train_step(x, cams, gens, queries)
                rec, rec_logs, fake, real = reconstruction_losses(
                    t, renders, targets, lpips if step >= t.perceptual_start else None)
                loss = rec + t.vq_weight * vq_loss.float()
                if use_occ:
                    l_occ = occupancy_loss(t, sigmas, labels)
                    loss = loss + t.occupancy_weight * l_occ
                    logs["occ"] += l_occ.item() / n_micro
                if gan_on and t.gan_g_weight > 0:
                    disc.requires_grad_(False)
                    with autocast():
                        g_gan = hinge_g_loss(disc(fake).float())
                    disc.requires_grad_(True)
                    loss = loss + t.gan_g_weight * g_gan
                    logs["g_gan"] += g_gan.item() / n_micro
                (loss / n_micro).backward()
            fakes_all.append(fake.detach())
            reals_all.append(real)
            logs["loss"] += loss.item() / n_micro
            logs["vq"] += vq_loss.item() / n_micro
            for k, v in rec_logs.items():
                logs[k] += v / n_micro
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if gan_on and t.gan_d_weight > 0:
            for fake, real in zip(fakes_all, reals_all):
                with autocast():
                    d_loss = hinge_d_loss(disc_ddp(real).float(), disc_ddp(fake).float())
                (t.gan_d_weight * d_loss / n_micro).backward()
                logs["d_gan"] += d_loss.item() / n_micro
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)
        ema.update(model)
        step += 1
        logs = distributed.mean_across(logs, d)
        if not math.isfinite(logs["loss"]):
            raise FloatingPointError(f"step {step}: the loss is {logs['loss']} (lower the learning rates, or amp: none)")
        logs.update(grad_norm=float(grad_norm), lr_factor=factor)
        if run_log.step(step, logs, {"loss": f"{logs['loss']:.4f}", "l1": f"{logs['l1']:.4f}"}):
            for si, u in enumerate(usage.tolist()):
                run_log.writer.add_scalar(f"codebook_usage/scale{si}", u, step)
        if d.is_main and val_ds is not None and (step % t.eval_every == 0 or step == end):
            value, grid = evaluate(model, val_ds, cfg, device)
            run_log.writer.add_scalar("val/psnr", value, step)
            run_log.writer.add_image("val/gt_over_reconstruction", grid.clamp(0, 1), step)
            run_log.metrics(step, {"val_psnr": value, "train_l1": logs["l1"]}, f"step {step}: held-out PSNR {value:.2f} dB")
        if step % t.save_every == 0 or step == end:
            save(out_dir, cfg, model, ema, disc, opt, opt_d, step, d)
    run_log.close()
    distributed.teardown()
    return {"history": run_log.history, "step": step}


def save(out_dir: Path, cfg, model, ema, disc, opt, opt_d, step: int, d) -> None:
    if d.is_main:
        save_model(out_dir, model.state_dict(), model_config(cfg), kind="vqvae")
        save_model(out_dir / "ema", ema.state_dict(), model_config(cfg), kind="vqvae")
        save_train_state(out_dir, step, {"model": model.state_dict(), "ema": ema.state_dict(),
                                         "disc": disc.state_dict()}, {"model": opt, "disc": opt_d},
                         {"hit_updates": model.quantizer.hit_updates, "config": to_dict(cfg)})
    distributed.barrier(d)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, type=Path, help="model config with an optional train: section")
    ap.add_argument("--data-dir", required=True, type=Path, help="G-buffer dataset root (with dataset.json)")
    add_run_args(ap, "train.patch_size=32")
    args = ap.parse_args(argv)
    cfg = load_run_config(VQVAERunConfig, args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    train(cfg, args.data_dir, args.out_dir, args.resume, args.stop_at)
    return 0


if __name__ == "__main__":
    run(main)
