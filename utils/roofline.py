"""What fraction of the machine a model uses: FLOPs and time of its matmuls and attention, and the
rate the same matmuls reach alone (scripts/bench_ar.py).

`OpMeter` is a dispatch mode: inside it, every linear-layer matmul (aten mm/addmm, the quantised
linear_dynamic) and every fused attention call is timed (the device synchronised around it) and
its FLOPs counted (2·M·K·N; attention 4·B·H·L·T·c, softmax not counted). `matmul_limit` then runs
each distinct matmul shape alone, on fresh random operands of the same shape, strides, dtype and
device, and gives the best rate over a few repeats: the rate this device reaches on exactly this
work, the roofline the sampler's own linear layers are compared to.
"""
from __future__ import annotations

import time
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

MATMULS = {"aten.mm.default", "aten.addmm.default", "quantized.linear_dynamic.default"}


def _sync(device) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class _Spec(tuple):
    """A tensor operand's shape, strides, dtype and device (kept instead of the tensor)."""


def _spec(a):
    return _Spec((tuple(a.shape), tuple(a.stride()), a.dtype, str(a.device))) if isinstance(a, torch.Tensor) else a


def _fresh(a):
    if not isinstance(a, _Spec):
        return a
    shape, stride, dtype, device = a
    return torch.empty_strided(shape, stride, dtype=dtype, device=device).normal_()


def matmul_flops(name: str, args: tuple) -> int:
    if name == "aten.mm.default":
        (m, k), n = args[0].shape, args[1].shape[1]
    elif name == "aten.addmm.default":
        (m, k), n = args[1].shape, args[2].shape[1]
    else:                                                   # quantized.linear_dynamic(x, packed, ...)
        k = args[0].shape[-1]
        m, n = args[0].numel() // k, args[1].unpack()[0].shape[0]
    return 2 * m * k * n


def attention_flops(args: tuple) -> int:
    q, k = args[0], args[1]                                 # (B, H, L, c), (B, H, T, c)
    B, H, L, c = q.shape
    return 4 * B * H * L * k.shape[2] * c


class OpMeter(TorchDispatchMode):
    """Times and counts the matmuls and attention run inside it (see the module docstring)."""

    def __init__(self, device=None):
        super().__init__()
        self.device = device
        self.flops = defaultdict(int)          # "linear" / "attention"
        self.seconds = defaultdict(float)
        self.shapes: dict = defaultdict(int)   # (op, operand specs) -> calls, for matmul_limit
        self._ops: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        kind = "linear" if name in MATMULS else "attention" if "scaled_dot_product" in name else None
        if kind is None:
            return func(*args, **(kwargs or {}))
        _sync(self.device)
        t = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        _sync(self.device)
        self.seconds[kind] += time.perf_counter() - t
        if kind == "attention":
            self.flops[kind] += attention_flops(args)
            return out
        self.flops[kind] += matmul_flops(name, args)
        specs = tuple(_spec(a) for a in args)
        key = (name, tuple(s if isinstance(s, _Spec) else id(s) for s in specs))
        self.shapes[key] += 1
        self._ops.setdefault(key, (func, specs, kwargs or {}))
        return out

    @torch.no_grad()
    def matmul_limit(self, repeats: int = 5) -> float:
        """FLOP/s of this meter's matmuls each run alone (best of `repeats`), weighted by calls."""
        flops = seconds = 0.0
        for key, calls in self.shapes.items():
            func, specs, kwargs = self._ops[key]
            fresh = tuple(_fresh(s) for s in specs)
            func(*fresh, **kwargs)                           # warm-up
            best = float("inf")
            for _ in range(repeats):
                _sync(self.device)
                t = time.perf_counter()
                func(*fresh, **kwargs)
                _sync(self.device)
                best = min(best, time.perf_counter() - t)
            flops += calls * matmul_flops(key[0], fresh)
            seconds += calls * best
        return flops / seconds if seconds else 0.0
