"""train_vqvae.py with an Argus-3D config (kind: occupancy): exact resume, two gloo processes, the
official converter kinds, and the loss falling, on the session's tiny dataset."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_vqvae
from models.occupancy_vqvae import OccupancyVQVAE, OccupancyVQVAEConfig, load_occupancy_vqvae
from models.raster_ar import RasterAR, RasterARConfig, load_raster_ar
from trainers.occupancy import TrainConfig, draw
from trainers.sampler import seeded_generator
from utils.cli import run
from tests.helpers import torchrun, train_log

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--config", str(ROOT / "configs/argus/tiny.yaml"), "--batch-size", "2", "--set", "train.save_every=1000",
        "--set", "train.code_restart=2"]


def _train(data, out, steps, *extra) -> int:
    with pytest.raises(SystemExit) as e:
        run(lambda: train_vqvae.main([*FAST, "--data-dir", str(data), "--out-dir", str(out), "--max-steps", str(steps),
                                      *extra]))
    return e.value.code


def test_resume_gives_the_weights_of_a_straight_run(shapes_root, tmp_path):
    assert _train(shapes_root, tmp_path / "straight", 6) == 0
    assert _train(shapes_root, tmp_path / "split", 6, "--stop-at", "3") == 0
    assert _train(shapes_root, tmp_path / "split", 6, "--resume") == 0
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("straight", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in train_log(tmp_path / "straight")] == [r["loss"] for r in train_log(tmp_path / "split")]
    model = load_occupancy_vqvae(tmp_path / "straight")
    assert isinstance(model, OccupancyVQVAE) and model.cfg.plane_resolution == 32


def test_two_processes_compute_the_losses_of_one(shapes_root, tmp_path):
    common = [*FAST, "--batch-size", "4", "--max-steps", "3", "--data-dir", str(shapes_root)]
    with pytest.raises(SystemExit):
        run(lambda: train_vqvae.main([*common, "--out-dir", str(tmp_path / "one")]))
    torchrun("train_vqvae.py", [*common, "--out-dir", tmp_path / "two"])
    one, two = train_log(tmp_path / "one"), train_log(tmp_path / "two")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        for k in ("loss", "occ", "vq"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)


def test_the_occupancy_loss_falls(shapes_root, tmp_path):
    assert _train(shapes_root, tmp_path / "run", 40, "--set", "train.lr=3e-3") == 0
    log = train_log(tmp_path / "run")
    assert sum(r["occ"] for r in log[-5:]) < 0.8 * sum(r["occ"] for r in log[:5])


def test_code_restart_revives_unused_codes(shapes_root, tmp_path):
    assert _train(shapes_root, tmp_path / "off", 6, "--set", "train.code_restart=0") == 0
    assert _train(shapes_root, tmp_path / "on", 6) == 0
    off, on = train_log(tmp_path / "off"), train_log(tmp_path / "on")
    assert [r["step"] for r in on if "restarted" in r] == [2, 4, 6] and not any("restarted" in r for r in off)
    assert on[1]["restarted"] > 0                                   # the small uniform init leaves most codes unused
    assert sum(r["codes"] for r in on[2:]) > sum(r["codes"] for r in off[2:])


def test_near_surface_queries_lie_near_the_surface():
    """A ball of radius 0.3: the near-surface half of the queries hugs the sphere, the uniform
    queries do not, the inputs are those of a uniform draw, and the labels are the ball's own (up
    to the 1e-4 jitter)."""
    points = torch.rand(20000, 3, generator=torch.Generator().manual_seed(0)) - 0.5
    occ = (points.norm(dim=-1) < 0.3).float()
    dirs = torch.randn(5000, 3, generator=torch.Generator().manual_seed(1))
    surface = 0.3 * dirs / dirs.norm(dim=-1, keepdim=True)
    uniform = TrainConfig(num_points=512, pointcloud_n=1000)
    near = TrainConfig(num_points=512, pointcloud_n=1000, near_surface=0.5)
    inputs0, queries0, _ = draw(uniform, seeded_generator(0, 1), points, occ, surface)
    inputs, queries, labels = draw(near, seeded_generator(0, 1), points, occ, surface)
    assert queries.shape == (512, 3) and labels.shape == (512,) and torch.equal(inputs, inputs0)
    gap = (queries.norm(dim=-1) - 0.3).abs()
    assert gap[256:].max() < 0.1 and gap[256:].mean() < 0.3 * gap[:256].mean()
    assert (queries0.norm(dim=-1) - 0.3).abs().mean() > 3 * gap[256:].mean()
    assert ((queries.norm(dim=-1) < 0.3).float() == labels).float().mean() > 0.99


def test_official_files_convert_strictly_and_never_run_their_payload(tmp_path, capsys):
    from scripts.convert_official import main as convert
    from tests.test_ar import _RunsACommand
    torch.manual_seed(0)
    model = OccupancyVQVAE(OccupancyVQVAEConfig())
    state = model.state_dict()
    torch.save({"model": state, "epoch_it": 3}, tmp_path / "model_stage1.pt")
    gpt = RasterAR(RasterARConfig(width=64, depth=2, num_heads=1, vocab_size=64, num_tokens=16)).state_dict()
    gpt["z_value_dec.weight"] = gpt["emb.weight"]                  # tied, as in the released file
    torch.save({"model": {**{f"vqvae_model.{k}": v for k, v in state.items()},
                          **{f"transformer_model.{k}": v for k, v in gpt.items()}}, "it": 5}, tmp_path / "model_stage2.pt")
    for kind, name, sub in (("argus-stage1", "model_stage1.pt", ""), ("argus-stage2", "model_stage2.pt", "tokenizer")):
        assert convert(["--kind", kind, "--src", str(tmp_path / name), "--out", str(tmp_path / kind)]) == 0
        loaded = load_occupancy_vqvae(tmp_path / kind / sub)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    generator = load_raster_ar(tmp_path / "argus-stage2" / "generator")
    assert generator.cfg.num_tokens == 16 and generator.cfg.width == 64 and len(generator.cfg.classes) == 55
    assert all(torch.equal(generator.state_dict()[k], v) for k, v in gpt.items() if k != "z_value_dec.weight")
    torch.save({"model": {f"vqvae_model.{k}": v for k, v in state.items()}}, tmp_path / "no_gpt.pt")
    with pytest.raises(SystemExit):
        run(lambda: convert(["--kind", "argus-stage2", "--src", str(tmp_path / "no_gpt.pt"), "--out", str(tmp_path / "x")]))
    assert "no transformer_model. tensors" in capsys.readouterr().err
    marker = tmp_path / "ran"
    gone = {k: v for k, v in state.items() if k != "decoder.fc_out.bias"}
    torch.save({"model": gone, "args": _RunsACommand(marker)}, tmp_path / "bad.pt")
    with pytest.raises(SystemExit) as e:
        run(lambda: convert(["--kind", "argus-stage1", "--src", str(tmp_path / "bad.pt"), "--out", str(tmp_path / "o")]))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "missing tensor 'decoder.fc_out.bias'" in err
    assert not marker.exists()


def test_evaluation_and_token_files_of_a_trained_tokenizer(shapes_root, tmp_path):
    import shutil
    import numpy as np
    from datasets.occupancy import read_split
    from scripts.eval_occupancy import main as evaluate
    from scripts.precompute import main as precompute
    assert _train(shapes_root, tmp_path / "run", 2) == 0
    assert evaluate(["--ckpt", str(tmp_path / "run"), "--data-dir", str(shapes_root), "--split", "train",
                     "--limit", "2", "--inputs", "128", "--out-dir", str(tmp_path / "eval")]) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert len(results["per_shape"]) == 2 and 0 <= results["mean"]["iou"] <= 1
    assert set(results["mean"]) == {"iou", "chamfer_l1", "normal_consistency", "fscore"}
    data = Path(shutil.copytree(shapes_root, tmp_path / "data"))
    args = ["--data-dir", str(data), "--occupancy-vqvae", str(tmp_path / "run"), "--inputs", "128"]
    assert precompute(args) == 0
    shape = read_split(data, "box", "train")[0]
    first = np.load(data / "box" / shape / "occupancy_tokens.npz")["index"]
    assert first.shape == (OccupancyVQVAEConfig(**{k: v for k, v in json.loads(
        (tmp_path / "run" / "config.json").read_text()).items() if k != "kind"}).num_tokens,)
    assert precompute([*args, "--overwrite"]) == 0              # the same draw: the same ids
    assert np.array_equal(np.load(data / "box" / shape / "occupancy_tokens.npz")["index"], first)
