#!/usr/bin/env python
"""Precompute the AR model's inputs for every object of a G-buffer dataset.

    python scripts/precompute.py --data-dir data/shapes --vqvae checkpoints/vqvae \\
        [--image-encoder [DIR|HUB_ID]] [--text-encoder [DIR|HUB_ID]] \\
        [--split all|train|val] [--batch-size 8] [--device cpu|cuda] [--workers 2] [--overwrite]

Writes into each object's folder, under the official names (datasets.gbuffer.TOKEN_FILES and
CONDITION_FILES), what GBufferDataset(mode="tokens") reads back:

| file | shape (paper) | content |
|---|---|---|
| gt_BL_dim_8_l2norm_lrm_256.npy | (2040,) int64 | token ids of encoder view set 0 (views 0-5) |
| x_BLCv_wo_first_l_dim_8_l2_norm_lrm_256.npy | (2037, 8) float32 | teacher-forcing input |
| image_dino_embedding_lrm.npy | (257, 1024) float32 | [pooled; 256 patch tokens] of view (id % 4) + 1 |
| text_embedding_lrm_3dtopia.npy, text_pooler_output_lrm_3dtopia.npy | (77, 768), (768,) | caption |

With an encoder, its unconditional embedding (a white image, the empty prompt) also goes to the
dataset root as the official files/ have it: empty_dino_embedding.npy (257, 1024) and
empty_dino_pooler_output.npy (1024,), or empty_text_embedding.npy (77, 768) and
empty_text_pooler_output.npy (768,); train_ar.py reads them for its condition dropout.

Both token files are ordered per scale as [plane 0 | plane 1 | plane 2], the AR sequence order:
gt_BL has 3·Σpn² ids, x_BLCv one row per token of scales 1.. (3·(Σpn² − pn0²) rows). The image
files are written with --image-encoder, the text files with --text-encoder (a flag alone means
the official model, facebook/dinov2-large or openai/clip-vit-large-patch14). Views whose size
differs from the VQVAE's encoder input are resized as in VQVAE training
(datasets.gbuffer.encoder_views).

Resumable: an object keeps the files it already has unless --overwrite, and each file is
written under a temporary name, then renamed. Tokens written by another VQVAE are not detected:
after changing the checkpoint, rerun with --overwrite.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.gbuffer import (CONDITION_FILES, EMPTY_FILES, TOKEN_FILES, GBufferDataset, encoder_views,  # noqa: E402
                              input_view_sets, read_text)
from models.conditioners import DEFAULT_SOURCES, load_conditioner  # noqa: E402
from models.vqvae import load_vqvae  # noqa: E402
from utils.cli import run  # noqa: E402

log = logging.getLogger("precompute")

OUTPUT_FILES = {"tokens": tuple(TOKEN_FILES.values()),
                "image": tuple(CONDITION_FILES["image"].values()),
                "text": tuple(CONDITION_FILES["text"].values())}


# ----------------------------------------------------------------------------- layouts

def planes_to_sequence(per_scale: list) -> torch.Tensor:
    """Per-scale tensors (B·3, pn², ...), row 3b+p = plane p of object b -> the AR order
    (B, 3·Σpn², ...): scales one after the other, each as [plane 0 | plane 1 | plane 2]."""
    return torch.cat([x.reshape(x.shape[0] // 3, 3 * x.shape[1], *x.shape[2:]) for x in per_scale], 1)


def sequence_to_planes(seq_BL: torch.Tensor, patch_nums) -> list:
    """The inverse of planes_to_sequence: (B, 3·Σpn², ...) -> per scale (B·3, pn², ...)."""
    sizes = [3 * pn * pn for pn in patch_nums]
    if seq_BL.shape[1] != sum(sizes):
        raise ValueError(f"{seq_BL.shape[1]} tokens, expected {sum(sizes)} for patch_nums {list(patch_nums)}")
    return [x.reshape(x.shape[0] * 3, x.shape[1] // 3, *x.shape[2:]) for x in seq_BL.split(sizes, dim=1)]


def dino_view(obj_dir: Path) -> int:
    """The view the official DINO embedding was taken from: (id % 4) + 1 with id the object's
    folder name ("4 images correspond to one caption"); a name that is not a number counts by
    its characters, so the choice does not depend on the split."""
    name = obj_dir.name
    obj_id = int(name) if name.isdigit() else sum(map(ord, name))
    return obj_id % 4 + 1


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
    'caption'}."""

    def __init__(self, dataset: GBufferDataset, jobs: list, num_views: int, res: int):
        self.dataset, self.jobs, self.num_views, self.res = dataset, jobs, num_views, res

    def __len__(self):
        return len(self.jobs)

    def __getitem__(self, j):
        i, needs = self.jobs[j]
        d = self.dataset.root / self.dataset.items[i][0]
        out = {"dir": d, "needs": needs}
        if needs & {"tokens", "image"}:
            sample = self.dataset[i]
            if "tokens" in needs:
                out["view_size"] = sample["rgb"].shape[-1]
                views = input_view_sets(self.num_views, total=sample["rgb"].shape[0])[0]
                out["encoder_input"] = encoder_views(sample["rgb"][None], sample["depth"][None], sample["c"][None],
                                                     views, self.res)
            if "image" in needs:
                out["dino_image"] = sample["rgb"][dino_view(d)]
        if "text" in needs:
            out["caption"] = read_text(d / "caption_3dtopia.txt")
        return out


