#!/usr/bin/env python
"""How well a class-guided Argus-3D generator makes its categories, on the procedural dataset.

    python scripts/eval_classes.py --data-dir data/shapes300 [--vqvae DIR --ar DIR] \
        [--per-class 20] [--classes box,cone,...] [--out-dir outputs/eval_classes]

For every category named after a primitive family (datasets/shapes.py; the compositions pair and
stack have no template), `--per-class` objects are sampled in one batch (seed = the category's
position), meshed by the official MISE, and placed by the codebase's shape check
(evaluation/shape_check.py: nearest family template by Chamfer distance over turns and ICP). An
empty sample counts as wrong. Then the generation metrics of evaluation/pointcloud.py (COV, MMD
and 1-NNA under Chamfer and EMD, 2048 surface points per shape) of the first samples of each
category against the held-out objects (the val and test splits' pointcloud.npz, as many generated
shapes as references). Writes OUT/results.json and OUT/samples.png (a view of every sample with
what the check saw), and prints a table.

With `--reconstruct` the generator is left out: the tokenizer's own reconstructions of the
held-out objects of each family (`--inputs` surface points in, ids, decoded planes, MISE mesh) are
placed instead. That is the ceiling of any generator over the tokenizer's ids.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from datasets.errors import DatasetError  # noqa: E402
from datasets.occupancy import read_occupancy_zup, read_pointcloud, read_split, subsample  # noqa: E402
from datasets.shapes import FAMILIES  # noqa: E402
from evaluation.pointcloud import generation_metrics  # noqa: E402
from evaluation.shape_check import NUM_POINTS, classify_family, contact_sheet, templates  # noqa: E402
from models.occupancy_vqvae import load_occupancy_vqvae  # noqa: E402
from pipelines.argus import ArgusPipeline, ArgusSampling, tokenizer_mesh  # noqa: E402
from pipelines.sar3d import DEMO_DIR, mesh_views  # noqa: E402
from renderers.mesh_render import sample_surface  # noqa: E402
from utils.cli import ArgumentParser, check_device, run  # noqa: E402

CLOUD = 2048


def held_out(data_dir: Path, name: str, splits: list) -> list:
    """The object folders of category `name` listed in `splits` (a missing split list: none)."""
    folders = []
    for split in splits:
        try:
            folders += [data_dir / name / i for i in read_split(data_dir, name, split)]
        except DatasetError:
            pass
    return folders


def reference_clouds(data_dir: Path, classes: list, splits: list, rng) -> np.ndarray:
    """The surface points of the objects of `splits` (the held-out val and test), +z up, CLOUD each."""
    clouds = []
    for folder in (f for name in classes for f in held_out(data_dir, name, splits)):
        surf = read_occupancy_zup(folder)["surface_points"].numpy().astype(np.float64)
        clouds.append(surf[rng.choice(len(surf), CLOUD, replace=len(surf) < CLOUD)])
    if not clouds:
        raise ValueError(f"--data-dir {data_dir}: no objects in {'/'.join(splits)} of {', '.join(classes)}")
    return np.stack(clouds)


@torch.no_grad()
def reconstructions(tokenizer, folders: list, inputs: int) -> list:
    """Each object's MISE mesh through the tokenizer (`inputs` surface points drawn from the
    object's position in the list), or None where nothing is occupied."""
    meshes, device = [], next(tokenizer.parameters()).device
    for k, folder in enumerate(folders):
        surface = torch.from_numpy(read_pointcloud(folder / "pointcloud.npz")[0])
        picked = surface[subsample(len(surface), inputs, torch.Generator().manual_seed(k))]
        planes = tokenizer.decode_tokens(tokenizer.tokenize(picked[None].to(device)))
        try:
            meshes.append(tokenizer_mesh(tokenizer, planes))
        except ValueError:                # no surface
            meshes.append(None)
    return meshes


