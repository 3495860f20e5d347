"""Does a generated object have the shape family and colour it was asked for? The checks of
scripts/eval_prompts.py, for single-primitive procedural objects (datasets/shapes.py).

- shape family: the nearest analytic template by symmetric Chamfer distance between surface
  samples, both normalised (bounding-box centre at the origin, largest half-extent 1), minimised
  over turns about the vertical axis and then refined by ICP (`classify_family`); templates:
  every family at the ends and the middle of each of its proportion ranges; an object farther
  than MAX_DISTANCE from every template is placed nowhere ("none"): a lump is not a sphere;
- colour: the palette entry nearest in direction (cosine in RGB, so shading that darkens a
  colour does not change it) to the mesh's mean vertex colour.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy.spatial import cKDTree

from datasets.gbuffer import GBufferDataset, dino_view, load_index, read_gbuffer_object, read_text
from datasets.shapes import FAMILIES, PALETTE, PROPORTIONS, Part, ProceduralShape, sample_shape
from renderers.mesh_render import sample_surface

NUM_POINTS = 1000
YAWS = np.radians(np.arange(0, 180, 5))     # boxes and pyramids a few degrees off lose to cylinders and cones
# Exact procedural objects (turned or upright, any proportion) lie at 0.06-0.15 from their nearest
# template (the floor is the sampling of 1000 points); two or three merged blobs at about 0.26.
MAX_DISTANCE = 0.2


def normalise(points: np.ndarray) -> np.ndarray:
    lo, hi = points.min(0), points.max(0)
    return (points - (lo + hi) / 2) / max((hi - lo).max() / 2, 1e-9)


def templates(seed: int = 0) -> list:
    """(family, normalised surface points, their KD-tree) for every family at the two ends and
    the middle of each of its proportion ranges; boxes also at the narrow end of their depth
    ratio (0.7, the other end 1.3 being the same box turned 90 degrees once normalised)."""
    rng = np.random.default_rng(seed)
    out = []
    for family in FAMILIES:
        for lo, hi in PROPORTIONS[family].values():
            for q in sorted({lo, (lo + hi) / 2, hi}):
                for aux in (1.0, 0.7) if family == "box" else (1.0,):
                    shape = ProceduralShape([Part(family, q, aux, color="red")], family, family, 1.0, np.eye(3),
                                            mc_res=48)
                    mesh = shape.mesh()
                    pts = normalise(sample_surface(mesh.verts, mesh.faces, NUM_POINTS, rng)[0])
                    out.append((family, pts, cKDTree(pts)))
    return out


def similarity_fit(src: np.ndarray, dst: np.ndarray) -> tuple:
    """Least-squares rotation R, scale s and shift t with s * R @ src_i + t ~ dst_i (Umeyama)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    U, S, Vt = np.linalg.svd(b.T @ a / len(src))
    D = np.diag([1.0, 1.0, np.sign(np.linalg.det(U @ Vt))])
    R = U @ D @ Vt
    s = (S * np.diag(D)).sum() / a.var(0).sum()
    return R, s, mu_d - s * R @ mu_s


def place_family(points: np.ndarray, refs: list, icp_steps: int = 10, max_distance: float = MAX_DISTANCE) -> tuple:
    """(family, distance): the family whose template is nearest to surface `points` (N, 3) by
    symmetric Chamfer distance (of the normalised shapes), or "none" when even that one is
    farther than `max_distance`, and that distance. Each template is
    first matched over turns about z, the points normalised after each turn (a bounding box
    taken before it shrinks an object turned 45 degrees by up to 1/sqrt(2));
    the best turn of each family's best template is then refined by `icp_steps` steps of ICP
    over rotation, scale and shift, which take up the tilt of the procedural objects (up to 15
    degrees) that would otherwise pass a box for a cylinder or a pyramid for a cone."""
    best = {}
    for yaw in YAWS:
        c, s = math.cos(yaw), math.sin(yaw)
        rotated = normalise(points @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]).T)
        tree = cKDTree(rotated)
        for family, ref_pts, ref_tree in refs:
            d = ref_tree.query(rotated)[0].mean() + tree.query(ref_pts)[0].mean()
            if d < best.get(family, (math.inf,))[0]:
                best[family] = (d, rotated, ref_pts, ref_tree)
    scores = {}
    for family, (d, pts, ref_pts, ref_tree) in best.items():
        for step in range(icp_steps + 1):
            d_to, to_ref = ref_tree.query(pts)
            d_from, from_ref = cKDTree(pts).query(ref_pts)
            d = min(d, d_to.mean() + d_from.mean())
            if step < icp_steps:
                R, scale, t = similarity_fit(np.concatenate([pts, pts[from_ref]]),
                                             np.concatenate([ref_pts[to_ref], ref_pts]))
                pts = pts @ (scale * R).T + t
        scores[family] = d
    family = min(scores, key=scores.get)
    return (family if scores[family] <= max_distance else "none"), float(scores[family])


