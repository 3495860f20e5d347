#!/usr/bin/env python
"""Text- or image-to-3D with SAR3D (condition encoder -> next-scale generator -> VQVAE triplane),
or class-guided 3D with Argus-3D (raster-order generator -> occupancy planes -> MISE mesh); then
mesh, turntable and preview.

    python sample.py --prompt "a red torus"
    python sample.py --prompts test_files/test_text.json --num-samples 2 --seed 1
    python sample.py --prompts test_files/test_text.json --batch-size 8 --precision int8   # batched, faster CPU path
    python sample.py --image test_files/images/            # a file or a folder of images
    python sample.py --official --prompt "a wooden chair"  # the official weights in checkpoints/
    python sample.py --cate torus --batch-size 16          # Argus-3D: the demo's class-guided model
    python sample.py --cate chair --batch-size 16 --ar checkpoints/argus/generator \
        --vqvae checkpoints/argus/tokenizer                # the released model, converted

With no model arguments it runs the embedded demo models in checkpoints/demo (README: what they
are and are not). --cate, --model argus or an Argus-3D generator given as --ar picks Argus-3D
(pipelines/argus.py: its sampling defaults are the official top-k 250, no guidance). --vqvae and --ar take our checkpoint folders, or an official checkpoint file, which
is converted on the fly (scripts/convert_official.py does it once). The work is done by
pipelines.SAR3DPipeline; this file only reads the inputs and writes the outputs. Per object, in
OUTPUT_DIR/<input name>_<sample>/: mesh.glb (--formats), turntable.mp4 and .gif, preview.png and
tokens.npy (the token ids in generator order, int64 (3·Σpn²,)). One line of timings per object.
A folder that exists is never written into: the next free name, <input name>_<sample>-1, -2, ...,
is taken instead (inputs whose names differ only in punctuation, or a second run). The run holds
OUTPUT_DIR/.lock while it writes.
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models.precision import PRECISIONS  # noqa: E402
from pipelines.argus import ArgusPipeline, ArgusSampling  # noqa: E402
from pipelines.sar3d import (MAX_SAMPLES, MESH_FORMATS, OFFICIAL_DIR, SamplingConfig, SAR3DPipeline,  # noqa: E402
                             check_prompt, load_image)
from utils.checkpoint import CheckpointError, read_header  # noqa: E402
from utils.cli import ArgumentParser, check_device, run  # noqa: E402
from utils.config import read_utf8  # noqa: E402
from utils.lock import FolderLock  # noqa: E402

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Bounds of the output sizes: beyond them one object asks for gigabytes.
LIMITS = {"frames": 360, "render_resolution": 1024, "mesh_resolution": 512}


def read_prompts(path: Path) -> list[str]:
    """The official test_text.json ({"test_promts": [...]}, sic) or a plain JSON list of strings."""
    text = read_utf8(path, f"--prompts {path}")
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ValueError(f"--prompts {path}: not valid JSON ({e})") from None
    if isinstance(data, dict):
        data = data.get("test_promts", data.get("test_prompts"))
    if not isinstance(data, list) or not data or not all(isinstance(p, str) for p in data):
        raise ValueError(f"--prompts {path}: expected a non-empty list of strings, or {{\"test_promts\": [...]}}")
    return [check_prompt(p, f"--prompts {path}: prompt {i + 1}") for i, p in enumerate(data)]


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


def new_folder(out_dir: Path, name: str) -> Path:
    """Create and return out_dir/name, or name-1, name-2, ... when that exists (from another
    input of this run or an earlier run): an existing folder is never written into."""
    for n in range(100_000):
        folder = out_dir / (name if n == 0 else f"{name}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
        except OSError as e:
            raise ValueError(f"--output-dir {out_dir}: cannot create {folder.name} there "
                             f"({e.strerror or type(e).__name__}); "
                             "pick a writable folder") from None
    raise ValueError(f"--output-dir {out_dir}: {name} and 100000 numbered copies exist; pick another folder")


def is_argus_generator(path) -> bool:
    """Whether `path` is one of our Argus-3D generator folders (its checkpoint's own config says)."""
    if path is None or not Path(path).exists() or (Path(path).is_file() and Path(path).suffix != ".safetensors"):
        return False
    try:
        return read_header(path)[2] == "raster_ar"
    except CheckpointError:
        return False


def parse_args(argv=None):
    d, a = SamplingConfig(), ArgusSampling()
    ap = ArgumentParser(description=__doc__)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one text prompt")
    src.add_argument("--prompts", type=Path, help="JSON: {\"test_promts\": [...]} (official) or a list of prompts")
    src.add_argument("--image", type=Path, help="an RGB(A) image, or a folder of them")
    src.add_argument("--cate", help="Argus-3D: a category of the class-guided generator (the official: chair, table, ...)")
    ap.add_argument("--model", choices=("sar3d", "argus"), help="the generator family (default: argus for --cate or "
                    "an Argus-3D --ar, else sar3d)")
    ap.add_argument("--num-samples", type=int, help="objects per prompt, image or category (default 1; with a single "
                    "input and --batch-size N, N: the official Argus-3D `--batch_size 16 --cate chair`)")
    ap.add_argument("--batch-size", type=int, help=f"objects sampled together (at most {MAX_SAMPLES}): SAR3D prompts "
                    "or images are grouped up to it, each batch drawn from one generator seeded with the seed of its "
                    "first input (default: one input per batch)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed of the first input (the i-th: seed + i)")
    ap.add_argument("--guidance", "--cfg", type=float,
                    help=f"classifier-free guidance weight (default: the official {d.guidance:g} for SAR3D, "
                         f"{a.guidance:g} for Argus-3D)")
    ap.add_argument("--top-k", type=int, help=f"sample among the k likeliest tokens, 0: all (default {d.top_k}; "
                    f"Argus-3D {a.top_k})")
    ap.add_argument("--top-p", type=float, help=f"... and within this share of the mass, 0: all (default {d.top_p:g}; "
                    f"Argus-3D {a.top_p:g})")
    ap.add_argument("--temperature", type=float, default=d.temperature, help="softmax temperature")
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
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--precision", default="fp32", choices=PRECISIONS, help="the SAR3D generator's: fp32, int8 "
                    "(CPU: dynamic int8 linear layers, faster, slightly different draws) or bf16 (autocast)")
    ap.add_argument("--output-dir", type=Path, default=Path("outputs"), help="one folder per object goes here")
    args = ap.parse_args(argv)
    if args.decoder not in ("nerf", "flexicubes"):
        raise ValueError(f"--decoder {args.decoder!r}: use nerf or flexicubes")
    args.formats = [f".{f.strip().lower().lstrip('.')}" for f in args.formats.split(",") if f.strip()]
    bad = [f for f in args.formats if f not in MESH_FORMATS]
    if bad or not args.formats:
        raise ValueError(f"--formats: unknown {', '.join(bad) or 'empty list'}; use {', '.join(f[1:] for f in MESH_FORMATS)}")
    for name in ("num_samples", "batch_size", "frames", "render_resolution", "mesh_resolution"):
        if getattr(args, name) is not None and getattr(args, name) < (2 if name == "mesh_resolution" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("num_samples", "batch_size"):
        if (getattr(args, name) or 0) > MAX_SAMPLES:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: at most {MAX_SAMPLES} objects in one "
                             "batch; run again with another --seed for more")
    for name, high in LIMITS.items():
        if getattr(args, name) > high:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: at most {high}")
    if args.model is None:
        args.model = "argus" if args.cate is not None or is_argus_generator(args.ar) else "sar3d"
    if args.cate is not None and args.model != "argus":
        raise ValueError("--cate is for the class-guided Argus-3D generator; drop --model sar3d")
    if args.model == "argus" and (args.official or args.decoder != "nerf"):
        raise ValueError("--official and --decoder are SAR3D options; for the released Argus-3D model convert it "
                         "(scripts/convert_official.py --kind argus-stage2) and pass --ar and --vqvae")
    base = a if args.model == "argus" else d
    picked = [base.guidance if args.guidance is None else args.guidance, base.top_k if args.top_k is None else args.top_k,
              base.top_p if args.top_p is None else args.top_p, args.temperature]
    args.sampling = (ArgusSampling if args.model == "argus" else SamplingConfig)(*picked)
    args.device = check_device(args.device)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.image is not None:
        kind, paths = "image", image_paths(args.image)
        inputs, names = [load_image(p) for p in paths], [slug(p.stem) for p in paths]
    elif args.cate is not None:
        kind, inputs, names = "class", [args.cate.strip()], [slug(args.cate)]
    else:
        kind = "text"
        inputs = [check_prompt(args.prompt, "--prompt")] if args.prompt is not None else read_prompts(args.prompts)
        names = [slug(p) for p in inputs]
    try:
        lock = FolderLock(args.output_dir, "sample.py").acquire()
    except OSError as e:           # not a folder, or not writable
        raise ValueError(f"--output-dir {args.output_dir}: cannot write there ({e.strerror or type(e).__name__}); "
                         "pick a writable folder") from None
    try:
        return generate(args, kind, inputs, names)
    finally:
        lock.release()


