"""The training loop every trainer shares. A trainer (a `Trainer` subclass) builds its models and
says what one micro-batch does; `fit` does the rest, the same way for all of them:

    for each step:  learning rate from the schedule -> micro-batches (forward and backward in
                    train_step, DDP gradient sync on the last only) -> gradient clip ->
                    optimizer step -> after_step (EMA, discriminator) -> average the logs over
                    processes -> stop on a non-finite loss -> log -> evaluate -> save

Resuming (`--resume`) restores every stateful part the trainer lists, the optimizers and the RNG
from OUT/train_state, and the data order follows from (seed, step) (trainers/sampler.py), so a
resumed run continues exactly where a straight one would be; the logs are cut back to the
resumed step (trainers/runlog.py), so they too are a straight run's.

One run per folder: the main process holds OUT/.lock (utils/lock.py) from before the resume to
the end, released on any exit. It prints a start banner (config, model, data, batch and steps,
device and precision, folder) and an end summary (steps, time, final loss, weights). SIGINT or
SIGTERM stop the run cleanly: the step under way finishes, the state is saved, and the process
exits with "interrupted at step N; resume with --resume" and status 128 + the signal's number
(130 for SIGINT, 143 for SIGTERM); a second signal aborts at once (KeyboardInterrupt; the last
periodic save still resumes). With several processes the flag travels with the step's logs, so
that all of them stop after the same step.
"""
from __future__ import annotations

import logging
import math
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from trainers import distributed
from trainers.cli import model_config
from trainers.runlog import RunLog
from trainers.sampler import IndexedDataset, StepBatches
from trainers.schedule import lr_factor
from trainers.state import load_train_state, save_train_state
from utils.config import from_dict, to_dict
from utils.lock import FolderLock

log = logging.getLogger("trainers")


@dataclass
class LoopConfig:
    """The `train:` keys every trainer has (each trainer's TrainConfig extends it)."""
    batch_size: int = 8              # objects per optimizer step over all processes
    grad_accum: int = 1              # micro-batches per step and process
    max_steps: int = 100_000         # the learning-rate schedule's length
    seed: int = 0
    warmup: float = 0.0              # trainers.schedule.lr_factor: share of max_steps warming up,
    hold: float = 1.0                # share of the rest held at the peak, then linear decay
    final_lr: float = 1.0            # ... to this multiple of each group's peak rate
    grad_clip: float = 1.0
    parallel: str = "ddp"            # several processes: ddp (replicas) or fsdp (sharded parameters,
                                     # gradients and optimizer states; trainers that support it)
    amp: str = "auto"                # auto: bf16 autocast on CUDA and on CPUs with bf16 instructions; none; bf16
    num_workers: int = 2
    log_every: int = 10
    eval_every: int = 500            # 0: never
    save_every: int = 500


def due(step: int, every: int, last: bool) -> bool:
    """A periodic job's turn: every `every` steps (0: never) and at the last step."""
    return every > 0 and (step % every == 0 or last)


