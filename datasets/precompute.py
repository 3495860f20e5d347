"""Precompute the generator's inputs for every object of a G-buffer dataset (scripts/precompute.py
is its command line): token ids and teacher-forcing input from a VQVAE, and the condition
embeddings of the image and text encoders, under the official file names
(datasets.gbuffer.TOKEN_FILES and CONDITION_FILES), in generator order (models.layout).

The dataset root also receives the encoders' unconditional embeddings (EMPTY_FILES) and
TOKENIZER_FILE, the signature of the VQVAE that wrote the tokens (models.layout.tokenizer_signature):
a later run with another VQVAE refuses to mix its tokens in, and train_ar.py records the
signature in the generator so that sampling refuses a generator paired with another VQVAE.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from datasets.errors import DatasetError
from datasets.gbuffer import (CONDITION_FILES, EMPTY_FILES, IMAGE_VARIANT_FILE, TEXT_VARIANT_FILES, TOKEN_FILES,
                              GBufferDataset, confined, dino_view, read_caption_variants, read_gbuffer_object,
                              read_text)
from models.conditioners import load_conditioner
from models.inputs import encoder_views, input_view_sets
from models.layout import check_pair, planes_to_sequence, tokenizer_signature
from models.vqvae import load_vqvae

log = logging.getLogger("precompute")

TOKENIZER_FILE = "tokenizer.json"
OUTPUT_FILES = {"tokens": tuple(TOKEN_FILES.values()),
                "image": tuple(CONDITION_FILES["image"].values()),
                "text": tuple(CONDITION_FILES["text"].values()),
                "text_variants": tuple(TEXT_VARIANT_FILES.values()),    # objects with caption_variants.json
                "image_variants": (IMAGE_VARIANT_FILE,)}


def read_tokenizer_record(root, name: str = TOKENIZER_FILE) -> dict | None:
    """The signature of the tokenizer whose tokens a dataset holds (TOKENIZER_FILE for the SAR3D
    VQVAE, OCCUPANCY_TOKENIZER_FILE for the Argus-3D one), or None when the tokens came from
    elsewhere (the official release)."""
    path = Path(root) / name
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or not {"vocab_size", "fingerprint"} <= set(record) or not (
                {"patch_nums", "c_vae"} <= set(record) or "num_tokens" in record):
            raise ValueError("missing keys")
    except (ValueError, UnicodeDecodeError) as e:
        raise DatasetError(path, f"not a tokenizer record ({e}); delete it and rerun scripts/precompute.py "
                           "with --overwrite") from None
    return record


def as_generator_side(record: dict) -> dict:
    """A tokenizer record in the form models.layout.check_pair takes for the tokens' side."""
    return {**record, "tokenizer": record["fingerprint"]}


