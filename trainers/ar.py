"""The next-scale generator trainer (stage 2) on precomputed tokens: train_ar.py is its command line.

The data directory holds, per object, the files of scripts/precompute.py (token ids,
teacher-forcing input and, for image/text models, the condition embeddings), and at its root the
unconditional embeddings under the official names (empty_text_embedding.npy and
empty_text_pooler_output.npy, or empty_dino_embedding.npy and empty_dino_pooler_output.npy) and,
when precompute.py wrote the tokens, tokenizer.json: the generator records that VQVAE's
fingerprint (ARConfig.tokenizer) so that sampling refuses it with another VQVAE. A class model
uses the dataset's categories as classes. The recipe (TrainConfig) is the official one: AdamW β
(0.9, 0.95), weight decay 0.05 without decay on 1-D parameters and the position and level
embeddings, warm-up then linear decay to 0.1x, gradient clip 2, token-mean cross-entropy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from datasets.builder import RenderConfig, camera_rig
from datasets.errors import DatasetError
from datasets.gbuffer import EMPTY_FILES, GBufferDataset
from datasets.precompute import as_generator_side, read_tokenizer_record
from models.ar import ARConfig, Condition, NextScaleAR
from models.layout import check_pair, sequence_to_planes, tokenizer_signature
from models.vqvae import load_vqvae
from trainers.cli import model_config
from trainers.loop import LoopConfig, Trainer, due
from trainers.sampler import seeded_generator
from utils.checkpoint import save_model
from utils.media import to_uint8

NO_DECAY = ("pos_1LC", "pos_start", "lvl_embed", "scale_mul")


@dataclass
class TrainConfig(LoopConfig):
    """Defaults: the official recipe. The held-out objects' conditions make the sample renders."""
    holdout: int = 5                 # last objects of each category kept out of training, for evaluation
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    warmup: float = 0.02             # share of max_steps warming up from 0.005x (official: ep/50)
    hold: float = 0.05               # share of the rest held at the peak, then linear decay
    final_lr: float = 0.1            # ... to this multiple of lr
    grad_clip: float = 2.0
    label_smooth: float = 0.0
    sample_every: int = 500          # renders of sampled held-out conditions (0: never)
    sample_objects: int = 4
    sample_guidance: float = 4.0
    sample_top_k: int = 900          # the official per-epoch visualisation: top-k 900, top-p 0.95
    sample_top_p: float = 0.95
    condition_variants: bool = False  # each step conditions on one variant per object, drawn from (seed, step,
                                      # object): text, a caption of caption_variants.json; image, any view
                                      # (precompute's text_variants / image_variants files)


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
                           f"--{kind}-encoder ENCODER, the encoder the generator config names "
                           f"({'mobilenet_v2' if kind == 'image' else 'minilm'} for the demo configs; the flag alone "
                           "is the official encoder, from the hub or a local folder), or copy the official "
                           f"files/{seq_file.name} and {pooled_file.name} there")
    tokens = torch.from_numpy(np.load(seq_file)).float()
    if kind == "image":
        tokens = tokens[1:]          # the official file keeps the CLS row; the pooled file holds it
    return Condition(pooled=torch.from_numpy(np.load(pooled_file)).float(), tokens=tokens)


def collate(samples: list) -> dict:
    """A batch; the condition variants of each object stay a list (objects may have different
    numbers), and their first is the batch's condition until a training step picks one."""
    if "cond_pooled_variants" in samples[0]:
        samples = [{**s, "cond_tokens": s["cond_tokens_variants"][0], "cond_pooled": s["cond_pooled_variants"][0]}
                   for s in samples]
    keys = [k for k in ("gt_BL", "x_BLCv", "cond_tokens", "cond_pooled") if k in samples[0]]
    out = {k: torch.stack([s[k] for s in samples]) for k in keys}
    for k in ("cond_tokens_variants", "cond_pooled_variants"):
        if k in samples[0]:
            out[k] = [s[k] for s in samples]
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
        idx = model.sample(vqvae.quantizer, batch_condition(cfg, mb, device), uncond, guidance=t.sample_guidance,
                           top_k=t.sample_top_k, top_p=t.sample_top_p, seed=i)
        truth = sequence_to_planes(mb["gt_BL"].to(device), cfg.patch_nums)
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


