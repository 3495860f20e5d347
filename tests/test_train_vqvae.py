"""train_vqvae.py: exact resume, torchrun on two CPU processes, losses, data order, errors."""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train_vqvae
from losses.depth import align_scale_shift, scale_shift_invariant_loss
from models.vqvae import TriplaneVQVAE, load_vqvae
from trainers import vqvae as vqvae_trainer
from trainers.sampler import StepBatches
from utils.cameras import crop_cameras, normalized_intrinsics, orbit_c2w, pack_cameras
from utils.cli import run
from utils.config import load_config
from tests.helpers import torchrun, train_log

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/vqvae/tiny.yaml"
# 2 objects per step, 4 patches of 12 px out of 16 px renders per sample, no evaluation.
FAST = ["--config", str(TINY), "--batch-size", "2", "--set", "train.render_resolution=16",
        "--set", "train.patch_size=12", "--set", "train.views_per_sample=4", "--set", "train.disc_layers=2",
        "--set", "train.holdout=0", "--set", "train.eval_objects=0", "--set", "train.num_workers=0",
        "--set", "train.save_every=1000", "--set", "train.ema_decay=0.9"]


def _exit_code(main) -> int:
    with pytest.raises(SystemExit) as e:
        run(main)
    return e.value.code


def _train(data, out, steps, *extra):
    return _exit_code(lambda: train_vqvae.main([*FAST, "--data-dir", str(data), "--out-dir", str(out),
                                                "--max-steps", str(steps), *extra]))


