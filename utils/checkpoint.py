"""Our checkpoint format: `model.safetensors` whose metadata carries the config that built the
model, with the same config beside it as `config.json`. Nothing is unpickled.

Official checkpoints (.pt/.pth pickles) are read by `read_official`: torch.load with
weights_only=True, or, when the file holds other objects than tensors and containers (the AR
files keep their training arguments), a restricted unpickler that rebuilds tensors and
containers and turns every other object into an inert placeholder, never importing or calling
anything else.
"""
from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import torch

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

FORMAT = "sar3d-repro/1"


class CheckpointError(RuntimeError):
    pass


class ConversionError(ValueError):
    """An official checkpoint does not match the model it is converted into."""


INDEX = "model.safetensors.index.json"      # a model written in shards: {metadata, weight_map}


def save_model(out_dir, state_dict: dict, config: dict, kind: str, shard_bytes: int = 0,
               dtype: torch.dtype | None = None) -> Path:
    """Write out_dir/model.safetensors (+ config.json) atomically; returns the weights path. With
    `shard_bytes`, a model larger than that goes into shards model-0000i-of-0000n.safetensors
    listed by model.safetensors.index.json, one shard in memory at a time (the tensors may be
    memory-mapped); `dtype` casts floating-point tensors (e.g. bf16 halves a large model)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "kind": kind, "config": json.dumps(config)}

    def ready(v):
        v = v.detach()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        return v.contiguous().cpu()

    groups, size = [[]], 0
    for k, v in state_dict.items():
        n = v.numel() * (dtype.itemsize if dtype is not None and v.is_floating_point() else v.element_size())
        if shard_bytes and groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += n
    for old in [*out_dir.glob("model-*-of-*.safetensors"), out_dir / INDEX, out_dir / "model.safetensors"]:
        old.unlink(missing_ok=True)
    names = ["model.safetensors"] if len(groups) == 1 else \
        [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for name, keys in zip(names, groups):
        tmp = out_dir / (name + ".tmp")
        save_file({k: ready(state_dict[k]) for k in keys}, str(tmp), metadata=meta)
        tmp.replace(out_dir / name)
    if len(groups) > 1:
        index = {"metadata": meta, "weight_map": {k: name for name, keys in zip(names, groups) for k in keys}}
        (out_dir / INDEX).write_text(json.dumps(index, indent=1) + "\n")
    (out_dir / "config.json").write_text(json.dumps({"kind": kind, **config}, indent=2) + "\n")
    return out_dir / (INDEX if len(groups) > 1 else names[0])


def _files(path) -> tuple[Path, list]:
    """(the file that names the checkpoint, its safetensors files): a folder's model.safetensors,
    or the shards its index lists, or one .safetensors file."""
    path = Path(path)
    if path.is_dir() and (path / INDEX).is_file():
        try:
            index = json.loads((path / INDEX).read_text())
            shards = sorted(set(index["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{path / INDEX}: not a shard index ({_first_line(e)})") from None
        return path / INDEX, [path / name for name in shards]
    file = path / "model.safetensors" if path.is_dir() else path
    return file, [file]


def read_header(path, kind: str | None = None):
    """The header of a checkpoint written by save_model (a directory, sharded or not, or a
    .safetensors file), without reading its tensors: (file, config dict, kind, {name: shape}).
    Missing, truncated or foreign files raise CheckpointError naming the file."""
    head, files = _files(path)
    shapes, meta = {}, {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"no checkpoint at {file}: train one or put model.safetensors there")
        try:
            with safe_open(str(file), "pt") as f:
                meta = f.metadata() or {}
                shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{file}: unreadable or truncated safetensors file ({_first_line(e)})") from None
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{file}: not a checkpoint of this project (no '{FORMAT}' metadata); "
                                  "official checkpoints go through scripts/convert_official.py")
        if kind is not None and meta.get("kind") != kind:
            raise CheckpointError(f"{file}: holds a '{meta.get('kind')}' model, expected '{kind}'")
    file = head
    if "config" not in meta:
        raise CheckpointError(f"{file}: its metadata holds no model config; write checkpoints with "
                              "utils.checkpoint.save_model (or scripts/convert_official.py for official files)")
    try:
        config = json.loads(meta["config"])
    except ValueError:
        config = None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: the model config in its metadata is not a JSON object; write "
                              "checkpoints with utils.checkpoint.save_model")
    return file, config, meta["kind"], shapes


def load_model(path, kind: str | None = None):
    """Read a checkpoint written by save_model: a directory (sharded or not) or a .safetensors file.

    Returns (state_dict, config dict, kind). Missing, truncated or foreign files raise
    CheckpointError naming the file.
    """
    _, config, kind, _ = read_header(path, kind)
    state = {}
    for file in _files(path)[1]:
        try:
            state.update(load_file(str(file)))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{file}: unreadable or truncated safetensors file ({_first_line(e)})") from None
    return state, config, kind


def load_built(ckpt, kind: str, build, device="cpu"):
    """A model from our checkpoint folder: `build(config dict)` makes it, the weights load
    strictly, and it comes back in eval mode on `device`. Any mismatch is a CheckpointError
    naming the checkpoint.

    The model is first built on the meta device (shapes, no memory) and compared, tensor by
    tensor, with the shapes in the file's header: a config that declares a larger model than the
    file holds is refused before anything of its size is allocated. A model whose every tensor
    is in the file then takes the file's tensors as they are (no second copy, no initialisation:
    a model of several GB loads in its own size, in the file's dtype)."""
    _, cfg, _, shapes = read_header(ckpt, kind)
    try:
        with torch.device("meta"):
            skeleton = build(cfg)
    except Exception as e:                      # ConfigError, or a config the model cannot take
        raise CheckpointError(f"{ckpt}: its config does not build a {kind} model ({_first_line(e)})") from None
    want = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    problems = [f"'{n}' is missing from the file" for n in want if n not in shapes]
    problems += [f"the file has '{n}', which the config does not make" for n in shapes if n not in want]
    problems += [f"'{n}' has shape {shapes[n]} in the file, the config makes {want[n]}"
                 for n in want if n in shapes and shapes[n] != want[n]]
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(f"{ckpt}: weights do not match the config stored with them ({problems[0]}{more})")
    state, cfg, _ = load_model(ckpt, kind)
    skeleton.load_state_dict(state, strict=True, assign=True)
    if not any(t.is_meta for t in (*skeleton.parameters(), *skeleton.buffers())):
        return skeleton.to(device).eval()
    del skeleton                                # buffers the file does not hold: build it for real
    model = build(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        raise CheckpointError(f"{ckpt}: weights do not match the config stored with them "
                              f"({lines[1].strip() if len(lines) > 1 else lines[0]})") from None
    return model.to(device).eval()


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def map_official_state(state: dict, ours: dict, to_ours, to_official, dropped=()) -> dict:
    """Official state dict -> ours, checked tensor by tensor: every official key not in `dropped`
    must map (to_ours) to one of ours with the same shape, and every one of ours must be filled.
    Raises ConversionError naming the official keys (to_official) at fault."""
    out, seen, problems = {}, set(), []
    for key, value in state.items():
        if key in dropped:
            continue
        name = to_ours(key)
        seen.add(name)
        if name is None or name not in ours:
            problems.append(f"unexpected tensor '{key}'")
        elif tuple(value.shape) != tuple(ours[name].shape):
            problems.append(f"'{key}' has shape {tuple(value.shape)}, expected {tuple(ours[name].shape)}")
        else:
            out[name] = value
    problems += [f"missing tensor '{to_official(k)}'" for k in ours if k not in seen]
    if problems:
        more = f" (+{len(problems) - 10} more)" if len(problems) > 10 else ""
        raise ConversionError("; ".join(problems[:10]) + more)
    return out


# What the restricted unpickler may resolve: torch's tensor rebuilders and plain containers.
_SAFE_GLOBALS = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
                 ("torch._utils", "_rebuild_parameter_with_state"), ("collections", "OrderedDict"),
                 ("torch", "Size")}


