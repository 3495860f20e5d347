import json

import numpy as np
import pytest
import torch

from datasets.errors import DatasetError
from datasets.gbuffer import CONDITION_FILES, TOKEN_FILES, GBufferDataset, decode_depth, encode_depth_alpha
from datasets.occupancy import OccupancyDataset, read_points, write_points
from models.inputs import encoder_input
from utils.cameras import plucker_rays


def test_depth_codec_is_the_official_formula_within_quantisation():
    rng = np.random.default_rng(0)
    depth = rng.uniform(1.3, 2.7, (3, 8, 8)).astype(np.float32)
    depth[:, :2] = 0                                   # background rows
    gray, near_far = encode_depth_alpha(depth, (depth > 0).astype(np.float32))
    v = gray[:8].reshape(8, 3, 8).swapaxes(0, 1).astype(np.float64)
    decoded = decode_depth(v, near_far)
    # Independent float64 recomputation of the official loader's lines.
    ref = 1 / ((v / 255) * (near_far[1][:, None, None] - near_far[0][:, None, None]) + near_far[0][:, None, None])
    ref[ref > 2.9] = 0
    assert np.allclose(decoded, ref, rtol=1e-6)
    assert (decoded[:, :2] == 0).all()
    step = depth[:, 2:] ** 2 * (near_far[1] - near_far[0]).max() / 255       # one level of disparity
    assert (np.abs(decoded[:, 2:] - depth[:, 2:]) <= step / 2 + 1e-6).all()
    with pytest.raises(ValueError, match="background threshold"):
        encode_depth_alpha(np.full((1, 2, 2), 3.0, np.float32), np.ones((1, 2, 2), np.float32))


def test_gbuffer_views_sample(shapes_root):
    ds = GBufferDataset(shapes_root, split="all", resolution=16)
    assert len(ds) == 10 and ds.categories[0] == json.loads((shapes_root / "dataset.json").read_text()).__iter__().__next__()
    s = ds[0]
    assert s["rgb"].shape == (12, 3, 32, 32) and 0 <= s["rgb"].min() and s["rgb"].max() <= 1
    assert s["depth"].shape == s["alpha"].shape == (12, 32, 32) and s["c"].shape == (12, 25)
    assert s["target_rgb"].shape == (12, 3, 16, 16) and s["target_depth"].shape == (12, 16, 16)
    assert torch.equal(s["plucker"], plucker_rays(s["c"], 32, 32))
    x = encoder_input(s["rgb"][:6], s["plucker"][:6], s["depth"][:6])
    assert x.shape == (6, 10, 32, 32)
    assert torch.equal(x[:, 3:9], s["plucker"][:6]) and torch.equal(x[:, 9], s["depth"][:6])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert encoder_input(batch["rgb"], batch["plucker"], batch["depth"]).shape == (2, 12, 10, 32, 32)
    white = (s["alpha"][0] == 0)
    assert torch.allclose(x[0, 0][white], torch.full_like(x[0, 0][white], (1 - 0.485) / 0.229))


def test_gbuffer_cache_decodes_each_object_once(shapes_root):
    cached, fresh = GBufferDataset(shapes_root, split="all", cache=True), GBufferDataset(shapes_root, split="all")
    first = cached[3]
    assert cached[3] is first and fresh[3] is not fresh[3]
    assert all(torch.equal(first[k], fresh[3][k]) for k in ("rgb", "depth", "alpha", "c", "plucker"))


def test_gbuffer_splits_follow_dataset_json(tmp_path, shapes_root):
    index = {"a": ["sphere/000000", "box/000001", "cylinder/000002"], "b": ["cone/000003", "torus/000004"]}
    root = tmp_path / "d"
    import shutil
    shutil.copytree(shapes_root, root)
    (root / "dataset.json").write_text(json.dumps(index))
    train = GBufferDataset(root, split="train", holdout=1)
    val = GBufferDataset(root, split="val", holdout=1)
    assert [r for r, _ in train.items] == ["sphere/000000", "box/000001", "cone/000003"]
    assert [r for r, _ in val.items] == ["cylinder/000002", "torus/000004"] and val.categories == ["a", "b"]
    assert [c for _, c in GBufferDataset(root, split="all", categories=["b"]).items] == [0, 0]
    with pytest.raises(DatasetError, match="split 'train' is empty"):
        GBufferDataset(root, split="train", holdout=5)
    with pytest.raises(DatasetError, match="unknown categories"):
        GBufferDataset(root, categories=["chairs"])


