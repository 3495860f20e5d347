#!/usr/bin/env python
"""Write a procedural 3D dataset in both layouts, with no download.

    python scripts/make_shapes.py --out data/shapes --num 200 --res 64 --seed 0 [--upright]

Objects cycle through the labels of datasets/shapes.py (8 primitive families and 2 kinds of
composition) and are drawn from (seed, index), so the same arguments give the same files on
any machine and with any number of workers. Each object gets 12 G-buffer views, a caption,
occupancy samples and a surface point cloud (datasets/builder.py), and caption_variants.json: --captions
captions from the training grammar of datasets/captions.py (the canonical caption first, then
paraphrases with synonyms, other templates and request wrappers). Re-running with the same
settings keeps finished objects and writes only the missing ones. --upright leaves out the random
turn and tilt: the same objects and captions, axis-aligned.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.builder import add_build_arguments, load_build_config, write_indices, write_object  # noqa: E402
from datasets.captions import write_captions  # noqa: E402
from datasets.shapes import LABELS, sample_shape  # noqa: E402
from utils.cli import ArgumentParser, run  # noqa: E402
from utils.config import to_dict  # noqa: E402
from utils.parallel import parallel_map  # noqa: E402

def _make_one(job):
    out, index, seed, upright, cfg = job
    shape = sample_shape(seed, index, mc_res=cfg.mc_res, upright=upright)
    obj_id = f"{index:06d}"
    write_object(out, shape.label, obj_id, shape, cfg, seed=seed * 1_000_003 + index)
    return shape.label, obj_id


def main(argv=None):
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True, type=Path, help="dataset root to write")
    ap.add_argument("--num", required=True, type=int, help="number of objects")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--upright", action="store_true",
                    help="no random yaw or tilt: the same objects and captions, axis-aligned and +z up")
    ap.add_argument("--captions", type=int, default=8,
                    help="captions per object in caption_variants.json (written for kept objects too)")
    add_build_arguments(ap)
    args = ap.parse_args(argv)
    cfg = load_build_config(args)
    if args.num < 1:
        raise ValueError("--num must be at least 1")
    if args.captions < 1:
        raise ValueError("--captions must be at least 1")

    args.out.mkdir(parents=True, exist_ok=True)
    settings = {"generator": "make_shapes", "seed": args.seed, "config": to_dict(cfg)}
    if args.upright:
        settings["upright"] = True
    stamp = args.out / "shapes.json"
    if stamp.exists() and not args.overwrite:
        old = json.loads(stamp.read_text())
        if {k: v for k, v in old.items() if k != "num"} != settings:
            raise ValueError(f"{args.out} was written with other settings ({stamp}); use another --out or --overwrite")
    stamp.write_text(json.dumps({**settings, "num": args.num}, indent=1) + "\n")

    done, jobs = {}, []
    for i in range(args.num):
        label, obj_id = LABELS[i % len(LABELS)], f"{i:06d}"
        if not args.overwrite and (args.out / label / obj_id).is_dir():
            done.setdefault(label, []).append(obj_id)
        else:
            jobs.append((args.out, i, args.seed, args.upright, cfg))
    t0 = time.time()
    for label, obj_id in parallel_map(_make_one, jobs, args.workers, "make_shapes"):
        done.setdefault(label, []).append(obj_id)
    minutes = (time.time() - t0) / 60
    for label, ids in done.items():
        for obj_id in ids:
            write_captions(args.out / label / obj_id, args.seed, int(obj_id), args.captions)
    write_indices(args.out, done, cfg.holdout_fraction)
    n = sum(len(v) for v in done.values())
    rate = f", {len(jobs) / minutes:.1f} objects/min" if jobs and minutes > 0 else ""
    print(f"wrote {len(jobs)} objects ({n} in {args.out}){rate}")
    return 0


if __name__ == "__main__":
    run(main)
