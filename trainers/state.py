"""What a trainer needs to stop and resume exactly: EMA weights, optimizer states, the step,
the RNG state; written as safetensors + JSON (nothing is pickled).

Layout of `<out>/train_state/`:
  tensors.safetensors   "<part>/<name>" for every tensor (model, ema, disc, optimizer states, rng)
  state.json            step, optimizer param groups and scalar states, the run config

A save survives being killed at any point. The new state is written beside the old one, in
train_state.tmp (tensors, then state.json, each fsynced, then the folder), then switched in:
train_state -> train_state.old, train_state.tmp -> train_state (the directory fsynced after each
rename), and train_state.old is removed. A state is complete when its state.json parses and its
tensors file is as long as its header says; state.json is written last, so a complete folder
was fully written. Resuming takes train_state when complete, else the complete one of .tmp/.old
with the highest step (a kill between the two renames leaves train_state missing and both
complete). The next save first settles such leftovers: the state resumed from becomes
train_state and everything else (a half-removed .old, an unfinished .tmp) is removed.

For crash tests, TRAIN_STATE_KILL_AT=STAGE[@STEP] makes the save (of that step) SIGKILL its own
process right after STAGE: "tensors" written, "json" written, "old" (train_state renamed to
.old), "switch" (.tmp renamed to train_state), "remove" (the first file of .old removed).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from utils.checkpoint import CheckpointError

log = logging.getLogger("trainers")

STATE, TENSORS = "state.json", "tensors.safetensors"
KILL_ENV = "TRAIN_STATE_KILL_AT"
STAGES = ("tensors", "json", "old", "switch", "remove")


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


def _flatten_optimizer(sd: dict, prefix: str):
    """An optimizer's state dict -> ({name: tensor}, JSON-able rest)."""
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
            state.setdefault(_param_id(pid), {})[name] = v
    for key, v in meta["scalars"].items():
        pid, name = key.split("/", 1)
        state.setdefault(_param_id(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _param_id(pid: str):
    """Optimizer states are keyed by parameter number, or by parameter name for a sharded model."""
    return int(pid) if pid.isdigit() else pid


def _crash_point(stage: str, step: int) -> None:
    """SIGKILL this process here when KILL_ENV names this stage (and step): a crash test hook."""
    want = os.environ.get(KILL_ENV)
    if want and want.partition("@")[0] == stage and want.partition("@")[2] in ("", str(step)):
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync(path: Path) -> None:
    """Flush a file, or a directory's entries (renames, creations), to disk."""
    if sys.platform == "win32" and path.is_dir():       # directories cannot be opened there
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _paths(out_dir) -> tuple[Path, Path, Path]:
    final = Path(out_dir) / "train_state"
    return final, final.with_name("train_state.tmp"), final.with_name("train_state.old")


def _complete_step(folder: Path) -> int | None:
    """The step of the state in `folder` when it is complete (state.json parses, the tensors
    file has the length its header gives), else None. Reads the headers only."""
    try:
        step = json.loads((folder / STATE).read_text())["step"]
        with open(folder / TENSORS, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            size = os.fstat(f.fileno()).st_size
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None
    return step if isinstance(step, int) and size == 8 + n + end else None


def find_train_state(out_dir) -> tuple[Path, int] | None:
    """(folder, step) of the newest complete training state in `out_dir`: train_state when
    complete, else the complete one of train_state.tmp / train_state.old with the highest step;
    None when there is none."""
    final, tmp, old = _paths(out_dir)
    step = _complete_step(final)
    if step is not None:
        return final, step
    found = [(s, str(p)) for p in (tmp, old) if (s := _complete_step(p)) is not None]
    if not found:
        return None
    step, folder = max(found)
    return Path(folder), step


def holds_state(out_dir) -> bool:
    """Whether `out_dir` holds a run to resume: a complete state under any of the three names, or
    a train_state folder at all (damaged: left for the user to look at, never removed quietly)."""
    return _paths(out_dir)[0].exists() or find_train_state(out_dir) is not None


def _remove(path: Path, step: int | None = None) -> None:
    """Remove a state folder, whatever is left of it (missing, half removed, a stray file)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
        return
    if not path.exists():
        return
    for i, child in enumerate(sorted(path.iterdir())):
        if child.is_dir() and not child.is_symlink():
            _remove(child)
        else:
            child.unlink(missing_ok=True)
        if i == 0 and step is not None:
            _crash_point("remove", step)
    path.rmdir()


def settle_train_state(out_dir) -> None:
    """Leave only the newest complete state, as train_state (see the module docstring): what an
    interrupted save left behind. Main process only, under the folder's lock."""
    final, tmp, old = _paths(out_dir)
    best = find_train_state(out_dir)
    if best is not None and best[0] != final:
        _remove(final)
        best[0].rename(final)
        log.warning("%s: recovered the training state of step %d from %s (a save did not finish)",
                    out_dir, best[1], best[0].name)
    for leftover in (tmp, old):
        _remove(leftover)
    if final.parent.exists():
        _fsync(final.parent)


def save_train_state(out_dir, step: int, modules: dict, optimizers: dict, extra: dict) -> None:
    """modules: {part: state dict}; optimizers: {part: optimizer state dict}; extra: JSON-able values.
    Written beside the previous state and switched in (module docstring): a crash at any point
    leaves a complete state to resume from."""
    final, tmp, old = _paths(out_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    settle_train_state(out_dir)
    tensors = {f"{part}/{k}": v.detach().cpu().contiguous() for part, sd in modules.items() for k, v in sd.items()}
    opt_meta = {}
    for part, sd in optimizers.items():
        t, opt_meta[part] = _flatten_optimizer(sd, f"opt_{part}")
        tensors.update({k: v.cpu().contiguous() for k, v in t.items()})
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    tmp.mkdir()
    save_file(tensors, str(tmp / TENSORS))
    _fsync(tmp / TENSORS)
    _crash_point("tensors", step)
    with open(tmp / STATE, "w") as f:
        f.write(json.dumps({"step": step, "optimizers": opt_meta, **extra}, indent=1))
        f.flush()
        os.fsync(f.fileno())
    _fsync(tmp)
    _crash_point("json", step)
    if final.exists():
        final.rename(old)
        _fsync(final.parent)
        _crash_point("old", step)
    tmp.rename(final)
    _fsync(final.parent)
    _crash_point("switch", step)
    _remove(old, step)
    _fsync(final.parent)


def load_train_state(out_dir, modules: dict, optimizers: dict) -> dict:
    """Restore the newest complete state (find_train_state) into `modules` ({part: object with
    load_state_dict}) and `optimizers`; returns the JSON part (step, extra). Changes no file:
    every process of a run may load at once."""
    found = find_train_state(out_dir)
    if found is None:
        final, tmp, _ = _paths(out_dir)
        if final.exists():
            raise CheckpointError(f"--resume: nothing to resume: {final} is damaged or incomplete "
                                  "(move it away to start over)")
        why = f"only the unfinished first save {tmp.name}" if tmp.exists() else "no training state"
        raise CheckpointError(f"--resume: nothing to resume in {out_dir} ({why}); drop --resume")
    folder, step = found
    if folder.name != "train_state":
        log.warning("%s: the last save did not finish; resuming from %s (step %d)", out_dir, folder.name, step)
    try:
        tensors = load_file(str(folder / TENSORS))
        meta = json.loads((folder / STATE).read_text())
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: unreadable training state ({e})") from None
    try:
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
        if "step" not in meta:
            raise KeyError("step")
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        what = f"no {e}" if isinstance(e, KeyError) else " ".join(str(e).split())[:200]
        raise CheckpointError(f"{folder}: not a training state of this model ({what}); move it away to start "
                              "over") from None
    return meta