class Placeholder:
    """Stands in for any object of an official file that is not a tensor or a container. It
    records how it was built and does nothing else."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<{type(self).__name__}>"


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return type(f"{module}.{name}", (Placeholder,), {})


class _RestrictedPickle:
    """A pickle module for torch.load whose every read goes through the restricted unpickler
    (the legacy format reads its header with `load`, the payload with `Unpickler`)."""
    Unpickler = _RestrictedUnpickler
    __name__ = "restricted_pickle"

    @staticmethod
    def load(f, **kwargs):
        return _RestrictedUnpickler(f, **kwargs).load()


def read_official(path):
    """The object in an official .pt/.pth file (tensors on the CPU). Raises CheckpointError
    naming the file when it is missing, truncated or not a PyTorch checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: put the file there or pass its path")
    # Zip-format files (every torch.save since 1.6) are memory-mapped: tensors are read from the
    # file when used, so a file larger than the memory converts tensor by tensor.
    mmap = zipfile.is_zipfile(path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            if "weights_only" not in str(e):
                raise
            # Objects other than tensors in the file: rebuild tensors only (see _RestrictedUnpickler).
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickle,
                              mmap=mmap)
    except MemoryError:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (it asks for more memory than there "
                              "is)") from None
    except Exception as e:     # whatever a damaged or hand-made file makes the reader raise
        # torch's own messages suggest loading the file unsafely: only our words are shown.
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint, or truncated ({_reader_problem(e)}); "
                              "pass the file as released, or a checkpoint folder of ours") from None


def _reader_problem(e: BaseException) -> str:
    """What went wrong while reading an official file, in our words."""
    if isinstance(e, (EOFError, zipfile.BadZipFile)) or "zip archive" in str(e) or "central directory" in str(e):
        return "the file ends early or is not a zip archive"
    if isinstance(e, pickle.UnpicklingError):
        return "its pickled data is damaged or holds something other than tensors and containers"
    if isinstance(e, OSError):
        return e.strerror or "the file cannot be read"
    return f"its content is malformed: {type(e).__name__}"


def read_official_state(path, inner: tuple = (), what: str = "a state dict of tensors") -> dict:
    """The state dict of an official file, found under the keys `inner` (("trainer", "var_wo_ddp")
    for the AR files). Anything else is a CheckpointError that says what was expected."""
    obj = read_official(path)
    for key in inner:
        obj = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected {what}")
    odd = [k for k in obj if not isinstance(k, str)]
    if odd:
        raise CheckpointError(f"{path}: expected {what}, but {len(odd)} key(s) are not names, e.g. "
                              f"{repr(odd[0])[:40]}")
    return obj