class ARTrainer(Trainer):
    name = "train_ar"
    postfix = ("loss", "acc")

    def __init__(self, cfg: ARRunConfig, data_dir, vqvae_dir=None, out_dir=None):
        super().__init__(cfg, out_dir)
        t, data_dir = cfg.train, Path(data_dir)
        condition = cfg.condition if cfg.condition in ("image", "text") else None
        if t.condition_variants and condition is None:
            raise ValueError(f"train.condition_variants is for text and image generators, not {cfg.condition}-guided")
        self.train_ds = GBufferDataset(data_dir, split="train", holdout=t.holdout, mode="tokens",
                                       condition=f"{condition}_variants" if t.condition_variants else condition)
        self.val_ds = GBufferDataset(data_dir, split="val", holdout=t.holdout, mode="tokens", condition=condition) \
            if t.holdout > 0 else None
        self.collate = collate
        if cfg.condition == "class" and cfg.num_classes != len(self.train_ds.categories):
            raise ValueError(f"num_classes is {cfg.num_classes} but {data_dir} has {len(self.train_ds.categories)} "
                             "categories")
        record = read_tokenizer_record(data_dir)
        if record is not None:
            check_pair(record, vars(cfg), f"the tokens in {data_dir}", "--config's generator",
                       "use a generator config made for that VQVAE (configs/ar/demo_*.yaml for the demo's), "
                       "or --set patch_nums / vocab_size / c_vae")
            cfg.tokenizer = record["fingerprint"]
        self.uncond = load_unconditional(data_dir, cfg.condition)
        self.model = NextScaleAR(cfg).to(self.device)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, t), lr=t.lr, betas=t.betas)
        self.peak_lrs = [t.lr] * len(self.optimizer.param_groups)
        self.forward = self.wrap(self.model)
        self.vqvae = None                       # for the sample renders
        if self.d.is_main and t.sample_every > 0 and vqvae_dir is not None:
            self.vqvae = load_vqvae(vqvae_dir, self.device)
            check_pair(tokenizer_signature(self.vqvae.quantizer), vars(cfg), f"--vqvae {vqvae_dir}",
                       f"the generator trained on the tokens in {data_dir}")

    def train_step(self, mb: dict, step: int, scale: float) -> dict:
        cfg, device = self.cfg, self.device
        gens = [seeded_generator(self.t.seed, step, int(p)) for p in mb["pos"]]
        u = torch.stack([torch.rand(2, generator=g) for g in gens])
        if "cond_pooled_variants" in mb:           # one variant of each object's condition, the same after a resume
            pick = [int(torch.randint(len(v), (), generator=g)) for v, g in zip(mb["cond_pooled_variants"], gens)]
            mb = {**mb, **{k: torch.stack([v[i] for v, i in zip(mb[f"{k}_variants"], pick)])
                           for k in ("cond_tokens", "cond_pooled")}}
        cond = self.model.drop_condition(batch_condition(cfg, mb, device), self.uncond, u)
        gt = mb["gt_BL"].to(device)
        with self.autocast():
            logits = self.forward(mb["x_BLCv"].to(device), cond)
        loss = F.cross_entropy(logits.float().flatten(0, 1), gt.flatten(), label_smoothing=self.t.label_smooth)
        (loss * scale).backward()
        with torch.no_grad():
            hit = (logits.argmax(-1) == gt).float()
            last = 3 * cfg.patch_nums[-1] ** 2
        return {"loss": loss.item(), "acc": hit.mean().item(), "acc_last_scale": hit[:, -last:].mean().item()}

    def evaluate(self, step: int, last: bool, run_log) -> None:
        if self.val_ds is not None and due(step, self.t.eval_every, last):
            val = evaluate(self.model, self.val_ds, self.cfg, self.device)
            for k, v in val.items():
                run_log.writer.add_scalar(f"val/{k}", v, step)
            run_log.metrics(step, {**{f"val_{k}": v for k, v in val.items()}, "train_loss": run_log.history[-1]["loss"]},
                            f"step {step}: held-out loss {val['loss']:.3f}, token accuracy {val['acc']:.3f}")
        if self.vqvae is not None and due(step, self.t.sample_every, last):
            grid = render_samples(self.model, self.vqvae, self.val_ds or self.train_ds, self.cfg, self.uncond,
                                  self.device)
            run_log.writer.add_image("samples/truth_over_sample", grid, step)
            (self.out_dir / "samples").mkdir(exist_ok=True)
            Image.fromarray(to_uint8(grid)).save(self.out_dir / "samples" / f"step_{step:07d}.png")
            self.model.train()

    def save_weights(self, states: dict) -> None:
        save_model(self.out_dir, states["model"], model_config(self.cfg), kind="ar")