def save_npy(path: Path, arr: np.ndarray):
    """np.save through a temporary name, so an interrupted run leaves no half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- work items

class Pending(torch.utils.data.Dataset):
    """The objects that miss some outputs; loads (in DataLoader workers) only what those need:
    {'dir', 'needs', 'view_size' (H), 'encoder_input' (V, 10, R, R), 'dino_image' (3, H, W) in [0, 1],
    'all_views' (12, 3, H, W), 'caption', 'caption_variants'}."""

    def __init__(self, dataset: GBufferDataset, jobs: list, num_views: int, res: int, views_from: Path | None = None):
        self.dataset, self.jobs, self.num_views, self.res = dataset, jobs, num_views, res
        self.views_from = views_from

    def __len__(self):
        return len(self.jobs)

    def __getitem__(self, j):
        i, needs = self.jobs[j]
        rel = self.dataset.items[i][0]
        d = confined(self.dataset.root, rel)                            # never a folder outside the root
        out = {"dir": d, "needs": needs}
        rgb = None
        if "tokens" in needs:
            sample = self.dataset[i]
            rgb = sample["rgb"]
            out["view_size"] = rgb.shape[-1]
            views = input_view_sets(self.num_views, total=rgb.shape[0])[0]
            out["encoder_input"] = encoder_views(rgb[None], sample["depth"][None], sample["c"][None], views, self.res)
        if needs & {"image", "image_variants"}:
            if rgb is None or self.views_from is not None:
                src = d if self.views_from is None else confined(self.views_from, rel)
                rgb = torch.from_numpy(read_gbuffer_object(src)["rgb"]).permute(0, 3, 1, 2).float() / 255.0
            if "image" in needs:
                out["dino_image"] = rgb[dino_view(d)]
            if "image_variants" in needs:
                out["all_views"] = rgb
        if "text" in needs:
            out["caption"] = read_text(d / "caption_3dtopia.txt")
        if "text_variants" in needs:
            out["caption_variants"] = read_caption_variants(d)
        return out


def find_jobs(dataset: GBufferDataset, wanted: set, overwrite: bool) -> list:
    """[(dataset index, set of outputs to write)] for the objects that miss any."""
    jobs = []
    for i, (rel, _) in enumerate(dataset.items):
        d = confined(dataset.root, rel)
        needs = {k for k in wanted if overwrite or not all((d / f).is_file() for f in OUTPUT_FILES[k])}
        if not (d / "caption_variants.json").is_file():
            needs.discard("text_variants")
        if needs:
            jobs.append((i, needs))
    return jobs


@torch.no_grad()
def write_batch(batch: list, vqvae, image_enc, text_enc, device):
    """Encode one batch of Pending items and write their files."""
    items = [b for b in batch if "tokens" in b["needs"]]
    if items:
        idx_Bl = vqvae.tokenize(torch.cat([b["encoder_input"] for b in items]).to(device))
        x_Blc = vqvae.quantizer.idx_to_var_input(idx_Bl)       # (B·3, L − pn0², C), scales per plane
        sizes = [pn * pn for pn in vqvae.quantizer.patch_nums[1:]]
        gt_BL = planes_to_sequence(idx_Bl).cpu().numpy().astype(np.int64)
        x_BLC = planes_to_sequence(list(x_Blc.split(sizes, dim=1))).cpu().numpy().astype(np.float32)
        for b, gt, x in zip(items, gt_BL, x_BLC):
            save_npy(b["dir"] / TOKEN_FILES["gt_BL"], gt)
            save_npy(b["dir"] / TOKEN_FILES["x_BLCv"], x)
    items = [b for b in batch if "image" in b["needs"]]
    if items:
        tokens, pooled = image_enc.encode(torch.stack([b["dino_image"] for b in items]))
        # The official file is DINOv2's last_hidden_state, whose row 0 (CLS) is the pooled vector.
        emb = torch.cat([pooled[:, None], tokens], 1).cpu().numpy()
        for b, e in zip(items, emb):
            save_npy(b["dir"] / CONDITION_FILES["image"]["tokens_and_pooled"], e)
    items = [b for b in batch if "image_variants" in b["needs"]]
    for b in items:                                 # one object's views at a time: V images
        tokens, pooled = image_enc.encode(b["all_views"])
        save_npy(b["dir"] / IMAGE_VARIANT_FILE, torch.cat([pooled[:, None], tokens], 1).cpu().numpy())
    items = [b for b in batch if "text" in b["needs"]]
    if items:
        tokens, pooled = text_enc.encode([b["caption"] for b in items])
        for b, t, p in zip(items, tokens.cpu().numpy(), pooled.cpu().numpy()):
            save_npy(b["dir"] / CONDITION_FILES["text"]["tokens"], t)
            save_npy(b["dir"] / CONDITION_FILES["text"]["pooled"], p)
    items = [b for b in batch if "text_variants" in b["needs"]]
    if items:
        tokens, pooled = text_enc.encode([c for b in items for c in b["caption_variants"]])
        first = 0
        for b in items:
            n = len(b["caption_variants"])
            save_npy(b["dir"] / TEXT_VARIANT_FILES["tokens"], tokens[first:first + n].cpu().numpy())
            save_npy(b["dir"] / TEXT_VARIANT_FILES["pooled"], pooled[first:first + n].cpu().numpy())
            first += n


def write_empty(root: Path, kind: str, enc) -> None:
    """The encoder's unconditional embedding at the dataset root, under the official names
    (EMPTY_FILES), for the generator's guidance dropout."""
    tokens, pooled = (x.cpu().numpy().astype(np.float32) for x in enc.empty())
    seq_name, pooled_name = EMPTY_FILES[kind]
    save_npy(root / seq_name, np.concatenate([pooled[None], tokens]) if kind == "image" else tokens)
    save_npy(root / pooled_name, pooled)


