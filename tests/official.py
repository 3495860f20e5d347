"""The official SAR3D key tables and parity references (../shared/official), for tests.

`filled_state(table)` fills every tensor of an official model deterministically from its key
name, exactly as parity/README.md describes, so that our modules loaded with those weights
can be compared with the reference outputs of the official ones. Tests that need the folder
skip when it is absent (set SAR3D_OFFICIAL_DIR to point elsewhere).
"""
from __future__ import annotations

import json
import math
import os
import zlib
from pathlib import Path

import pytest
import torch

OFFICIAL_DIR = Path(os.environ.get("SAR3D_OFFICIAL_DIR", Path(__file__).resolve().parents[2] / "shared" / "official"))
needs_official = pytest.mark.skipif(not (OFFICIAL_DIR / "parity").is_dir(),
                                    reason=f"official tables and references not found at {OFFICIAL_DIR}")


def key_table(name: str) -> list:
    """[[key, shape, dtype, 'param' | 'buffer'], ...] of vqvae, vqvae_flexicubes, var_image or var_text."""
    return json.loads((OFFICIAL_DIR / f"{name}_keys.json").read_text())["entries"]


def _mean_std(key: str, shape) -> tuple:
    if key.endswith("scale_mul_1H11"):
        return math.log(4), 0.1
    if len(shape) == 1 and (key.endswith(".weight") or key.endswith(".g")):
        return 1.0, 0.02
    if len(shape) == 1:
        return 0.0, 0.02
    if key.endswith("quantize.embedding.weight"):
        return 0.0, 1.0
    if key.endswith(("pos_embed", "pos_1LC", "pos_start", "lvl_embed.weight", "plane_embed.weight")):
        return 0.0, 0.02
    return 0.0, 1.0 / math.sqrt(math.prod(shape[1:]))


def fill(key: str, shape) -> torch.Tensor:
    g = torch.Generator("cpu").manual_seed(zlib.crc32(key.encode()))
    mean, std = _mean_std(key, shape)
    value = torch.randn(shape, generator=g) * std + mean
    if key == "decoder.triplane_decoder.decoder.net.6.bias":
        value[0] += 6          # the README's density tweak: semi-opaque renders
    return value


def filled_state(table: str, prefix: str = "") -> dict:
    """Every parameter of `table` whose key starts with `prefix`, filled. Buffers are left
    out: they keep the values the model constructs."""
    return {k: fill(k, shape) for k, shape, _, kind in key_table(table) if kind == "param" and k.startswith(prefix)}


def reference(name: str) -> dict:
    from safetensors.torch import load_file
    return load_file(str(OFFICIAL_DIR / "parity" / f"ref_{name}.safetensors"))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))
