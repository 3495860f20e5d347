"""The ONet / Argus-3D occupancy layout: read, write, and a Dataset.

Layout: `<root>/<category>/<id>/points.npz` and `pointcloud.npz`, per category split lists
`<root>/<category>/{train,val,test}.lst` (one id per line) and an optional
`<root>/metadata.yaml` ({category: {id, name}}). Coordinates follow ShapeNet/ONet: +y up,
surface inside [-0.5, 0.5], query points inside [-0.55, 0.55].

| file | keys |
|---|---|
| points.npz | points (N, 3) float16/32; occupancies (ceil(N / 8),) uint8 = np.packbits(occ); loc (3,); scale () |
| pointcloud.npz | points (M, 3) and normals (M, 3) float16/32; loc (3,); scale () |
| occupancy_tokens.npz | index (L²,) int64: an Argus-3D tokenizer's ids (scripts/precompute.py) |

`loc` and `scale` record the normalisation: original = points * scale + loc.
"""
from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
import yaml

from datasets.errors import DatasetError, log

SPLITS = ("train", "val", "test")
OCCUPANCY_TOKENS = "occupancy_tokens.npz"   # field `index` (L²,) int64: scripts/precompute.py, the official stage-2 input
# The G-buffer world is +z up; ONet's is +y up: a rotation of -90 degrees about x.
ZUP_TO_YUP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])


def write_points(path, points_N3, occ_N, loc=(0.0, 0.0, 0.0), scale=1.0, dtype=np.float16):
    np.savez(path, points=np.asarray(points_N3).astype(dtype), occupancies=np.packbits(np.asarray(occ_N, bool)),
             loc=np.asarray(loc, np.float32), scale=np.float32(scale))


def write_pointcloud(path, points_M3, normals_M3, loc=(0.0, 0.0, 0.0), scale=1.0, dtype=np.float16):
    np.savez(path, points=np.asarray(points_M3).astype(dtype), normals=np.asarray(normals_M3).astype(dtype),
             loc=np.asarray(loc, np.float32), scale=np.float32(scale))


def write_split_lists(root, category: str, splits: dict):
    Path(root, category).mkdir(parents=True, exist_ok=True)
    for name, ids in splits.items():
        Path(root, category, f"{name}.lst").write_text("".join(f"{i}\n" for i in ids))


def _load_npz(path, keys):
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise DatasetError(path, f"missing arrays {missing} (has {z.files})")
            return {k: z[k] for k in keys}
    except FileNotFoundError:
        raise DatasetError(path, "missing file") from None
    except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, KeyError, MemoryError) as e:
        raise DatasetError(path, f"corrupt or truncated .npz ({e})") from None


def _points_array(path, arr, name):
    if arr.ndim != 2 or arr.shape[1] != 3 or arr.dtype.kind != "f":
        raise DatasetError(path, f"'{name}' has shape {arr.shape} and dtype {arr.dtype}, expected (N, 3) float")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise DatasetError(path, f"'{name}' contains NaN or inf")
    return arr


def read_points(path):
    """-> points (N, 3) float32, occupancies (N,) bool, and whether the file stored float16."""
    z = _load_npz(path, ("points", "occupancies"))
    pts = _points_array(path, z["points"], "points")
    packed = z["occupancies"]
    if packed.dtype != np.uint8 or packed.ndim != 1 or packed.shape[0] * 8 < len(pts):
        raise DatasetError(path, f"'occupancies' has shape {packed.shape} dtype {packed.dtype}, expected "
                           f"np.packbits of {len(pts)} labels ({(len(pts) + 7) // 8} uint8)")
    return pts, np.unpackbits(packed)[: len(pts)].astype(bool), z["points"].dtype == np.float16


def read_pointcloud(path):
    """-> points (M, 3), normals (M, 3), float32."""
    z = _load_npz(path, ("points", "normals"))
    pts = _points_array(path, z["points"], "points")
    nrm = _points_array(path, z["normals"], "normals")
    if len(nrm) != len(pts):
        raise DatasetError(path, f"{len(pts)} points but {len(nrm)} normals")
    return pts, nrm


def read_occupancy_zup(obj_dir) -> dict:
    """An object folder's points.npz and pointcloud.npz turned into the G-buffer world (+z up),
    for folders that hold both layouts in one frame, as the dataset builder writes them:
    occ_points (N, 3) and surface_points, surface_normals (M, 3) float16, occ_labels (N,) bool."""
    d = Path(obj_dir)
    pts, occ, _ = read_points(d / "points.npz")
    surf, nrm = read_pointcloud(d / "pointcloud.npz")
    to_zup = lambda a: torch.from_numpy((a @ ZUP_TO_YUP).astype(np.float16))   # stored = world @ ZUP_TO_YUP.T
    return {"occ_points": to_zup(pts), "occ_labels": torch.from_numpy(occ), "surface_points": to_zup(surf),
            "surface_normals": to_zup(nrm)}