def classify_family(points: np.ndarray, refs: list, icp_steps: int = 10) -> str:
    """`place_family`'s family."""
    return place_family(points, refs, icp_steps)[0]


def classify_colour(colours_uint8: np.ndarray) -> str:
    mean = colours_uint8.reshape(-1, 3).astype(np.float64).mean(0) / 255
    names = list(PALETTE)
    pal = np.array([PALETTE[n] for n in names])
    cos = pal @ mean / (np.linalg.norm(pal, axis=1) * max(np.linalg.norm(mean), 1e-9))
    return names[int(cos.argmax())]


def held_out_prompts(num: int, seed: int, data_dir: Path | None, tries: int = 200) -> list:
    """[(caption, family, colour)] of `num` distinct single-primitive objects, families
    round-robin. A family that draws no new caption in `tries` draws (spheres have only size and
    colour words, and a training set holds most of them) leaves the rotation."""
    seen = set()
    if data_dir is not None:
        seen = {read_text(Path(data_dir, rel, "caption_3dtopia.txt")) for rels in load_index(data_dir).values()
                for rel in rels}
    out, index, families = [], 0, list(FAMILIES)
    while len(out) < num:
        if not families:
            raise ValueError(f"only {len(out)} captions of seed {seed} are new"
                             + (f" to --data-dir {data_dir}" if data_dir else "") + f"; lower --num below {num}")
        family = families[len(out) % len(families)]
        for _ in range(tries):
            shape = sample_shape(seed, index, label=family, mc_res=16)
            index += 1
            if shape.caption not in seen:
                break
        else:
            families.remove(family)
            continue
        seen.add(shape.caption)
        out.append((shape.caption, family, shape.parts[0].color))
    return out


def held_out_objects(data_dir: Path, holdout: int) -> list:
    """[(caption, family, colour, object dir)] of the held-out objects (the trainers' "val" split)
    of each category named after a family."""
    families = [f for f in FAMILIES if f in load_index(data_dir)]
    if not families:
        raise ValueError(f"--data-dir {data_dir}: no category named after a family ({', '.join(FAMILIES)})")
    out = []
    for rel, ci in GBufferDataset(data_dir, split="val", holdout=holdout, categories=families).items:
        caption = read_text(Path(data_dir, rel, "caption_3dtopia.txt"))
        colours = [c for c in PALETTE if re.search(rf"\b{c}\b", caption)]
        out.append((caption, families[ci], colours[0] if colours else "none", Path(data_dir, rel)))
    return out


def condition_view(obj_dir: Path, seed: int | None = None) -> torch.Tensor:
    """The view of an object that the image generator's training condition is taken from, or with
    `seed` one of all its views drawn from it; (3, H, W) in [0, 1]."""
    views = read_gbuffer_object(obj_dir)["rgb"]
    v = dino_view(obj_dir) if seed is None else int(np.random.default_rng(seed).integers(len(views)))
    return torch.from_numpy(views[v]).permute(2, 0, 1).float() / 255


def contact_sheet(path: Path, tiles: list, cols: int = 10) -> None:
    """tiles: [(image (R, R, 3) uint8, [lines])]."""
    size, text_h = tiles[0][0].shape[0], 36
    rows = -(-len(tiles) // cols)
    sheet = Image.new("RGB", (cols * size, rows * (size + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (img, lines) in enumerate(tiles):
        x, y = (i % cols) * size, (i // cols) * (size + text_h)
        sheet.paste(Image.fromarray(img), (x, y))
        for j, line in enumerate(lines):
            draw.text((x + 2, y + size + 2 + 11 * j), line[:26], fill=(0, 0, 0))
    sheet.save(path)
