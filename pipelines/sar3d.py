"""Text- or image-to-3D as a library: condition encoder -> next-scale generator -> VQVAE triplane
-> mesh and turntable. Models load once; each call samples objects for one input.

    from pipelines import SAR3DPipeline
    pipe = SAR3DPipeline.from_pretrained("checkpoints/demo", condition="text")
    objects = pipe("a red torus", num_samples=1, seed=0)
    objects[0].save("outputs/red_torus")      # mesh.glb, turntable.mp4 + .gif, preview.png, tokens.npy

A pipeline folder holds our checkpoint folders `vqvae/` (or `vqvae_flexicubes/`), `ar_text/`,
`ar_image/`, or the official files under their official names (vqvae-ckpt.pt,
text-condition-ckpt.pth, ...; models/official.py): checkpoints/demo is one, checkpoints/ with
the official release is another.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from models.ar import Condition, NextScaleAR, load_ar
from models.conditioners import load_conditioner, pil_to_tensor
from models.layout import check_pair, object_sequence, tokenizer_signature
from models.precision import autocast, check_precision, set_precision
from models.official import FILE_NAMES, load_official
from models.vqvae import TriplaneVQVAE, load_vqvae
from renderers.mesh_render import ColoredMesh, render_views
from renderers.nerf_mesh import MESH_FORMATS, extract_mesh, write_mesh
from utils.cameras import normalized_intrinsics, orbit_c2w, pack_cameras
from utils.media import to_uint8, write_gif, write_grid, write_mp4

ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = ROOT / "checkpoints" / "demo"
OFFICIAL_DIR = ROOT / "checkpoints"


MAX_SAMPLES = 64                # objects in one call (each is a full decode, mesh and render)
MAX_SIDE = 4096                 # pixels a side of an input image


@dataclass
class SamplingConfig:
    """How tokens are drawn (the defaults are sample.py's: the official guidance 4, top-k 10,
    top-p 0.5). Checked when made; the messages name sample.py's flags."""
    guidance: float = 4.0            # classifier-free guidance weight, ramped over the scales
    top_k: int = 10
    top_p: float = 0.5
    temperature: float = 1.0

    def __post_init__(self):
        if not math.isfinite(self.guidance):
            raise ValueError(f"--guidance {self.guidance}: must be a finite number (the official weight is 4)")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"--top-k {self.top_k}: must be 0 (no limit) or more")
        if not 0.0 <= self.top_p <= 1.0:         # NaN fails too
            raise ValueError(f"--top-p {self.top_p}: must be between 0 and 1 (0: no limit)")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"--temperature {self.temperature}: must be a positive finite number (1: as trained)")


