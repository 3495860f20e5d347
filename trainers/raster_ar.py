"""The Argus-3D raster-order generator's trainer (models/raster_ar.py): train_ar.py runs it for a
config with `kind: raster` (configs/argus/gpt_*.yaml).

Data: an occupancy dataset whose shapes hold the tokenizer's ids (occupancy_tokens.npz, written
by scripts/precompute.py --occupancy-vqvae; datasets/occupancy.py OccupancyTokenDataset); the
"train" split trains, the "val" split (when its ids are there) gives the held-out loss. A class
model takes the dataset's categories as its classes; an image/text model the pooled embeddings
precompute wrote beside the views. Loss, as the official: cross-entropy over all the tokens.
The recipe (the official one is unreleased): AdamW β (0.9, 0.95), weight decay on matrices only,
warm-up then linear decay, gradient clip 1, conditions dropped with probability cond_drop for
classifier-free guidance. `train.parallel: fsdp` shards the model over the processes (FSDP2,
with bf16 parameters under train.amp) and `train.checkpointing` recomputes each block in the
backward pass, for the sizes that do not fit one device.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from datasets.errors import DatasetError
from datasets.occupancy import OccupancyTokenDataset
from datasets.precompute import OCCUPANCY_TOKENIZER_FILE, as_generator_side, read_tokenizer_record
from models.ar import Condition
from models.layout import check_pair
from models.raster_ar import RasterAR, RasterARConfig
from trainers.cli import model_config
from trainers.loop import LoopConfig, Trainer, due
from trainers.sampler import seeded_generator
from utils.checkpoint import save_model

log = logging.getLogger("trainers")


@dataclass
class TrainConfig(LoopConfig):
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.01
    warmup: float = 0.02
    hold: float = 0.0
    final_lr: float = 0.1
    checkpointing: bool = False      # recompute each block in the backward pass (activation checkpointing)


@dataclass
class RasterRunConfig(RasterARConfig):
    kind: Literal["raster"] = "raster"
    train: TrainConfig = field(default_factory=TrainConfig)


def collate(samples: list) -> dict:
    out = {"tokens": torch.stack([s["tokens"] for s in samples]),
           "labels": torch.tensor([s["category"] for s in samples]),
           "pos": torch.tensor([s["pos"] for s in samples])}
    if "pooled" in samples[0]:
        out["pooled"] = torch.stack([s["pooled"] for s in samples])
    return out


def condition(mb: dict, device) -> Condition:
    if "pooled" in mb:
        return Condition(pooled=mb["pooled"].to(device))
    return Condition(labels=mb["labels"].to(device))


@torch.no_grad()
def evaluate(model: RasterAR, ds, device, batch_size: int = 16) -> dict:
    """Token-mean cross-entropy and accuracy of teacher forcing on `ds`, eval mode, no dropout."""
    model.eval()
    total = {"loss": 0.0, "acc": 0.0}
    for start in range(0, len(ds), batch_size):
        mb = collate([{**ds[i], "pos": i} for i in range(start, min(start + batch_size, len(ds)))])
        tokens = mb["tokens"].to(device)
        logits = model(tokens, condition(mb, device)).float()
        n = len(tokens) / len(ds)
        total["loss"] += F.cross_entropy(logits.flatten(0, 1), tokens.flatten()).item() * n
        total["acc"] += (logits.argmax(-1) == tokens).float().mean().item() * n
    model.train()
    return total


class RasterTrainer(Trainer):
    name = "train_raster_ar"
    postfix = ("loss", "acc")
    collective_eval = True              # under FSDP every process takes part in the held-out forward

    def __init__(self, cfg: RasterRunConfig, data_dir, out_dir):
        super().__init__(cfg, out_dir)
        t = cfg.train
        cond = cfg.condition if cfg.condition in ("image", "text") else None
        self.train_ds = OccupancyTokenDataset(data_dir, "train", cond)
        try:
            self.val_ds = OccupancyTokenDataset(data_dir, "val", cond) if t.eval_every > 0 else None
        except DatasetError as e:
            log.warning("no held-out loss: %s", e)
            self.val_ds = None
        self.collate = collate
        if cfg.condition == "class" and list(cfg.classes) != self.train_ds.categories:
            cfg.classes = tuple(self.train_ds.categories)
        record = read_tokenizer_record(data_dir, OCCUPANCY_TOKENIZER_FILE)
        if record is not None:
            check_pair(record, vars(cfg), f"the tokens in {data_dir}", "--config's generator",
                       "set num_tokens / vocab_size to the tokenizer's (--set num_tokens=64)")
            cfg.tokenizer = record["fingerprint"]
        else:
            first = self.train_ds[0]["tokens"]
            check_pair({"num_tokens": len(first), "vocab_size": cfg.vocab_size}, vars(cfg),
                       f"the tokens in {data_dir}", "--config's generator", "--set num_tokens=N")
        model = RasterAR(cfg).to(self.device)
        model.checkpointing = t.checkpointing
        self.forward = self.wrap(model, model.blocks)
        self.model = model
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and not n.startswith(("pos_emb", "emb"))]
        rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and not n.startswith(("pos_emb", "emb")))]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                            {"params": rest, "weight_decay": 0.0}], lr=t.lr, betas=t.betas)
        self.peak_lrs = [t.lr, t.lr]

    def train_step(self, mb: dict, step: int, scale: float) -> dict:
        device = self.device
        tokens = mb["tokens"].to(device)
        u = torch.stack([torch.rand(1, generator=seeded_generator(self.t.seed, step, int(p)))[0] for p in mb["pos"]])
        with self.autocast():
            logits = self.forward(tokens, condition(mb, device), u.to(device))
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
        (loss * scale).backward()
        return {"loss": loss.item(), "acc": (logits.argmax(-1) == tokens).float().mean().item()}

    def evaluate(self, step: int, last: bool, run_log) -> None:
        if self.val_ds is None or not due(step, self.t.eval_every, last):
            return
        val = evaluate(self.model, self.val_ds, self.device)
        if self.d.is_main:
            for k, v in val.items():
                run_log.writer.add_scalar(f"val/{k}", v, step)
            run_log.metrics(step, {**{f"val_{k}": v for k, v in val.items()}, "train_loss": run_log.history[-1]["loss"]},
                            f"step {step}: held-out loss {val['loss']:.3f}, token accuracy {val['acc']:.3f}")

    def save_weights(self, states: dict) -> None:
        save_model(self.out_dir, states["model"], model_config(self.cfg), kind="raster_ar")
