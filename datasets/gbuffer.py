"""The official SAR3D G-buffer layout: read, write, and a Dataset for both training stages.

Layout: `<root>/dataset.json` maps any category name to a list of object directories relative
to the root (the official data uses shards 1..8, ours uses the category name). Per object:

| file | content |
|---|---|
| raw_img.png | (H, 12H, 3) uint8, the 12 views side by side, RGB on white |
| depth_alpha.jpg | (2H, 12H) uint8 gray: quantised disparity above, alpha below |
| d_near_far.npy | (2, 12) float32 disparity bounds: depth = 1 / (v/255 (far - near) + near) |
| c.npy | (12, 25) float32: row-major OpenCV camera-to-world, then normalised K |
| bbox.npy | (12, 4) int64 foreground box (top, left, bottom, right), inclusive, 256-px units |
| normal.png | (H, 12H, 3) uint8 world normals (n + 1) / 2, white background (unused for training) |
| caption_3dtopia.txt, ins.txt | caption; instance id |
| caption_variants.json | optional: several captions of the object, the first the caption above (make_shapes) |

plus, after scripts/precompute.py or from the official release, the token and condition files
in TOKEN_FILES. Depth is camera z (along the optical axis); a decoded depth above 2.9 is
background, as in the official loader, so the writer places background at disparity 1/3.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from datasets.errors import DatasetError, log
from datasets.occupancy import read_occupancy_zup
from models.inputs import NUM_VIEWS
from utils.cameras import plucker_rays

BACKGROUND_DEPTH = 2.9          # the official loader zeroes decoded depth above this
BACKGROUND_DISPARITY = 1 / 3.0  # what the writer stores as d_near: v = 0 decodes to depth 3

VIEW_FILES = ("raw_img.png", "depth_alpha.jpg", "d_near_far.npy", "c.npy", "bbox.npy",
              "caption_3dtopia.txt", "ins.txt")
TOKEN_FILES = {
    "gt_BL": "gt_BL_dim_8_l2norm_lrm_256.npy",                     # (L,) token ids
    "x_BLCv": "x_BLCv_wo_first_l_dim_8_l2_norm_lrm_256.npy",        # (L - 3, Cvae) teacher forcing
}
CONDITION_FILES = {
    "image": {"tokens_and_pooled": "image_dino_embedding_lrm.npy"},  # (1 + T, D), row 0 pooled
    "text": {"tokens": "text_embedding_lrm_3dtopia.npy", "pooled": "text_pooler_output_lrm_3dtopia.npy"},
}
# Condition variants (precompute.py): every caption of caption_variants.json through the text
# encoder ((V, T, D) and (V, D), row 0 the first caption's; with --text-encoder, for the objects
# that have the file) and every view through the image encoder ((V, 1 + T, D), row 0 of each
# pooled, as the official file; with --image-encoder and --all-views).
TEXT_VARIANT_FILES = {"tokens": "text_variants_embedding.npy", "pooled": "text_variants_pooler_output.npy"}
IMAGE_VARIANT_FILE = "image_variants_embedding.npy"
# The unconditional embeddings, once per dataset at its root (the official files/): token sequence
# ((1 + T, D) for the image, row 0 pooled, as the per-object file; (77, D) for text) and pooled (D,).
EMPTY_FILES = {"image": ("empty_dino_embedding.npy", "empty_dino_pooler_output.npy"),
               "text": ("empty_text_embedding.npy", "empty_text_pooler_output.npy")}


# ----------------------------------------------------------------------------- writing

def encode_depth_alpha(depth_VHW: np.ndarray, alpha_VHW: np.ndarray):
    """Quantise camera-z depth (0 = empty) into the official gray image and bounds.

    Returns (image (2H, V*W) uint8, d_near_far (2, V) float32).
    """
    V, H, W = depth_VHW.shape
    fg = depth_VHW > 0
    if fg.any() and depth_VHW[fg].max() >= BACKGROUND_DEPTH:
        raise ValueError(f"object depth {depth_VHW[fg].max():.3f} reaches the official background "
                         f"threshold {BACKGROUND_DEPTH}: move the cameras closer")
    d_near = np.full(V, BACKGROUND_DISPARITY)
    d_far = np.array([1.0 / depth_VHW[v][fg[v]].min() if fg[v].any() else 1.0 for v in range(V)])
    disp = np.where(fg, 1.0 / np.where(fg, depth_VHW, 1.0), BACKGROUND_DISPARITY)
    q = (disp - d_near[:, None, None]) / (d_far - d_near)[:, None, None]
    q = np.clip(np.round(q * 255), 0, 255).astype(np.uint8)
    a = np.clip(np.round(alpha_VHW * 255), 0, 255).astype(np.uint8)
    img = np.concatenate([np.concatenate(list(q), 1), np.concatenate(list(a), 1)], 0)
    return img, np.stack([d_near, d_far]).astype(np.float32)


def decode_depth(gray_VHW: np.ndarray, d_near_far: np.ndarray) -> np.ndarray:
    """The official decoding: depth = 1 / (v/255 (far - near) + near); above 2.9 is background (0)."""
    d_near = d_near_far[0].reshape(-1, 1, 1).astype(np.float64)
    d_far = d_near_far[1].reshape(-1, 1, 1).astype(np.float64)
    depth = 1.0 / ((gray_VHW / 255.0) * (d_far - d_near) + d_near)
    depth[depth > BACKGROUND_DEPTH] = 0.0
    return depth.astype(np.float32)


def foreground_bbox(alpha_VHW: np.ndarray) -> np.ndarray:
    """(V, 4) int64 (top, left, bottom, right), inclusive, in 256-px units as the official files."""
    V, H, W = alpha_VHW.shape
    s = 256.0 / H
    out = np.zeros((V, 4), np.int64)
    for v in range(V):
        rows, cols = np.nonzero(alpha_VHW[v] > 0)
        if len(rows):
            out[v] = [rows.min() * s, cols.min() * s, min(255, (rows.max() + 1) * s - 1),
                      min(255, (cols.max() + 1) * s - 1)]
    return out


def write_gbuffer_object(obj_dir, rgb, alpha, depth, normal, c_V25, caption: str, ins: str,
                         jpeg_quality: int = 100):
    """Write one object from float renders: rgb (V, H, W, 3) in [0, 1] on white, alpha and
    depth (V, H, W), normal (V, H, W, 3) unit or 0, cameras (V, 25)."""
    obj_dir = Path(obj_dir)
    obj_dir.mkdir(parents=True, exist_ok=True)
    tile = lambda x: np.concatenate(list(x), 1)
    Image.fromarray(tile(np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8))).save(obj_dir / "raw_img.png")
    nrm = np.where((np.abs(normal).sum(-1) > 0)[..., None], (normal + 1) / 2, 1.0)
    Image.fromarray(tile(np.round(np.clip(nrm, 0, 1) * 255).astype(np.uint8))).save(obj_dir / "normal.png")
    gray, d_near_far = encode_depth_alpha(depth, alpha)
    Image.fromarray(gray, mode="L").save(obj_dir / "depth_alpha.jpg", quality=jpeg_quality)
    np.save(obj_dir / "d_near_far.npy", d_near_far)
    np.save(obj_dir / "c.npy", np.asarray(c_V25, np.float32))
    np.save(obj_dir / "bbox.npy", foreground_bbox(alpha))
    (obj_dir / "caption_3dtopia.txt").write_text(caption, encoding="utf-8")
    (obj_dir / "ins.txt").write_text(ins, encoding="utf-8")


def write_index(root, index: dict):
    """dataset.json: {category: [object dirs relative to root]}."""
    Path(root, "dataset.json").write_text(json.dumps(index, indent=1) + "\n")


# ----------------------------------------------------------------------------- reading

def read_image(path, mode: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode != mode:
                raise DatasetError(path, f"image mode {im.mode}, expected {mode}")
            return np.array(im)
    except FileNotFoundError:
        raise DatasetError(path, "missing file") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        raise DatasetError(path, f"corrupt or truncated image ({e})") from None


def read_npy(path, shape=None, dtype_kind: str | None = None) -> np.ndarray:
    """np.load without pickles; `shape` may hold None for a free axis; dtype_kind 'f', 'i'..."""
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DatasetError(path, "missing file") from None
    except (ValueError, OSError, EOFError, MemoryError) as e:
        raise DatasetError(path, f"not a readable .npy array ({e})") from None
    if not isinstance(arr, np.ndarray):
        raise DatasetError(path, "not a single .npy array")
    if shape is not None and (arr.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, arr.shape))):
        want = "(" + ", ".join("N" if s is None else str(s) for s in shape) + ")"
        raise DatasetError(path, f"shape {tuple(arr.shape)}, expected {want}")
    if dtype_kind is not None and arr.dtype.kind not in dtype_kind:
        raise DatasetError(path, f"dtype {arr.dtype}, expected kind '{dtype_kind}'")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise DatasetError(path, "contains NaN or inf")
    return arr


def read_text(path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise DatasetError(path, "missing file") from None
    except (UnicodeDecodeError, OSError) as e:
        raise DatasetError(path, f"unreadable text ({e})") from None


def read_caption_variants(obj_dir) -> list:
    """OBJ/caption_variants.json: a non-empty list of non-empty captions."""
    path = Path(obj_dir) / "caption_variants.json"
    try:
        captions = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DatasetError(path, f"not JSON ({e})") from None
    if not (isinstance(captions, list) and captions and all(isinstance(c, str) and c.strip() for c in captions)):
        raise DatasetError(path, "expected a non-empty list of non-empty captions")
    return captions


def read_gbuffer_object(obj_dir) -> dict:
    """Decode one object's V views (V from c.npy; 12 officially). Returns numpy arrays: rgb (V, H, W, 3) uint8, depth (V, H, W)
    float32 (0 = background, decoded as the official loader does), alpha (V, H, W) in [0, 1],
    c (V, 25), bbox (V, 4), plus caption and ins strings. Raises DatasetError naming the file."""
    d = Path(obj_dir)
    c = read_npy(d / "c.npy", (None, 25), "f")
    V = c.shape[0]                                   # 12 in the official data
    raw = read_image(d / "raw_img.png", "RGB")
    H, VW, _ = raw.shape
    if VW != V * H:
        raise DatasetError(d / "raw_img.png", f"size {H}x{VW}, expected {H}x{V * H} ({V} square views, as c.npy)")
    gray = read_image(d / "depth_alpha.jpg", "L")
    if gray.shape != (2 * H, V * H):
        raise DatasetError(d / "depth_alpha.jpg", f"size {gray.shape[0]}x{gray.shape[1]}, expected {2 * H}x{V * H}")
    near_far = read_npy(d / "d_near_far.npy", (2, V), "f")
    bbox = read_npy(d / "bbox.npy", (V, 4), "iuf")
    split = lambda x: x.reshape(x.shape[0], V, H, *x.shape[2:]).swapaxes(0, 1)
    return {
        "rgb": split(raw),
        "depth": decode_depth(split(gray[:H]).astype(np.float64), near_far),
        "alpha": split(gray[H:]).astype(np.float32) / 255.0,
        "c": c.astype(np.float32),
        "bbox": bbox,
        "caption": read_text(d / "caption_3dtopia.txt"),
        "ins": read_text(d / "ins.txt"),
    }


def read_precomputed(obj_dir, condition: str | None = None, vocab_size: int | None = None) -> dict:
    """Token ids, teacher-forcing input and (optionally) the condition embeddings of one object.

    condition: None, "image" (DINOv2: 'cond_tokens' (T, D), 'cond_pooled' (D,) from row 0),
    "text" (CLIP: 'cond_tokens' (77, D), 'cond_pooled' (D,)), or "text_variants" / "image_variants"
    (every caption of caption_variants.json / every view: 'cond_tokens_variants' (V, T, D),
    'cond_pooled_variants' (V, D)). The token ids must lie in [0, vocab_size): the given one, else
    the one the dataset root records for the VQVAE that wrote them (tokenizer.json, when there is
    one).
    """
    d = Path(obj_dir)
    gt = read_npy(d / TOKEN_FILES["gt_BL"], (None,), "iu")
    if vocab_size is None:
        vocab_size = recorded_vocab_size(d.parent)
    if gt.size and (gt.min() < 0 or (vocab_size is not None and gt.max() >= vocab_size)):
        bad = int(gt.min()) if gt.min() < 0 else int(gt.max())
        limit = f"[0, {vocab_size})" if vocab_size is not None else "0 and up"
        raise DatasetError(d / TOKEN_FILES["gt_BL"], f"token id {bad} is outside the vocabulary {limit}; the file "
                           "is damaged or from another VQVAE: rerun scripts/precompute.py with --overwrite")
    x = read_npy(d / TOKEN_FILES["x_BLCv"], (None, None), "f")
    if gt.shape[0] < 4 or x.shape[0] != gt.shape[0] - 3:
        raise DatasetError(d / TOKEN_FILES["x_BLCv"], f"{x.shape[0]} rows for {gt.shape[0]} tokens, "
                           "expected tokens - 3 (the first scale of the 3 planes is not an input)")
    out = {"gt_BL": torch.from_numpy(gt.astype(np.int64)), "x_BLCv": torch.from_numpy(x.astype(np.float32))}
    if condition == "image":
        emb = read_npy(d / CONDITION_FILES["image"]["tokens_and_pooled"], (None, None), "f")
        out["cond_tokens"], out["cond_pooled"] = torch.from_numpy(emb[1:]).float(), torch.from_numpy(emb[0]).float()
    elif condition == "text":
        out["cond_tokens"] = torch.from_numpy(read_npy(d / CONDITION_FILES["text"]["tokens"], (None, None), "f")).float()
        out["cond_pooled"] = torch.from_numpy(read_npy(d / CONDITION_FILES["text"]["pooled"], (None,), "f")).float()
    elif condition == "text_variants":
        path = d / TEXT_VARIANT_FILES["tokens"]
        if not path.is_file():
            raise DatasetError(path, "missing caption-variant embeddings: scripts/make_shapes.py writes "
                               "caption_variants.json, then scripts/precompute.py --text-encoder encodes them")
        tok = read_npy(path, (None, None, None), "f")
        pooled = read_npy(d / TEXT_VARIANT_FILES["pooled"], (tok.shape[0], tok.shape[2]), "f")
        out["cond_tokens_variants"] = torch.from_numpy(tok).float()
        out["cond_pooled_variants"] = torch.from_numpy(pooled).float()
    elif condition == "image_variants":
        path = d / IMAGE_VARIANT_FILE
        if not path.is_file():
            raise DatasetError(path, "missing embeddings of every view: scripts/precompute.py --image-encoder "
                               "ENCODER --all-views writes them")
        emb = torch.from_numpy(read_npy(path, (None, None, None), "f")).float()
        out["cond_tokens_variants"], out["cond_pooled_variants"] = emb[:, 1:], emb[:, 0]
    elif condition is not None:
        raise ValueError(f"unknown condition {condition!r}: use None, 'image', 'text', 'text_variants' or "
                         "'image_variants'")
    return out


def recorded_vocab_size(folder) -> int | None:
    """The vocabulary size in the tokenizer record (tokenizer.json, written by scripts/precompute.py)
    of the dataset root that holds `folder`: the nearest of it and its parents (up to 4 levels)
    with a dataset.json. None when there is no readable record (the official release has none)."""
    for root in [Path(folder), *Path(folder).parents][:5]:
        if (root / "dataset.json").is_file():
            try:
                record = json.loads((root / "tokenizer.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
            size = record.get("vocab_size") if isinstance(record, dict) else None
            return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None
    return None


def load_index(root) -> dict:
    """dataset.json as {category: [relative dirs]}, validated."""
    path = Path(root) / "dataset.json"
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(path, "missing file: not a G-buffer dataset root") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(path, f"not valid JSON ({e})") from None
    if not isinstance(index, dict) or not all(isinstance(v, list) and all(isinstance(s, str) for s in v)
                                              for v in index.values()):
        raise DatasetError(path, "expected {category: [relative object dirs]}")
    for category, rels in index.items():
        for rel in rels:
            confined(root, rel, path, category)
    return index


def confined(root, rel: str, index_file=None, category=None) -> Path:
    """root/rel, checked to be a folder inside root: an entry that is absolute, climbs out with
    '..', names the root itself or holds a NUL is a DatasetError naming dataset.json and the
    entry. The check is on the path as written (made absolute and normalised): folders that the
    dataset links in from elsewhere with symlinks inside the root stay usable."""
    index_file = index_file or Path(root) / "dataset.json"
    top = os.path.abspath(root)
    bad = "\0" in rel or not rel.strip() or os.path.isabs(rel)
    if not bad:
        full = os.path.normpath(os.path.join(top, rel))
        bad = full == top or os.path.commonpath([top, full]) != top
    if bad:
        where = f" of '{category}'" if category is not None else ""
        raise DatasetError(index_file, f"entry {rel!r}{where} is not a folder inside the dataset root; entries are "
                           "object folders relative to the root, without '..' or a leading '/': fix the entry")
    return Path(root) / rel


def dino_view(obj_dir) -> int:
    """The view the official DINO embedding was taken from: (id % 4) + 1 with id the object's
    folder name ("4 images correspond to one caption"); a name that is not a number counts by
    its characters, so the choice does not depend on the split."""
    name = Path(obj_dir).name
    obj_id = int(name) if name.isdigit() else sum(map(ord, name))
    return obj_id % 4 + 1


class GBufferDataset(torch.utils.data.Dataset):
    """Objects of a G-buffer dataset, for the VQVAE (views) or the AR model (tokens).

    split: "train" (all but the last `holdout` objects of each category, as the official AR
    loader), "val" (the last `holdout`), or "all". mode: "views" returns the decoded views,
    "tokens" the precomputed tokens (+ condition embeddings when `condition` is set), "both"
    returns both. With `cache`, each object is decoded once and kept in memory (about 3 MB per
    64 x 64 object in views mode; one cache per loader worker), for trainers that go over a small
    dataset many times; the same tensors are returned again, so callers must not modify them in
    place. With skip_bad, a damaged object is logged, counted in `num_skipped` and returned as
    None (use datasets.errors.collate_skipping); otherwise DatasetError is raised.

    A views sample: rgb (12, 3, H, W) in [0, 1], depth (12, H, W), alpha (12, H, W), c (12, 25),
    plucker (12, 6, H, W) rays of c through the pixel centres, bbox (12, 4); with `resolution` set, also target_rgb/target_depth/target_alpha resized
    bilinearly to it as the official loader does for supervision. With `occupancy`, also the
    object's occupancy files in the same world (datasets.occupancy.read_occupancy_zup).
    """

    def __init__(self, root, split: str = "train", holdout: int = 100, categories=None,
                 mode: str = "views", condition: str | None = None, resolution: int | None = None,
                 skip_bad: bool = False, cache: bool = False, occupancy: bool = False):
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be train, val or all, got {split!r}")
        if mode not in ("views", "tokens", "both"):
            raise ValueError(f"mode must be views, tokens or both, got {mode!r}")
        self.root, self.mode, self.condition = Path(root), mode, condition
        self.resolution, self.skip_bad, self.num_skipped = resolution, skip_bad, 0
        self.occupancy = occupancy
        self._cache = {} if cache else None
        index = load_index(self.root)
        unknown = set(categories or ()) - set(index)
        if unknown:
            raise DatasetError(self.root / "dataset.json", f"unknown categories {sorted(unknown)}; has {sorted(index)}")
        self.categories = list(categories or index)
        self.items = []
        for ci, cat in enumerate(self.categories):
            objs = index[cat]
            chosen = {"train": objs[:max(len(objs) - holdout, 0)], "val": objs[max(len(objs) - holdout, 0):],
                      "all": objs}[split]
            self.items += [(rel, ci) for rel in chosen]
        if not self.items:
            raise DatasetError(self.root / "dataset.json", f"split '{split}' is empty (holdout={holdout} "
                               "objects per category); lower the holdout")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        rel, ci = self.items[i]
        try:
            out = self._load(self.root / rel, ci)
        except DatasetError as e:
            if not self.skip_bad:
                raise
            self.num_skipped += 1
            log.warning("skipping damaged object (%d so far): %s", self.num_skipped, e)
            return None
        if self._cache is not None:
            self._cache[i] = out
        return out

    def _load(self, d: Path, ci: int) -> dict:
        out = {"category": ci, "path": str(d)}
        if self.mode in ("views", "both"):
            obj = read_gbuffer_object(d)
            rgb = torch.from_numpy(obj["rgb"]).permute(0, 3, 1, 2).float() / 255.0
            c = torch.from_numpy(obj["c"])
            out.update(rgb=rgb, depth=torch.from_numpy(obj["depth"]), alpha=torch.from_numpy(obj["alpha"]),
                       c=c, plucker=plucker_rays(c, *rgb.shape[-2:]),
                       bbox=torch.from_numpy(obj["bbox"].astype(np.int64)), caption=obj["caption"], ins=obj["ins"])
            if self.resolution is not None:
                size = (self.resolution, self.resolution)
                up = lambda x: F.interpolate(x, size=size, mode="bilinear", align_corners=False)
                out.update(target_rgb=up(rgb), target_depth=up(out["depth"][:, None])[:, 0],
                           target_alpha=up(out["alpha"][:, None])[:, 0])
        if self.occupancy:
            out.update(read_occupancy_zup(d))
        if self.mode in ("tokens", "both"):
            out.update(read_precomputed(d, self.condition))
            if "caption" not in out:
                out["caption"] = read_text(d / "caption_3dtopia.txt")
        return out