def precompute(data_dir, vqvae_dir, image_encoder=None, text_encoder=None, split: str = "all",
               holdout: int = 100, batch_size: int = 8, workers: int = 0, device="cpu",
               overwrite: bool = False, all_views: bool = False, views_from=None) -> str:
    """Write what the objects of `split` miss (all of it with `overwrite`); an encoder source
    (models/conditioners.py) turns its embeddings on (the text encoder's also of the caption
    variants; `all_views`, the image encoder's of every view). `views_from`: the image embeddings
    of the same objects (category/id) in that dataset instead, such as make_shapes' turned objects
    for an --upright one. Returns a one-line summary."""
    data_dir = Path(data_dir)
    dataset = GBufferDataset(data_dir, split=split, holdout=holdout, mode="views")
    wanted = {"tokens"} | {k for k, source in (("image", image_encoder), ("text", text_encoder)) if source}
    if text_encoder:
        wanted.add("text_variants")
    if all_views:
        if not image_encoder:
            raise ValueError("--all-views encodes every view with the image encoder: give --image-encoder too")
        wanted.add("image_variants")
    if views_from is not None and not image_encoder:
        raise ValueError("--views-from gives the image encoder other views: give --image-encoder too")
    jobs = find_jobs(dataset, wanted, overwrite)
    done = len(dataset) - len(jobs)
    if not jobs:
        return f"nothing to do: all {len(dataset)} objects of '{split}' have their files (--overwrite redoes them)"
    # Loaded once; the encoders only when some object misses their files.
    vqvae = load_vqvae(vqvae_dir, device)
    needed = set().union(*(needs for _, needs in jobs))
    signature = {**tokenizer_signature(vqvae.quantizer), "source": str(vqvae_dir)}
    record = read_tokenizer_record(data_dir)
    if "tokens" in needed and record is not None and not overwrite:
        try:
            check_pair(signature, as_generator_side(record), f"--vqvae {vqvae_dir}",
                       f"the tokens in {data_dir} (written by {record.get('source', 'another VQVAE')})")
        except ValueError as e:
            raise ValueError(f"{e}; or pass --overwrite to recompute every object's tokens") from None
    image_enc = load_conditioner("image", image_encoder, device) if needed & {"image", "image_variants"} else None
    text_enc = load_conditioner("text", text_encoder, device) if needed & {"text", "text_variants"} else None
    for kind, enc in (("image", image_enc), ("text", text_enc)):
        if enc is not None:
            write_empty(data_dir, kind, enc)
    if "tokens" in needed:
        (data_dir / TOKENIZER_FILE).write_text(json.dumps(signature, indent=1) + "\n")
    res = vqvae.cfg.input_size
    loader = torch.utils.data.DataLoader(Pending(dataset, jobs, vqvae.cfg.encoder.num_views, res,
                                                 None if views_from is None else Path(views_from)),
                                         batch_size=batch_size, num_workers=workers, collate_fn=list)
    resized = set()
    with tqdm(total=len(jobs), unit="obj", desc="precompute", dynamic_ncols=True) as bar:
        for batch in loader:
            for size in {b["view_size"] for b in batch if "view_size" in b} - resized - {res}:
                resized.add(size)
                log.info("views of %d px, the VQVAE encodes %d px: resizing them", size, res)
            write_batch(batch, vqvae, image_enc, text_enc, device)
            bar.update(len(batch))
    return f"wrote {len(jobs)} objects ({done} already done) under {data_dir}: {', '.join(sorted(wanted))}"


OCCUPANCY_TOKENIZER_FILE = "occupancy_tokenizer.json"


@torch.no_grad()
def precompute_occupancy_tokens(data_dir, ckpt, split: str = "train", inputs: int = 30000, device="cpu",
                                overwrite: bool = False) -> str:
    """The Argus-3D tokenizer's token ids of every shape of an occupancy dataset's `split`, in
    each shape's folder as OCCUPANCY_TOKENS ({'index': (L²,) int64}); the input points are drawn
    from the shape's position in the split, so reruns write the same ids."""
    from datasets.occupancy import OCCUPANCY_TOKENS, OccupancyDataset, subsample
    from models.occupancy_vqvae import load_occupancy_vqvae
    model = load_occupancy_vqvae(ckpt, device)
    signature = {**tokenizer_signature(model.quantizer), "source": str(ckpt)}
    record = read_tokenizer_record(data_dir, OCCUPANCY_TOKENIZER_FILE)
    if record is not None and not overwrite and record["fingerprint"] != signature["fingerprint"]:
        raise ValueError(f"the occupancy tokens in {data_dir} were written by another tokenizer "
                         f"({record.get('source', '?')}) than {ckpt}; pass --overwrite to recompute every shape's tokens")
    (Path(data_dir) / OCCUPANCY_TOKENIZER_FILE).write_text(json.dumps(signature, indent=1) + "\n")
    ds = OccupancyDataset(data_dir, split, num_points=1, pointcloud_n=1 << 30, noise=0.0, float16_noise=0.0)
    done = 0
    for i in tqdm(range(len(ds)), desc="occupancy tokens", unit="shape", dynamic_ncols=True):
        cat, shape, _ = ds.items[i]
        out = Path(data_dir) / cat / shape / OCCUPANCY_TOKENS
        if out.is_file() and not overwrite:
            done += 1
            continue
        surface = ds[i]["inputs"]
        pick = subsample(len(surface), inputs, torch.Generator().manual_seed(i))
        ids = model.tokenize(surface[pick][None].to(device))[0].cpu().numpy().astype(np.int64)
        tmp = out.with_name(out.name + ".tmp.npz")
        np.savez(tmp, index=ids)
        os.replace(tmp, out)
    return f"wrote the tokens of {len(ds) - done} shapes ({done} already done) of '{split}' under {data_dir}"
