#!/usr/bin/env python
"""Train the next-scale generator (stage 2) on precomputed tokens.

    # one process (CPU or one GPU)
    python train_ar.py --config configs/ar/small_text.yaml --data-dir data/shapes --vqvae runs/vqvae_small \\
        --out-dir runs/ar_small_text
    # several processes on one node (gloo on CPU, NCCL on GPUs); the original's scripts do this
    torchrun --standalone --nproc_per_node 8 train_ar.py --config configs/ar/paper_image.yaml ...
    bash train_image.sh DEPTH BS NPROC_PER_NODE VQVAE_PATH OUT_DIR DATA_DIR

The data directory must hold, per object, the files of scripts/precompute.py (token ids,
teacher-forcing input and, for image/text models, the condition embeddings), and at its root the
unconditional embeddings under the official names (empty_text_embedding.npy and
empty_text_pooler_output.npy, or empty_dino_embedding.npy and empty_dino_pooler_output.npy):
precompute.py writes them, or copy the official files/ there. A class model uses the dataset's
categories as classes.

The config is a generator config (configs/ar/*.yaml) with an optional `train:` section
(TrainConfig: the official recipe of spec §4 by default: AdamW β (0.9, 0.95), weight decay 0.05
without decay on 1-D parameters and embeddings of positions and levels, warm-up then linear decay
to 0.1x, gradient clip 2, token-mean cross-entropy). `--out-dir` always holds the latest
model.safetensors + config.json and train_state/ for an exact --resume; TensorBoard logs go to
OUT/tb, every step's loss and token accuracy to OUT/train_log.jsonl, the held-out loss and token
accuracy every `eval_every` steps to OUT/metrics.jsonl, and every `sample_every` steps renders of
sampled objects to OUT/samples/step_N.png.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from datasets.builder import RenderConfig, camera_rig  # noqa: E402
from datasets.errors import DatasetError  # noqa: E402
from datasets.gbuffer import EMPTY_FILES, GBufferDataset  # noqa: E402
from models.ar import ARConfig, Condition, NextScaleAR  # noqa: E402
from models.vqvae import load_vqvae  # noqa: E402
from trainers import distributed  # noqa: E402
from trainers.cli import add_run_args, load_run_config, model_config  # noqa: E402
from trainers.runlog import RunLog  # noqa: E402
from trainers.sampler import IndexedDataset, StepBatches, seeded_generator  # noqa: E402
from trainers.schedule import lr_factor  # noqa: E402
from trainers.state import load_train_state, save_train_state  # noqa: E402
from utils.checkpoint import save_model  # noqa: E402
from utils.cli import run  # noqa: E402
from utils.config import to_dict  # noqa: E402
from utils.media import to_uint8  # noqa: E402

log = logging.getLogger("train_ar")

NO_DECAY = ("pos_1LC", "pos_start", "lvl_embed", "scale_mul")


@dataclass
class TrainConfig:
    """Defaults: the official recipe (spec §4)."""
    batch_size: int = 8              # objects per step over all processes
    grad_accum: int = 1
    max_steps: int = 100_000
    seed: int = 0
    holdout: int = 5                 # last objects of each category kept out; their conditions make the sample renders
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    warmup: float = 0.02             # share of max_steps warming up from 0.005x (official: ep/50)
    hold: float = 0.05               # share of the rest held at the peak, then linear decay
    final_lr: float = 0.1            # ... to this multiple of lr
    grad_clip: float = 2.0
    label_smooth: float = 0.0
    amp: str = "auto"                # auto: bf16 autocast on CUDA, float32 on CPU; or none / bf16
    num_workers: int = 2
    log_every: int = 10
    save_every: int = 500
    eval_every: int = 500            # held-out loss and token accuracy (0: never)
    sample_every: int = 500          # renders of sampled held-out conditions (0: never)
    sample_objects: int = 4
    sample_cfg: float = 4.0
    sample_top_k: int = 900          # the official per-epoch visualisation: top-k 900, top-p 0.95
    sample_top_p: float = 0.95


@dataclass
class ARRunConfig(ARConfig):
    train: TrainConfig = field(default_factory=TrainConfig)


def param_groups(model: NextScaleAR, t: TrainConfig) -> list:
    """Weight decay on matrices only: not on 1-D parameters (biases, gains) nor on the position
    and level embeddings, as the official (plane_embed does get decay there too)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or any(k in name for k in NO_DECAY) else decay).append(p)
    return [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def load_unconditional(data_dir: Path, kind: str) -> Condition | None:
    """The unconditional embedding of an image/text model from the dataset root; None otherwise."""
    if kind not in EMPTY_FILES:
        return None
    seq_file, pooled_file = (data_dir / f for f in EMPTY_FILES[kind])
    missing = [str(f) for f in (seq_file, pooled_file) if not f.is_file()]
    if missing:
        raise DatasetError(missing[0], f"missing unconditional {kind} embedding: run scripts/precompute.py with "
                           f"--{kind}-encoder, or copy the official files/{seq_file.name} and {pooled_file.name} there")
    tokens = torch.from_numpy(np.load(seq_file)).float()
    if kind == "image":
        tokens = tokens[1:]          # the official file keeps the CLS row; the pooled file holds it
    return Condition(pooled=torch.from_numpy(np.load(pooled_file)).float(), tokens=tokens)


def collate(samples: list) -> dict:
    keys = [k for k in ("gt_BL", "x_BLCv", "cond_tokens", "cond_pooled") if k in samples[0]]
    out = {k: torch.stack([s[k] for s in samples]) for k in keys}
    out["labels"] = torch.tensor([s["category"] for s in samples])
    out["pos"] = torch.tensor([s["pos"] for s in samples])
    return out


def batch_condition(cfg: ARConfig, mb: dict, device) -> Condition:
    if cfg.condition in ("image", "text"):
        return Condition(pooled=mb["cond_pooled"].to(device), tokens=mb["cond_tokens"].to(device))
    if cfg.condition == "class":
        return Condition(labels=mb["labels"].to(device))
    return Condition(labels=torch.zeros(len(mb["pos"]), dtype=torch.long, device=device))


@torch.no_grad()
def render_samples(model: NextScaleAR, vqvae, ds: GBufferDataset, cfg: ARRunConfig, uncond, device) -> torch.Tensor:
    """Objects sampled for the first conditions of `ds` (held out, or the training set with no
    holdout), 4 views each, under the same views of their ground-truth tokens decoded:
    (3, 2·objects·R, 4·R), per object a truth row over a sample row."""
    t, rows = cfg.train, []
    cams = torch.from_numpy(camera_rig(RenderConfig(), views=4)).to(device)
    for i in range(min(t.sample_objects, len(ds))):
        mb = collate([{**ds[i], "pos": i}])
        idx = model.sample(vqvae.quantizer, batch_condition(cfg, mb, device), uncond, cfg=t.sample_cfg,
                           top_k=t.sample_top_k, top_p=t.sample_top_p, seed=i)
        truth = sequence_to_scales(mb["gt_BL"].to(device), cfg.patch_nums)
        row = []
        for ids in (truth, idx):
            img = vqvae.render(vqvae.decode_tokens(ids), cams, deterministic=True)["image_raw"]
            row.append(torch.cat(list(((img + 1) / 2).clamp(0, 1)), -1))
        rows.append(torch.cat(row, -2))
    return torch.cat(rows, -2).cpu()


@torch.no_grad()
def evaluate(model: NextScaleAR, ds: GBufferDataset, cfg: ARRunConfig, device, batch_size: int = 16) -> dict:
    """Token-mean cross-entropy and accuracy of teacher forcing on `ds`, eval mode, no condition
    dropout: the held-out curve that tells learning from memorising."""
    model.eval()
    total = {"loss": 0.0, "acc": 0.0}
    for start in range(0, len(ds), batch_size):
        mb = collate([{**ds[i], "pos": i} for i in range(start, min(start + batch_size, len(ds)))])
        logits = model(mb["x_BLCv"].to(device), batch_condition(cfg, mb, device)).float()
        gt = mb["gt_BL"].to(device)
        n = len(mb["pos"]) / len(ds)
        total["loss"] += F.cross_entropy(logits.flatten(0, 1), gt.flatten()).item() * n
        total["acc"] += (logits.argmax(-1) == gt).float().mean().item() * n
    model.train()
    return total


def sequence_to_scales(gt_BL: torch.Tensor, patch_nums) -> list:
    """(B, 3·Σpn²) AR-order ids -> per scale (B·3, pn²), rows 3b+p (the inverse of precompute's
    planes_to_sequence)."""
    out, cur = [], 0
    for pn in patch_nums:
        n = 3 * pn * pn
        out.append(gt_BL[:, cur:cur + n].reshape(-1, pn * pn))
        cur += n
    return out


def train(cfg: ARRunConfig, data_dir: Path, vqvae_dir: Path | None, out_dir: Path, resume: bool,
          stop_at: int | None = None) -> dict:
    """Train to train.max_steps (the learning-rate schedule's length), or stop early at `stop_at`."""
    t = cfg.train
    d = distributed.setup()
    torch.manual_seed(t.seed)
    device = d.device
    autocast = distributed.autocast_factory(t.amp, device)
    condition = cfg.condition if cfg.condition in ("image", "text") else None
    train_ds = GBufferDataset(data_dir, split="train", holdout=t.holdout, mode="tokens", condition=condition)
    uncond = load_unconditional(data_dir, cfg.condition)
    if cfg.condition == "class" and cfg.num_classes != len(train_ds.categories):
        raise ValueError(f"num_classes is {cfg.num_classes} but {data_dir} has {len(train_ds.categories)} categories")
    if t.batch_size % (d.world_size * t.grad_accum):
        raise ValueError(f"train.batch_size {t.batch_size} must split evenly into {d.world_size} process(es) "
                         f"x {t.grad_accum} micro-batch(es)")
    objects_per_rank = t.batch_size // d.world_size

    model = NextScaleAR(cfg).to(device)
    opt = torch.optim.AdamW(param_groups(model, t), lr=t.lr, betas=t.betas)
    step = 0
    if resume:
        step = load_train_state(out_dir, {"model": model}, {"model": opt})["step"]
        log.info("resumed from step %d", step)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if d.enabled else model
    vqvae = None
    val_ds = GBufferDataset(data_dir, split="val", holdout=t.holdout, mode="tokens", condition=condition) \
        if t.holdout > 0 else None
    if d.is_main and t.sample_every > 0 and vqvae_dir is not None:
        vqvae = load_vqvae(vqvae_dir, device)
        if vqvae.quantizer.patch_nums != cfg.patch_nums or vqvae.quantizer.vocab_size != cfg.vocab_size:
            raise ValueError(f"{vqvae_dir}: its quantizer (patch_nums {vqvae.quantizer.patch_nums}, vocabulary "
                             f"{vqvae.quantizer.vocab_size}) does not match the generator config")

    end = t.max_steps if stop_at is None else min(stop_at, t.max_steps)
    sampler = StepBatches(len(train_ds), t.batch_size, t.seed, step, d.rank, d.world_size, max(end - step, 0))
    loader = torch.utils.data.DataLoader(IndexedDataset(train_ds), batch_sampler=sampler, collate_fn=collate,
                                         num_workers=t.num_workers)
    run_log = RunLog(out_dir, d.is_main, "train_ar", step, t.max_steps, t.batch_size, t.log_every)
    model.train()
    for batch in loader:
        for group in opt.param_groups:
            group["lr"] = t.lr * lr_factor(step, t)
        logs = {"loss": 0.0, "acc": 0.0, "acc_last_scale": 0.0}
        per_micro = objects_per_rank // t.grad_accum
        for m in range(t.grad_accum):
            mb = {k: v[m * per_micro:(m + 1) * per_micro] for k, v in batch.items()}
            u = torch.stack([torch.rand(2, generator=seeded_generator(t.seed, step, int(p))) for p in mb["pos"]])
            cond = model.drop_condition(batch_condition(cfg, mb, device), uncond, u)
            gt = mb["gt_BL"].to(device)
            sync = nullcontext() if (not d.enabled or m == t.grad_accum - 1) else ddp.no_sync()
            with sync:
                with autocast():
                    logits = ddp(mb["x_BLCv"].to(device), cond)
                loss = F.cross_entropy(logits.float().flatten(0, 1), gt.flatten(), label_smoothing=t.label_smooth)
                (loss / t.grad_accum).backward()
            with torch.no_grad():
                hit = (logits.argmax(-1) == gt).float()
                last = 3 * cfg.patch_nums[-1] ** 2
                logs["loss"] += loss.item() / t.grad_accum
                logs["acc"] += hit.mean().item() / t.grad_accum
                logs["acc_last_scale"] += hit[:, -last:].mean().item() / t.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        logs = distributed.mean_across(logs, d)
        if not math.isfinite(logs["loss"]):
            raise FloatingPointError(f"step {step}: the loss is {logs['loss']} (lower train.lr, or amp: none)")
        logs.update(grad_norm=float(grad_norm), lr=opt.param_groups[0]["lr"])
        run_log.step(step, logs, {"loss": f"{logs['loss']:.3f}", "acc": f"{logs['acc']:.3f}"})
        if d.is_main:
            if val_ds is not None and t.eval_every > 0 and (step % t.eval_every == 0 or step == end):
                val = evaluate(model, val_ds, cfg, device)
                for k, v in val.items():
                    run_log.writer.add_scalar(f"val/{k}", v, step)
                run_log.metrics(step, {**{f"val_{k}": v for k, v in val.items()}, "train_loss": logs["loss"]},
                            f"step {step}: held-out loss {val['loss']:.3f}, token accuracy {val['acc']:.3f}")
            if vqvae is not None and (step % t.sample_every == 0 or step == end):
                grid = render_samples(model, vqvae, val_ds or train_ds, cfg, uncond, device)
                run_log.writer.add_image("samples/truth_over_sample", grid, step)
                (out_dir / "samples").mkdir(exist_ok=True)
                Image.fromarray(to_uint8(grid)).save(out_dir / "samples" / f"step_{step:07d}.png")
                model.train()
        if step % t.save_every == 0 or step == end:
            if d.is_main:
                save_model(out_dir, model.state_dict(), model_config(cfg), kind="ar")
                save_train_state(out_dir, step, {"model": model.state_dict()}, {"model": opt},
                                 {"config": to_dict(cfg)})
            distributed.barrier(d)
    run_log.close()
    distributed.teardown()
    return {"history": run_log.history, "step": step}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, type=Path, help="generator config with an optional train: section")
    ap.add_argument("--data-dir", required=True, type=Path, help="G-buffer dataset root with precomputed tokens")
    ap.add_argument("--vqvae", type=Path, help="the VQVAE that made the tokens (for the sample renders)")
    add_run_args(ap, "train.lr=3e-4 or depth=4")
    args = ap.parse_args(argv)
    cfg = load_run_config(ARRunConfig, args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    train(cfg, args.data_dir, args.vqvae, args.out_dir, args.resume, args.stop_at)
    return 0


if __name__ == "__main__":
    run(main)