def read_split(root, category: str, split: str) -> list:
    path = Path(root, category, f"{split}.lst")
    try:
        return [l.strip() for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
    except FileNotFoundError:
        raise DatasetError(path, "missing split list") from None
    except (UnicodeDecodeError, OSError) as e:
        raise DatasetError(path, f"unreadable split list ({e})") from None


def list_categories(root) -> list:
    """Category folders: those named in metadata.yaml if present, else every folder with a .lst."""
    root = Path(root)
    meta = root / "metadata.yaml"
    if meta.is_file():
        try:
            data = yaml.safe_load(meta.read_text()) or {}
        except yaml.YAMLError as e:
            raise DatasetError(meta, f"not valid YAML ({e})") from None
        if not isinstance(data, dict):
            raise DatasetError(meta, "expected {category: {id, name}}")
        return [str(k) for k in data]   # unquoted ShapeNet ids load as ints
    cats = sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.lst"))) if root.is_dir() else []
    if not cats:
        raise DatasetError(root, "no category folder with a .lst split file: not an occupancy dataset root")
    return cats


def subsample(n: int, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices of k of n items drawn without replacement (all n, in order, when k >= n)."""
    return torch.randperm(n, generator=generator)[:k] if k < n else torch.arange(n)


class OccupancyDataset(torch.utils.data.Dataset):
    """Shapes of an ONet-layout dataset, for occupancy tokenizers (Argus-3D stage 1).

    A sample: points (num_points, 3) and occ (num_points,) float (query points and labels,
    subsampled without replacement when the file has more), inputs (pointcloud_n, 3) surface
    points with Gaussian noise `noise` (0.0005 as the Argus-3D code), normals of those points,
    (float16 query points get `float16_noise` against their quantisation grid, as ONet),
    category (index into self.categories), model id and path.
    """

    def __init__(self, root, split: str = "train", categories=None, num_points: int = 2048,
                 pointcloud_n: int = 30000, noise: float = 0.0005, skip_bad: bool = False,
                 float16_noise: float = 1e-4):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.root = Path(root)
        self.num_points, self.pointcloud_n, self.noise = num_points, pointcloud_n, noise
        self.skip_bad, self.num_skipped, self.float16_noise = skip_bad, 0, float16_noise
        known = list_categories(self.root)
        unknown = set(categories or ()) - set(known)
        if unknown:
            raise DatasetError(self.root, f"unknown categories {sorted(unknown)}; has {known}")
        self.categories = list(categories or known)
        self.items = [(cat, m, ci) for ci, cat in enumerate(self.categories) for m in read_split(self.root, cat, split)]
        if not self.items:
            raise DatasetError(self.root, f"split '{split}' lists no shapes")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        cat, model, ci = self.items[i]
        d = self.root / cat / model
        try:
            pts, occ, half = read_points(d / "points.npz")
            surf, nrm = read_pointcloud(d / "pointcloud.npz")
        except DatasetError as e:
            if not self.skip_bad:
                raise
            self.num_skipped += 1
            log.warning("skipping damaged shape (%d so far): %s", self.num_skipped, e)
            return None
        # torch's RNG, which DataLoader seeds differently in every worker.
        qi, si = subsample(len(pts), self.num_points), subsample(len(surf), self.pointcloud_n)
        points = torch.from_numpy(pts)[qi]
        if half and self.float16_noise:  # ONet: float16 files get 1e-4 noise against the quantisation grid
            points = points + self.float16_noise * torch.randn_like(points)
        inputs = torch.from_numpy(surf)[si]
        inputs = inputs + self.noise * torch.randn_like(inputs)
        return {"points": points, "occ": torch.from_numpy(occ)[qi].float(),
                "inputs": inputs, "normals": torch.from_numpy(nrm)[si],
                "category": ci, "model": model, "path": str(d)}


class OccupancyTokenDataset(torch.utils.data.Dataset):
    """The token ids of a split (OCCUPANCY_TOKENS, written by scripts/precompute.py
    --occupancy-vqvae), for the raster-order generator: tokens (L²,) int64, category (index
    into self.categories) and, for `condition` image or text, the pooled embedding the G-buffer
    files beside it hold (datasets/gbuffer.py CONDITION_FILES)."""

    def __init__(self, root, split: str = "train", condition: str | None = None):
        from datasets.gbuffer import CONDITION_FILES
        self.root, self.condition = Path(root), condition
        self.categories = list_categories(self.root)
        self.items = [(cat, m, ci) for ci, cat in enumerate(self.categories) for m in read_split(self.root, cat, split)]
        if not self.items:
            raise DatasetError(self.root, f"split '{split}' lists no shapes")
        missing = [self.root / c / m / OCCUPANCY_TOKENS for c, m, _ in self.items
                   if not (self.root / c / m / OCCUPANCY_TOKENS).is_file()]
        if missing:
            raise DatasetError(missing[0], f"missing token ids ({len(missing)} of {len(self.items)} shapes of "
                               f"'{split}'): run scripts/precompute.py --data-dir {self.root} --occupancy-vqvae "
                               f"TOKENIZER --split {split}")
        self.pooled_file = None
        if condition is not None:
            files = CONDITION_FILES[condition]
            self.pooled_file = files.get("pooled") or files["tokens_and_pooled"]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        cat, model, ci = self.items[i]
        d = self.root / cat / model
        out = {"tokens": torch.from_numpy(_load_npz(d / OCCUPANCY_TOKENS, ["index"])["index"].astype(np.int64)),
               "category": ci}
        if self.pooled_file is not None:
            try:
                pooled = np.load(d / self.pooled_file, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise DatasetError(d / self.pooled_file, f"missing or unreadable {self.condition} embedding ({e}); "
                                   f"run scripts/precompute.py with --{self.condition}-encoder") from None
            out["pooled"] = torch.from_numpy(pooled.reshape(-1, pooled.shape[-1])[0].astype(np.float32))
        return out
