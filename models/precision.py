"""Sampling precision: fp32 (the reference), int8 (dynamic quantisation of the linear layers, for
CPUs) or bf16 (autocast, for GPUs and CPUs with bf16 instructions).

int8 quantises every nn.Linear of a generator with torch's dynamic quantisation: weights to int8
per output channel once, activations per call; the matmuls run through fbgemm (x86 with AVX2)
or onednn. It changes the logits slightly, so the tokens drawn differ from fp32 ones from the
first scale where a draw falls the other way; the next-scale generator then also draws its top-k /
top-p tokens from the k candidates alone (models.ar.sample_top_k_top_p(exact=False): the same
distribution, without sorting the vocabulary). scripts/bench_ar.py --precision int8 reports the
agreement, scripts/eval_prompts.py --precision int8 the demo's shape check with it.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

PRECISIONS = ("fp32", "bf16", "int8")


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 matmul instructions (AVX512-BF16 or AMX), from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def check_precision(precision: str, device) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "int8" and torch.device(device).type != "cpu":
        raise ValueError("--precision int8 is the CPU path; on a GPU use bf16")
    if precision == "int8" and not torch.backends.quantized.supported_engines:
        raise ValueError("--precision int8: this torch build has no quantised engine (fbgemm/onednn)")
    return precision


def quantize_int8(model: nn.Module) -> nn.Module:
    """`model` with every nn.Linear replaced by a dynamically quantised int8 one (in place)."""
    engines = torch.backends.quantized.supported_engines
    torch.backends.quantized.engine = next(e for e in ("x86", "fbgemm", "onednn", "qnnpack") if e in engines)
    for m in model.modules():                 # the attention's separate biases go into the quantised layers
        if hasattr(m, "fold_biases"):
            m.fold_biases()
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    with warnings.catch_warnings():            # torch marks its quantised tensors as deprecated
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)


def set_precision(model: nn.Module, precision: str, device) -> nn.Module:
    """Prepare a generator for sampling at `precision` (int8: quantised in place; bf16 and fp32
    change no weight: use `autocast(precision, device)` around sampling)."""
    check_precision(precision, device)
    if precision == "int8":
        model = quantize_int8(model.eval())
        if hasattr(model, "exact_draws"):    # its draws differ from fp32's anyway: skip sorting the vocabulary
            model.exact_draws = False
    return model


def autocast(precision: str, device) -> contextlib.AbstractContextManager:
    """bf16 autocast for precision bf16, nothing otherwise."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def linear(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """layer(x) + bias for a bias-free linear layer, as the official F.linear (bit-identical to
    it); a layer into which quantize_int8 folded the bias is just called."""
    if type(layer) is nn.Linear and layer.bias is None:
        return F.linear(x, layer.weight, bias)
    return layer(x)
