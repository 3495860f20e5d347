"""train_ar.py on tokens precomputed from the tiny dataset: exact resume, two CPU processes under
torchrun, a falling loss, sample renders, the recipe's schedule and groups, clear errors."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from models.ar import NextScaleAR, load_ar
from scripts.precompute import main as precompute
from tests.test_conditioners import CLIP_DIM, save_tiny_clip
from tests.test_precompute import TINY32, _save_vqvae
from datasets.gbuffer import GBufferDataset
from train_ar import main
from trainers.ar import ARRunConfig, TrainConfig, evaluate, param_groups
from trainers.schedule import lr_factor
from utils.checkpoint import load_model
from utils.cli import run
from utils.config import load_config
from tests.helpers import torchrun, train_log

ROOT = Path(__file__).resolve().parents[1]
# The tiny generator over the tiny VQVAE's tokens: (1, 2, 4, 8) scales, vocabulary and code width of TINY32.
MODEL = [f"pooled_dim={CLIP_DIM}", f"seq_dim={CLIP_DIM}", "patch_nums=[1, 2, 4, 8]",
         f"vocab_size={TINY32.quantizer.vocab_size}", f"c_vae={TINY32.quantizer.c_vae}", "drop_path=0.0",
         "train.holdout=0", "train.num_workers=0", "train.sample_every=0", "train.lr=3e-3", "train.warmup=0.1"]


@pytest.fixture(scope="module")
def tokens(shapes_root, tmp_path_factory):
    """The tiny dataset with tokens of a random tiny VQVAE and tiny-CLIP text embeddings."""
    root = tmp_path_factory.mktemp("ar")
    data = Path(shutil.copytree(shapes_root, root / "data"))
    _save_vqvae(root / "vqvae", TINY32)
    assert precompute(["--data-dir", str(data), "--vqvae", str(root / "vqvae"), "--text-encoder",
                       str(save_tiny_clip(root / "clip")), "--device", "cpu"]) == 0
    return data, root / "vqvae"


def _args(data, out, steps, *extra):
    return ["--config", str(ROOT / "configs/ar/tiny_text.yaml"), "--data-dir", str(data), "--out-dir", str(out),
            "--max-steps", str(steps), "--batch-size", "4", *[a for m in MODEL for a in ("--set", m)], *extra]


def _train(data, out, steps, *extra) -> int:
    try:
        return run(lambda: main(_args(data, out, steps, *extra)))
    except SystemExit as e:
        return e.code


def test_resume_gives_the_weights_of_a_straight_run(tokens, tmp_path):
    data, _ = tokens
    assert _train(data, tmp_path / "straight", 12) == 0
    assert _train(data, tmp_path / "split", 12, "--stop-at", "6") == 0     # the schedule spans 12 steps
    assert _train(data, tmp_path / "split", 12, "--resume") == 0
    a, _, _ = load_model(tmp_path / "straight", "ar")
    b, _, _ = load_model(tmp_path / "split", "ar")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in train_log(tmp_path / "straight")] == [r["loss"] for r in train_log(tmp_path / "split")]


def test_caption_variants_are_read_and_resume_exactly(tokens, tmp_path):
    """train.condition_variants: each step conditions on one of the object's captions, drawn from
    (seed, step, object): other losses than the canonical captions give, the same after a resume."""
    data, _ = tokens
    on = ("--set", "train.condition_variants=true")
    assert _train(data, tmp_path / "straight", 6, *on) == 0
    assert _train(data, tmp_path / "split", 6, "--stop-at", "3", *on) == 0
    assert _train(data, tmp_path / "split", 6, "--resume", *on) == 0
    assert _train(data, tmp_path / "canonical", 6) == 0
    a, _, _ = load_model(tmp_path / "straight", "ar")
    b, _, _ = load_model(tmp_path / "split", "ar")
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = {d: [r["loss"] for r in train_log(tmp_path / d)] for d in ("straight", "split", "canonical")}
    assert losses["straight"] == losses["split"] and losses["straight"][0] != losses["canonical"][0]


def test_the_loss_falls_and_the_accuracy_rises(tokens, tmp_path):
    data, _ = tokens
    assert _train(data, tmp_path / "run", 40, "--set", "cond_drop=0.0") == 0
    log = train_log(tmp_path / "run")
    assert sum(r["loss"] for r in log[-5:]) < 0.7 * sum(r["loss"] for r in log[:5])
    assert sum(r["acc"] for r in log[-5:]) > sum(r["acc"] for r in log[:5]) + 0.1
    model = load_ar(tmp_path / "run")
    assert isinstance(model, NextScaleAR) and model.cfg.condition == "text"
    # the held-out evaluation, here on the training objects: the trained model beats a fresh one
    cfg = load_config(ARRunConfig, ROOT / "configs/ar/tiny_text.yaml", MODEL)
    ds = GBufferDataset(data, split="all", mode="tokens", condition="text")
    torch.manual_seed(0)
    trained, fresh = evaluate(model, ds, cfg, "cpu", batch_size=3), evaluate(NextScaleAR(cfg), ds, cfg, "cpu")
    assert trained["loss"] < 0.7 * fresh["loss"] and trained["acc"] > fresh["acc"] + 0.1


def test_sample_renders_are_written(tokens, tmp_path):
    data, vqvae = tokens
    assert _train(data, tmp_path / "run", 2, "--vqvae", str(vqvae), "--set", "train.sample_every=2",
                  "--set", "train.sample_objects=2") == 0
    from PIL import Image
    img = Image.open(tmp_path / "run" / "samples" / "step_0000002.png")
    res = TINY32.renderer.resolution
    assert img.size == (4 * res, 2 * 2 * res)


def test_two_processes_compute_the_losses_of_one(tokens, tmp_path):
    data, _ = tokens
    assert _train(data, tmp_path / "one", 3) == 0
    torchrun("train_ar.py", _args(data, tmp_path / "two", 3))
    for a, b in zip(train_log(tmp_path / "one"), train_log(tmp_path / "two")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4) and a["acc"] == pytest.approx(b["acc"], abs=1e-6)
    a, _, _ = load_model(tmp_path / "one", "ar")
    b, _, _ = load_model(tmp_path / "two", "ar")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_train_text_sh_runs_and_resumes(tokens, tmp_path):
    data, vqvae = tokens
    env = {**os.environ, "CONFIG": str(ROOT / "configs/ar/tiny_text.yaml"), "OMP_NUM_THREADS": "1"}
    flags = [a for m in MODEL for a in ("--set", m)]

    def sh(*args):
        return subprocess.run(["bash", str(ROOT / "train_text.sh"), *args], env=env, capture_output=True,
                              text=True, timeout=300)
    out = tmp_path / "run"
    first = sh("2", "4", "1", str(vqvae), str(out), str(data), "--max-steps", "1", *flags)
    assert first.returncode == 0, first.stderr[-2000:]
    again = sh("2", "4", "1", str(vqvae), str(out), str(data), "--max-steps", "2", *flags)   # picks up the run
    assert again.returncode == 0, again.stderr[-2000:]
    assert [r["step"] for r in train_log(out)] == [1, 2]
    usage = sh(str(data))
    assert usage.returncode == 2 and "usage: bash train_text.sh DEPTH BS" in usage.stderr


def test_clear_errors(tokens, tmp_path, capsys):
    data, _ = tokens
    assert _train(data, tmp_path / "run", 1) == 0
    assert _train(data, tmp_path / "run", 2) == 2
    assert "already holds a run: pass --resume" in capsys.readouterr().err
    no_empty = Path(shutil.copytree(data, tmp_path / "data"))
    (no_empty / "empty_text_embedding.npy").unlink()
    assert _train(no_empty, tmp_path / "x", 1) == 2
    err = capsys.readouterr().err
    assert "missing unconditional text embedding" in err and "Traceback" not in err
    assert _train(data, tmp_path / "y", 1, "--set", "condition=image", "--set", "cross_attn=first") == 2
    assert "Traceback" not in capsys.readouterr().err


def test_schedule_and_weight_decay_groups():
    t = TrainConfig(max_steps=1000, warmup=0.02, hold=0.05, final_lr=0.1)
    assert lr_factor(0, t) == pytest.approx(0.005)
    assert lr_factor(10, t) == pytest.approx(0.005 + 0.995 * 0.5)
    assert lr_factor(20, t) == lr_factor(68, t) == 1.0                   # hold: 5% of the 980 steps after warm-up
    assert lr_factor(1000, t) == pytest.approx(0.1)
    assert lr_factor(20 + 49 + (1000 - 69) // 2, t) == pytest.approx(0.55, abs=1e-3)
    from models.ar import ARConfig
    model = NextScaleAR(ARConfig(depth=1, width=32, num_heads=4, pooled_dim=8, seq_dim=8, patch_nums=(1, 2),
                                 vocab_size=16, c_vae=4))
    decay, no_decay = param_groups(model, t)
    names = {id(p): n for n, p in model.named_parameters()}
    no = {names[id(p)] for p in no_decay["params"]}
    yes = {names[id(p)] for p in decay["params"]}
    assert {"pos_1LC", "pos_start", "lvl_embed.weight", "blocks.0.attn.scale_mul_1H11", "head.bias"} <= no
    assert {"plane_embed.weight", "blocks.0.attn.mat_qkv.weight", "head.weight", "word_embed.weight"} <= yes


def test_the_generator_records_the_vqvae_of_its_tokens(tokens, tmp_path, capsys):
    """precompute's tokenizer.json travels into the trained generator; another VQVAE is refused by
    precompute (unless --overwrite), by the trainer's --vqvae and by sampling, each in one line."""
    from datasets.precompute import read_tokenizer_record
    from models.layout import tokenizer_signature
    from models.vqvae import load_vqvae
    data, vqvae = tokens
    record = read_tokenizer_record(data)
    assert record["fingerprint"] == tokenizer_signature(load_vqvae(vqvae).quantizer)["fingerprint"]
    assert _train(data, tmp_path / "run", 1) == 0
    assert load_ar(tmp_path / "run").cfg.tokenizer == record["fingerprint"]
    other = tmp_path / "other_vqvae"
    _save_vqvae(other, TINY32, seed=1)
    capsys.readouterr()
    assert _train(data, tmp_path / "run2", 1, "--vqvae", str(other), "--set", "train.sample_every=1") == 2
    err = capsys.readouterr().err.strip()
    assert "trained on the tokens of another VQVAE" in err and str(other) in err and len(err.splitlines()) == 1
    from datasets.gbuffer import TOKEN_FILES, load_index
    copy = Path(shutil.copytree(data, tmp_path / "data"))
    (copy / next(iter(load_index(copy).values()))[0] / TOKEN_FILES["gt_BL"]).unlink()     # one object to redo
    with pytest.raises(ValueError, match="another VQVAE.*pass --overwrite"):
        precompute(["--data-dir", str(copy), "--vqvae", str(other), "--device", "cpu"])
