#!/usr/bin/env python
"""Text- or image-to-3D: condition encoder -> next-scale generator -> VQVAE triplane -> mesh,
turntable and preview.

    python sample.py --prompt "a red torus"
    python sample.py --prompts test_files/test_text.json --num-samples 2 --seed 1
    python sample.py --image test_files/images/            # a file or a folder of images
    python sample.py --official --prompt "a wooden chair"  # the official weights in checkpoints/

With no model arguments it runs the embedded demo model in checkpoints/demo (README: what it is
and is not). --vqvae and --ar take our checkpoint folders, or an official checkpoint file, which
is converted on the fly (scripts/convert_official.py does it once). The work is done by
pipelines.SAR3DPipeline; this file only reads the inputs and writes the outputs. Per object, in
OUTPUT_DIR/<input name>_<sample>/: mesh.glb (--formats), turntable.mp4 and .gif, preview.png and
tokens.npy (the token ids in generator order, int64 (3·Σpn²,)). One line of timings per object.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipelines.sar3d import MESH_FORMATS, OFFICIAL_DIR, SamplingConfig, SAR3DPipeline, load_image  # noqa: E402
from utils.cli import run  # noqa: E402

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_prompts(path: Path) -> list[str]:
    """The official test_text.json ({"test_promts": [...]}, sic) or a plain JSON list of strings."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"--prompts {path}: not a readable JSON file ({e})") from None
    if isinstance(data, dict):
        data = data.get("test_promts", data.get("test_prompts"))
    if not isinstance(data, list) or not data or not all(isinstance(p, str) for p in data):
        raise ValueError(f"--prompts {path}: expected a non-empty list of strings, or {{\"test_promts\": [...]}}")
    for p in data:
        if not p.strip():
            raise ValueError(f"{path}: empty prompt; describe the object, e.g. \"a red torus\"")
    return [p.strip() for p in data]


def image_paths(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"--image {path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return files
    if not path.is_file():
        raise ValueError(f"--image {path}: no such file or folder")
    return [path]


def slug(text: str, limit: int = 48) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:limit] or "object"


def parse_args(argv=None):
    d = SamplingConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one text prompt")
    src.add_argument("--prompts", type=Path, help="JSON: {\"test_promts\": [...]} (official) or a list of prompts")
    src.add_argument("--image", type=Path, help="an RGB(A) image, or a folder of them")
    ap.add_argument("--num-samples", type=int, default=1, help="objects per prompt or image")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--guidance", "--cfg", type=float, default=d.guidance,
                    help=f"classifier-free guidance weight (official --cfg {d.guidance:g})")
    ap.add_argument("--top-k", type=int, default=d.top_k)
    ap.add_argument("--top-p", type=float, default=d.top_p)
    ap.add_argument("--temperature", type=float, default=d.temperature)
    ap.add_argument("--vqvae", help="our VQVAE folder or an official checkpoint file (default: the demo model)")
    ap.add_argument("--ar", help="our generator folder or an official checkpoint file (default: the demo model)")
    ap.add_argument("--official", action="store_true",
                    help="use the official checkpoints in checkpoints/ (vqvae-ckpt.pt, text-/image-condition-ckpt.pth)")
    ap.add_argument("--text-encoder", help="text encoder (default: the one the generator was trained with)")
    ap.add_argument("--image-encoder", help="image encoder (default: the one the generator was trained with)")
    ap.add_argument("--decoder", default="nerf", help="nerf or flexicubes (needs a FlexiCubes VQVAE)")
    ap.add_argument("--mesh-resolution", type=int, default=128, help="marching-cubes grid of the NeRF mesh")
    ap.add_argument("--formats", default="glb", help=f"comma-separated mesh formats: {', '.join(f[1:] for f in MESH_FORMATS)}")
    ap.add_argument("--render-resolution", type=int, default=128, help="turntable and preview size")
    ap.add_argument("--frames", type=int, default=24, help="turntable frames (15 degrees apart by default)")
    ap.add_argument("--no-video", action="store_true", help="skip the turntable MP4 and GIF")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--output-dir", type=Path, default=Path("outputs"))
    args = ap.parse_args(argv)
    if args.decoder not in ("nerf", "flexicubes"):
        raise ValueError(f"--decoder {args.decoder!r}: use nerf or flexicubes")
    args.formats = [f".{f.strip().lower().lstrip('.')}" for f in args.formats.split(",") if f.strip()]
    bad = [f for f in args.formats if f not in MESH_FORMATS]
    if bad or not args.formats:
        raise ValueError(f"--formats: unknown {', '.join(bad) or 'empty list'}; use {', '.join(f[1:] for f in MESH_FORMATS)}")
    for name in ("num_samples", "frames", "render_resolution", "mesh_resolution"):
        if getattr(args, name) < (2 if name == "mesh_resolution" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.image is not None:
        kind, paths = "image", image_paths(args.image)
        inputs, names = [load_image(p) for p in paths], [slug(p.stem) for p in paths]
    else:
        kind = "text"
        if args.prompt is not None and not args.prompt.strip():
            raise ValueError("--prompt: empty prompt; describe the object, e.g. --prompt \"a red torus\"")
        inputs = [args.prompt.strip()] if args.prompt is not None else read_prompts(args.prompts)
        names = [slug(p) for p in inputs]
    t0 = time.perf_counter()
    pipe = SAR3DPipeline.from_pretrained(OFFICIAL_DIR if args.official else None, kind, vqvae=args.vqvae, ar=args.ar,
                                         encoder=getattr(args, f"{kind}_encoder"), decoder=args.decoder,
                                         device=args.device)
    print(f"loaded models in {time.perf_counter() - t0:.1f} s", flush=True)
    sampling = SamplingConfig(args.guidance, args.top_k, args.top_p, args.temperature)
    for i, (x, name) in enumerate(zip(inputs, names)):
        objects = pipe(x, args.num_samples, args.seed + i, sampling, mesh_resolution=args.mesh_resolution,
                       frames=args.frames, render_resolution=args.render_resolution)
        times: dict = {"write": 0.0}
        for k, obj in enumerate(objects):
            t = time.perf_counter()
            out = obj.save(args.output_dir / f"{name}_{k}", args.formats, video=not args.no_video)
            times["write"] += time.perf_counter() - t
            if obj.mesh_error:
                print(f"warning: {out}: no mesh ({obj.mesh_error})", file=sys.stderr)
            print(f"wrote {out}", flush=True)
            for stage, seconds in obj.times.items():
                times[stage] = seconds if stage in ("encode", "sample", "decode") else times.get(stage, 0) + seconds
        print(f"[{i + 1}/{len(inputs)}] {name}: " + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()), flush=True)
    return 0


if __name__ == "__main__":
    run(main)
