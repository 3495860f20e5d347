"""The multi-scale triplane VQVAE trainer (stage 1): train_vqvae.py is its command line.

Every step encodes each object twice, from each of its two view sets
(models.inputs.input_view_sets), and supervises the renders of its views: L1 and LPIPS on RGB,
opacity L1 against the mask, scale-and-shift-invariant depth, the VQ loss, and a PatchGAN hinge
term; with train.occupancy_weight, also the density at the dataset's occupancy points.
train.init_from starts from a trained VQVAE, and train.freeze keeps modules as they are (its
encoder, quant_conv and quantizer: every token id stays as it was). OUT holds the latest raw
weights (model.safetensors + config.json, what every other tool reads), the EMA weights in ema/,
and train_state/ for an exact --resume (model, EMA, discriminator, optimizers, step, RNG); every
random choice is a function of (seed, step, sample), so resuming, or changing the number of
processes, continues the same run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from datasets.gbuffer import GBufferDataset
from evaluation.image import psnr
from losses.depth import scale_shift_invariant_loss
from losses.gan import PatchDiscriminator, hinge_d_loss, hinge_g_loss
from losses.perceptual import load_lpips, lpips_distance
from models.inputs import encoder_views, input_view_sets
from models.vqvae import TriplaneVQVAE, VQVAEConfig, load_vqvae
from renderers.nerf_mesh import OFFICIAL_SIGMA
from trainers.cli import model_config
from trainers.loop import LoopConfig, Trainer, due
from trainers.sampler import seeded_generator
from trainers.state import EMA
from utils.cameras import crop_cameras
from utils.checkpoint import save_model


@dataclass
class TrainConfig(LoopConfig):
    """Defaults: the official recipe where it applies (a constant learning rate: warmup 0, hold 1)."""
    holdout: int = 5                 # last objects of each category kept out of training, for evaluation
    view_sets_per_object: int = 2    # samples per object: both encoder view sets (official), or 1, a
                                     # random one: twice the objects for the same work per step
    # optimiser groups (peak lr, weight decay)
    lr_encoder: float = 1e-4
    wd_encoder: float = 0.001
    lr_dit: float = 8e-5
    wd_dit: float = 0.001
    lr_rest: float = 1e-4            # quantizer, convs around it, conv upsampler, point decoder
    wd_rest: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
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
    cache_objects: bool = False      # keep decoded training objects in memory (GBufferDataset(cache=True))
    eval_objects: int = 8


@dataclass
class VQVAERunConfig(VQVAEConfig):
    kind: Literal["triplane"] = "triplane"
    train: TrainConfig = field(default_factory=TrainConfig)


OCCUPANCY_KEYS = ("occ_points", "occ_labels", "surface_points", "surface_normals")


def collate(samples: list) -> dict:
    keys = ("rgb", "depth", "c", "target_rgb", "target_depth", "target_alpha")
    lists = {k: [s[k] for s in samples] for k in OCCUPANCY_KEYS if k in samples[0]}   # lengths may differ
    return {**{k: torch.stack([s[k] for s in samples]) for k in keys}, **lists,
            "pos": torch.tensor([s["pos"] for s in samples])}


# ----------------------------------------------------------------------------- one step

def sample_view_sets(cfg: TrainConfig, step: int, pos: int) -> list[int]:
    """The encoder view sets (models.inputs.input_view_sets) that the object at batch
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


# ----------------------------------------------------------------------------- the trainer

