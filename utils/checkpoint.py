"""Our checkpoint format: `model.safetensors` whose metadata carries the config that built the
model, with the same config beside it as `config.json`. Nothing is unpickled."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

FORMAT = "sar3d-repro/1"


class CheckpointError(RuntimeError):
    pass


def save_model(out_dir, state_dict: dict, config: dict, kind: str) -> Path:
    """Write out_dir/model.safetensors (+ config.json) atomically; returns the weights path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    meta = {"format": FORMAT, "kind": kind, "config": json.dumps(config)}
    tmp = out_dir / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(out_dir / "model.safetensors")
    (out_dir / "config.json").write_text(json.dumps({"kind": kind, **config}, indent=2) + "\n")
    return out_dir / "model.safetensors"


def load_model(path, kind: str | None = None):
    """Read a checkpoint written by save_model: a directory or a .safetensors file.

    Returns (state_dict, config dict, kind). Missing, truncated or foreign files raise
    CheckpointError naming the file.
    """
    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"no checkpoint at {file}: train one or put model.safetensors there")
    try:
        state = load_file(str(file))
        with safe_open(str(file), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: unreadable or truncated safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not a checkpoint of this project (no '{FORMAT}' metadata); "
                              "official checkpoints go through scripts/convert_official.py")
    if kind is not None and meta.get("kind") != kind:
        raise CheckpointError(f"{file}: holds a '{meta.get('kind')}' model, expected '{kind}'")
    return state, json.loads(meta["config"]), meta["kind"]
