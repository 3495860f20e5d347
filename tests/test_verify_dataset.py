"""scripts/verify_dataset.py and datasets/verify.py on a tiny make_shapes dataset and damaged
copies of it, and the training readers (GBufferDataset, OccupancyDataset) on the same damages."""
from __future__ import annotations

import importlib.util
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader, default_collate

from datasets.errors import DatasetError, collate_skipping, short_message
from datasets.gbuffer import CONDITION_FILES, TOKEN_FILES, GBufferDataset
from datasets.occupancy import OccupancyDataset
from datasets.verify import check_dataset, check_gbuffer_object

REPO = Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


verify_dataset = _script("verify_dataset")


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """4 objects, one per category (sphere, box, cylinder, cone), all in train.lst."""
    root = tmp_path_factory.mktemp("shapes") / "data"
    argv = ["--out", str(root), "--num", "4", "--res", "32", "--workers", "1", "--set", "mc_res=32",
            "--set", "occupancy.num_points=500", "--set", "occupancy.num_surface=500"]
    assert _script("make_shapes").main(argv) == 0
    return root


def _copy(clean, tmp_path) -> Path:
    return Path(shutil.copytree(clean, tmp_path / "data"))


def _cut_in_half(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# Each damage changes one thing and returns the path that must be reported. The file damages
# of a layout share one object (sphere/000000, box/000001), so that all at once they also
# check that every bad file of an object is named, not just the first.
def truncated_raw_img(root):
    _cut_in_half(root / "sphere/000000/raw_img.png")
    return root / "sphere/000000/raw_img.png"


def missing_c_npy(root):
    (root / "sphere/000000/c.npy").unlink()
    return root / "sphere/000000/c.npy"


def garbage_d_near_far(root):
    (root / "sphere/000000/d_near_far.npy").write_bytes(np.random.default_rng(0).bytes(256))
    return root / "sphere/000000/d_near_far.npy"


def json_entry_without_folder(root):
    index = json.loads((root / "dataset.json").read_text())
    index["cone"].append("cone/000098")
    (root / "dataset.json").write_text(json.dumps(index))
    return root / "cone/000098"


def truncated_points(root):
    _cut_in_half(root / "box/000001/points.npz")
    return root / "box/000001/points.npz"


def pointcloud_wrong_shape(root):
    flat = np.zeros((500, 2), np.float16)
    np.savez(root / "box/000001/pointcloud.npz", points=flat, normals=flat)
    return root / "box/000001/pointcloud.npz"


def lst_entry_without_folder(root):
    with open(root / "cylinder/train.lst", "a") as f:
        f.write("000099\n")
    return root / "cylinder/000099"


GBUFFER_DAMAGES = [truncated_raw_img, missing_c_npy, garbage_d_near_far, json_entry_without_folder]
OCCUPANCY_DAMAGES = [truncated_points, pointcloud_wrong_shape, lst_entry_without_folder]


def _verify(capsys, *argv):
    code = verify_dataset.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    *problems, summary = out.splitlines()
    assert "objects checked" in summary
    return code, problems


def test_clean_dataset_passes(clean, capsys):
    code, problems = _verify(capsys, clean)
    assert (code, problems) == (0, [])
    assert check_dataset(clean) == []


@pytest.mark.parametrize("damage", GBUFFER_DAMAGES + OCCUPANCY_DAMAGES, ids=lambda f: f.__name__)
def test_each_damage_is_reported_by_its_path(clean, tmp_path, capsys, damage):
    root = _copy(clean, tmp_path)
    bad = damage(root)
    code, problems = _verify(capsys, root)
    assert code == 1
    assert len(problems) == 1 and problems[0].startswith(f"{bad}: "), problems


def test_all_damages_at_once_are_all_reported(clean, tmp_path, capsys):
    root = _copy(clean, tmp_path)
    bad = sorted(str(damage(root)) for damage in GBUFFER_DAMAGES + OCCUPANCY_DAMAGES)
    code, problems = _verify(capsys, root)
    assert code == 1
    assert sorted(line.split(": ")[0] for line in problems) == bad
    assert check_dataset(root) == problems


def test_script_in_a_subprocess_with_workers(clean, tmp_path, capsys):
    root = _copy(clean, tmp_path)
    for damage in GBUFFER_DAMAGES + OCCUPANCY_DAMAGES:
        damage(root)
    proc = subprocess.run([sys.executable, str(REPO / "scripts/verify_dataset.py"), str(root), "--workers", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert proc.stdout.splitlines()[:-1] == check_dataset(root)
    assert "verify" in proc.stderr  # the progress bar


def _drop_last_view(path: Path):
    with Image.open(path) as im:
        rows = im.height // 2 if path.suffix == ".jpg" else im.height  # depth_alpha.jpg: depth above alpha
        im.crop((0, 0, im.width - rows, im.height)).save(path)


def test_image_sizes_against_c_npy(clean, tmp_path, capsys):
    root = _copy(clean, tmp_path)
    obj = root / "sphere/000000"
    for name in ("raw_img.png", "depth_alpha.jpg"):  # 11 views for the 12 cameras: the reader names one
        _drop_last_view(obj / name)
    _drop_last_view(root / "box/000001/normal.png")  # which the reader does not read
    code, problems = _verify(capsys, root)
    assert code == 1 and problems == [
        f"{root}/box/000001/normal.png: size 32x352, expected 32x384 (as raw_img.png)",
        f"{obj}/raw_img.png: size 32x352, expected 32x384 (12 views in c.npy of 32x32)",
        f"{obj}/depth_alpha.jpg: size 64x352, expected 64x384 (12 views in c.npy of 32x32)"]
    assert check_gbuffer_object(obj) == problems[1:]


def test_layout_option_and_not_a_dataset(clean, tmp_path, capsys):
    root = _copy(clean, tmp_path)
    truncated_raw_img(root)
    assert _verify(capsys, root, "--layout", "occupancy") == (0, [])
    assert _verify(capsys, root, "--layout", "gbuffer")[0] == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    code, problems = _verify(capsys, empty)
    assert code == 1 and problems == [f"{empty}: no dataset.json and no category folder with .lst split "
                                      "lists: not a dataset root"]


def test_token_and_condition_files(clean, tmp_path, capsys):
    root = _copy(clean, tmp_path)
    for obj in sorted(root.glob("*/0000*")):
        np.save(obj / TOKEN_FILES["gt_BL"], np.arange(10))
        np.save(obj / TOKEN_FILES["x_BLCv"], np.zeros((7, 8), np.float32))
        np.save(obj / CONDITION_FILES["text"]["tokens"], np.zeros((77, 16), np.float32))
        np.save(obj / CONDITION_FILES["text"]["pooled"], np.zeros(16, np.float32))
    assert _verify(capsys, root, "--condition", "text") == (0, [])
    gone = root / "sphere/000000" / TOKEN_FILES["gt_BL"]  # the reader stops here, the check goes on
    gone.unlink()
    garbage = root / "sphere/000000" / CONDITION_FILES["text"]["tokens"]
    garbage.write_bytes(b"not an array")
    short = root / "box/000001" / TOKEN_FILES["x_BLCv"]  # each file fine, together not
    np.save(short, np.zeros((5, 8), np.float32))
    code, problems = _verify(capsys, root, "--condition", "text")
    assert code == 1 and [line.split(": ")[0] for line in problems] == [str(short), str(gone), str(garbage)]
    assert problems[0].endswith("5 rows for 10 tokens, expected tokens - 3 "
                                "(the first scale of the 3 planes is not an input)")
    assert _verify(capsys, root, "--tokens")[1] == problems[:2]  # no condition files checked


def compressed_points_with_bad_deflate(root):
    """A compressed .npz whose deflate stream is broken (numpy raises zlib.error reading it)."""
    path = root / "box/000001/points.npz"
    with np.load(path) as z:
        arrays = dict(z)
    np.savez_compressed(path, **arrays)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[26:30])  # the first member's local header
    data[30 + name_len + extra_len] = 0xFF                   # deflate block type 3 does not exist
    path.write_bytes(bytes(data))
    return path


def test_corrupt_compressed_npz(clean, tmp_path, capsys):
    root = _copy(clean, tmp_path)
    bad = compressed_points_with_bad_deflate(root)
    assert _verify(capsys, root) == (1, [f"{bad}: corrupt or truncated .npz (Error -3 while decompressing data: "
                                         "invalid block type)"])


# ----------------------------------------------------------------------------- training readers

def _reader(root, damage, skip_bad=False):
    if damage in GBUFFER_DAMAGES:
        return GBufferDataset(root, split="all", holdout=1, skip_bad=skip_bad)
    return OccupancyDataset(root, split="train", num_points=256, pointcloud_n=256, skip_bad=skip_bad)


def _holds(obj_dir, bad: Path) -> bool:
    return Path(obj_dir) in (bad, bad.parent)


def _index_of(dataset, bad):
    """The item whose folder holds (or is) the damaged path."""
    paths = [dataset.root / rel for rel, _ in dataset.items] if isinstance(dataset, GBufferDataset) else \
            [dataset.root / cat / model for cat, model, _ in dataset.items]
    return next(i for i, p in enumerate(paths) if _holds(p, bad))


@pytest.mark.parametrize("damage", GBUFFER_DAMAGES + OCCUPANCY_DAMAGES, ids=lambda f: f.__name__)
def test_readers_raise_or_skip(clean, tmp_path, damage):
    root = _copy(clean, tmp_path)
    bad = damage(root)
    dataset = _reader(root, damage)
    i = _index_of(dataset, bad)
    with pytest.raises(DatasetError) as info:
        dataset[i]
    assert str(info.value).startswith(str(bad)) and short_message(info.value) == str(info.value)

    dataset = _reader(root, damage, skip_bad=True)
    samples = [dataset[j] for j in range(len(dataset))]
    assert [j for j, s in enumerate(samples) if s is None] == [i]
    assert dataset.num_skipped == 1

    loader = DataLoader(dataset, batch_size=len(dataset), num_workers=1,
                        collate_fn=collate_skipping(default_collate))
    batch = next(iter(loader))
    assert batch["num_skipped"] == 1
    assert len(batch["path"]) == len(dataset) - 1 and not any(_holds(p, bad) for p in batch["path"])
    assert batch["points" if "points" in batch else "rgb"].shape[0] == len(dataset) - 1


def test_reader_skips_a_corrupt_compressed_npz(clean, tmp_path):
    root = _copy(clean, tmp_path)
    compressed_points_with_bad_deflate(root)
    dataset = OccupancyDataset(root, split="train", skip_bad=True)
    assert None in [dataset[i] for i in range(len(dataset))]


def test_short_message_of_a_worker_error(clean, tmp_path):
    root = _copy(clean, tmp_path)
    bad = truncated_raw_img(root)
    loader = DataLoader(GBufferDataset(root, split="all", holdout=1), batch_size=2, num_workers=1)
    with pytest.raises(Exception) as info:
        list(loader)
    message = short_message(info.value)
    assert message.startswith(f"{bad}: corrupt or truncated image"), message