def plan_batches(inputs: int, num_samples: int | None, batch_size: int | None, model: str) -> tuple[int, int]:
    """(objects per input, inputs per batch) from --num-samples and --batch-size: a single input
    with only --batch-size N gets N objects (the official Argus-3D flag); otherwise SAR3D inputs
    are grouped so that a batch holds at most max(N, objects per input) objects."""
    if num_samples is None:
        num_samples = batch_size if batch_size and inputs == 1 else 1
    if model != "sar3d":
        return num_samples, 1
    return num_samples, max(1, (batch_size or num_samples) // num_samples)


def generate(args, kind: str, inputs: list, names: list) -> int:
    """Load the models, then sample, decode and write every input's objects."""
    t0 = time.perf_counter()
    if args.model == "argus":
        pipe = ArgusPipeline.from_pretrained(tokenizer=args.vqvae, generator=args.ar, condition=kind,
                                             encoder=getattr(args, f"{kind}_encoder", None), device=args.device)
        if kind == "class":
            pipe.generator.class_index(inputs[0])          # an unknown category: one line listing the valid ones
        options = {}
    else:
        pipe = SAR3DPipeline.from_pretrained(OFFICIAL_DIR if args.official else None, kind, vqvae=args.vqvae,
                                             ar=args.ar, encoder=getattr(args, f"{kind}_encoder"),
                                             decoder=args.decoder, device=args.device, precision=args.precision)
        options = {"mesh_resolution": args.mesh_resolution}
    print(f"loaded models in {time.perf_counter() - t0:.1f} s", flush=True)
    num_samples, per_batch = plan_batches(len(inputs), args.num_samples, args.batch_size, args.model)
    for start in range(0, len(inputs), per_batch):
        xs, batch_names = inputs[start:start + per_batch], names[start:start + per_batch]
        objects = pipe(xs if args.model == "sar3d" else xs[0], num_samples, args.seed + start, args.sampling,
                       frames=args.frames, render_resolution=args.render_resolution, video=not args.no_video,
                       **options)
        times: dict = {"write": 0.0}
        empty = 0
        for j, obj in enumerate(objects):
            t = time.perf_counter()
            out = new_folder(args.output_dir, f"{batch_names[j // num_samples]}_{j % num_samples}")
            try:
                obj.save(out, args.formats, video=not args.no_video)
            except OSError as e:
                raise ValueError(f"--output-dir {args.output_dir}: writing {out.name} failed "
                                 f"({e.strerror or type(e).__name__}); free space or pick another folder") from None
            times["write"] += time.perf_counter() - t
            if obj.mesh_error:
                empty += 1
                print(f"warning: {out}: no mesh ({obj.mesh_error})", file=sys.stderr)
            print(f"wrote {out}", flush=True)
            for stage, seconds in obj.times.items():
                times[stage] = seconds if stage in ("encode", "sample", "decode") else times.get(stage, 0) + seconds
        label = batch_names[0] if len(xs) == 1 else f"{len(xs)} inputs in one batch ({', '.join(batch_names)})"
        print(f"[{start + len(xs)}/{len(inputs)}] {label}: " + ", ".join(f"{k} {v:.2f} s" for k, v in times.items())
              + (f"; {empty} of {len(objects)} samples empty (no mesh)" if empty else ""), flush=True)
    return 0


if __name__ == "__main__":
    run(main)
