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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models.captioner import load_captioner, read_captioner_config  # noqa: E402
from models.layout import check_pair, seq_len, tokenizer_signature  # noqa: E402
from pipelines.caption import mesh_files, mesh_tokens, object_tokens, open_vqvae, read_tokens  # noqa: E402
from pipelines.sar3d import DEMO_DIR, check_prompt  # noqa: E402
from utils.cli import ArgumentParser, check_device, run  # noqa: E402


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
