"""Write one object in both layouts: 12 G-buffer views and ONet occupancy samples.

Used by scripts/make_shapes.py (procedural shapes) and scripts/render_meshes.py (mesh
folders). An object is anything with `mesh()` -> ColoredMesh (world, +z up, inside +-0.45),
`inside(points)` -> bool and `surface_samples(n, rng)` -> (points, normals), plus `caption`
and `label`. Each object directory is written under a temporary name and renamed when
complete, so an interrupted run leaves no half-written object behind.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from datasets.gbuffer import NUM_VIEWS, write_gbuffer_object, write_index
from datasets.occupancy import ZUP_TO_YUP, write_pointcloud, write_points, write_split_lists
from renderers.mesh_render import render_views
from utils.cameras import normalized_intrinsics, orbit_c2w, pack_cameras
from utils.config import load_config

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "data" / "build.yaml"


@dataclass
class RenderConfig:
    res: int = 256                 # view resolution (the official data: 256)
    radius: float = 2.0            # camera distance from the origin
    azimuths: list[float] = field(default_factory=lambda: [0, 60, 120, 180, 240, 300, 30, 90, 150, 210, 270, 330])
    elevations: list[float] = field(default_factory=lambda: [30, 5, 30, 5, 30, 5, 5, 30, 5, 30, 5, 30])
    ssaa: int = 3                  # supersampling per axis for RGB and alpha (odd)
    jpeg_quality: int = 100        # depth_alpha.jpg: 100 keeps depth within the 8-bit quantisation
    backend: str = "auto"          # rasterizer: auto, torch, nvdiffrast
    device: str = "cpu"


@dataclass
class OccupancyConfig:
    num_points: int = 100000       # uniform query points in the padded box (ONet: 100k)
    num_surface: int = 100000      # surface points with normals (ONet: 100k)
    padding: float = 0.1           # query box = [-(1 + padding) / 2, (1 + padding) / 2]^3
    float16: bool = True           # ONet stores float16 points


@dataclass
class BuildConfig:
    """configs/data/build.yaml: how scripts/make_shapes.py and scripts/render_meshes.py write."""
    render: RenderConfig = field(default_factory=RenderConfig)
    occupancy: OccupancyConfig = field(default_factory=OccupancyConfig)
    views: int = NUM_VIEWS
    mc_res: int = 128              # marching-cubes grid of the procedural shapes
    holdout_fraction: float = 0.05 # per category, held out for val/test


def add_build_arguments(ap):
    """The command-line flags that scripts/make_shapes.py and scripts/render_meshes.py share."""
    ap.add_argument("--res", type=int, help="view resolution (config default 256)")
    ap.add_argument("--views", type=int, help="views per object (official: 12)")
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. occupancy.num_points=20000")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--overwrite", action="store_true", help="rewrite objects that already exist")


def load_build_config(args) -> BuildConfig:
    """The config file with --set overrides, then --res and --views."""
    overrides = list(args.set)
    if args.res is not None:
        overrides.append(f"render.res={args.res}")
    if args.views is not None:
        overrides.append(f"views={args.views}")
    return load_config(BuildConfig, args.config, overrides)


def camera_rig(cfg: RenderConfig, views: int = NUM_VIEWS) -> np.ndarray:
    """The (views, 25) cameras of every object, as c.npy rows: the configured azimuths and
    elevations for 12 views, else evenly spaced azimuths with alternating elevations."""
    if len(cfg.azimuths) != len(cfg.elevations):
        raise ValueError("render config: azimuths and elevations must have the same length")
    if views == len(cfg.azimuths):
        az, el = cfg.azimuths, cfg.elevations
    else:
        az = [360.0 * i / views for i in range(views)]
        el = [cfg.elevations[i % 2] for i in range(views)]
    c2w = np.stack([orbit_c2w(a, e, cfg.radius) for a, e in zip(az, el)])
    return pack_cameras(c2w, normalized_intrinsics())


def write_object(root, category: str, obj_id: str, obj, cfg: BuildConfig, seed: int) -> str:
    """Render and sample `obj` into root/category/obj_id; returns that relative dir."""
    rel = f"{category}/{obj_id}"
    final = Path(root, rel)
    tmp = final.with_name(final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_files(tmp, rel, obj, cfg, seed)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return rel


def _write_files(d: Path, rel: str, obj, cfg: BuildConfig, seed: int):
    render, occ = cfg.render, cfg.occupancy
    # Occupancy first: it is cheap and may reject the object (a mesh with no interior).
    rng = np.random.default_rng([seed, 7])
    half = (1.0 + occ.padding) / 2
    dtype = np.float16 if occ.float16 else np.float32
    q_yup = rng.uniform(-half, half, (occ.num_points, 3))
    q_yup = q_yup.astype(dtype).astype(np.float64)          # label what is stored, not what was drawn
    write_points(d / "points.npz", q_yup, obj.inside(q_yup @ ZUP_TO_YUP), dtype=dtype)
    surf, normals = obj.surface_samples(occ.num_surface, rng)
    write_pointcloud(d / "pointcloud.npz", surf @ ZUP_TO_YUP.T, normals @ ZUP_TO_YUP.T, dtype=dtype)
    cams = camera_rig(render, cfg.views)
    views = render_views(obj.mesh(), cams, render.res, render.ssaa, render.backend, render.device)
    write_gbuffer_object(d, views["rgb"], views["alpha"], views["depth"], views["normal"], cams,
                         obj.caption, rel, render.jpeg_quality)


def write_indices(root, objects_by_category: dict, holdout_fraction: float):
    """dataset.json (held-out objects last in each list) and the ONet split lists: the last
    `holdout` objects of a category are held out, split between val and test."""
    index = {}
    for cat, ids in sorted(objects_by_category.items()):
        ids = sorted(ids)
        h = max(1, round(holdout_fraction * len(ids))) if len(ids) > 1 else 0
        train, held = ids[:len(ids) - h], ids[len(ids) - h:]
        index[cat] = [f"{cat}/{i}" for i in ids]
        write_split_lists(root, cat, {"train": train, "val": held[: (len(held) + 1) // 2],
                                      "test": held[(len(held) + 1) // 2:]})
    write_index(root, index)
    return index
