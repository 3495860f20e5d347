"""The command line the trainers share: output folder, step and batch overrides, --set, and the
checks that keep --resume exact (same model config) and a finished run from being overwritten."""
from __future__ import annotations

import json
from pathlib import Path

from utils.config import from_dict, load_config, to_dict


def model_config(cfg) -> dict:
    """The model part of a run config (everything but its `train:` section): what config.json
    and the checkpoint metadata hold."""
    return {k: v for k, v in to_dict(cfg).items() if k != "train"}


def add_run_args(ap, set_example: str) -> None:
    ap.add_argument("--out-dir", required=True, type=Path)
    ap.add_argument("--max-steps", type=int, help="train until this step (overrides train.max_steps)")
    ap.add_argument("--batch-size", type=int, help="objects per step, all processes (overrides train.batch_size)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/train_state")
    ap.add_argument("--stop-at", type=int, help="save and stop at this step; the schedule still spans max-steps, "
                    "so a --resume continues the same run (for time-limited jobs)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help=f"config override, e.g. {set_example}")


def load_run_config(cls, args):
    """The run config of `args.config` with the command line's overrides. With --resume the model
    part must equal the one the run was started with; without it OUT must not hold a run."""
    overrides = list(args.set)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.batch_size is not None:
        overrides.append(f"train.batch_size={args.batch_size}")
    cfg = load_config(cls, args.config, overrides)
    if args.resume:
        saved = args.out_dir / "train_state" / "state.json"
        if saved.is_file() and model_config(from_dict(cls, json.loads(saved.read_text())["config"])) \
                != model_config(cfg):
            raise ValueError(f"--resume: the model config differs from the one {args.out_dir} was trained with")
    elif (args.out_dir / "train_state").exists():
        raise ValueError(f"{args.out_dir} already holds a run: pass --resume to continue it, or another --out-dir")
    return cfg