class Trainer:
    """One training job. Subclasses set, in __init__ after `super().__init__`: `model` (clipped
    and saved), `forward` (the module whose forward runs under DDP; the model itself with one
    process), `optimizer`, `peak_lrs` (one per parameter group), `train_ds` and `collate`; and
    define `train_step`, and optionally `after_step`, `evaluate`, `tensorboard`, `save_weights`
    and `stateful`."""

    name = "train"
    postfix = ("loss",)              # logs shown on the progress bar
    collective_eval = False          # evaluate() runs on every process (a sharded model's forward needs all)
    sharded = False                  # set by wrap() under FSDP

    def __init__(self, cfg, out_dir):
        self.cfg, self.t, self.out_dir = cfg, cfg.train, Path(out_dir)
        self.d = distributed.setup()
        torch.manual_seed(self.t.seed)
        self.device = self.d.device
        self.autocast = distributed.autocast_factory(self.t.amp, self.device)
        if self.t.batch_size % (self.d.world_size * self.t.grad_accum):
            raise ValueError(f"train.batch_size {self.t.batch_size} must split evenly into {self.d.world_size} "
                             f"process(es) x {self.t.grad_accum} micro-batch(es)")
        self.objects_per_rank = self.t.batch_size // self.d.world_size

    def wrap(self, module: torch.nn.Module, units=None) -> torch.nn.Module:
        """`module` under DDP when there are several processes; with train.parallel fsdp (for a
        trainer that passes its `units`, the blocks to shard one by one) sharded in place by
        FSDP2, before the optimizer is built. Returns the module whose forward trains."""
        if self.t.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"train.parallel must be ddp or fsdp, got {self.t.parallel!r}")
        if self.t.parallel == "fsdp" and units is None:
            raise ValueError(f"train.parallel fsdp: {self.name} shards no model; use ddp")
        if not self.d.enabled:
            return module
        if self.t.parallel == "fsdp":
            self.sharded = True
            distributed.shard(module, units, distributed.precision(self.t.amp, self.device))
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)

    # ---- what a trainer defines ------------------------------------------------------------
    def train_step(self, mb: dict, step: int, scale: float) -> dict:
        """Forward and backward of one micro-batch, the loss multiplied by `scale` before
        backward. Returns its logs (floats), averaged over micro-batches by the loop."""
        raise NotImplementedError

    def after_step(self, step: int) -> dict:
        """After the optimizer step (EMA, other optimizers); returns more logs."""
        return {}

    def evaluate(self, step: int, last: bool, run_log: RunLog) -> None:
        """Main process, after every step: held-out metrics and samples when they are due."""

    def tensorboard(self, step: int, writer) -> None:
        """Extra TensorBoard scalars, on the steps whose logs go there."""

    def save_weights(self, states: dict) -> None:
        """The weights other tools read (OUT/model.safetensors + config.json), from `states`,
        the state dicts of the modules of `stateful` (whole, also under FSDP)."""
        raise NotImplementedError

    def stateful(self) -> tuple[dict, dict, dict]:
        """({part: object with state_dict/load_state_dict}, {part: optimizer}, {JSON-able extras})
        for OUT/train_state."""
        if self.sharded:
            return ({"model": distributed.WholeModel(self.model)},
                    {"model": distributed.WholeOptimizer(self.model, self.optimizer)}, {})
        return {"model": self.model}, {"model": self.optimizer}, {}

    def restore(self, meta: dict) -> None:
        """Restore the extras of `stateful` from a resumed state."""

    # ---- the shared parts -----------------------------------------------------------------
    def resume(self) -> int:
        """Load OUT/train_state into the stateful parts; returns its step."""
        modules, optimizers, _ = self.stateful()
        meta = load_train_state(self.out_dir, modules, optimizers)
        if "config" not in meta:
            raise ValueError(f"--resume: the training state in {self.out_dir} does not say which model it trained")
        saved = model_config(from_dict(type(self.cfg), meta["config"]))
        if saved != model_config(self.cfg):
            raise ValueError(f"--resume: the model config differs from the one {self.out_dir} was trained with")
        self.restore(meta)
        return meta["step"]

    def save(self, step: int) -> None:
        modules, optimizers, extra = self.stateful()
        states = {k: m.state_dict() for k, m in modules.items()}        # every process: FSDP gathers here
        opt_states = {k: o.state_dict() for k, o in optimizers.items()}
        if self.d.is_main:
            self.save_weights(states)
            save_train_state(self.out_dir, step, states, opt_states, {**extra, "config": to_dict(self.cfg)})
        distributed.barrier(self.d)


class StopSignals:
    """While active (main thread only), SIGINT and SIGTERM set `signum` instead of stopping the
    process; the loop stops after the step under way. A second signal raises KeyboardInterrupt."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


def _quiet_worker(_):
    """DataLoader workers leave SIGINT/SIGTERM to the main process: a Ctrl-C reaches the whole
    process group, and a worker that died of it would break the clean stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _banner(trainer: Trainer, start: int, end: int) -> None:
    t, d = trainer.t, trainer.d
    params = sum(p.numel() for p in trainer.model.parameters())
    trained = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    source = getattr(trainer.cfg, "run_source", None) or "(defaults)"
    precision = distributed.precision(t.amp, trainer.device)
    log.info("%s: config %s; model %.2fM parameters (%.2fM trained)", trainer.name, source, params / 1e6,
             trained / 1e6)
    held_out = len(getattr(trainer, "val_ds", None) or ())
    log.info("  data: %d training objects, %d held out; batch %d (%d process(es) x %d micro-batch(es)); "
             "steps %d -> %d of %d", len(trainer.train_ds), held_out, t.batch_size, d.world_size, t.grad_accum,
             start, end, t.max_steps)
    why = " (train.amp auto: this CPU has no bf16 instructions)" if (
        t.amp == "auto" and trainer.device.type == "cpu" and precision == "float32") else ""
    log.info("  %s, %s%s; output %s%s", trainer.device, "bf16 autocast" if precision == "bf16" else "float32", why,
             trainer.out_dir, f"; resumed from step {start}" if start else "")


