"""File-level checks of a dataset in the G-buffer layout, the occupancy layout, or both.

The training readers stop at the first bad file of an object; a checker must name every one,
so an object the reader rejects is checked again file by file, with the same read_* functions
and the shapes they expect. Every problem is one line, `<path>: <what is wrong>`:

    layouts = detect_layouts(root)                 # ["gbuffer", "occupancy"] for make_shapes
    problems, targets = find_objects(root, layouts)
    for lines in check_objects(targets): ...       # one list of lines per object, in order
    check_dataset(root) -> every line at once
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterator, NamedTuple

from datasets.errors import DatasetError
from datasets.gbuffer import (CONDITION_FILES, TOKEN_FILES, load_index, read_gbuffer_object, read_image,
                              read_npy, read_precomputed, read_text)
from datasets.occupancy import SPLITS, list_categories, read_pointcloud, read_points, read_split
from utils.parallel import parallel_map

LAYOUTS = ("gbuffer", "occupancy")


class Target(NamedTuple):
    """One object folder, the layouts to check it in and the index files that list it."""
    path: str
    layouts: tuple
    listed_in: tuple


def _attempt(problems: list, fn, path, *args):
    """fn(path, *args), or None after appending one line about `path` to problems."""
    try:
        return fn(path, *args)
    except DatasetError as e:
        problems.append(str(e))
    except Exception as e:  # damage no reader anticipated is still one line, never a traceback
        kind = type(e).__qualname__
        kind = kind if type(e).__module__ == "builtins" else f"{type(e).__module__}.{kind}"
        problems.append(f"{path}: unreadable ({kind}: {e})")
    return None


def _wrong_size(path, img, size, why) -> list[str]:
    if img is None or img.shape[:2] == size:
        return []
    return [f"{path}: size {img.shape[0]}x{img.shape[1]}, expected {size[0]}x{size[1]} ({why})"]


# ----------------------------------------------------------------------------- one object

def _check_view_files(d: Path) -> list[str]:
    """Each G-buffer file on its own, then the image sizes against V (c.npy) and H (raw_img.png)."""
    p = []
    c = _attempt(p, read_npy, d / "c.npy", (None, 25), "f")
    V = None if c is None else c.shape[0]
    raw = _attempt(p, read_image, d / "raw_img.png", "RGB")
    gray = _attempt(p, read_image, d / "depth_alpha.jpg", "L")
    normal = _attempt(p, read_image, d / "normal.png", "RGB") if (d / "normal.png").exists() else None
    _attempt(p, read_npy, d / "d_near_far.npy", (2, V), "f")
    _attempt(p, read_npy, d / "bbox.npy", (V, 4), "iuf")
    _attempt(p, read_text, d / "caption_3dtopia.txt")
    _attempt(p, read_text, d / "ins.txt")
    # With c.npy or raw_img.png unreadable, the sizes are still checked against what is left.
    ref = raw if raw is not None else gray
    if ref is None:
        return p
    H = raw.shape[0] if raw is not None else gray.shape[0] // 2
    if V is not None:
        W, why = V * H, f"{V} views in c.npy of {H}x{H}"
    else:
        W, why = ref.shape[1], f"as {'raw_img.png' if raw is not None else 'depth_alpha.jpg'}"
    for name, img, rows in (("raw_img.png", raw, H), ("depth_alpha.jpg", gray, 2 * H), ("normal.png", normal, H)):
        p += _wrong_size(d / name, img, (rows, W), why)
    return p


def _check_token_files(d: Path, condition: str | None) -> list[str]:
    p = []
    _attempt(p, read_npy, d / TOKEN_FILES["gt_BL"], (None,), "iu")
    _attempt(p, read_npy, d / TOKEN_FILES["x_BLCv"], (None, None), "f")
    shapes = {"tokens_and_pooled": (None, None), "tokens": (None, None), "pooled": (None,)}
    for key, name in CONDITION_FILES.get(condition, {}).items():
        _attempt(p, read_npy, d / name, shapes[key], "f")
    return p


def check_gbuffer_object(obj_dir, tokens: bool = False, condition: str | None = None) -> list[str]:
    """Problem lines of one G-buffer object folder; with tokens (implied by condition, 'image' or
    'text') also of its precomputed token and condition files."""
    d = Path(obj_dir)
    by_reader = []
    obj = _attempt(by_reader, read_gbuffer_object, d)
    if obj is None:
        # Per-file checks read everything the reader reads; the reader's own line is kept only
        # when they find nothing (a check of the reader's that is missing here).
        problems = _check_view_files(d) or by_reader
    else:
        problems = []
        if (d / "normal.png").exists():  # not read for training, so not by the reader
            V, H, W = obj["rgb"].shape[:3]
            img = _attempt(problems, read_image, d / "normal.png", "RGB")
            problems += _wrong_size(d / "normal.png", img, (H, V * W), "as raw_img.png")
    if tokens or condition:
        by_reader = []
        if _attempt(by_reader, read_precomputed, d, condition) is None:
            problems += _check_token_files(d, condition) or by_reader
    return problems


def check_occupancy_object(obj_dir) -> list[str]:
    """Problem lines of one occupancy object folder (points.npz, pointcloud.npz)."""
    d, problems = Path(obj_dir), []
    _attempt(problems, read_points, d / "points.npz")
    _attempt(problems, read_pointcloud, d / "pointcloud.npz")
    return problems


def check_object(target: Target, tokens: bool = False, condition: str | None = None) -> list[str]:
    d = Path(target.path)
    if not d.is_dir():  # one line, not one per file
        return [f"{d}: missing object folder (listed in {', '.join(target.listed_in)})"]
    problems = []
    if "gbuffer" in target.layouts:
        problems += check_gbuffer_object(d, tokens, condition)
    if "occupancy" in target.layouts:
        problems += check_occupancy_object(d)
    return problems


# ----------------------------------------------------------------------------- a dataset

def detect_layouts(root, layout: str = "auto") -> list[str]:
    """auto: 'gbuffer' if root/dataset.json exists, 'occupancy' if root/metadata.yaml or a
    category folder with .lst split lists does, both for a make_shapes root."""
    if layout != "auto":
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be auto, {' or '.join(LAYOUTS)}, got {layout!r}")
        return [layout]
    root = Path(root)
    found = ["gbuffer"] if (root / "dataset.json").is_file() else []
    if (root / "metadata.yaml").is_file() or any(p.is_dir() and any(p.glob("*.lst")) for p in root.iterdir()):
        found.append("occupancy")
    return found


def find_objects(root, layouts) -> tuple[list[str], list[Target]]:
    """Problems of the index files (dataset.json, metadata.yaml, split lists) and the objects
    they list, sorted by path; an object listed by both layouts is one Target."""
    root, problems, found = Path(root), [], {}

    def add(obj_dir: Path, layout: str, source: str):
        lays, sources = found.setdefault(str(obj_dir), ({}, {}))
        lays[layout] = sources[source] = None                  # dicts as ordered sets

    if not layouts:
        problems.append(f"{root}: no dataset.json and no category folder with .lst split lists: not a dataset root")
    # The lambdas let an error that is not a DatasetError still name the index file.
    if "gbuffer" in layouts:
        index = _attempt(problems, lambda p: load_index(p.parent), root / "dataset.json")
        for rels in (index or {}).values():
            for rel in rels:
                add(root / rel, "gbuffer", "dataset.json")
    if "occupancy" in layouts:
        for cat in _attempt(problems, list_categories, root) or []:
            if not (root / cat).is_dir():  # only metadata.yaml can name a category without a folder
                problems.append(f"{root / cat}: missing category folder (listed in metadata.yaml)")
                continue
            for split in SPLITS:
                lst = root / cat / f"{split}.lst"
                for model in _attempt(problems, lambda p: read_split(root, cat, split), lst) or []:
                    add(root / cat / model, "occupancy", f"{cat}/{split}.lst")
    targets = [Target(path, tuple(lays), tuple(sources)) for path, (lays, sources) in sorted(found.items())]
    return problems, targets


def check_objects(targets, tokens: bool = False, condition: str | None = None,
                  workers: int = 1) -> Iterator[list[str]]:
    """The problem lines of each target, in order, with a progress bar; workers > 1 reads in
    that many processes."""
    job = functools.partial(check_object, tokens=tokens, condition=condition)
    yield from parallel_map(job, list(targets), workers, "verify", ordered=True)


def check_dataset(root, layout: str = "auto", tokens: bool = False, condition: str | None = None,
                  workers: int = 1) -> list[str]:
    """Every problem line of the dataset at root; [] when it is clean."""
    problems, targets = find_objects(root, detect_layouts(root, layout))
    for lines in check_objects(targets, tokens, condition, workers):
        problems += lines
    return problems
