"""Captioning as a library: the captioner (models/captioner.py) and the VQVAE whose token ids it
reads, and how an input becomes those ids: a G-buffer object (its precomputed ids, or its views
encoded), a .npy of ids, or a mesh rendered from the encoder's cameras (datasets/builder.py) and
encoded. caption.py is the command line over these functions; CaptionPipeline holds both models
loaded once (the web demo)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from datasets.builder import DEFAULT_CONFIG, BuildConfig, camera_rig
from datasets.errors import DatasetError
from datasets.gbuffer import TOKEN_FILES, read_gbuffer_object, read_npy
from datasets.meshes import MESH_SUFFIXES, MeshObject, read_mesh
from datasets.precompute import read_tokenizer_record
from models.captioner import load_captioner, read_captioner_config
from models.inputs import encoder_views, input_view_sets
from models.layout import check_pair, planes_to_sequence, seq_len, tokenizer_signature
from models.official import load_official
from models.vqvae import TriplaneVQVAE, load_vqvae
from pipelines.sar3d import DEMO_DIR
from renderers.mesh_render import render_views
from utils.config import load_config


def open_vqvae(source: Path, device) -> TriplaneVQVAE:
    """Our VQVAE folder (or .safetensors file), or the official vqvae-ckpt.pt converted."""
    if not source.exists():
        raise FileNotFoundError(f"--vqvae: no checkpoint at {source}; pass the VQVAE folder the captioner was "
                                "trained with, or the official vqvae-ckpt.pt")
    if source.is_file() and source.suffix != ".safetensors":
        return load_official("vqvae", source)[0].to(device).eval()
    return load_vqvae(source, device)


def read_tokens(path: Path, lengths: tuple, vocab_size: int) -> torch.Tensor:
    """Token ids (L,) int64 from a .npy file, L one of `lengths`, each id in [0, vocab_size)."""
    ids = read_npy(path, (None,), "iu")
    if len(ids) not in lengths:
        raise DatasetError(path, f"{len(ids)} token ids; expected {' or '.join(map(str, lengths))} (the whole "
                           "sequence of the VQVAE, or the ids the captioner reads), in generator order")
    if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
        raise DatasetError(path, f"token ids outside the vocabulary [0, {vocab_size}): from another VQVAE?")
    return torch.from_numpy(ids.astype(np.int64))


@torch.no_grad()
def view_tokens(vqvae: TriplaneVQVAE, rgb_V3HW, depth_VHW, c_V25, views) -> torch.Tensor:
    """The token ids (L,) the VQVAE gives an object's views `views` (rgb in [0, 1], depth 0 =
    background, cameras as c.npy rows), resized to its input as in precompute."""
    x = encoder_views(rgb_V3HW[None], depth_VHW[None], c_V25[None], views, vqvae.cfg.input_size)
    return planes_to_sequence(vqvae.tokenize(x.to(next(vqvae.parameters()).device)))[0].cpu()


def dataset_root(obj_dir: Path) -> Path | None:
    """The dataset root (the nearest folder with dataset.json, up to 4 levels) holding an object."""
    return next((p for p in obj_dir.resolve().parents[:4] if (p / "dataset.json").is_file()), None)


def object_tokens(obj_dir: Path, vqvae: TriplaneVQVAE, fingerprint: str, lengths: tuple) -> torch.Tensor:
    if not obj_dir.is_dir():
        raise FileNotFoundError(f"--object {obj_dir}: not a folder; pass an object folder of a G-buffer dataset")
    token_file = obj_dir / TOKEN_FILES["gt_BL"]
    root = dataset_root(obj_dir)
    record = read_tokenizer_record(root) if root is not None else None
    if token_file.is_file() and (record is None or record["fingerprint"] == fingerprint):
        return read_tokens(token_file, lengths, vqvae.quantizer.vocab_size)
    if not (obj_dir / "c.npy").is_file():
        raise DatasetError(obj_dir, f"neither token ids ({token_file.name}) nor views (c.npy, raw_img.png, ...): "
                           "not an object folder of a G-buffer dataset")
    obj = read_gbuffer_object(obj_dir)
    rgb = torch.from_numpy(obj["rgb"]).permute(0, 3, 1, 2).float() / 255.0
    views = input_view_sets(vqvae.cfg.encoder.num_views, total=rgb.shape[0])[0]
    return view_tokens(vqvae, rgb, torch.from_numpy(obj["depth"]), torch.from_numpy(obj["c"]), views)


def mesh_tokens(path: Path, vqvae: TriplaneVQVAE, up: str) -> torch.Tensor:
    if not path.is_file():
        raise FileNotFoundError(f"--mesh {path}: no such file")
    if path.suffix.lower() not in MESH_SUFFIXES:
        raise DatasetError(path, f"not a mesh file ({', '.join(MESH_SUFFIXES)})")
    obj = MeshObject(read_mesh(path), caption="", label="", up=up, path=path)
    build = load_config(BuildConfig, DEFAULT_CONFIG)
    views = input_view_sets(vqvae.cfg.encoder.num_views, total=build.views)[0]
    cams = camera_rig(build.render, build.views)[views]
    res = vqvae.cfg.input_size
    r = build.render
    out = render_views(obj.mesh(), cams, res, r.ssaa, r.backend, str(next(vqvae.parameters()).device), threads=1)
    rgb = torch.from_numpy(out["rgb"]).permute(0, 3, 1, 2)
    return view_tokens(vqvae, rgb, torch.from_numpy(out["depth"]), torch.from_numpy(cams).float(),
                       list(range(len(views))))


def mesh_files(given: list) -> list:
    """The --mesh arguments with each folder replaced by its mesh files, sorted."""
    files = []
    for path in given:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in MESH_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"--mesh {path}: no mesh files ({', '.join(MESH_SUFFIXES)}) in the folder")
            files += found
        else:
            files.append(path)
    return files


class CaptionPipeline:
    """A captioner and its VQVAE, loaded once: `pipe.caption_mesh("chair.glb")`."""

    def __init__(self, model, vqvae: TriplaneVQVAE, names: tuple = ("the VQVAE", "the captioner")):
        self.signature = tokenizer_signature(vqvae.quantizer)
        check_pair(self.signature, vars(model.cfg), *names)
        self.model, self.vqvae = model, vqvae
        self.lengths = tuple(sorted({seq_len(model.cfg.patch_nums), model.cfg.num_point_tokens}))

    @classmethod
    def from_pretrained(cls, ckpt=None, vqvae=None, device="cpu", **load) -> "CaptionPipeline":
        """`ckpt`: a train_caption.py output folder, `vqvae` the VQVAE it was trained with (both
        default to the demo's); `load`: load_captioner's llm= and dtype=."""
        ckpt, vqvae = Path(ckpt or DEMO_DIR / "captioner"), Path(vqvae or DEMO_DIR / "vqvae")
        cfg = read_captioner_config(ckpt)
        vq = open_vqvae(vqvae, device)
        check_pair(tokenizer_signature(vq.quantizer), vars(cfg), f"--vqvae {vqvae}", f"the captioner {ckpt}")
        return cls(load_captioner(ckpt, device, **load), vq, (f"--vqvae {vqvae}", f"the captioner {ckpt}"))

    def __call__(self, ids: list, question: str | None = None, **generate) -> list[str]:
        """Captions of objects given as token ids (each (L,), L one of self.lengths)."""
        batch = torch.stack([x[:self.model.cfg.num_point_tokens] for x in ids])
        return self.model.generate(batch, question, **generate)

    def caption_mesh(self, path, question: str | None = None, up: str = "y", **generate) -> str:
        return self([mesh_tokens(Path(path), self.vqvae, up)], question, **generate)[0]