def check_prompt(text: str, where: str = "--prompt") -> str:
    """A prompt the encoders can take: UTF-8 encodable (a byte that is not UTF-8 reaches Python
    as a lone surrogate), not empty. Returns it stripped."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = ord(text[e.start])
        byte = f"the byte 0x{bad - 0xDC00:02x}" if 0xDC80 <= bad <= 0xDCFF else f"the code point U+{bad:04X}"
        raise ValueError(f"{where}: not valid UTF-8 text ({byte} at character {e.start + 1}); "
                         "write the prompt in UTF-8") from None
    if not text.strip():
        raise ValueError(f"{where}: empty prompt; describe the object, e.g. --prompt \"a red torus\"")
    return text.strip()


@dataclass
class Object3D:
    """One sampled object. tokens: (3·Σpn²,) int64 in generator order; triplane (1, 3·C, R, R);
    mesh: (vertices (N, 3) world units, faces (F, 3), colours (N, 3) uint8), or None with the
    reason in mesh_error; frames: the turntable (N, R, R, 3) uint8 from azimuth 0, or only the
    views preview.png shows (preview_indices) when the pipeline ran with video=False; times:
    seconds per stage; image: the conditioning image (3, S, S) for image input."""
    tokens: np.ndarray
    triplane: torch.Tensor
    mesh: tuple | None = None
    mesh_error: str | None = None
    frames: np.ndarray | None = None
    times: dict = field(default_factory=dict)
    image: torch.Tensor | None = None

    @staticmethod
    def preview_indices(frames: int) -> list[int]:
        """The frames of a `frames`-view turntable that preview.png shows: up to 8, evenly spaced
        from frame 0 (every frames // 8-th)."""
        return list(range(0, frames, max(1, frames // 8)))[:8]

    def save(self, folder, formats=(".glb",), video: bool = True) -> Path:
        """Write tokens.npy, mesh.<format> for each of `formats` (.glb +y up, .obj/.ply +z up:
        renderers.nerf_mesh.write_mesh), preview.png (up to 8 turntable views), turntable.mp4 and
        .gif of all `frames` (video), and input.png for image input. Returns the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "tokens.npy", self.tokens)
        if self.mesh is not None:
            for fmt in formats:
                write_mesh(folder / f"mesh{fmt}", *self.mesh)
        if self.frames is not None:
            write_grid(folder / "preview.png", self.frames[self.preview_indices(len(self.frames))], cols=4)
            if video:
                write_mp4(folder / "turntable.mp4", self.frames)
                write_gif(folder / "turntable.gif", self.frames)
        if self.image is not None:
            Image.fromarray(to_uint8(self.image)).save(folder / "input.png")
        return folder


def load_image(path, max_side: int = MAX_SIDE, name: str | None = None) -> torch.Tensor:
    """An RGB(A) file -> (3, S, S) in [0, 1]: transparency composited on white, then padded to a
    square on white (the official test-time preprocessing). Images over `max_side` pixels on a
    side are refused from their header, before anything is decoded. Errors name the file as
    `name` (default: "--image PATH")."""
    name = name or f"--image {path}"
    try:
        with warnings.catch_warnings():     # PIL warns about large images: refused below instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError:
        raise ValueError(f"{name}: over {Image.MAX_IMAGE_PIXELS // 500_000} Mpixel, too large to decode; "
                         f"downscale it to at most {max_side} pixels a side") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        raise ValueError(f"{name}: not a readable image file") from None
    with im:
        w, h = im.size
        if max(w, h) > max_side:
            raise ValueError(f"{name}: {w}x{h} pixels is too large (at most {max_side} pixels a side); "
                             "downscale it")
        try:
            im.load()
            x = pil_to_tensor(im)
        except (OSError, ValueError, SyntaxError, EOFError):
            raise ValueError(f"{name}: not a readable image file") from None
    _, h, w = x.shape
    if min(h, w) < 8:
        raise ValueError(f"{name}: {w}x{h} pixels is too small (at least 8x8)")
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    return torch.nn.functional.pad(x, (left, side - w - left, top, side - h - top), value=1.0)


def _checkpoint(folder: Path, ours: str, official: str, flag: str, given) -> Path:
    """The checkpoint `given` (a path), else our folder `ours` or the official file in `folder`;
    a one-line error naming the flag and where the checkpoint goes."""
    if given is not None:
        if not Path(given).exists():
            raise FileNotFoundError(f"{flag}: no checkpoint at {given}; pass the checkpoint folder or official file")
        return Path(given)
    for candidate in (folder / ours, folder / official):
        if candidate.exists():
            return candidate
    hint = ("rebuild the demo models with bash scripts/train_demo.sh" if folder == DEMO_DIR else
            f"put our checkpoint folder {ours}/ or the official {official} there")
    raise FileNotFoundError(f"{flag}: no checkpoint at {folder / ours} or {folder / official}; {hint}, "
                            f"or pass {flag} PATH")


def orbit_cameras(azimuths, elevation: float = 20.0, radius: float = 2.0) -> np.ndarray:
    """(V, 25) cameras around the +z axis at these azimuths (degrees from +x towards +y), from
    `radius` world units at `elevation` degrees, through the official 39.6 degree field of view."""
    c2w = np.stack([orbit_c2w(float(a), elevation, radius) for a in azimuths])
    return pack_cameras(c2w, normalized_intrinsics())


def mesh_views(mesh: tuple, azimuths, resolution: int, elevation: float = 20.0, radius: float = 2.0, *,
               shading: str = "unlit", device="cpu", progress: bool | None = False) -> np.ndarray:
    """(len(azimuths), R, R, 3) uint8 views on white of a mesh (vertices (N, 3) world units, +z
    up, faces (F, 3), colours (N, 3) uint8 or in [0, 1]), rasterised with 3x3 supersampling, its
    colours drawn as they are (unlit) or under the renderer's fixed lights (lit)."""
    v, f, c = (np.asarray(a) for a in mesh)
    c = c / 255.0 if c.dtype == np.uint8 else c
    rgb = render_views(ColoredMesh(v.astype(np.float32), f.astype(np.int64), c.astype(np.float32)),
                       orbit_cameras(azimuths, elevation, radius), resolution, ssaa=3, device=str(device),
                       shading=shading, progress=progress, threads=1)["rgb"]
    return np.round(np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8)


class Decoder3D:
    """A VQVAE loaded once: token ids -> triplanes -> views, turntables and meshes."""

    def __init__(self, vqvae: TriplaneVQVAE, device=None):
        self.vqvae = vqvae
        self.device = torch.device(device) if device is not None else next(vqvae.parameters()).device

    @torch.no_grad()
    def triplanes(self, idx: list) -> torch.Tensor:
        """Token ids per scale ((B·3, pn²) each) -> triplanes (B, 3·C, R, R)."""
        return self.vqvae.decode_tokens(idx)

    @torch.no_grad()
    def views(self, triplane: torch.Tensor, azimuths, resolution: int, elevation: float = 20.0,
              radius: float = 2.0, *, mesh: tuple | None = None, source: str = "auto",
              progress: bool | None = False) -> np.ndarray:
        """(len(azimuths), R, R, 3) uint8 views on white, R = resolution, around the +z axis at
        these azimuths (degrees from +x towards +y), from `radius` world units at `elevation`
        degrees, through the official 39.6 degree field of view (utils/cameras.py).

        source: "field" volume-renders the triplane (vqvae.render, deterministic samples);
        "mesh" rasterises `mesh` (vertices (N, 3) world units, faces (F, 3), colours (N, 3) uint8
        or in [0, 1], as `mesh` returns it) with its colours unlit and 3x3 supersampling: the
        colours of a triplane's mesh already hold the lighting its volume render shows, and on a
        CPU this is 10-30x faster (scripts/bench_render.py); "auto": the mesh when it has faces,
        else the field.
        progress: a tqdm bar over the views (None: on a terminal)."""
        if source not in ("auto", "mesh", "field"):
            raise ValueError(f"unknown render source {source!r}: use auto, mesh or field")
        has_mesh = mesh is not None and len(mesh[1]) > 0
        if source == "mesh" and not has_mesh:
            raise ValueError("source='mesh' needs a mesh with faces: (vertices, faces, colours)")
        if has_mesh and source != "field":
            return mesh_views(mesh, azimuths, resolution, elevation, radius, device=self.device, progress=progress)
        cams = orbit_cameras(azimuths, elevation, radius)
        cams = torch.from_numpy(cams).float().to(self.device)
        images = [self.vqvae.render(triplane, c[None], resolution=resolution, deterministic=True)["image_raw"]
                  for c in tqdm(cams, desc="render", unit="view", disable=None if progress is None else not progress)]
        return to_uint8((torch.cat(images) + 1) / 2)

    def turntable(self, triplane: torch.Tensor, frames: int, resolution: int, *, mesh: tuple | None = None,
                  source: str = "auto", indices=None, progress: bool | None = False) -> np.ndarray:
        """Views of a turntable of `frames` views 360/frames degrees apart from azimuth 0, at
        20 degrees elevation: (len(indices), R, R, 3) uint8, the frames `indices` of it (default
        all of them, in order). mesh, source, progress: as in `views`."""
        picked = range(frames) if indices is None else indices
        return self.views(triplane, [360.0 * f / frames for f in picked], resolution, mesh=mesh, source=source,
                          progress=progress)

    def mesh(self, triplane: torch.Tensor, resolution: int):
        """-> vertices (N, 3) world units, faces (F, 3), colours (N, 3) uint8. ValueError when
        the triplane holds no surface."""
        r = self.vqvae.renderer
        if self.vqvae.cfg.renderer_kind == "flexicubes":
            v, f, c = r.extract_mesh(triplane)[0]
            return v.cpu().numpy(), f.cpu().numpy(), np.round(c.cpu().numpy() * 255).astype(np.uint8)
        return extract_mesh(r, triplane, resolution=resolution, progress=False)


def load_tokenizer(source, decoder: str = "nerf", device="cpu") -> TriplaneVQVAE:
    """Our VQVAE folder, or an official file converted on the fly, checked to decode with `decoder`."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"--vqvae: no checkpoint at {source}; pass the checkpoint folder or official file")
    if source.is_file() and source.suffix != ".safetensors":
        model = load_official("vqvae-flexicubes" if decoder == "flexicubes" else "vqvae", source)[0].to(device)
    else:
        model = load_vqvae(source, device)
    if model.cfg.renderer_kind != decoder:
        raise ValueError(f"--decoder {decoder}: the VQVAE {source} decodes with {model.cfg.renderer_kind}; "
                         f"pass --decoder {model.cfg.renderer_kind} or a {decoder} VQVAE")
    return model


def load_generator(source, condition: str, device="cpu") -> NextScaleAR:
    """Our generator folder, or an official file converted on the fly, checked to take `condition`."""
    source = Path(source)
    if source.is_file() and source.suffix != ".safetensors":
        return load_official(f"ar-{condition}", source)[0].to(device)
    model = load_ar(source, device)
    if model.cfg.condition != condition:
        raise ValueError(f"--ar {source}: a {model.cfg.condition}-conditioned generator cannot take a {condition} input")
    return model


class SAR3DPipeline(Decoder3D):
    """Everything loaded once: the condition encoder, the generator and the VQVAE of one
    condition kind ("text" or "image")."""

    def __init__(self, condition: str, vqvae: TriplaneVQVAE, ar: NextScaleAR, encoder, device=None,
                 names: tuple = ("the VQVAE", "the generator"), precision: str = "fp32"):
        check_pair(tokenizer_signature(vqvae.quantizer), vars(ar.cfg), *names)
        want = {ar.cfg.pooled_dim} | ({ar.cfg.seq_dim} if ar.cfg.cross_attn != "none" else set())
        if want != {encoder.dim}:
            raise ValueError(f"the {condition} encoder gives {encoder.dim}-wide embeddings but the generator expects "
                             f"{sorted(want)}: pass the encoder it was trained with (--{condition}-encoder)")
        super().__init__(vqvae, device)
        self.condition, self.encoder, self.precision = condition, encoder, precision
        self.ar = set_precision(ar, precision, self.device)
        tokens, pooled = encoder.empty()
        self.uncond = Condition(pooled=pooled, tokens=tokens)

    @classmethod
    def from_pretrained(cls, folder=None, condition: str = "text", *, vqvae=None, ar=None, encoder=None,
                        decoder: str = "nerf", device=None, precision: str = "fp32") -> "SAR3DPipeline":
        """The models of a pipeline folder (default: the embedded demo, checkpoints/demo); `vqvae`
        and `ar` override its checkpoints (our folders or official files), `encoder` the
        condition encoder the generator was trained with (models/conditioners.py sources);
        precision: the generator's (models/precision.py: fp32, int8 on CPU, bf16)."""
        if condition not in ("text", "image"):
            raise ValueError(f"condition must be text or image, got {condition!r}")
        if decoder not in ("nerf", "flexicubes"):
            raise ValueError(f"--decoder {decoder!r}: use nerf or flexicubes")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        check_precision(precision, device)
        folder = Path(folder) if folder is not None else DEMO_DIR
        vq_kind = "vqvae-flexicubes" if decoder == "flexicubes" else "vqvae"
        vq_src = _checkpoint(folder, vq_kind.replace("-", "_"), FILE_NAMES[vq_kind], "--vqvae", vqvae)
        ar_src = _checkpoint(folder, f"ar_{condition}", FILE_NAMES[f"ar-{condition}"], "--ar", ar)
        vq_model = load_tokenizer(vq_src, decoder, device)
        ar_model = load_generator(ar_src, condition, device)
        names = (f"the VQVAE {vq_src}", f"the generator {ar_src}")
        check_pair(tokenizer_signature(vq_model.quantizer), vars(ar_model.cfg), *names)   # before the encoder loads
        enc = load_conditioner(condition, encoder or ar_model.cfg.encoder or None, device)
        return cls(condition, vq_model, ar_model, enc, device, names, precision)

    @torch.no_grad()
    def sample_tokens(self, x, num_samples: int = 1, seed: int = 0, sampling: SamplingConfig | None = None,
                      times: dict | None = None) -> list:
        """Token ids of num_samples objects for an input (a prompt, or an image (3, H, W) in
        [0, 1]) or for each of a list of them, all sampled as one batch with one generator
        seeded by `seed` (so a batch's draws differ from those of its inputs alone): per scale
        (N·num_samples·3, pn²), input by input. `times` receives the encode and sample seconds."""
        s = sampling or SamplingConfig()
        times = {} if times is None else times
        t = time.perf_counter()
        tokens, pooled = self.encoder.encode(x if isinstance(x, list) else [x])
        times["encode"] = time.perf_counter() - t
        t = time.perf_counter()
        cond = Condition(pooled=pooled.repeat_interleave(num_samples, 0),
                         tokens=tokens.repeat_interleave(num_samples, 0))
        with autocast(self.precision, self.device):
            idx = self.ar.sample(self.vqvae.quantizer, cond, self.uncond, guidance=s.guidance, top_k=s.top_k,
                                 top_p=s.top_p, temperature=s.temperature, seed=seed)
        times["sample"] = time.perf_counter() - t
        return idx

    def _input(self, x):
        """A prompt (checked, stripped), or an image as a (3, H, W) tensor in [0, 1] from a path,
        a PIL image or a tensor."""
        if self.condition == "text":
            if not isinstance(x, str):
                raise ValueError(f"a text pipeline takes a prompt (a string), got {type(x).__name__}")
            return check_prompt(x)
        if isinstance(x, (str, Path)):
            return load_image(x)
        if isinstance(x, Image.Image):
            if max(x.size) > MAX_SIDE:
                raise ValueError(f"image of {x.size[0]}x{x.size[1]} pixels: at most {MAX_SIDE} pixels a side; "
                                 "downscale it")
            x = pil_to_tensor(x)
        if not (isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[0] == 3):
            raise ValueError("image input: pass an image file, a PIL image or a (3, H, W) tensor in [0, 1]")
        return x

    def __call__(self, x, num_samples: int = 1, seed: int = 0, sampling: SamplingConfig | None = None, *,
                 mesh_resolution: int = 128, frames: int = 24, render_resolution: int = 128,
                 mesh: bool = True, video: bool = True, render_source: str = "auto",
                 progress: bool | None = None) -> list[Object3D]:
        """Sample objects for one input (a prompt, an image (3, H, W) tensor in [0, 1], a PIL
        image or an image path) or for a list of inputs, sampled as one batch (sample_tokens).
        Returns num_samples Object3D per input, input by input, each with its mesh (mesh=True) and
        turntable of `frames` views (0: none), or with video=False only the up to 8 of them that
        preview.png shows; their times hold the whole batch's encode, sample and decode seconds
        and the object's own mesh and render seconds. render_source: "auto" (the mesh when there
        is one, else the field), "mesh" or "field" (Decoder3D.views); progress: a tqdm bar over
        the rendered views (None: on a terminal)."""
        if isinstance(x, list) and not x:
            raise ValueError("no inputs: pass a prompt or image, or a list of them")
        xs = [self._input(v) for v in x] if isinstance(x, list) else [self._input(x)]
        if not (isinstance(num_samples, int) and 1 <= num_samples <= MAX_SAMPLES // len(xs)):
            raise ValueError(f"--num-samples {num_samples!r}: between 1 and {MAX_SAMPLES} objects in one batch "
                             f"({len(xs)} inputs)")
        times: dict = {}
        idx = self.sample_tokens(xs if isinstance(x, list) else xs[0], num_samples, seed, sampling, times)
        t = time.perf_counter()
        planes = self.triplanes(idx)
        times["decode"] = time.perf_counter() - t
        out = []
        for k in range(len(xs) * num_samples):
            obj = Object3D(tokens=object_sequence(idx, k).cpu().numpy().astype(np.int64),
                           triplane=planes[k:k + 1], times=dict(times),
                           image=xs[k // num_samples] if self.condition == "image" else None)
            t = time.perf_counter()
            if mesh:
                try:
                    obj.mesh = self.mesh(obj.triplane, mesh_resolution)
                except ValueError as e:        # an empty sample: no surface to mesh
                    obj.mesh_error = str(e)
            obj.times["mesh"] = time.perf_counter() - t
            t = time.perf_counter()
            if frames:                         # without a video, only the views preview.png shows
                obj.frames = self.turntable(obj.triplane, frames, render_resolution, mesh=obj.mesh,
                                            source=render_source, progress=progress,
                                            indices=None if video else Object3D.preview_indices(frames))
            obj.times["render"] = time.perf_counter() - t
            out.append(obj)
        return out


