"""The 3D captioner's trainer (SAR3D-LLM, models/captioner.py): train_caption.py is its command line.

Data: a G-buffer dataset whose objects hold their precomputed token ids (scripts/precompute.py)
and caption_3dtopia.txt, the answer. The VQVAE that wrote the ids (--vqvae) lends its codebook,
and is checked against the config and against the dataset's tokenizer.json.

The recipe (spec §6): stage 1 trains the projector and the point-token rows, the LLM frozen
(lr 2e-3); stage 2 trains everything (lr 2e-5), starting from stage 1's weights
(train.init_from). AdamW without weight decay, 3% warm-up. `train.id_noise` replaces a fraction of
each training object's ids by random ones (a regulariser for small datasets; 0 in the recipe). The official schedule is a cosine;
the shared loop's (trainers/schedule.py) decays linearly, to final_lr. Every `eval_every` steps:
the held-out loss and, for the first `eval_captions` held-out objects, greedy captions scored
against theirs (BLEU-4, ROUGE-L, CIDEr-D; shape family and colour for procedural captions), in
OUT/metrics.jsonl. `train.parallel: fsdp` shards the LLM block by block (FSDP2; then no captions
are generated during training: the held-out loss only), `train.checkpointing` recomputes each
block in the backward pass.

Weights: OUT/model.safetensors holds what the stage trains (models.captioner.trained_state), and
so does OUT/train_state (unsharded): in stage 1 not the frozen LLM.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch

from datasets.gbuffer import GBufferDataset
from datasets.precompute import as_generator_side, read_tokenizer_record
from evaluation.captions import caption_scores
from models.captioner import Captioner, CaptionerConfig, load_trained, trained_state
from models.layout import check_pair, seq_len, tokenizer_signature
from models.vqvae import load_vqvae
from trainers.cli import model_config
from trainers.loop import LoopConfig, Trainer, due
from trainers.sampler import seeded_generator
from utils.checkpoint import CheckpointError, load_model, save_model

log = logging.getLogger("trainers")

STAGE_LR = {1: 2e-3, 2: 2e-5}
SHARD_BYTES = 4 << 30            # model.safetensors in 4 GB shards after stage 2 of a 7B model


@dataclass
class TrainConfig(LoopConfig):
    stage: int = 1                   # 1: projector and point rows; 2: everything
    lr: float | None = None          # None: the spec's for the stage (STAGE_LR)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup: float = 0.03
    hold: float = 0.0
    final_lr: float = 0.0
    holdout: int = 5                 # last objects of each category kept out of training, for evaluation
    eval_captions: int = 8           # held-out objects captioned at each evaluation (0: none)
    init_from: str = ""              # a captioner checkpoint (stage 1's) whose weights start this run
    checkpointing: bool = False      # recompute each LLM block in the backward pass
    id_noise: float = 0.0            # fraction of each training object's ids replaced by random ones


@dataclass
class CaptionRunConfig(CaptionerConfig):
    kind: Literal["caption"] = "caption"
    train: TrainConfig = field(default_factory=TrainConfig)


def noisy_ids(ids: torch.Tensor, pos: torch.Tensor, fraction: float, vocab_size: int, seed: int, step: int):
    """`ids` (B, L) with about `fraction` of each row replaced by random ids, drawn from
    (seed, step, sample position) alone: a resumed run, or N processes, draw the same."""
    out = ids.clone()
    for row, p in enumerate(pos.tolist()):
        g = seeded_generator(seed, step, p)
        hit = torch.rand(ids.shape[1], generator=g) < fraction
        out[row, hit] = torch.randint(vocab_size, (int(hit.sum()),), generator=g).to(ids.dtype)
    return out


def collate(samples: list) -> dict:
    return {"ids": torch.stack([s["gt_BL"] for s in samples]), "captions": [s["caption"] for s in samples],
            "pos": torch.tensor([s["pos"] for s in samples])}


class TrainedPart:
    """The model as the training state sees it: the tensors the stage trains, tied ones once (in
    stage 1 the frozen LLM is the base folder's, reloaded with the model)."""

    def __init__(self, model: Captioner, stage: int):
        self.model, self.stage = model, stage

    def state_dict(self) -> dict:
        return trained_state(self.model.state_dict(), self.stage)

    def load_state_dict(self, state: dict) -> None:
        load_trained(self.model, state, "the training state")


@torch.no_grad()
def held_out_loss(model: Captioner, ds, device, autocast, batch_size: int = 8) -> float:
    """The mean per-caption loss over `ds`, in eval mode."""
    model.eval()
    total = 0.0
    for start in range(0, len(ds), batch_size):
        mb = collate([{**ds[i], "pos": i} for i in range(start, min(start + batch_size, len(ds)))])
        with autocast():
            total += model(mb["ids"].to(device), mb["captions"]).item() * len(mb["captions"])
    model.train()
    return total / len(ds)


class CaptionTrainer(Trainer):
    name = "train_caption"
    collective_eval = True              # under FSDP every process takes part in the held-out forward

    def __init__(self, cfg: CaptionRunConfig, data_dir, vqvae_dir, out_dir):
        super().__init__(cfg, out_dir)
        t = cfg.train
        if t.stage not in (1, 2):
            raise ValueError(f"train.stage must be 1 (projector) or 2 (everything), got {t.stage}")
        self.train_ds = GBufferDataset(data_dir, split="train", holdout=t.holdout, mode="tokens")
        self.val_ds = GBufferDataset(data_dir, split="val", holdout=t.holdout, mode="tokens") if t.holdout else None
        self.collate = collate
        vqvae = load_vqvae(vqvae_dir)                    # only its codebook is kept
        signature = tokenizer_signature(vqvae.quantizer)
        check_pair(signature, vars(cfg), f"--vqvae {vqvae_dir}", "--config's captioner",
                   "set vocab_size / c_vae / patch_nums to the VQVAE's (--set patch_nums=[...])")
        record = read_tokenizer_record(data_dir)
        if record is not None:
            check_pair(signature, as_generator_side(record), f"--vqvae {vqvae_dir}", f"the tokens in {data_dir}",
                       "pass the VQVAE that wrote them (tokenizer.json names it), or rerun scripts/precompute.py")
        length = len(self.train_ds[0]["gt_BL"])
        if length != seq_len(cfg.patch_nums):
            raise ValueError(f"the tokens in {data_dir} hold {length} ids per object, --vqvae {vqvae_dir} makes "
                             f"{seq_len(cfg.patch_nums)}: rerun scripts/precompute.py with it")
        cfg.tokenizer = signature["fingerprint"]
        model = Captioner(cfg)
        model.set_codebook(vqvae.quantizer.embedding.weight)
        del vqvae
        if t.init_from:
            state, saved, _ = load_model(t.init_from, "captioner")
            if saved.get("tokenizer") not in ("", cfg.tokenizer):
                raise CheckpointError(f"train.init_from {t.init_from}: trained on another VQVAE's tokens than "
                                      f"--vqvae {vqvae_dir}")
            load_trained(model, state, t.init_from)
        model.freeze_llm(t.stage)
        if t.checkpointing:                 # transformers 5.x: activation_checkpointing_enable (the old name warns)
            enable = getattr(model.llm, "activation_checkpointing_enable", None)
            if enable is not None:
                enable({"use_reentrant": False})
            else:
                model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.to(self.device)
        self.forward = self.wrap(model, model.decoder_layers())
        self.model = model
        lr = t.lr if t.lr is not None else STAGE_LR[t.stage]
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                           betas=t.betas, weight_decay=t.weight_decay)
        self.peak_lrs = [lr]

    def train_step(self, mb: dict, step: int, scale: float) -> dict:
        ids = mb["ids"]
        if self.t.id_noise:
            ids = noisy_ids(ids, mb["pos"], self.t.id_noise, self.cfg.vocab_size, self.t.seed, step)
        with self.autocast():
            loss = self.forward(ids.to(self.device), mb["captions"])
        (loss * scale).backward()
        return {"loss": loss.item()}

    def evaluate(self, step: int, last: bool, run_log) -> None:
        if self.val_ds is None or not due(step, self.t.eval_every, last):
            return
        values = {"val_loss": held_out_loss(self.model, self.val_ds, self.device, self.autocast)}
        n = min(self.t.eval_captions, len(self.val_ds))
        if n and not self.sharded:                      # generation needs the whole model
            samples = [self.val_ds[i] for i in range(n)]
            with self.autocast():
                texts = self.model.generate(torch.stack([s["gt_BL"] for s in samples]).to(self.device))
            values.update(caption_scores(texts, [[s["caption"]] for s in samples]))
            values["examples"] = [{"caption": c, "reference": s["caption"]} for c, s in zip(texts[:4], samples)]
        if self.d.is_main:
            for k, v in values.items():
                if isinstance(v, float):
                    run_log.writer.add_scalar(f"val/{k}", v, step)
            run_log.metrics(step, {**values, "train_loss": run_log.history[-1]["loss"]},
                            f"step {step}: held-out loss {values['val_loss']:.3f}"
                            + (f", BLEU-4 {values['bleu4']:.3f}" if "bleu4" in values else ""))

    def stateful(self) -> tuple[dict, dict, dict]:
        if not self.sharded:
            return {"model": TrainedPart(self.model, self.t.stage)}, {"model": self.optimizer}, {}
        return super().stateful()

    def save_weights(self, states: dict) -> None:
        save_model(self.out_dir, trained_state(states["model"], self.t.stage), model_config(self.cfg),
                   kind="captioner", shard_bytes=SHARD_BYTES)