def find_jobs(dataset: GBufferDataset, wanted: set, overwrite: bool) -> list:
    """[(dataset index, set of outputs to write)] for the objects that miss any."""
    jobs = []
    for i, (rel, _) in enumerate(dataset.items):
        d = dataset.root / rel
        needs = {k for k in wanted if overwrite or not all((d / f).is_file() for f in OUTPUT_FILES[k])}
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
    items = [b for b in batch if "text" in b["needs"]]
    if items:
        tokens, pooled = text_enc.encode([b["caption"] for b in items])
        for b, t, p in zip(items, tokens.cpu().numpy(), pooled.cpu().numpy()):
            save_npy(b["dir"] / CONDITION_FILES["text"]["tokens"], t)
            save_npy(b["dir"] / CONDITION_FILES["text"]["pooled"], p)


def write_empty(root: Path, kind: str, enc) -> None:
    """The encoder's unconditional embedding at the dataset root, under the official names
    (EMPTY_FILES), for the generator's guidance dropout."""
    tokens, pooled = (x.cpu().numpy().astype(np.float32) for x in enc.empty())
    seq_name, pooled_name = EMPTY_FILES[kind]
    save_npy(root / seq_name, np.concatenate([pooled[None], tokens]) if kind == "image" else tokens)
    save_npy(root / pooled_name, pooled)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, type=Path, help="G-buffer dataset root (with dataset.json)")
    ap.add_argument("--vqvae", required=True, type=Path, help="VQVAE checkpoint folder (or .safetensors file)")
    ap.add_argument("--image-encoder", nargs="?", const=DEFAULT_SOURCES["image"],
                    help="image encoder (DINOv2 folder or hub id, mobilenet_v2, ...: models/conditioners.py); "
                         "writes the image embeddings")
    ap.add_argument("--text-encoder", nargs="?", const=DEFAULT_SOURCES["text"],
                    help="text encoder (CLIP folder or hub id, minilm, ...: models/conditioners.py); "
                         "writes the caption embeddings")
    ap.add_argument("--split", choices=("all", "train", "val"), default="all")
    ap.add_argument("--holdout", type=int, default=100, help="objects per category in 'val' (as GBufferDataset)")
    ap.add_argument("--batch-size", type=int, default=8, help="objects per forward pass")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader processes decoding the views")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--overwrite", action="store_true", help="recompute files that exist")
    args = ap.parse_args(argv)
    if args.batch_size < 1 or args.workers < 0:
        raise ValueError("--batch-size must be at least 1 and --workers at least 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")

    dataset = GBufferDataset(args.data_dir, split=args.split, holdout=args.holdout, mode="views")
    wanted = {"tokens"} | {k for k, source in (("image", args.image_encoder), ("text", args.text_encoder)) if source}
    jobs = find_jobs(dataset, wanted, args.overwrite)
    done = len(dataset) - len(jobs)
    if not jobs:
        print(f"nothing to do: all {len(dataset)} objects of '{args.split}' have their files (--overwrite redoes them)")
        return 0
    # Loaded once; the encoders only when some object misses their files.
    vqvae = load_vqvae(args.vqvae, args.device)
    cfg, needed = vqvae.cfg, set().union(*(needs for _, needs in jobs))
    image_enc = load_conditioner("image", args.image_encoder, args.device) if "image" in needed else None
    text_enc = load_conditioner("text", args.text_encoder, args.device) if "text" in needed else None
    for kind, enc in (("image", image_enc), ("text", text_enc)):
        if enc is not None:
            write_empty(args.data_dir, kind, enc)
    res = cfg.input_size

    loader = torch.utils.data.DataLoader(Pending(dataset, jobs, cfg.encoder.num_views, res), batch_size=args.batch_size,
                                         num_workers=args.workers, collate_fn=list)
    resized = set()
    with tqdm(total=len(jobs), unit="obj", desc="precompute", dynamic_ncols=True) as bar:
        for batch in loader:
            for size in {b["view_size"] for b in batch if "view_size" in b} - resized - {res}:
                resized.add(size)
                log.info("views of %d px, the VQVAE encodes %d px: resizing them", size, res)
            write_batch(batch, vqvae, image_enc, text_enc, args.device)
            bar.update(len(batch))
    print(f"wrote {len(jobs)} objects ({done} already done) under {args.data_dir}: {', '.join(sorted(wanted))}")
    return 0


if __name__ == "__main__":
    run(main)
