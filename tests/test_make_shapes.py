"""What make_shapes writes: the official layouts exactly, and geometry that agrees across files."""
import filecmp
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.spatial import cKDTree

from datasets.captions import training_captions
from datasets.gbuffer import BACKGROUND_DEPTH, GBufferDataset, read_gbuffer_object
from datasets.occupancy import ZUP_TO_YUP, read_pointcloud, read_points
from datasets.shapes import FAMILIES, LABELS, PALETTE, sample_shape
from tests.helpers import make_tiny_dataset
from utils.cameras import unproject_depth

GBUFFER = {"raw_img.png", "depth_alpha.jpg", "d_near_far.npy", "c.npy", "bbox.npy", "normal.png",
           "caption_3dtopia.txt", "ins.txt"}


def _objects(root):
    index = json.loads((root / "dataset.json").read_text())
    return [(cat, root / rel) for cat, rels in index.items() for rel in rels]


def test_layout_names_shapes_dtypes(shapes_root):
    objs = _objects(shapes_root)
    assert sorted({c for c, _ in objs}) == sorted(LABELS) and len(objs) == 10
    for cat, d in objs:
        assert GBUFFER | {"points.npz", "pointcloud.npz", "caption_variants.json"} == {p.name for p in d.iterdir()}
        captions = json.loads((d / "caption_variants.json").read_text())
        assert len(captions) == 8 and captions[0] == (d / "caption_3dtopia.txt").read_text()
        assert captions == training_captions(captions[0], 0, int(d.name), 8)
        with Image.open(d / "raw_img.png") as im:
            assert im.mode == "RGB" and im.size == (12 * 32, 32)
        with Image.open(d / "depth_alpha.jpg") as im:
            assert im.format == "JPEG" and im.mode == "L" and im.size == (12 * 32, 64)
        for name, shape, dtype in (("d_near_far.npy", (2, 12), np.float32), ("c.npy", (12, 25), np.float32),
                                   ("bbox.npy", (12, 4), np.int64)):
            a = np.load(d / name)
            assert a.shape == shape and a.dtype == dtype, name
        with np.load(d / "points.npz") as z:
            assert z["points"].shape == (6000, 3) and z["points"].dtype == np.float16
            assert z["occupancies"].shape == (750,) and z["occupancies"].dtype == np.uint8
        with np.load(d / "pointcloud.npz") as z:
            assert z["points"].shape == z["normals"].shape == (6000, 3) and z["normals"].dtype == np.float16
        assert (d / "ins.txt").read_text() == f"{cat}/{d.name}"
    for cat in LABELS:   # a category of one object holds none out
        lists = {s: (shapes_root / cat / f"{s}.lst").read_text().split() for s in ("train", "val", "test")}
        assert lists == {"train": [f"{LABELS.index(cat):06d}"], "val": [], "test": []}


def test_cameras_and_bbox_match_official_conventions(shapes_root):
    _, d = _objects(shapes_root)[0]
    c = np.load(d / "c.npy")
    K = c[:, 16:].reshape(12, 3, 3)
    assert np.allclose(K[:, 0, 0], 1422.222 / 1024, atol=1e-5) and np.allclose(K[:, :2, 2], 0.5)
    alpha = read_gbuffer_object(d)["alpha"]
    bbox = np.load(d / "bbox.npy")
    for v in range(12):   # 256-px units: 32 px views scale by 8; JPEG noise allows one pixel
        rows, cols = np.nonzero(alpha[v] > 0.5)
        lo, hi = np.array([rows.min(), cols.min()]) * 8, (np.array([rows.max(), cols.max()]) + 1) * 8 - 1
        assert (bbox[v, :2] <= lo).all() and (bbox[v, :2] >= lo - 8).all()
        assert (bbox[v, 2:] >= hi).all() and (bbox[v, 2:] <= hi + 8).all()


def test_depth_unprojects_onto_the_same_surface_from_all_views(shapes_root):
    """Depth decoded exactly as the official loader does, unprojected with c.npy, lands on
    the object's surface in every view, and on the surface point cloud of the other layout."""
    for i, (cat, d) in enumerate(sorted(_objects(shapes_root), key=lambda x: x[1].name)):
        shape = sample_shape(0, int(d.name))
        obj = read_gbuffer_object(d)
        cloud = cKDTree(read_pointcloud(d / "pointcloud.npz")[0] @ ZUP_TO_YUP)  # back to +z up
        total = 0
        for v in range(12):
            depth = obj["depth"][v]
            assert depth.max() < BACKGROUND_DEPTH and (depth[obj["alpha"][v] == 0] == 0).all()
            inner = (obj["alpha"][v] > 0.99) & (depth > 0)
            total += inner.sum()
            pts = unproject_depth(depth, obj["c"][v])[inner]
            assert np.abs(shape.sdf(pts)).max() < 0.012, (cat, v)
            assert cloud.query(pts)[0].max() < 0.04, (cat, v)
        assert total > 100, cat


def test_occupancy_agrees_with_surface_point_cloud(shapes_root):
    for cat, d in _objects(shapes_root):
        q, occ, _ = read_points(d / "points.npz")
        surf, normals = read_pointcloud(d / "pointcloud.npz")
        assert np.allclose(np.linalg.norm(normals, axis=1), 1, atol=2e-3)
        # Which side of its 5 nearest surface points (by their normals) a query point lies on.
        dist, nn = cKDTree(surf).query(q, k=5)
        far = dist[:, 0] > 0.03
        behind = (((q[:, None] - surf[nn]) * normals[nn]).sum(-1) < 0).mean(1) > 0.5
        assert far.sum() > 1000 and occ.sum() > 20, cat
        assert (behind[far] == occ[far]).mean() > 0.995, cat
        assert np.abs(surf).max() <= 0.5 and np.abs(q).max() <= 0.55


