"""The command line the trainers share: output folder, step and batch overrides, --set, and the
checks that keep --resume exact (same model config) and a finished run from being overwritten."""
from __future__ import annotations

from pathlib import Path

from trainers.state import holds_state
from utils.config import load_config, to_dict
from utils.lock import FolderLock


def model_config(cfg) -> dict:
    """The model part of a run config (everything but its `train:` section and the tokenizer
    `kind`): what config.json and the checkpoint metadata hold."""
    return {k: v for k, v in to_dict(cfg).items() if k not in ("train", "kind")}


def add_run_args(ap, set_example: str) -> None:
    ap.add_argument("--out-dir", required=True, type=Path,
                    help="the run's folder: weights, train_state/, logs; one run at a time (OUT/.lock)")
    ap.add_argument("--max-steps", type=int, help="train until this step (default: train.max_steps)")
    ap.add_argument("--batch-size", type=int, help="objects per step, all processes (default: train.batch_size)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/train_state")
    ap.add_argument("--stop-at", type=int, help="save and stop at this step; the schedule still spans max-steps, "
                    "so a --resume continues the same run (for time-limited jobs; default: run to the end)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help=f"config override, e.g. {set_example}")


def _check_counts(cfg) -> None:
    """Step and batch counts must be positive (a run of 0 steps would end without a model)."""
    for key in ("max_steps", "batch_size", "grad_accum", "log_every"):
        value = getattr(cfg.train, key)
        if value < 1:
            raise ValueError(f"train.{key} must be at least 1, got {value}")


def load_run_config(cls, args):
    """The run config of `args.config` with the command line's overrides. Without --resume, OUT
    must not hold a run (with it, trainers.loop checks that the model config is the same); a
    folder another job is training in is refused at once, naming that job. The config file is
    kept on the config as `run_source` (not a field: never saved) for the start banner."""
    for flag, value in (("--max-steps", args.max_steps), ("--batch-size", args.batch_size),
                        ("--stop-at", args.stop_at)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    overrides = list(args.set)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.batch_size is not None:
        overrides.append(f"train.batch_size={args.batch_size}")
    cfg = load_config(cls, args.config, overrides)
    _check_counts(cfg)
    FolderLock(args.out_dir).check()
    if not args.resume and holds_state(args.out_dir):   # also a save cut short: train_state.tmp/.old
        raise ValueError(f"{args.out_dir} already holds a run: pass --resume to continue it, or another --out-dir")
    cfg.run_source = args.config
    return cfg