@pytest.mark.parametrize("condition,shapes", [("image", ((256, 1024), (1024,))), ("text", ((77, 768), (768,)))])
def test_gbuffer_tokens_sample(tmp_path, shapes_root, condition, shapes):
    import shutil
    root = tmp_path / "d"
    shutil.copytree(shapes_root, root)
    rng = np.random.default_rng(0)
    for rel in sum(json.loads((root / "dataset.json").read_text()).values(), []):
        d = root / rel
        np.save(d / TOKEN_FILES["gt_BL"], rng.integers(0, 16384, 2040))
        np.save(d / TOKEN_FILES["x_BLCv"], rng.standard_normal((2037, 8)).astype(np.float32))
        np.save(d / CONDITION_FILES["image"]["tokens_and_pooled"], rng.standard_normal((257, 1024)).astype(np.float32))
        np.save(d / CONDITION_FILES["text"]["tokens"], rng.standard_normal((77, 768)).astype(np.float32))
        np.save(d / CONDITION_FILES["text"]["pooled"], rng.standard_normal(768).astype(np.float32))
    ds = GBufferDataset(root, split="all", mode="tokens", condition=condition)
    s = ds[0]
    assert s["gt_BL"].shape == (2040,) and s["gt_BL"].dtype == torch.int64 and s["x_BLCv"].shape == (2037, 8)
    assert s["cond_tokens"].shape == shapes[0] and s["cond_pooled"].shape == shapes[1]
    if condition == "image":   # row 0 of the DINO file is the pooled output
        emb = np.load(root / ds.items[0][0] / CONDITION_FILES["image"]["tokens_and_pooled"])
        assert np.array_equal(s["cond_pooled"].numpy(), emb[0]) and np.array_equal(s["cond_tokens"].numpy(), emb[1:])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["gt_BL"].shape == (4, 2040) and len(batch["caption"]) == 4
    np.save(root / ds.items[1][0] / TOKEN_FILES["x_BLCv"], np.zeros((5, 8), np.float32))
    with pytest.raises(DatasetError, match="x_BLCv_wo_first_l"):
        ds[1]


def test_occupancy_dataset(shapes_root):
    ds = OccupancyDataset(shapes_root, split="train", num_points=512, pointcloud_n=300)
    assert len(ds) == len(ds.categories) == 10
    s = ds[0]
    assert s["points"].shape == (512, 3) and s["occ"].shape == (512,) and s["inputs"].shape == (300, 3)
    assert set(s["occ"].unique().tolist()) <= {0.0, 1.0} and 0 < s["occ"].mean() < 1
    torch.manual_seed(0)
    a = ds[0]["points"]
    torch.manual_seed(1)
    assert not torch.equal(a, ds[0]["points"])                          # fresh subsample each time
    with pytest.raises(ValueError):
        OccupancyDataset(shapes_root, split="training")
    with pytest.raises(DatasetError, match="lists no shapes"):
        OccupancyDataset(shapes_root, split="val")   # one object per category: none held out


def test_points_roundtrip_packbits(tmp_path):
    pts = np.random.default_rng(0).uniform(-0.5, 0.5, (1001, 3))
    occ = pts[:, 0] > 0.1
    write_points(tmp_path / "p.npz", pts, occ, dtype=np.float32)
    back, occ2, half = read_points(tmp_path / "p.npz")
    assert np.array_equal(occ2, occ) and np.allclose(back, pts, atol=1e-7) and not half
    write_points(tmp_path / "h.npz", pts, occ)
    assert read_points(tmp_path / "h.npz")[2]
