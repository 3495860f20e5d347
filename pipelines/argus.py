"""Class-, text- or image-guided 3D with Argus-3D as a library: raster-order generator -> token
ids -> occupancy tokenizer's planes -> MISE mesh (the official generation) -> turntable.

    from pipelines import ArgusPipeline
    pipe = ArgusPipeline.from_pretrained()                     # the embedded demo (class-guided)
    objects = pipe("torus", num_samples=4, seed=0)             # a category name of the generator
    objects[0].save("outputs/torus_0")                          # mesh.glb, turntable, preview.png, tokens.npy

    # the released model, converted once by scripts/convert_official.py --kind argus-stage2
    pipe = ArgusPipeline.from_pretrained("checkpoints/argus")  # OUT/tokenizer + OUT/generator
    objects = pipe("chair", num_samples=16, sampling=ArgusSampling(top_k=250))

A pipeline folder holds `tokenizer/` and `generator/` (what the converter writes), or, in
checkpoints/demo, `argus_tokenizer/` and `argus_class/`. Meshes come out +z up like every mesh of
this codebase (the tokenizer works in ShapeNet's +y up frame), grey, and are rendered lit.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from datasets.occupancy import ZUP_TO_YUP
from models.ar import Condition
from models.conditioners import load_conditioner
from models.layout import check_pair, tokenizer_signature
from models.occupancy_vqvae import PLANES, OccupancyVQVAE, load_occupancy_vqvae
from models.raster_ar import RasterAR, load_raster_ar
from pipelines.sar3d import DEMO_DIR, MAX_SAMPLES, Object3D, check_prompt, load_image, mesh_views
from renderers.occupancy_mesh import extract_occupancy_mesh

GREY = 190
INPUT_FLAGS = {"class": "a category (--cate)", "text": "a prompt (--prompt)", "image": "an image (--image)"}


@dataclass
class ArgusSampling:
    """How tokens are drawn (the defaults are the official script's: top-k 250, temperature 1,
    no guidance)."""
    guidance: float = 0.0            # classifier-free guidance weight (generators trained with cond_drop > 0)
    top_k: int = 250
    top_p: float = 0.0
    temperature: float = 1.0

    def __post_init__(self):
        if not math.isfinite(self.guidance):
            raise ValueError(f"--guidance {self.guidance}: must be a finite number")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"--top-k {self.top_k}: must be 0 (no limit) or more")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"--top-p {self.top_p}: must be between 0 and 1 (0: no limit)")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"--temperature {self.temperature}: must be a positive finite number")


def _folder(folder: Path, names: tuple, flag: str, given) -> Path:
    if given is not None:
        if not Path(given).exists():
            raise FileNotFoundError(f"{flag}: no checkpoint at {given}; pass our checkpoint folder")
        return Path(given)
    for name in names:
        if (folder / name).exists():
            return folder / name
    hint = ("rebuild the demo models with bash scripts/train_demo.sh" if folder == DEMO_DIR else
            "convert the official model_stage2.pt there with scripts/convert_official.py --kind argus-stage2")
    raise FileNotFoundError(f"{flag}: no checkpoint at {folder / names[0]} or {folder / names[-1]}; {hint}, "
                            f"or pass {flag} PATH")


@torch.no_grad()
def tokenizer_mesh(tokenizer: OccupancyVQVAE, planes: dict) -> tuple:
    """One object's decoded planes -> (vertices (N, 3) +z up, faces (F, 3), grey colours (N, 3)
    uint8) by the official MISE (resolution 32, 2 up-sampling steps, threshold 0.2). ValueError
    when there is no surface."""
    device = next(tokenizer.parameters()).device

    def logits(points: torch.Tensor) -> torch.Tensor:
        return tokenizer.query(planes, points.to(device)[None])[0].cpu()
    v, f = extract_occupancy_mesh(logits, padding=tokenizer.cfg.padding)
    if len(f) == 0:
        raise ValueError("the decoded shape has no surface (empty occupancy)")
    return v @ ZUP_TO_YUP, f, np.full((len(v), 3), GREY, np.uint8)


class ArgusPipeline:
    """The tokenizer, the generator and (image/text generators) the condition encoder, loaded once."""

    def __init__(self, tokenizer: OccupancyVQVAE, generator: RasterAR, encoder=None, device=None,
                 names: tuple = ("the tokenizer", "the generator")):
        check_pair(tokenizer_signature(tokenizer.quantizer), vars(generator.cfg), *names,
                   "pass the tokenizer whose ids the generator was trained on")
        self.tokenizer, self.generator, self.encoder = tokenizer, generator, encoder
        self.device = torch.device(device) if device is not None else next(generator.parameters()).device

    @classmethod
    def from_pretrained(cls, folder=None, *, tokenizer=None, generator=None, encoder=None, device=None,
                        condition: str = "class") -> "ArgusPipeline":
        """The models of a pipeline folder (default: the embedded demo, checkpoints/demo); `tokenizer`
        and `generator` override its checkpoint folders, `encoder` the condition encoder of an
        image/text generator (default: the one it was trained with)."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        folder = Path(folder) if folder is not None else DEMO_DIR
        tok_src = _folder(folder, ("argus_tokenizer", "tokenizer"), "--vqvae", tokenizer)
        gen_src = _folder(folder, (f"argus_{condition}", "generator"), "--ar", generator)
        tok, gen = load_occupancy_vqvae(tok_src, device), load_raster_ar(gen_src, device)
        if gen.cfg.condition != condition:
            raise ValueError(f"the generator {gen_src} is {gen.cfg.condition}-guided, not {condition}-guided: "
                             f"give it {INPUT_FLAGS[gen.cfg.condition]}")
        enc = None
        if gen.cfg.condition != "class":
            enc = load_conditioner(gen.cfg.condition, encoder or gen.cfg.encoder or None, device)
        return cls(tok, gen, enc, device, (f"the tokenizer {tok_src}", f"the generator {gen_src}"))

    def condition(self, x) -> Condition:
        """One input as the generator's condition: a category name, a prompt, or an image (a path
        or a (3, H, W) tensor in [0, 1])."""
        kind = self.generator.cfg.condition
        if kind == "class":
            if not isinstance(x, str):
                raise ValueError("a class-guided generator takes a category name (--cate)")
            label = self.generator.class_index(x.strip())
            return Condition(labels=torch.tensor([label], device=self.device))
        if kind == "text":
            if not isinstance(x, str):
                raise ValueError("a text-guided generator takes a prompt (--prompt)")
            x = check_prompt(x)
        elif isinstance(x, (str, Path)):
            x = load_image(x)
        _, pooled = self.encoder.encode([x])
        return Condition(pooled=pooled.to(self.device))

    def __call__(self, x, num_samples: int = 1, seed: int = 0, sampling: ArgusSampling | None = None, *,
                 frames: int = 24, render_resolution: int = 128, mesh: bool = True, video: bool = True,
                 progress: bool | None = None) -> list[Object3D]:
        """Sample num_samples objects for one input in one batch. Each Object3D has its tokens
        (L²,), triplane (1, 3·C, R, R) (planes xz, xy, yz), mesh (or mesh_error when the sample is
        empty), turntable (`frames` views, or with video=False the preview's) and times: the
        batch's sample and decode seconds, its own mesh and render seconds."""
        s = sampling or ArgusSampling()
        if not (isinstance(num_samples, int) and 1 <= num_samples <= MAX_SAMPLES):
            raise ValueError(f"--num-samples {num_samples!r}: between 1 and {MAX_SAMPLES} objects per input")
        times: dict = {}
        t = time.perf_counter()
        cond = self.condition(x)
        times["encode"] = time.perf_counter() - t
        t = time.perf_counter()
        ids = self.generator.sample(None, cond, batch=num_samples, guidance=s.guidance, top_k=s.top_k, top_p=s.top_p,
                                    temperature=s.temperature, seed=seed, progress=bool(progress))
        times["sample"] = time.perf_counter() - t
        t = time.perf_counter()
        with torch.no_grad():
            planes = self.tokenizer.decode_tokens(ids)
        times["decode"] = time.perf_counter() - t
        out = []
        for k in range(num_samples):
            mine = {n: planes[n][k:k + 1] for n in PLANES}
            obj = Object3D(tokens=ids[k].cpu().numpy().astype(np.int64),
                           triplane=torch.cat([mine[n] for n in PLANES], 1), times=dict(times))
            t = time.perf_counter()
            if mesh:
                try:
                    obj.mesh = tokenizer_mesh(self.tokenizer, mine)
                except ValueError as e:
                    obj.mesh_error = str(e)
            obj.times["mesh"] = time.perf_counter() - t
            t = time.perf_counter()
            if frames and obj.mesh is not None:
                picked = range(frames) if video else Object3D.preview_indices(frames)
                obj.frames = mesh_views(obj.mesh, [360.0 * f / frames for f in picked], render_resolution,
                                        shading="lit", device=self.device, progress=progress)
            obj.times["render"] = time.perf_counter() - t
            out.append(obj)
        return out
