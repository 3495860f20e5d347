"""torchrun / torch.distributed set-up shared by the trainers.

One process: nothing is initialised and every helper is a no-op. Under torchrun (WORLD_SIZE > 1
in the environment) the process group uses NCCL on CUDA and gloo on the CPU, so the same
command runs on a laptop:

    torchrun --standalone --nproc_per_node 2 train_vqvae.py ...

Models too large for one device are sharded with FSDP2 (`shard`); `WholeModel` and
`WholeOptimizer` show such a model and its optimizer whole to the checkpoint code.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> Dist:
    """Read torchrun's environment, pick the device (cuda:LOCAL_RANK when available) and
    initialise the process group when there is more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(f"cuda:{local}" if device == "cuda" else device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local, dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def mean_across(values: dict, d: Dist) -> dict:
    """Average a dict of floats over the processes (the global-batch mean of per-process means)."""
    if not d.enabled:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: v / d.world_size for k, v in zip(keys, t.tolist())}


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def cpu_has_bf16() -> bool:
    """Whether torch reports bf16 instructions on this CPU (AVX512-BF16 or AMX-BF16). Without
    them bf16 autocast is emulated and 5-20x slower than float32."""
    check = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(f() for f in check if f is not None)


def precision(amp: str, device: torch.device) -> str:
    """train.amp -> "bf16" or "float32". "auto": bf16 on CUDA and on a CPU with bf16 instructions,
    float32 elsewhere; "bf16" and "none" force it."""
    if amp not in ("auto", "bf16", "none"):
        raise ValueError(f"train.amp must be auto, bf16 or none, got {amp!r}")
    if amp == "auto":
        return "bf16" if device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16()) else "float32"
    return "bf16" if amp == "bf16" else "float32"


def autocast_factory(amp: str, device: torch.device):
    """train.amp -> a callable giving the forward's autocast context (a no-op in float32)."""
    if precision(amp, device) == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext


def shard(module: torch.nn.Module, units, precision_name: str) -> None:
    """FSDP2 in place: each of `units` (the blocks) sharded on its own, then the rest. In bf16,
    the parameters are gathered in bf16 and the gradients reduced in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if precision_name == "bf16" else MixedPrecisionPolicy()
    for unit in units:
        fully_shard(unit, mp_policy=policy)
    fully_shard(module, mp_policy=policy)


def _whole():
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


class WholeModel:
    """A sharded model's full state dict: gathered by every process (the main one receives
    it, on the CPU), and loaded from a full state dict that every process has read."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        return get_model_state_dict(self.model, options=_whole())

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True))


class WholeOptimizer:
    """The optimizer of a sharded model, its state keyed by parameter name, as WholeModel."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        return get_optimizer_state_dict(self.model, self.optimizer, options=_whole())

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(self.model, self.optimizer, state, options=StateDictOptions(full_state_dict=True))