def test_gbuffer_dataset_reads_the_occupancy_in_the_world_of_the_views(shapes_root):
    """GBufferDataset(occupancy=True) against the analytic shapes, whose world is the views' (+z up)."""
    ds = GBufferDataset(shapes_root, split="all", occupancy=True)
    for i in range(len(ds)):
        s = ds[i]
        shape = sample_shape(0, int(Path(s["path"]).name))
        sdf = shape.sdf(s["occ_points"].double().numpy())
        clear = np.abs(sdf) > 0.01                      # beyond float16 rounding of the stored points
        assert clear.sum() > 1000 and ((sdf[clear] < 0) == s["occ_labels"].numpy()[clear]).mean() > 0.999
        assert np.abs(shape.sdf(s["surface_points"].double().numpy())).max() < 0.01
        step = shape.sdf(s["surface_points"].double().numpy() + 0.005 * s["surface_normals"].double().numpy())
        assert (step > 0).mean() > 0.99                 # the normals point outwards


def test_colours_and_captions_follow_parameters(shapes_root):
    for cat, d in _objects(shapes_root):
        caption = (d / "caption_3dtopia.txt").read_text()
        shape = sample_shape(0, int(d.name))
        assert caption == shape.caption and shape.label == cat
        named = [c for c in PALETTE if f" {c} " in f" {caption} "]
        if cat in FAMILIES:
            assert caption.endswith(cat) and len(named) == 1
            rgb = read_gbuffer_object(d)["rgb"][read_gbuffer_object(d)["alpha"] == 1].mean(0) / 255
            dists = {c: np.linalg.norm(rgb / rgb.max() - np.array(PALETTE[c]) / max(PALETTE[c])) for c in PALETTE}
            assert min(dists, key=dists.get) == named[0], (caption, rgb)
        else:
            assert (" on top of " if cat == "stack" else " next to ") in caption and len(set(named)) == 2


def test_parameters_vary_and_objects_fit_the_box():
    shapes = [sample_shape(3, i) for i in range(40)]
    assert len({s.caption for s in shapes}) > 30
    for s in shapes:
        v = s.mesh().verts
        assert np.abs(v).max() <= 0.45 + 1e-3
        ext = (v.max(0) - v.min(0)).max()
        assert 0.45 < ext <= 0.9 + 2e-3
    sizes = {(s.caption.split()[1] if s.label in FAMILIES else "") for s in shapes}
    assert {"small", "large"} <= sizes


def test_upright_objects_are_the_same_objects_axis_aligned():
    for i in (1, 6, 9):                                     # a box, a pyramid, a pair
        turned, upright = sample_shape(0, i, mc_res=32), sample_shape(0, i, mc_res=32, upright=True)
        assert upright.caption == turned.caption and np.array_equal(upright.R, np.eye(3))
        assert not np.allclose(turned.R, np.eye(3))
        ext = [np.ptp(s.mesh().verts, 0).max() for s in (turned, upright)]
        assert ext[0] == pytest.approx(ext[1], abs=1e-6)    # same size word, same largest extent
    for turned in (False, True):                            # the box's world bounds are its own extents
        box = sample_shape(0, 1, mc_res=32, upright=not turned)
        ext, own = np.ptp(box.mesh().verts, 0), box.parts[0].half_extent()
        assert np.allclose(ext / ext.max(), own / own.max(), atol=0.03) != turned


def test_make_shapes_upright_writes_the_upright_objects(tmp_path):
    root = make_tiny_dataset(tmp_path / "up", num=2, extra=["--upright"])
    pts, occ, _ = read_points(root / "box" / "000001" / "points.npz")
    zup = pts.astype(np.float64) @ ZUP_TO_YUP                 # stored = world @ ZUP_TO_YUP.T
    agree = {up: ((sample_shape(0, 1, upright=up).sdf(zup) < 0) == occ).mean() for up in (True, False)}
    assert agree[True] > 0.99 > agree[False]
    assert json.loads((root / "shapes.json").read_text())["upright"] is True
    with pytest.raises(ValueError, match="other settings"):  # not mixed with turned objects
        make_tiny_dataset(root, num=2)


def test_deterministic_per_seed_across_workers_and_resumable(tmp_path, shapes_root):
    other = make_tiny_dataset(tmp_path / "again", num=3, extra=["--workers", "2"])
    for rel in ("sphere/000000", "box/000001", "cylinder/000002"):
        for f in ("raw_img.png", "depth_alpha.jpg", "c.npy", "points.npz", "pointcloud.npz"):
            assert filecmp.cmp(other / rel / f, shapes_root / rel / f, shallow=False), (rel, f)
    (other / "box" / "000001" / "raw_img.png").unlink()
    stamp = (other / "sphere" / "000000" / "c.npy").stat().st_mtime_ns
    make_tiny_dataset(other, num=3)                 # keeps finished objects
    assert (other / "sphere" / "000000" / "c.npy").stat().st_mtime_ns == stamp
    different = make_tiny_dataset(tmp_path / "seed1", num=1, seed=1)
    assert not filecmp.cmp(different / "sphere/000000/raw_img.png", shapes_root / "sphere/000000/raw_img.png", shallow=False)
    with pytest.raises(ValueError, match="other settings"):
        make_tiny_dataset(other, num=3, seed=5)