class VQVAETrainer(Trainer):
    name = "train_vqvae"
    postfix = ("loss", "l1")

    def __init__(self, cfg: VQVAERunConfig, data_dir, out_dir, resume: bool = False):
        t = cfg.train
        if t.rays_per_view and (cfg.renderer_kind != "nerf" or t.perceptual_weight > 0 or t.gan_g_weight > 0
                                or t.gan_d_weight > 0):
            raise ValueError("train.rays_per_view renders scattered pixels: it needs renderer_kind nerf and "
                             "train.perceptual_weight, gan_g_weight and gan_d_weight at 0 (they need patches)")
        if t.view_sets_per_object not in (1, 2):
            raise ValueError(f"train.view_sets_per_object must be 1 or 2, got {t.view_sets_per_object}")
        self.use_occ = t.occupancy_weight > 0
        if self.use_occ and cfg.renderer_kind != "nerf":
            raise ValueError("train.occupancy_weight needs renderer_kind nerf (it supervises the NeRF density)")
        super().__init__(cfg, out_dir)
        device = self.device
        self.train_ds = GBufferDataset(data_dir, split="train", holdout=t.holdout, resolution=t.render_resolution,
                                       cache=t.cache_objects, occupancy=self.use_occ)
        self.val_ds = GBufferDataset(data_dir, split="val", holdout=t.holdout, resolution=t.render_resolution) \
            if self.d.is_main and t.eval_objects > 0 and t.holdout > 0 else None
        self.collate = collate
        self.model = model = TriplaneVQVAE(cfg).to(device)
        if t.init_from and not resume:
            init_weights(model, t.init_from)
        freeze_modules(model, t.freeze)
        self.disc = PatchDiscriminator(ndf=t.disc_channels, n_layers=t.disc_layers, norm=t.disc_norm).to(device)
        patch = t.render_resolution if t.patch_size is None else min(t.patch_size, t.render_resolution)
        try:
            with torch.no_grad():
                self.disc(torch.zeros(1, 3, patch, patch, device=device))
        except RuntimeError:
            raise ValueError(f"train: {patch}x{patch} renders are too small for a discriminator of {t.disc_layers} "
                             "layers; raise train.patch_size / render_resolution or lower train.disc_layers") from None
        self.lpips = load_lpips(t.lpips_weights, device) if t.perceptual_weight > 0 else None
        self.ema = EMA(model, t.ema_decay)
        self.optimizer = torch.optim.AdamW(param_groups(model, t), betas=t.betas)
        self.peak_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.opt_d = torch.optim.AdamW(self.disc.parameters(), lr=t.disc_lr, betas=t.disc_betas)
        self.forward = self.wrap(ReconstructionStep(model))
        self.disc_forward = self.wrap(self.disc)
        self.view_sets = input_view_sets(cfg.encoder.num_views)
        self.fakes, self.usage = [], None

    def train_step(self, mb: dict, step: int, scale: float) -> dict:
        t, device = self.t, self.device
        # an object gives one sample per view set it uses; sample key 2·position + set
        samples = [(o, h) for o in range(len(mb["pos"])) for h in sample_view_sets(t, step, int(mb["pos"][o]))]
        x = torch.cat([encoder_views(mb["rgb"][o:o + 1], mb["depth"][o:o + 1], mb["c"][o:o + 1], self.view_sets[h],
                                     self.cfg.input_size) for o, h in samples]).to(device)   # samples object-major
        cams, gens, targets, queries, labels = [], [], [], [], []
        for o, h in samples:
            g = seeded_generator(t.seed, step, 2 * int(mb["pos"][o]) + h)
            views, c, region = choose_views(t, g, mb["target_alpha"][o], mb["c"][o])
            pix = region.to(device) if isinstance(region, torch.Tensor) else None
            cams.append((c.to(device), t.patch_size if isinstance(region, tuple) else t.render_resolution, pix))
            gens.append(g)
            targets.append(sample_targets(mb, o, views, region, t.patch_size, device))
            if self.use_occ:
                q, y = occupancy_targets(t, seeded_generator(t.seed, step, 2 * int(mb["pos"][o]) + h, 3), mb, o,
                                         self.cfg.renderer.box_side / 2, device)
                queries.append(q)
                labels.append(y)
        with self.autocast():
            renders, vq_loss, self.usage, sigmas = self.forward(x, cams, gens, queries)
        rec, logs, fake, real = reconstruction_losses(t, renders, targets,
                                                      self.lpips if step >= t.perceptual_start else None)
        loss = rec + t.vq_weight * vq_loss.float()
        logs.update(vq=vq_loss.item(), g_gan=0.0)
        if self.use_occ:
            l_occ = occupancy_loss(t, sigmas, labels)
            loss = loss + t.occupancy_weight * l_occ
            logs["occ"] = l_occ.item()
        if self.gan_on(step) and t.gan_g_weight > 0:
            self.disc.requires_grad_(False)
            with self.autocast():
                g_gan = hinge_g_loss(self.disc(fake).float())
            self.disc.requires_grad_(True)
            loss = loss + t.gan_g_weight * g_gan
            logs["g_gan"] = g_gan.item()
        (loss * scale).backward()
        self.fakes.append((fake.detach(), real, scale))
        logs["loss"] = loss.item()
        return logs

    def gan_on(self, step: int) -> bool:
        return step >= self.t.gan_start and self.t.gan_g_weight + self.t.gan_d_weight > 0

    def after_step(self, step: int) -> dict:
        """The discriminator's step on this step's renders, then the EMA."""
        logs = {"d_gan": 0.0}
        if self.gan_on(step) and self.t.gan_d_weight > 0:
            for fake, real, scale in self.fakes:
                with self.autocast():
                    d_loss = hinge_d_loss(self.disc_forward(real).float(), self.disc_forward(fake).float())
                (self.t.gan_d_weight * d_loss * scale).backward()
                logs["d_gan"] += d_loss.item() * scale
            self.opt_d.step()
            self.opt_d.zero_grad(set_to_none=True)
        self.fakes = []
        self.ema.update(self.model)
        return logs

    def tensorboard(self, step: int, writer) -> None:
        for si, u in enumerate(self.usage.tolist()):
            writer.add_scalar(f"codebook_usage/scale{si}", u, step)

    def evaluate(self, step: int, last: bool, run_log) -> None:
        if self.val_ds is None or not due(step, self.t.eval_every, last):
            return
        value, grid = evaluate(self.model, self.val_ds, self.cfg, self.device)
        run_log.writer.add_scalar("val/psnr", value, step)
        run_log.writer.add_image("val/gt_over_reconstruction", grid.clamp(0, 1), step)
        run_log.metrics(step, {"val_psnr": value, "train_l1": run_log.history[-1]["l1"]},
                        f"step {step}: held-out PSNR {value:.2f} dB")

    def save_weights(self, states: dict) -> None:
        save_model(self.out_dir, states["model"], model_config(self.cfg), kind="vqvae")
        save_model(self.out_dir / "ema", states["ema"], model_config(self.cfg), kind="vqvae")

    def stateful(self):
        return ({"model": self.model, "ema": self.ema, "disc": self.disc}, {"model": self.optimizer, "disc": self.opt_d},
                {"hit_updates": self.model.quantizer.hit_updates})

    def restore(self, meta: dict) -> None:
        self.model.quantizer.hit_updates = meta["hit_updates"]
