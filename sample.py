#!/usr/bin/env python
"""Text- or image-to-3D: condition encoder -> next-scale generator -> VQVAE triplane -> mesh,
turntable and preview.

    python sample.py --prompt "a red torus"
    python sample.py --prompts test_files/test_text.json --num-samples 2 --seed 1
    python sample.py --image test_files/images/            # a file or a folder of images
    python sample.py --official --prompt "a wooden chair"  # the official weights in checkpoints/

With no model arguments it runs the embedded demo model in checkpoints/demo (README: what it is
and is not). --vqvae and --ar take our checkpoint folders, or an official checkpoint file, which
is converted on the fly (scripts/convert_official.py does it once). Per object, in
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

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from models.ar import Condition, load_ar  # noqa: E402
from models.conditioners import load_conditioner, pil_to_tensor  # noqa: E402
from models.vqvae import load_vqvae  # noqa: E402
from renderers.nerf_mesh import MESH_FORMATS, extract_mesh, write_mesh  # noqa: E402
from utils.cameras import normalized_intrinsics, orbit_c2w, pack_cameras  # noqa: E402
from utils.cli import run  # noqa: E402
from utils.media import to_uint8, write_gif, write_grid, write_mp4  # noqa: E402

DEMO = ROOT / "checkpoints" / "demo"
DEMO_MODELS = {"vqvae": DEMO / "vqvae", "text": DEMO / "ar_text", "image": DEMO / "ar_image"}
OFFICIAL = {"vqvae": ROOT / "checkpoints" / "vqvae-ckpt.pt",
            "vqvae-flexicubes": ROOT / "checkpoints" / "vqvae-flexicubes-ckpt.pt",
            "text": ROOT / "checkpoints" / "text-condition-ckpt.pth",
            "image": ROOT / "checkpoints" / "image-condition-ckpt.pth"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# ----------------------------------------------------------------------------- inputs

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
    return [check_prompt(p, str(path)) for p in data]


def check_prompt(prompt: str, where: str = "--prompt") -> str:
    if not prompt.strip():
        raise ValueError(f"{where}: empty prompt; describe the object, e.g. --prompt \"a red torus\"")
    return prompt.strip()


def read_image(path: Path) -> torch.Tensor:
    """An RGB(A) file -> (3, S, S) in [0, 1]: transparency composited on white, then padded to a
    square on white (the official test-time preprocessing)."""
    try:
        with Image.open(path) as im:
            im.load()
            x = pil_to_tensor(im)
    except (OSError, UnidentifiedImageError, ValueError):
        raise ValueError(f"--image {path}: not a readable image file") from None
    _, h, w = x.shape
    if min(h, w) < 8:
        raise ValueError(f"--image {path}: {w}x{h} pixels is too small (at least 8x8)")
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    return torch.nn.functional.pad(x, (left, side - w - left, top, side - h - top), value=1.0)


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


# ----------------------------------------------------------------------------- models

def load_vqvae_any(source: Path, decoder: str, device):
    """Our checkpoint folder, or an official file converted on the fly."""
    if source.is_file():
        from scripts.convert_official import load_official
        model = load_official("vqvae-flexicubes" if decoder == "flexicubes" else "vqvae", source)[0].to(device)
    else:
        model = load_vqvae(source, device)
    if model.cfg.renderer_kind != decoder:
        raise ValueError(f"--decoder {decoder}: the VQVAE {source} decodes with {model.cfg.renderer_kind}; "
                         f"pass --decoder {model.cfg.renderer_kind} or a {decoder} VQVAE")
    return model


def load_ar_any(source: Path, kind: str, device):
    if source.is_file():
        from scripts.convert_official import load_official
        return load_official(f"ar-{kind}", source)[0].to(device)
    model = load_ar(source, device)
    if model.cfg.condition != kind:
        raise ValueError(f"--ar {source}: a {model.cfg.condition}-conditioned generator cannot take a {kind} input")
    return model


class Decoder3D:
    """A VQVAE loaded once: token ids -> triplanes -> views, turntables and meshes."""

    def __init__(self, vqvae, device):
        self.vqvae, self.device = vqvae, torch.device(device)

    @torch.no_grad()
    def triplanes(self, idx: list) -> torch.Tensor:
        return self.vqvae.decode_tokens(idx)

    @torch.no_grad()
    def views(self, triplane: torch.Tensor, azimuths, resolution: int, elevation: float = 20.0,
              radius: float = 2.0) -> np.ndarray:
        """(len(azimuths), R, R, 3) uint8 views around the +z axis at these azimuths (degrees)."""
        c2w = np.stack([orbit_c2w(float(a), elevation, radius) for a in azimuths])
        cams = torch.from_numpy(pack_cameras(c2w, normalized_intrinsics())).float().to(self.device)
        images = [self.vqvae.render(triplane, c[None], resolution=resolution, deterministic=True)["image_raw"]
                  for c in cams]
        return to_uint8((torch.cat(images) + 1) / 2)

    def turntable(self, triplane: torch.Tensor, frames: int, resolution: int) -> np.ndarray:
        """`frames` views 360/frames degrees apart, from azimuth 0."""
        return self.views(triplane, [360.0 * f / frames for f in range(frames)], resolution)

    def mesh(self, triplane: torch.Tensor, resolution: int):
        """-> vertices (N, 3) world units, faces (F, 3), colours (N, 3) uint8."""
        r = self.vqvae.renderer
        if self.vqvae.cfg.renderer_kind == "flexicubes":
            v, f, c = r.extract_mesh(triplane)[0]
            return v.cpu().numpy(), f.cpu().numpy(), np.round(c.cpu().numpy() * 255).astype(np.uint8)
        return extract_mesh(r, triplane, resolution=resolution, progress=False)


class Generator3D(Decoder3D):
    """Everything loaded once: the encoder, the generator and the VQVAE of one condition kind."""

    def __init__(self, kind: str, vqvae, ar, encoder, device):
        want = {ar.cfg.pooled_dim} | ({ar.cfg.seq_dim} if ar.cfg.cross_attn != "none" else set())
        if want != {encoder.dim}:
            raise ValueError(f"the {kind} encoder gives {encoder.dim}-wide embeddings but the generator expects "
                             f"{sorted(want)}: pass the encoder it was trained with (--{kind}-encoder)")
        super().__init__(vqvae, device)
        self.ar, self.encoder = ar, encoder
        tokens, pooled = encoder.empty()
        self.uncond = Condition(pooled=pooled, tokens=tokens)

    def sample(self, x, num_samples: int, seed: int, times: dict | None = None, **sampling) -> list:
        """Token ids of num_samples objects for one input (a prompt or an image (3, H, W)): per
        scale (num_samples·3, pn²). `times` receives the encode and sample seconds."""
        times = {} if times is None else times
        t = time.perf_counter()
        tokens, pooled = self.encoder.encode([x])
        times["encode"] = time.perf_counter() - t
        t = time.perf_counter()
        cond = Condition(pooled=pooled.expand(num_samples, -1), tokens=tokens.expand(num_samples, -1, -1))
        idx = self.ar.sample(self.vqvae.quantizer, cond, self.uncond, seed=seed, **sampling)
        times["sample"] = time.perf_counter() - t
        return idx


def existing_checkpoint(what: str, src: Path, official: bool = False) -> Path:
    """`src`, or a one-line error naming the argument and where the checkpoint goes."""
    if not src.exists():
        hint = ("put the official files in checkpoints/ under their official names" if official else
                "pass it by path, or rebuild the demo models with bash scripts/train_demo.sh")
        raise FileNotFoundError(f"{what}: no checkpoint at {src}; {hint}")
    return src


def build_generator(kind: str, device, vqvae: str | None = None, ar: str | None = None, encoder: str | None = None,
                    decoder: str = "nerf", official: bool = False) -> Generator3D:
    """The models of one condition kind: the given checkpoints, else the official files in
    checkpoints/ (official) or the embedded demo model; the encoder the generator was trained
    with unless `encoder` names another."""
    defaults = {"vqvae": OFFICIAL["vqvae-flexicubes" if decoder == "flexicubes" else "vqvae"],
                "ar": OFFICIAL[kind]} if official else {"vqvae": DEMO_MODELS["vqvae"], "ar": DEMO_MODELS[kind]}
    vq_src = existing_checkpoint("--vqvae", Path(vqvae or defaults["vqvae"]), official)
    ar_src = existing_checkpoint("--ar", Path(ar or defaults["ar"]), official)
    vq_model = load_vqvae_any(vq_src, decoder, device)
    ar_model = load_ar_any(ar_src, kind, device)
    encoder_src = encoder or ar_model.cfg.encoder or None
    return Generator3D(kind, vq_model, ar_model, load_conditioner(kind, encoder_src, device), device)


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one text prompt")
    src.add_argument("--prompts", type=Path, help="JSON: {\"test_promts\": [...]} (official) or a list of prompts")
    src.add_argument("--image", type=Path, help="an RGB(A) image, or a folder of them")
    ap.add_argument("--num-samples", type=int, default=1, help="objects per prompt or image")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance weight (official 4)")
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--top-p", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=1.0)
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
        inputs, names = [read_image(p) for p in paths], [slug(p.stem) for p in paths]
    else:
        kind = "text"
        inputs = [check_prompt(args.prompt)] if args.prompt is not None else read_prompts(args.prompts)
        names = [slug(p) for p in inputs]
    device = torch.device(args.device)
    t0 = time.perf_counter()
    gen = build_generator(kind, device, args.vqvae, args.ar, getattr(args, f"{kind}_encoder"), args.decoder,
                          args.official)
    print(f"loaded models in {time.perf_counter() - t0:.1f} s", flush=True)
    sampling = dict(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, temperature=args.temperature)
    for i, (x, name) in enumerate(zip(inputs, names)):
        times = {}
        idx = gen.sample(x, args.num_samples, args.seed + i, times, **sampling)
        t = time.perf_counter()
        planes = gen.triplanes(idx)
        times["decode"] = time.perf_counter() - t
        for k in range(args.num_samples):
            out = args.output_dir / f"{name}_{k}"
            out.mkdir(parents=True, exist_ok=True)
            triplane = planes[k:k + 1]
            seq = torch.cat([s[3 * k:3 * k + 3].reshape(-1) for s in idx]).cpu().numpy()
            np.save(out / "tokens.npy", seq.astype(np.int64))
            t = time.perf_counter()
            try:
                verts, faces, colours = gen.mesh(triplane, args.mesh_resolution)
                for fmt in args.formats:
                    write_mesh(out / f"mesh{fmt}", verts, faces, colours)
            except ValueError as e:            # an empty sample: keep its renders, say why there is no mesh
                print(f"warning: {out}: no mesh ({e})", file=sys.stderr)
            times["mesh"] = times.get("mesh", 0) + time.perf_counter() - t
            t = time.perf_counter()
            frames = gen.turntable(triplane, args.frames, args.render_resolution)
            write_grid(out / "preview.png", frames[:: max(1, args.frames // 8)][:8], cols=4)
            if kind == "image":
                Image.fromarray(to_uint8(x)).save(out / "input.png")
            if not args.no_video:
                write_mp4(out / "turntable.mp4", frames)
                write_gif(out / "turntable.gif", frames)
            times["render"] = times.get("render", 0) + time.perf_counter() - t
            print(f"wrote {out}", flush=True)
        print(f"[{i + 1}/{len(inputs)}] {name}: " + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()), flush=True)
    return 0


if __name__ == "__main__":
    run(main)