def main(argv=None):
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--data-dir", required=True, type=Path, help="the procedural occupancy dataset (held-out objects)")
    ap.add_argument("--vqvae", help="the Argus-3D tokenizer (default: the demo's)")
    ap.add_argument("--ar", help="the class-guided generator (default: the demo's)")
    ap.add_argument("--per-class", type=int, default=20, help="samples per category")
    ap.add_argument("--classes", help="comma-separated categories (default: every family the generator knows)")
    ap.add_argument("--reference-splits", default="val,test", help="the splits of the reference objects")
    ap.add_argument("--top-k", type=int, default=250)
    ap.add_argument("--guidance", type=float, default=0.0)
    ap.add_argument("--reconstruct", action="store_true",
                    help="place the tokenizer's reconstructions of the held-out objects instead of samples")
    ap.add_argument("--inputs", type=int, default=3000, help="--reconstruct: surface points given to the tokenizer")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out-dir", type=Path, default=Path("outputs/eval_classes"))
    args = ap.parse_args(argv)
    if args.inputs < 1 or args.per_class < 1:
        raise ValueError("--inputs and --per-class must be at least 1")
    device = check_device(args.device)
    splits = args.reference_splits.split(",")
    if args.reconstruct:
        tokenizer = load_occupancy_vqvae(args.vqvae or DEMO_DIR / "argus_tokenizer", device)
        classes = args.classes.split(",") if args.classes else [f for f in FAMILIES
                                                                 if held_out(args.data_dir, f, splits)]
    else:
        pipe = ArgusPipeline.from_pretrained(tokenizer=args.vqvae, generator=args.ar, device=device)
        known = pipe.generator.cfg.classes
        classes = args.classes.split(",") if args.classes else [c for c in known if c in FAMILIES]
        for c in classes:
            pipe.generator.class_index(c)
    for c in classes:
        if c not in FAMILIES:
            raise ValueError(f"--classes: {c!r} is not a primitive family the shape check knows ({', '.join(FAMILIES)})")
    refs, rng = templates(), np.random.default_rng(0)
    reference = reference_clouds(args.data_dir, classes, splits, rng)
    per_ref = -(-len(reference) // len(classes))
    results, generated, tiles, t0 = {}, [], [], time.time()
    sampling = ArgusSampling(guidance=args.guidance, top_k=args.top_k)
    for ci, name in enumerate(classes):
        if args.reconstruct:
            folders = held_out(args.data_dir, name, splits)
            if not folders:
                raise ValueError(f"--data-dir {args.data_dir}: no {name} in {'/'.join(splits)} to reconstruct")
            meshes = reconstructions(tokenizer, folders, args.inputs)
        else:
            meshes = [obj.mesh for obj in pipe(name, args.per_class, seed=ci, sampling=sampling, frames=0)]
        seen = []
        for k, mesh in enumerate(meshes):
            if mesh is None:
                seen.append("empty")
                continue
            verts, faces, _ = mesh
            seen.append(classify_family(sample_surface(verts, faces, NUM_POINTS, rng)[0], refs))
            if k < per_ref and not args.reconstruct:
                generated.append(sample_surface(verts, faces, CLOUD, rng)[0])
            tiles.append((mesh_views(mesh, [30.0], 96, shading="lit")[0], [f"{name} -> {seen[-1]}"]))
        results[name] = {"recognised": sum(s == name for s in seen) / len(seen), "empty": seen.count("empty"),
                         "seen": {s: seen.count(s) for s in sorted(set(seen))}}
        print(f"{name:>10}: {results[name]['recognised']:.0%} recognised, seen {results[name]['seen']}", flush=True)
    mean = float(np.mean([r["recognised"] for r in results.values()]))
    metrics = generation_metrics(np.stack(generated)[:len(reference)], reference) if generated else {}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"per_class": results, "mean_recognised": mean, "reconstruct": args.reconstruct,
               "samples_per_class": None if args.reconstruct else args.per_class,
               "generation_metrics": metrics, "generated_shapes": min(len(generated), len(reference)),
               "reference_shapes": len(reference), "minutes": (time.time() - t0) / 60}
    (args.out_dir / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    if tiles:
        contact_sheet(args.out_dir / "samples.png", tiles, cols=max(sum(r["seen"].values()) for r in results.values()))
    print(f"mean recognised {mean:.1%} over {len(classes)} categories; "
          + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in metrics.items()))
    return 0


if __name__ == "__main__":
    run(main)
