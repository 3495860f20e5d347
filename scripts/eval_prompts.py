#!/usr/bin/env python
"""Does the text-to-3D model make what the prompt says? Held-out prompts in, accuracy out.

    python scripts/eval_prompts.py [--num 50] [--seed 1000] [--paraphrase] [--vqvae DIR] [--ar DIR] [--text-encoder E]
    python scripts/eval_prompts.py --reconstruct --data-dir D [--holdout 5] [--vqvae DIR]
    python scripts/eval_prompts.py --images --data-dir D [--holdout 5] [--ar DIR] [--image-encoder E]

The prompts are captions of single-primitive procedural objects (datasets/shapes.py) drawn with a
seed the training set did not use (make_shapes uses 0 by default; with --data-dir, prompts whose
caption occurs in that dataset are skipped, so combinations are held out too), each caption once.
One object is sampled per prompt (sample.py's models, defaults and sampling settings) and its
shape family and colour are checked (evaluation/shape_check.py). With --paraphrase each prompt is
said the way the training grammar never says it (datasets/captions.py `held_out_captions`: new
synonyms, templates and request wrappers, e.g. "could you build a golden orb?").

With --reconstruct there is no generator: the held-out single-primitive objects of --data-dir (the
last --holdout of each family's category) are decoded from their own token ids
(scripts/precompute.py) and checked the same way, their family being their category and their
colour the palette name in their caption. That is the most a generator over this VQVAE can score.

With --images the image generator is checked on those same held-out objects: each is shown to it
in the view its training condition is taken from (scripts/precompute.py), or with --random-views
in one of all its views, and the object it makes is checked against the shown object's family and
colour; a --data-dir of turned objects (make_shapes without --upright) shows them at any turn.

Prints per-family and overall accuracies, writes OUT/results.json and OUT/contact_sheet.png
(one view per prompt, the verdicts under it).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.captions import held_out_captions  # noqa: E402
from datasets.gbuffer import read_precomputed  # noqa: E402
from datasets.shapes import FAMILIES  # noqa: E402
from evaluation.shape_check import (NUM_POINTS, classify_colour, condition_view,  # noqa: E402
                                    contact_sheet, held_out_objects, held_out_prompts, place_family, templates)
from models.layout import sequence_to_planes  # noqa: E402
from models.precision import PRECISIONS  # noqa: E402
from pipelines.sar3d import DEMO_DIR, Decoder3D, SamplingConfig, SAR3DPipeline, load_tokenizer  # noqa: E402
from renderers.mesh_render import sample_surface  # noqa: E402
from utils.cli import ArgumentParser, run  # noqa: E402


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--num", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1000, help="shape seed of the prompts (training data: 0)")
    ap.add_argument("--sample-seed", type=int, default=0)
    ap.add_argument("--paraphrase", action="store_true",
                    help="ask with held-out paraphrases of the prompts (synonyms, templates, wrappers)")
    ap.add_argument("--data-dir", type=Path, help="training dataset: skip prompts whose caption it holds")
    ap.add_argument("--reconstruct", action="store_true",
                    help="check the VQVAE's decodings of --data-dir's held-out objects instead (no generator)")
    ap.add_argument("--images", action="store_true",
                    help="check the image generator instead, on --data-dir's held-out objects seen in one view")
    ap.add_argument("--random-views", action="store_true",
                    help="--images: each object in one of all its views, drawn from (--sample-seed, object)")
    ap.add_argument("--holdout", type=int, default=5, help="held-out objects per category (--reconstruct, --images)")
    ap.add_argument("--vqvae", help="VQVAE folder (default: the demo model)")
    ap.add_argument("--ar", help="text generator folder, or image generator with --images (default: the demo model)")
    ap.add_argument("--text-encoder")
    ap.add_argument("--image-encoder")
    ap.add_argument("--guidance", "--cfg", type=float, default=SamplingConfig.guidance)
    ap.add_argument("--top-k", type=int, default=SamplingConfig.top_k)
    ap.add_argument("--top-p", type=float, default=SamplingConfig.top_p)
    ap.add_argument("--mesh-resolution", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="fp32", choices=PRECISIONS, help="the generator's (int8: the CPU path)")
    ap.add_argument("--out-dir", type=Path, default=Path("outputs/eval_prompts"))
    args = ap.parse_args(argv)
    if args.num < 1:
        raise ValueError(f"--num must be positive, got {args.num}")
    if args.reconstruct and args.images:
        raise ValueError("--reconstruct and --images: pick one")
    mode = "--reconstruct" if args.reconstruct else "--images" if args.images else None
    if args.random_views and not args.images:
        raise ValueError("--random-views is for --images")
    if mode and args.paraphrase:
        raise ValueError(f"--paraphrase is for text prompts, not {mode}")
    if mode and args.data_dir is None:
        raise ValueError(f"{mode} needs --data-dir (the dataset whose held-out objects are checked)")
    sampling = SamplingConfig(args.guidance, args.top_k, args.top_p)
    if args.reconstruct:
        dec = Decoder3D(load_tokenizer(args.vqvae or DEMO_DIR / "vqvae", "nerf", args.device), args.device)
        patch_nums = dec.vqvae.cfg.quantizer.patch_nums
        cases = [(caption, family, colour, lambda d=d: dec.triplanes(
                  sequence_to_planes(read_precomputed(d)["gt_BL"][None].to(dec.device), patch_nums)))
                 for caption, family, colour, d in held_out_objects(args.data_dir, args.holdout)]
    elif args.images:
        dec = SAR3DPipeline.from_pretrained(None, "image", vqvae=args.vqvae, ar=args.ar, encoder=args.image_encoder,
                                            device=args.device, precision=args.precision)
        cases = [(caption, family, colour, lambda i=i, d=d: dec.triplanes(dec.sample_tokens(
                  condition_view(d, args.sample_seed + i if args.random_views else None), 1, args.sample_seed + i,
                  sampling)))
                 for i, (caption, family, colour, d) in enumerate(held_out_objects(args.data_dir, args.holdout))]
    else:
        dec = SAR3DPipeline.from_pretrained(None, "text", vqvae=args.vqvae, ar=args.ar, encoder=args.text_encoder,
                                            device=args.device, precision=args.precision)
        prompts = held_out_prompts(args.num, args.seed, args.data_dir)
        if args.paraphrase:
            prompts = [(held_out_captions(p, args.seed, i, 1)[0], f, c) for i, (p, f, c) in enumerate(prompts)]
        cases = [(prompt, family, colour, lambda i=i, p=prompt: dec.triplanes(dec.sample_tokens(
                  p, 1, args.sample_seed + i, sampling)))
                 for i, (prompt, family, colour) in enumerate(prompts)]
    refs = templates()
    results, tiles = [], []
    for i, (prompt, family, colour, make_planes) in enumerate(tqdm(cases, desc="eval_prompts")):
        planes = make_planes()
        try:
            verts, faces, colours = dec.mesh(planes, args.mesh_resolution)
            pts = sample_surface(verts, faces, NUM_POINTS, np.random.default_rng(i))[0]
            (got_family, distance), got_colour = place_family(pts, refs), classify_colour(colours)
        except ValueError:                      # no surface: counts as wrong on both
            got_family, got_colour, distance = "none", "none", None
        results.append({"prompt": prompt, "family": family, "colour": colour, "predicted_family": got_family,
                        "family_distance": distance, "predicted_colour": got_colour})
        view = dec.views(planes, [45.0], 128)[0]
        tiles.append((view, [prompt[-26:], f"{'ok' if got_family == family else 'NO'} {got_family}",
                             f"{'ok' if got_colour == colour else 'NO'} {got_colour}"]))
    accuracy = lambda rs, key: float(np.mean([r[f"predicted_{key}"] == r[key] for r in rs]))
    overall = {"family": accuracy(results, "family"), "colour": accuracy(results, "colour")}
    print(f"{'family':<12} {'n':>3} {'family acc':>10} {'colour acc':>10}")
    for f in FAMILIES:
        rs = [r for r in results if r["family"] == f]
        if rs:
            print(f"{f:<12} {len(rs):>3} {accuracy(rs, 'family'):>10.2f} {accuracy(rs, 'colour'):>10.2f}")
    print(f"{'overall':<12} {len(results):>3} {overall['family']:>10.2f} {overall['colour']:>10.2f}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"overall": overall, "precision": args.precision, "paraphrase": args.paraphrase,
               "random_views": args.random_views, "per_object": results}
    (args.out_dir / "results.json").write_text(json.dumps(summary, indent=1))
    contact_sheet(args.out_dir / "contact_sheet.png", tiles)
    print(f"wrote {args.out_dir / 'results.json'} and {args.out_dir / 'contact_sheet.png'}")
    return 0


if __name__ == "__main__":
    run(main)