def test_resume_gives_the_weights_of_a_straight_run(shapes_root, tmp_path):
    # A learning-rate schedule that warms up, holds and decays across the break.
    sched = ["--set", "train.warmup=0.2", "--set", "train.hold=0.3", "--set", "train.final_lr=0.1"]
    assert _train(shapes_root, tmp_path / "straight", 20, *sched) == 0
    assert _train(shapes_root, tmp_path / "split", 20, *sched, "--stop-at", "10") == 0
    assert _train(shapes_root, tmp_path / "split", 20, *sched, "--resume") == 0
    for name in ("model.safetensors", "ema/model.safetensors"):
        a, b = load_file(str(tmp_path / "straight" / name)), load_file(str(tmp_path / "split" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert [r["loss"] for r in train_log(tmp_path / "straight")] == [r["loss"] for r in train_log(tmp_path / "split")]
    factors = [r["lr_factor"] for r in train_log(tmp_path / "straight")]
    assert factors[0] == pytest.approx(0.005) and factors[4] == 1.0 and factors[-1] == pytest.approx(1 - 0.9 * 10.2 / 11.2)
    state = json.loads((tmp_path / "straight/config.json").read_text())
    assert state["kind"] == "vqvae" and "train" not in state


def test_objects_cached_in_memory_train_as_read_from_disk(shapes_root, tmp_path):
    # 8 steps of 2 objects go over the 10 objects more than once: later steps read the cache.
    assert _train(shapes_root, tmp_path / "disk", 8) == 0
    assert _train(shapes_root, tmp_path / "cached", 8, "--set", "train.cache_objects=true") == 0
    a, b = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("disk", "cached"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode", ["patches", "rays"])
def test_the_losses_decrease_on_two_objects(shapes_root, tmp_path, mode):
    index = json.loads((shapes_root / "dataset.json").read_text())
    root = tmp_path / "two_objects"
    root.mkdir()
    for label in ("sphere", "box"):
        (root / label).symlink_to(shapes_root / label)
    (root / "dataset.json").write_text(json.dumps({label: index[label] for label in ("sphere", "box")}))
    lr = [f"train.{k}=2.0e-3" for k in ("lr_encoder", "lr_dit", "lr_rest")]
    if mode == "rays":       # 24 random pixels of each of the 12 views instead of 4 patches, one view set
        lr += ["train.rays_per_view=24", "train.views_per_sample=12", "train.perceptual_weight=0",
               "train.gan_g_weight=0", "train.gan_d_weight=0", "train.view_sets_per_object=1"]
    assert _train(root, tmp_path / "run", 40, *[a for x in lr for a in ("--set", x)]) == 0
    log = train_log(tmp_path / "run")
    for key in ("l1", "alpha"):
        first, last = sum(r[key] for r in log[:5]), sum(r[key] for r in log[-5:])
        assert last < 0.8 * first, key


def test_decoder_fine_tuning_keeps_the_tokens_and_fits_the_occupancy(shapes_root, tmp_path):
    assert _train(shapes_root, tmp_path / "base", 2) == 0
    frozen = ("encoder", "quant_conv", "quantizer")
    fine_tune = [f"train.init_from={tmp_path / 'base'}", f"train.freeze=[{','.join(frozen)}]",
                 "train.occupancy_weight=1.0", "train.occupancy_points=256", "train.surface_points=256",
                 "train.lr_dit=2.0e-3", "train.lr_rest=2.0e-3"]
    assert _train(shapes_root, tmp_path / "ft", 30, *[a for x in fine_tune for a in ("--set", x)]) == 0
    params = [n for n, _ in load_vqvae(tmp_path / "base").named_parameters()]
    a, b = load_file(str(tmp_path / "base/model.safetensors")), load_file(str(tmp_path / "ft/model.safetensors"))
    kept = [k for k in params if k.split(".")[0] in frozen]
    assert kept and all(torch.equal(a[k], b[k]) for k in kept)      # every token id stays as it was
    assert any(not torch.equal(a[k], b[k]) for k in params if k.startswith("decoder."))
    log = train_log(tmp_path / "ft")
    assert sum(r["occ"] for r in log[-5:]) < 0.8 * sum(r["occ"] for r in log[:5])


def test_two_processes_compute_the_losses_of_one(shapes_root, tmp_path):
    common = [*FAST, "--batch-size", "4", "--max-steps", "3", "--data-dir", str(shapes_root)]
    assert _exit_code(lambda: train_vqvae.main([*common, "--out-dir", str(tmp_path / "one")])) == 0
    torchrun("train_vqvae.py", [*common, "--out-dir", tmp_path / "two"])
    one, two = train_log(tmp_path / "one"), train_log(tmp_path / "two")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        for k in ("loss", "l1", "alpha", "vq", "g_gan", "d_gan"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)
    wa, wb = load_file(str(tmp_path / "one/model.safetensors")), load_file(str(tmp_path / "two/model.safetensors"))
    assert max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa) < 1e-5


def test_clear_errors(shapes_root, tmp_path, capsys):
    assert _train(shapes_root, tmp_path / "none", 2, "--resume") == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert _train(shapes_root, tmp_path / "run", 1) == 0
    assert _train(shapes_root, tmp_path / "run", 2) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert _train(shapes_root, tmp_path / "x", 1, "--set", "train.patch_sise=8") == 2
    assert "patch_size" in capsys.readouterr().err
    assert _train(shapes_root, tmp_path / "x", 1, "--set", "train.patch_size=8") == 2
    assert "too small for a discriminator" in capsys.readouterr().err
    assert _train(shapes_root, tmp_path / "x", 1, "--set", "train.rays_per_view=8") == 2
    assert "rays_per_view" in capsys.readouterr().err
    assert _train(shapes_root, tmp_path / "x", 1, "--set", "train.view_sets_per_object=3") == 2
    assert "view_sets_per_object must be 1 or 2" in capsys.readouterr().err
    assert _train(shapes_root, tmp_path / "x", 1, "--set", "train.freeze=[encoder,decodr]") == 2
    assert "train.freeze: unknown modules ['decodr']" in capsys.readouterr().err
    assert _train(shapes_root, tmp_path / "x", 1, "--set", f"train.init_from={tmp_path / 'nothing'}") == 2
    err = capsys.readouterr().err
    assert "nothing" in err and "Traceback" not in err
    assert _train(tmp_path / "no_data", tmp_path / "y", 1) == 2
    err = capsys.readouterr().err
    assert "no_data" in err and "Traceback" not in err


def test_step_batches_split_the_global_batch_and_restart_anywhere():
    one = StepBatches(23, 4, seed=3, num_steps=12)
    ranks = [StepBatches(23, 4, seed=3, rank=r, world_size=2, num_steps=12) for r in range(2)]
    for step, batch in enumerate(one):
        assert sorted(batch) == sorted(ranks[0].indices(step) + ranks[1].indices(step))
    epoch = [i for s in range(5) for _, i in one.indices(s)]
    assert len(set(epoch)) == 20                            # an epoch draws without replacement
    assert list(StepBatches(23, 4, seed=3, start_step=7, num_steps=5)) == list(one)[7:]


def test_scale_shift_alignment_against_a_float64_least_squares():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.rand(3, 8, 8, generator=g, dtype=torch.float64), torch.rand(3, 8, 8, generator=g,
                                                                                      dtype=torch.float64)
    mask = torch.rand(3, 8, 8, generator=g) > 0.3
    aligned = align_scale_shift(pred, target, mask)
    for b in range(3):
        A = torch.stack([pred[b][mask[b]], torch.ones(int(mask[b].sum()), dtype=torch.float64)], 1)
        s, t = torch.linalg.lstsq(A, target[b][mask[b]][:, None]).solution[:, 0]
        assert torch.allclose(aligned[b], s * pred[b] + t, atol=1e-10)
    # an affine copy of the target costs nothing, whatever the scale and shift
    assert scale_shift_invariant_loss(3.0 * target - 0.7, target, mask).item() < 1e-10
    assert scale_shift_invariant_loss(pred, target, mask).item() > 1e-3


def test_reconstruction_terms_against_a_float64_recomputation():
    """RGB L1 and opacity terms of reconstruction_losses, weighted and averaged over samples."""
    g = torch.Generator().manual_seed(0)
    cfg = vqvae_trainer.TrainConfig(l1_weight=0.7, alpha_weight=0.4, depth_weight=0.0, rays_per_view=8)
    renders, targets, expected = [], [], 0.0
    for _ in range(2):
        r = {"image_raw": torch.rand(4, 3, 1, 8, generator=g) * 2 - 1,
             "weights_samples": torch.rand(4, 1, 1, 8, generator=g), "image_depth": torch.rand(4, 1, 1, 8, generator=g)}
        rgb, alpha = torch.rand(4, 3, 1, 8, generator=g), torch.rand(4, 1, 8, generator=g)
        renders.append(r)
        targets.append((rgb, alpha, torch.rand(4, 1, 8, generator=g)))
        err = r["image_raw"].double() - (rgb.double() * 2 - 1)
        expected += (0.7 * err.abs().mean() + 0.4 * (r["weights_samples"][:, 0].double() - alpha.double()).abs().mean()) / 2
    total, logs, _, _ = vqvae_trainer.reconstruction_losses(cfg, renders, targets)
    assert abs(float(total) - float(expected)) < 1e-6
    assert logs["l1"] > 0 and logs["alpha"] > 0


def test_one_view_set_per_object_is_drawn_per_step_and_position():
    one = vqvae_trainer.TrainConfig(view_sets_per_object=1)
    draws = [vqvae_trainer.sample_view_sets(one, step, pos) for step in range(20) for pos in range(4)]
    assert all(len(d) == 1 for d in draws) and {d[0] for d in draws} == {0, 1}
    assert draws == [vqvae_trainer.sample_view_sets(one, step, pos) for step in range(20) for pos in range(4)]
    assert vqvae_trainer.sample_view_sets(vqvae_trainer.TrainConfig(), 3, 1) == [0, 1]


def test_random_pixels_favour_the_foreground_box():
    alpha = torch.zeros(3, 32, 32)
    alpha[:, 10:14, 20:26] = 1                               # a 4 x 6 object
    t = vqvae_trainer.TrainConfig(rays_per_view=400, patch_in_bbox=0.75)
    pix = vqvae_trainer.random_pixels(t, torch.Generator().manual_seed(0), alpha, margin=2)
    assert pix.shape == (3, 400) and (pix[:, 1:] >= pix[:, :-1]).all() and 0 <= pix.min() and pix.max() < 32 * 32
    y, x = pix // 32, pix % 32
    inside = ((y >= 8) & (y < 16) & (x >= 18) & (x < 28)).float().mean().item()
    assert inside == pytest.approx(0.75 + 0.25 * 80 / 1024, abs=0.03)    # the box share, plus uniform hits
    empty = vqvae_trainer.random_pixels(t, torch.Generator().manual_seed(0), torch.zeros(1, 32, 32))
    assert empty.float().std() > 200                          # no foreground: spread over the whole view


def test_cropped_cameras_render_the_crop_of_the_full_image():
    model = TriplaneVQVAE(load_config(vqvae_trainer.VQVAERunConfig, TINY)).eval()
    torch.manual_seed(0)
    planes = torch.randn(1, 3 * 8, 8, 8)
    c = torch.from_numpy(pack_cameras(np.stack([orbit_c2w(30, 20, 2.0), orbit_c2w(200, 5, 2.0)]),
                                      normalized_intrinsics()))
    full = model.render(planes, c, resolution=16, deterministic=True)
    x0, y0 = torch.tensor([3, 0]), torch.tensor([5, 4])
    part = model.render(planes, crop_cameras(c, x0, y0, 8, 16), resolution=8, deterministic=True)
    for j in range(2):
        ref = full["image_raw"][j, :, y0[j]:y0[j] + 8, x0[j]:x0[j] + 8]
        assert torch.allclose(part["image_raw"][j], ref, atol=1e-5)


def test_train_vqvae_sh_runs_and_resumes(shapes_root, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CONFIG": str(TINY)}
    flags = [a for a in FAST[2:] if a not in ("--batch-size", "2")]

    def sh(*args):
        return subprocess.run(["bash", str(ROOT / "train_vqvae.sh"), *args], env=env, capture_output=True,
                              text=True, timeout=300)
    out = tmp_path / "run"
    first = sh(str(shapes_root), "1", "2", str(out), "--max-steps", "1", *flags)
    assert first.returncode == 0, first.stderr[-2000:]
    again = sh(str(shapes_root), "1", "2", str(out), "--max-steps", "2", *flags)   # picks up the run
    assert again.returncode == 0, again.stderr[-2000:]
    assert [r["step"] for r in train_log(out)] == [1, 2]
    usage = sh(str(shapes_root))
    assert usage.returncode == 2 and "usage: bash train_vqvae.sh DATA_DIR NUM_GPUS BATCH_SIZE OUT_DIR" in usage.stderr
