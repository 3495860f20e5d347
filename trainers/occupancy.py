"""The Argus-3D shape tokenizer's trainer (models/occupancy_vqvae.py): train_vqvae.py runs it for a
config with `kind: occupancy` (configs/argus/*.yaml).

Data: an occupancy dataset in the ONet layout (datasets/occupancy.py; scripts/make_shapes.py and
scripts/render_meshes.py write it beside the G-buffer views): the "train" split lists train, the
"val" split is held out. Each step draws, per object, `pointcloud_n` surface points (with
Gaussian noise `noise`) as the input and `num_points` query points of points.npz with their
occupancy, all from (seed, step, sample), so that a resumed run continues exactly. Beyond the
official recipe, a `near_surface` share of the query points are the points of points.npz nearest
the object's surface (the closest of a random pool), where the uniform points that decide the IoU
are hardest. Loss, as the
official: binary cross-entropy of the occupancy logits summed over the query points and averaged
over the objects, plus the VQ loss. Beyond the official recipe, `code_restart` re-seeds the codes
that no object picked for that many steps with pre-quantisation codes of the current batch (the
small 4-d codebook otherwise collapses onto a handful of codes). Held-out metric: volumetric IoU
of the decoded tokens at every point of points.npz, occupied where the probability is at least
`iou_threshold`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.spatial import cKDTree

from datasets.occupancy import OccupancyDataset, subsample
from evaluation.occupancy import volumetric_iou as iou
from models.occupancy_vqvae import OccupancyVQVAE, OccupancyVQVAEConfig
from trainers.cli import model_config
from trainers.loop import LoopConfig, Trainer, due
from trainers.sampler import seeded_generator
from utils.checkpoint import save_model

NEAR_POOL = 8                        # near-surface queries: the closest 1/8 of a random pool
ALL = 1 << 30                        # "every point" for OccupancyDataset: the trainer draws its own


@dataclass
class TrainConfig(LoopConfig):
    """Defaults: the official recipe (lr 1e-4, batch 16, 2048 query and 30,000 input points)."""
    batch_size: int = 16
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    num_points: int = 2048           # query points per object and step
    pointcloud_n: int = 30000        # input surface points per object
    noise: float = 0.0005            # std of the Gaussian noise on the inputs (the official code's value)
    vq_weight: float = 1.0
    code_restart: int = 0            # every N steps, re-seed the codes unused in them (0: never, as the official)
    near_surface: float = 0.0        # share of the query points drawn near the surface (0: uniform, as the official)
    eval_objects: int = 16           # held-out objects scored at each evaluation (0: all of the split)
    iou_threshold: float = 0.2       # occupancy probability of "inside" (the official generation's)


@dataclass
class OccupancyRunConfig(OccupancyVQVAEConfig):
    kind: Literal["occupancy"] = "occupancy"
    train: TrainConfig = field(default_factory=TrainConfig)


def collate(samples: list) -> dict:
    """Objects keep their own point counts: lists of tensors, and the sample positions."""
    return {"points": [s["points"] for s in samples], "occ": [s["occ"] for s in samples],
            "inputs": [s["inputs"] for s in samples], "pos": torch.tensor([s["pos"] for s in samples])}


def draw(t: TrainConfig, g: torch.Generator, points, occ, surface) -> tuple:
    """One object's training sample: (inputs (pointcloud_n, 3), queries (num_points, 3) with
    ONet's 1e-4 jitter, labels (num_points,)). The near-surface queries are the closest to the
    drawn surface points of NEAR_POOL times as many random points of the file."""
    n_near = round(t.near_surface * t.num_points)
    qi, si = subsample(len(points), t.num_points - n_near, g), subsample(len(surface), t.pointcloud_n, g)
    inputs = surface[si] + t.noise * torch.randn(len(si), 3, generator=g)
    if n_near:
        pool = subsample(len(points), NEAR_POOL * n_near, g)
        dist_to_surface = torch.from_numpy(cKDTree(surface[si].numpy()).query(points[pool].numpy())[0])
        qi = torch.cat([qi, pool[dist_to_surface.argsort(stable=True)[:n_near]]])
    queries = points[qi] + 1e-4 * torch.randn(len(qi), 3, generator=g)
    return inputs, queries, occ[qi]


@torch.no_grad()
def volumetric_iou(model: OccupancyVQVAE, ds: OccupancyDataset, t: TrainConfig, device, limit: int = 0) -> float:
    """Mean IoU over the first `limit` objects of `ds` (0: all) of the decoded tokens at every
    point of points.npz (inputs drawn from the object's index, so the score is repeatable)."""
    was_training = model.training
    model.eval()
    tau = math.log(t.iou_threshold / (1 - t.iou_threshold))
    scores = []
    for i in range(min(limit or len(ds), len(ds))):
        s = ds[i]
        inputs, _, _ = draw(t, seeded_generator(t.seed, i), s["points"], s["occ"], s["inputs"])
        planes = model.decode_tokens(model.tokenize(inputs[None].to(device)))
        pred = model.query(planes, s["points"][None].to(device))[0].cpu() >= tau
        scores.append(iou(pred.numpy(), s["occ"].numpy() > 0.5))
    model.train(was_training)
    return sum(scores) / len(scores)


class OccupancyTrainer(Trainer):
    name = "train_occupancy"
    postfix = ("loss", "occ")

    def __init__(self, cfg: OccupancyRunConfig, data_dir, out_dir, resume: bool = False):
        super().__init__(cfg, out_dir)
        t = cfg.train
        if not 0.0 <= t.near_surface <= 1.0:
            raise ValueError(f"train.near_surface is a share of the query points, in [0, 1]; got {t.near_surface}")
        kw = dict(num_points=ALL, pointcloud_n=ALL, noise=0.0, float16_noise=0.0)   # drawn in train_step
        self.train_ds = OccupancyDataset(data_dir, "train", **kw)
        self.val_ds = OccupancyDataset(data_dir, "val", **kw) if self.d.is_main and t.eval_every > 0 else None
        self.collate = collate
        self.model = OccupancyVQVAE(cfg).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=t.lr, betas=t.betas)
        self.peak_lrs = [t.lr]
        self.forward = self.wrap(self.model)
        self.usage = torch.zeros(cfg.n_e, dtype=torch.long)     # picks of each code since the last restart
        self.inputs = None                                       # this step's last input points (for a restart)

    def train_step(self, mb: dict, step: int, scale: float) -> dict:
        t, device = self.t, self.device
        drawn = [draw(t, seeded_generator(t.seed, step, int(p)), *obj)
                 for p, *obj in zip(mb["pos"], mb["points"], mb["occ"], mb["inputs"])]
        inputs, queries, labels = (torch.stack(x).to(device) for x in zip(*drawn))
        with self.autocast():
            logits, vq_loss, ids = self.forward(inputs, queries)
        occ = F.binary_cross_entropy_with_logits(logits.float(), labels, reduction="none").sum(-1).mean()
        loss = occ + t.vq_weight * vq_loss.float()
        (loss * scale).backward()
        acc = ((logits >= 0) == (labels > 0.5)).float().mean()
        counts = torch.bincount(ids.flatten().cpu(), minlength=self.cfg.n_e)
        self.usage += counts
        self.inputs = inputs
        return {"loss": loss.item(), "occ": occ.item(), "vq": vq_loss.item(), "acc": acc.item(),
                "codes": float((counts > 0).sum())}

    @torch.no_grad()
    def after_step(self, step: int) -> dict:
        """Every `code_restart` steps: the codes no process picked since the last restart take
        pre-quantisation codes of this step's global batch (drawn from (seed, step), plus a little
        noise), the same on every process; the pick counts are saved, so a resume is exact."""
        every = self.t.code_restart
        if not every or (step + 1) % every:
            return {}
        usage = self.usage.clone()
        self.usage.zero_()
        if self.d.enabled:
            dist.all_reduce(usage)
        dead = (usage == 0).nonzero().flatten()
        if len(dead):
            z = self.model.quantizer.encode(self.model.encoder(self.inputs)).flatten(0, -2).float()
            if self.d.enabled:                               # the global batch's codes, in sample order
                parts = [torch.empty_like(z) for _ in range(self.d.world_size)]
                dist.all_gather(parts, z)
                z = torch.cat(parts)
            g = seeded_generator(self.t.seed, step, 1)
            new = z[torch.randint(len(z), (len(dead),), generator=g).to(z.device)]
            new = new + 0.01 * z.std() * torch.randn(new.shape, generator=g).to(z.device)
            weight = self.model.quantizer.quantizer.embedding.weight
            weight[dead.to(weight.device)] = new.to(weight.dtype)
        return {"restarted": float(len(dead))}

    def evaluate(self, step: int, last: bool, run_log) -> None:
        if self.val_ds is None or not due(step, self.t.eval_every, last):
            return
        iou = volumetric_iou(self.model, self.val_ds, self.t, self.device, self.t.eval_objects)
        run_log.writer.add_scalar("val/iou", iou, step)
        run_log.metrics(step, {"val_iou": iou, "train_occ": run_log.history[-1]["occ"]},
                        f"step {step}: held-out volumetric IoU {iou:.3f}")

    def save_weights(self, states: dict) -> None:
        save_model(self.out_dir, states["model"], model_config(self.cfg), kind="occupancy_vqvae")

    def stateful(self) -> tuple[dict, dict, dict]:
        modules, optimizers, _ = super().stateful()
        return modules, optimizers, {"code_usage": self.usage.tolist()}

    def restore(self, meta: dict) -> None:
        self.usage = torch.tensor(meta.get("code_usage", [0] * self.cfg.n_e), dtype=torch.long)