def _summary(trainer: Trainer, start: int, step: int, seconds: float, history: list) -> None:
    out = trainer.out_dir
    weights = [str(p) for p in (out / "model.safetensors", *sorted(out.glob("*/model.safetensors"))) if p.is_file()]
    loss = f", final loss {history[-1]['loss']:.4f}" if history else ""
    more = "" if step >= trainer.t.max_steps else f" (of {trainer.t.max_steps}: continue with --resume)"
    log.info("%s: %d step(s) in %.1f s, now at step %d%s%s; weights: %s", trainer.name, step - start, seconds, step,
             more, loss, ", ".join(weights) or "none")


def _step(trainer: Trainer, batch: dict, step: int) -> tuple[dict, float, float]:
    """One optimizer step from the batch of `step`: (logs, gradient norm, learning-rate factor)."""
    t, d, opt = trainer.t, trainer.d, trainer.optimizer
    factor = lr_factor(step, t)
    for group, peak in zip(opt.param_groups, trainer.peak_lrs):
        group["lr"] = peak * factor
    per_micro = trainer.objects_per_rank // t.grad_accum
    logs: dict = {}
    for m in range(t.grad_accum):
        mb = {k: v[m * per_micro:(m + 1) * per_micro] for k, v in batch.items()}
        last_micro = m == t.grad_accum - 1
        sync = not d.enabled or last_micro or trainer.sharded        # FSDP reduces every micro-batch
        with nullcontext() if sync else trainer.forward.no_sync():
            for k, v in trainer.train_step(mb, step, 1 / t.grad_accum).items():
                logs[k] = logs.get(k, 0.0) + v / t.grad_accum
    grad_norm = torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), t.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    logs.update(trainer.after_step(step))
    return logs, float(grad_norm), factor


def fit(trainer: Trainer, resume: bool, stop_at: int | None = None) -> dict:
    """Train to train.max_steps, or stop early at `stop_at` (saving there; the schedule still
    spans max_steps, so a --resume continues the same run), holding OUT's lock throughout.
    Returns {history, step}; raises SystemExit(128 + signal) when stopped by SIGINT/SIGTERM."""
    lock = FolderLock(trainer.out_dir, trainer.name) if trainer.d.is_main else nullcontext()
    with lock, StopSignals() as stop:
        return _train(trainer, resume, stop_at, stop)


def _train(trainer: Trainer, resume: bool, stop_at: int | None, stop: StopSignals) -> dict:
    t, d, opt = trainer.t, trainer.d, trainer.optimizer
    step = start = trainer.resume() if resume else 0
    end = t.max_steps if stop_at is None else min(stop_at, t.max_steps)
    sampler = StepBatches(len(trainer.train_ds), t.batch_size, t.seed, step, d.rank, d.world_size,
                          max(end - step, 0))
    loader = torch.utils.data.DataLoader(IndexedDataset(trainer.train_ds), batch_sampler=sampler,
                                         collate_fn=trainer.collate, num_workers=t.num_workers,
                                         worker_init_fn=_quiet_worker if t.num_workers else None)
    if d.is_main:                                            # before the progress bar starts
        _banner(trainer, start, end)
    run_log = RunLog(trainer.out_dir, d.is_main, trainer.name, step, t.max_steps, t.batch_size, t.log_every)
    t0, stopping = time.time(), False
    trainer.model.train()
    rng = torch.get_rng_state()          # starting the loader draws its workers' seed: keep the stream of
    batches = iter(loader)               # the dropout draws where a straight run has it, for an exact resume
    torch.set_rng_state(rng)
    for batch in batches:
        logs, grad_norm, factor = _step(trainer, batch, step)
        step += 1
        logs["_stop"] = float(stop.signum is not None)       # averaged with the logs: > 0 if any process got one
        logs = distributed.mean_across(logs, d)
        stopping = logs.pop("_stop") > 0 and step < end
        if not math.isfinite(logs["loss"]):
            raise FloatingPointError(f"step {step}: the loss is {logs['loss']} (lower the learning rate, or amp: none)")
        logs.update(grad_norm=grad_norm, lr=opt.param_groups[0]["lr"], lr_factor=factor)
        if run_log.step(step, logs, {k: f"{logs[k]:.4f}" for k in trainer.postfix}):
            trainer.tensorboard(step, run_log.writer)
        if d.is_main or (trainer.collective_eval and trainer.sharded):
            trainer.evaluate(step, step == end, run_log)
        if due(step, t.save_every, step == end) or stopping:
            trainer.save(step)
        if stopping:
            break
    run_log.close()
    distributed.teardown()
    if stopping:
        if d.is_main:
            print(f"interrupted at step {step}; resume with --resume", file=sys.stderr)
        raise SystemExit(128 + (stop.signum or signal.SIGTERM))
    if d.is_main:
        _summary(trainer, start, step, time.time() - t0, run_log.history)
    return {"history": run_log.history, "step": step}
