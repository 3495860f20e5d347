#!/usr/bin/env python
"""Caption 3D objects with a trained captioner (SAR3D-LLM): one line "INPUT: caption" per input.

    python caption.py --mesh outputs/a_red_torus_0/mesh.glb        # the demo captioner and VQVAE
    python caption.py --ckpt runs/caption_stage2 --vqvae checkpoints/vqvae --object data/objaverse/1/00001
    python caption.py --ckpt runs/caption_stage2 --vqvae checkpoints/vqvae --tokens outputs/red_torus_0/tokens.npy
    python caption.py --ckpt runs/caption_stage2 --vqvae checkpoints/vqvae --mesh chair.glb \\
        --question "What is this object made of?"

Inputs (each flag may be repeated; the lines follow the order --object, --tokens, --mesh):
- --object DIR: a G-buffer object folder (datasets/gbuffer.py): its precomputed token ids when
  they are --vqvae's (the dataset's tokenizer.json says so, or does not exist), else its views
  encoded by --vqvae;
- --tokens FILE.npy: token ids in generator order, all of them (3·Σpn², as sample.py's tokens.npy)
  or the first ones the captioner reads;
- --mesh FILE (.obj, .ply, .stl, .glb, .gltf) or a folder of them: placed as
  scripts/render_meshes.py does (--up), rendered from the cameras of the encoder's views
  (datasets/builder.py, configs/data/build.yaml) and encoded by --vqvae.

--ckpt is a train_caption.py output folder; the base LLM it names is read from its folder
(--llm replaces it). --vqvae is our VQVAE folder or the official vqvae-ckpt.pt; it must be the
one the captioner was trained with. Both default to the demo's (checkpoints/demo). Greedy by default; --sample draws with --temperature and
--top-p from --seed. Every input is read (meshes rendered) before the LLM loads.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from datasets.builder import DEFAULT_CONFIG, BuildConfig, camera_rig  # noqa: E402
from datasets.errors import DatasetError  # noqa: E402
from datasets.gbuffer import TOKEN_FILES, read_gbuffer_object, read_npy  # noqa: E402
from datasets.meshes import MESH_SUFFIXES, MeshObject, read_mesh  # noqa: E402
from datasets.precompute import read_tokenizer_record  # noqa: E402
from models.captioner import load_captioner, read_captioner_config  # noqa: E402
from models.inputs import encoder_views, input_view_sets  # noqa: E402
from models.layout import check_pair, planes_to_sequence, seq_len, tokenizer_signature  # noqa: E402
from models.official import load_official  # noqa: E402
from models.vqvae import TriplaneVQVAE, load_vqvae  # noqa: E402
from pipelines.sar3d import DEMO_DIR, check_prompt  # noqa: E402
from renderers.mesh_render import render_views  # noqa: E402
from utils.cli import ArgumentParser, check_device, run  # noqa: E402
from utils.config import load_config  # noqa: E402


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


def main(argv=None):
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--ckpt", type=Path, default=DEMO_DIR / "captioner",
                    help="captioner checkpoint folder (train_caption.py's output; default: the demo's)")
    ap.add_argument("--vqvae", type=Path, default=DEMO_DIR / "vqvae",
                    help="the VQVAE the captioner was trained with (default: the demo's)")
    ap.add_argument("--object", action="append", default=[], type=Path, help="G-buffer object folder")
    ap.add_argument("--tokens", action="append", default=[], type=Path, help=".npy file of token ids")
    ap.add_argument("--mesh", action="append", default=[], type=Path,
                    help="mesh file, or a folder: every mesh file in it")
    ap.add_argument("--question", help="what to ask (default: the captioning prompt the model was trained on)")
    ap.add_argument("--llm", help="the base LLM's folder, if not where the checkpoint says")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), help="the LLM's weights (default: the config's)")
    ap.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, help="answer length limit in tokens (default: the config's)")
    ap.add_argument("--up", choices=("y", "z"), default="y", help="--mesh files' up axis (glTF and most OBJ: y)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    args = ap.parse_args(argv)
    if not (args.object or args.tokens or args.mesh):
        raise ValueError("nothing to caption: pass --object DIR, --tokens FILE.npy or --mesh FILE")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    if args.sample and not (args.temperature > 0 and 0 < args.top_p <= 1):
        raise ValueError("--sample needs --temperature above 0 and --top-p in (0, 1]")
    question = check_prompt(args.question, "--question") if args.question is not None else None
    device = check_device(args.device)
    cfg = read_captioner_config(args.ckpt)
    vqvae = open_vqvae(args.vqvae, device)
    signature = tokenizer_signature(vqvae.quantizer)
    check_pair(signature, vars(cfg), f"--vqvae {args.vqvae}", f"the captioner {args.ckpt}")
    lengths = tuple(sorted({seq_len(cfg.patch_nums), cfg.num_point_tokens}))
    names, ids = [], []
    for d in args.object:
        names.append(str(d))
        ids.append(object_tokens(d, vqvae, signature["fingerprint"], lengths))
    for f in args.tokens:
        names.append(str(f))
        ids.append(read_tokens(f, lengths, vqvae.quantizer.vocab_size))
    for f in mesh_files(args.mesh):
        names.append(str(f))
        ids.append(mesh_tokens(f, vqvae, args.up))
    del vqvae
    model = load_captioner(args.ckpt, device, llm=args.llm, dtype=args.dtype)
    batch = torch.stack([x[:cfg.num_point_tokens] for x in ids])
    captions = model.generate(batch, question, greedy=not args.sample, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    for name, text in zip(names, captions):
        print(f"{name}: {text}")
    return 0


if __name__ == "__main__":
    run(main)
