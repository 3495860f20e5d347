#!/usr/bin/env python
"""Reconstruction metrics of an Argus-3D tokenizer on held-out shapes of an occupancy dataset.

    python scripts/eval_occupancy.py --ckpt runs/argus_small --data-dir data/shapes [--split val] \\
        [--inputs 30000] [--out-dir outputs/eval_occupancy]

Each shape's surface points (`--inputs` of pointcloud.npz, drawn from the shape's index) are
tokenized, the tokens decoded, and scored (evaluation/occupancy.py): volumetric IoU at every point
of points.npz (inside: probability ≥ 0.2, the official generation threshold), and, on the MISE
mesh (renderers/occupancy_mesh.py, 128³ as the official), Chamfer-L1, normal consistency and
F-score at 0.01 against pointcloud.npz. Writes OUT/results.json (per shape and the means),
OUT/meshes/<category>_<id>.obj, and OUT/meshes.png (each mesh beside the dataset's first view of
the shape, where the folder also holds G-buffer views). Prints a table.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.occupancy import ZUP_TO_YUP, OccupancyDataset, subsample  # noqa: E402
from evaluation.occupancy import surface_metrics, volumetric_iou  # noqa: E402
from models.occupancy_vqvae import load_occupancy_vqvae  # noqa: E402
from renderers.mesh_render import ColoredMesh, render_views, sample_surface  # noqa: E402
from renderers.nerf_mesh import write_mesh  # noqa: E402
from renderers.occupancy_mesh import extract_occupancy_mesh, logit_threshold  # noqa: E402
from utils.cli import ArgumentParser, check_device, run  # noqa: E402
from utils.media import write_grid  # noqa: E402

METRICS = ("iou", "chamfer_l1", "normal_consistency", "fscore")


def side_by_side(obj_dir: Path, verts_yup: np.ndarray, faces: np.ndarray, res: int = 128) -> list:
    """[the dataset's view 0, the mesh from that camera] as (res, res, 3) uint8, or [] without views."""
    from datasets.gbuffer import read_gbuffer_object
    if not (obj_dir / "c.npy").is_file():
        return []
    views = read_gbuffer_object(obj_dir)
    grey = np.full((len(verts_yup), 3), 0.7, np.float32)
    mesh = ColoredMesh((verts_yup @ ZUP_TO_YUP).astype(np.float32), faces.astype(np.int64), grey)   # views are +z up
    rgb = render_views(mesh, views["c"][:1], res)["rgb"][0]
    truth = torch.nn.functional.interpolate(torch.from_numpy(views["rgb"][0]).permute(2, 0, 1)[None].float(),
                                            size=(res, res), mode="area")[0].permute(1, 2, 0).numpy()
    return [truth.round().astype(np.uint8), np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8)]


@torch.no_grad()
def evaluate_shape(model, sample: dict, inputs: int, seed: int, device) -> tuple:
    g = torch.Generator().manual_seed(seed)
    surface = sample["inputs"]
    planes = model.decode_tokens(model.tokenize(surface[subsample(len(surface), inputs, g)][None].to(device)))
    logits_fn = lambda pts: model.query(planes, torch.as_tensor(pts, device=device)[None])[0].cpu()
    pred = logits_fn(sample["points"]).numpy()
    scores = {"iou": volumetric_iou(pred >= logit_threshold(0.2), sample["occ"].numpy() > 0.5)}
    verts, faces = extract_occupancy_mesh(logits_fn)
    if len(faces):
        pts, nrm = sample_surface(verts, faces, 100_000, np.random.default_rng(seed))
        scores.update(surface_metrics(pts, nrm, surface.numpy(), sample["normals"].numpy()))
    else:                                   # nothing above the threshold: no surface to compare
        scores.update(chamfer_l1=float("nan"), normal_consistency=0.0, fscore=0.0)
    return scores, verts, faces


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--ckpt", required=True, type=Path, help="our Argus-3D tokenizer folder (train_vqvae.py)")
    ap.add_argument("--data-dir", required=True, type=Path, help="an occupancy dataset (ONet layout)")
    ap.add_argument("--split", default="val", choices=("train", "val", "test"))
    ap.add_argument("--inputs", type=int, default=30000, help="surface points given to the tokenizer")
    ap.add_argument("--limit", type=int, default=0, help="score only the first N shapes (0: all)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    ap.add_argument("--out-dir", type=Path, default=Path("outputs/eval_occupancy"))
    args = ap.parse_args(argv)
    if args.inputs < 1 or args.limit < 0:
        raise ValueError("--inputs must be at least 1 and --limit at least 0")
    device = check_device(args.device)
    model = load_occupancy_vqvae(args.ckpt, device)
    ds = OccupancyDataset(args.data_dir, args.split, num_points=1 << 30, pointcloud_n=1 << 30, noise=0.0,
                          float16_noise=0.0)
    (args.out_dir / "meshes").mkdir(parents=True, exist_ok=True)
    rows, tiles = [], []
    for i in tqdm(range(min(args.limit or len(ds), len(ds))), desc="eval_occupancy", unit="shape"):
        sample = ds[i]
        scores, verts, faces = evaluate_shape(model, sample, args.inputs, i, device)
        name = f"{ds.categories[sample['category']]}_{sample['model']}"
        rows.append({"shape": name, **scores})
        if len(faces):
            write_mesh(args.out_dir / "meshes" / f"{name}.obj", verts, faces, np.full((len(verts), 3), 180, np.uint8))
            tiles += side_by_side(Path(sample["path"]), verts, faces)
    means = {k: float(np.nanmean([r[k] for r in rows])) for k in METRICS}
    (args.out_dir / "results.json").write_text(json.dumps({"mean": means, "per_shape": rows}, indent=1))
    if tiles:
        write_grid(args.out_dir / "meshes.png", np.stack(tiles), cols=min(len(tiles), 8))
    print(f"{'shape':<24} " + " ".join(f"{k:>18}" for k in METRICS))
    for r in rows + [{"shape": f"mean of {len(rows)}", **means}]:
        print(f"{r['shape'][:24]:<24} " + " ".join(f"{r[k]:>18.4f}" for k in METRICS))
    print(f"wrote {args.out_dir / 'results.json'}")
    return 0


if __name__ == "__main__":
    run(main)
