"""What a trainer needs to stop and resume exactly: EMA weights, optimizer states, the step,
the RNG state; written as safetensors + JSON (nothing is pickled).

Layout of `<out>/train_state/`:
  tensors.safetensors   "<part>/<name>" for every tensor (model, ema, disc, optimizer states, rng)
  state.json            step, optimizer param groups and scalar states, the run config
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from utils.checkpoint import CheckpointError


class EMA:
    """Exponential moving average of a model's floating-point parameters and buffers; other
    buffers (counters, usage statistics) are copied."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].lerp_(v.detach(), 1.0 - self.decay)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict:
        return self.shadow

    def load_state_dict(self, state: dict) -> None:
        for k in self.shadow:
            self.shadow[k].copy_(state[k])


def _flatten_optimizer(opt: torch.optim.Optimizer, prefix: str):
    """Optimizer state -> ({name: tensor}, JSON-able rest)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{prefix}/{pid}/{name}"] = v
            else:
                scalars[f"{pid}/{name}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(opt: torch.optim.Optimizer, tensors: dict, meta: dict, prefix: str) -> None:
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "/"):
            pid, name = key[len(prefix) + 1:].split("/", 1)
            state.setdefault(int(pid), {})[name] = v
    for key, v in meta["scalars"].items():
        pid, name = key.split("/", 1)
        state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_train_state(out_dir, step: int, modules: dict, optimizers: dict, extra: dict) -> None:
    """modules: {part: state dict}; optimizers: {part: optimizer}; extra: JSON-able values.
    Written to a temporary folder, then swapped in, so a crash never leaves half a state."""
    final = Path(out_dir) / "train_state"
    tmp = final.with_name("train_state.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    tensors = {f"{part}/{k}": v.detach().cpu().contiguous() for part, sd in modules.items() for k, v in sd.items()}
    opt_meta = {}
    for part, opt in optimizers.items():
        t, opt_meta[part] = _flatten_optimizer(opt, f"opt_{part}")
        tensors.update({k: v.cpu().contiguous() for k, v in t.items()})
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(tmp / "tensors.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "optimizers": opt_meta, **extra}, indent=1))
    old = final.with_name("train_state.old")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        for f in old.iterdir():
            f.unlink()
        old.rmdir()


def load_train_state(out_dir, modules: dict, optimizers: dict) -> dict:
    """Restore what save_train_state wrote into `modules` ({part: object with load_state_dict})
    and `optimizers`; returns the JSON part (step, extra)."""
    folder = Path(out_dir) / "train_state"
    if not (folder / "state.json").is_file():
        raise CheckpointError(f"--resume: no training state in {folder} (nothing to resume; drop --resume)")
    try:
        tensors = load_file(str(folder / "tensors.safetensors"))
        meta = json.loads((folder / "state.json").read_text())
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: unreadable training state ({e})") from None
    for part, target in modules.items():
        sd = {k[len(part) + 1:]: v for k, v in tensors.items() if k.startswith(part + "/")}
        if not sd:
            raise CheckpointError(f"{folder}: no '{part}' tensors in the training state")
        target.load_state_dict(sd)
    for part, opt in optimizers.items():
        _unflatten_optimizer(opt, tensors, meta["optimizers"][part], f"opt_{part}")
    torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    return meta
